"""The memory ceiling: a Numba loop with an algorithm's read/write pattern, on the host or on
the device, timed beside the variants it bounds.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable

from .cases import DTYPE, Algo, Arrays
from .variants import Runner, Variant, cuda_time, host_result


def _pattern_lines(reads: int, writes: int, indent: str) -> str:
    """Loop body: load ``reads`` arrays, store into the first ``writes`` of them.

    Every load feeds a store, so no load can be dropped; ``c`` is a run-time zero, so the
    stores write back what was read and values stay bounded however often it runs.
    """
    lines = [f"x{j} = a{j}[i]" for j in range(reads)]
    lines.append("s = " + " + ".join(f"x{j}" for j in range(reads)))
    lines += [f"a{j}[i] = x{j} + c * s" for j in range(writes)]
    return "".join(f"{indent}{line}\n" for line in lines)


def _compile_pattern(
    reads: int, writes: int, header: str, decorate, namespace: dict, footer: str = ""
):
    args = ", ".join(f"a{j}" for j in range(reads))
    body = _pattern_lines(reads, writes, " " * 8)
    source = f"def pattern(n, c, {args}):\n{header}{body}{footer}"
    # Generated source, so that one definition serves every read/write count.
    exec(compile(source, f"<ceiling {reads}r/{writes}w>", "exec"), namespace)
    return decorate(namespace["pattern"])


@functools.cache
def ceiling_loops(reads: int, writes: int) -> tuple[Callable, Callable]:
    """``(parallel, serial)`` Numba loops ``loop(n, c, a0, ..., a{reads-1})`` of the pattern,
    compiled with the kernels' own options (``kernels._options.KERNEL_OPTIONS``), so that they
    vectorize as the kernels do (tests/test_report.py checks their LLVM IR)."""
    from numba import njit, prange

    from ... import threads
    from ...kernels._options import KERNEL_OPTIONS

    par = _compile_pattern(
        reads, writes, "    for i in prange(n):\n", njit(parallel=True, **KERNEL_OPTIONS),
        {"prange": prange},
    )  # fmt: skip
    ser = _compile_pattern(reads, writes, "    for i in range(n):\n", njit(**KERNEL_OPTIONS), {})
    return threads.guard(par), ser


#: Calls of each loop when :func:`ceiling` picks the faster one (the first only warms it).
CEILING_TRIALS = 4


def ceiling(algo: Algo, arrays: Arrays) -> Runner:
    """The host ceiling for ``algo``: a Numba loop with its read/write pattern on ``arrays``.

    It reads parameter, gradient and state and writes parameter and state, as the fused step
    does, and writes back what it reads. It runs the faster of the parallel and the serial
    loop on these arrays (a few calls of each, best against best), whichever size the kernels
    switch at: a ceiling must bound the step whatever its thread count. The report times it
    with the variants and takes its best repetition
    (:func:`fastrms.tools.bench.measure.summarize`).
    """
    loops = ceiling_loops(algo.reads, algo.writes)
    # 1-D views: the loop indexes flat, as the kernels do.
    order = tuple(arrays[k].reshape(-1) for k in ("param", *algo.state, "grad"))
    n = order[0].size
    c = order[0].dtype.type(0)  # typed as the arrays are: a Python float would be float64
    calls = [functools.partial(loop, n, c, *order) for loop in loops]
    best = min(calls, key=_best_time)
    return Runner(best, host_result(arrays))


def _best_time(call: Callable[[], None]) -> float:
    times = []
    for _ in range(CEILING_TRIALS):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def cuda_ceiling(algo: Algo, arrays: Arrays) -> Runner:
    """The device ceiling: the same pattern as a grid-stride CUDA kernel, timed by events."""
    from numba import cuda

    from ...kernels import cuda as kernels

    kernel = _cuda_pattern(algo.reads, algo.writes)
    device = [cuda.to_device(arrays[k].reshape(-1)) for k in ("param", *algo.state, "grad")]
    n = device[0].size
    blocks = min(math.ceil(n / kernels.THREADS_PER_BLOCK), kernels.max_blocks())
    c = DTYPE.type(0)

    def launch() -> None:
        kernel[blocks, kernels.THREADS_PER_BLOCK](n, c, *device)

    def step() -> None:
        launch()
        cuda.synchronize()

    return Runner(step, lambda: arrays, timer=functools.partial(cuda_time, launch), keep=device)


@functools.cache
def _cuda_pattern(reads: int, writes: int):
    from numba import cuda

    header = "    i = cuda.grid(1)\n    while i < n:\n"
    footer = "        i += cuda.gridsize(1)\n"
    return _compile_pattern(reads, writes, header, cuda.jit, {"cuda": cuda}, footer)


def ceiling_for(variant: Variant, algo: Algo, arrays: Arrays) -> Runner:
    """The ceiling ``variant`` is measured against: host or device."""
    return cuda_ceiling(algo, arrays) if variant.device == "cuda" else ceiling(algo, arrays)


#: The device-to-device copy, measured beside the CUDA variants: the card's plain bandwidth.
COPY = "cuda-copy-ceiling"
COPY_LABEL = "device-to-device copy (bytes read + written)"


def copy_bytes(moved: int) -> int:
    """Bytes a copy must copy to move ``moved`` bytes in all: each byte copied is read once
    and written once, so half (``moved`` must be even)."""
    if moved < 2 or moved % 2:
        raise ValueError(f"a copy moves an even number of bytes >= 2, got {moved}")
    return moved // 2


def cuda_copy_ceiling(moved: int) -> Runner:
    """A device-to-device copy (``cuMemcpyDtoD``, numba-cuda's ``copy_to_device`` between
    device arrays) that moves ``moved`` bytes, read plus written, timed by CUDA events.

    Given a step's bytes (bytes per element x n), its time is the time the card's copy engine
    path takes to move as many bytes: the plain bandwidth the issue's ">= 90% of device-to-
    device bandwidth" target is against. The buffers hold arbitrary bytes, not zeros (a copy's
    speed does not depend on them, but nothing here is timed on zeros)."""
    import numpy as np
    from numba import cuda

    count = copy_bytes(moved)
    pattern = np.frombuffer(np.random.default_rng(0).bytes(min(count, 1 << 20)), np.uint8)
    src = cuda.to_device(np.resize(pattern, count))
    dst = cuda.device_array(count, np.uint8)

    def launch() -> None:
        dst.copy_to_device(src)

    def step() -> None:
        launch()
        cuda.synchronize()

    return Runner(
        step,
        lambda: {"copy": dst.copy_to_host()},
        timer=functools.partial(cuda_time, launch),
        keep=(src, dst),
    )
