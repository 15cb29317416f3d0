"""One optimizer step on one parameter array, and :func:`multi_tensor_step` over many.

Each function updates ``param`` and its state arrays in place, on the backend that
``backend`` selects (see :mod:`fastrms.dispatch`). Every argument is checked before anything is
written: a bad call raises ``TypeError`` or ``ValueError`` naming the argument and changes no
array. Scalars are cast to the arrays' dtype, so float32 arrays are updated in float32.

Every step function also takes ``state_dtype`` (see :func:`multi_tensor_step`):
``state_dtype="bfloat16"`` steps float32 parameters with ``ml_dtypes.bfloat16`` state arrays
(or their ``uint16`` views), computed in float32 and stored rounded to nearest even.

bfloat16 parameters (``ml_dtypes.bfloat16``, with bfloat16 gradients; on ``cuda``, CUDA
arrays of their ``uint16`` patterns) are computed in float32 and stored as the option
``rounding`` says (``"stochastic"`` by default, ``"nearest"``, ``"kahan"``; see
:func:`multi_tensor_step`), with ``seed`` (default 0) and ``stream`` (default 0: the random
bits' stream, which :func:`multi_tensor_step` sets to each parameter's position) and
``kahan_comp`` (the Kahan compensation array, bfloat16). Stochastic rounding needs the step:
the functions of rules that count none (``rmsprop``, ``lion``) then take ``step=`` too.

NaN or Inf in a gradient propagate into the parameter and state, as in PyTorch; fastrms does
not inspect array values.

Each optimizer's :class:`fastrms.specs.Spec` checks the hyperparameters and computes the
scalars of one step (bias corrections, decayed learning rate) on the host, once
(``SPECS[name].setup(step, **options)``; ``rmsprop_setup`` and the like are shorthands);
:func:`plan` then checks one parameter's arrays and returns a :class:`Plan` to run. The
optimizer classes step all their parameters through :class:`fastrms.grouped.StepPlan`
instead, which checks them once and runs each group of them as one call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from . import dispatch, specs
from . import precision as _precision
from .arrays import check_arrays, is_bf16_array
from .functional_declare import declare as _declare
from .grouped import StepPlan
from .precision import HYPER_WIDTH, SCALARS, SLOTS, cast, cast_array, check_state_dtype  # noqa: F401
from .specs import SPECS, Setup

Array = Any  # a NumPy array, or a CUDA array (Numba device array, CuPy, PyTorch CUDA tensor)

#: The public names: these, and one step function per spec (``adam``...), added below.
__all__ = ["Plan", "Setup", "multi_tensor_step", "plan"]


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
    hyper = cast(setup.rule, setup.scalars, info.dtype)
    view = chosen.view
    p = view(param)
    # A state array that the options leave unused is passed as the parameter: the rule never
    # reads it, and the tuple keeps one type, so each option combination compiles once.
    arrays = (p, view(grad), *[view(named[s]) if s in named else p for s in SLOTS[setup.rule]])
    return Plan(chosen, auto, setup, arrays, hyper)


# SLOTS, SCALARS, HYPER_WIDTH, cast and cast_array live in fastrms.precision; they stay
# importable from here, where the tests and tools found them.
_cast = cast  # the name the tests and benchmarks used


def _step(name: str, param, grad, state: dict, backend: str, step: int, options: dict) -> None:
    spec = SPECS[name]
    state_dtype = options.pop("state_dtype", None)
    # The float path first, with as little as can be: it is a step's whole cost for small
    # arrays. Anything held through a codec runs as a grouped step of one array.
    if (
        state_dtype is not None
        or not _LOW_PRECISION_OPTIONS.isdisjoint(options)
        or is_bf16_array(param)  # ml_dtypes.bfloat16, or a CUDA array's uint16 patterns
    ):
        low = {k: options.pop(k) for k in _LOW_PRECISION_OPTIONS if k in options}
        _low_precision_step(spec, param, grad, state, backend, step, state_dtype, low, options)
        return
    _check_step_options(spec, options)
    plan(spec.setup(step, **options), param, grad, state, backend).run()


#: The options of a bfloat16 parameter's step (see :func:`multi_tensor_step`): ``stream`` is
#: the one-array functions' own (multi_tensor_step numbers its parameters), and ``step`` the
#: random bits' step where the rule itself counts none (RMSProp, Lion).
_LOW_PRECISION_OPTIONS = frozenset(("rounding", "seed", "stream", "kahan_comp"))


def _low_precision_step(spec, param, grad, state, backend, step, state_dtype, low, options):
    """One step of a parameter whose arrays go through a codec (a bfloat16 parameter, or
    state held as ``state_dtype`` says), or the refusal of ``rounding=`` and the like for
    another: a grouped step of one array, whose kernel loads and stores them through their
    codecs."""
    if not spec.counts_steps and "step" in options:
        step = options.pop("step")
    elif not spec.counts_steps:
        step = None  # stochastic rounding refuses the step it lacks
    _check_step_options(spec, options)
    setup = spec.setup(1 if step is None or not spec.counts_steps else step, **options)
    for s in setup.state:
        if state.get(s) is None:
            raise ValueError(f"{s} is required by these options of {setup.rule}")
    stream = low.get("stream", 0)
    if isinstance(stream, bool) or not isinstance(stream, (int, np.integer)):
        raise TypeError(f"stream must be an int, got {stream!r}")
    arrays = {s: [state[s]] for s in setup.state}
    if low.get("rounding") == "kahan":
        arrays[_precision.KAHAN_COMP] = [low.get(_precision.KAHAN_COMP)]
    elif low.get(_precision.KAHAN_COMP) is not None:
        raise ValueError(f"{_precision.KAHAN_COMP} is used by rounding='kahan' only")
    plan = StepPlan(setup, [param], arrays, ["param"], backend, ["grad"],
                    state_dtype=state_dtype, rounding=low.get("rounding"), seed=low.get("seed"),
                    streams=[stream])  # fmt: skip
    if "stream" in low and plan.rounding is None:
        raise ValueError("stream= applies to bfloat16 parameters only")
    plan.run([grad], setup, step)


def _check_step_options(spec: specs.Spec, options: dict) -> None:
    if not options.keys() <= set(spec.step_options):
        unknown = sorted(set(options) - set(spec.step_options))
        raise TypeError(f"{spec.name} got unexpected keyword arguments {unknown}")


def rmsprop_setup(**options) -> Setup:
    """Check RMSProp's hyperparameters (see :func:`rmsprop`)."""
    return SPECS["rmsprop"].setup(1, **options)


def adagrad_setup(*, step: int, **options) -> Setup:
    """Check AdaGrad's hyperparameters (see :func:`adagrad`)."""
    return SPECS["adagrad"].setup(step, **options)


def adam_setup(*, step: int, **options) -> Setup:
    """Check Adam's hyperparameters (see :func:`adam`)."""
    return SPECS["adam"].setup(step, **options)


def sgd_setup(*, step: int, **options) -> Setup:
    """Check SGD's hyperparameters (see :func:`sgd`)."""
    return SPECS["sgd"].setup(step, **options)


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
    _step("rmsprop", param, grad, state, backend, 1, options)


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
    _step("adagrad", param, grad, {"state_sum": state_sum}, backend, step, options)


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
    _step("adam", param, grad, state, backend, step, options)


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
    _step("sgd", param, grad, {"momentum_buffer": momentum_buffer}, backend, step, options)


def lion(param: Array, grad: Array, exp_avg: Array, *, backend: str = "auto", **options) -> None:
    """One Lion step, in place (Chen et al. 2023, "Symbolic Discovery of Optimization
    Algorithms", Algorithm 2; the form of Optax's ``lion`` and of the paper's code).

    ::

        g = grad (or -grad if maximize)
        c = beta1 * m + (1 - beta1) * g
        p = (1 - lr * weight_decay) * p - lr * sign(c)       (sign(0) = 0)
        m = beta2 * m + (1 - beta2) * g

    Only the sign of the interpolated momentum is used, so every element moves by exactly
    ``lr`` (plus decay): use a learning rate 3-10x smaller than AdamW's and a weight decay
    3-10x larger, as the paper advises.

    Parameters
    ----------
    param, grad, exp_avg : array
        ``exp_avg`` (the momentum ``m``) starts at zero.
    lr : float
        Default 1e-4.
    betas : (float, float)
        ``(beta1, beta2)``, default ``(0.9, 0.99)``: beta1 interpolates the update's direction,
        beta2 tracks the momentum.
    weight_decay : float
        Decoupled decay rate, as in AdamW; default 0.
    maximize, backend
        As in :func:`rmsprop`.
    """
    _step("lion", param, grad, {"exp_avg": exp_avg}, backend, 1, options)


def multi_tensor_step(
    optimizer: str,
    params: list,
    grads: list,
    state: dict[str, list],
    *,
    step: int = 1,
    backend: str = "auto",
    state_dtype: str | None = None,
    rounding: str | None = None,
    seed: int | None = None,
    **hyperparameters,
) -> None:
    """One step of ``optimizer`` over many parameters at once, in place.

    The arrays are grouped by backend and dtype, and each group runs as one call: one
    parallel region on the CPU, one launch (or a few) on a GPU. The results are bit for bit
    those of one single-array call per parameter. To step the same arrays many times, an
    optimizer class (or :class:`fastrms.grouped.StepPlan`) checks them once instead of on
    every call.

    Parameters
    ----------
    optimizer : {OPTIMIZERS}
        The update rule; its formula is in the docstring of the function of that name.
    params, grads : sequence of arrays
        ``grads[i]`` is the gradient of ``params[i]``; the parameters may differ in size,
        shape and dtype (each gradient must match its own parameter).
    state : dict of str -> sequence of arrays
        For each state array the options use (e.g. ``"exp_avg"``, ``"exp_avg_sq"``), one array
        per parameter, updated in place.
    step : int
        The step being taken, counting from 1 (bias corrections, AdaGrad's decayed lr, SGD's
        first momentum step).
    backend : {"auto", "cuda", "cpu", "numpy"}
        See :mod:`fastrms.dispatch`.
    state_dtype : {None, "float32", "float64", "bfloat16", "int8"}
        How the state arrays are held; None (default): as each parameter is.
        ``"bfloat16"`` (float32 parameters, every backend): the state arrays
        are ``ml_dtypes.bfloat16`` arrays (or ``uint16`` views of them); each element is
        loaded into float32, updated in float32 and stored rounded to nearest even.
        ``"int8"`` (float32 or bfloat16 parameters, ``cpu`` and ``numpy``): the state of a
        parameter of at least 4096 elements is a :class:`fastrms.lowprecision.Quantized`
        ``(codes, scales)`` pair per state array, 8-bit blockwise (see
        :mod:`fastrms.kernels.blockwise`); a smaller parameter's state is float32 arrays.
        Beside bfloat16 parameters, None and ``"float32"`` hold float32 state.
    rounding : {None, "stochastic", "nearest", "kahan"}
        How ``ml_dtypes.bfloat16`` parameters (CUDA arrays: their ``uint16`` patterns; their
        gradients bfloat16 too) are stored after their float32 update; None: ``"stochastic"``.
        Stochastic rounding adds 16 random bits below the bfloat16 mantissa and truncates:
        element ``j`` of ``params[i]`` draws ``lowprecision.random_bits(key, j)`` with
        ``key = lowprecision.step_key(seed, step, i)``, so the result does not depend on
        threads, grouping or backend. ``"kahan"`` needs ``state["kahan_comp"]``, a bfloat16
        compensation array per bfloat16 parameter (zeros at first). Refused
        (``ValueError``) when no parameter is bfloat16.
    seed : int, optional
        The seed of stochastic rounding (default 0).
    **hyperparameters
        As for the single-array function of ``optimizer``.

    Every array of every parameter is checked before anything is written: a bad argument
    raises ``TypeError``/``ValueError`` naming it (``params[3]``, ``exp_avg[3]``) and changes
    nothing.
    """
    if optimizer not in SPECS:
        raise ValueError(f"optimizer must be one of {tuple(SPECS)}, got {optimizer!r}")
    spec = SPECS[optimizer]
    _check_step_options(spec, hyperparameters)
    setup = spec.setup(step, **hyperparameters)
    if len(grads) != len(params):
        raise ValueError(f"grads has {len(grads)} arrays but params has {len(params)}")
    for name in setup.state:
        arrays = state.get(name)
        if arrays is None or len(arrays) != len(params):
            raise ValueError(f"state[{name!r}] must hold one array per parameter")
    names = [f"params[{i}]" for i in range(len(params))]
    arrays = {s: list(state[s]) for s in setup.state}
    if rounding == "kahan" and state.get(_precision.KAHAN_COMP) is not None:
        arrays[_precision.KAHAN_COMP] = list(state[_precision.KAHAN_COMP])
    StepPlan(setup, list(params), arrays, names, backend, state_dtype=state_dtype,
             rounding=rounding, seed=seed).run(list(grads), setup, step)  # fmt: skip


# -- the step functions a spec declares without a hand-written one -------------------------------


def declare(spec: specs.Spec) -> Callable[..., None]:
    """The one-step function of ``spec``, named ``spec.name``, documented from the spec (see
    :func:`fastrms.functional_declare.declare`)."""
    return _declare(spec, _step, __name__)


for _spec in SPECS.values():
    if _spec.name not in globals():
        globals()[_spec.name] = declare(_spec)
    __all__.append(_spec.name)
del _spec
__all__.sort()
multi_tensor_step.__doc__ = multi_tensor_step.__doc__.replace(
    "{OPTIMIZERS}", "{" + ", ".join(f'"{n}"' for n in SPECS) + "}"
)
