"""Worked examples: ``fastrms demo regression`` and ``fastrms demo paths``.

Both demos are plain functions returning results (:func:`fit_regression`, :func:`run_paths`);
the CLI formats them, and :func:`plot_regression`, :func:`plot_paths` and :func:`animate_paths`
draw them. Every parameter vector is a float64 NumPy array of 2 elements, updated in place by
a fastrms optimizer from a separately allocated gradient array.

Plotting needs matplotlib (``pip install "fastrms[plot]"``); it is imported only by the plotting
functions, which raise :class:`PlotDependencyError` without it.

Regression
----------
``y = 4 + 3 x + noise``, ``x`` uniform in [0, 2), standard-normal noise, ``n = 100`` samples
drawn from ``numpy.random.default_rng(seed)``. ``theta = (bias, slope)`` starts at zero and
minimizes the mean squared error; a batch ``B`` gives the gradient with its own size::

    L_B(theta) = (1/|B|) * sum_{i in B} (theta_0 + theta_1 x_i - y_i)**2
    grad L_B   = (2/|B|) * X_B^T (X_B theta - y_B)

One iteration is one epoch: a full-batch step, or one pass over the data in mini-batches,
reshuffled every epoch. The learning rate of epoch ``k`` (from 0) is
``lr / (1 + lr_decay * k)``. The fit stops when the full-data loss changes by less than
``tol`` over an epoch, or after ``max_iter`` epochs.

Default settings (``--optimizer``, ``--lr``):

==============  ==================================================================  =====
name            optimizer                                                           lr
==============  ==================================================================  =====
rmsprop         ``RMSProp(alpha=0.9, eps=1e-8, eps_in_sqrt=True)`` (the tutorial)  0.1
rmsprop-torch   ``RMSProp(alpha=0.9, eps=1e-8)``, eps outside the sqrt             0.1
adam            ``Adam()``                                                          0.2
adagrad         ``AdaGrad()``                                                       2.0
sgd             ``SGD()``                                                           0.2
momentum        ``SGD(momentum=0.9)``                                               0.05
nesterov        ``SGD(momentum=0.9, nesterov=True)``                                0.05
graves          ``RMSProp.graves()``: centered, eps=1e-4 in the sqrt, momentum=0.9  0.01
==============  ==================================================================  =====

``lr_decay`` defaults to 0 in full-batch mode and to 0.05 with mini-batches: with a constant
step, the gradient noise keeps mini-batch RMSProp about ``lr`` away from the solution (0.09
to 0.16 at worst over 8 seeds, batch sizes 10 to 32, ``lr=0.1``), and the loss never settles
below ``tol``.

Optimizer paths
---------------
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

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import linalg

from .optim import SGD, AdaGrad, Adam, Optimizer, RMSProp
from .testfunctions import OBJECTIVES, Objective

OptimizerFactory = Callable[[np.ndarray, float], Optimizer]

PLOT_INSTALL_HINT = 'plotting needs matplotlib: pip install "fastrms[plot]"'


class PlotDependencyError(ImportError):
    """matplotlib (or pillow, for GIFs) is not installed."""


@dataclass(frozen=True)
class OptimizerSpec:
    """A named optimizer setting: ``make(params, lr)`` builds it."""

    name: str
    label: str
    settings: str
    make: OptimizerFactory


def _specs(*specs: OptimizerSpec) -> dict[str, OptimizerSpec]:
    return {s.name: s for s in specs}


def _sci(x: float) -> str:
    return np.format_float_scientific(x, trim="-", exp_digits=1)


def _rmsprop(name: str, eps: float, eps_in_sqrt: bool) -> OptimizerSpec:
    where = "in sqrt" if eps_in_sqrt else "outside"
    return OptimizerSpec(
        name,
        f"RMSProp, eps {where}",
        f"alpha=0.9, eps={_sci(eps)} {'inside' if eps_in_sqrt else 'outside'} the sqrt",
        lambda p, lr: RMSProp(p, lr=lr, alpha=0.9, eps=eps, eps_in_sqrt=eps_in_sqrt),
    )


_SGD = OptimizerSpec("sgd", "SGD", "no momentum", lambda p, lr: SGD(p, lr=lr))
_MOMENTUM = OptimizerSpec(
    "momentum", "SGD + momentum", "momentum=0.9", lambda p, lr: SGD(p, lr=lr, momentum=0.9)
)
_NESTEROV = OptimizerSpec(
    "nesterov",
    "Nesterov",
    "momentum=0.9, nesterov=True",
    lambda p, lr: SGD(p, lr=lr, momentum=0.9, nesterov=True),
)
_ADAGRAD = OptimizerSpec("adagrad", "AdaGrad", "eps=1e-10", lambda p, lr: AdaGrad(p, lr=lr))
_ADAM = OptimizerSpec("adam", "Adam", "betas=(0.9, 0.999), eps=1e-8", lambda p, lr: Adam(p, lr=lr))
_GRAVES = OptimizerSpec(
    "graves",
    "RMSProp (Graves)",
    "alpha=0.95, momentum=0.9, eps=1e-4 inside the sqrt, centered",
    lambda p, lr: RMSProp.graves(p, lr=lr),
)

#: Optimizers of the regression demo (``--optimizer``); their learning rates: REGRESSION_LR.
REGRESSION_OPTIMIZERS = _specs(
    _rmsprop("rmsprop", 1e-8, eps_in_sqrt=True),
    _rmsprop("rmsprop-torch", 1e-8, eps_in_sqrt=False),
    _ADAM,
    _ADAGRAD,
    _SGD,
    _MOMENTUM,
    _NESTEROV,
    _GRAVES,
)
REGRESSION_LR = {
    "rmsprop": 0.1,
    "rmsprop-torch": 0.1,
    "adam": 0.2,
    "adagrad": 2.0,
    "sgd": 0.2,
    "momentum": 0.05,
    "nesterov": 0.05,
    "graves": 0.01,
}

#: Optimizers of the path demo, in legend order; their learning rates: PATH_LR.
PATH_OPTIMIZERS = _specs(
    _MOMENTUM,
    _NESTEROV,
    _ADAGRAD,
    _rmsprop("rmsprop", 1e-3, eps_in_sqrt=True),
    _rmsprop("rmsprop-torch", 1e-3, eps_in_sqrt=False),
    _ADAM,
    _GRAVES,
)
_ADAPTIVE_LR = {"adagrad": 0.5, "rmsprop": 1e-2, "rmsprop-torch": 1e-2, "adam": 0.1, "graves": 1e-3}
#: Learning rate of each path optimizer on each function. The adaptive methods are nearly
#: invariant to the gradient's scale and share one rate; SGD's follows the function's curvature.
PATH_LR: dict[str, dict[str, float]] = {
    "beale": {"momentum": 3e-3, "nesterov": 3e-3, **_ADAPTIVE_LR},
    "rosenbrock": {"momentum": 1e-3, "nesterov": 1e-3, **_ADAPTIVE_LR},
    "wavy": {"momentum": 1e-2, "nesterov": 1e-2, **_ADAPTIVE_LR},
}

#: Color and line style of each path optimizer, the same in every panel.
PATH_STYLES = {
    "momentum": ("tab:blue", "-"),
    "nesterov": ("tab:orange", "-"),
    "adagrad": ("tab:green", "-"),
    "rmsprop": ("tab:red", "-"),
    "rmsprop-torch": ("tab:purple", "--"),
    "adam": ("tab:brown", "-"),
    "graves": ("tab:pink", "-"),
}

#: Distance to the minimum that counts as "reached" in the path table.
REACH_TOL = 1e-3


# -- regression -------------------------------------------------------------------------------


@dataclass
class RegressionResult:
    """The outcome of :func:`fit_regression`.

    ``losses[k]`` is the full-data mean squared error after ``k`` epochs (``losses[0]`` at the
    start); ``lstsq`` is the least-squares solution from :func:`scipy.linalg.lstsq` and
    ``lstsq_loss`` its loss.
    """

    optimizer: str
    lr: float
    lr_decay: float
    batch_size: int | None
    theta: np.ndarray
    lstsq: np.ndarray
    lstsq_loss: float
    losses: np.ndarray
    epochs: int
    steps: int
    converged: bool
    tol: float
    x: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)

    @property
    def distance(self) -> float:
        """Euclidean distance from ``theta`` to the least-squares solution."""
        return float(np.linalg.norm(self.theta - self.lstsq))


def regression_data(rng: np.random.Generator, n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples: ``x`` uniform in [0, 2), ``y = 4 + 3 x + noise``, noise standard normal."""
    x = rng.uniform(0.0, 2.0, n)
    y = 4.0 + 3.0 * x + rng.standard_normal(n)
    return x, y


def fit_regression(
    optimizer: str = "rmsprop",
    *,
    batch_size: int | None = None,
    lr: float | None = None,
    lr_decay: float | None = None,
    tol: float = 1e-6,
    max_iter: int = 1000,
    seed: int = 0,
    n: int = 100,
) -> RegressionResult:
    """Fit ``y = theta_0 + theta_1 x`` to :func:`regression_data` with a fastrms optimizer.

    Parameters
    ----------
    optimizer : str
        A name in :data:`REGRESSION_OPTIMIZERS`.
    batch_size : int, optional
        Mini-batch size, reshuffled every epoch; ``None`` (or ``>= n``) for full batch.
    lr : float, optional
        Initial learning rate; default :data:`REGRESSION_LR` of the optimizer.
    lr_decay : float, optional
        Epoch ``k`` uses ``lr / (1 + lr_decay * k)``. Default 0 for full batch, 0.05 for
        mini-batches.
    tol : float
        Stop when the full-data loss changes by less than ``tol`` over one epoch.
    max_iter : int
        Most epochs to run.
    seed : int
        Seeds the data and the shuffles (one ``numpy.random.Generator``).
    n : int
        Number of samples.
    """
    if optimizer not in REGRESSION_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(REGRESSION_OPTIMIZERS)}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    full = batch_size is None or batch_size >= n
    lr = REGRESSION_LR[optimizer] if lr is None else float(lr)
    if lr_decay is None:
        lr_decay = 0.0 if full else 0.05

    rng = np.random.default_rng(seed)
    x, y = regression_data(rng, n)
    X = np.column_stack([np.ones(n), x])
    lstsq = linalg.lstsq(X, y)[0]

    def loss(theta: np.ndarray) -> float:
        r = X @ theta - y
        return float(r @ r) / n

    theta = np.zeros(2)
    grad = np.empty(2)
    resid = np.empty(n)
    opt = REGRESSION_OPTIMIZERS[optimizer].make(theta, lr)
    size = n if full else int(batch_size)
    losses = [loss(theta)]
    order = np.arange(n)
    steps = 0
    converged = False
    for epoch in range(max_iter):
        opt.lr = lr / (1.0 + lr_decay * epoch)
        if not full:
            rng.shuffle(order)
        for start in range(0, n, size):
            idx = order[start : start + size]
            Xb, yb = X[idx], y[idx]
            r = resid[: len(idx)]
            np.matmul(Xb, theta, out=r)
            r -= yb
            np.matmul(r, Xb, out=grad)
            grad *= 2.0 / len(idx)
            opt.step(grad)
            steps += 1
        losses.append(loss(theta))
        if abs(losses[-1] - losses[-2]) < tol:
            converged = True
            break
    return RegressionResult(
        optimizer=optimizer,
        lr=lr,
        lr_decay=lr_decay,
        batch_size=None if full else size,
        theta=theta,
        lstsq=lstsq,
        lstsq_loss=loss(lstsq),
        losses=np.array(losses),
        epochs=len(losses) - 1,
        steps=steps,
        converged=converged,
        tol=tol,
        x=x,
        y=y,
    )


def format_regression(result: RegressionResult) -> str:
    """The lines ``fastrms demo regression`` prints."""
    spec = REGRESSION_OPTIMIZERS[result.optimizer]
    mode = "full batch" if result.batch_size is None else f"mini-batches of {result.batch_size}"
    decay = f", lr_decay={result.lr_decay:g}" if result.lr_decay else ""
    stop = (
        f"|loss change| < {result.tol:g}" if result.converged else "max-iter reached, not converged"
    )
    b, s = result.theta
    lb, ls = result.lstsq
    return "\n".join(
        [
            f"{spec.label} (lr={result.lr:g}{decay}; {spec.settings}), {mode}",
            f"theta  (bias, slope) = ({b:.6f}, {s:.6f})",
            f"lstsq  (bias, slope) = ({lb:.6f}, {ls:.6f})",
            f"distance to lstsq    = {result.distance:.3e}",
            f"loss = {result.losses[-1]:.6f} (lstsq: {result.lstsq_loss:.6f})",
            f"iterations: {result.epochs} epochs, {result.steps} steps ({stop})",
        ]
    )


# -- optimizer paths ------------------------------------------------------------------------


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
        Names in :data:`fastrms.testfunctions.OBJECTIVES`; default all.
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


# -- plots ------------------------------------------------------------------------------------


def _figure_class():
    """matplotlib's ``Figure`` (drawn with Agg, without pyplot), or PlotDependencyError."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotDependencyError(PLOT_INSTALL_HINT) from None
    return Figure


def check_plotting() -> None:
    """Raise :class:`PlotDependencyError` unless matplotlib can be imported."""
    _figure_class()


#: Size of the regression figure, in inches, and its resolution.
REGRESSION_FIGSIZE = (10.0, 4.0)
PATHS_FIGSIZE = (15.0, 5.0)
PNG_DPI = 100


def plot_regression(result: RegressionResult, path: str, dpi: int = PNG_DPI) -> None:
    """Write the loss curve (log scale) and the fitted line to the PNG ``path``.

    The left panel shows the excess loss ``L(theta_k) - L(theta_lstsq)`` per epoch, which
    goes to zero as the fit converges; the right one the data with both lines.
    """
    Figure = _figure_class()
    fig = Figure(figsize=REGRESSION_FIGSIZE, dpi=dpi, layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    spec = REGRESSION_OPTIMIZERS[result.optimizer]
    mode = "full batch" if result.batch_size is None else f"batch size {result.batch_size}"
    excess = np.maximum(result.losses - result.lstsq_loss, np.finfo(np.float64).tiny)
    ax.semilogy(np.arange(len(excess)), excess, color="C0")
    ax.set_xlabel("epoch")
    ax.set_ylabel(r"$L(\theta) - L(\theta_{\mathrm{lstsq}})$ (log scale)")
    lr = f"{result.lr:g}" if not result.lr_decay else f"{result.lr:g}/(1 + {result.lr_decay:g}k)"
    ax.set_title(f"{spec.label}, lr={lr}, {mode}: excess loss")
    ax.grid(True, which="both", alpha=0.3)

    order = np.argsort(result.x)
    xs = result.x[order]
    ax2.scatter(result.x, result.y, s=12, color="0.5", label="data")
    ax2.plot(xs, result.lstsq[0] + result.lstsq[1] * xs, "k--", lw=2, label="least squares")
    ax2.plot(xs, result.theta[0] + result.theta[1] * xs, color="C0", label="fastrms fit")
    ax2.plot(xs, 4 + 3 * xs, color="C2", lw=1, label="true: y = 4 + 3x")
    ax2.set_xlabel("x")
    ax2.set_ylabel("y")
    b, s = result.theta
    ax2.set_title(f"after {result.epochs} epochs ({result.steps} steps): y = {b:.3f} + {s:.3f}x")
    ax2.legend(loc="upper left")
    fig.savefig(path, format="png", dpi=dpi)


def _grid(objective: Objective, num: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x0, x1, y0, y1 = objective.bounds
    X, Y = np.meshgrid(np.linspace(x0, x1, num), np.linspace(y0, y1, num))
    return X, Y, objective.value(np.stack([X, Y]))


def _draw_panels(
    fig, result: PathsResult, marker_size: float = 6.0, line_width: float = 1.5, columns: int = 9
):
    """Contours, minima and start points; returns the axes and one empty line per path."""
    axes = fig.subplots(1, len(result.functions), squeeze=False)[0]
    lines = []
    for ax, fp in zip(axes, result.functions, strict=True):
        obj = fp.objective
        X, Y, Z = _grid(obj)
        if obj.log_levels:
            lo = max(float(Z.min()), 1e-3)
            levels = np.logspace(np.log10(lo), np.log10(float(Z.max())), 25)
        else:
            levels = np.linspace(float(Z.min()), float(Z.max()), 25)
        ax.contour(
            X, Y, Z, levels=levels, colors="0.72", linewidths=0.7, negative_linestyles="solid"
        )
        row = []
        for p in fp.paths:
            color, style = PATH_STYLES[p.optimizer]
            (line,) = ax.plot([], [], color=color, ls=style, lw=line_width, label=p.label)
            row.append(line)
        star = {"color": "gold", "mec": "black", "ms": 2.5 * marker_size, "zorder": 5}
        ax.plot(*fp.minimum, "*", label="minimum", **star)
        ax.plot(*obj.start, "o", color="black", ms=marker_size, zorder=5, label="start")
        lines.append(row)
        ax.set_xlim(obj.bounds[0], obj.bounds[1])
        ax.set_ylim(obj.bounds[2], obj.bounds[3])
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_title(obj.title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=columns)
    return axes, lines


def plot_paths(result: PathsResult, path: str, dpi: int = PNG_DPI) -> None:
    """Write a contour plot with every path, one panel per function, to the PNG ``path``."""
    Figure = _figure_class()
    fig = Figure(figsize=PATHS_FIGSIZE, dpi=dpi, layout="constrained")
    _, lines = _draw_panels(fig, result)
    for fp, row in zip(result.functions, lines, strict=True):
        for p, line in zip(fp.paths, row, strict=True):
            line.set_data(p.points[:, 0], p.points[:, 1])
    fig.suptitle(f"Optimizer paths, {result.steps} steps (fastrms)")
    fig.savefig(path, format="png", dpi=dpi)


#: Size and resolution of the animation; kept small so the GIF stays well under 2 MB.
GIF_FIGSIZE = (12.0, 4.4)
GIF_DPI = 72


def frame_steps(steps: int, frames: int) -> np.ndarray:
    """Step shown in each frame: quadratically spaced, so the fast early moves get more frames.

    ``k_i = round(steps * (i / (frames - 1))**2)``, deduplicated, from 0 to ``steps``.
    """
    i = np.linspace(0.0, 1.0, max(frames, 2))
    return np.unique(np.round(steps * i**2).astype(int))


def animate_paths(
    result: PathsResult, path: str, frames: int = 40, fps: int = 10, dpi: int = GIF_DPI
) -> int:
    """Write an animated GIF of the paths (matplotlib's PillowWriter); returns the frame count.

    Frame ``i`` shows every path up to step :func:`frame_steps` ``(steps, frames)[i]``.
    """
    Figure = _figure_class()
    try:
        from matplotlib.animation import FuncAnimation, PillowWriter
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise PlotDependencyError(PLOT_INSTALL_HINT) from None
    fig = Figure(figsize=GIF_FIGSIZE, dpi=dpi, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    axes, lines = _draw_panels(fig, result, marker_size=4.0, line_width=2.0, columns=5)
    title = fig.suptitle(" ")
    # Contours, axes and legend do not change, and redrawing them took most of the time per
    # frame; draw them once, then paint that picture under the moving lines and hide them.
    canvas.draw()
    background = np.asarray(canvas.buffer_rgba()).copy()
    fig.set_layout_engine("none")
    moving = {id(line) for row in lines for line in row}
    for ax in axes:
        for artist in ax.get_children():
            if id(artist) not in moving:
                artist.set_visible(False)
    for legend in fig.legends:
        legend.set_visible(False)
    fig.figimage(background, xo=0, yo=0, origin="upper", zorder=-10)
    ks = frame_steps(result.steps, frames)

    def draw(k: int) -> list:
        for fp, row in zip(result.functions, lines, strict=True):
            for p, line in zip(fp.paths, row, strict=True):
                line.set_data(p.points[: k + 1, 0], p.points[: k + 1, 1])
        title.set_text(f"Optimizer paths (fastrms), step {k} of {result.steps}")
        return [line for row in lines for line in row] + [title]

    anim = FuncAnimation(fig, draw, frames=ks, cache_frame_data=False)
    colors = [PATH_STYLES[p.optimizer][0] for p in result.functions[0].paths]
    anim.save(path, writer=_gif_writer(PillowWriter, fps, colors), dpi=dpi)
    return len(ks)


def _gif_writer(base: type, fps: int, colors: Sequence[str]):
    """A PillowWriter whose frames share one palette, without dithering.

    PillowWriter lets Pillow quantize and dither each frame on its own, so unchanged pixels
    differ from frame to frame and every frame is stored whole (1.5 MB here). With one palette
    and no dithering, each frame stores only what changed (about 0.6 MB). The palette comes from
    the last frame plus a swatch of every path color, so a path hidden under another keeps its
    own color.
    """
    from matplotlib.colors import to_rgb
    from PIL import Image

    class SharedPaletteWriter(base):
        def finish(self) -> None:
            frames = [f.convert("RGB") for f in self._frames]
            last = frames[-1]
            sample = Image.new("RGB", (last.width, last.height + 16), "white")
            sample.paste(last)
            side = max(1, last.width // max(1, len(colors)))
            for i, c in enumerate(colors):
                rgb = tuple(round(255 * v) for v in to_rgb(c))
                sample.paste(rgb, (i * side, last.height, (i + 1) * side, last.height + 16))
            palette = sample.quantize(255, method=Image.Quantize.MEDIANCUT)
            frames = [f.quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
            frames[0].save(
                self.outfile, save_all=True, append_images=frames[1:],
                duration=int(1000 / self.fps), loop=0,
            )  # fmt: skip

    return SharedPaletteWriter(fps=fps)


# -- CLI ----------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``demo regression`` and ``demo paths`` to the ``fastrms`` command."""
    demo = subparsers.add_parser("demo", help="worked examples: regression and optimizer paths")
    sub = demo.add_subparsers(dest="demo", required=True)

    reg = sub.add_parser(
        "regression",
        help="fit y = 4 + 3x + noise with a fastrms optimizer",
        description="Fit y = 4 + 3x + noise (100 samples) by full-batch or mini-batch descent "
        "and compare with scipy.linalg.lstsq.",
    )
    reg.add_argument(
        "--optimizer", choices=list(REGRESSION_OPTIMIZERS), default="rmsprop",
        help="default: rmsprop (alpha=0.9, eps inside the sqrt)",
    )  # fmt: skip
    reg.add_argument("--lr", type=float, help="learning rate (default: per optimizer; rmsprop 0.1)")
    reg.add_argument(
        "--lr-decay", type=float,
        help="epoch k uses lr / (1 + lr_decay*k) (default: 0 full batch, 0.05 mini-batch)",
    )  # fmt: skip
    reg.add_argument(
        "--batch-size", type=_positive_int, help="mini-batch size (default: full batch)"
    )
    reg.add_argument(
        "--tol",
        type=float,
        default=1e-6,
        help="stop when the loss changes by less than TOL in an epoch (default: 1e-6)",
    )
    reg.add_argument(
        "--max-iter", type=_positive_int, default=1000, help="most epochs to run (default: 1000)"
    )
    reg.add_argument(
        "--seed", type=int, default=0, help="seed of the data and the shuffles (default: 0)"
    )
    reg.add_argument("--plot", metavar="PATH", help="write the loss curve and the fit as a PNG")
    reg.set_defaults(func=_regression_command)

    paths = sub.add_parser(
        "paths",
        help="optimizer paths on Beale, Rosenbrock and a wavy bowl",
        description="Run each optimizer from a common start on each test function and tabulate "
        "where it ends.",
    )
    paths.add_argument(
        "--steps", type=_positive_int, default=1000, help="steps per path (default: 1000)"
    )
    paths.add_argument(
        "--functions", nargs="+", choices=list(OBJECTIVES), metavar="NAME",
        help=f"test functions (default: all of {', '.join(OBJECTIVES)})",
    )  # fmt: skip
    paths.add_argument(
        "--optimizers", nargs="+", choices=list(PATH_OPTIMIZERS), metavar="NAME",
        help=f"optimizers (default: all of {', '.join(PATH_OPTIMIZERS)})",
    )  # fmt: skip
    paths.add_argument("--plot", metavar="PATH", help="write a contour plot of the paths (PNG)")
    paths.add_argument("--animate", metavar="PATH.gif", help="write an animated GIF of the paths")
    paths.add_argument(
        "--frames", type=_positive_int, default=40, help="frames of the GIF (default: 40)"
    )
    paths.set_defaults(func=_paths_command)
    return demo


def _plot_error(exc: PlotDependencyError) -> int:
    print(f"fastrms demo: {exc}", file=sys.stderr)
    return 1


def _regression_command(args: argparse.Namespace) -> int:
    try:
        if args.plot:
            check_plotting()
        t0 = time.perf_counter()
        result = fit_regression(
            args.optimizer,
            batch_size=args.batch_size,
            lr=args.lr,
            lr_decay=args.lr_decay,
            tol=args.tol,
            max_iter=args.max_iter,
            seed=args.seed,
        )
        seconds = time.perf_counter() - t0
        print(format_regression(result))
        print(f"time: {seconds:.2f} s (compilation included on a first run)")
        if args.plot:
            plot_regression(result, args.plot)
            print(f"wrote {args.plot}")
    except PlotDependencyError as exc:
        return _plot_error(exc)
    return 0


def _paths_command(args: argparse.Namespace) -> int:
    try:
        if args.plot or args.animate:
            check_plotting()
        result = run_paths(args.functions, args.optimizers, args.steps)
        print(format_paths(result))
        print(f"time: {result.seconds:.2f} s (compilation included on a first run)")
        if args.plot:
            plot_paths(result, args.plot)
            print(f"wrote {args.plot}")
        if args.animate:
            n = animate_paths(result, args.animate, frames=args.frames)
            print(f"wrote {args.animate} ({n} frames)")
    except PlotDependencyError as exc:
        return _plot_error(exc)
    return 0
