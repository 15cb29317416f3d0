"""Thread teams that another library owns, for fastrms's parallel CPU steps.

:class:`OpenMPTeam` is PyTorch's OpenMP team as a :class:`fastrms.grouped.Team`.
:func:`torch_team` finds it; :func:`default_team` gives it to steps that did not choose their
threads, once the process has imported torch (fastrms never imports torch for it).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable


class OpenMPTeam:
    """PyTorch's OpenMP team, as a :class:`fastrms.grouped.Team`: fastrms's parallel CPU
    steps run on the threads that torch's own ops run on, instead of starting Numba's thread
    pool beside them. Right after torch's ops (a backward pass, a GradScaler's unscale) those
    threads are awake, while Numba's have gone to sleep and take long to wake; and two pools
    of busy threads would oversubscribe the cores.

    It starts the team through ``GOMP_parallel``, GNU OpenMP's entry point for a
    ``#pragma omp parallel`` region (LLVM's OpenMP runtime provides it too), taken from the
    runtime that torch's own library loaded; torch builds that do not run on OpenMP, or whose
    runtime lacks it, use Numba's threads. In a forked child, whose copy of the team may not
    survive the fork, steps run on one thread.
    """

    def __init__(self, parallel: Callable[..., None]) -> None:
        self._parallel = parallel
        self._pid = os.getpid()

    def threads(self) -> int:
        import torch

        return torch.get_num_threads() if os.getpid() == self._pid else 1

    def run(self, function: int, args: int, threads: int) -> None:
        self._parallel(function, args, threads, 0)


@functools.cache
def torch_team() -> OpenMPTeam | None:
    """PyTorch's OpenMP team, where torch's CPU ops run on OpenMP; else None (Numba's own
    threads then run the parallel steps). ``FASTRMS_TORCH_TEAM=0`` turns it off. Imports torch."""
    import torch

    if os.environ.get("FASTRMS_TORCH_TEAM", "1") == "0":
        return None
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:  # looked up from torch's extension, so found in the OpenMP runtime torch loaded
        runtime = ctypes.CDLL(torch._C.__file__)
        parallel, max_threads = runtime.GOMP_parallel, runtime.omp_get_max_threads
    except (OSError, AttributeError):
        return None
    if max_threads() != torch.get_num_threads():  # not the runtime torch's threads come from
        return None
    parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None
    return OpenMPTeam(parallel)
