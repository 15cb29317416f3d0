"""The optimizer settings of the demos: which optimizers each runs, and at what learning rate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ...optim import SGD, AdaGrad, Adam, Optimizer, RMSProp

OptimizerFactory = Callable[[np.ndarray, float], Optimizer]


@dataclass(frozen=True)
class OptimizerSpec:
    """A named optimizer setting: ``make(params, lr)`` builds it."""

    name: str
    label: str
    settings: str
    make: OptimizerFactory


def _specs(*specs: OptimizerSpec) -> dict[str, OptimizerSpec]:
    return {s.name: s for s in specs}


def _sci(x: float) -> str:
    return np.format_float_scientific(x, trim="-", exp_digits=1)


def _rmsprop(name: str, eps: float, eps_in_sqrt: bool) -> OptimizerSpec:
    where = "in sqrt" if eps_in_sqrt else "outside"
    return OptimizerSpec(
        name,
        f"RMSProp, eps {where}",
        f"alpha=0.9, eps={_sci(eps)} {'inside' if eps_in_sqrt else 'outside'} the sqrt",
        lambda p, lr: RMSProp(p, lr=lr, alpha=0.9, eps=eps, eps_in_sqrt=eps_in_sqrt),
    )


_SGD = OptimizerSpec("sgd", "SGD", "no momentum", lambda p, lr: SGD(p, lr=lr))
_MOMENTUM = OptimizerSpec(
    "momentum", "SGD + momentum", "momentum=0.9", lambda p, lr: SGD(p, lr=lr, momentum=0.9)
)
_NESTEROV = OptimizerSpec(
    "nesterov",
    "Nesterov",
    "momentum=0.9, nesterov=True",
    lambda p, lr: SGD(p, lr=lr, momentum=0.9, nesterov=True),
)
_ADAGRAD = OptimizerSpec("adagrad", "AdaGrad", "eps=1e-10", lambda p, lr: AdaGrad(p, lr=lr))
_ADAM = OptimizerSpec("adam", "Adam", "betas=(0.9, 0.999), eps=1e-8", lambda p, lr: Adam(p, lr=lr))
_GRAVES = OptimizerSpec(
    "graves",
    "RMSProp (Graves)",
    "alpha=0.95, momentum=0.9, eps=1e-4 inside the sqrt, centered",
    lambda p, lr: RMSProp.graves(p, lr=lr),
)

#: Optimizers of the regression demo (``--optimizer``); their learning rates: REGRESSION_LR.
REGRESSION_OPTIMIZERS = _specs(
    _rmsprop("rmsprop", 1e-8, eps_in_sqrt=True),
    _rmsprop("rmsprop-torch", 1e-8, eps_in_sqrt=False),
    _ADAM,
    _ADAGRAD,
    _SGD,
    _MOMENTUM,
    _NESTEROV,
    _GRAVES,
)
REGRESSION_LR = {
    "rmsprop": 0.1,
    "rmsprop-torch": 0.1,
    "adam": 0.2,
    "adagrad": 2.0,
    "sgd": 0.2,
    "momentum": 0.05,
    "nesterov": 0.05,
    "graves": 0.01,
}

#: Optimizers of the path demo, in legend order; their learning rates: PATH_LR.
PATH_OPTIMIZERS = _specs(
    _MOMENTUM,
    _NESTEROV,
    _ADAGRAD,
    _rmsprop("rmsprop", 1e-3, eps_in_sqrt=True),
    _rmsprop("rmsprop-torch", 1e-3, eps_in_sqrt=False),
    _ADAM,
    _GRAVES,
)
_ADAPTIVE_LR = {"adagrad": 0.5, "rmsprop": 1e-2, "rmsprop-torch": 1e-2, "adam": 0.1, "graves": 1e-3}
#: Learning rate of each path optimizer on each function. The adaptive methods are nearly
#: invariant to the gradient's scale and share one rate; SGD's follows the function's curvature.
PATH_LR: dict[str, dict[str, float]] = {
    "beale": {"momentum": 3e-3, "nesterov": 3e-3, **_ADAPTIVE_LR},
    "rosenbrock": {"momentum": 1e-3, "nesterov": 1e-3, **_ADAPTIVE_LR},
    "wavy": {"momentum": 1e-2, "nesterov": 1e-2, **_ADAPTIVE_LR},
}
