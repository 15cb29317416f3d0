"""How a :class:`fastrms.grouped.StepPlan` holds each parameter's arrays under the precision
options: the storage of each state slot (:func:`fastrms.precision.slot_storages`) and what the
array checks (:func:`fastrms.arrays.check_arrays`) must accept for the state arrays, for a
float parameter (:func:`state_storages`) and a bfloat16 one (:func:`bf16_storages`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .arrays import LOW_PRECISION_DTYPES, Held, check_updatable, describe
from .lowprecision import BFLOAT16
from .precision import KAHAN_COMP, SLOTS, STORAGES, slot_storages, state_storage
from .specs import Setup


class HeldCodes(NamedTuple):
    """What the codes of int8 state must be (a :class:`Held`), and the parameter's shape."""

    names: frozenset
    dtypes: tuple
    option: str
    shape: tuple


def state_storages(
    setup: Setup, p: Any, name: str, labels: tuple, state_dtype: str | None, whole=None
) -> tuple[tuple | None, Held | None]:
    """The storage of each state slot of parameter ``p`` (None: as ``p`` is held) and
    what :func:`check_arrays` must accept for its state arrays (``labels``); ``whole``:
    the element count of the tensor ``p`` is a piece of (None: ``p``'s own)."""
    if state_dtype is None:
        return None, None
    info = describe(p, name)
    check_updatable(info, name)
    storage = state_storage(state_dtype, info.dtype, name)
    size = int(np.prod(info.shape, dtype=np.int64)) if whole is None else whole
    slots = slot_storages(setup.rule, storage, size)
    if slots is None:
        return None, None
    option = f"state_dtype={state_dtype!r}"
    if slots[0].blockwise:  # the codes: uint8, shaped as p (split_state checks the pairs)
        return slots, HeldCodes(frozenset(labels), (np.dtype(np.uint8),), option, info.shape)
    return slots, Held(frozenset(labels), LOW_PRECISION_DTYPES, option)


def bf16_storages(
    setup: Setup,
    p: Any,
    name: str,
    labels: tuple,
    state_dtype: str | None,
    comp: Any,
    whole: int | None = None,
) -> tuple[tuple, tuple]:
    """As :func:`state_storages`, for a bfloat16 parameter: its state's storages, and
    what :func:`check_arrays` accepts for its state (``state_dtype="int8"``: the codes of
    a parameter of at least 4096 elements, float32 arrays for a smaller one; ``whole``,
    where given, is the size of the tensor ``p`` is a piece of, which decides) and Kahan
    compensation."""
    info = describe(p, name)
    check_updatable(info, name, allow_bf16=True, device_bf16=True)
    storage = state_storage(state_dtype, BFLOAT16, name)
    size = int(np.prod(info.shape, dtype=np.int64)) if whole is None else whole
    slots = slot_storages(setup.rule, storage, size)
    if slots is None:  # as a bfloat16 parameter's state is held by default: float32
        slots = (STORAGES["float32"],) * len(SLOTS[setup.rule])
    option = f"state_dtype={state_dtype!r}" if state_dtype else "bfloat16 parameters"
    if slots[0].blockwise:
        dtypes = (np.dtype(np.uint8),)
    else:
        dtypes = LOW_PRECISION_DTYPES if slots[0].codec else (np.dtype(slots[0].dtype),)
    held = [Held(frozenset(labels), dtypes, option)]
    if comp is not None:
        label = f"{KAHAN_COMP} of {name}"
        held.append(Held(frozenset([label]), LOW_PRECISION_DTYPES, "rounding='kahan'"))
    return slots, tuple(held)
