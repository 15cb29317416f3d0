"""fastrms: fused, in-place optimizer steps (RMSProp, AdaGrad, Adam/AdamW/AMSGrad, SGD, Lion).

Quick use::

    import numpy as np, fastrms
    p = np.zeros(10**7, np.float32)
    opt = fastrms.RMSProp(p, lr=1e-2)
    opt.step(grad)          # p is updated in place, at memory speed

Importing fastrms compiles nothing and imports neither numba nor CUDA; the kernels compile on
first use and are cached on disk.
"""

from . import functional
from .dispatch import BackendInfo, backends
from .errors import BackendUnavailableError, FallbackWarning, ThreadingLayerWarning
from .optim import SGD, AdaGrad, Adam, AdamW, Lion, Optimizer, RMSProp

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "AdaGrad",
    "Adam",
    "AdamW",
    "BackendInfo",
    "BackendUnavailableError",
    "FallbackWarning",
    "Lion",
    "Optimizer",
    "RMSProp",
    "ThreadingLayerWarning",
    "backends",
    "functional",
]
