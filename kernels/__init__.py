"""Numba kernels for fastrms, installed as the subpackage ``fastrms.kernels``.

- :mod:`fastrms.kernels.rules` holds each optimizer's per-element math, written once.
- :mod:`fastrms.kernels.cpu` turns a rule into a ``prange`` loop.
- :mod:`fastrms.kernels.cuda` turns the same rule into a grid-stride CUDA kernel.

Importing this package imports numba but compiles nothing.
"""

from ._options import use_cache_dir

use_cache_dir()  # before any kernel module turns Numba's cache on
