"""The GPU check's device side (``bench/gpu_check.sh``, :mod:`fastrms.tools.bench.gpu`): a
counter of the CUDA kernel launches made inside a block, and the ``versions`` phase's record of
the GPU, its driver, the CUDA runtime and the libraries."""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from numba import cuda  # this module only runs where CUDA (or its simulator) is wanted

from .variants import (
    _backend_problem,
    import_torch,
    simulated,
    torch_cuda_problem,
)

# -- counting kernel launches -----------------------------------------------------------------


def _probe(out):
    """Add one to every element of ``out`` (a module-level global ``cuda``: the simulator
    swaps the module named so in a kernel's globals)."""
    i = cuda.grid(1)
    if i < out.size:
        out[i] += 1


@functools.cache
def _probe_kernel():
    return cuda.jit(_probe)


@contextmanager
def counting_launches() -> Iterator[list[int]]:
    """Count the CUDA kernel launches made inside the block: ``with counting_launches() as
    n: ...``, then ``n[0]`` is the count.

    Every numba-cuda launch is ``kernel[grid, block, ...](*args)``: the configured object's
    class (numba-cuda's launch configuration on a device, the simulator's kernel under the
    simulator) is found from a probe kernel, and its ``__call__`` counted while the block
    runs. Device functions the simulator calls are not launches and are not counted. Raises
    RuntimeError where that class cannot be patched (a launch path numba-cuda moved to C).
    """
    configured = _probe_kernel()[1, 1]
    owner = type(configured)
    original = owner.__call__
    count = [0]

    def counted(self, *args, **kwargs):
        if not getattr(self, "_device", False):  # the simulator's device functions
            count[0] += 1
        return original(self, *args, **kwargs)

    try:
        owner.__call__ = counted
    except (TypeError, AttributeError) as error:
        raise RuntimeError(f"cannot count launches through {owner.__qualname__}: {error}") from None
    try:
        yield count
    finally:
        owner.__call__ = original


def probe_launches(k: int = 3) -> dict:
    """Launch the probe kernel ``k`` times on 64 elements, counting; the counter works if it
    counts ``k`` and the kernel ran ``k`` times (every element ``k``)."""

    out = cuda.to_device(np.zeros(64, np.int32))
    t0 = time.perf_counter()
    with counting_launches() as n:
        for _ in range(k):
            _probe_kernel()[1, 64](out)
    cuda.synchronize()
    values = out.copy_to_host()
    return {
        "launched": k,
        "counted": n[0],
        "ran": bool((values == k).all()),
        "seconds": time.perf_counter() - t0,
        "ok": n[0] == k and bool((values == k).all()),
    }


# -- versions -------------------------------------------------------------------------------


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _nvidia_smi() -> dict:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return {"error": "nvidia-smi not found"}
    query = "name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw"
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    rows = [line.split(", ") for line in done.stdout.strip().splitlines()]
    return {"query": query, "rows": rows, "returncode": done.returncode}


def versions() -> dict:
    """The machine, the GPU and every library the check depends on, each probed apart so that
    one failure does not hide the rest."""
    import numba

    import fastrms

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba-cuda": _dist_version("numba-cuda"),
        "torch": _dist_version("torch"),
        "cupy": _dist_version("cupy-cuda13x") or _dist_version("cupy-cuda12x"),
        "ml_dtypes": _dist_version("ml-dtypes") or _dist_version("ml_dtypes"),
        "fastrms": fastrms.__version__,
        "fastrms_file": fastrms.__file__,
        "simulator": simulated(),
        "cuda_backend": _backend_problem("cuda") or "available",
    }
    if not simulated():
        out["nvidia_smi"] = _nvidia_smi()
    out["numba_cuda"] = _try(_numba_cuda_versions)
    out["torch_cuda"] = _try(_torch_cuda_versions)
    out["launch_counter"] = _try(probe_launches)
    return out


def _try(probe: Callable[[], dict]) -> dict:
    try:
        return probe()
    except Exception as error:  # a probe's failure is a finding, not a crash
        return {"error": f"{type(error).__name__}: {error}"}


def _numba_cuda_versions() -> dict:

    if simulated():
        return {"simulator": True}
    device = cuda.get_current_device()
    name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
    from numba.cuda.cudadrv import driver

    return {
        "device": name,
        "compute_capability": list(device.compute_capability),
        "multiprocessors": getattr(device, "MULTIPROCESSOR_COUNT", None),
        "runtime_version": list(cuda.runtime.get_version()),
        "driver_version": _try_value(lambda: list(driver.driver.get_version())),
        "nvvm_version": _try_value(lambda: list(cuda.cudadrv.nvvm.NVVM().get_version())),
    }


def _try_value(get: Callable[[], Any]) -> Any:
    try:
        return get()
    except Exception as error:
        return f"{type(error).__name__}: {error}"


def _torch_cuda_versions() -> dict:
    torch = import_torch()
    if torch is None:
        return {"error": "torch is not installed"}
    out = {"version": torch.__version__, "built_for_cuda": torch.version.cuda}
    problem = torch_cuda_problem()
    if problem:
        return out | {"unavailable": problem}
    props = torch.cuda.get_device_properties(0)
    return out | {
        "device": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "memory_bytes": props.total_memory,
        "multiprocessors": props.multi_processor_count,
    }
