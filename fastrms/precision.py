"""The storage model and the precision policy: how each array of a step is held, what dtype
the step computes in, and the one kernel signature that follows.

- A :class:`Storage` says how an array is held (``dtype``) and what its elements are loaded as
  (``compute``); the kernels load each element through it and store the result back
  (:mod:`fastrms.kernels.elementwise`). ``float32`` and ``float64`` hold what they compute
  in, so loading and storing are the identity and the kernels index the arrays directly; a
  storage that holds something else names a ``codec``, a load/store pair registered in
  :mod:`fastrms.kernels.columns`: ``bfloat16`` is held as ``uint16`` patterns, loaded into
  float32 and stored rounded to nearest even (8-bit blockwise comes next).
- A layout's state arrays are :class:`fastrms.specs.Slot` objects (name, initial value,
  shape rule).
- :func:`signature` is the policy: it maps a parameter's dtype, the storage of each state
  slot (today: the parameter's) and the compute dtype (today: the parameter's) to a
  :class:`Signature`, the key that selects a compiled kernel and groups arrays in a grouped
  step. The step's host scalars (learning rate, bias corrections, decay factors) are cast to
  its compute dtype here, and checked to fit in it: Python floats passed to a float32 kernel
  would type as float64 and halve its speed.

This module sits below :mod:`fastrms.functional` and :mod:`fastrms.grouped`, which both cast
through it. Nothing here imports numba.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from . import specs
from .lowprecision import BFLOAT16, uses_8bit
from .specs import LAYOUTS


@dataclass(frozen=True)
class Storage:
    """How an array is held, and the dtype its elements are loaded as and stored from.

    ``codec`` names the kernels' load/store pair (:data:`fastrms.kernels.elementwise.CODECS`);
    None means the identity, for a storage that holds its compute dtype.
    """

    name: str
    dtype: str  # NumPy dtype of the held array
    compute: str  # dtype an element is loaded as
    codec: str | None = None
    #: Extra int64 words the storage takes in a grouped table's row, after the addresses:
    #: a stochastically rounded parameter's key, a Kahan parameter's compensation array, a
    #: blockwise array's scales.
    words: int = 0

    @property
    def identity(self) -> bool:
        return self.codec is None and self.dtype == self.compute

    @property
    def blockwise(self) -> bool:
        """Held as 8-bit codes with one float32 scale per block (``state_dtype="int8"``):
        the kernels of :mod:`fastrms.kernels.blockwise` step it, a block at a time."""
        return self.codec in BLOCKWISE_CODECS

    @property
    def signed(self) -> bool:
        """For a blockwise storage: whether its map is the signed one."""
        return self.codec == "float8_signed"


#: The storages by name. ``bfloat16`` is held as ``uint16`` patterns and goes through the
#: kernels' ``bf16`` codec: loaded exactly into float32, stored rounded to nearest even.
STORAGES = {
    s.name: s
    for s in (
        Storage("float32", "float32", "float32"),
        Storage("float64", "float64", "float64"),
        Storage("bfloat16", "uint16", "float32", codec="bf16"),
        # state_dtype="int8", a parameter's policy: each slot of a tensor of at least
        # MIN_8BIT_SIZE elements is then held as int8_signed or int8_unsigned, by its Slot's
        # sign (slot_storages); a smaller one's state stays float32.
        Storage("int8", "uint8", "float32", codec="float8"),
        Storage("int8_signed", "uint8", "float32", codec="float8_signed", words=1),
        Storage("int8_unsigned", "uint8", "float32", codec="float8_unsigned", words=1),
    )
}

#: The codecs of blockwise 8-bit storages: codes into the signed or unsigned float8 map
#: (:func:`fastrms.lowprecision.float8_map`) and one float32 scale per block of 256.
BLOCKWISE_CODECS = ("float8_signed", "float8_unsigned")

#: The values of the ``state_dtype`` option: how optimizer state is held.
STATE_DTYPES = ("float32", "float64", "bfloat16", "int8")

#: The values of the ``rounding`` option: how a bfloat16 parameter is stored after its update,
#: computed in float32 (the first is the default).
ROUNDINGS = ("stochastic", "nearest", "kahan")

#: The storage of a bfloat16 parameter by ``rounding``: held as ``uint16`` patterns, loaded
#: exactly into float32, and stored rounded stochastically (random bits from a per-array
#: key, the table word after the addresses, and the element's index in its array), to nearest
#: even, or to nearest with a bfloat16 Kahan compensation array (its address the extra word).
PARAM_STORAGES = {
    "stochastic": Storage("bfloat16-stochastic", "uint16", "float32", "bf16_stochastic", 1),
    "nearest": STORAGES["bfloat16"],
    "kahan": Storage("bfloat16-kahan", "uint16", "float32", "bf16_kahan", 1),
}

#: The state name of the Kahan compensation arrays of ``rounding="kahan"``.
KAHAN_COMP = "kahan_comp"


def is_bf16(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is ``ml_dtypes.bfloat16`` (a parameter dtype of its own policy)."""
    return dtype == BFLOAT16


def check_rounding(rounding: str | None, seed: int | None, any_bf16: bool = True) -> None:
    """Refuse an unknown ``rounding`` (``ValueError``) or a ``seed`` that is no int
    (``TypeError``); None means the default (``"stochastic"``, seed 0). Either given where
    no parameter is bfloat16 (``any_bf16`` False) is refused too (``ValueError``)."""
    if rounding is not None and (not isinstance(rounding, str) or rounding not in ROUNDINGS):
        raise ValueError(f"rounding must be one of {ROUNDINGS} or None, got {rounding!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not any_bf16 and (rounding is not None or seed is not None):
        what = "rounding=" if rounding is not None else "seed="
        raise ValueError(f"{what} applies to bfloat16 parameters only, and none is bfloat16")


@dataclass(frozen=True)
class Signature:
    """One kernel signature: a rule, the storage of each of its arrays (param, grad, then
    the layout's slots) and the dtype the rule computes in. Arrays with equal signatures run
    in one grouped kernel call; each signature compiles once per flag combination."""

    rule: str
    storages: tuple[Storage, ...]
    compute: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.rule, self.storages, self.compute)))

    def __hash__(self) -> int:  # computed once: a step looks its kernels up by signature
        return self._hash

    @property
    def columns(self) -> tuple[str, ...]:
        """The held dtype of each array, in the rule's order."""
        return tuple(s.dtype for s in self.storages)

    @property
    def scalars(self) -> int:
        """How many host scalars the rule takes (the width of a grouped step's scalars)."""
        return len(LAYOUTS[self.rule].scalars)

    @property
    def table_width(self) -> int:
        """Columns of a grouped step's table: the element count, then an address per array,
        then the storages' extra words (:attr:`Storage.words`), in the arrays' order."""
        return self.extra_word(len(self.storages))

    def extra_word(self, j: int) -> int:
        """The table column of array ``j``'s first extra word (array ``j``'s address is
        column ``1 + j``): a stochastically rounded parameter's key or a Kahan parameter's
        compensation (``j = 0``), the first blockwise slot's scales (``j = 2``). Every table
        and kernel of a signature places its extra words by this."""
        return 1 + len(self.storages) + sum(s.words for s in self.storages[:j])


def storage_of(dtype: np.dtype) -> Storage:
    """The storage that holds ``dtype`` as it is (float32 or float64)."""
    storage = STORAGES.get(np.dtype(dtype).name)
    if storage is None or not storage.identity:
        raise TypeError(f"parameters must have dtype float32 or float64, got {np.dtype(dtype)}")
    return storage


def check_state_dtype(state_dtype: str | None) -> None:
    """Refuse (``ValueError``) a ``state_dtype`` that is none of :data:`STATE_DTYPES` (or None)."""
    if state_dtype is not None and (
        not isinstance(state_dtype, str) or state_dtype not in STATE_DTYPES
    ):
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES} or None, got {state_dtype!r}")


def state_storage(state_dtype: str | None, param: np.dtype, name: str = "params") -> Storage:
    """The storage of the state of a parameter of dtype ``param`` under option ``state_dtype``.

    None (the default) holds the state as the parameter is held. ``"bfloat16"`` holds it as
    bfloat16 patterns, loaded into float32 and stored rounded to nearest even, so it needs
    float32 (or bfloat16) parameters; so does ``"int8"`` (blockwise 8-bit, see
    :func:`slot_storages`); ``"float32"``/``"float64"`` must be the parameter's own dtype (no
    codec converts between them), but a bfloat16 parameter, computed in float32, holds float32
    state by default. Raises ``ValueError`` naming ``state_dtype`` and ``name`` otherwise.
    """
    check_state_dtype(state_dtype)
    if is_bf16(np.dtype(param)):  # computed in float32: float32 state unless asked otherwise
        if state_dtype == "float64":
            raise ValueError(
                f"state_dtype='float64' needs float64 parameters, but {name} has dtype bfloat16"
            )
        return STORAGES[state_dtype or "float32"]
    held = storage_of(param)
    if state_dtype is None or state_dtype == held.name:
        return held
    storage = STORAGES[state_dtype]
    if storage.compute != held.compute:
        raise ValueError(
            f"state_dtype={state_dtype!r} needs {storage.compute} parameters, but {name} has "
            f"dtype {held.name}"
        )
    return storage


def slot_storages(rule: str, storage: Storage, size: int) -> tuple[Storage, ...] | None:
    """The storage of each state slot of ``rule`` for a parameter of ``size`` elements whose
    state is held as ``storage`` (from :func:`state_storage`); None: as the parameter is.

    ``"int8"`` holds each slot blockwise, by the sign its :class:`fastrms.specs.Slot`
    declares (``int8_signed`` for first moments, ``int8_unsigned`` for second moments), if the
    tensor has at least :data:`fastrms.lowprecision.MIN_8BIT_SIZE` elements; a smaller one
    keeps its state as the parameter is held (float32), as bitsandbytes does.
    """
    if storage.codec is None:
        return None
    if storage.name != "int8":
        return (storage,) * len(LAYOUTS[rule].slots)
    if not uses_8bit(size):
        return None
    return tuple(
        STORAGES["int8_signed" if slot.sign == "signed" else "int8_unsigned"]
        for slot in LAYOUTS[rule].slot_specs
    )


def state_dtype_of(storage: Storage) -> np.dtype:
    """The NumPy dtype a state array of ``storage`` is made with (``ml_dtypes.bfloat16`` for
    bfloat16: its ``nbytes`` is the state's memory, and it views as the held ``uint16``)."""
    return BFLOAT16 if storage.name == "bfloat16" else np.dtype(storage.dtype)


@functools.lru_cache(maxsize=256)
def signature(
    rule: str,
    param: np.dtype,
    slots: tuple[Storage, ...] | None = None,
    compute: np.dtype | None = None,
    rounding: str | None = None,
) -> Signature:
    """The policy: the kernel signature of ``rule`` for parameters of dtype ``param``.

    bfloat16 parameters (``ml_dtypes.bfloat16``) compute in float32, take bfloat16 gradients,
    hold float32 state by default, and are stored back as ``rounding`` says
    (:data:`PARAM_STORAGES`; default ``"stochastic"``).

    ``slots`` gives a storage per state slot of the layout, ``compute`` the dtype the rule
    computes in. By default each slot, and the gradient, is held as the parameter is, and the
    rule computes in the parameter's dtype. An array is loaded into the compute dtype by its
    storage's codec; a storage without one must hold the compute dtype itself (a float64 state
    beside float32 parameters is refused until a codec converts it).
    """
    layout = LAYOUTS[rule]
    if is_bf16(np.dtype(param)):
        held = PARAM_STORAGES[rounding or ROUNDINGS[0]]
        grad = STORAGES["bfloat16"]
        slots = (STORAGES["float32"],) * len(layout.slots) if slots is None else tuple(slots)
    else:
        if rounding is not None:
            raise ValueError(f"rounding= applies to bfloat16 parameters only, not {param}")
        held = grad = storage_of(param)
        slots = (held,) * len(layout.slots) if slots is None else tuple(slots)
    if len(slots) != len(layout.slots):
        raise ValueError(f"{rule} has {len(layout.slots)} state slots, got {len(slots)} storages")
    compute = held.compute if compute is None else np.dtype(compute).name
    storages = (held, grad, *slots)
    for name, storage in zip(layout.arrays, storages):
        if (storage.codec is None and storage.dtype != compute) or storage.compute != compute:
            raise ValueError(
                f"{name} held as {storage.name} cannot be computed in {compute}: "
                "no codec converts it"
            )
    return Signature(rule, storages, compute)


class _PerLayout(Mapping):
    """A read-only view of one property of every layout, by rule name, read from
    :data:`fastrms.specs.LAYOUTS` when asked (a layout registered later is seen too)."""

    def __init__(self, get: Callable) -> None:
        self._get = get

    def __getitem__(self, rule: str):
        return self._get(LAYOUTS[rule])

    def __iter__(self) -> Iterator[str]:
        return iter(LAYOUTS)

    def __len__(self) -> int:
        return len(LAYOUTS)


#: The state arrays of each rule, in the order the kernels take them (after param and grad).
SLOTS = _PerLayout(lambda layout: layout.slots)
#: What each rule's host scalars are, in the order the kernels take them.
SCALARS = _PerLayout(lambda layout: tuple(layout.scalars.values()))
#: The most scalars a rule takes (derived from the layouts; each grouped kernel takes its own
#: rule's count, :attr:`Signature.scalars`).
HYPER_WIDTH = specs.MAX_SCALARS


def _check_fits(rule: str, scalars: tuple, dtype: np.dtype) -> None:
    if dtype.type is np.float32:
        specs.check_fits_float32(LAYOUTS[rule], scalars)


@functools.lru_cache(maxsize=256)
def cast(rule: str, scalars: tuple, dtype: np.dtype) -> tuple:
    """The scalars as NumPy scalars of the compute dtype, checked to fit in it (cached: a
    training loop reuses them; a refusal raises and so is not cached)."""
    _check_fits(rule, scalars, dtype)
    return tuple(np.array(scalars, dtype))


@functools.lru_cache(maxsize=256)
def cast_array(rule: str, scalars: tuple, dtype: np.dtype) -> np.ndarray:
    """The scalars as one read-only array of the compute dtype, as a grouped kernel takes
    them, checked to fit in it (cached as :func:`cast` is)."""
    _check_fits(rule, scalars, dtype)
    out = np.array(scalars, dtype)
    out.flags.writeable = False  # shared by the cache
    return out
