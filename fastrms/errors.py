"""Exceptions and warnings raised by fastrms."""


class FallbackWarning(RuntimeWarning):
    """``backend="auto"`` could not use the compiled CPU kernels and fell back to NumPy."""


class ThreadingLayerWarning(RuntimeWarning):
    """Numba's threading layer is not both fork-safe and thread-safe (e.g. TBB could not load)."""


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name (``backend=`` or ``FASTRMS_BACKEND``) but cannot run."""
