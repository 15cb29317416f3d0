"""``torch.optim`` drop-ins backed by fastrms's fused kernels.

::

    import fastrms.torch
    opt = fastrms.torch.Adam(model.parameters(), lr=1e-3)   # was torch.optim.Adam(...)

Each class is a :class:`torch.optim.Optimizer` with torch's signature, defaults, parameter
groups and state (torch's buffer names, ``state["step"]`` a float32 0-d tensor), so that
``state_dict()`` has torch's format: a checkpoint of ``torch.optim.Adam`` loads into
``fastrms.torch.Adam`` and back. Schedulers, ``torch.amp.GradScaler``, optimizer hooks and
``torch.distributed.optim.ZeroRedundancyOptimizer`` work as with torch's own classes.

A step sorts the parameters that have a gradient into buckets of (param group, device, dtype,
step count) and updates each bucket with one grouped call (a cached
:class:`fastrms.grouped.StepPlan`): CPU tensors on the ``cpu`` kernels, reached by address
(zero-copy), in parallel on torch's own OpenMP threads (:func:`fastrms.teams.torch_team`) from
:data:`TEAM_THRESHOLD` elements; CUDA tensors on the ``cuda`` kernels, on torch's current
stream. Parameters whose ``.grad`` is None are skipped. A step that repeats the last one (the
same parameters with gradients, the same state and data tensors, each bucket's step count one
further) reuses the last step's buckets and plans after checking only what can change between
steps (:mod:`fastrms.torch_repeat`).

Differences from ``torch.optim``:

- float32/float64 tensors in any layout, and complex64/complex128 ones stepped as their real
  views (:mod:`fastrms.torch_layout`: dense parameters in another order than contiguous are
  stepped over their memory, strided views through a contiguous buffer). A sparse gradient,
  another dtype or a tensor whose elements share memory is refused with an error naming the
  parameter, before anything is written.
- ``eps`` must be > 0 and RMSprop's ``alpha`` at most 1; ``capturable=True`` and
  ``differentiable=True`` are refused. ``foreach`` and ``fused`` are accepted and ignored:
  every step is fused.
- ``eps_in_sqrt`` (RMSprop, Adagrad) and :meth:`RMSprop.graves` are fastrms's own options;
  :class:`Lion` has no torch counterpart.
- Adagrad starts a parameter's ``sum`` at its own group's ``initial_accumulator_value``
  (torch uses the value given to the constructor for every group).

The classes here give what is torch's (signatures, defaults, state names); the rest comes
from :data:`fastrms.specs.SPECS` through :class:`fastrms.torch_optimizer.FusedOptimizer`.
The step route lives in :mod:`fastrms.torch_buckets` (buckets, the full route) and
:mod:`fastrms.torch_repeat` (the short route), the checks in :mod:`fastrms.torch_checks`,
the memory layouts in :mod:`fastrms.torch_layout`.

Importing this module imports torch; ``import fastrms`` does not.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

# Also read here (by the benchmarks and tests): the specs the classes step by, PyTorch's
# OpenMP team, and the sizes from which a CPU bucket's step runs in parallel.
from .specs import SPECS, Spec
from .teams import torch_team as _torch_team  # noqa: F401
from .torch_buckets import PARALLEL_THRESHOLD, TEAM_THRESHOLD  # noqa: F401
from .torch_optimizer import FusedOptimizer, Params, arguments

# -- the optimizers ----------------------------------------------------------------------------


class RMSprop(FusedOptimizer):
    """RMSprop with ``torch.optim.RMSprop``'s signature, defaults, state and semantics.

    ::

        g = grad (or -grad if maximize) + weight_decay * p
        v = alpha * v + (1 - alpha) * g**2                                   (square_avg)
        centered:  m = alpha * m + (1 - alpha) * g;  v_hat = v - m**2        (grad_avg)
        d = sqrt(v_hat) + eps         (torch)   or   sqrt(v_hat + eps)   (eps_in_sqrt=True)
        momentum > 0:  b = momentum * b + g / d;  p = p - lr * b             (momentum_buffer)
        else:          p = p - lr * g / d

    Parameters
    ----------
    params : iterable of tensors, of (name, tensor) pairs, or of param-group dicts
    lr, alpha, eps, weight_decay, momentum, centered, maximize
        As ``torch.optim.RMSprop``; ``lr`` may be a 1-element tensor.
    eps_in_sqrt : bool
        Put eps inside the square root (TF/Keras, Optax); not in torch (pytorch issue 23796).
    capturable, foreach, differentiable
        torch's; ``foreach`` is ignored, ``capturable``/``differentiable`` must be False.
    """

    _spec_name = "rmsprop"
    _group_defaults = dict(
        momentum=0,
        centered=False,
        foreach=None,
        maximize=False,
        differentiable=False,
        capturable=False,
        eps_in_sqrt=False,
    )

    def __init__(
        self,
        params: Params,
        lr: float | torch.Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        eps_in_sqrt: bool = False,
    ) -> None:
        super().__init__(params, arguments(locals()))

    @classmethod
    def graves(
        cls,
        params: Params,
        lr: float = 1e-4,
        alpha: float = 0.95,
        momentum: float = 0.9,
        eps: float = 1e-4,
        **options: Any,
    ) -> RMSprop:
        """Chainer's ``RMSpropGraves`` (Graves 2013, eq. 38-41), with its defaults: centered
        RMSprop with momentum and eps inside the sqrt (see :meth:`fastrms.RMSProp.graves`)."""
        return cls(
            params,
            lr=lr,
            alpha=alpha,
            eps=eps,
            momentum=momentum,
            centered=True,
            eps_in_sqrt=True,
            **options,
        )


class Adagrad(FusedOptimizer):
    """Adagrad with ``torch.optim.Adagrad``'s signature, defaults, state and semantics.

    ::

        g = grad (or -grad if maximize) + weight_decay * p
        clr = lr / (1 + (step - 1) * lr_decay)
        s = s + g**2                                (sum, starts at initial_accumulator_value)
        p = p - clr * g / (sqrt(s) + eps)    or, with eps_in_sqrt:  p - clr * g / sqrt(s + eps)

    Parameters
    ----------
    params : iterable of tensors, of (name, tensor) pairs, or of param-group dicts
    lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize
        As ``torch.optim.Adagrad``; ``lr`` may be a 1-element tensor.
    eps_in_sqrt : bool
        Put eps inside the square root (Keras, Optax: with ``initial_accumulator_value=0.1``).
    foreach, differentiable, fused
        torch's; ``foreach``/``fused`` are ignored, ``differentiable`` must be False.
    """

    _spec_name = "adagrad"
    _torch_names = {"state_sum": "sum"}
    _group_defaults = dict(
        foreach=None, maximize=False, differentiable=False, fused=None, eps_in_sqrt=False
    )

    def __init__(
        self,
        params: Params,
        lr: float | torch.Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        eps_in_sqrt: bool = False,
    ) -> None:
        super().__init__(params, arguments(locals()))
        for group in self.param_groups:  # torch creates Adagrad's state at once
            for p in group["params"]:
                st = self.state[p]
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["sum"] = self._new_state(group, p, "sum")


class Adam(FusedOptimizer):
    """Adam / AMSGrad with ``torch.optim.Adam``'s signature, defaults, state and semantics.

    ::

        decoupled_weight_decay (AdamW):  p = (1 - lr * weight_decay) * p
        g = grad (or -grad if maximize) + weight_decay * p        (L2 decay: Adam only)
        m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g**2
        amsgrad:  v_max = max(v_max, v), used in place of v             (max_exp_avg_sq)
        p = p - lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)

    Parameters
    ----------
    params : iterable of tensors, of (name, tensor) pairs, or of param-group dicts
    lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay
        As ``torch.optim.Adam``; ``lr`` and ``betas`` may be 1-element tensors.
    foreach, capturable, differentiable, fused
        torch's; ``foreach``/``fused`` are ignored, the others must be False.
    """

    _spec_name = "adam"
    _group_defaults = dict(
        amsgrad=False,
        maximize=False,
        foreach=None,
        capturable=False,
        differentiable=False,
        decoupled_weight_decay=False,
        fused=None,
    )

    def __init__(
        self,
        params: Params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
    ) -> None:
        super().__init__(params, arguments(locals()))


class AdamW(Adam):
    """AdamW: :class:`Adam` with decoupled weight decay, default 1e-2 (``torch.optim.AdamW``).

    ::

        p = (1 - lr * weight_decay) * p, then the Adam update with g = grad (no L2 term)
    """

    _spec_name = "adamw"

    def __init__(
        self,
        params: Params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


class SGD(FusedOptimizer):
    """SGD with ``torch.optim.SGD``'s signature, defaults, state and semantics.

    ::

        g = grad (or -grad if maximize) + weight_decay * p
        momentum > 0:  b = momentum * b + (1 - dampening) * g     (first step: b = g)
                       g = g + momentum * b  (nesterov)   or   g = b
        p = p - lr * g

    As in torch, there is no ``state["step"]``; a parameter's ``momentum_buffer`` is created
    on its first step with momentum, and that step sets it to the gradient.

    Parameters
    ----------
    params : iterable of tensors, of (name, tensor) pairs, or of param-group dicts
    lr, momentum, dampening, weight_decay, nesterov, maximize
        As ``torch.optim.SGD``; ``lr`` and ``weight_decay`` may be 1-element tensors.
    foreach, differentiable, fused
        torch's; ``foreach``/``fused`` are ignored, ``differentiable`` must be False.
    """

    _spec_name = "sgd"
    _keeps_step = False
    _group_defaults = dict(
        nesterov=False, maximize=False, foreach=None, differentiable=False, fused=None
    )

    def __init__(
        self,
        params: Params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | torch.Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, arguments(locals()))


class Lion(FusedOptimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), with the
    signature and state of the ``lion-pytorch`` package; decoupled weight decay.

    ::

        g = grad (or -grad if maximize)
        c = beta1 * m + (1 - beta1) * g
        p = (1 - lr * weight_decay) * p - lr * sign(c)
        m = beta2 * m + (1 - beta2) * g                                  (exp_avg)

    torch has no Lion. Every element moves by exactly ``lr`` (plus decay): use a learning rate
    3-10x smaller than AdamW's and a weight decay 3-10x larger, as the paper advises. Needs a
    fastrms with the Lion rule (:func:`fastrms.functional.lion`).

    Parameters
    ----------
    params : iterable of tensors, of (name, tensor) pairs, or of param-group dicts
    lr : float or 1-element tensor
        Default 1e-4.
    betas : (float, float)
        Default ``(0.9, 0.99)``.
    weight_decay : float
        Default 0.
    maximize : bool
    """

    _spec_name = "lion"
    _keeps_step = False
    _group_defaults = dict(maximize=False)

    def __init__(
        self,
        params: Params,
        lr: float | torch.Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, arguments(locals()))


# -- the optimizers a spec declares without a hand-written class ---------------------------------


def declare(spec: Spec) -> type[FusedOptimizer]:
    """The class of ``spec`` (which has a :class:`fastrms.specs.TorchFace`): torch's name,
    signature and defaults, the spec's docstring, and the rest from :class:`FusedOptimizer`."""
    face = spec.torch
    defaults = {**spec.defaults, **face.extra}
    names = (*face.positional, *face.keyword_only)
    if set(names) != set(spec.hyperparameters) | set(face.extra):
        raise TypeError(f"{face.name}: the arguments {names} are not the spec's and the extra")
    P = inspect.Parameter
    signature = inspect.Signature(
        [P("self", P.POSITIONAL_OR_KEYWORD), P("params", P.POSITIONAL_OR_KEYWORD)]
        + [P(n, P.POSITIONAL_OR_KEYWORD, default=defaults[n]) for n in face.positional]
        + [P(n, P.KEYWORD_ONLY, default=defaults[n]) for n in face.keyword_only]
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        FusedOptimizer.__init__(self, bound.arguments["params"], arguments(bound.arguments))

    __init__.__signature__ = signature
    extra = ", ".join(face.extra)
    doc, options = spec.docs
    doc = (
        f"{face.name} with ``torch.optim.{face.name}``'s signature, defaults, state and "
        f"semantics.\n\n{doc}\n\nParameters\n----------\n"
        "params : iterable of tensors, of (name, tensor) pairs, or of param-group dicts\n"
        f"{options}\n{extra}\n    torch's; ``foreach`` is ignored, ``capturable`` and "
        "``differentiable`` must be False."
    )
    namespace = {
        "__init__": __init__,
        "__doc__": doc,
        "__module__": __name__,
        "__qualname__": face.name,
        "_spec_name": spec.name,
        "_group_defaults": {n: defaults[n] for n in names},
        "_torch_names": dict(face.renames),
        "_keeps_step": face.keeps_step,
        "_scalar_state": dict(face.scalar_state),
    }
    return type(face.name, (FusedOptimizer,), namespace)


def _classes() -> dict[str, type[FusedOptimizer]]:
    """This module's optimizer classes by their spec's name."""
    return {
        c._spec_name: c
        for c in globals().values()
        if isinstance(c, type) and issubclass(c, FusedOptimizer) and "_spec_name" in vars(c)
    }


for _spec in SPECS.values():
    if _spec.torch is not None and _spec.name not in _classes():
        globals()[_spec.torch.name] = declare(_spec)
del _spec

__all__ = sorted(c.__name__ for c in _classes().values())
