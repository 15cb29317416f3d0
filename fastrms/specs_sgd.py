"""The specs of SGD and the methods that scale or sign its step per coordinate: SGD (momentum,
Nesterov), Lion, RMSProp, AdaGrad and Adadelta (each a :class:`~fastrms.spec_types.Spec`,
with the host function of its step's scalars).

:mod:`fastrms.specs` collects them; the layouts their rules take are in
:mod:`fastrms.spec_layouts`.
"""

from __future__ import annotations

from typing import Any

from . import hyper
from .spec_layouts import LAYOUTS
from .spec_types import (
    MAXIMIZE,
    TORCH_EXTRA,
    WEIGHT_DECAY,
    Option,
    Spec,
    TorchFace,
    betas_of,
    maximize_sign,
)

#: RMSProp's and AdaGrad's learning rate (torch's default for both).
_LR = Option("lr", 1e-2, hyper.nonneg)


def _rmsprop(step, *, lr, alpha, eps, weight_decay, momentum, centered, eps_in_sqrt, maximize):
    use_momentum = momentum > 0
    scalars = dict(
        lr=lr, alpha=alpha, one_minus_alpha=1 - alpha, eps=eps, weight_decay=weight_decay,
        sign=maximize_sign(maximize), momentum=momentum,
    )  # fmt: skip
    flags = dict(centered=centered, use_momentum=use_momentum, eps_in_sqrt=eps_in_sqrt)
    state = ("square_avg",) + ("momentum_buffer",) * use_momentum + ("grad_avg",) * centered
    return scalars, flags, state


def _adagrad(step, *, lr, lr_decay, weight_decay, eps, eps_in_sqrt, maximize):
    clr = lr / (1 + (step - 1) * lr_decay)
    scalars = dict(clr=clr, eps=eps, weight_decay=weight_decay, sign=maximize_sign(maximize))
    return scalars, dict(eps_in_sqrt=eps_in_sqrt), ("state_sum",)


def _sgd(step, *, lr, momentum, dampening, weight_decay, nesterov, maximize):
    if nesterov and (momentum == 0 or dampening != 0):
        raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
    first = step == 1  # PyTorch starts the buffer at the gradient itself: b = 0*b + 1*g
    scalars = dict(
        lr=lr, weight_decay=weight_decay, sign=maximize_sign(maximize),
        momentum=0.0 if first else momentum, grad_scale=1.0 if first else 1 - dampening,
        nesterov_momentum=momentum,
    )  # fmt: skip
    use_momentum = momentum > 0
    flags = dict(use_momentum=use_momentum, nesterov=nesterov)
    return scalars, flags, ("momentum_buffer",) * use_momentum


def _lion(step, *, lr, betas, weight_decay, maximize):
    beta1, beta2 = betas
    scalars = dict(
        lr=lr, beta1=beta1, one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2,
        decay=1 - lr * weight_decay, sign=maximize_sign(maximize),
    )  # fmt: skip
    return scalars, {}, ("exp_avg",)


RMSPROP = Spec(
    "rmsprop",
    LAYOUTS["rmsprop"],
    (
        _LR,
        Option("alpha", 0.99, lambda n, x: hyper.real(n, x, 0.0, 1.0)),
        Option("eps", 1e-8, hyper.positive),
        WEIGHT_DECAY,
        Option("momentum", 0.0, hyper.nonneg, example=0.9),
        Option("centered", False, hyper.flag),
        Option("eps_in_sqrt", False, hyper.flag),
        MAXIMIZE,
    ),
    _rmsprop,
    counts_steps=False,
    title="RMSProp",
    doc="""RMSProp, PyTorch's defaults and semantics (``torch.optim.RMSprop``); eps inside the
    sqrt on request.

    ::

        g = grad (or -grad if maximize) + weight_decay * p
        v = alpha * v + (1 - alpha) * g**2                                   (square_avg)
        centered:  m = alpha * m + (1 - alpha) * g;  v_hat = v - m**2        (grad_avg)
        d = sqrt(v_hat) + eps             (PyTorch; eps_in_sqrt=False)
        d = sqrt(v_hat + eps)             (TF/Keras, Optax, tutorials; eps_in_sqrt=True)
        momentum > 0:  b = momentum * b + g / d;  p = p - lr * b             (momentum_buffer)
        else:          p = p - lr * g / d

    ``graves`` is Chainer's ``RMSpropGraves`` preset (centered, momentum, eps in the sqrt).
    """,
    option_doc="""
    lr, alpha, eps, weight_decay, momentum, centered, maximize
        As ``torch.optim.RMSprop``, same defaults: 1e-2, 0.99, 1e-8, 0, 0, False, False.
        ``eps`` must be > 0 and ``alpha`` in [0, 1].
    eps_in_sqrt : bool
        Put eps inside the square root. Not in PyTorch (pytorch issue 23796).
    """,
    torch=TorchFace(
        "RMSprop",
        (
            "lr",
            "alpha",
            "eps",
            "weight_decay",
            "momentum",
            "centered",
            "capturable",
            "foreach",
            "maximize",
            "differentiable",
        ),
        ("eps_in_sqrt",),
        TORCH_EXTRA,
    ),  # fmt: skip
)


ADAGRAD = Spec(
    "adagrad",
    LAYOUTS["adagrad"],
    (
        _LR,
        Option("lr_decay", 0.0, hyper.nonneg, example=0.01),
        WEIGHT_DECAY,
        Option("initial_accumulator_value", 0.0, hyper.nonneg, kind="init", example=0.1),
        Option("eps", 1e-10, hyper.positive),
        Option("eps_in_sqrt", False, hyper.flag),
        MAXIMIZE,
    ),
    _adagrad,
    initial={"state_sum": "initial_accumulator_value"},
    title="AdaGrad",
    doc="""AdaGrad, PyTorch's defaults and semantics (``torch.optim.Adagrad``); eps inside the
    sqrt on request.

    ::

        g = grad (or -grad if maximize) + weight_decay * p
        clr = lr / (1 + (t - 1) * lr_decay)
        s = s + g**2                   (state_sum, torch's sum; starts at initial_accumulator_value)
        p = p - clr * g / (sqrt(s) + eps)    or, with eps_in_sqrt:  p - clr * g / sqrt(s + eps)

    Keras and Optax put eps inside the sqrt and start at 0.1:
    ``initial_accumulator_value=0.1, eps=1e-7, eps_in_sqrt=True``.
    """,
    option_doc="""
    lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize
        As ``torch.optim.Adagrad``, same defaults: 1e-2, 0, 0, 0, 1e-10, False. ``eps`` must
        be > 0.
    eps_in_sqrt : bool
        Put eps inside the square root (Keras, Optax).
    """,
    torch=TorchFace(
        "Adagrad",
        ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps", "foreach"),
        ("maximize", "differentiable", "fused", "eps_in_sqrt"),
        {"foreach": None, "differentiable": False, "fused": None},
        renames={"state_sum": "sum"},
        eager_state=True,
    ),
)


SGD = Spec(
    "sgd",
    LAYOUTS["sgd"],
    (
        Option("lr", 1e-3, hyper.nonneg),
        Option("momentum", 0.0, hyper.nonneg, example=0.9),
        Option("dampening", 0.0, lambda n, x: hyper.real(n, x, 0.0, 1.0), example=0.5),
        WEIGHT_DECAY,
        Option("nesterov", False, hyper.flag),
        MAXIMIZE,
    ),
    _sgd,
    title="SGD",
    doc="""SGD with optional momentum, dampening and Nesterov momentum, PyTorch's defaults and
    semantics (``torch.optim.SGD``).

    ::

        g = grad (or -grad if maximize) + weight_decay * p
        momentum > 0:  b = momentum * b + (1 - dampening) * g      (momentum_buffer; step 1: b = g)
                       g = g + momentum * b  (nesterov)   or   g = b
        p = p - lr * g

    With ``nesterov=True`` the parameter is the look-ahead point ``x + momentum * v`` of
    Sutskever et al. (2013), ``v = momentum * v - lr * grad(x + momentum * v); x = x + v``.
    As in torch, there is no ``step`` state.
    """,
    option_doc="""
    lr, momentum, dampening, weight_decay, nesterov, maximize
        As ``torch.optim.SGD``, same defaults: 1e-3, 0, 0, 0, False, False. ``nesterov``
        needs momentum > 0 and dampening 0.
    """,
    torch=TorchFace(
        "SGD",
        ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
        ("maximize", "foreach", "differentiable", "fused"),
        {"foreach": None, "differentiable": False, "fused": None},
        keeps_step=False,
    ),
)

#: Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), with the
#: defaults of the paper's reference code and of Optax: lr 1e-4, betas (0.9, 0.99).
LION = Spec(
    "lion",
    LAYOUTS["lion"],
    (
        Option("lr", 1e-4, hyper.nonneg),
        Option("betas", (0.9, 0.99), betas_of),
        WEIGHT_DECAY,
        MAXIMIZE,
    ),
    _lion,
    counts_steps=False,
    title="Lion",
    doc="""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), as in the
    paper's code, Optax's ``lion`` and the ``lion-pytorch`` package; decoupled weight decay.

    ::

        g = grad (or -grad if maximize)
        c = beta1 * m + (1 - beta1) * g
        p = (1 - lr * weight_decay) * p - lr * sign(c)
        m = beta2 * m + (1 - beta2) * g                                  (exp_avg)

    Every element moves by exactly ``lr`` (plus decay): the paper advises a learning rate
    3-10x smaller than AdamW's and a weight decay 3-10x larger. One state array, so a step
    moves 20 bytes per float32 element, against Adam's 28. torch has no Lion.
    """,
    option_doc="""
    lr : float
        Default 1e-4.
    betas : (float, float)
        Default ``(0.9, 0.99)``.
    weight_decay : float
        Decoupled decay rate, default 0.
    maximize : bool
    """,
    torch=TorchFace(
        "Lion",
        ("lr", "betas", "weight_decay"),
        ("maximize",),
        keeps_step=False,
        origin="the ``lion-pytorch`` package",
    ),  # fmt: skip
)


def _adadelta(step, *, lr, rho, eps, weight_decay, maximize):
    scalars = dict(
        lr=lr, rho=rho, one_minus_rho=1 - rho, eps=eps, weight_decay=weight_decay,
        sign=maximize_sign(maximize),
    )  # fmt: skip
    return scalars, {}, ("square_avg", "acc_delta")


#: Adadelta (Zeiler 2012), torch.optim.Adadelta's semantics and defaults.
ADADELTA = Spec(
    "adadelta",
    LAYOUTS["adadelta"],
    (
        Option("lr", 1.0, hyper.nonneg),
        Option("rho", 0.9, lambda n, x: hyper.real(n, x, 0.0, 1.0)),
        Option("eps", 1e-6, hyper.positive),
        WEIGHT_DECAY,
        MAXIMIZE,
    ),
    _adadelta,
    counts_steps=False,
    title="Adadelta",
    doc="""Adadelta (Zeiler 2012, "ADADELTA: An Adaptive Learning Rate Method"), PyTorch's
    defaults and semantics (``torch.optim.Adadelta``), L2 weight decay.

    ::

        g = grad (or -grad if maximize) + weight_decay * p
        v = rho * v + (1 - rho) * g**2                         (square_avg)
        delta = sqrt(u + eps) / sqrt(v + eps) * g
        u = rho * u + (1 - rho) * delta**2                     (acc_delta)
        p = p - lr * delta

    The step size adapts from the ratio of the two running averages: ``lr`` (default 1) only
    scales it.
    """,
    option_doc="""
    lr, rho, eps, weight_decay, maximize
        As ``torch.optim.Adadelta``, same defaults: 1.0, 0.9, 1e-6, 0, False. ``rho`` is in
        [0, 1]; ``eps`` must be > 0.
    """,
    torch=TorchFace(
        "Adadelta",
        ("lr", "rho", "eps", "weight_decay", "foreach"),
        ("capturable", "maximize", "differentiable"),
        TORCH_EXTRA,
    ),
)


def rmsprop_graves(
    cls: type,
    params: Any,
    lr: float = 1e-4,
    alpha: float = 0.95,
    momentum: float = 0.9,
    eps: float = 1e-4,
    **options: Any,
) -> Any:
    """Chainer's ``RMSpropGraves`` (Graves 2013, eq. 38-41), with its defaults: ``cls``
    (an RMSProp class of any frontend, whose ``graves`` classmethod this is) made centered,
    with momentum and eps inside the sqrt.

    ::

        v = alpha * v + (1 - alpha) * g**2;   m = alpha * m + (1 - alpha) * g
        delta = momentum * delta - lr * g / sqrt(v - m**2 + eps);   p = p + delta

    This is centered RMSProp with eps inside the sqrt and momentum: ``b = -delta / lr``,
    so the two agree exactly while ``lr`` is constant. With a changing ``lr``, Chainer
    keeps the past learning rates in ``delta``; fastrms (like PyTorch) applies the current
    one to the whole buffer.
    """
    return cls(
        params, lr=lr, alpha=alpha, eps=eps, momentum=momentum, centered=True,
        eps_in_sqrt=True, **options,
    )  # fmt: skip
