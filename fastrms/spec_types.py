"""What an optimizer declaration is made of: :class:`Layout` (with its :class:`Slot` state
arrays), :class:`Option`, :class:`TorchFace`, :class:`Spec` and the :class:`Setup` of a step.

The optimizers themselves are declared in :mod:`fastrms.specs`, which re-exports these names;
this module holds only the machinery, so that the declarations read as a table.

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

Nothing here imports numba.
"""

from __future__ import annotations

import functools
import inspect
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
    (:mod:`fastrms.precision`). ``sign`` says what values it holds, which a quantized storage
    needs: ``"signed"`` (first moments, momentum: any sign) or ``"unsigned"`` (second moments,
    sums of squares, maxima of them: never negative), whose 8-bit map spends no bit on a sign.
    """

    name: str
    initial: float | str = 0.0
    like: str = "param"
    sign: str = "signed"

    def __post_init__(self) -> None:
        if self.sign not in ("signed", "unsigned"):
            raise ValueError(f"sign must be 'signed' or 'unsigned', got {self.sign!r}")


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
    order, so that ``inspect.signature`` matches ``torch.optim.<name>``'s. A fixed option of
    the spec (AdamW's ``decoupled_weight_decay``) that the signature leaves out is set in
    every param group.
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
    #: Whether the state is made when the optimizer is (torch's Adagrad), not on first step.
    eager_state: bool = False
    #: Where the signature and semantics come from, for the docstring.
    origin: str = ""


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
    #: The spec this one is a variant of (AdamW: ``"adam"``); each frontend's class for it
    #: subclasses that spec's class, as torch's AdamW subclasses its Adam.
    base: str | None = None

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


# -- what many specs share ---------------------------------------------------------------------


def maximize_sign(maximize: bool) -> float:
    """The gradient's sign in a rule: -1 to maximize, else 1."""
    return -1.0 if maximize else 1.0


def betas_of(name: str, b) -> tuple[float, float]:
    """The checked ``(beta1, beta2)`` of option ``name``."""
    return hyper.betas(name, b)


#: torch's arguments that fastrms accepts and ignores (foreach) or refuses when True.
TORCH_EXTRA = dict(foreach=None, capturable=False, differentiable=False)
MAXIMIZE = Option("maximize", False, hyper.flag)
WEIGHT_DECAY = Option("weight_decay", 0.0, hyper.nonneg, example=0.1)
