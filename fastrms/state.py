"""The state store: each parameter's state arrays, made, checked, saved and loaded per a spec.

A :class:`StateStore` holds the state of one optimizer over a list of parameters (a
:class:`fastrms.tree.Tree`'s leaves) as ``{state name: [array or None per parameter]}``. It
makes an array when a step first needs it (on the parameter's side, host or device, at the
initial value :attr:`fastrms.specs.Spec.initial` names), can drop what a refused step made,
and turns the state into state-dict entries and back, checking what it loads. The NumPy
classes (:mod:`fastrms.optim`) keep theirs in one, and so, through them, does each rank of
the sharded optimizer (:mod:`fastrms.distributed`) for its shard's pieces. fastrms.torch keeps
torch tensors in ``opt.state[p]`` (torch's API) and shares :func:`initial_option`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from . import dispatch, lowprecision, specs
from .arrays import DEVICE, describe, is_bf16_array
from .blockwise_groups import check_pair
from .precision import KAHAN_COMP, STORAGES, is_bf16, state_dtype_of
from .tree import Tree


def initial_option(spec: specs.Spec, slot: str) -> str | None:
    """The option whose value state array ``slot`` starts at (``None``: it starts at zero)."""
    return spec.initial.get(slot)


def is_step_count(x: Any) -> bool:
    """Whether ``x`` is a valid step count: an int (not a bool) >= 0."""
    if type(x) is int:
        return x >= 0
    return not isinstance(x, bool) and isinstance(x, (int, np.integer)) and x >= 0


class StateStore:
    """The state arrays of one optimizer (``spec``) over the leaves of ``tree``.

    Attributes
    ----------
    arrays : dict of str -> list
        ``{state name: [array or None for each parameter]}``: the optimizer's ``state``.
    """

    __slots__ = ("spec", "tree", "params", "arrays", "storages", "sizes", "_created")

    def __init__(self, spec: specs.Spec, tree: Tree, storages: list | None = None) -> None:
        self.spec, self.tree, self.params = spec, tree, tree.arrays
        #: How each parameter's state is held (a :class:`fastrms.precision.Storage`; None:
        #: as the parameter is).
        self.storages = storages or [None] * len(self.params)
        #: Each parameter's whole tensor's size where the parameters are pieces of tensors
        #: (the sharded optimizer's; None: their own): it decides 8-bit state.
        self.sizes: list[int] | None = None
        self.arrays: dict[str, list] = {}
        self._created: list[tuple[str, int]] = []  # made for a step not yet taken

    def initial_value(self, name: str, hyper: Mapping[str, Any]) -> float:
        """The value state array ``name`` starts at, under hyperparameters ``hyper``."""
        option = initial_option(self.spec, name)
        return 0.0 if option is None else float(hyper[option])

    def get(self, name: str, i: int, hyper: Mapping[str, Any]):
        """State array ``name`` of parameter ``i``, made now if it is not there yet."""
        arrays = self.arrays.setdefault(name, [None] * len(self.params))
        if name == KAHAN_COMP:  # not a slot of the rule: a bfloat16 parameter's compensation
            if arrays[i] is None and is_bf16_array(self.params[i]):
                slots = len(self.spec.layout.slots)
                arrays[i] = _full_like(self.params[i], 0.0, slots + 1, STORAGES["bfloat16"])
            return arrays[i]
        if arrays[i] is None:
            slot = self.spec.layout.slots.index(name) + 1
            value = self.initial_value(name, hyper)
            storage = self.storages[i]
            if storage is not None and storage.name == "int8":
                whole = None if self.sizes is None else self.sizes[i]
                arrays[i] = _int8_full_like(self.params[i], value, self._signed(name), whole, slot)
            else:
                arrays[i] = _full_like(self.params[i], value, slot, storage)
        return arrays[i]

    def _signed(self, name: str) -> bool:
        """Whether state ``name`` is held in the signed 8-bit map (its Slot's sign)."""
        return self.spec.layout.slot_specs[self.spec.layout.slots.index(name)].sign == "signed"

    # -- the state of a step ---------------------------------------------------------------------

    def prepare(self, names: tuple[str, ...], hyper: Mapping[str, Any]) -> dict[str, list]:
        """The state arrays ``names`` of every parameter, made where missing (remembered, for
        :meth:`forget`, until :meth:`keep`). Raises ``ValueError`` if a list was replaced by
        something that is not one array (or None) per parameter."""
        n = len(self.params)
        for name in names:
            arrays = self.arrays.get(name, [])
            if name in self.arrays and (type(arrays) is not list or len(arrays) != n):
                what = f"{len(arrays)} items" if isinstance(arrays, list) else repr(arrays)[:40]
                raise ValueError(
                    f"state[{name!r}] must be a list of one array per parameter ({n}), got {what}"
                )
        for name in names:
            for i in range(n):
                if self.arrays.get(name, [None] * n)[i] is None:
                    self._created.append((name, i))
                self.get(name, i, hyper)
        return {s: self.arrays[s] for s in names}

    def keep(self) -> None:
        """The step that the state was made for is taken: keep it."""
        self._created = []

    def forget(self) -> bool:
        """Drop the state made since :meth:`keep` (a refused step leaves no trace); return
        whether there was any."""
        if not self._created:
            return False
        for name, i in self._created:
            self.arrays[name][i] = None
            if not any(a is not None for a in self.arrays[name]):
                del self.arrays[name]
        self._created = []
        return True

    # -- state dicts -----------------------------------------------------------------------------

    def entries(
        self, names: tuple[str, ...], hyper: Mapping[str, Any], dequantize: bool = False
    ) -> dict[str, Any]:
        """``{state-dict key: host copy}`` of every state array, the arrays ``names`` made
        first where missing (so that the dict loads back as it is).

        State held in 8 bits (:class:`fastrms.lowprecision.Quantized`) gives two entries,
        ``key + ":codes"`` and ``key + ":scales"``, or with ``dequantize`` one float32 array
        under ``key``, as float32 state would."""
        for name in names:
            for i in range(len(self.params)):
                self.get(name, i, hyper)
        out = {}
        for name, arrays in self.arrays.items():
            for i, a in enumerate(arrays):
                key = self.tree.state_key(name, i)
                if a is None:
                    continue
                if isinstance(a, lowprecision.Quantized):
                    host = lowprecision.Quantized(_host_copy(a.codes), _host_copy(a.scales))
                    if dequantize:
                        out[key] = host.dequantize(self._signed(name))
                    else:
                        out[key + CODES], out[key + SCALES] = host
                else:
                    out[key] = _host_copy(a)
        return out

    def take_entries(self, sd: dict[str, Any], used: tuple[str, ...]) -> dict[tuple, np.ndarray]:
        """Pop the state entries from state dict ``sd``: ``{(name, i): array}``, each checked
        against its parameter's shape and dtype. Every state array ``used`` must be there; the
        others of the rule (kept from options switched off since) may be."""
        arrays = {}
        extra = (KAHAN_COMP,) if KAHAN_COMP in used else ()
        for s in self.spec.layout.slots + extra:
            for i, p in enumerate(self.params):
                key = self.tree.state_key(s, i)
                if s == KAHAN_COMP and not is_bf16_array(p):
                    continue
                if key not in sd and key + CODES in sd:
                    pair = (np.asarray(sd.pop(key + CODES)), np.asarray(sd.pop(key + SCALES, None)))
                    shape = describe(p, "param").shape
                    arrays[s, i] = check_pair(
                        pair, shape, f"state_dict[{key!r}]", "int8 state", written=False
                    )
                    continue
                if key not in sd:
                    if s not in used:
                        continue
                    raise ValueError(f"state_dict lacks {key!r} (for these params and options)")
                arrays[s, i] = checked_entry(key, sd.pop(key), p, convertible=True)
        return arrays

    def nbytes(self) -> int:
        """Bytes of the state arrays held."""
        return sum(a.nbytes for arrays in self.arrays.values() for a in arrays if a is not None)

    def load(self, arrays: dict[tuple, np.ndarray], hyper: Mapping[str, Any]) -> None:
        """Replace the state with ``arrays`` (from :meth:`take_entries`), copied in: converted
        to the dtype the state is held in (float -> bfloat16 rounds to nearest even,
        bfloat16 -> float widens exactly)."""
        self.arrays = {}
        self._created = []
        for (s, i), a in arrays.items():
            dst = self.get(s, i, hyper)
            if isinstance(dst, lowprecision.Quantized):  # int8 state: copied, or quantized
                signed = self._signed(s)
                src = (
                    a
                    if isinstance(a, tuple)
                    else lowprecision.Quantized.of(convert(a, np.float32), signed)
                )
                if isinstance(dst.codes, np.ndarray):
                    dst.codes[...] = src.codes
                    dst.scales[...] = src.scales
                else:  # on a CUDA device
                    for d, h in zip(dst, src):
                        _backend_of(d).copy_from_host(d, np.asarray(h, describe(d, s).dtype))
                continue
            if isinstance(a, tuple):  # int8 state into float state: dequantized
                a = lowprecision.Quantized(*a).dequantize(self._signed(s))
            _copy_in(dst, a)


#: The suffixes of the two state-dict entries of one state array held in 8 bits.
CODES, SCALES = ":codes", ":scales"


def _int8_full_like(p, value: float, signed: bool, whole: int | None = None, slot: int = 1):
    """The state of a float32 parameter ``p`` under ``state_dtype="int8"``, at ``value``:
    a :class:`fastrms.lowprecision.Quantized` pair if ``p`` (or the whole tensor of ``whole``
    elements that ``p`` is a piece of) has at least ``MIN_8BIT_SIZE`` elements, else a
    float32 array (as bitsandbytes keeps small tensors' state); on ``p``'s side (a CUDA
    parameter's: both arrays of the pair on its device, quantized on the host)."""
    info = describe(p, "param")
    size = int(np.prod(info.shape, dtype=np.int64))
    if not lowprecision.uses_8bit(size if whole is None else whole):
        if info.kind == DEVICE:
            return _full_like(p, value, slot, STORAGES["float32"])
        return np.full(info.shape, value, np.float32)
    pair = lowprecision.Quantized.of(np.full(info.shape, value, np.float32), signed)
    if info.kind != DEVICE:
        return pair
    backend = _backend_of(p)
    codes = backend.zeros_like(p, slot, np.dtype(np.uint8))
    # zeros_like places an array like its argument: a slice of p's flat view for the scales
    scales = backend.zeros_like(backend.view(p)[: pair.scales.size], slot, np.dtype(np.float32))
    backend.copy_from_host(codes, pair.codes)
    backend.copy_from_host(scales, pair.scales)
    return lowprecision.Quantized(codes, scales)


def checked_entry(key: str, value: Any, param: Any, convertible: bool = False) -> np.ndarray:
    """State-dict entry ``key`` as an array, refused (``ValueError``) unless it has the shape
    and dtype of its parameter ``param``. With ``convertible``, a bfloat16 entry is accepted
    too (for state held as bfloat16, or to be widened), and so is a float32 entry beside
    float32 parameters; :func:`convert` then makes it the held dtype.

    A bfloat16 array saved by ``np.savez`` loads back as 2-byte void (``|V2``): such an entry
    is read as the bfloat16 patterns it holds.
    """
    a = np.asarray(value)
    info = describe(param, "param")
    dtype = lowprecision.BFLOAT16 if is_bf16_array(param) else info.dtype  # CUDA: uint16 too
    if convertible and a.dtype.kind == "V" and a.dtype.itemsize == 2 and a.dtype.names is None:
        a = a.view(lowprecision.BFLOAT16)
    allowed = (dtype, lowprecision.BFLOAT16) if convertible else (dtype,)
    if convertible and is_bf16(dtype):  # a bfloat16 parameter's state is float32
        allowed += (np.dtype(np.float32),)
    if a.shape != info.shape or a.dtype not in allowed:
        also = " (or bfloat16)" if convertible else ""
        raise ValueError(
            f"state_dict[{key!r}] has shape {a.shape} and dtype {a.dtype}, but the "
            f"parameter has shape {info.shape} and dtype {dtype}{also}"
        )
    return a


def convert(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """State ``a`` as ``dtype``: float -> bfloat16 rounds to nearest even
    (:func:`fastrms.lowprecision.round_nearest`), bfloat16 -> float widens exactly."""
    if a.dtype == dtype:
        return a
    if dtype == lowprecision.BFLOAT16:
        return lowprecision.round_nearest(a.astype(np.float32)).view(dtype)
    if a.dtype == lowprecision.BFLOAT16:
        return lowprecision.bf16_to_float32(a).astype(dtype)
    raise ValueError(f"cannot convert state of dtype {a.dtype} to {dtype}")


def plain(x: Any) -> Any:
    """A value from np.load (0-d or small arrays) back to plain Python."""
    if isinstance(x, np.ndarray):
        return x.item() if x.ndim == 0 else tuple(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x


def _backend_of(a):
    return dispatch.get("cuda" if describe(a, "array").kind == DEVICE else "numpy")


#: The dtype of a CUDA array of bfloat16 patterns (CUDA's array interface has no bfloat16).
_PATTERNS = np.dtype(np.uint16)


def _held_dtype(a) -> np.dtype:
    """The dtype state array ``a`` holds: bfloat16 for a CUDA array of its ``uint16``
    patterns (only bfloat16 state and Kahan compensations are held so)."""
    info = describe(a, "state")
    return lowprecision.BFLOAT16 if info.kind == DEVICE and info.dtype == _PATTERNS else info.dtype


def _host_copy(a) -> np.ndarray:
    """A host copy of state array ``a``: bfloat16 patterns from a CUDA device as bfloat16,
    as the same state on the host is held."""
    host = _backend_of(a).to_host(a)
    return host.view(lowprecision.BFLOAT16) if _held_dtype(a) != host.dtype else host


def _copy_in(dst, src: np.ndarray) -> None:
    """Copy host array ``src`` into state array ``dst`` (host or device), converted to the
    dtype ``dst`` holds (:func:`convert`)."""
    held = convert(src, _held_dtype(dst))
    _backend_of(dst).copy_from_host(dst, held.view(describe(dst, "state").dtype))


def _full_like(p, value: float, slot: int, storage=None):
    """A state array like ``p`` on ``p``'s side (host or device), filled with ``value``, held
    as ``storage`` says (None: in ``p``'s dtype; bfloat16: ``value`` rounded to nearest, on
    a CUDA device as ``uint16`` patterns)."""
    backend = _backend_of(p)
    dtype = None if storage is None else state_dtype_of(storage)
    if dtype == lowprecision.BFLOAT16 and backend.kind == DEVICE:
        dtype = _PATTERNS
    a = backend.zeros_like(p, slot, dtype)
    if value:
        info = describe(p, "param")
        wide = np.float32 if is_bf16_array(p) else info.dtype  # a bfloat16 param's: float32
        _copy_in(a, np.full(info.shape, value, wide))
    return a
