"""What fastrms needs to know about an array, whichever library made it.

Host arrays are NumPy arrays. Device arrays are anything exposing
``__cuda_array_interface__`` (Numba device arrays, CuPy, PyTorch CUDA tensors), or the CUDA
simulator's arrays, which expose ``__cuda_ndarray__`` instead.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

# np.may_share_memory without the __array_function__ dispatch: 40% of its cost per call.
_may_share_memory = getattr(np.may_share_memory, "_implementation", np.may_share_memory)

HOST = "host"
DEVICE = "cuda"
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


#: The dtypes a bfloat16 array may come as: ``ml_dtypes.bfloat16``, or its ``uint16`` patterns.
LOW_PRECISION_DTYPES = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.uint16))


class Held(NamedTuple):
    """Arrays of an update held in another dtype than the parameter's (see
    :func:`check_arrays`): their ``names``, the ``dtypes`` each may have, and the ``option``
    that asked for them, as errors name it (``"state_dtype='bfloat16'"``)."""

    names: frozenset
    dtypes: tuple
    option: str


class ArrayInfo(NamedTuple):
    kind: str  # HOST or DEVICE
    shape: tuple
    dtype: np.dtype
    c_contiguous: bool
    writeable: bool
    device: int | None  # CUDA device ordinal where known


def is_device_array(a: Any) -> bool:
    return hasattr(a, "__cuda_array_interface__") or hasattr(a, "__cuda_ndarray__")


def is_bf16_array(a: Any) -> bool:
    """Whether ``a`` is a bfloat16 parameter: an ``ml_dtypes.bfloat16`` array, or on a CUDA
    device also its ``uint16`` patterns (``__cuda_array_interface__`` has no bfloat16 type,
    so a device array comes as a 16-bit view). Anything that is no array is not."""
    if isinstance(a, np.ndarray):
        return a.dtype == LOW_PRECISION_DTYPES[0]
    dtype = getattr(a, "dtype", None)
    if (isinstance(dtype, np.dtype) and dtype in FLOAT_DTYPES) or not is_device_array(a):
        return False  # the float arrays' common case first: no description needed
    try:
        return describe(a, "array").dtype in LOW_PRECISION_DTYPES
    except (TypeError, ValueError):  # the checks that follow name what is wrong with it
        return False


def describe(a: Any, name: str) -> ArrayInfo:
    """Describe ``a``; raise ``TypeError`` naming ``name`` if it is no array fastrms knows."""
    if isinstance(a, np.ndarray):
        flags = a.flags
        return ArrayInfo(HOST, a.shape, a.dtype, flags.c_contiguous, flags.writeable, None)
    if hasattr(a, "__cuda_ndarray__"):  # CUDA simulator: device memory is a NumPy array
        flags = a._ary.flags
        return ArrayInfo(DEVICE, a.shape, a.dtype, flags.c_contiguous, flags.writeable, 0)
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is not None:
        shape = tuple(cai["shape"])
        dtype = np.dtype(cai["typestr"])
        strides = cai.get("strides")
        contiguous = strides is None or tuple(strides) == _c_strides(shape, dtype.itemsize)
        return ArrayInfo(DEVICE, shape, dtype, contiguous, not cai["data"][1], device_of(a))
    raise TypeError(
        f"{name} must be a NumPy array or a CUDA array (CuPy, PyTorch CUDA tensor, Numba device "
        f"array), got {type(a).__module__}.{type(a).__qualname__}"
    )


def extent(a: Any) -> tuple[int, int]:
    """``(address of the first byte, size in bytes)`` of a C-contiguous array."""
    if isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0], a.nbytes
    if hasattr(a, "__cuda_ndarray__"):
        return extent(a._ary)
    cai = a.__cuda_array_interface__
    return cai["data"][0], int(np.prod(cai["shape"], dtype=np.int64)) * np.dtype(
        cai["typestr"]
    ).itemsize


def overlap(a: Any, b: Any) -> bool:
    """Whether two C-contiguous arrays share memory."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return _may_share_memory(a, b)  # exact for contiguous arrays, and fast
    (sa, na), (sb, nb) = extent(a), extent(b)
    return na > 0 and nb > 0 and sa < sb + nb and sb < sa + na


def _c_strides(shape: tuple, itemsize: int) -> tuple:
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def device_of(a: Any) -> int | None:
    """The CUDA device ordinal of a device array, where its library says (else None)."""
    device = getattr(a, "device", None)
    for attr in ("index", "id"):  # torch.device.index, cupy.cuda.Device.id
        ordinal = getattr(device, attr, None)
        if isinstance(ordinal, int):
            return ordinal
    context = getattr(getattr(a, "gpu_data", None), "context", None)  # Numba device array
    return getattr(getattr(context, "device", None), "id", None)


def _host_arrays_ok(items: list, writes: tuple) -> bool:
    """The common case, NumPy arrays that pass every check, verified quickly.

    Any failure returns False, and :func:`check_arrays` then finds and explains it.
    """
    p = items[0][1]
    if type(p) is not np.ndarray or p.dtype not in FLOAT_DTYPES:
        return False
    dtype, shape = p.dtype, p.shape
    for name, a in items:
        if type(a) is not np.ndarray or a.dtype != dtype or a.shape != shape:
            return False
        flags = a.flags
        if not flags.c_contiguous or (name in writes and not flags.writeable):
            return False
    for i, (name, a) in enumerate(items):
        for other, b in items[i + 1 :]:
            if (name in writes or other in writes) and _may_share_memory(a, b):
                return False
    return True


_WHERE = {HOST: "in host memory (NumPy)", DEVICE: "on a CUDA device"}


def check_updatable(
    info: ArrayInfo, name: str, allow_bf16: bool = False, device_bf16: bool = False
) -> None:
    """Refuse an array (described by ``info``, named ``name``) that a step cannot update in
    place: not float32/float64 (``TypeError``), not C-contiguous or read-only
    (``ValueError``). The check every frontend makes of a parameter. With ``allow_bf16``,
    ``ml_dtypes.bfloat16`` host arrays are accepted too (not their ``uint16`` views, which
    would pass integer arrays as parameters); with ``device_bf16`` as well (the grouped
    step's, which has CUDA kernels for them), bfloat16 CUDA arrays and their ``uint16``
    patterns (see :func:`is_bf16_array`)."""
    if info.dtype not in FLOAT_DTYPES:
        if device_bf16 and info.kind == DEVICE and info.dtype in LOW_PRECISION_DTYPES:
            pass
        elif allow_bf16 and info.dtype == LOW_PRECISION_DTYPES[0]:
            if info.kind != HOST:
                raise TypeError(f"{name}: bfloat16 parameters are supported on the host only")
        else:
            also = " (or bfloat16)" if allow_bf16 else ""
            raise TypeError(f"{name} must have dtype float32 or float64{also}, got {info.dtype}")
    _check_layout(info, name, True)


def _check_layout(info: ArrayInfo, name: str, written: bool) -> None:
    if not info.c_contiguous:
        raise ValueError(
            f"{name} is not C-contiguous: pass a contiguous array "
            "(numpy.ascontiguousarray makes a copy; the update would not reach your original)"
        )
    if written and not info.writeable:
        raise ValueError(f"{name} is read-only; fastrms updates it in place")


def check_params(
    params: list,
    names: list[str],
    one_side: bool = False,
    allow_bf16: bool = False,
    device_bf16: bool = False,
) -> list[ArrayInfo]:
    """Check the parameters of an optimizer and return their descriptions.

    Each must pass :func:`check_updatable`, and none may overlap another (they are all
    written). With ``one_side``, all must be host arrays or all device arrays; ``allow_bf16``
    and ``device_bf16`` are :func:`check_updatable`'s. Raises
    ``TypeError``/``ValueError`` naming the parameter (``names``).
    """
    infos = []
    for p, name in zip(params, names):
        info = describe(p, name)
        check_updatable(info, name, allow_bf16, device_bf16)
        if one_side and infos and info.kind != infos[0].kind:
            raise TypeError(f"{name} and {names[0]} must all be NumPy arrays or all CUDA arrays")
        infos.append(info)
    check_no_overlap([(name, p, True) for p, name in zip(params, names)])
    return infos


def check_arrays(
    named: dict[str, Any], writes: tuple[str, ...], held: Held | tuple | None = None
) -> ArrayInfo:
    """Check the arrays of one update and return the parameter's description.

    The first array is the parameter. Every array must be a float32/float64 array of the
    parameter's kind (host or device), device, dtype and shape, and C-contiguous; the arrays in
    ``writes`` must be writeable and must not overlap any other array. Raises
    ``TypeError``/``ValueError`` naming the offending argument.

    ``held`` names the arrays held in another dtype than the parameter's (low-precision
    state), with the dtypes each may have and the option that asked for them (:class:`Held`),
    or a tuple of them; a parameter may then be bfloat16 too (a CUDA one as its ``uint16``
    patterns, see :func:`is_bf16_array`).
    """
    items = list(named.items())
    if held is None and _host_arrays_ok(items, writes):
        p = items[0][1]
        return ArrayInfo(HOST, p.shape, p.dtype, True, True, None)
    helds = (held,) if isinstance(held, Held) else tuple(held or ())
    pname, param = items[0]
    ref = describe(param, pname)
    check_updatable(ref, pname, allow_bf16=bool(helds), device_bf16=bool(helds))
    for name, a in items[1:]:
        info = describe(a, name)
        if info.kind != ref.kind:
            raise TypeError(
                f"{name} is {_WHERE[info.kind]} but {pname} is {_WHERE[ref.kind]}: "
                "keep every array of an update on the same side"
            )
        if info.device != ref.device and None not in (info.device, ref.device):
            raise ValueError(
                f"{name} is on CUDA device {info.device} but {pname} is on device {ref.device}"
            )
        mine = [h for h in helds if name in h.names]
        if mine:
            if info.dtype not in mine[0].dtypes:
                raise TypeError(
                    f"{name} has dtype {info.dtype} but {mine[0].option} holds it as "
                    f"{' or '.join(map(str, mine[0].dtypes))}"
                )
        elif info.dtype != ref.dtype:
            hint = ""
            if info.dtype in LOW_PRECISION_DTYPES and ref.dtype == np.float32:
                hint = "; to hold state as bfloat16, pass state_dtype='bfloat16'"
            raise TypeError(
                f"{name} has dtype {info.dtype} but {pname} has dtype {ref.dtype}: "
                f"fastrms does not cast arrays{hint}"
            )
        if info.shape != ref.shape:
            raise ValueError(f"{name} has shape {info.shape} but {pname} has shape {ref.shape}")
        _check_layout(info, name, name in writes)
    for i, (name, a) in enumerate(items):
        for other, b in items[i + 1 :]:
            if (name in writes or other in writes) and overlap(a, b):
                raise ValueError(f"{other} overlaps {name} in memory; pass separate arrays")
    return ref


def span(a: Any) -> tuple[int, int]:
    """``(address of the first byte, size in bytes)`` of the memory an array's elements lie
    in: :func:`extent` for a C-contiguous array, NumPy's byte bounds for a strided one."""
    if isinstance(a, np.ndarray) and not a.flags.c_contiguous:
        bounds = getattr(getattr(np.lib, "array_utils", None), "byte_bounds", None)  # NumPy 2
        lo, hi = (bounds or np.byte_bounds)(a)  # noqa: NPY201 (NumPy 1)
        return lo, hi - lo
    return extent(a)


def check_no_overlap(arrays: list[tuple[str, Any, bool]]) -> None:
    """Raise ValueError if an array that is written overlaps any other array.

    ``arrays`` holds ``(label, array, written)``; gradients (not written) may share memory.
    One sweep over the arrays sorted by address, so many small tensors stay cheap.
    """
    spans = []
    for label, a, written in arrays:
        start, nbytes = span(a)
        if nbytes:
            spans.append((start, start + nbytes, label, written))
    spans.sort(key=lambda s: s[0])
    reach_any = reach_written = (-1, "")  # furthest end so far, and whose
    for start, end, label, written in spans:
        reach, other = reach_any if written else reach_written
        if start < reach:
            raise ValueError(f"{label} overlaps {other} in memory; pass separate arrays")
        if end > reach_any[0]:
            reach_any = (end, label)
        if written and end > reach_written[0]:
            reach_written = (end, label)


# NumPy's array object starts with the object header, then its data pointer (``char *data``
# in numpy/ndarraytypes.h). Reading that word for many arrays in one compiled call is far
# cheaper than asking each array for its ``__array_interface__``; the offset is checked
# against the interface on first use, and any surprise falls back to the slow route.
_DATA_OFFSET = object.__basicsize__
_fast_addresses: bool | None = None


def host_addresses(arrays: list[np.ndarray]) -> np.ndarray:
    """The data addresses of NumPy arrays (exact ``np.ndarray`` instances), as int64."""
    global _fast_addresses
    if _fast_addresses is None:
        _fast_addresses = _check_fast_addresses()
    if _fast_addresses:
        from .kernels.pointers import load_words

        ids = np.fromiter(map(id, arrays), np.int64, len(arrays))
        return load_words(ids + _DATA_OFFSET)
    return np.array([a.__array_interface__["data"][0] for a in arrays], np.int64)


def _check_fast_addresses() -> bool:
    try:
        from .kernels.pointers import load_words

        probes = [np.zeros(3), np.zeros((2, 5), np.float32)[1], np.empty(0, np.float32)]
        ids = np.array([id(p) for p in probes], np.int64)
        got = load_words(ids + _DATA_OFFSET)
    except Exception:  # no numba, or it cannot compile here: the slow route works anyway
        return False
    return all(int(g) == p.__array_interface__["data"][0] for g, p in zip(got, probes))
