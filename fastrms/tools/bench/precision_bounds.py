"""The bounds of ``fastrms bench --precision``: how fast each fastrms variant could run on this
machine, and what stops it.

A step can run no faster than the larger of two floors:

- **memory**: its bytes (parameters, gradients and state read; parameters and state written)
  at the bandwidth of :func:`flat_ceiling`, a loop over one flat float32 array with float32
  Adam's pattern (4 arrays read, 3 written: 28 bytes per element), timed in the same run as the
  variants. A variant's floor is the ceiling's best time scaled by its bytes over the
  ceiling's.
- **compute**: its arithmetic: the variant's own kernel (the grouped step's bare kernel call),
  serial, over :data:`IN_CACHE` elements that stay in cache, so that nothing waits for memory;
  its best time per element of :data:`COMPUTE_REPS` calls, times the model's elements, divided
  by the threads (each thread does its share of the arithmetic).

The larger floor is the variant's bound, and torch fused float32 Adam's median over it is the
most the variant's ratio to torch could be here. Where the compute floor is the larger, the
variant is bound by its arithmetic, and moving fewer bytes cannot make it faster.
"""

from __future__ import annotations

import time

import numpy as np

from . import cases, ceilings
from .variants import Runner, thread_count

#: Elements of the in-cache kernel (256 KiB of float32 parameters; Adam's arrays fit in L2).
IN_CACHE = 1 << 16
#: Calls of the in-cache kernel; its best is the compute floor.
COMPUTE_REPS = 200
#: Bytes per element of float32 Adam's pattern, which :func:`flat_ceiling` runs.
CEILING_BYTES = 28
#: The name of the flat ceiling's row in the report.
CEILING = "flat-ceiling"
CEILING_LABEL = "flat ceiling: float32 Adam's bytes at copy speed"


def flat_ceiling(n: int) -> Runner:
    """The memory ceiling over ``n`` elements: float32 Adam's read/write pattern on one flat
    array of each (the faster of the parallel and the serial loop, as every ceiling of
    ``fastrms bench`` is), 28 bytes per element."""
    algo = cases.ALGOS["adam"]
    return ceilings.ceiling(algo, cases.make_arrays(algo, n))


def bytes_moved(param_bytes: int, grad_bytes: int, state_bytes: int) -> int:
    """A step's traffic: parameters, gradients and state read; parameters and state written."""
    return 2 * param_bytes + grad_bytes + 2 * state_bytes


def compute_floor(build, values_for, threads: int) -> float:
    """Seconds per element of a fastrms variant's arithmetic on ``threads`` threads: its bare
    kernel over :data:`IN_CACHE` elements in cache on one thread, best of
    :data:`COMPUTE_REPS`, divided by ``threads``.

    ``build`` is the variant's builder (:class:`~fastrms.tools.bench.precision
    .PrecisionVariant`), which makes a fastrms optimizer; its grouped step's kernel call
    (:meth:`fastrms.grouped.StepPlan.kernel_calls`) is what is timed.
    """
    shapes = {"w": (IN_CACHE,)}
    with thread_count(1), np.errstate(all="ignore"):
        runner = build(shapes, values_for(shapes))
        runner.step()  # compiles, allocates the state, makes the plan
        opt = runner.keep
        setup = opt._setup(opt.step_count, opt._hyper())
        calls = opt._plan.kernel_calls(setup)
        best = float("inf")
        for _ in range(COMPUTE_REPS):
            start = time.perf_counter()
            for call in calls:
                call()
            best = min(best, time.perf_counter() - start)
    return best / IN_CACHE / threads


def bound_fields(
    size: int, moved: int, per_element: float, ceiling_best: float | None, torch_median: float
) -> dict:
    """The report's bound fields of one variant of ``moved`` bytes per step over ``size``
    elements: its memory floor (from the ceiling's best time, if timed), its compute floor
    (``per_element`` seconds times ``size``), and torch's median over the larger."""
    memory = ceiling_best * moved / (CEILING_BYTES * size) if ceiling_best else None
    compute = per_element * size
    bound = max(compute, memory or 0.0)
    return {
        "bytes_per_param": moved / size,
        "memory_floor_s": memory,
        "compute_floor_s": compute,
        "bound_by": "compute" if memory is None or compute >= memory else "memory",
        "bound_x_torch_fused_f32": torch_median / bound if torch_median else None,
    }
