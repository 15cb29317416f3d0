"""The optimizers, declared: one :class:`~fastrms.spec_types.Layout` and one
:class:`~fastrms.spec_types.Spec` each, with the host function of its step's scalars.

A :class:`Layout` names what an optimizer's per-element rule takes (state arrays, scalars and
flags, in the order the rule indexes them); a :class:`Spec` is the optimizer as users see it
(options, defaults, checks, class names, docs, torch's face). The machinery is in
:mod:`fastrms.spec_types`, re-exported here.

Adding an optimizer means writing its rule (kernels/rules.py), its reference
(fastrms/reference.py), a :class:`Layout` and a :class:`Spec` here, its documentation and its
tests; nothing else lists optimizers by hand.

Nothing here imports numba.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from typing import Any

import numpy as np

from . import hyper
from .spec_types import (  # noqa: F401  (re-exported: the names the rest of fastrms imports)
    F32_MAX,
    F32_TINY,
    Layout,
    Option,
    Setup,
    Slot,
    Spec,
    TorchFace,
    check_fits_float32,
)


def _sign(maximize: bool) -> float:
    return -1.0 if maximize else 1.0


def _betas(name: str, b) -> tuple[float, float]:
    return hyper.betas(name, b)


# -- the layouts: what each kernel rule takes ---------------------------------------------------

LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout(
            "rmsprop",
            (Slot("square_avg", sign="unsigned"), "momentum_buffer", "grad_avg"),
            {"lr": "lr", "alpha": "alpha", "one_minus_alpha": "1 - alpha", "eps": "eps",
             "weight_decay": "weight_decay", "sign": "sign", "momentum": "momentum"},
            ("centered", "use_momentum", "eps_in_sqrt"),
        ),
        Layout(
            "adagrad",
            (Slot("state_sum", sign="unsigned"),),
            {"clr": "lr / (1 + (step - 1) * lr_decay)", "eps": "eps",
             "weight_decay": "weight_decay", "sign": "sign"},
            ("eps_in_sqrt",),
        ),
        Layout(
            "adam",
            ("exp_avg", Slot("exp_avg_sq", sign="unsigned"),
             Slot("max_exp_avg_sq", sign="unsigned")),
            {"step_size": "lr / (1 - beta1**step)",
             "inv_bias_correction2_sqrt": "1 / sqrt(1 - beta2**step)",
             "beta1": "beta1", "one_minus_beta1": "1 - beta1", "beta2": "beta2",
             "one_minus_beta2": "1 - beta2", "eps": "eps", "weight_decay": "weight_decay",
             "decay": "1 - lr * weight_decay", "sign": "sign"},
            ("amsgrad",),
        ),
        Layout(
            "sgd",
            ("momentum_buffer",),
            {"lr": "lr", "weight_decay": "weight_decay", "sign": "sign",
             "momentum": "momentum (0 on step 1)", "grad_scale": "1 - dampening (1 on step 1)",
             "nesterov_momentum": "momentum"},
            ("use_momentum", "nesterov"),
        ),
        Layout(
            "lion",
            ("exp_avg",),
            {"lr": "lr", "beta1": "beta1", "one_minus_beta1": "1 - beta1", "beta2": "beta2",
             "one_minus_beta2": "1 - beta2", "decay": "1 - lr * weight_decay", "sign": "sign"},
            (),
        ),
        Layout(
            "adamax",
            ("exp_avg", Slot("exp_inf", sign="unsigned")),
            {"clr": "lr / (1 - beta1**step)", "beta1": "beta1", "one_minus_beta1": "1 - beta1",
             "beta2": "beta2", "eps": "eps", "weight_decay": "weight_decay", "sign": "sign"},
            (),
        ),
        Layout(
            "adadelta",
            (Slot("square_avg", sign="unsigned"), Slot("acc_delta", sign="unsigned")),
            {"lr": "lr", "rho": "rho", "one_minus_rho": "1 - rho", "eps": "eps",
             "weight_decay": "weight_decay", "sign": "sign"},
            (),
        ),
        Layout(
            "radam",
            ("exp_avg", Slot("exp_avg_sq", sign="unsigned")),
            {"step_size": "lr * rect / (1 - beta1**step) (rect = 1 unless rectified)",
             "bias_correction2_sqrt": "sqrt(1 - beta2**step)",
             "beta1": "beta1", "one_minus_beta1": "1 - beta1", "beta2": "beta2",
             "one_minus_beta2": "1 - beta2", "eps": "eps", "weight_decay": "weight_decay",
             "decay": "1 - lr * weight_decay", "sign": "sign"},
            ("rectify",),
        ),
        Layout(
            "nadam",
            ("exp_avg", Slot("exp_avg_sq", sign="unsigned")),
            {"grad_step": "lr * (1 - mu_t) / (1 - mu_product_t)",
             "exp_avg_step": "lr * mu_(t+1) / (1 - mu_product_t * mu_(t+1))",
             "bias_correction2": "1 - beta2**step", "beta1": "beta1",
             "one_minus_beta1": "1 - beta1", "beta2": "beta2", "one_minus_beta2": "1 - beta2",
             "eps": "eps", "weight_decay": "weight_decay", "decay": "1 - lr * weight_decay"},
            ("maximize",),
        ),
    )
}  # fmt: skip


# -- the optimizers -----------------------------------------------------------------------------


def _rmsprop(step, *, lr, alpha, eps, weight_decay, momentum, centered, eps_in_sqrt, maximize):
    use_momentum = momentum > 0
    scalars = dict(
        lr=lr, alpha=alpha, one_minus_alpha=1 - alpha, eps=eps, weight_decay=weight_decay,
        sign=_sign(maximize), momentum=momentum,
    )  # fmt: skip
    flags = dict(centered=centered, use_momentum=use_momentum, eps_in_sqrt=eps_in_sqrt)
    state = ("square_avg",) + ("momentum_buffer",) * use_momentum + ("grad_avg",) * centered
    return scalars, flags, state


def _adagrad(step, *, lr, lr_decay, weight_decay, eps, eps_in_sqrt, maximize):
    clr = lr / (1 + (step - 1) * lr_decay)
    scalars = dict(clr=clr, eps=eps, weight_decay=weight_decay, sign=_sign(maximize))
    return scalars, dict(eps_in_sqrt=eps_in_sqrt), ("state_sum",)


def _adam(step, *, lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay, maximize):
    beta1, beta2 = betas
    scalars = dict(
        step_size=lr / (1 - beta1**step),
        inv_bias_correction2_sqrt=1 / math.sqrt(1 - beta2**step),
        beta1=beta1, one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2,
        eps=eps,
        weight_decay=0.0 if decoupled_weight_decay else weight_decay,
        decay=1 - lr * weight_decay if decoupled_weight_decay else 1.0,
        sign=_sign(maximize),
    )  # fmt: skip
    state = ("exp_avg", "exp_avg_sq") + ("max_exp_avg_sq",) * amsgrad
    return scalars, dict(amsgrad=amsgrad), state


def _sgd(step, *, lr, momentum, dampening, weight_decay, nesterov, maximize):
    if nesterov and (momentum == 0 or dampening != 0):
        raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
    first = step == 1  # PyTorch starts the buffer at the gradient itself: b = 0*b + 1*g
    scalars = dict(
        lr=lr, weight_decay=weight_decay, sign=_sign(maximize),
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
        decay=1 - lr * weight_decay, sign=_sign(maximize),
    )  # fmt: skip
    return scalars, {}, ("exp_avg",)


_LR = Option("lr", 1e-2, hyper.nonneg)
_MAXIMIZE = Option("maximize", False, hyper.flag)
_WEIGHT_DECAY = Option("weight_decay", 0.0, hyper.nonneg, example=0.1)

RMSPROP = Spec(
    "rmsprop",
    LAYOUTS["rmsprop"],
    (
        _LR,
        Option("alpha", 0.99, lambda n, x: hyper.real(n, x, 0.0, 1.0)),
        Option("eps", 1e-8, hyper.positive),
        _WEIGHT_DECAY,
        Option("momentum", 0.0, hyper.nonneg, example=0.9),
        Option("centered", False, hyper.flag),
        Option("eps_in_sqrt", False, hyper.flag),
        _MAXIMIZE,
    ),
    _rmsprop,
    counts_steps=False,
    title="RMSProp",
)

ADAGRAD = Spec(
    "adagrad",
    LAYOUTS["adagrad"],
    (
        _LR,
        Option("lr_decay", 0.0, hyper.nonneg, example=0.01),
        _WEIGHT_DECAY,
        Option("initial_accumulator_value", 0.0, hyper.nonneg, kind="init", example=0.1),
        Option("eps", 1e-10, hyper.positive),
        Option("eps_in_sqrt", False, hyper.flag),
        _MAXIMIZE,
    ),
    _adagrad,
    initial={"state_sum": "initial_accumulator_value"},
    title="AdaGrad",
)

ADAM = Spec(
    "adam",
    LAYOUTS["adam"],
    (
        Option("lr", 1e-3, hyper.nonneg),
        Option("betas", (0.9, 0.999), _betas),
        Option("eps", 1e-8, hyper.positive),
        _WEIGHT_DECAY,
        Option("amsgrad", False, hyper.flag),
        _MAXIMIZE,
        Option("decoupled_weight_decay", False, hyper.flag, kind="fixed"),
    ),
    _adam,
    title="Adam",
)

#: AdamW (Loshchilov & Hutter 2019) is Adam with decoupled weight decay, default 1e-2.
ADAMW = replace(
    ADAM.variant("adamw", weight_decay=1e-2, decoupled_weight_decay=True), title="AdamW"
)

SGD = Spec(
    "sgd",
    LAYOUTS["sgd"],
    (
        Option("lr", 1e-3, hyper.nonneg),
        Option("momentum", 0.0, hyper.nonneg, example=0.9),
        Option("dampening", 0.0, lambda n, x: hyper.real(n, x, 0.0, 1.0), example=0.5),
        _WEIGHT_DECAY,
        Option("nesterov", False, hyper.flag),
        _MAXIMIZE,
    ),
    _sgd,
    title="SGD",
)

#: Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), with the
#: defaults of the paper's reference code and of Optax: lr 1e-4, betas (0.9, 0.99).
LION = Spec(
    "lion",
    LAYOUTS["lion"],
    (
        Option("lr", 1e-4, hyper.nonneg),
        Option("betas", (0.9, 0.99), _betas),
        _WEIGHT_DECAY,
        _MAXIMIZE,
    ),
    _lion,
    counts_steps=False,
    title="Lion",
)


def _adamax(step, *, lr, betas, eps, weight_decay, maximize):
    beta1, beta2 = betas
    scalars = dict(
        clr=lr / (1 - beta1**step), beta1=beta1, one_minus_beta1=1 - beta1, beta2=beta2,
        eps=eps, weight_decay=weight_decay, sign=_sign(maximize),
    )  # fmt: skip
    return scalars, {}, ("exp_avg", "exp_inf")


#: torch's arguments that fastrms accepts and ignores (foreach) or refuses when True.
_TORCH_EXTRA = dict(foreach=None, capturable=False, differentiable=False)

#: Adamax (Kingma & Ba 2015, section 7.1), torch.optim.Adamax's semantics and defaults.
ADAMAX = Spec(
    "adamax",
    LAYOUTS["adamax"],
    (
        Option("lr", 2e-3, hyper.nonneg),
        Option("betas", (0.9, 0.999), _betas),
        Option("eps", 1e-8, hyper.positive),
        _WEIGHT_DECAY,
        _MAXIMIZE,
    ),
    _adamax,
    title="Adamax",
    doc="""Adamax (Kingma & Ba 2015, section 7.1: Adam with the infinity norm), PyTorch's
    defaults and semantics (``torch.optim.Adamax``), L2 weight decay.

    ::

        g = grad (or -grad if maximize) + weight_decay * p
        m = beta1 * m + (1 - beta1) * g                       (exp_avg)
        u = max(beta2 * u, |g| + eps)                          (exp_inf)
        p = p - lr / (1 - beta1**t) * m / u
    """,
    option_doc="""
    lr, betas, eps, weight_decay, maximize
        As ``torch.optim.Adamax``, same defaults: 2e-3, (0.9, 0.999), 1e-8, 0, False.
        ``eps`` must be > 0.
    """,
    torch=TorchFace(
        "Adamax",
        ("lr", "betas", "eps", "weight_decay", "foreach"),
        ("maximize", "differentiable", "capturable"),
        _TORCH_EXTRA,
    ),
)


def _adadelta(step, *, lr, rho, eps, weight_decay, maximize):
    scalars = dict(
        lr=lr, rho=rho, one_minus_rho=1 - rho, eps=eps, weight_decay=weight_decay,
        sign=_sign(maximize),
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
        _WEIGHT_DECAY,
        _MAXIMIZE,
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
        _TORCH_EXTRA,
    ),
)


def _radam(step, *, lr, betas, eps, weight_decay, decoupled_weight_decay, maximize):
    beta1, beta2 = betas
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    # The length of the approximated simple moving average, and its limit (torch's names).
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
    rectify = rho_t > 5.0
    rect = 1.0
    if rectify:
        rect = (
            (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        ) ** 0.5
    scalars = dict(
        step_size=lr * rect / bias_correction1, bias_correction2_sqrt=bias_correction2**0.5,
        beta1=beta1, one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2,
        eps=eps,
        weight_decay=0.0 if decoupled_weight_decay else weight_decay,
        decay=1 - lr * weight_decay if decoupled_weight_decay else 1.0,
        sign=_sign(maximize),
    )  # fmt: skip
    return scalars, dict(rectify=rectify), ("exp_avg", "exp_avg_sq")


#: RAdam (Liu et al. 2020), torch.optim.RAdam's semantics and defaults.
RADAM = Spec(
    "radam",
    LAYOUTS["radam"],
    (
        Option("lr", 1e-3, hyper.nonneg),
        Option("betas", (0.9, 0.999), _betas),
        Option("eps", 1e-8, hyper.positive),
        _WEIGHT_DECAY,
        Option("decoupled_weight_decay", False, hyper.flag),
        _MAXIMIZE,
    ),
    _radam,
    title="RAdam",
    doc="""RAdam (Liu et al. 2020, "On the Variance of the Adaptive Learning Rate and
    Beyond"), PyTorch's defaults and semantics (``torch.optim.RAdam``).

    ::

        decoupled_weight_decay:  p = (1 - lr * weight_decay) * p
        g = grad (or -grad if maximize) + weight_decay * p      (L2 decay: not decoupled)
        m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g**2
        rho_inf = 2 / (1 - beta2) - 1;   rho_t = rho_inf - 2 t beta2**t / (1 - beta2**t)
        rho_t > 5:  rect = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
                    p = p - lr * rect / (1 - beta1**t) * m * sqrt(1 - beta2**t) / (sqrt(v) + eps)
        else:       p = p - lr / (1 - beta1**t) * m          (momentum SGD while v is unreliable)
    """,
    option_doc="""
    lr, betas, eps, weight_decay, maximize
        As ``torch.optim.RAdam``, same defaults: 1e-3, (0.9, 0.999), 1e-8, 0, False.
        ``eps`` must be > 0.
    decoupled_weight_decay : bool
        Decay ``p`` directly, as AdamW does, instead of adding ``weight_decay * p`` to the
        gradient.
    """,
    torch=TorchFace(
        "RAdam",
        ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay"),
        ("foreach", "maximize", "capturable", "differentiable"),
        _TORCH_EXTRA,
    ),
)


def _nadam_mu(step: int, beta1: float, momentum_decay: float) -> float:
    """NAdam's momentum coefficient of step ``step`` (Dozat 2016; torch's schedule)."""
    return beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))


@functools.lru_cache(maxsize=64)
def _mu_products(beta1: float, momentum_decay: float) -> list[float]:
    """The running products of mu, by step (index 0: 1.0), extended as steps need them."""
    return [1.0]


def nadam_mu_product(step: int, *, betas, momentum_decay: float, **_: Any) -> float:
    """``mu_1 * ... * mu_step`` as torch.optim.NAdam keeps it: a float32 tensor multiplied by
    each step's mu in turn (``mu_product *= mu``), so in float32 arithmetic. Computing it
    the same way lets ``fastrms.torch.NAdam`` write torch's value into its state and take
    torch's steps exactly. It reaches 0 in float32 after some hundreds of steps (mu <= beta1)
    and stays there; until then each (beta1, momentum_decay) keeps its list of products."""
    beta1 = betas[0]
    products = _mu_products(beta1, momentum_decay)
    while len(products) <= step:
        if products[-1] == 0.0:
            return 0.0
        mu = _nadam_mu(len(products), beta1, momentum_decay)
        products.append(float(np.float32(products[-1]) * np.float32(mu)))
    return products[step]


def _nadam(step, *, lr, betas, eps, weight_decay, momentum_decay, decoupled_weight_decay, maximize):
    beta1, beta2 = betas
    mu = _nadam_mu(step, beta1, momentum_decay)
    mu_next = _nadam_mu(step + 1, beta1, momentum_decay)
    mu_product = nadam_mu_product(step, betas=betas, momentum_decay=momentum_decay)
    mu_product_next = mu_product * mu_next
    scalars = dict(
        grad_step=lr * (1.0 - mu) / (1.0 - mu_product),
        exp_avg_step=lr * mu_next / (1.0 - mu_product_next),
        bias_correction2=1 - beta2**step,
        beta1=beta1, one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2,
        eps=eps,
        weight_decay=0.0 if decoupled_weight_decay else weight_decay,
        decay=1 - lr * weight_decay if decoupled_weight_decay else 1.0,
    )  # fmt: skip
    return scalars, dict(maximize=maximize), ("exp_avg", "exp_avg_sq")


#: NAdam (Dozat 2016), torch.optim.NAdam's semantics and defaults.
NADAM = Spec(
    "nadam",
    LAYOUTS["nadam"],
    (
        Option("lr", 2e-3, hyper.nonneg),
        Option("betas", (0.9, 0.999), _betas),
        Option("eps", 1e-8, hyper.positive),
        _WEIGHT_DECAY,
        Option("momentum_decay", 4e-3, hyper.nonneg, example=4e-3),
        Option("decoupled_weight_decay", False, hyper.flag),
        _MAXIMIZE,
    ),
    _nadam,
    title="NAdam",
    doc="""NAdam (Dozat 2016, "Incorporating Nesterov Momentum into Adam"), PyTorch's
    defaults and semantics (``torch.optim.NAdam``).

    ::

        decoupled_weight_decay:  p = (1 - lr * weight_decay) * p
        g = grad (or -grad if maximize) + weight_decay * p      (L2 decay: not decoupled)
        mu_t = beta1 * (1 - 0.5 * 0.96**(t * momentum_decay));   P_t = mu_1 * ... * mu_t
        m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g**2
        d = sqrt(v / (1 - beta2**t)) + eps
        p = p - lr * (1 - mu_t) / (1 - P_t) * g / d
        p = p - lr * mu_(t+1) / (1 - P_t * mu_(t+1)) * m / d

    ``P_t`` is computed from the step count as torch keeps it (``mu_product``, a float32
    running product).
    """,
    option_doc="""
    lr, betas, eps, weight_decay, momentum_decay, maximize
        As ``torch.optim.NAdam``, same defaults: 2e-3, (0.9, 0.999), 1e-8, 0, 4e-3, False.
        ``eps`` must be > 0.
    decoupled_weight_decay : bool
        Decay ``p`` directly, as AdamW does (NAdamW), instead of adding
        ``weight_decay * p`` to the gradient.
    """,
    torch=TorchFace(
        "NAdam",
        ("lr", "betas", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay"),
        ("foreach", "maximize", "capturable", "differentiable"),
        _TORCH_EXTRA,
        scalar_state={"mu_product": nadam_mu_product},
    ),
)

SPECS = {
    s.name: s for s in (RMSPROP, ADAGRAD, ADAM, ADAMW, SGD, LION, ADAMAX, ADADELTA, RADAM, NADAM)
}

#: The most scalars and state slots of any rule, derived from the layouts (nothing is sized by
#: hand: each kernel takes its own rule's counts).
MAX_SCALARS = max(len(layout.scalars) for layout in LAYOUTS.values())
MAX_SLOTS = max(len(layout.slots) for layout in LAYOUTS.values())
