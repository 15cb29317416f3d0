"""Backends, their availability, and which one runs an update.

- ``numpy``: the in-place NumPy reference (:mod:`fastrms.reference`); always available.
- ``cpu``: the Numba ``prange`` kernels (:mod:`fastrms.kernels.cpu`).
- ``cuda``: the Numba CUDA kernels (:mod:`fastrms.kernels.cuda`), for device arrays.

``backend="auto"`` picks ``cuda`` for device arrays and ``cpu`` for NumPy arrays; the
``FASTRMS_BACKEND`` environment variable overrides ``auto``. If the CPU kernels cannot be
imported or compiled, ``auto`` falls back to ``numpy`` with one :class:`FallbackWarning`. A
backend named explicitly that cannot run raises :class:`BackendUnavailableError` instead.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import reference, teams, threads
from .arrays import DEVICE, HOST, device_of
from .errors import BackendUnavailableError, FallbackWarning
from .precision import signature
from .schedule import PARTS_PER_THREAD, schedule, team_block

BACKENDS = ("cuda", "cpu", "numpy")
CHOICES = ("auto", *BACKENDS)
ENV_VAR = "FASTRMS_BACKEND"


@dataclass(frozen=True)
class BackendInfo:
    """Availability of one backend, as :func:`fastrms.backends` reports it."""

    name: str
    available: bool
    detail: str  # device or thread count when available, the reason when not


def _is_simulator() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


class _Backend:
    name: str
    kind: str
    _reason: str | None = None  # set once the backend is found unusable

    def launch(self, rule: str, flags: tuple, arrays: tuple, hyper: tuple) -> None:
        raise NotImplementedError

    def view(self, a: Any) -> Any:
        """A 1-D view of ``a`` that the kernels index (no copy)."""
        raise NotImplementedError

    def zeros_like(self, a: Any, slot: int = 0, dtype: np.dtype | None = None) -> Any:
        """A zero array like ``a`` on ``a``'s side, for the ``slot``-th state array (of
        ``a``'s dtype, or of ``dtype``)."""
        raise NotImplementedError

    def to_host(self, a: Any) -> np.ndarray:
        raise NotImplementedError

    def copy_from_host(self, dst: Any, src: np.ndarray) -> None:
        raise NotImplementedError

    def probe(self) -> BackendInfo:
        raise NotImplementedError


class _NumpyBackend(_Backend):
    name, kind = "numpy", HOST

    def launch(self, rule, flags, arrays, hyper):
        reference.RULES[rule](arrays, hyper, flags)

    def view(self, a):
        return a if a.ndim == 1 else a.reshape(-1)

    def zeros_like(self, a, slot=0, dtype=None):
        return _staggered_zeros_like(a, slot, dtype)

    def to_host(self, a):
        return np.array(a, copy=True)

    def copy_from_host(self, dst, src):
        np.copyto(dst, src.reshape(dst.shape), casting="no")

    def probe(self):
        return BackendInfo(self.name, True, f"NumPy {np.__version__}, one thread")


class _CpuBackend(_NumpyBackend):
    name, kind = "cpu", HOST
    _kernels: Callable | None = None

    def _launcher(self):
        if self._kernels is None:
            if self._reason is not None:
                raise BackendUnavailableError(f"the cpu backend is unavailable: {self._reason}")
            try:
                from .kernels import cpu, rules
            except ImportError as exc:
                self._reason = f"numba cannot be imported ({exc})"
                raise BackendUnavailableError(
                    f"the cpu backend is unavailable: {self._reason}"
                ) from exc
            try:  # starts Numba's threading layer: fork- and thread-safe (fastrms.threads)
                self._kernels = threads.guard(cpu.launch)
            except threads.LayerUnavailableError as exc:
                self._reason = str(exc)
                raise BackendUnavailableError(f"the cpu backend is unavailable: {exc}") from exc
            self._rules = rules.RULES
            self._cpu = cpu
        return self._kernels

    def launch(self, rule, flags, arrays, hyper):
        launch = self._launcher()
        # A one-array step takes torch's team only where Numba's threads would run it in
        # parallel too: below that its serial loop was faster next to torch (measured by
        # bench/team_vs_torch.py at 10^5: 0.81x-0.86x torch fused on the team, 1.5x-1.6x serial).
        big = arrays[0].size >= self._cpu.PARALLEL_THRESHOLD
        team = teams.default_team() if big else None
        if team is not None and team.threads() > 1:
            self._team_launch(team, rule, flags, arrays, hyper)
        else:
            launch(self._rules[rule], flags, arrays, hyper)

    def _team_launch(self, team, rule, flags, arrays, hyper) -> None:
        """One array's step on ``team`` (torch's OpenMP team, see fastrms.teams), as a grouped
        step of one row: the same loop, so the same bits. Small arrays, none sized by n."""
        p = arrays[0]
        body = self.grouped_team_body(rule, flags, signature(rule, p.dtype))
        threads = team.threads()
        addresses = [a.__array_interface__["data"][0] for a in arrays]
        table = np.array([[p.size, *addresses]], np.int64)
        part_ptr, items = _one_row_schedule(p.size, PARTS_PER_THREAD * threads)
        scalars = np.array(hyper, p.dtype)
        args = team_block(table, part_ptr, items, scalars)
        team.run(body, args.ctypes.data, threads)

    def grouped_kernels(self, rule: str, flags: tuple, signature) -> tuple[Callable, Callable]:
        """``(parallel, serial)`` kernels over a table of arrays of ``signature`` (a
        :class:`fastrms.precision.Signature`; see kernels.elementwise)."""
        self._launcher()
        parallel, serial = self._cpu.grouped_loops(self._rules[rule], flags, signature)
        return threads.guard(parallel), serial  # a serial loop starts no thread team

    def blockwise_kernels(
        self, rule: str, flags: tuple, signature, used: tuple
    ) -> tuple[Callable, Callable]:
        """``(parallel, serial)`` kernels over a table of arrays whose state is held blockwise
        (``state_dtype="int8"``; see kernels.blockwise); ``used`` flags the slots in use."""
        self._launcher()
        from .kernels import blockwise

        parallel, serial = blockwise.grouped_block_loops(self._rules[rule], flags, signature, used)
        return threads.guard(parallel), serial

    def grouped_team_body(self, rule: str, flags: tuple, signature) -> int:
        """The address of a C function that runs a grouped step of ``signature`` on a team of
        threads that another library starts (see kernels.elementwise.team_body)."""
        self._launcher()
        return self._cpu.team_body(self._rules[rule], flags, signature).address

    @property
    def parallel_threshold(self) -> int:
        """Below this many elements in all, a step runs on one thread."""
        self._launcher()
        return self._cpu.PARALLEL_THRESHOLD

    def threads(self) -> int:
        import numba

        return numba.get_num_threads()

    def compile_error(self, exc: Exception) -> None:
        """Record that a kernel failed to compile here, so ``auto`` stops trying."""
        self._reason = f"a kernel failed to compile on this platform ({type(exc).__name__}: {exc})"

    def probe(self):
        try:
            self._launcher()
        except BackendUnavailableError:
            pass
        if self._reason is not None:
            return BackendInfo(self.name, False, self._reason)
        import numba

        return BackendInfo(
            self.name,
            True,
            f"numba {numba.__version__}, {numba.get_num_threads()} threads "
            f"(set NUMBA_NUM_THREADS to change); threading layer {threads.configure().describe()}",
        )


class _CudaBackend(_Backend):
    name, kind = "cuda", DEVICE
    _cuda: Any = None

    def _module(self):
        """numba.cuda, imported on first use; raises BackendUnavailableError with the reason."""
        if self._cuda is None:
            try:
                from numba import cuda
            except ImportError as exc:
                raise BackendUnavailableError(
                    "the cuda backend is unavailable: numba-cuda is not installed "
                    "(pip install 'fastrms[cuda]')"
                ) from exc
            if not _is_simulator() and not cuda.is_available():
                raise BackendUnavailableError(
                    f"the cuda backend is unavailable: {_cuda_unavailable_reason(cuda)}"
                )
            from .kernels import cuda as kernels
            from .kernels import rules

            self._cuda, self._kernels, self._rules = cuda, kernels, rules.RULES
        return self._cuda

    def launch(self, rule, flags, arrays, hyper):
        self._module()
        self._kernels.launch(self._rules[rule], flags, arrays, hyper, _stream_of(arrays))

    def grouped_launcher(self) -> Callable:
        """``launch(rule, flags, table, hyper, stream, signature=None, words=None)`` over a
        table of device addresses of arrays held as ``signature`` says, with stochastic
        rounding's key ``words`` (see kernels.cuda.launch_grouped)."""
        self._module()
        kernels, rules = self._kernels, self._rules

        def launch(rule, flags, table, hyper, stream, signature=None, words=None):
            kernels.launch_grouped(rules[rule], flags, table, hyper, stream, signature, words)

        return launch

    def stream_of(self, a: Any):
        """The stream an array's library works on: a Numba array's own, or the one its
        ``__cuda_array_interface__`` names (None or 1: the legacy default stream; 2: the
        per-thread default stream; else a stream handle, e.g. torch's current stream)."""
        cuda = self._module()
        if hasattr(a, "__cuda_ndarray__") or _is_numba_device_array(a):
            return getattr(a, "stream", 0) or 0
        handle = a.__cuda_array_interface__.get("stream")
        if handle in (None, 0, 1):
            return 0
        if handle == 2:
            return cuda.per_thread_default_stream()
        return _external_stream(cuda, handle)

    def view(self, a):
        cuda = self._module()
        if hasattr(a, "__cuda_ndarray__") or _is_numba_device_array(a):
            d = a
        else:  # CuPy, PyTorch: a zero-copy Numba view; we launch on the array's own stream
            d = cuda.as_cuda_array(a, sync=False)
        return d.reshape(d.size)

    def zeros_like(self, a, slot=0, dtype=None):
        cuda = self._module()
        shape, own = _shape_dtype(a)
        dtype = own if dtype is None else dtype
        device = device_of(a)
        if device is None or _is_simulator():
            return cuda.to_device(np.zeros(shape, dtype))
        with cuda.gpus[device]:
            return cuda.to_device(np.zeros(shape, dtype))

    def to_host(self, a):
        cuda = self._module()
        return (a if hasattr(a, "copy_to_host") else cuda.as_cuda_array(a)).copy_to_host()

    def copy_from_host(self, dst, src):
        self.view(dst).copy_to_device(np.ascontiguousarray(src).reshape(-1))

    def probe(self):
        try:
            cuda = self._module()
        except BackendUnavailableError as exc:
            return BackendInfo(self.name, False, str(exc).split(": ", 1)[1])
        if _is_simulator():
            return BackendInfo(
                self.name, True, "CUDA simulator (NUMBA_ENABLE_CUDASIM=1): correct but slow"
            )
        dev = cuda.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else dev.name
        return BackendInfo(
            self.name,
            True,
            f"{name}, compute capability {dev.compute_capability}, "
            f"{dev.MULTIPROCESSOR_COUNT} multiprocessors",
        )


@functools.lru_cache(maxsize=64)
def _external_stream(cuda, handle: int):
    return cuda.external_stream(handle)


def _staggered_zeros_like(a: np.ndarray, slot: int, dtype: np.dtype | None = None) -> np.ndarray:
    """Zeros like ``a`` (of ``a``'s dtype, or of ``dtype``), 64-byte aligned, starting ``slot``
    KiB after ``a`` modulo 4 KiB.

    When arrays that one loop loads from and stores to sit at (nearly) the same address modulo
    4 KiB, the CPU mistakes loads for dependents of earlier stores ("4K aliasing") and stalls:
    fastrms.Adam over GPT-2's tensors ran 1.5x slower when the allocator happened to place its
    state so. The state arrays fastrms allocates are therefore spread away from the parameter.
    """
    dtype = a.dtype if dtype is None else np.dtype(dtype)
    nbytes = a.size * dtype.itemsize
    if nbytes < 1 << 16:
        return np.zeros_like(a, dtype)
    raw = np.zeros(nbytes + 8192, np.uint8)
    base = raw.__array_interface__["data"][0]
    offset = (a.__array_interface__["data"][0] + 1024 * slot - base) % 4096
    offset += -(base + offset) % 64
    return raw[offset : offset + nbytes].view(dtype).reshape(a.shape)


def _cuda_unavailable_reason(cuda) -> str:
    try:
        cuda.get_current_device()
    except Exception as exc:  # the driver's own words: no driver, no device, ...
        return f"no usable CUDA driver or device ({' '.join(str(exc).split())})"
    return "no usable CUDA driver or device"


def _is_numba_device_array(a) -> bool:
    return type(a).__module__.startswith("numba")


def _shape_dtype(a) -> tuple[tuple, np.dtype]:
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is not None:
        return tuple(cai["shape"]), np.dtype(cai["typestr"])
    return tuple(a.shape), np.dtype(a.dtype)


def _stream_of(arrays: tuple):
    """The stream the parameter's ``__cuda_array_interface__`` named, else the default one.

    ``numba.cuda.as_cuda_array`` keeps that stream on the view it returns.
    """
    return getattr(arrays[0], "stream", 0) or 0


_INSTANCES = {b.name: b for b in (_CudaBackend(), _CpuBackend(), _NumpyBackend())}
_warned: set[str] = set()


def get(name: str) -> _Backend:
    return _INSTANCES[name]


def resolve(backend: str, kind: str) -> tuple[_Backend, bool]:
    """The backend that runs an update of arrays of ``kind`` (HOST or DEVICE).

    Returns the backend and whether it was picked automatically (and so may fall back).
    """
    if backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR) or "auto"
        if backend not in CHOICES:
            raise ValueError(f"{ENV_VAR} must be one of {CHOICES}, got {backend!r}")
    auto = backend == "auto"
    if auto:
        backend = "cuda" if kind == DEVICE else "cpu"
    chosen = _INSTANCES[backend]
    if chosen.kind != kind:
        if kind == HOST:
            raise TypeError(
                f"backend {backend!r} needs CUDA arrays but got NumPy arrays; fastrms does not "
                "copy silently: move them with numba.cuda.to_device(a), cupy.asarray(a) or "
                "torch.as_tensor(a, device='cuda'), or use backend='cpu'"
            )
        raise TypeError(
            f"backend {backend!r} needs NumPy arrays but got CUDA arrays; use backend='cuda', "
            "or copy them to the host first"
        )
    if auto and chosen._reason is not None and chosen.name == "cpu":
        return fall_back(chosen._reason), True
    return chosen, auto


def fall_back(reason: str) -> _Backend:
    """The NumPy backend, in place of the cpu one that cannot run for ``reason`` (warns once)."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"fastrms falls back to the NumPy reference backend: {reason}",
            FallbackWarning,
            stacklevel=4,
        )
    return _INSTANCES["numpy"]


def launch(backend: _Backend, auto: bool, rule: str, flags: tuple, arrays: tuple, hyper: tuple):
    """Run one update. If the CPU kernels cannot load or compile (which happens before anything
    is written), ``auto`` falls back to NumPy; a forced ``cpu`` raises BackendUnavailableError.
    """
    if backend.name != "cpu":
        backend.launch(rule, flags, arrays, hyper)
        return
    try:
        backend.launch(rule, flags, arrays, hyper)
        return
    except BackendUnavailableError:
        if not auto:
            raise
    except Exception as exc:
        from numba.core.errors import NumbaError

        if not isinstance(exc, NumbaError):
            raise
        backend.compile_error(exc)
        if not auto:
            raise BackendUnavailableError(
                f"the cpu backend is unavailable: {backend._reason}"
            ) from exc
    fall_back(backend._reason).launch(rule, flags, arrays, hyper)


def backends() -> dict[str, BackendInfo]:
    """Report, for each backend, whether it can run here and on what.

    Returns
    -------
    dict
        ``{"cuda": BackendInfo, "cpu": BackendInfo, "numpy": BackendInfo}``; ``detail`` holds
        the device or thread count when the backend is available, the reason when it is not.
    """
    return {name: _INSTANCES[name].probe() for name in BACKENDS}


@functools.lru_cache(maxsize=64)
def _one_row_schedule(size: int, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """The schedule of a one-array step (it depends on nothing but the size and the parts):
    computed once, as a plan computes its own, not at every step (about 20 us)."""
    part_ptr, items = schedule(np.array([size], np.int64), parts)
    part_ptr.setflags(write=False)
    items.setflags(write=False)
    return part_ptr, items
