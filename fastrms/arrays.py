"""What fastrms needs to know about an array, whichever library made it.

Host arrays are NumPy arrays. Device arrays are anything exposing
``__cuda_array_interface__`` (Numba device arrays, CuPy, PyTorch CUDA tensors), or the CUDA
simulator's arrays, which expose ``__cuda_ndarray__`` instead.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

HOST = "host"
DEVICE = "cuda"
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class ArrayInfo(NamedTuple):
    kind: str  # HOST or DEVICE
    shape: tuple
    dtype: np.dtype
    c_contiguous: bool
    writeable: bool
    start: int  # address of the first byte, for overlap checks
    nbytes: int
    device: int | None  # CUDA device ordinal where known


def is_device_array(a: Any) -> bool:
    return hasattr(a, "__cuda_array_interface__") or hasattr(a, "__cuda_ndarray__")


def describe(a: Any, name: str) -> ArrayInfo:
    """Describe ``a``; raise ``TypeError`` naming ``name`` if it is no array fastrms knows."""
    if isinstance(a, np.ndarray):
        return _describe_numpy(a, HOST, None)
    if hasattr(a, "__cuda_ndarray__"):  # CUDA simulator: device memory is a NumPy array
        return _describe_numpy(a._ary, DEVICE, 0)
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is not None:
        return _describe_cai(a, cai)
    raise TypeError(
        f"{name} must be a NumPy array or a CUDA array (CuPy, PyTorch CUDA tensor, Numba device "
        f"array), got {type(a).__module__}.{type(a).__qualname__}"
    )


def _describe_numpy(a: np.ndarray, kind: str, device: int | None) -> ArrayInfo:
    flags = a.flags
    start = a.__array_interface__["data"][0]
    return ArrayInfo(
        kind, a.shape, a.dtype, flags.c_contiguous, flags.writeable, start, a.nbytes, device
    )


def _describe_cai(a: Any, cai: dict) -> ArrayInfo:
    shape = tuple(cai["shape"])
    dtype = np.dtype(cai["typestr"])
    strides = cai.get("strides")
    contiguous = strides is None or tuple(strides) == _c_strides(shape, dtype.itemsize)
    ptr, readonly = cai["data"]
    size = int(np.prod(shape, dtype=np.int64))
    return ArrayInfo(
        DEVICE, shape, dtype, contiguous, not readonly, ptr, size * dtype.itemsize, _device_of(a)
    )


def _c_strides(shape: tuple, itemsize: int) -> tuple:
    strides, step = [], itemsize
    for extent in reversed(shape):
        strides.append(step)
        step *= extent
    return tuple(reversed(strides))


def _device_of(a: Any) -> int | None:
    device = getattr(a, "device", None)
    for attr in ("index", "id"):  # torch.device.index, cupy.cuda.Device.id
        ordinal = getattr(device, attr, None)
        if isinstance(ordinal, int):
            return ordinal
    context = getattr(getattr(a, "gpu_data", None), "context", None)  # Numba device array
    return getattr(getattr(context, "device", None), "id", None)


def check_arrays(named: dict[str, Any], writes: tuple[str, ...]) -> tuple[ArrayInfo, ...]:
    """Check the arrays of one update; the first is the parameter.

    Every array must be a float32/float64 array of the parameter's kind (host or device),
    device, dtype and shape, C-contiguous; the arrays in ``writes`` must be writeable and must
    not overlap any other array. Raises ``TypeError``/``ValueError`` naming the argument.
    """
    infos = {name: describe(a, name) for name, a in named.items()}
    names = list(infos)
    pname = names[0]
    ref = infos[pname]
    if ref.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{pname} must have dtype float32 or float64, got {ref.dtype}")
    for name, info in infos.items():
        if info.kind != ref.kind:
            where = {HOST: "in host memory (NumPy)", DEVICE: "on a CUDA device"}
            raise TypeError(
                f"{name} is {where[info.kind]} but {pname} is {where[ref.kind]}: "
                "keep every array of an update on the same side"
            )
        if info.device != ref.device and None not in (info.device, ref.device):
            raise ValueError(
                f"{name} is on CUDA device {info.device} but {pname} is on device {ref.device}"
            )
        if info.dtype != ref.dtype:
            raise TypeError(
                f"{name} has dtype {info.dtype} but {pname} has dtype {ref.dtype}: "
                "fastrms does not cast arrays"
            )
        if info.shape != ref.shape:
            raise ValueError(f"{name} has shape {info.shape} but {pname} has shape {ref.shape}")
        if not info.c_contiguous:
            raise ValueError(
                f"{name} is not C-contiguous: pass a contiguous array "
                "(numpy.ascontiguousarray makes a copy; the update would not reach your original)"
            )
    for name in writes:
        if not infos[name].writeable:
            raise ValueError(f"{name} is read-only; fastrms updates it in place")
    for i, name in enumerate(writes):
        a = infos[name]
        for other in names:
            if other == name or (other in writes and names.index(other) < i):
                continue
            b = infos[other]
            if (
                a.nbytes
                and b.nbytes
                and a.start < b.start + b.nbytes
                and b.start < a.start + a.nbytes
            ):
                raise ValueError(f"{other} overlaps {name} in memory; pass separate arrays")
    return tuple(infos.values())
