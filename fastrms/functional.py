"""One optimizer step on one parameter array: the functions the optimizer classes call.

Each function updates ``param`` and its state arrays in place, on the backend that
``backend`` selects (see :mod:`fastrms.dispatch`). Every argument is checked before anything is
written: a bad call raises ``TypeError`` or ``ValueError`` naming the argument and changes no
array. Scalars are cast to the arrays' dtype, so float32 arrays are updated in float32.

NaN or Inf in a gradient propagate into the parameter and state, as in PyTorch; fastrms does
not inspect array values.

Each rule has a ``*_setup`` function that checks the hyperparameters and computes the scalars
of one step (bias corrections, decayed learning rate) on the host, once; :func:`plan` then
checks one parameter's arrays and returns a :class:`Plan` to run. The optimizer classes use
these to check every parameter of a step before updating any.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np

from . import dispatch, hyper
from .arrays import check_arrays

Array = Any  # a NumPy array, or a CUDA array (Numba device array, CuPy, PyTorch CUDA tensor)

#: The state arrays of each rule, in the order the kernels take them (after param and grad).
SLOTS = {
    "rmsprop": ("square_avg", "momentum_buffer", "grad_avg"),
    "adagrad": ("state_sum",),
    "adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    "sgd": ("momentum_buffer",),
}


#: What each rule's host scalars are, in the order the kernels take them.
SCALARS = {
    "rmsprop": ("lr", "alpha", "1 - alpha", "eps", "weight_decay", "sign", "momentum"),
    "adagrad": ("lr / (1 + (step - 1) * lr_decay)", "eps", "weight_decay", "sign"),
    "adam": (
        "lr / (1 - beta1**step)", "1 / sqrt(1 - beta2**step)", "beta1", "1 - beta1", "beta2",
        "1 - beta2", "eps", "weight_decay", "1 - lr * weight_decay", "sign",
    ),
    "sgd": ("lr", "weight_decay", "sign", "momentum", "1 - dampening", "momentum"),
}  # fmt: skip
_EPS_SLOT = {rule: names.index("eps") for rule, names in SCALARS.items() if "eps" in names}
_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).smallest_subnormal)


class Setup(NamedTuple):
    """A rule's checked hyperparameters for one step."""

    rule: str
    flags: tuple  # compile-time options of the kernel
    scalars: tuple  # Python floats, cast to the arrays' dtype by plan()
    state: tuple  # names of the state arrays these options use


class Plan(NamedTuple):
    """A checked update of one parameter, ready to run."""

    backend: Any
    auto: bool
    setup: Setup
    arrays: tuple
    hyper: tuple

    def run(self) -> None:
        s = self.setup
        dispatch.launch(self.backend, self.auto, s.rule, s.flags, self.arrays, self.hyper)


def plan(setup: Setup, param: Array, grad: Array, state: dict, backend: str = "auto") -> Plan:
    """Check one parameter's arrays for ``setup`` and return the update as a :class:`Plan`."""
    named = {"param": param, "grad": grad}
    for name in setup.state:
        if state.get(name) is None:
            raise ValueError(f"{name} is required by these options of {setup.rule}")
        named[name] = state[name]
    info = check_arrays(named, ("param", *setup.state))
    chosen, auto = dispatch.resolve(backend, info.kind)
    hyper = _cast(setup.rule, setup.scalars, info.dtype)
    view = chosen.view
    p = view(param)
    # A state array that the options leave unused is passed as the parameter: the rule never
    # reads it, and the tuple keeps one type, so each option combination compiles once.
    arrays = (p, view(grad), *[view(named[s]) if s in named else p for s in SLOTS[setup.rule]])
    return Plan(chosen, auto, setup, arrays, hyper)


@functools.lru_cache(maxsize=256)
def _cast(rule: str, scalars: tuple, dtype: np.dtype) -> tuple:
    """The scalars as NumPy scalars of the arrays' dtype, checked to fit in it (cached: a
    training loop reuses them; a refusal raises and so is not cached)."""
    if dtype.type is np.float32:
        _check_fits_float32(rule, scalars)
    return tuple(np.array(scalars, dtype))


def _by_value(check):
    """Cache a hyperparameter check by its arguments' values and types (1, 1.0 and True are
    different keys), so a training loop pays for the checks once. Unhashable arguments (a
    list, an array) are checked every time."""
    cached = functools.lru_cache(maxsize=1024, typed=True)(check)

    @functools.wraps(check)
    def checked(*args):
        try:
            hash(args)
        except TypeError:
            return check(*args)
        return cached(*args)

    return checked


def _check_fits_float32(rule: str, scalars: tuple) -> None:
    """Hyperparameters valid in float64 can still overflow float32, or eps underflow to 0."""
    eps = scalars[_EPS_SLOT[rule]] if rule in _EPS_SLOT else 1.0
    if max(map(abs, scalars)) <= _F32_MAX and not 0 < eps < _F32_TINY:
        return
    for name, x in zip(SCALARS[rule], scalars):
        if abs(x) > _F32_MAX or (name == "eps" and np.float32(x) == 0):
            raise ValueError(f"{name} = {x!r} does not fit in float32, the arrays' dtype")


def _sign(maximize) -> float:
    return -1.0 if hyper.flag("maximize", maximize) else 1.0


def rmsprop_setup(
    *,
    lr: float = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    eps_in_sqrt: bool = False,
    maximize: bool = False,
) -> Setup:
    """Check RMSProp's hyperparameters (see :func:`rmsprop`)."""
    return _rmsprop_setup(lr, alpha, eps, weight_decay, momentum, centered, eps_in_sqrt, maximize)


@_by_value
def _rmsprop_setup(lr, alpha, eps, weight_decay, momentum, centered, eps_in_sqrt, maximize):
    lr = hyper.nonneg("lr", lr)
    alpha = hyper.real("alpha", alpha, 0.0, 1.0)
    eps = hyper.positive("eps", eps)
    weight_decay = hyper.nonneg("weight_decay", weight_decay)
    momentum = hyper.nonneg("momentum", momentum)
    centered = hyper.flag("centered", centered)
    eps_in_sqrt = hyper.flag("eps_in_sqrt", eps_in_sqrt)
    sign = _sign(maximize)
    use_momentum = momentum > 0
    state = ("square_avg",) + ("momentum_buffer",) * use_momentum + ("grad_avg",) * centered
    return Setup(
        "rmsprop",
        (centered, use_momentum, eps_in_sqrt),
        (lr, alpha, 1 - alpha, eps, weight_decay, sign, momentum),
        state,
    )


def rmsprop(
    param: Array,
    grad: Array,
    square_avg: Array,
    *,
    momentum_buffer: Array | None = None,
    grad_avg: Array | None = None,
    backend: str = "auto",
    **options,
) -> None:
    """One RMSProp step, in place (PyTorch's ``torch.optim.RMSprop`` semantics by default).

    ::

        g = grad (or -grad if maximize) + weight_decay * p
        v = alpha * v + (1 - alpha) * g**2
        centered:         m = alpha * m + (1 - alpha) * g;   v_hat = v - m**2   (else v_hat = v)
        eps_in_sqrt=False: d = sqrt(v_hat) + eps              (PyTorch)
        eps_in_sqrt=True:  d = sqrt(v_hat + eps)              (TF/Keras, Optax, tutorials)
        momentum > 0:     b = momentum * b + g / d;  p = p - lr * b
        momentum = 0:     p = p - lr * g / d

    Parameters
    ----------
    param, grad, square_avg : array
        Same shape and dtype (float32 or float64), C-contiguous. ``param``, ``square_avg``
        and the optional state below are updated in place.
    momentum_buffer : array, optional
        Required when ``momentum > 0``; starts at zero.
    grad_avg : array, optional
        Required when ``centered=True``; starts at zero.
    lr, alpha, eps, weight_decay, momentum : float
        PyTorch's names and defaults: 1e-2, 0.99, 1e-8, 0, 0.
    centered : bool
        Divide by an estimate of the standard deviation, ``sqrt(v - m**2)`` (Graves 2013).
    eps_in_sqrt : bool
        Put eps inside the square root, as TF/Keras, Optax (``eps_in_sqrt=True``) and the
        classic tutorials do. PyTorch adds it outside.
    maximize : bool
        Ascend: use ``-grad``.
    backend : {"auto", "cuda", "cpu", "numpy"}
        See :mod:`fastrms.dispatch`.
    """
    state = {"square_avg": square_avg, "momentum_buffer": momentum_buffer, "grad_avg": grad_avg}
    plan(rmsprop_setup(**options), param, grad, state, backend).run()


def adagrad_setup(
    *,
    step: int,
    lr: float = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 1e-10,
    eps_in_sqrt: bool = False,
    maximize: bool = False,
) -> Setup:
    """Check AdaGrad's hyperparameters (see :func:`adagrad`)."""
    step = hyper.step("step", step)
    lr, lr_decay, weight_decay, eps, eps_in_sqrt, sign = _adagrad_checked(
        lr, lr_decay, weight_decay, eps, eps_in_sqrt, maximize
    )
    clr = lr / (1 + (step - 1) * lr_decay)
    return Setup("adagrad", (eps_in_sqrt,), (clr, eps, weight_decay, sign), ("state_sum",))


@_by_value
def _adagrad_checked(lr, lr_decay, weight_decay, eps, eps_in_sqrt, maximize):
    return (
        hyper.nonneg("lr", lr),
        hyper.nonneg("lr_decay", lr_decay),
        hyper.nonneg("weight_decay", weight_decay),
        hyper.positive("eps", eps),
        hyper.flag("eps_in_sqrt", eps_in_sqrt),
        _sign(maximize),
    )


def adagrad(
    param: Array, grad: Array, state_sum: Array, *, step: int, backend: str = "auto", **options
) -> None:
    """One AdaGrad step, in place (PyTorch's ``torch.optim.Adagrad`` semantics by default).

    ::

        g = grad (or -grad if maximize) + weight_decay * p
        clr = lr / (1 + (step - 1) * lr_decay)
        s = s + g**2
        p = p - clr * g / (sqrt(s) + eps)       or, with eps_in_sqrt:  p - clr * g / sqrt(s + eps)

    Parameters
    ----------
    param, grad, state_sum : array
        ``state_sum`` starts at ``initial_accumulator_value`` (0 in PyTorch; Keras and Optax
        use 0.1 with eps inside the sqrt).
    step : int
        The step being taken, counting from 1 (sets the decayed learning rate).
    lr, lr_decay, weight_decay, eps : float
        PyTorch's names and defaults: 1e-2, 0, 0, 1e-10.
    eps_in_sqrt, maximize, backend
        As in :func:`rmsprop`.
    """
    setup = adagrad_setup(step=step, **options)
    plan(setup, param, grad, {"state_sum": state_sum}, backend).run()


def adam_setup(
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> Setup:
    """Check Adam's hyperparameters (see :func:`adam`)."""
    step = hyper.step("step", step)
    lr, beta1, beta2, eps, weight_decay, amsgrad, decoupled, sign = _adam_checked(
        lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay, maximize
    )
    scalars = (
        lr / (1 - beta1**step),
        1 / math.sqrt(1 - beta2**step),
        beta1,
        1 - beta1,
        beta2,
        1 - beta2,
        eps,
        0.0 if decoupled else weight_decay,
        1 - lr * weight_decay if decoupled else 1.0,
        sign,
    )
    state = ("exp_avg", "exp_avg_sq") + ("max_exp_avg_sq",) * amsgrad
    return Setup("adam", (amsgrad,), scalars, state)


@_by_value
def _adam_checked(lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay, maximize):
    return (
        hyper.nonneg("lr", lr),
        *hyper.betas("betas", betas),
        hyper.positive("eps", eps),
        hyper.nonneg("weight_decay", weight_decay),
        hyper.flag("amsgrad", amsgrad),
        hyper.flag("decoupled_weight_decay", decoupled_weight_decay),
        _sign(maximize),
    )


def adam(
    param: Array,
    grad: Array,
    exp_avg: Array,
    exp_avg_sq: Array,
    *,
    step: int,
    max_exp_avg_sq: Array | None = None,
    backend: str = "auto",
    **options,
) -> None:
    """One Adam / AMSGrad step, in place (PyTorch's ``torch.optim.Adam`` semantics).

    ::

        decoupled_weight_decay (AdamW):  p = (1 - lr * weight_decay) * p
        g = grad (or -grad if maximize) + weight_decay * p       (L2 decay: Adam only)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        amsgrad:  v_max = max(v_max, v), used in place of v
        p = p - lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)

    Parameters
    ----------
    param, grad, exp_avg, exp_avg_sq : array
        The moments start at zero.
    step : int
        The step being taken, counting from 1 (sets the bias corrections).
    max_exp_avg_sq : array, optional
        Required when ``amsgrad=True``; starts at zero.
    lr, betas, eps, weight_decay : float
        PyTorch's names and defaults: 1e-3, (0.9, 0.999), 1e-8, 0.
    amsgrad : bool
        Use the running maximum of ``v`` (Reddi et al. 2018).
    decoupled_weight_decay : bool
        AdamW (Loshchilov & Hutter 2019): decay ``p`` directly instead of adding
        ``weight_decay * p`` to the gradient.
    maximize, backend
        As in :func:`rmsprop`.
    """
    state = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "max_exp_avg_sq": max_exp_avg_sq}
    plan(adam_setup(step=step, **options), param, grad, state, backend).run()


def adamw(
    param: Array,
    grad: Array,
    exp_avg: Array,
    exp_avg_sq: Array,
    *,
    step: int,
    weight_decay: float = 1e-2,
    **options,
) -> None:
    """One AdamW step, in place: :func:`adam` with ``decoupled_weight_decay=True`` and
    weight decay 1e-2 (PyTorch's ``torch.optim.AdamW``).

    ::

        p = (1 - lr * weight_decay) * p, then the Adam update with g = grad (no L2 term)

    Parameters
    ----------
    param, grad, exp_avg, exp_avg_sq, step, max_exp_avg_sq
        As in :func:`adam`.
    weight_decay : float
        Decoupled decay rate, default 1e-2 (PyTorch's AdamW default).
    lr, betas, eps, amsgrad, maximize, backend
        As in :func:`adam`.
    """
    adam(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        step=step,
        weight_decay=weight_decay,
        decoupled_weight_decay=True,
        **options,
    )


def sgd_setup(
    *,
    step: int,
    lr: float = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> Setup:
    """Check SGD's hyperparameters (see :func:`sgd`)."""
    step = hyper.step("step", step)
    lr, momentum, dampening, weight_decay, nesterov, sign = _sgd_checked(
        lr, momentum, dampening, weight_decay, nesterov, maximize
    )
    use_momentum = momentum > 0
    first = step == 1  # PyTorch starts the buffer at the gradient itself: b = 0*b + 1*g
    scalars = (
        lr,
        weight_decay,
        sign,
        0.0 if first else momentum,
        1.0 if first else 1 - dampening,
        momentum,
    )
    state = ("momentum_buffer",) * use_momentum
    return Setup("sgd", (use_momentum, nesterov), scalars, state)


@_by_value
def _sgd_checked(lr, momentum, dampening, weight_decay, nesterov, maximize):
    momentum = hyper.nonneg("momentum", momentum)
    dampening = hyper.real("dampening", dampening, 0.0, 1.0)
    nesterov = hyper.flag("nesterov", nesterov)
    if nesterov and (momentum == 0 or dampening != 0):
        raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
    return (
        hyper.nonneg("lr", lr),
        momentum,
        dampening,
        hyper.nonneg("weight_decay", weight_decay),
        nesterov,
        _sign(maximize),
    )


def sgd(
    param: Array,
    grad: Array,
    momentum_buffer: Array | None = None,
    *,
    step: int,
    backend: str = "auto",
    **options,
) -> None:
    """One SGD step, with optional momentum or Nesterov momentum, in place (PyTorch's form).

    ::

        g = grad (or -grad if maximize) + weight_decay * p
        momentum > 0:  b = momentum * b + (1 - dampening) * g      (step 1: b = g)
                       g = g + momentum * b  (nesterov)   or   g = b
        p = p - lr * g

    Parameters
    ----------
    param, grad : array
    momentum_buffer : array, optional
        Required when ``momentum > 0``; on step 1 it is set to the gradient.
    step : int
        The step being taken, counting from 1.
    lr, momentum, dampening, weight_decay : float
        PyTorch's names; ``lr`` defaults to 1e-3, the others to 0.
    nesterov : bool
        PyTorch's Nesterov form. Its parameter is the look-ahead point ``x + momentum * v`` of
        Sutskever et al.'s ``v = momentum * v - lr * grad(x + momentum * v); x = x + v``.
        Needs ``momentum > 0`` and no dampening.
    maximize, backend
        As in :func:`rmsprop`.
    """
    setup = sgd_setup(step=step, **options)
    plan(setup, param, grad, {"momentum_buffer": momentum_buffer}, backend).run()


# -- many parameters in one call -------------------------------------------------------------

#: The optimizers :func:`multi_tensor_step` knows, and how each checks its hyperparameters.
_MULTI_SETUPS = {
    "rmsprop": lambda step, **o: rmsprop_setup(**o),
    "adagrad": adagrad_setup,
    "adam": adam_setup,
    "adamw": lambda step, weight_decay=1e-2, **o: adam_setup(
        step=step, weight_decay=weight_decay, decoupled_weight_decay=True, **o
    ),
    "sgd": sgd_setup,
}


def multi_tensor_step(
    optimizer: str,
    params: list,
    grads: list,
    state: dict[str, list],
    *,
    step: int = 1,
    backend: str = "auto",
    **hyperparameters,
) -> None:
    """One step of ``optimizer`` over many parameters at once, in place.

    Parameters
    ----------
    optimizer : {"rmsprop", "adagrad", "adam", "adamw", "sgd"}
        The update rule; its formula is in the docstring of the function of that name.
    params, grads : sequence of arrays
        ``grads[i]`` is the gradient of ``params[i]``; the arrays may differ in size, shape and
        dtype (each must match its own parameter).
    state : dict of str -> sequence of arrays
        For each state array the options use (e.g. ``"exp_avg"``, ``"exp_avg_sq"``), one array
        per parameter, updated in place.
    step : int
        The step being taken, counting from 1 (bias corrections, AdaGrad's decayed lr).
    backend : {"auto", "cuda", "cpu", "numpy"}
        See :mod:`fastrms.dispatch`.
    **hyperparameters
        As for the single-array function of ``optimizer``.

    Every array of every parameter is checked before anything is written: a bad argument
    raises ``TypeError``/``ValueError`` naming it (``params[3]``, ``exp_avg[3]``) and changes
    nothing.
    """
    if optimizer not in _MULTI_SETUPS:
        raise ValueError(f"optimizer must be one of {tuple(_MULTI_SETUPS)}, got {optimizer!r}")
    if len(grads) != len(params):
        raise ValueError(f"grads has {len(grads)} arrays but params has {len(params)}")
    setup = _MULTI_SETUPS[optimizer](step=step, **hyperparameters)
    for name in setup.state:
        if len(state.get(name) or ()) != len(params):
            raise ValueError(f"state[{name!r}] must hold one array per parameter")
    plans = []
    labelled = []
    for i, (p, g) in enumerate(zip(params, grads)):
        arrays = {name: state[name][i] for name in setup.state}
        try:
            plans.append(plan(setup, p, g, arrays, backend))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"params[{i}]: {exc}") from None
        labelled += [(f"params[{i}]", p, True), (f"grads[{i}]", g, False)]
        labelled += [(f"{name}[{i}]", a, True) for name, a in arrays.items()]
    from .optim import _check_no_overlap

    _check_no_overlap(labelled)
    for pl in plans:
        pl.run()
