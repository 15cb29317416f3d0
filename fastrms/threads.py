"""Which Numba threading layer runs the CPU kernels, chosen so that fork and threads are safe.

Numba starts one threading layer per process, at its first parallel region:

- ``tbb`` (Intel TBB) is fork-safe and thread-safe. fastrms depends on the ``tbb`` wheel, whose
  library lies outside the loader's search path (in the environment's ``lib/``); it is loaded
  here by its full path first, so that Numba's own ``dlopen("libtbb.so.12")`` finds it.
- ``omp`` with GNU OpenMP (Linux) is thread-safe but not fork-safe: a child forked from a
  process that ran a parallel region dies when it runs one ("fork() called from a process
  already using GNU OpenMP, this is unsafe").
- ``workqueue`` is fork-safe but not thread-safe: two Python threads in parallel regions at
  once abort the process. fastrms then runs its parallel steps one at a time, under a lock.

Unless the user chose a layer (``NUMBA_THREADING_LAYER`` or ``NUMBA_THREADING_LAYER_PRIORITY``,
or ``numba.config`` in code), :func:`configure` asks Numba for a fork-safe one (TBB first) and
warns once, with :class:`~fastrms.errors.ThreadingLayerWarning`, if it got ``workqueue``.
It runs when the ``cpu`` backend is first used (``import fastrms`` does not import numba).
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ThreadingLayerWarning

_TBB_LIBRARY = {"win32": "tbb12.dll", "darwin": "libtbb.12.dylib"}.get(sys.platform, "libtbb.so.12")
_USER_VARS = ("NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY")


class LayerUnavailableError(RuntimeError):
    """The threading layer the user asked Numba for cannot be loaded."""


@dataclass(frozen=True)
class Layer:
    """The threading layer in use, and what it is safe under."""

    name: str  # "tbb", "omp" or "workqueue", as numba.threading_layer() says
    fork_safe: bool  # a forked child may run parallel steps after the parent did
    thread_safe: bool  # Python threads may run parallel steps at once (natively)
    chosen_by: str  # "fastrms", "the user" or "code that ran before fastrms"
    vendor: str = ""  # the OpenMP implementation, for omp

    def describe(self) -> str:
        name = f"{self.name} ({self.vendor} OpenMP)" if self.vendor else self.name
        if self.fork_safe and self.thread_safe:
            safety = "fork-safe and thread-safe"
        elif self.thread_safe:
            safety = "thread-safe, NOT fork-safe: a child forked after a parallel step dies in one"
        elif self.fork_safe:
            safety = "fork-safe; not thread-safe, so fastrms runs parallel steps one at a time"
        else:
            safety = "neither fork-safe nor thread-safe; fastrms runs parallel steps one at a time"
        return f"{name}, {safety}; chosen by {self.chosen_by}"


_layer: Layer | None = None
_configure_lock = threading.Lock()
_launch_lock = threading.Lock()  # held around each launch when the layer is not thread-safe
_dll_directories: list = []  # Windows forgets an added DLL directory when its handle is freed


def _new_locks() -> None:
    # A child forked while another thread held a lock would wait for it forever.
    global _configure_lock, _launch_lock
    _configure_lock, _launch_lock = threading.Lock(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_locks)


def configure() -> Layer:
    """Start Numba's threading layer (once per process) and return which one runs.

    Raises
    ------
    LayerUnavailableError
        If the layer the user named cannot be loaded (Numba's own message says why).
    """
    global _layer
    if _layer is not None:
        return _layer
    with _configure_lock:
        if _layer is None:
            _layer = _start()
    return _layer


def guard(launch: Callable[..., Any]) -> Callable[..., Any]:
    """``launch``, made safe to call from several Python threads under the layer in use.

    Starts the layer (:func:`configure`) first. Under a thread-safe layer ``launch`` itself is
    returned; otherwise a wrapper that holds one process-wide lock around each call.
    """
    if configure().thread_safe:
        return launch

    def serialized(*args: Any) -> Any:
        with _launch_lock:
            return launch(*args)

    return serialized


def _start() -> Layer:
    import numba

    by_user = str(numba.config.THREADING_LAYER).lower() != "default" or any(
        os.environ.get(v) for v in _USER_VARS
    )
    chosen_by = "the user" if by_user else "fastrms"
    tbb_problem = None
    try:
        numba.threading_layer()
        if not by_user:  # a parallel region or numba.get_num_threads() ran before fastrms
            chosen_by = "code that ran before fastrms"
    except ValueError:  # not started yet: we may choose
        tbb_problem = _load_tbb() if _may_want_tbb(numba.config.THREADING_LAYER) else None
        if not by_user:
            # Numba's fork-safe choice: tbb, else omp where fork-safe (not GNU), else workqueue
            numba.config.THREADING_LAYER = "forksafe"
        try:
            numba.get_num_threads()  # starts the layer
        except ValueError as exc:  # only for a layer the user named; Numba says which and why
            message = " ".join(str(exc).split())
            raise LayerUnavailableError(
                f"Numba's threading layer {numba.config.THREADING_LAYER!r} cannot be loaded "
                f"({message})" + (f"; {tbb_problem}" if tbb_problem else "")
            ) from exc
    layer = _describe(numba.threading_layer(), chosen_by)
    if layer.name == "workqueue" and chosen_by == "fastrms":
        warnings.warn(
            f"fastrms could not load Intel TBB ({tbb_problem or 'Numba refused it'}), so it uses "
            "Numba's workqueue threading layer: safe in forked children, but parallel steps run "
            "one at a time across Python threads, and small ones are slower. "
            "Install TBB (pip install tbb), or set NUMBA_THREADING_LAYER=omp if this process "
            "never forks after stepping.",
            ThreadingLayerWarning,
            stacklevel=2,
        )
    elif not layer.fork_safe and chosen_by != "the user":
        warnings.warn(
            f"Numba's threading layer was started ({layer.name}) before fastrms first ran, so "
            "fastrms could not choose TBB: a process forked from this one dies if it runs a "
            "parallel step. Let fastrms step first, or set NUMBA_THREADING_LAYER=tbb.",
            ThreadingLayerWarning,
            stacklevel=2,
        )
    return layer


def _may_want_tbb(requested: str) -> bool:
    return str(requested).lower() not in ("omp", "workqueue")


def _describe(name: str, chosen_by: str) -> Layer:
    if name == "tbb":
        return Layer(name, True, True, chosen_by)
    if name == "omp":
        from numba.np.ufunc import omppool

        vendor = getattr(omppool, "openmp_vendor", "")
        # Numba aborts a forked child only with GNU OpenMP (its own fork check).
        return Layer(name, vendor != "GNU", True, chosen_by, vendor)
    return Layer(name, True, False, chosen_by)


def _load_tbb() -> str | None:
    """Load the ``tbb`` wheel's TBB library (or a system one); None if loaded, else why not."""
    import ctypes

    problems = []
    for path in _tbb_candidates():
        try:
            if sys.platform == "win32":
                _dll_directories.append(os.add_dll_directory(os.path.dirname(path)))
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return None
        except OSError as exc:
            problems.append(f"{path}: {exc}")
    try:  # a system or conda TBB that the loader finds by itself
        ctypes.CDLL(_TBB_LIBRARY, mode=ctypes.RTLD_GLOBAL)
        return None
    except OSError:
        pass
    if problems:
        return "; ".join(problems)
    return f"{_TBB_LIBRARY} not found: the tbb package is not installed"


def _tbb_candidates() -> list[str]:
    """Paths where the ``tbb`` wheel put its library: from its file list, then ``prefix/lib``."""
    from importlib import metadata

    paths = []
    try:
        files = metadata.files("tbb") or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == _TBB_LIBRARY:
            paths.append(os.path.normpath(f.locate()))
    for prefix in (sys.prefix, sys.base_prefix):
        sub = os.path.join("Library", "bin") if sys.platform == "win32" else "lib"
        paths.append(os.path.join(prefix, sub, _TBB_LIBRARY))
    return [p for i, p in enumerate(paths) if os.path.exists(p) and p not in paths[:i]]
