"""CUDA kernels: a grid-stride loop around a rule, generated like the CPU loop.

Importing this module imports ``numba.cuda`` (numba-cuda); fastrms imports it only when the
``cuda`` backend is used.
"""

import math
from functools import cache

from numba import cuda

from ._options import FASTMATH, RULES_TOKEN

THREADS_PER_BLOCK = 256
#: Enough resident blocks per multiprocessor to hide memory latency; the grid-stride loop
#: covers the rest of the array.
BLOCKS_PER_SM = 8


@cache
def grid_stride(rule, flags):
    """Return a kernel ``kernel[blocks, threads, stream](n, arrays, hyper)`` for ``rule``.

    ``flags`` is bound as a closure constant, as in :func:`fastrms.kernels.cpu.loops`. The rule
    is compiled as a device function of its own: numba-cuda 0.30 cannot type a
    ``register_jitable(inline="always")`` function called directly from a kernel, and NVVM
    inlines the device function anyway.
    """
    token = RULES_TOKEN  # read below only so that it is part of the closure
    device_rule = cuda.jit(device=True, fastmath=FASTMATH)(rule)

    @cuda.jit(fastmath=FASTMATH)
    def kernel(n, arrays, hyper):
        token  # noqa: B018
        i = cuda.grid(1)
        stride = cuda.gridsize(1)
        while i < n:
            device_rule(i, arrays, hyper, flags)
            i += stride

    return kernel


@cache
def max_blocks():
    """Blocks for a full wave on the current device (the simulator reports no SM count)."""
    sms = getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", None) or 1
    return sms * BLOCKS_PER_SM


def launch(rule, flags, arrays, hyper, stream=0):
    """Run one step of ``rule`` over 1-D Numba device arrays, on ``stream``."""
    n = arrays[0].size
    if n == 0:
        return
    blocks = min(math.ceil(n / THREADS_PER_BLOCK), max_blocks())
    grid_stride(rule, flags)[blocks, THREADS_PER_BLOCK, stream](n, arrays, hyper)
