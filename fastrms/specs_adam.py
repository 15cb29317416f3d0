"""The specs of Adam and its descendants: Adam, AdamW, Adamax, RAdam and NAdam (each a
:class:`~fastrms.spec_types.Spec`, with the host function of its step's scalars).

:mod:`fastrms.specs` collects them; the layouts their rules take are in
:mod:`fastrms.spec_layouts`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from typing import Any

import numpy as np

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


def _adam_family(lr, betas, eps, weight_decay, decoupled_weight_decay) -> dict[str, float]:
    """The scalars Adam, RAdam and NAdam share: the moments' betas and ``1 - beta``, eps, and
    the weight decay as L2 (added to the gradient) or decoupled (``decay`` scales ``p``)."""
    beta1, beta2 = betas
    return dict(
        beta1=beta1, one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2,
        eps=eps,
        weight_decay=0.0 if decoupled_weight_decay else weight_decay,
        decay=1 - lr * weight_decay if decoupled_weight_decay else 1.0,
    )  # fmt: skip


def _adam(step, *, lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay, maximize):
    beta1, beta2 = betas
    scalars = dict(
        step_size=lr / (1 - beta1**step),
        inv_bias_correction2_sqrt=1 / math.sqrt(1 - beta2**step),
        **_adam_family(lr, betas, eps, weight_decay, decoupled_weight_decay),
        sign=maximize_sign(maximize),
    )  # fmt: skip
    state = ("exp_avg", "exp_avg_sq") + ("max_exp_avg_sq",) * amsgrad
    return scalars, dict(amsgrad=amsgrad), state


ADAM = Spec(
    "adam",
    LAYOUTS["adam"],
    (
        Option("lr", 1e-3, hyper.nonneg),
        Option("betas", (0.9, 0.999), betas_of),
        Option("eps", 1e-8, hyper.positive),
        WEIGHT_DECAY,
        Option("amsgrad", False, hyper.flag),
        MAXIMIZE,
        Option("decoupled_weight_decay", False, hyper.flag, kind="fixed"),
    ),
    _adam,
    title="Adam",
    doc="""Adam (and AMSGrad), PyTorch's defaults and semantics (``torch.optim.Adam``), L2
    weight decay.

    ::

        decoupled_weight_decay (AdamW):  p = (1 - lr * weight_decay) * p
        g = grad (or -grad if maximize) + weight_decay * p        (L2 decay: Adam only)
        m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g**2
        amsgrad:  v_max = max(v_max, v), used in place of v             (max_exp_avg_sq)
        p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)
    """,
    option_doc="""
    lr, betas, eps, weight_decay, amsgrad, maximize
        As ``torch.optim.Adam``, same defaults: 1e-3, (0.9, 0.999), 1e-8, 0, False, False.
        ``eps`` must be > 0.
    """,
    torch=TorchFace(
        "Adam",
        ("lr", "betas", "eps", "weight_decay", "amsgrad"),
        ("foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay"),
        {**TORCH_EXTRA, "fused": None},
    ),  # fmt: skip
)

#: AdamW (Loshchilov & Hutter 2019) is Adam with decoupled weight decay, default 1e-2.
ADAMW = replace(
    ADAM.variant("adamw", weight_decay=1e-2, decoupled_weight_decay=True),
    title="AdamW",
    doc="""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2019;
    ``torch.optim.AdamW``), default weight_decay 1e-2.

    ::

        p = (1 - lr * weight_decay) * p
        m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g**2   (g = grad)
        amsgrad:  v_max = max(v_max, v), used in place of v             (max_exp_avg_sq)
        p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)
    """,
    option_doc="""
    lr, betas, eps, weight_decay, amsgrad, maximize
        As ``torch.optim.AdamW``, same defaults: 1e-3, (0.9, 0.999), 1e-8, 1e-2, False,
        False. ``eps`` must be > 0.
    """,
    torch=TorchFace(
        "AdamW",
        ("lr", "betas", "eps", "weight_decay", "amsgrad"),
        ("maximize", "foreach", "capturable", "differentiable", "fused"),
        {**TORCH_EXTRA, "fused": None},
    ),
    base="adam",
)


def _adamax(step, *, lr, betas, eps, weight_decay, maximize):
    beta1, beta2 = betas
    scalars = dict(
        clr=lr / (1 - beta1**step), beta1=beta1, one_minus_beta1=1 - beta1, beta2=beta2,
        eps=eps, weight_decay=weight_decay, sign=maximize_sign(maximize),
    )  # fmt: skip
    return scalars, {}, ("exp_avg", "exp_inf")


#: Adamax (Kingma & Ba 2015, section 7.1), torch.optim.Adamax's semantics and defaults.
ADAMAX = Spec(
    "adamax",
    LAYOUTS["adamax"],
    (
        Option("lr", 2e-3, hyper.nonneg),
        Option("betas", (0.9, 0.999), betas_of),
        Option("eps", 1e-8, hyper.positive),
        WEIGHT_DECAY,
        MAXIMIZE,
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
        TORCH_EXTRA,
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
        **_adam_family(lr, betas, eps, weight_decay, decoupled_weight_decay),
        sign=maximize_sign(maximize),
    )  # fmt: skip
    return scalars, dict(rectify=rectify), ("exp_avg", "exp_avg_sq")


#: RAdam (Liu et al. 2020), torch.optim.RAdam's semantics and defaults.
RADAM = Spec(
    "radam",
    LAYOUTS["radam"],
    (
        Option("lr", 1e-3, hyper.nonneg),
        Option("betas", (0.9, 0.999), betas_of),
        Option("eps", 1e-8, hyper.positive),
        WEIGHT_DECAY,
        Option("decoupled_weight_decay", False, hyper.flag),
        MAXIMIZE,
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
        TORCH_EXTRA,
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
        **_adam_family(lr, betas, eps, weight_decay, decoupled_weight_decay),
    )  # fmt: skip
    return scalars, dict(maximize=maximize), ("exp_avg", "exp_avg_sq")


#: NAdam (Dozat 2016), torch.optim.NAdam's semantics and defaults.
NADAM = Spec(
    "nadam",
    LAYOUTS["nadam"],
    (
        Option("lr", 2e-3, hyper.nonneg),
        Option("betas", (0.9, 0.999), betas_of),
        Option("eps", 1e-8, hyper.positive),
        WEIGHT_DECAY,
        Option("momentum_decay", 4e-3, hyper.nonneg, example=4e-3),
        Option("decoupled_weight_decay", False, hyper.flag),
        MAXIMIZE,
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
        TORCH_EXTRA,
        scalar_state={"mu_product": nadam_mu_product},
    ),
)
