"""``fastrms demo paths``: optimizer paths on two-dimensional test functions.

Each optimizer starts from the function's start point and takes ``steps`` steps; the table
gives the distance of the last point to the minimum, and the first step ``k`` from which
``|x_j - x*| <= 1e-3`` for every later step ``j`` ("not reached" if the last point is
farther). Settings (:data:`PATH_OPTIMIZERS`, :data:`PATH_LR`; the lr per function):

=============================  ===========================================  =====  =====  =====
optimizer                      settings                                     Beale  Rosen  wavy
=============================  ===========================================  =====  =====  =====
SGD + momentum                 ``SGD(momentum=0.9)``                        3e-3   1e-3   1e-2
Nesterov                       ``SGD(momentum=0.9, nesterov=True)``         3e-3   1e-3   1e-2
AdaGrad                        ``AdaGrad()`` (eps=1e-10)                    0.5    0.5    0.5
RMSProp, eps in sqrt           ``RMSProp(alpha=0.9, eps=1e-3,               1e-2   1e-2   1e-2
                               eps_in_sqrt=True)``
RMSProp, eps outside           ``RMSProp(alpha=0.9, eps=1e-3)``             1e-2   1e-2   1e-2
Adam                           ``Adam()`` (betas 0.9, 0.999; eps=1e-8)      0.1    0.1    0.1
RMSProp (Graves)               ``RMSProp.graves()``: alpha=0.95,            1e-3   1e-3   1e-3
                               momentum=0.9, eps=1e-4, centered
=============================  ===========================================  =====  =====  =====

The two RMSProp paths share ``eps = 1e-3`` to show what its placement does. Inside the sqrt
it bounds the denominator below by ``sqrt(eps) ~ 0.032``, so near a minimum the step becomes
gradient descent with rate ``lr / sqrt(eps) ~ 0.32``, which converges where the curvature is
below ``2 sqrt(eps) / lr ~ 6.3``: on the wavy bowl (4.6), not on Beale (49). Outside, the
denominator follows ``|g|`` down to 1e-3, the step stays about ``lr`` long, and the iterate
hovers at a distance of order ``lr`` (6e-3 on the wavy bowl after 1000 steps).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .settings import PATH_LR, PATH_OPTIMIZERS
from .testfunctions import OBJECTIVES, Objective

#: Distance to the minimum that counts as "reached" in the path table.
REACH_TOL = 1e-3


@dataclass
class Path:
    """One optimizer's path: ``points[k]`` is the point after ``k`` steps."""

    optimizer: str
    label: str
    lr: float
    points: np.ndarray
    values: np.ndarray
    minimum: np.ndarray

    @property
    def diverged(self) -> bool:
        return not np.all(np.isfinite(self.points[-1]))

    @property
    def final(self) -> np.ndarray:
        return self.points[-1]

    @property
    def distance(self) -> float:
        """Distance from the last point to the minimum."""
        return float(np.linalg.norm(self.points[-1] - self.minimum))

    def steps_to(self, tol: float = REACH_TOL) -> int | None:
        """The first step ``k`` from which the path stays within ``tol`` of the minimum.

        ``|points[j] - minimum| <= tol`` for every ``j >= k`` up to the last step; ``None`` if
        the last point is farther (a path that passes by, or hovers at a larger distance, has
        not reached the minimum).
        """
        within = np.linalg.norm(self.points - self.minimum, axis=1) <= tol
        if self.diverged or not within[-1]:
            return None
        outside = np.flatnonzero(~within)
        return int(outside[-1]) + 1 if outside.size else 0


@dataclass
class FunctionPaths:
    """Every path on one test function."""

    objective: Objective
    minimum: np.ndarray
    paths: list[Path]


@dataclass
class PathsResult:
    """The outcome of :func:`run_paths`."""

    steps: int
    functions: list[FunctionPaths]
    seconds: float = 0.0


def run_path(objective: Objective, optimizer: str, steps: int, lr: float | None = None) -> Path:
    """Record ``steps`` steps of a path optimizer on ``objective`` from its start point.

    The point is a 2-element float64 array updated in place by the fastrms optimizer; the
    gradient goes into a separate array. A path stops early if the point becomes non-finite.
    """
    spec = PATH_OPTIMIZERS[optimizer]
    lr = PATH_LR[objective.name][optimizer] if lr is None else float(lr)
    point = np.array(objective.start, dtype=np.float64)
    grad = np.empty(2)
    opt = spec.make(point, lr)
    points = np.empty((steps + 1, 2))
    points[0] = point
    k = 0
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging path is reported as such
        for k in range(1, steps + 1):
            objective.gradient(point, grad)
            opt.step(grad)
            points[k] = point
            if not (math.isfinite(point[0]) and math.isfinite(point[1])):
                break
    points = points[: k + 1]
    with np.errstate(all="ignore"):
        values = np.asarray(objective.value(points.T), dtype=np.float64)
    return Path(optimizer, spec.label, lr, points, values, objective.minimum())


def run_paths(
    functions: Sequence[str] | None = None,
    optimizers: Sequence[str] | None = None,
    steps: int = 1000,
) -> PathsResult:
    """Run every optimizer of ``optimizers`` on every function of ``functions``.

    Parameters
    ----------
    functions : sequence of str, optional
        Names in :data:`fastrms.tools.demo.testfunctions.OBJECTIVES`; default all.
    optimizers : sequence of str, optional
        Names in :data:`PATH_OPTIMIZERS`; default all. Learning rates: :data:`PATH_LR`.
    steps : int
        Steps per path.
    """
    functions = list(OBJECTIVES) if functions is None else list(functions)
    optimizers = list(PATH_OPTIMIZERS) if optimizers is None else list(optimizers)
    for name in functions:
        if name not in OBJECTIVES:
            raise ValueError(f"unknown function {name!r}; choose from {list(OBJECTIVES)}")
    for name in optimizers:
        if name not in PATH_OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; choose from {list(PATH_OPTIMIZERS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t0 = time.perf_counter()
    results = []
    for fname in functions:
        objective = OBJECTIVES[fname]
        paths = [run_path(objective, o, steps) for o in optimizers]
        results.append(FunctionPaths(objective, objective.minimum(), paths))
    return PathsResult(steps, results, time.perf_counter() - t0)


def _point(p: Sequence[float]) -> str:
    # round first, so that -1e-12 prints as 0.00000 rather than -0.00000
    return "({:.5f}, {:.5f})".format(*(round(float(v), 5) + 0.0 for v in p))


def format_paths(result: PathsResult, tol: float = REACH_TOL) -> str:
    """One table per function, as ``fastrms demo paths`` prints it."""
    lines = []
    for fp in result.functions:
        obj = fp.objective
        known = "" if obj.known_minimum is not None else " (scipy.optimize.minimize)"
        lines.append(
            f"{obj.name}: start {_point(obj.start)}, minimum {_point(fp.minimum)}{known}, "
            f"{result.steps} steps"
        )
        header = (
            f"  {'optimizer':<22} {'lr':>7} {'final point':>22} {'final f':>11} "
            f"{'distance':>10}  steps to {tol:g}"
        )
        lines += [header, "  " + "-" * (len(header) - 2)]
        for p in fp.paths:
            if p.diverged:
                lines.append(
                    f"  {p.label:<22} {p.lr:>7g}  diverged after {len(p.points) - 1} steps"
                )
                continue
            reach = p.steps_to(tol)
            lines.append(
                f"  {p.label:<22} {p.lr:>7g} {_point(p.final):>22} {p.values[-1]:>11.3e} "
                f"{p.distance:>10.2e}  {reach if reach is not None else 'not reached'}"
            )
        lines.append("")
    lines.append(
        f"steps to {tol:g}: the first step from which the path stays within {tol:g} of the minimum"
    )
    return "\n".join(lines)
