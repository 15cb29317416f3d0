"""CPU kernels: a ``prange`` loop (and a serial twin for small arrays) around a rule, for one
array or for a table of many."""

from functools import cache

import numpy as np
from numba import cfunc, njit, prange, types
from numba.extending import register_jitable

from ._options import FASTMATH, RULES_TOKEN
from .pointers import as_array, as_array_from, fetch_add, load_int64

#: Below this many elements (in all, for a grouped step) a step runs on one thread: waking the
#: thread team costs more than it saves. Measured on the 2-core CI machine with the TBB layer
#: fastrms uses (fastrms.threads): an Adam step over 10^5 elements took 89 us on one thread and
#: 158 us on two when it followed torch's own multithreaded step, 66 us and 69 us alone; at
#: 2*10^5 two threads win (97 us against 116 us). Under GNU OpenMP the crossover was 2^16.
PARALLEL_THRESHOLD = 1 << 17


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


#: Scalars a grouped kernel takes, as one array (padded): passing one array costs Numba's
#: dispatcher far less than a tuple of NumPy scalars, and the kernel unpacks it into a tuple
#: once, so the loops see constants, not loads that might alias the arrays being written.
HYPER_WIDTH = 10


@register_jitable(inline="always")
def _unpack(s):
    return (s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9])


@cache
def grouped_loops(rule, flags):
    """Return ``(parallel, serial)`` kernels ``kernel(table, part_ptr, items, scalars)`` that
    step many arrays in one call.

    ``scalars`` is a 1-D array of the arrays' dtype holding the rule's scalars, padded to
    :data:`HYPER_WIDTH`.

    ``table`` holds one int64 row per array: its element count, then the addresses of its
    param, grad and up to three state arrays (as many as the rule takes; the rest repeat the
    param's address and are never touched). Part ``k`` of the work is the pieces
    ``items[part_ptr[k]:part_ptr[k + 1]]``, each an ``(array, start, stop)`` row: the parallel
    kernel hands the parts to the threads (see :func:`fastrms.grouped.schedule`), the serial
    one runs them in order. :func:`~fastrms.kernels.pointers.as_array_from` turns the
    addresses back into arrays (each piece's own, indexed from 0), so each piece runs the same
    inlined, vectorized loop as the single-array kernels, and the results are bit for bit
    theirs.
    """
    token = RULES_TOKEN  # read below only so that it is part of the closure, hence the cache key

    # The two bodies repeat each other on purpose: factored into an inlined helper that
    # returns the piece's arrays, the parallel one fails Numba 0.68's parfor array analysis
    # (an assertion), while the serial one compiles.
    @njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
    def parallel(table, part_ptr, items, scalars):
        token  # noqa: B018
        hyper = _unpack(scalars)
        like = hyper[0]
        for k in prange(part_ptr.size - 1):
            for j in range(part_ptr[k], part_ptr[k + 1]):
                row, start = items[j, 0], items[j, 1]
                n = items[j, 2] - start
                arrays = (
                    as_array_from(table[row, 1], start, n, like),
                    as_array_from(table[row, 2], start, n, like),
                    as_array_from(table[row, 3], start, n, like),
                    as_array_from(table[row, 4], start, n, like),
                    as_array_from(table[row, 5], start, n, like),
                )
                for i in range(n):
                    rule(i, arrays, hyper, flags)

    @njit(cache=True, fastmath=FASTMATH, error_model="numpy")
    def serial(table, part_ptr, items, scalars):
        token  # noqa: B018
        hyper = _unpack(scalars)
        like = hyper[0]
        for j in range(part_ptr[0], part_ptr[part_ptr.size - 1]):
            row, start = items[j, 0], items[j, 1]
            n = items[j, 2] - start
            arrays = (
                as_array_from(table[row, 1], start, n, like),
                as_array_from(table[row, 2], start, n, like),
                as_array_from(table[row, 3], start, n, like),
                as_array_from(table[row, 4], start, n, like),
                as_array_from(table[row, 5], start, n, like),
            )
            for i in range(n):
                rule(i, arrays, hyper, flags)

    return parallel, serial


#: The int64 words of a team step's argument block (see :func:`grouped_team_body`).
TEAM_ARGS = ("table", "part_ptr", "items", "parts", "scalars", "counter")


@cache
def grouped_team_body(rule, flags, dtype):
    """Return a C function ``void body(int64 args)`` that runs a grouped step (the work of
    :func:`grouped_loops`' kernels) on a team of threads that someone else starts.

    Every thread of an OpenMP team calls ``body(args)`` with the same ``args``: the address
    of an int64 block of the words named by :data:`TEAM_ARGS`: the addresses of ``table``,
    ``part_ptr`` and ``items`` (as :func:`grouped_loops` takes them; ``table`` has six
    columns), the number of parts, the address of the scalars (an array of ``dtype``, padded
    to :data:`HYPER_WIDTH`) and a counter that starts at 0. Each thread claims the next part
    by an atomic increment of the counter until none is left, so parts go to the threads
    that are free, as Numba's own schedulers hand them out. Each piece runs the same
    vectorized loop as the other kernels, so the results are bit for bit theirs.

    fastrms.torch runs it on PyTorch's own OpenMP team, whose threads are awake after
    torch's ops, instead of starting Numba's thread pool beside it.
    """
    token = RULES_TOKEN  # read below only so that it is part of the closure, hence the cache key
    zero = np.dtype(dtype).type(0)

    @cfunc(types.void(types.int64), cache=True, fastmath=FASTMATH, error_model="numpy")
    def body(args):
        token  # noqa: B018
        table = load_int64(args)
        part_ptr = load_int64(args + 8)
        items = load_int64(args + 16)
        parts = load_int64(args + 24)
        hyper = _unpack(as_array(load_int64(args + 32), HYPER_WIDTH, zero))
        like = hyper[0]
        k = fetch_add(args + 40)
        while k < parts:
            for j in range(load_int64(part_ptr + 8 * k), load_int64(part_ptr + 8 * k + 8)):
                item = items + 24 * j
                row, start = load_int64(item), load_int64(item + 8)
                n = load_int64(item + 16) - start
                columns = table + 48 * row
                arrays = (
                    as_array_from(load_int64(columns + 8), start, n, like),
                    as_array_from(load_int64(columns + 16), start, n, like),
                    as_array_from(load_int64(columns + 24), start, n, like),
                    as_array_from(load_int64(columns + 32), start, n, like),
                    as_array_from(load_int64(columns + 40), start, n, like),
                )
                for i in range(n):
                    rule(i, arrays, hyper, flags)
            k = fetch_add(args + 40)

    return body
