"""fastrms: fused, in-place optimizer steps (RMSProp, AdaGrad, Adam/AdamW/AMSGrad, SGD, Lion,
Adamax, NAdam, RAdam, Adadelta).

Quick use::

    import numpy as np, fastrms
    p = np.zeros(10**7, np.float32)
    opt = fastrms.RMSProp(p, lr=1e-2)
    opt.step(grad)          # p is updated in place, at memory speed

Importing fastrms compiles nothing and imports neither numba nor CUDA; the kernels compile on
first use and are cached on disk.
"""

# The names below are re-exported (``__all__`` is computed, so they are aliased to say so).
from . import functional as functional
from .dispatch import BackendInfo as BackendInfo
from .dispatch import backends as backends
from .errors import BackendUnavailableError as BackendUnavailableError
from .errors import FallbackWarning as FallbackWarning
from .errors import ThreadingLayerWarning as ThreadingLayerWarning
from .optim import OPTIMIZERS
from .optim import Optimizer as Optimizer

__version__ = "0.1.0"

# Every optimizer class, one per spec (fastrms.specs.SPECS): RMSProp, Adam, ... by name.
globals().update({cls.__name__: cls for cls in OPTIMIZERS.values()})

__all__ = sorted(
    [
        "BackendInfo",
        "BackendUnavailableError",
        "FallbackWarning",
        "Optimizer",
        "ThreadingLayerWarning",
        "backends",
        "functional",
        *(cls.__name__ for cls in OPTIMIZERS.values()),
    ]
)
