"""Two-dimensional test functions for the optimizer-path demo (:mod:`fastrms.tools.demo.paths`).

Each :class:`Objective` has a value, a gradient written into a preallocated array (the
optimizers take a separate gradient array and update the point in place), a starting point
shared by every optimizer, and its minimum near that start.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

ArrayOrFloat = np.ndarray | float  # a value at one point, or at a grid of points


@dataclass(frozen=True)
class Objective:
    """A function of a 2-element point, for the path demo.

    Attributes
    ----------
    name : str
        Short name, as the CLI spells it.
    title : str
        Plot title.
    value : callable
        ``value(p)``: the value at ``p``, of shape ``(2, ...)`` (a point or a grid of points).
    gradient : callable
        ``gradient(p, out)`` writes the gradient at the point ``p`` into ``out`` (2 elements).
    start : tuple of float
        The common starting point.
    bounds : tuple of float
        ``(xmin, xmax, ymin, ymax)`` of the contour plot.
    known_minimum : tuple of float or None
        The minimum in closed form; ``None`` if :func:`scipy.optimize.minimize` finds it.
    log_levels : bool
        Contour levels spaced logarithmically (for functions with a large range).
    """

    name: str
    title: str
    value: Callable[[np.ndarray], ArrayOrFloat]
    gradient: Callable[[np.ndarray, np.ndarray], None]
    start: tuple[float, float]
    bounds: tuple[float, float, float, float]
    known_minimum: tuple[float, float] | None = None
    log_levels: bool = False
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def minimum(self) -> np.ndarray:
        """The minimum near :attr:`start`: the known one, else found by scipy (then cached).

        scipy's BFGS runs from :attr:`start` with the analytic gradient and ``gtol=1e-10``.
        """
        if self.known_minimum is not None:
            return np.array(self.known_minimum)
        if "minimum" not in self._cache:

            def jac(p: np.ndarray) -> np.ndarray:
                out = np.empty(2)
                self.gradient(p, out)
                return out

            res = optimize.minimize(
                self.value, np.array(self.start), jac=jac, method="BFGS", options={"gtol": 1e-10}
            )
            if not res.success:  # pragma: no cover - the start points below are fixed
                raise RuntimeError(f"scipy could not minimize {self.name}: {res.message}")
            self._cache["minimum"] = res.x
        return self._cache["minimum"].copy()


# -- Beale ----------------------------------------------------------------------------------


def beale(p: np.ndarray) -> ArrayOrFloat:
    """Beale's function, minimum 0 at (3, 0.5).

    ``f(x, y) = (1.5 - x + x*y)**2 + (2.25 - x + x*y**2)**2 + (2.625 - x + x*y**3)**2``
    """
    x, y = p[0], p[1]
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def beale_gradient(p: np.ndarray, out: np.ndarray) -> None:
    """Write the gradient of :func:`beale` at ``p`` into ``out``.

    With ``a = 1.5 - x + x*y``, ``b = 2.25 - x + x*y**2``, ``c = 2.625 - x + x*y**3``::

        df/dx = 2*a*(y - 1) + 2*b*(y**2 - 1) + 2*c*(y**3 - 1)
        df/dy = 2*a*x + 4*b*x*y + 6*c*x*y**2
    """
    x, y = float(p[0]), float(p[1])
    a = 1.5 - x + x * y
    b = 2.25 - x + x * y**2
    c = 2.625 - x + x * y**3
    out[0] = 2 * a * (y - 1) + 2 * b * (y**2 - 1) + 2 * c * (y**3 - 1)
    out[1] = 2 * a * x + 4 * b * x * y + 6 * c * x * y**2


# -- Rosenbrock -----------------------------------------------------------------------------


def rosenbrock(p: np.ndarray) -> ArrayOrFloat:
    """Rosenbrock's function (:func:`scipy.optimize.rosen`), minimum 0 at (1, 1).

    ``f(x, y) = 100*(y - x**2)**2 + (1 - x)**2``
    """
    return optimize.rosen(p)


def rosenbrock_gradient(p: np.ndarray, out: np.ndarray) -> None:
    """Write the gradient of :func:`rosenbrock` (:func:`scipy.optimize.rosen_der`) into ``out``."""
    out[:] = optimize.rosen_der(p)


# -- a wavy bowl --------------------------------------------------------------------------


def wavy(p: np.ndarray) -> ArrayOrFloat:
    """A bowl with ripples: two minima, on ``y = 0`` at ``x ~ -1.306`` and ``x ~ 3.837``.

    ``f(x, y) = 0.1*x**2 + 2*y**2 + sin(x)*cos(y)``
    """
    x, y = p[0], p[1]
    return 0.1 * x * x + 2 * y * y + np.sin(x) * np.cos(y)


def wavy_gradient(p: np.ndarray, out: np.ndarray) -> None:
    """Write the gradient of :func:`wavy` into ``out``.

    ``df/dx = 0.2*x + cos(x)*cos(y)``,  ``df/dy = 4*y - sin(x)*sin(y)``
    """
    x, y = float(p[0]), float(p[1])
    out[0] = 0.2 * x + math.cos(x) * math.cos(y)
    out[1] = 4 * y - math.sin(x) * math.sin(y)


BEALE = Objective(
    name="beale",
    title="Beale",
    value=beale,
    gradient=beale_gradient,
    start=(1.0, 1.4),
    bounds=(-0.5, 4.5, -1.5, 2.0),
    known_minimum=(3.0, 0.5),
    log_levels=True,
)
ROSENBROCK = Objective(
    name="rosenbrock",
    title="Rosenbrock",
    value=rosenbrock,
    gradient=rosenbrock_gradient,
    start=(-1.2, 1.0),
    bounds=(-1.6, 1.6, -0.5, 2.0),
    known_minimum=(1.0, 1.0),
    log_levels=True,
)
WAVY = Objective(
    name="wavy",
    title=r"$0.1x^2 + 2y^2 + \sin x \cos y$",
    value=wavy,
    gradient=wavy_gradient,
    start=(3.0, 1.5),
    bounds=(-3.0, 6.0, -1.5, 2.0),
)

#: The test functions by name, in the order the demo shows them.
OBJECTIVES: dict[str, Objective] = {f.name: f for f in (BEALE, ROSENBROCK, WAVY)}
