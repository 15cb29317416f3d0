"""Compile options shared by the CPU and CUDA loop generators."""

import hashlib
import os
from pathlib import Path

#: fastmath is off unless FASTRMS_FASTMATH=1: it lets LLVM reorder and contract the
#: arithmetic, so results would no longer match the NumPy reference or PyTorch bit for bit.
FASTMATH = os.environ.get("FASTRMS_FASTMATH", "0") == "1"


# Numba keys a cached kernel on the file that defines the loop, not on the rules it inlines.
# Binding this digest of rules.py into every loop (with the fastmath setting, which is not part
# of Numba's key either) makes an edit to a rule, or a change of FASTRMS_FASTMATH, recompile.
def digest(path: Path) -> int:
    """A file's content as an int (the first 60 bits of its SHA-256), for a cache key."""
    return int(hashlib.sha256(path.read_bytes()).hexdigest()[:15], 16)


RULES_TOKEN = (digest(Path(__file__).parent / "rules.py"), FASTMATH)


# -- where compiled kernels are cached ------------------------------------------------------------

#: The installed ``fastrms`` package, or None in a source tree (where ``kernels/`` sits beside
#: ``fastrms/``, not inside it, and the project root is no package).
_INSTALLED = Path(__file__).resolve().parent.parent
_INSTALLED = _INSTALLED if (_INSTALLED / "__init__.py").is_file() else None


def cache_dir() -> Path | None:
    """The directory Numba caches fastrms's compiled kernels under, or None for "beside the
    sources" (each ``kernels/__pycache__``, in a source tree or an editable install).

    ``NUMBA_CACHE_DIR``, when set, wins, as Numba documents. Otherwise an installed copy caches
    in a per-user directory (``~/.cache/fastrms`` on Linux, ``$XDG_CACHE_HOME`` honoured; the
    platform's cache folder elsewhere), one subfolder per installed location: cache files
    written into ``site-packages/fastrms`` would outlive ``pip uninstall`` and an editable
    reinstall, and the left-over folder would then import as an empty namespace package.
    """
    import numba
    from numba.misc.appdirs import AppDirs

    if numba.config.CACHE_DIR:
        return Path(numba.config.CACHE_DIR)
    if _INSTALLED is None:
        return None
    return Path(AppDirs("fastrms", appauthor=False).user_cache_dir)


def use_cache_dir() -> None:
    """Make Numba cache the kernels of an installed copy in :func:`cache_dir` (once).

    Adds a cache locator to Numba's list, after the one for ``NUMBA_CACHE_DIR`` and before the
    one that writes beside the sources; it claims only files of the installed fastrms package.
    A user's ``NUMBA_CACHE_LOCATOR_CLASSES`` replaces Numba's list, and so this choice too.
    """
    from numba.core import caching

    # Numba 0.68 dropped the leading underscore of these names.
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl
    user_wide = getattr(caching, "UserWideCacheLocator", None) or caching._UserWideCacheLocator
    user_given = (
        getattr(caching, "UserProvidedCacheLocator", None) or caching._UserProvidedCacheLocator
    )
    classes = impl._locator_classes
    if _INSTALLED is None or any(c.__name__ == "FastrmsInstalledLocator" for c in classes):
        return

    class FastrmsInstalledLocator(user_wide):
        """Numba's per-user locator, under fastrms's own cache folder, for the installed copy."""

        def __init__(self, py_func, py_file):
            super().__init__(py_func, py_file)
            self._cache_path = str(cache_dir() / self.get_suitable_cache_subpath(py_file))

        @classmethod
        def from_function(cls, py_func, py_file):
            if not Path(py_file).resolve().is_relative_to(_INSTALLED):
                return None
            return super().from_function(py_func, py_file)

    classes.insert(
        classes.index(user_given) + 1 if user_given in classes else 0, FastrmsInstalledLocator
    )


#: The compile options every CPU loop takes (kernels.cpu), and so the benchmark's ceiling loops:
#: ``error_model="numpy"`` gives IEEE division, with no zero check that keeps a loop scalar.
KERNEL_OPTIONS = {"fastmath": FASTMATH, "error_model": "numpy"}
