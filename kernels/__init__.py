"""Numba kernels for fastrms, installed as the subpackage ``fastrms.kernels``.

- :mod:`fastrms.kernels.rules` holds each optimizer's per-element math, written once.
- :mod:`fastrms.kernels.elementwise` generates every loop around a rule, from the rule, its
  flags and its precision signature: the CPU ``prange``/serial loops for one array or a table
  of many, the C function for another library's thread team, and the CUDA kernels.
- :mod:`fastrms.kernels.cpu` and :mod:`fastrms.kernels.cuda` choose and launch them.
- :mod:`fastrms.kernels.pointers` and :mod:`fastrms.kernels.cuda_pointers` turn addresses back
  into arrays inside a kernel.

Importing this package imports numba but compiles nothing.
"""

from ._options import use_cache_dir

use_cache_dir()  # before any kernel module turns Numba's cache on
