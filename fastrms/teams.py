"""Thread teams that another library owns, for fastrms's parallel CPU steps.

:class:`OpenMPTeam` is PyTorch's OpenMP team as a :class:`fastrms.grouped.Team`.
:func:`torch_team` finds it; :func:`default_team` gives it to steps that did not choose their
threads, once the process has imported torch (fastrms never imports torch for it).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable

#: On PyTorch's OpenMP team, a plain fastrms step (an optimizer class, a grouped call) over
#: fewer elements runs on one thread. (A functional call on one array takes the team only from
#: ``kernels.cpu.PARALLEL_THRESHOLD`` on: below it, its serial loop was faster.) The team's threads
#: are awake after torch's ops, so two pay off earlier than Numba's
#: (``kernels.cpu.PARALLEL_THRESHOLD``, 2^17): as fastrms.torch's own TEAM_THRESHOLD, measured
#: in its training loop, and by ``bench/team_vs_torch.py`` (shared 2-core VM): at n = 10^5 Adam
#: after torch's work, the team's two threads' fastest steps were 1.77x-2.31x torch fused's,
#: one thread's 1.57x-1.78x.
TEAM_THRESHOLD = 1 << 16


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


def default_team() -> OpenMPTeam | None:
    """The team a plain fastrms step runs its parallel CPU regions on when it did not choose:
    PyTorch's OpenMP team if this process has imported torch (its threads are then the ones
    a training loop keeps busy and awake), else None: Numba's fork-safe threading layer
    (:mod:`fastrms.threads`). fastrms does not import torch to find out.

    Fork-safe either way: in a child forked after the parent stepped on torch's team, the
    team's steps run on one thread (:meth:`OpenMPTeam.threads`), never in GNU OpenMP.
    """
    if "torch" not in sys.modules:
        return None
    return torch_team()
