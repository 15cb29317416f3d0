"""The precision policy: the arrays' dtype decides the dtype of a step's scalars.

A step runs in the dtype of its arrays, so its host scalars (learning rate, bias corrections,
decay factors) are cast to that dtype before a kernel sees them: Python floats passed to a
float32 kernel would type as float64 and halve its speed. Casting checks that the scalars fit
(:func:`fastrms.specs.check_fits_float32`). This module sits below :mod:`fastrms.functional`
and :mod:`fastrms.grouped`, which both cast through it.
"""

from __future__ import annotations

import functools

import numpy as np

from . import specs
from .specs import LAYOUTS

#: The state arrays of each rule, in the order the kernels take them (after param and grad).
SLOTS = {name: layout.slots for name, layout in LAYOUTS.items()}
#: What each rule's host scalars are, in the order the kernels take them.
SCALARS = {name: tuple(layout.scalars.values()) for name, layout in LAYOUTS.items()}
#: Scalars of the grouped CPU kernels, padded to this many (kernels.cpu.HYPER_WIDTH).
HYPER_WIDTH = specs.MAX_SCALARS


def _check_fits(rule: str, scalars: tuple, dtype: np.dtype) -> None:
    if dtype.type is np.float32:
        specs.check_fits_float32(LAYOUTS[rule], scalars)


@functools.lru_cache(maxsize=256)
def cast(rule: str, scalars: tuple, dtype: np.dtype) -> tuple:
    """The scalars as NumPy scalars of the arrays' dtype, checked to fit in it (cached: a
    training loop reuses them; a refusal raises and so is not cached)."""
    _check_fits(rule, scalars, dtype)
    return tuple(np.array(scalars, dtype))


@functools.lru_cache(maxsize=256)
def cast_array(rule: str, scalars: tuple, dtype: np.dtype) -> np.ndarray:
    """The scalars as one read-only array of the arrays' dtype, padded to
    :data:`HYPER_WIDTH`, checked to fit in it (cached as :func:`cast` is)."""
    _check_fits(rule, scalars, dtype)
    out = np.array(scalars + (0.0,) * (HYPER_WIDTH - len(scalars)), dtype)
    out.flags.writeable = False  # shared by the cache
    return out
