"""CPU kernels: a ``prange`` loop (and a serial twin for small arrays) around a rule."""

from functools import cache

from numba import njit, prange

from ._options import FASTMATH, RULES_TOKEN

#: Below this many elements a step runs on one thread: starting the thread team (about 8 us on
#: the 2-core CI machine) costs more than it saves; at 10^5 elements two threads win.
PARALLEL_THRESHOLD = 1 << 16


@cache
def loops(rule, flags):
    """Return ``(parallel, serial)`` kernels ``kernel(n, arrays, hyper)`` for ``rule``.

    ``flags`` is bound as a closure constant, so Numba compiles one specialization per flag
    combination and LLVM folds the rule's branches on it. ``error_model="numpy"`` gives IEEE
    division (as NumPy and PyTorch do) instead of a zero check that keeps the loop scalar.
    """
    token = RULES_TOKEN  # read below only so that it is part of the closure, hence the cache key

    @njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
    def parallel(n, arrays, hyper):
        token  # noqa: B018
        for i in prange(n):
            rule(i, arrays, hyper, flags)

    @njit(cache=True, fastmath=FASTMATH, error_model="numpy")
    def serial(n, arrays, hyper):
        token  # noqa: B018
        for i in range(n):
            rule(i, arrays, hyper, flags)

    return parallel, serial


def launch(rule, flags, arrays, hyper):
    """Run one step of ``rule`` over the 1-D arrays ``arrays`` (parameter first)."""
    n = arrays[0].size
    parallel, serial = loops(rule, flags)
    (parallel if n >= PARALLEL_THRESHOLD else serial)(n, arrays, hyper)
