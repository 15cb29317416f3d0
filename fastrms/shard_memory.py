"""The memory the sharded optimizer moves: host (NumPy) or CUDA, and how MPI takes it.

:func:`memory_for` checks the parameters (as every frontend does,
:func:`fastrms.arrays.check_params`, and all on one side) and returns a :class:`Host` or a
:class:`Device`: how to allocate, view, copy, pack, divide and synchronize flat buffers, and
how to hand them to MPI. A CUDA-aware MPI is required for CUDA arrays
(:func:`mpi_is_cuda_aware`). Nothing here imports mpi4py; numba.cuda only when a
:class:`Device` is made.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import numpy as np

from . import dispatch
from .arrays import DEVICE, check_params


def memory_for(params: list, names: list[str]):
    """Check the parameters; return how to allocate, copy and communicate their memory."""
    infos = check_params(params, names, one_side=True, allow_bf16=True)
    return Device() if infos[0].kind == DEVICE else Host()


class Host:
    """NumPy memory."""

    kind = "host"

    def flat(self, a):
        return a.reshape(-1)

    def flat_view(self, flats: list, writeable: bool = True):
        if any(not f.flags.c_contiguous for f in flats):
            return None
        return flat_view_of([f.reshape(-1) for f in flats], writeable)

    def empty(self, n: int, dtype):
        return np.empty(n, dtype)

    def copy(self, dst, src) -> None:
        np.copyto(dst, src)

    def pack(self, dst, grad) -> None:
        np.copyto(dst.reshape(grad.shape), grad)  # bfloat16 into float32: exact

    def divide(self, a, n: int) -> None:
        np.divide(a, n, out=a)

    def round_bf16(self, dst, src) -> None:
        """float32 ``src`` into bfloat16 ``dst``, rounded to nearest even (ml_dtypes' cast:
        the bits of :func:`fastrms.lowprecision.round_nearest`, in place)."""
        np.copyto(dst, src, casting="unsafe")

    def sync(self) -> None:
        pass

    def mpi(self, a):
        return a


class Device:
    """CUDA memory (Numba views of any CUDA array), passed to a CUDA-aware MPI as is. Under
    Numba's CUDA simulator the "device" memory is host memory, which any MPI takes."""

    kind = "cuda"

    def __init__(self) -> None:
        from numba import cuda

        self.cuda, self.backend = cuda, dispatch.get("cuda")
        self.simulator = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"
        if not self.simulator and not mpi_is_cuda_aware():
            raise TypeError(
                "params are CUDA arrays, but this MPI library does not report CUDA support "
                "(MPIX_Query_cuda_support); use a CUDA-aware MPI, or NumPy arrays"
            )
        self._scale = None

    def flat(self, a):
        return self.backend.view(a)

    def flat_view(self, flats: list, writeable: bool = True):
        return None  # always through the flat buffers

    def empty(self, n: int, dtype):
        return self.cuda.device_array(n, dtype)

    def copy(self, dst, src) -> None:
        if dst.size:
            dst.copy_to_device(src)

    def pack(self, dst, grad) -> None:
        self.copy(dst, self.backend.view(grad))

    def divide(self, a, n: int) -> None:
        if self._scale is None:
            global cuda
            cuda = self.cuda
            self._scale = cuda.jit(_divide_kernel)
        if a.size:
            self._scale[(a.size + 255) // 256, 256](a, a.dtype.type(n))

    def sync(self) -> None:
        self.cuda.synchronize()

    def mpi(self, a):
        return a._ary if self.simulator else a


cuda: Any = None  # numba.cuda, imported by the first Device (import fastrms must not)


def _divide_kernel(x, n):
    """``x /= n`` on the device (compiled with numba.cuda.jit on first use)."""
    i = cuda.grid(1)
    if i < x.size:
        x[i] = x[i] / n


def mpi_is_cuda_aware() -> bool:
    """Whether the loaded MPI library says it supports CUDA memory (Open MPI, MPICH)."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "libmpi" in line and "/" in line}
    for path in sorted(paths):
        query = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support", None)
        if query is not None:
            query.restype = ctypes.c_int
            return bool(query())
    return False


def flat_view_of(flats: list[np.ndarray], writeable: bool = True) -> np.ndarray | None:
    """One 1-D array over the memory of the 1-D arrays ``flats`` if they lie end to end, in
    order, in one C-contiguous base array (writeable if ``writeable``); else None."""
    flats = [f for f in flats if f.size]
    if not flats:
        return None
    root = _root(flats[0])
    if not root.flags.c_contiguous or (writeable and not root.flags.writeable):
        return None
    base = root.__array_interface__["data"][0]
    start = pos = flats[0].__array_interface__["data"][0]
    for f in flats:
        if _root(f) is not root or f.__array_interface__["data"][0] != pos:
            return None
        if f.dtype != flats[0].dtype:
            return None
        pos += f.nbytes
    return root.reshape(-1).view(np.uint8)[start - base : pos - base].view(flats[0].dtype)


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a
