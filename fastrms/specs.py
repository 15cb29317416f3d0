"""One declaration per optimizer: its state, scalars, flags, options and defaults, by name.

Two levels, as in Optax, where variants are compositions rather than copies:

- A :class:`Layout` is what one per-element rule of :mod:`fastrms.kernels.rules` takes: the
  names of its state arrays (after ``param`` and ``grad``), of its host-computed scalars and of
  its compile-time flags, in the order the kernels index them. The NumPy reference reads its
  arguments by these names (:meth:`Layout.named`); a test reads each rule's source and checks
  that it indexes them in this order.
- A :class:`Spec` is an optimizer as users see it: a layout, its options with their defaults
  and checks (in signature order), and ``prepare``, the host function that turns checked
  options and the step number into the step's scalars, flags and used state. The functional
  API, the optimizer classes, the grouped step and the test tables are derived from it.

Adding an optimizer means writing its rule (kernels/rules.py), its reference
(fastrms/reference.py), a :class:`Layout` and a :class:`Spec` here, its documentation and its
tests; nothing else lists optimizers by hand.

Nothing here imports numba.
"""

from __future__ import annotations

import functools
import inspect
import math
import textwrap
from collections import namedtuple
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np

from . import hyper


class Setup(NamedTuple):
    """A rule's checked hyperparameters for one step."""

    rule: str
    flags: tuple  # compile-time options of the kernel, in the layout's order
    scalars: tuple  # Python floats, in the layout's order; cast to the arrays' dtype later
    state: tuple  # names of the state arrays these options use


@dataclass(frozen=True)
class Slot:
    """One state array of a layout: its name, its initial value and its shape rule.

    ``initial`` is a number, or the name of the option that gives it (AdaGrad's
    ``initial_accumulator_value``). ``like`` says what the array is shaped as: ``"param"``,
    the parameter's shape (the only rule today; a factored second moment would add another).
    How the array is held (its storage) is not the layout's: the precision policy chooses it
    (:mod:`fastrms.precision`).
    """

    name: str
    initial: float | str = 0.0
    like: str = "param"


@dataclass(frozen=True)
class Layout:
    """The arguments of one kernel rule, by name, in the order the rule indexes them.

    ``slots`` may be given as names or as :class:`Slot` objects; ``layout.slots`` is always
    the tuple of names (what every user of a layout reads) and ``layout.slot_specs`` the
    :class:`Slot` objects.
    """

    name: str
    slots: tuple[str, ...]  # state arrays, after param and grad
    scalars: Mapping[str, str]  # scalar name -> how the host computes it (for messages)
    flags: tuple[str, ...]

    def __post_init__(self) -> None:
        given = tuple(s if isinstance(s, Slot) else Slot(s) for s in self.slots)
        object.__setattr__(self, "slot_specs", given)
        object.__setattr__(self, "slots", tuple(s.name for s in given))

    @property
    def arrays(self) -> tuple[str, ...]:
        return ("param", "grad", *self.slots)

    @functools.cached_property
    def eps_index(self) -> int | None:
        return list(self.scalars).index("eps") if "eps" in self.scalars else None

    @functools.cached_property
    def _tuples(self):
        def make(kind, names):
            return namedtuple(f"{self.name.title()}{kind}", names) if names else lambda: ()

        return (make("Arrays", self.arrays), make("Scalars", tuple(self.scalars)),
                make("Flags", self.flags))  # fmt: skip

    def named(self, arrays: tuple, scalars: tuple, flags: tuple) -> tuple:
        """The positional ``(arrays, hyper, flags)`` of a rule call as named tuples."""
        a, s, f = self._tuples
        return a(*arrays), s(*scalars), f(*flags)


@dataclass(frozen=True)
class Option:
    """One hyperparameter: its name, default and check.

    ``kind`` is ``"step"`` for an option of the step itself, ``"init"`` for one that only sets
    the state's initial value (an optimizer-class argument, not a functional one), and
    ``"fixed"`` for a step option that a variant fixes (the classes do not expose it).
    ``example`` is a value that switches a numeric option on (0 switches it off): the tests
    step every optimizer under each combination of its boolean options and of these.
    """

    name: str
    default: Any
    check: Callable[[str, Any], Any]
    kind: str = "step"
    example: float | None = None


F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).smallest_subnormal)


@dataclass(frozen=True)
class TorchFace:
    """How an optimizer looks in :mod:`fastrms.torch`: what is torch's and not the spec's.

    ``fastrms.torch`` generates a class from it for every spec that has no hand-written one:
    ``__init__(self, params, *positional, *, *keyword_only)``, each argument an option of the
    spec (with its default) or one of ``extra`` (torch's own, such as ``foreach``), in torch's
    order, so that ``inspect.signature`` matches ``torch.optim.<name>``'s.
    """

    name: str  # the class name, torch.optim's
    positional: tuple[str, ...]  # arguments after ``params`` that may be positional
    keyword_only: tuple[str, ...] = ()
    #: torch's arguments that fastrms accepts and ignores (``foreach``, ``fused``) or refuses
    #: when True (``capturable``, ``differentiable``), with torch's defaults.
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: fastrms state names that torch spells differently (Adagrad: ``state_sum`` -> ``sum``).
    renames: Mapping[str, str] = field(default_factory=dict)
    #: Per-parameter 0-d float32 state that torch keeps beside ``step``, as a function of the
    #: step options and the step count it has reached (NAdam's ``mu_product``); written after
    #: every step so that checkpoints interchange with ``torch.optim``.
    scalar_state: Mapping[str, Callable[..., float]] = field(default_factory=dict)
    keeps_step: bool = True  # whether torch keeps ``state["step"]`` (not SGD)


@dataclass(frozen=True)
class Spec:
    """One optimizer: a layout, its options and the host-side scalars of a step.

    ``prepare(step, **options)`` receives every step and fixed option, checked, and returns
    ``(scalars, flags, state)``: two dicts keyed by the layout's names, and the tuple of state
    arrays these options use.

    ``title``, ``doc``, ``option_doc`` and ``torch`` are what the frontends show: a frontend
    without a hand-written class or function for the spec generates one from them
    (:mod:`fastrms.optim`, :mod:`fastrms.functional`, :mod:`fastrms.torch`).
    """

    name: str
    layout: Layout
    options: tuple[Option, ...]
    prepare: Callable[..., tuple[dict, dict, tuple]]
    counts_steps: bool = True  # whether the step number changes the scalars
    initial: Mapping[str, str] = field(default_factory=dict)  # slot -> option of its start value
    #: The NumPy class's name (``fastrms.<title>``).
    title: str = ""
    #: The numpy-style description shared by the frontends' docstrings: a summary line, then
    #: the update formula as a ``::`` block (and any notes).
    doc: str = ""
    #: The "Parameters" entries of the options, numpy-style (indented as in the source).
    option_doc: str = ""
    #: The class in :mod:`fastrms.torch` (None: none is generated).
    torch: TorchFace | None = None

    @property
    def rule(self) -> str:
        return self.layout.name

    @property
    def docs(self) -> tuple[str, str]:
        """``doc`` and ``option_doc`` without their source indentation, for docstrings."""
        return inspect.cleandoc(self.doc), textwrap.dedent(self.option_doc).strip("\n")

    @property
    def defaults(self) -> dict[str, Any]:
        """Every option and its default, in signature order."""
        return {o.name: o.default for o in self.options}

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        """The options an optimizer class takes (and keeps as attributes), in order."""
        return tuple(o.name for o in self.options if o.kind != "fixed")

    @property
    def step_options(self) -> tuple[str, ...]:
        """The options of one step (the functional API's keywords)."""
        return tuple(o.name for o in self.options if o.kind != "init")

    def variant(self, name: str, **defaults: Any) -> Spec:
        """The same optimizer under ``name`` with other defaults (AdamW from Adam)."""
        unknown = set(defaults) - set(self.defaults)
        if unknown:
            raise TypeError(f"{self.name} has no options {sorted(unknown)}")
        options = tuple(replace(o, default=defaults.get(o.name, o.default)) for o in self.options)
        return replace(self, name=name, options=options)

    @functools.cached_property
    def _checked(self) -> Callable[..., tuple]:
        options = self.options

        def check(*values):
            return tuple(o.check(o.name, v) for o, v in zip(options, values))

        return _by_value(check)

    @functools.cached_property
    def _names(self) -> tuple[tuple[str, ...], tuple, frozenset, tuple[str, ...]]:
        """Option names, their defaults, the names of init options, and the step options."""
        names = tuple(o.name for o in self.options)
        init = frozenset(o.name for o in self.options if o.kind == "init")
        return names, tuple(o.default for o in self.options), init, self.step_options

    def check(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` (any subset; the rest take their defaults) checked, by name.

        Raises ``TypeError`` for an unknown name or a value of the wrong type, ``ValueError``
        for one out of range; each names the option.
        """
        return dict(zip(self._names[0], self._check_values(options)))

    def _check_values(self, options: Mapping[str, Any]) -> tuple:
        names, defaults, _, _ = self._names
        if len(options) != len(names) or not options.keys() <= set(names):
            if not options.keys() <= set(names):
                unknown = sorted(set(options) - set(names))
                raise TypeError(f"{self.name} got unexpected options {unknown}")
            values = tuple(options.get(k, d) for k, d in zip(names, defaults))
        else:
            values = tuple(map(options.__getitem__, names))
        return self._checked(*values)

    def setup(self, step: int = 1, **options: Any) -> Setup:
        """Check ``options`` and compute the scalars of step ``step`` (counting from 1)."""
        if type(step) is not int or step < 1:
            step = hyper.step("step", step)
        checked = self._check_values(options)
        if self.counts_steps:  # new scalars every step: a cache would only miss
            return self._prepared.__wrapped__(step, checked)
        return self._prepared(1, checked)

    def stepper(self, **options: Any) -> Callable[[int], Setup]:
        """Check ``options`` once; return ``setup_at(step)``, the :class:`Setup` of step
        ``step`` (an int >= 1, not checked again) for these options.

        For a loop that steps many times with the same options: :meth:`setup` checks the
        options at every call, this only computes each step's scalars.
        """
        checked = self._check_values(options)
        if not self.counts_steps:
            setup = self._prepared(1, checked)
            return lambda step: setup
        kwargs, make = self._keywords(checked), self._make_setup
        return lambda step: make(step, kwargs)

    def _keywords(self, checked: tuple) -> dict[str, Any]:
        """Checked values as ``prepare``'s keywords (every option but the init ones)."""
        names, _, init, _ = self._names
        return {n: v for n, v in zip(names, checked) if n not in init}

    def _make_setup(self, step: int, kwargs: dict[str, Any]) -> Setup:
        scalars, flags, state = self.prepare(step, **kwargs)
        layout = self.layout
        return Setup(
            layout.name,
            tuple(map(flags.__getitem__, layout.flags)),
            tuple(map(scalars.__getitem__, layout.scalars)),
            state,
        )

    @functools.cached_property
    def _prepared(self) -> Callable[[int, tuple], Setup]:
        """``prepare`` on checked values, as a :class:`Setup`; cached by value (for a spec
        whose scalars do not depend on the step, a training loop computes them once)."""

        def prepared(step: int, checked: tuple) -> Setup:
            return self._make_setup(step, self._keywords(checked))

        return _by_value(prepared)


def check_fits_float32(layout: Layout, scalars: tuple) -> None:
    """Hyperparameters valid in float64 can still overflow float32, or eps underflow to 0."""
    eps = layout.eps_index
    if (
        max(scalars, default=0.0) <= F32_MAX
        and min(scalars, default=0.0) >= -F32_MAX
        and (eps is None or not 0 < scalars[eps] < F32_TINY)
    ):
        return
    for (name, formula), x in zip(layout.scalars.items(), scalars):
        if abs(x) > F32_MAX or (name == "eps" and np.float32(x) == 0):
            raise ValueError(f"{formula} = {x!r} does not fit in float32, the arrays' dtype")


def _by_value(check):
    """Cache a check by its arguments' values and types (1, 1.0 and True are different keys),
    so a training loop pays for it once. Unhashable arguments (a list, an array) are checked
    every time."""
    cached = functools.lru_cache(maxsize=1024, typed=True)(check)

    @functools.wraps(check)
    def checked(*args):
        try:
            hash(args)
        except TypeError:
            return check(*args)
        return cached(*args)

    return checked


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
            ("square_avg", "momentum_buffer", "grad_avg"),
            {"lr": "lr", "alpha": "alpha", "one_minus_alpha": "1 - alpha", "eps": "eps",
             "weight_decay": "weight_decay", "sign": "sign", "momentum": "momentum"},
            ("centered", "use_momentum", "eps_in_sqrt"),
        ),
        Layout(
            "adagrad",
            ("state_sum",),
            {"clr": "lr / (1 + (step - 1) * lr_decay)", "eps": "eps",
             "weight_decay": "weight_decay", "sign": "sign"},
            ("eps_in_sqrt",),
        ),
        Layout(
            "adam",
            ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
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
            ("exp_avg", "exp_inf"),
            {"clr": "lr / (1 - beta1**step)", "beta1": "beta1", "one_minus_beta1": "1 - beta1",
             "beta2": "beta2", "eps": "eps", "weight_decay": "weight_decay", "sign": "sign"},
            (),
        ),
        Layout(
            "adadelta",
            ("square_avg", "acc_delta"),
            {"lr": "lr", "rho": "rho", "one_minus_rho": "1 - rho", "eps": "eps",
             "weight_decay": "weight_decay", "sign": "sign"},
            (),
        ),
        Layout(
            "radam",
            ("exp_avg", "exp_avg_sq"),
            {"step_size": "lr * rect / (1 - beta1**step) (rect = 1 unless rectified)",
             "bias_correction2_sqrt": "sqrt(1 - beta2**step)",
             "beta1": "beta1", "one_minus_beta1": "1 - beta1", "beta2": "beta2",
             "one_minus_beta2": "1 - beta2", "eps": "eps", "weight_decay": "weight_decay",
             "decay": "1 - lr * weight_decay", "sign": "sign"},
            ("rectify",),
        ),
        Layout(
            "nadam",
            ("exp_avg", "exp_avg_sq"),
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
