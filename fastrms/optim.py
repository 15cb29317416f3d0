"""Optimizer classes: they own the state and call :mod:`fastrms.functional` once per array.

Parameters come as one array, a list or tuple of arrays, or a dict of name -> array; ``step``
takes the gradients in the same structure. Hyperparameters are plain attributes that may be
changed between steps (``opt.lr = 0.5 * opt.lr``). State starts at zero (AdaGrad: at
``initial_accumulator_value``), on the parameters' device, and is created when first needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from . import dispatch, functional
from . import hyper as checks
from .arrays import DEVICE, FLOAT_DTYPES, describe, extent

Params = Any  # an array, a list/tuple of arrays, or a dict of str -> array


class Optimizer:
    """Base class: parameter structure, state, steps, and state dicts."""

    rule: ClassVar[str]
    #: Hyperparameter names, in ``__init__`` order; each is an attribute.
    hyperparameters: ClassVar[tuple[str, ...]]

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
        self._setup(1, self._hyper())  # check the hyperparameters now, not at the first step

    # -- what each optimizer defines -----------------------------------------------------

    def _setup(self, step: int, hyper: dict[str, Any]) -> functional.Setup:
        """Check the hyperparameters ``hyper`` and compute the scalars of step ``step``."""
        raise NotImplementedError

    def _hyper(self) -> dict[str, Any]:
        return {h: getattr(self, h) for h in self.hyperparameters}

    def _initial_value(self, state_name: str) -> float:
        return 0.0

    # -- stepping ------------------------------------------------------------------------

    def step(self, grads: Params) -> None:
        """Update every parameter in place from ``grads`` (same structure as ``params``).

        Everything is checked first; if anything is wrong, no array is changed.
        """
        structure, keys, grads = _flatten(grads, "grads")
        self._match(structure, keys)
        if structure == "dict":  # pair by key, whatever the order of the grads dict
            by_key = dict(zip(keys, grads))
            grads = [by_key[k] for k in self._keys]
        setup = self._setup(self.step_count + 1, self._hyper())
        created: list[tuple[str, int]] = []
        try:
            plans = [self._plan(setup, i, g, created) for i, g in enumerate(grads)]
            if len(plans) > 1:
                _check_no_overlap(self._arrays_of(setup, grads))
        except (TypeError, ValueError):
            for name, i in created:  # a refused step leaves no trace, new buffers included
                self.state[name][i] = None
                if not any(a is not None for a in self.state[name]):
                    del self.state[name]
            raise
        for plan in plans:
            plan.run()
        self.step_count += 1

    def _plan(self, setup: functional.Setup, i: int, grad, created: list) -> functional.Plan:
        state = {}
        for name in setup.state:
            if self.state.get(name, [None])[i] is None:
                created.append((name, i))
            state[name] = self._state(name, i)
        try:
            return functional.plan(setup, self._params[i], grad, state, self.backend)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{self._gnames[i]}: {exc}") from None

    def _arrays_of(self, setup: functional.Setup, grads: list) -> list[tuple[str, Any, bool]]:
        """``(label, array, written)`` for every array of the step, for the overlap check."""
        arrays = []
        for i, (p, g) in enumerate(zip(self._params, grads)):
            arrays += [(self._pnames[i], p, True), (self._gnames[i], g, False)]
            arrays += [(f"{s} of {self._pnames[i]}", self.state[s][i], True) for s in setup.state]
        return arrays

    def _state(self, name: str, i: int):
        arrays = self.state.setdefault(name, [None] * len(self._params))
        if arrays[i] is None:
            slot = functional.SLOTS[self.rule].index(name) + 1
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
        for s in functional.SLOTS[self.rule]:
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

    rule = "rmsprop"
    hyperparameters = (
        "lr", "alpha", "eps", "weight_decay", "momentum", "centered", "eps_in_sqrt", "maximize"
    )  # fmt: skip

    def __init__(
        self,
        params: Params,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        eps_in_sqrt: bool = False,
        maximize: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            params, backend, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
            momentum=momentum, centered=centered, eps_in_sqrt=eps_in_sqrt, maximize=maximize,
        )  # fmt: skip

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

    def _setup(self, step: int, hyper: dict[str, Any]) -> functional.Setup:
        return functional.rmsprop_setup(**hyper)


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

    rule = "adagrad"
    hyperparameters = (
        "lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps", "eps_in_sqrt",
        "maximize",
    )  # fmt: skip

    def __init__(
        self,
        params: Params,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        eps_in_sqrt: bool = False,
        maximize: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            params, backend, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, eps=eps,
            eps_in_sqrt=eps_in_sqrt, maximize=maximize,
        )  # fmt: skip

    def _setup(self, step: int, hyper: dict[str, Any]) -> functional.Setup:
        options = dict(hyper)
        checks.nonneg("initial_accumulator_value", options.pop("initial_accumulator_value"))
        return functional.adagrad_setup(step=step, **options)

    def _initial_value(self, state_name: str) -> float:
        return float(self.initial_accumulator_value)


class Adam(Optimizer):
    """Adam (and AMSGrad), PyTorch's defaults and semantics, L2 weight decay.

    ::

        g = grad (or -grad if maximize) + weight_decay * p
        m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g**2
        amsgrad:  v_max = max(v_max, v), used in place of v
        p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)
    """

    rule = "adam"
    hyperparameters = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
    decoupled_weight_decay: ClassVar[bool] = False

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        maximize: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            params, backend, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            amsgrad=amsgrad, maximize=maximize,
        )  # fmt: skip

    def _setup(self, step: int, hyper: dict[str, Any]) -> functional.Setup:
        return functional.adam_setup(
            step=step, decoupled_weight_decay=self.decoupled_weight_decay, **hyper
        )


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay (``torch.optim.AdamW``), weight_decay=1e-2.

    ::

        p = (1 - lr * weight_decay) * p, then the Adam update with g = grad (no L2 term)
    """

    decoupled_weight_decay = True

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize, backend)


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

    rule = "sgd"
    hyperparameters = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            params, backend, lr=lr, momentum=momentum, dampening=dampening,
            weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
        )  # fmt: skip

    def _setup(self, step: int, hyper: dict[str, Any]) -> functional.Setup:
        return functional.sgd_setup(step=step, **hyper)


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
    _check_no_overlap([(name, p, True) for p, name in zip(params, names)])


def _check_no_overlap(arrays: list[tuple[str, Any, bool]]) -> None:
    """Raise ValueError if an array that is written overlaps any other array.

    ``arrays`` holds ``(label, array, written)``; gradients (not written) may share memory.
    One sweep over the arrays sorted by address, so many small tensors stay cheap.
    """
    spans = []
    for label, a, written in arrays:
        start, nbytes = extent(a)
        if nbytes:
            spans.append((start, start + nbytes, label, written))
    spans.sort(key=lambda s: s[0])
    reach_any = reach_written = (-1, "")  # furthest end so far, and whose
    for start, end, label, written in spans:
        reach, other = reach_any if written else reach_written
        if start < reach:
            raise ValueError(f"{label} overlaps {other} in memory; pass separate arrays")
        if end > reach_any[0]:
            reach_any = (end, label)
        if written and end > reach_written[0]:
            reach_written = (end, label)


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
