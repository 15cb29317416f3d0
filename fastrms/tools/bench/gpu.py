"""The GPU check of issue 21: every CUDA path, run and measured in one command on a lent GPU.

``bench/gpu_check.sh`` runs the phases in order of importance, each in a process of its own
under its own time limit, and this module is their Python side::

    python -m fastrms.tools.bench.gpu PHASE --out DIR [--smoke] [--repo PATH]

- ``versions``: the GPU, driver, CUDA runtime and library versions, and a probe that compiles
  and launches a kernel and checks that :func:`counting_launches` counts its launches;
- ``models``: one step over MLP, ResNet-50 and GPT-2 small shapes, fastrms's grouped launch on
  CUDA against ``torch.optim`` fused and foreach on CUDA tensors, the same-pattern CUDA ceiling
  over one flat array and a device-to-device copy of as many bytes; with the kernel launches
  fastrms made per (dtype, device) group, counted by :func:`counting_launches`;
- ``precision``: the low-precision variants CUDA supports over GPT-2 small against torch's fused
  Adam on float32 and bfloat16 CUDA tensors;
- ``torch-loop``: ``fastrms.torch`` against ``torch.optim`` in a CUDA training loop
  (``bench/torch_loop.py``);
- ``summary``: the phases' status, seconds and key figures as one table, and ``summary.json``.

(The ``tests`` and ``sweep`` phases are pytest and ``fastrms bench`` themselves; the script
runs them.) Every phase writes ``DIR/<phase>.json``. ``--smoke`` runs the phase at tiny sizes,
meant for Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) without torch CUDA, to exercise
the plumbing here: its JSON says ``"cuda_timing": "simulator"``, and its figures are no
timings. Every timing on a device is by CUDA events after a warm-up step, the median over
repetitions interleaved variant by variant (:func:`fastrms.tools.bench.measure._interleave`).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from numba import cuda  # this module only runs where CUDA (or its simulator) is wanted

from . import cases, ceilings
from . import models as M
from .measure import Cell, _interleave, summarize
from .precision import ADAM, PrecisionVariant, first_step_error, state_bytes, values_for
from .variants import (
    TORCH_STATE,
    Runner,
    _backend_problem,
    allow_simulator,
    cuda_time,
    import_torch,
    simulated,
    torch_cuda_problem,
    torch_cuda_time,
    torch_cuda_why_not,
)

PHASES = ("versions", "models", "precision", "torch-loop", "merge-sweep", "summary")
#: Every phase's JSON says which clock its CUDA figures are from.
TIMING_KEY = "cuda_timing"

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


# -- models on CUDA ---------------------------------------------------------------------------

#: The models phase's (model, algorithm) runs, the issue's target first; and a tiny model for
#: the smoke run.
MODEL_RUNS = (("gpt2", "adam"), ("resnet50", "adam"), ("mlp", "adam"), ("gpt2", "rmsprop"))
SMOKE_SHAPES = {"fc0.weight": (6, 8), "fc0.bias": (6,), "fc1.weight": (2, 6), "fc1.bias": (2,)}
#: The fastrms variant on CUDA and the torch ones it is compared with, by name.
FASTRMS_CUDA = "cuda"
TORCH_CUDA_MODES = {"torch-cuda-fused": "fused", "torch-cuda-foreach": "foreach"}


def _fastrms_cuda_model(algo: cases.Algo, tensors: M.Tensors) -> Runner:
    """fastrms's optimizer class over Numba device copies of ``tensors``: one grouped step."""

    from ...optim import OPTIMIZERS

    names = list(tensors)
    params = [cuda.to_device(tensors[k]["param"]) for k in names]
    grads = [cuda.to_device(tensors[k]["grad"]) for k in names]
    opt = OPTIMIZERS[algo.rule](params, backend="cuda", **algo.options)
    launch = functools.partial(opt.step, grads)

    def step() -> None:
        launch()
        cuda.synchronize()

    def result() -> M.Tensors:
        return {
            k: {
                "param": params[i].copy_to_host(),
                **{s: opt.state[s][i].copy_to_host() for s in algo.state},
            }
            for i, k in enumerate(names)
        }

    return Runner(step, result, timer=functools.partial(cuda_time, launch), keep=(opt, grads))


def _torch_cuda_model(mode: str) -> Callable[[cases.Algo, M.Tensors], Runner]:
    def build(algo: cases.Algo, tensors: M.Tensors) -> Runner:
        torch = import_torch()
        params = {}
        for k, t in tensors.items():
            p = params[k] = torch.from_numpy(t["param"]).to("cuda")
            p.grad = torch.from_numpy(t["grad"]).to("cuda")
        opt = getattr(torch.optim, algo.torch_class)(
            list(params.values()), **algo.options, **{mode: True}
        )
        names = {s: TORCH_STATE.get(s, s) for s in algo.state}

        def step() -> None:
            opt.step()
            torch.cuda.synchronize()

        def result() -> M.Tensors:
            return {
                k: {
                    "param": p.cpu().numpy(),
                    **{s: opt.state[p][n].cpu().numpy() for s, n in names.items()},
                }
                for k, p in params.items()
            }

        timer = functools.partial(torch_cuda_time, opt.step)
        return Runner(step, result, timer=timer, keep=(opt, params))

    return build


def torch_cuda_why_not_model(mode: str, algo: cases.Algo) -> str | None:
    """Why ``torch.optim`` cannot step ``algo`` in ``mode`` on CUDA here, or None."""
    return torch_cuda_why_not(mode)(algo)


def _model_variants(algo: cases.Algo) -> tuple[dict[str, tuple[str, Callable]], dict[str, str]]:
    """``({name: (label, build)}, {name: why not})`` of the models phase for ``algo``."""
    chosen, skipped = {}, {}
    why = _cuda_problem()
    if why:
        skipped[FASTRMS_CUDA] = why
    else:
        chosen[FASTRMS_CUDA] = ("fastrms cuda (grouped launch)", _fastrms_cuda_model)
    for name, mode in TORCH_CUDA_MODES.items():
        why = torch_cuda_why_not_model(mode, algo)
        if why:
            skipped[name] = why
        else:
            chosen[name] = (f"torch {mode}, CUDA", _torch_cuda_model(mode))
    return chosen, skipped


def _cuda_problem() -> str | None:
    if simulated() and not _SMOKE[0]:
        return "the CUDA simulator is not benchmarked (NUMBA_ENABLE_CUDASIM=1)"
    return _backend_problem("cuda")


#: Whether this process runs a smoke phase (set by :func:`main`; allows the simulator).
_SMOKE = [False]


def _check_model(result: M.Tensors, expected: M.Tensors, exact: bool) -> str | None:
    from .variants import check

    for name, want in expected.items():
        flat = {k: a.reshape(-1) for k, a in want.items()}
        got = {k: a.reshape(-1) for k, a in result[name].items()}
        problem = check(got, flat, exact)
        if problem:
            return f"tensor {name}: {problem}"
    return None


def measure_model_cuda(model: str, shapes: M.Shapes, algo_name: str, repeat: int) -> dict:
    """One step of ``algo_name`` over ``shapes`` on CUDA: each variant checked against the NumPy
    reference after one step from zero state, fastrms's launches counted over a step, then all
    timed interleaved with the flat same-pattern CUDA ceiling and a device-to-device copy of
    the step's bytes."""
    algo = cases.ALGOS[algo_name]
    size = M.model_size(shapes)
    chosen, skipped = _model_variants(algo)
    if not chosen:  # nothing to run here: no arrays, no reference
        return {"model": model, "algo": algo_name, "tensors": len(shapes), "parameters": size,
                "skipped": skipped}  # fmt: skip
    tensors = M.model_arrays(shapes)
    expected = M.model_reference(algo, tensors)
    checks, launches = {}, None
    for name, (_, build) in chosen.items():
        runner = build(algo, M.fresh_copies(tensors))
        runner.step()
        result = runner.result()
        problem = _check_model(result, expected, exact=False)
        checks[name] = {"within_tolerance": problem is None, "problem": problem}
        if name == FASTRMS_CUDA:
            exact = _check_model(result, expected, exact=True)
            checks[name]["bit_exact_with_numpy"] = exact is None
            checks[name]["first_difference"] = exact
            launches = count_step_launches(runner, tensors)
        del runner, result
    del expected
    good = {k: v for k, v in chosen.items() if checks[k]["within_tolerance"]}
    runners = {k: (label, build(algo, tensors)) for k, (label, build) in good.items()}
    if good:
        runners["cuda-ceiling"] = (
            "same-pattern CUDA ceiling, one flat array",
            ceilings.cuda_ceiling(algo, cases.make_arrays(algo, size)),
        )
        runners[ceilings.COPY] = (
            ceilings.COPY_LABEL,
            ceilings.cuda_copy_ceiling(algo.bytes_per_element() * size),
        )
    times = _interleave({k: r for k, (_, r) in runners.items()}, repeat) if runners else {}
    cells = [
        Cell(model, size, k, label, algo.bytes_per_element(), *times[k],
             check="passed" if k in checks else "n/a")
        for k, (label, _) in runners.items()
    ]  # fmt: skip
    summarize(cells, {k: "cuda" for k in runners})
    by = {c.variant: c for c in cells}
    ours = by.get(FASTRMS_CUDA)

    def versus(other: str) -> float | None:
        if ours is None or other not in by:
            return None
        theirs = by[other]
        return (theirs.best_s if "ceiling" in other else theirs.median_s) / ours.median_s

    return {
        "model": model,
        "algo": algo_name,
        "tensors": len(shapes),
        "parameters": size,
        "cells": [asdict(c) for c in cells],
        "checks": checks,
        "skipped": skipped,
        "launches": launches,
        "vs_torch_cuda_fused": versus("torch-cuda-fused"),
        "vs_torch_cuda_foreach": versus("torch-cuda-foreach"),
        "pct_cuda_ceiling": versus("cuda-ceiling"),
        "pct_copy": versus(ceilings.COPY),
    }


def count_step_launches(runner: Runner, tensors: M.Tensors) -> dict:
    """The kernel launches one fastrms step made, counted in numba-cuda's launch path, and the
    (dtype, device) groups its parameters form: the issue's target is at most 2 per group."""
    opt, _ = runner.keep
    groups = {(str(t["param"].dtype), 0) for t in tensors.values()}  # one device here
    with counting_launches() as n:
        runner.step()
    return {"per_step": n[0], "groups": len(groups), "per_group": n[0] / len(groups)}


# -- precision on CUDA ----------------------------------------------------------------------


def _fastrms_precision_cuda(param_dtype: str, **options) -> Callable[[M.Shapes, dict], Runner]:
    """fastrms's Adam class on Numba device copies of the values (bfloat16 as its patterns)."""

    def build(shapes: M.Shapes, values: dict) -> Runner:

        import fastrms

        from ...lowprecision import BFLOAT16

        bf16 = param_dtype == "bfloat16"

        def held(a: np.ndarray) -> np.ndarray:
            return a.astype(BFLOAT16).view(np.uint16) if bf16 else a

        params = [cuda.to_device(held(p)) for p, _ in values.values()]
        grads = [cuda.to_device(held(g)) for _, g in values.values()]
        opt = fastrms.Adam(params, backend="cuda", **ADAM, **options)
        launch = functools.partial(opt.step, grads)

        def step() -> None:
            launch()
            cuda.synchronize()

        def result() -> list[np.ndarray]:
            out = [d.copy_to_host() for d in params]
            return [a.view(BFLOAT16).astype(np.float32) if bf16 else a for a in out]

        return Runner(step, result, timer=functools.partial(cuda_time, launch), keep=opt)

    return build


def _torch_precision_cuda(dtype: str) -> Callable[[M.Shapes, dict], Runner]:
    def build(shapes: M.Shapes, values: dict) -> Runner:
        torch = import_torch()
        params = []
        for p, g in values.values():
            t = torch.from_numpy(p).to("cuda", getattr(torch, dtype))
            t.grad = torch.from_numpy(g).to("cuda", getattr(torch, dtype))
            params.append(t)
        opt = torch.optim.Adam(params, **ADAM, fused=True)

        def step() -> None:
            opt.step()
            torch.cuda.synchronize()

        def result() -> list[np.ndarray]:
            return [p.detach().float().cpu().numpy() for p in params]

        timer = functools.partial(torch_cuda_time, opt.step)
        return Runner(step, result, timer=timer, keep=opt)

    return build


def _ours(name: str, label: str, param_dtype: str, **options) -> PrecisionVariant:
    build = _fastrms_precision_cuda(param_dtype, **options)
    return PrecisionVariant(name, label, build, _cuda_problem, param_dtype)


def _theirs(name: str, label: str, dtype: str) -> PrecisionVariant:
    return PrecisionVariant(name, label, _torch_precision_cuda(dtype), torch_cuda_problem, dtype)


#: The precision phase's variants (the names of ``fastrms bench --precision``'s, on CUDA).
#: bfloat16 parameters with int8 state are refused on CUDA today; the row records the refusal.
CUDA_PRECISION_VARIANTS: dict[str, PrecisionVariant] = {
    v.name: v
    for v in (
        _theirs("torch-fused-f32", "torch fused Adam, float32, CUDA", "float32"),
        _theirs("torch-fused-bf16", "torch fused Adam, bf16 params, CUDA", "bfloat16"),
        _ours("fastrms-f32", "fastrms cuda, float32 params and state", "float32"),
        _ours("fastrms-f32-bf16state", "fastrms cuda, float32 params, bf16 state", "float32",
              state_dtype="bfloat16"),
        _ours("fastrms-f32-int8state", "fastrms cuda, float32 params, int8 state", "float32",
              state_dtype="int8"),
        _ours("fastrms-bf16-f32state", "fastrms cuda, bf16 params (stochastic), float32 state",
              "bfloat16", rounding="stochastic"),
        _ours("fastrms-bf16-bf16state", "fastrms cuda, bf16 params (stochastic), bf16 state",
              "bfloat16", state_dtype="bfloat16", rounding="stochastic"),
        _ours("fastrms-bf16-int8state", "fastrms cuda, bf16 params (stochastic), int8 state",
              "bfloat16", state_dtype="int8", rounding="stochastic"),
    )
}  # fmt: skip
PRECISION_BASELINES = {"float32": "torch-fused-f32", "bfloat16": "torch-fused-bf16"}
#: GPT-2 small for the phase; a tensor past the 8-bit threshold and a small one when smoking.
PRECISION_SMOKE_SHAPES = {"w": (4160,), "b": (64,)}


#: Tensors whose first step is checked (:func:`first_step_error`, on the host, slow at GPT-2's
#: size): the first ones, GPT-2's embeddings and first blocks included.
CHECKED_TENSORS = 20


def measure_precision_cuda(
    model: str, shapes: M.Shapes, repeat: int, save: Callable[[dict], None] | None = None
) -> dict:
    """Adam at each precision on CUDA over ``shapes``, timed interleaved; each row's ratio to
    torch's fused Adam on float32 and on bfloat16 CUDA tensors, its state's bytes per parameter
    and its first step's error (:func:`fastrms.tools.bench.precision.first_step_error`)."""
    size = M.model_size(shapes)
    runners, errors, skipped = {}, {}, {}
    for name, v in CUDA_PRECISION_VARIANTS.items():
        why = v.why_not()
        if why:
            skipped[name] = why
    values = values_for(shapes) if len(skipped) < len(CUDA_PRECISION_VARIANTS) else {}
    for name, v in CUDA_PRECISION_VARIANTS.items():
        if name in skipped:
            continue
        try:  # what fastrms does not support on CUDA yet, it refuses before writing anything
            runner = v.build(shapes, values)
            runner.step()  # the first step allocates the state
        except (TypeError, ValueError) as error:
            skipped[name] = f"{type(error).__name__}: {error}"
            continue
        except Exception as error:  # a failure on the device: reported, the rest still run
            skipped[name] = "FAILED: " + _error(error)
            continue
        checked = dict(list(values.items())[:CHECKED_TENSORS])
        errors[name] = first_step_error(v, checked, runner.result()[:CHECKED_TENSORS])
        runners[name] = runner
    if save is not None:  # what is known before the timing, in case it is stopped
        save({"model": model, "size": size, "skipped": skipped, "first_step_errors": errors})
    times = _interleave(runners, repeat) if runners else {}
    medians = {k: float(np.median(ts)) for k, (_, ts) in times.items()}
    rows = []
    for name, (inner, ts) in times.items():
        v = CUDA_PRECISION_VARIANTS[name]
        row = {"variant": name, "label": v.label, "median_s": medians[name],
               "best_s": float(min(ts)), "times_s": [float(t) for t in ts], "inner": inner,
               "state_bytes_per_param": state_bytes(runners[name].keep) / size,
               "first_step_error": errors[name]}  # fmt: skip
        for dtype, base in PRECISION_BASELINES.items():
            key = "x_torch_fused_" + ("f32" if dtype == "float32" else "bf16")
            row[key] = medians[base] / medians[name] if base in medians else None
        rows.append(row)
    return {"model": model, "size": size, "tensors": len(shapes), "rows": rows,
            "skipped": skipped}  # fmt: skip


# -- fastrms.torch in a CUDA training loop ------------------------------------------------------

TORCH_LOOP_CASES = {
    "adam": ("fastrms-adam", "torch-adam-fused", "torch-adam-foreach"),
    "rmsprop": ("fastrms-rmsprop", "torch-rmsprop-foreach"),
}


def torch_loop(
    models: tuple[str, ...],
    device: str,
    repeats: int,
    steps: int,
    repo: str,
    save: Callable[[dict], None] | None = None,
) -> dict:
    """``bench/torch_loop.py``'s :func:`step_times` per model and algorithm on ``device``."""
    if repo not in sys.path:
        sys.path.append(repo)  # after the installed fastrms: only ``bench`` is wanted from it
    from bench import torch_loop as T

    rows: list[dict] = []
    for model in models:
        for algo, variants in TORCH_LOOP_CASES.items():
            t = T.step_times(model, variants, repeats=repeats, steps=steps, device=device)
            tensors, size = T.model_size(model)
            first = variants[0]
            rows.append({
                "model": model, "algo": algo, "tensors": tensors, "parameters": size,
                "median_step_s": t,
                "x_fastrms": {v: t[v] / t[first] for v in variants[1:]},
            })  # fmt: skip
            if save is not None:
                save({"device": device, "rows": rows})
    return {"device": device, "repeats": repeats, "steps": steps, "rows": rows}


# -- summary ------------------------------------------------------------------------------------


def _load(out: Path, name: str) -> dict | None:
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None


def _statuses(path: Path | None) -> list[dict]:
    """The script's phase log: ``phase<TAB>exit code<TAB>seconds<TAB>limit`` per line."""
    rows = []
    if path is None or not path.exists():
        return rows
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == 4:
            phase, rc, seconds, limit = parts
            # timeout's 124 (137 after its SIGKILL); the script stops phases by SIGINT
            status = {"0": "ok", "124": "timed out", "137": "killed", "skip": "skipped"}
            rows.append({"phase": phase, "rc": rc, "status": status.get(rc, f"failed ({rc})"),
                         "seconds": float(seconds), "limit_s": int(limit)})  # fmt: skip
    return rows


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


def key_figures(out: Path) -> dict[str, str]:
    """Per phase, its key figures in words, read from its JSON (where the phase wrote one)."""
    figures: dict[str, str] = {}
    figures["tests"] = _tests_figure(out / "tests.xml")
    sweep = _load(out, "sweep.json")
    if sweep:
        figures["sweep"] = _sweep_figure(sweep)
    models = _load(out, "models.json")
    if models:
        figures["models"] = _models_figure(models)
    precision = _load(out, "precision.json")
    if precision:
        figures["precision"] = (
            "; ".join(
                f"{r['variant']} {_fmt(r.get('x_torch_fused_f32'), '.2f', 'x')}"
                for r in precision["result"]["rows"]
                if r["variant"].startswith("fastrms")
            )
            or f"no fastrms row ({len(precision['result']['skipped'])} variants not run)"
        )
    loop = _load(out, "torch_loop.json")
    if loop and loop["result"].get("unavailable"):
        figures["torch-loop"] = "not run: " + loop["result"]["unavailable"]
    elif loop:
        figures["torch-loop"] = "; ".join(
            f"{r['model']} {r['algo']}: "
            + ", ".join(f"{v} {_fmt(x, '.2f', 'x')}" for v, x in r["x_fastrms"].items())
            for r in loop["result"]["rows"]
        )
    versions = _load(out, "versions.json")
    if versions:
        v = versions["result"]
        nc = v.get("numba_cuda", {})
        figures["versions"] = (
            f"{nc.get('device', 'simulator' if v.get('simulator') else '?')}, "
            f"cc {nc.get('compute_capability', '?')}, runtime {nc.get('runtime_version', '?')}, "
            f"launch counter {'ok' if v.get('launch_counter', {}).get('ok') else 'NOT ok'}"
        )
    return figures


def _tests_figure(path: Path) -> str:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return "no junit report"
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors",
                                                               "skipped")}  # fmt: skip
    return (f"{total['tests']} tests: {total['failures']} failed, {total['errors']} errors, "
            f"{total['skipped']} skipped")  # fmt: skip


def sweep_rows(sweep: dict) -> list[dict]:
    """Per algorithm at its largest size: fastrms cuda's GB/s, the copy's, the ratio, and the
    ratio to torch foreach and fused on CUDA."""
    cells = sweep["cells"]
    rows = []
    for algo in dict.fromkeys(c["algo"] for c in cells):
        n = max(c["n"] for c in cells if c["algo"] == algo)
        by = {c["variant"]: c for c in cells if c["algo"] == algo and c["n"] == n}
        ours = by.get("cuda")
        copy = by.get(ceilings.COPY)
        row = {"algo": algo, "n": n, "cuda_gbps": ours and ours["gbps"],
               "copy_gbps": copy and copy["gbps"],
               "pct_copy": ours and copy and copy["best_s"] / ours["median_s"]}  # fmt: skip
        for t in ("torch-cuda-foreach", "torch-cuda-fused"):
            theirs = by.get(t)
            row["x_" + t] = ours and theirs and theirs["median_s"] / ours["median_s"]
        rows.append(row)
    return rows


def merge_sweeps(paths: list[Path]) -> dict:
    """One ``fastrms bench --json`` document from several (one per algorithm): their cells,
    skipped variants and targets together, each part's settings in a list, the first's
    machine; a part that is not valid JSON is named under ``"unreadable"``."""
    merged: dict[str, Any] = {"machine": None, "settings": [], "cells": [], "skipped": {},
                              "targets": [], "unreadable": []}  # fmt: skip
    for path in paths:
        try:
            part = json.loads(path.read_text())
        except (OSError, ValueError):
            merged["unreadable"].append(path.name)
            continue
        merged["machine"] = merged["machine"] or part.get("machine")
        merged["schema"] = part.get("schema")
        merged["settings"].append(part.get("settings"))
        merged["cells"] += part.get("cells", [])
        merged["targets"] += part.get("targets", [])
        for variant, reasons in part.get("skipped", {}).items():
            for why, algos in reasons.items():
                merged["skipped"].setdefault(variant, {}).setdefault(why, []).extend(algos)
    merged[TIMING_KEY] = next((s.get(TIMING_KEY) for s in merged["settings"] if s), "unknown")
    return merged


def _sweep_figure(sweep: dict) -> str:
    parts = []
    for r in sweep_rows(sweep):
        pct = r["pct_copy"] and 100 * r["pct_copy"]
        parts.append(
            f"{r['algo']} n={r['n']:.0e}: {_fmt(r['cuda_gbps'], '.0f')} vs copy "
            f"{_fmt(r['copy_gbps'], '.0f')} GB/s ({_fmt(pct, '.0f', '%')}), "
            f"x foreach {_fmt(r['x_torch-cuda-foreach'], '.2f')}"
        )
    return "; ".join(parts)


def _models_figure(models: dict) -> str:
    parts = []
    for m in models["result"]["runs"]:
        launches = m.get("launches") or {}
        parts.append(
            f"{m['model']} {m['algo']}: x fused {_fmt(m.get('vs_torch_cuda_fused'))}, "
            f"launches/group {_fmt(launches.get('per_group'), '.0f')}"
        )
    return "; ".join(parts)


def summary(out: Path, status_file: Path | None) -> dict:
    """The phases' statuses and key figures; printed as a table by :func:`main`."""
    statuses = _statuses(status_file)
    figures = key_figures(out)
    smoke = any((_load(out, f) or {}).get(TIMING_KEY) == "simulator"
                for f in ("versions.json", "models.json", "precision.json"))  # fmt: skip
    return {"phases": [s | {"figures": figures.get(s["phase"], "")} for s in statuses],
            "figures": figures, "simulator": smoke}  # fmt: skip


def format_summary(result: dict) -> str:
    lines = ["", "GPU check summary" + (" (SIMULATOR: no figure is a timing)"
                                          if result["simulator"] else ""),
             f"{'phase':<11} {'status':<12} {'seconds':>8}  key figures"]  # fmt: skip
    for s in result["phases"]:
        lines.append(
            f"{s['phase']:<11} {s['status']:<12} {s['seconds']:>8.1f}  {s['figures'][:400]}"
        )
    return "\n".join(lines)


# -- the command line ---------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return k


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastrms.tools.bench.gpu",
        description="One phase of the GPU check (bench/gpu_check.sh runs them all).",
    )
    p.add_argument("phase", choices=PHASES)
    p.add_argument("--out", required=True, type=Path, help="folder the phase's JSON goes to")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) and without "
        "torch CUDA: checks the plumbing; no figure is a timing",
    )
    p.add_argument("--repeat", type=_positive_int, default=5, help="timed repetitions")
    p.add_argument("--repo", default=".", help="the source tree (bench/ is read from it)")
    p.add_argument("--status", type=Path, help="summary: the script's phase log")
    p.add_argument("--parts", type=Path, help="merge-sweep: the folder of sweep-*.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke and not simulated():
        print(
            "--smoke runs under Numba's CUDA simulator: set NUMBA_ENABLE_CUDASIM=1",
            file=sys.stderr,
        )
        return 2
    if not args.out.is_dir():
        print(f"--out {args.out}: no such folder", file=sys.stderr)
        return 2
    _SMOKE[0] = args.smoke
    allow_simulator(args.smoke)
    if args.phase == "merge-sweep":
        if args.parts is None or not args.parts.is_dir():
            print(f"merge-sweep needs --parts, a folder (got {args.parts})", file=sys.stderr)
            return 2
        merged = merge_sweeps(sorted(args.parts.glob("sweep-*.json")))
        (args.out / "sweep.json").write_text(json.dumps(merged, indent=1) + "\n")
        print(f"merge-sweep: {len(merged['settings'])} parts", file=sys.stderr)
        return 0
    if args.phase == "summary":
        result = summary(args.out, args.status)
        (args.out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
        print(format_summary(result))
        return 0
    started = time.perf_counter()
    path = args.out / (args.phase.replace("-", "_") + ".json")

    def save(result: dict, complete: bool = False) -> None:
        """Write the phase's JSON (also part way: a phase stopped at its limit keeps what it
        measured)."""
        document = {
            "phase": args.phase,
            TIMING_KEY: "simulator" if simulated() else "device",
            "smoke": args.smoke,
            "complete": complete,
            "seconds": time.perf_counter() - started,
            "result": result,
        }
        path.write_text(json.dumps(document, indent=1, default=_jsonable) + "\n")

    args.save = save
    save(PHASE_RUNNERS[args.phase](args), complete=True)
    print(f"{args.phase}: wrote {path}", file=sys.stderr)
    return 0


def _error(error: BaseException) -> str:
    """An exception and where it was raised, on a few lines (the log has the rest)."""
    import traceback

    traceback.print_exception(error, file=sys.stderr)
    where = traceback.extract_tb(error.__traceback__)[-3:]
    return (
        f"{type(error).__name__}: {error} (at "
        + "; ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in where)
        + ")"
    )


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _run_models(args) -> dict:
    todo = [("mlp-smoke", "adam"), ("mlp-smoke", "rmsprop")] if args.smoke else MODEL_RUNS
    runs: list[dict] = []
    for model, algo in todo:
        shapes = SMOKE_SHAPES if args.smoke else M.MODELS[model]()
        print(f"models: {model} {algo}", file=sys.stderr, flush=True)
        try:
            runs.append(measure_model_cuda(model, shapes, algo, 1 if args.smoke else args.repeat))
        except Exception as error:  # reported, and the next run still goes
            runs.append({"model": model, "algo": algo, "error": _error(error)})
        args.save({"runs": runs})
    return {"runs": runs}


def _run_precision(args) -> dict:
    model, shapes = ("smoke", PRECISION_SMOKE_SHAPES) if args.smoke else ("gpt2", M.gpt2_shapes())
    return measure_precision_cuda(model, shapes, 1 if args.smoke else args.repeat, args.save)


def _run_torch_loop(args) -> dict:
    if args.smoke:  # no torch CUDA here: the plumbing on the host, at a tiny size
        result = torch_loop(("mlp:8-4-2",), "cpu", 1, 1, args.repo, args.save)
        result["cuda"] = torch_cuda_problem() or "available"
        return result
    problem = torch_cuda_problem()
    if problem:
        return {"device": "cuda", "unavailable": problem, "rows": []}
    return torch_loop(("mlp", "gpt2"), "cuda", args.repeat, 10, args.repo, args.save)


PHASE_RUNNERS: dict[str, Callable[[Any], dict]] = {
    "versions": lambda args: versions(),
    "models": _run_models,
    "precision": _run_precision,
    "torch-loop": _run_torch_loop,
}


if __name__ == "__main__":
    sys.exit(main())
