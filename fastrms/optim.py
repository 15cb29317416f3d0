"""Optimizer classes: they own the state and run each step as one grouped call.

Parameters come as one array, a list or tuple of arrays, or a dict of name -> array; ``step``
takes the gradients in the same structure. Hyperparameters are plain attributes that may be
changed between steps (``opt.lr = 0.5 * opt.lr``). State starts at zero (AdaGrad: at
``initial_accumulator_value``), on the parameters' device, and is created when first needed.

Each class is declared by its :class:`fastrms.specs.Spec`: the hyperparameters, their defaults
and the constructor's signature come from it. A step reuses a :class:`fastrms.grouped.StepPlan`
made at the first step (and remade only when the options change which state or kernel is
used), so it checks only the gradients and the hyperparameters' values.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

from . import dispatch, specs
from .arrays import DEVICE, FLOAT_DTYPES, check_no_overlap, describe
from .grouped import StepPlan

Params = Any  # an array, a list/tuple of arrays, or a dict of str -> array

#: Each optimizer class by its spec's name (``"adam"``: :class:`Adam`), filled as they are made.
OPTIMIZERS: dict[str, type[Optimizer]] = {}


def _init_from(spec: specs.Spec):
    """An ``__init__(self, params, <hyperparameters>, backend="auto")`` for ``spec``."""
    P = inspect.Parameter
    signature = inspect.Signature(
        [P("self", P.POSITIONAL_OR_KEYWORD), P("params", P.POSITIONAL_OR_KEYWORD)]
        + [P(h, P.POSITIONAL_OR_KEYWORD, default=spec.defaults[h]) for h in spec.hyperparameters]
        + [P("backend", P.POSITIONAL_OR_KEYWORD, default="auto")]
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        del values["self"]
        Optimizer.__init__(self, values.pop("params"), values.pop("backend"), **values)

    __init__.__signature__ = signature
    return __init__


class Optimizer:
    """Base class: parameter structure, state, steps, and state dicts.

    A subclass sets ``spec``; its ``__init__`` (``params``, the spec's hyperparameters with
    their defaults, then ``backend``) is made from the spec unless it defines one.
    """

    spec: ClassVar[specs.Spec]
    #: Hyperparameter names, in ``__init__`` order; each is an attribute.
    hyperparameters: ClassVar[tuple[str, ...]]
    rule: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        spec = cls.__dict__.get("spec")
        if spec is None:
            return
        cls.hyperparameters = spec.hyperparameters
        cls.rule = spec.rule
        OPTIMIZERS[spec.name] = cls
        if "__init__" not in cls.__dict__:
            cls.__init__ = _init_from(spec)

    def __init__(self, params: Params, backend: str = "auto", **hyper: Any) -> None:
        self._structure, self._keys, self._params = _flatten(params, "params")
        if not self._params:
            raise ValueError("params is empty")
        self._pnames, self._gnames = self._names("params"), self._names("grads")
        _check_params(self._params, self._pnames)
        if backend not in dispatch.CHOICES:
            raise ValueError(f"backend must be one of {dispatch.CHOICES}, got {backend!r}")
        self.backend = backend
        for name, value in hyper.items():
            setattr(self, name, value)
        self.step_count = 0
        self.state: dict[str, list] = {}
        self._plan: StepPlan | None = None
        self._created: list[tuple[str, int]] = []  # state made for a plan not yet run
        self._setup(1, self._hyper())  # check the hyperparameters now, not at the first step

    def _setup(self, step: int, hyper: dict[str, Any]) -> specs.Setup:
        """Check the hyperparameters ``hyper`` and compute the scalars of step ``step``."""
        return self.spec.setup(step, **hyper)

    def _hyper(self) -> dict[str, Any]:
        return {h: getattr(self, h) for h in self.hyperparameters}

    def _initial_value(self, state_name: str) -> float:
        option = self.spec.initial.get(state_name)
        return 0.0 if option is None else float(getattr(self, option))

    # -- stepping ------------------------------------------------------------------------

    def step(self, grads: Params) -> None:
        """Update every parameter in place from ``grads`` (same structure as ``params``).

        Everything is checked first; if anything is wrong, no array is changed.
        """
        self._checked_step(grads)()

    def _checked_step(self, grads: Params) -> Callable[[], None]:
        """Check a step with ``grads`` (raising as :meth:`step` does, writing nothing);
        return the call that takes it. Until that call, :meth:`_forget_created` undoes it."""
        grads = self._grads_of(grads)
        count = self.step_count
        if type(count) is not int:
            if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
                raise TypeError(f"step_count must be an int >= 0, got {count!r}")
        if count < 0:
            raise ValueError(f"step_count must be an int >= 0, got {count!r}")
        setup = self._setup(count + 1, self._hyper())
        plan = self._plan
        if plan is None or not plan.matches(setup, self.state, self.backend):
            plan = self._new_plan(setup)
        try:
            hypers = plan.check(grads, setup)
        except (TypeError, ValueError):
            self._forget_created()
            raise

        def take() -> None:
            plan.launch(hypers, grads)
            self._created = []
            self.step_count = count + 1

        return take

    def _grads_of(self, grads: Params) -> list:
        if self._structure == "list" and isinstance(grads, (list, tuple)):
            if len(grads) != len(self._params):
                raise ValueError(
                    f"grads has {len(grads)} arrays but params has {len(self._params)}"
                )
            return grads if isinstance(grads, list) else list(grads)
        structure, keys, grads = _flatten(grads, "grads")
        self._match(structure, keys)
        if structure == "dict":  # pair by key, whatever the order of the grads dict
            by_key = dict(zip(keys, grads))
            grads = [by_key[k] for k in self._keys]
        return grads

    def _new_plan(self, setup: specs.Setup) -> StepPlan:
        self._plan = None
        n = len(self._params)
        for name in setup.state:
            arrays = self.state.get(name, [])
            if name in self.state and (type(arrays) is not list or len(arrays) != n):
                what = f"{len(arrays)} items" if isinstance(arrays, list) else repr(arrays)[:40]
                raise ValueError(
                    f"state[{name!r}] must be a list of one array per parameter ({n}), got {what}"
                )
        for name in setup.state:
            for i in range(len(self._params)):
                if self.state.get(name, [None] * len(self._params))[i] is None:
                    self._created.append((name, i))
                self._state(name, i)
        try:
            plan = StepPlan(
                setup, self._params, {s: self.state[s] for s in setup.state}, self._pnames,
                self.backend, self._gnames,
            )  # fmt: skip
        except (TypeError, ValueError):
            self._forget_created()
            raise
        self._plan = plan
        return plan

    def _forget_created(self) -> None:
        """A refused step leaves no trace: the state it made is dropped, and its plan."""
        if not self._created:
            return
        for name, i in self._created:
            self.state[name][i] = None
            if not any(a is not None for a in self.state[name]):
                del self.state[name]
        self._created = []
        self._plan = None

    def _state(self, name: str, i: int):
        arrays = self.state.setdefault(name, [None] * len(self._params))
        if arrays[i] is None:
            slot = self.spec.layout.slots.index(name) + 1
            arrays[i] = _full_like(self._params[i], self._initial_value(name), slot)
        return arrays[i]

    # -- structure -------------------------------------------------------------------------

    def _names(self, what: str) -> list[str]:
        if self._structure == "array":
            return [what]
        return [f"{what}[{k!r}]" for k in self._keys]

    def _match(self, structure: str, keys: list) -> None:
        if structure != self._structure:
            raise TypeError(
                f"grads must be structured like params (a {self._structure}), got {structure}"
            )
        if self._structure == "dict" and set(keys) != set(self._keys):
            missing = sorted(set(self._keys) - set(keys), key=str)
            extra = sorted(set(keys) - set(self._keys), key=str)
            raise ValueError(
                f"grads keys differ from params keys: missing {missing}, unexpected {extra}"
            )
        if len(keys) != len(self._keys):
            raise ValueError(f"grads has {len(keys)} arrays but params has {len(self._keys)}")

    # -- state dicts -------------------------------------------------------------------------

    def _state_key(self, name: str, i: int) -> str:
        return f"state.{name}" if self._structure == "array" else f"state.{name}.{self._keys[i]}"

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state as plain Python and NumPy values.

        Keys: ``"optimizer"`` (the class name), ``"step"``, ``"hyper.<name>"`` for each
        hyperparameter, and ``"state.<buffer>[.<param key>]"`` for each state array (host
        copies). It round-trips through ``np.savez(f, **sd)`` and ``dict(np.load(f))``.
        """
        try:  # create the state these options need, so that the dict loads back as it is
            needed = self._setup(self.step_count + 1, self._hyper()).state
        except (TypeError, ValueError):  # bad hyperparameters: load_state_dict will say so
            needed = ()
        for name in needed:
            for i in range(len(self._params)):
                self._state(name, i)
        sd: dict[str, Any] = {"optimizer": type(self).__name__, "step": self.step_count}
        for name in self.hyperparameters:
            value = getattr(self, name)
            sd[f"hyper.{name}"] = tuple(value) if isinstance(value, (list, tuple)) else value
        for name, arrays in self.state.items():
            for i, a in enumerate(arrays):
                if a is not None:
                    sd[self._state_key(name, i)] = _backend_of(a).to_host(a)
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`, exactly; hyperparameters included.

        Raises ``ValueError`` (and changes nothing) if it comes from another optimizer class,
        another parameter structure, or arrays of other shapes or dtypes.
        """
        sd = dict(state_dict)
        name = _plain(sd.pop("optimizer", None))
        if name != type(self).__name__:
            raise ValueError(f"state_dict is from optimizer {name!r}, not {type(self).__name__!r}")
        step = _plain(sd.pop("step", None))
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"state_dict has an invalid step {step!r}")
        hyper = {}
        for h in self.hyperparameters:
            if f"hyper.{h}" not in sd:
                raise ValueError(f"state_dict lacks hyperparameter {h!r}")
            hyper[h] = _plain(sd.pop(f"hyper.{h}"))
        setup = self._setup(int(step) + 1, hyper)
        arrays = {}
        # Every buffer these options use must be there; the others of the rule (kept from
        # options switched off since) may be.
        for s in self.spec.layout.slots:
            for i, p in enumerate(self._params):
                key = self._state_key(s, i)
                if key not in sd:
                    if s not in setup.state:
                        continue
                    raise ValueError(f"state_dict lacks {key!r} (for these params and options)")
                a = np.asarray(sd.pop(key))
                info = describe(p, "param")
                if a.shape != info.shape or a.dtype != info.dtype:
                    raise ValueError(
                        f"state_dict[{key!r}] has shape {a.shape} and dtype {a.dtype}, but the "
                        f"parameter has shape {info.shape} and dtype {info.dtype}"
                    )
                arrays[s, i] = a
        if sd:
            raise ValueError(f"state_dict has unexpected keys {sorted(sd)}")
        for h, value in hyper.items():
            setattr(self, h, value)
        self.step_count = int(step)
        self.state = {}
        for (s, i), a in arrays.items():
            dst = self._state(s, i)
            _backend_of(dst).copy_from_host(dst, a)

    def __repr__(self) -> str:
        hyper = ", ".join(f"{h}={getattr(self, h)!r}" for h in self.hyperparameters)
        return f"{type(self).__name__}({len(self._params)} arrays, {hyper})"


# -- the optimizers ----------------------------------------------------------------------------


class RMSProp(Optimizer):
    """RMSProp, PyTorch's defaults and semantics; eps inside the sqrt on request.

    ::

        g = grad (or -grad if maximize) + weight_decay * p
        v = alpha * v + (1 - alpha) * g**2
        centered:  m = alpha * m + (1 - alpha) * g;  v_hat = v - m**2   (else v_hat = v)
        d = sqrt(v_hat) + eps             (PyTorch; eps_in_sqrt=False)
        d = sqrt(v_hat + eps)             (TF/Keras, Optax eps_in_sqrt=True, tutorials)
        momentum > 0:  b = momentum * b + g / d;  p = p - lr * b
        else:          p = p - lr * g / d

    Parameters
    ----------
    params : array, list/tuple of arrays, or dict of str -> array
        float32 or float64, C-contiguous, writeable; NumPy arrays or CUDA arrays.
    lr, alpha, eps, weight_decay, momentum, centered, maximize
        As ``torch.optim.RMSprop``, same defaults.
    eps_in_sqrt : bool
        Put eps inside the square root. Not in PyTorch (pytorch issue 23796).
    backend : {"auto", "cuda", "cpu", "numpy"}
        ``auto`` picks from the array type; see :mod:`fastrms.dispatch`.

    See Also
    --------
    RMSProp.graves : Chainer's RMSpropGraves preset.
    """

    spec = specs.RMSPROP

    @classmethod
    def graves(
        cls,
        params: Params,
        lr: float = 1e-4,
        alpha: float = 0.95,
        momentum: float = 0.9,
        eps: float = 1e-4,
        **options: Any,
    ) -> RMSProp:
        """Chainer's ``RMSpropGraves`` (Graves 2013, eq. 38-41), with its defaults.

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


class AdaGrad(Optimizer):
    """AdaGrad, PyTorch's defaults and semantics; eps inside the sqrt on request.

    ::

        g = grad (or -grad if maximize) + weight_decay * p
        clr = lr / (1 + (t - 1) * lr_decay)
        s = s + g**2                         (s starts at initial_accumulator_value)
        p = p - clr * g / (sqrt(s) + eps)    or, with eps_in_sqrt:  p - clr * g / sqrt(s + eps)

    Keras and Optax put eps inside the sqrt and start at 0.1:
    ``AdaGrad(p, initial_accumulator_value=0.1, eps=1e-7, eps_in_sqrt=True)``.
    """

    spec = specs.ADAGRAD


class Adam(Optimizer):
    """Adam (and AMSGrad), PyTorch's defaults and semantics, L2 weight decay.

    ::

        g = grad (or -grad if maximize) + weight_decay * p
        m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g**2
        amsgrad:  v_max = max(v_max, v), used in place of v
        p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)
    """

    spec = specs.ADAM


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay (``torch.optim.AdamW``), weight_decay=1e-2.

    ::

        p = (1 - lr * weight_decay) * p, then the Adam update with g = grad (no L2 term)
    """

    spec = specs.ADAMW


class SGD(Optimizer):
    """SGD with optional momentum, dampening and Nesterov momentum (``torch.optim.SGD``).

    ::

        g = grad (or -grad if maximize) + weight_decay * p
        momentum > 0:  b = momentum * b + (1 - dampening) * g      (first step: b = g)
                       g = g + momentum * b  (nesterov)   or   g = b
        p = p - lr * g

    With ``nesterov=True`` the parameter is the look-ahead point ``x + momentum * v`` of
    Sutskever et al. (2013), ``v = momentum * v - lr * grad(x + momentum * v); x = x + v``.
    """

    spec = specs.SGD


class Lion(Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), as in the
    paper's code and Optax's ``lion``; decoupled weight decay.

    ::

        g = grad (or -grad if maximize)
        c = beta1 * m + (1 - beta1) * g
        p = (1 - lr * weight_decay) * p - lr * sign(c)
        m = beta2 * m + (1 - beta2) * g

    Every element moves by exactly ``lr`` (plus decay): the paper advises a learning rate
    3-10x smaller than AdamW's and a weight decay 3-10x larger. One state array (``exp_avg``),
    so a step moves 20 bytes per float32 element, against Adam's 28.

    Parameters
    ----------
    params : array, list/tuple of arrays, or dict of str -> array
    lr : float
        Default 1e-4.
    betas : (float, float)
        Default ``(0.9, 0.99)``.
    weight_decay : float
        Decoupled decay rate, default 0.
    maximize : bool
    backend : {"auto", "cuda", "cpu", "numpy"}
    """

    spec = specs.LION


# -- the optimizers a spec declares without a hand-written class ---------------------------------

_PARAMS_DOC = """params : array, list/tuple of arrays, or dict of str -> array
    float32 or float64, C-contiguous, writeable; NumPy arrays or CUDA arrays."""
_BACKEND_DOC = """backend : {"auto", "cuda", "cpu", "numpy"}
    ``auto`` picks from the array type; see :mod:`fastrms.dispatch`."""


def declare(spec: specs.Spec) -> type[Optimizer]:
    """The optimizer class of ``spec``, named ``spec.title``, documented from the spec."""
    doc, options = spec.docs
    doc += f"\n\nParameters\n----------\n{_PARAMS_DOC}\n{options}\n{_BACKEND_DOC}"
    namespace = {"spec": spec, "__doc__": doc, "__module__": __name__, "__qualname__": spec.title}
    return type(spec.title, (Optimizer,), namespace)


for _spec in specs.SPECS.values():
    if _spec.name not in OPTIMIZERS:
        globals()[_spec.title] = declare(_spec)
del _spec


# -- helpers -------------------------------------------------------------------------------------


def _flatten(params: Params, what: str) -> tuple[str, list, list]:
    if isinstance(params, Mapping):
        keys = list(params)
        for k in keys:
            if not isinstance(k, str):
                raise TypeError(f"{what} dict keys must be str, got {k!r}")
        return "dict", keys, list(params.values())
    if isinstance(params, (list, tuple)):
        return "list", list(range(len(params))), list(params)
    return "array", [None], [params]


def _check_params(params: list, names: list[str]) -> None:
    for p, name in zip(params, names):
        info = describe(p, name)
        if info.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have dtype float32 or float64, got {info.dtype}")
        if not info.c_contiguous:
            raise ValueError(f"{name} is not C-contiguous")
        if not info.writeable:
            raise ValueError(f"{name} is read-only; fastrms updates it in place")
    check_no_overlap([(name, p, True) for p, name in zip(params, names)])


def _backend_of(a):
    return dispatch.get("cuda" if describe(a, "array").kind == DEVICE else "numpy")


def _full_like(p, value: float, slot: int):
    """A state array like ``p`` on ``p``'s side (host or device), filled with ``value``."""
    backend = _backend_of(p)
    a = backend.zeros_like(p, slot)
    if value:
        info = describe(p, "param")
        backend.copy_from_host(a, np.full(info.shape, value, info.dtype))
    return a


def _plain(x):
    """A value from np.load (0-d or small arrays) back to plain Python."""
    if isinstance(x, np.ndarray):
        return x.item() if x.ndim == 0 else tuple(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x
