"""Checks of scalar hyperparameters: each raises ``TypeError``/``ValueError`` naming it."""

from __future__ import annotations

import math
from numbers import Integral, Real


def real(
    name: str, x, lo: float = -math.inf, hi: float = math.inf, *, open_lo=False, open_hi=False
):
    """Return ``float(x)``, checking that it is a finite real in the given range."""
    if type(x) is not float:  # the common case skips the (slow) abstract-class check
        if isinstance(x, bool) or not isinstance(x, Real):
            raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
        x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    below = x <= lo if open_lo else x < lo
    above = x >= hi if open_hi else x > hi
    if below or above:
        lb = "(" if open_lo else "["
        rb = ")" if open_hi else "]"
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {x}")
    return x


def nonneg(name: str, x) -> float:
    return real(name, x, 0.0)


def positive(name: str, x) -> float:
    return real(name, x, 0.0, open_lo=True)


def unit(name: str, x) -> float:
    """A decay rate in [0, 1)."""
    return real(name, x, 0.0, 1.0, open_hi=True)


def flag(name: str, x) -> bool:
    if not isinstance(x, (bool, int)) or x not in (0, 1):
        raise TypeError(f"{name} must be a bool, got {x!r}")
    return bool(x)


def step(name: str, t) -> int:
    if isinstance(t, bool) or not isinstance(t, Integral) or t < 1:
        raise ValueError(f"{name} must be an int >= 1 (the step being taken), got {t!r}")
    return int(t)


def betas(name: str, b) -> tuple[float, float]:
    if not isinstance(b, (tuple, list)) or len(b) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {b!r}")
    return unit(f"{name}[0]", b[0]), unit(f"{name}[1]", b[1])
