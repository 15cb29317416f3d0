"""What :mod:`fastrms.torch` checks before a step writes anything, and how it names what it
refuses: parameters, gradients, state tensors and hyperparameters (torch's spellings of
them: 1-element tensors, pairs of them), and torch options fastrms does not support.

Every check raises ``TypeError``/``ValueError`` naming the parameter or option.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .specs import LAYOUTS, Setup, check_fits_float32
from .torch_layout import KERNEL_DTYPE, OVERLAPPING, layout_of

#: torch options that fastrms refuses when True (torch.optim has them for CUDA graphs and
#: for differentiating through the step).
REFUSED_FLAGS = ("capturable", "differentiable")


def refuse_flags(owner: str, group: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` if ``group`` sets one of :data:`REFUSED_FLAGS`; ``owner``: the
    class, as in ``fastrms.torch.Adam``."""
    for flag in REFUSED_FLAGS:
        if group.get(flag):
            raise ValueError(f"{owner}: {flag}=True is not supported (use torch.optim for it)")


def param_name(group: dict, gi: int, pi: int, p: torch.Tensor) -> str:
    """The ``pi``-th parameter of param group ``gi`` as errors name it (with its name from
    ``param_names`` where the group has them)."""
    where = f"param_groups[{gi}]['params'][{pi}]"
    names = group.get("param_names")
    if names is not None and pi < len(names):
        where = f"{names[pi]!r} ({where})"
    return f"parameter {where} (shape {tuple(p.shape)}, {p.dtype}, {p.device})"


class Label:
    """A parameter's name in an overlap error, made only if the error is raised."""

    __slots__ = ("name", "prefix", "where")

    def __init__(self, name: Callable[..., str], where: tuple, prefix: str = "") -> None:
        self.name, self.where, self.prefix = name, where, prefix

    def of(self, prefix: str) -> Label:
        return Label(self.name, self.where, prefix)

    def __str__(self) -> str:
        return self.prefix + self.name(*self.where)


def check_param(
    owner: str,
    what: str,
    p: torch.Tensor,
    st: dict | None,
    names: tuple,
    held: torch.dtype | None = None,
) -> None:
    """Refuse parameter ``p`` (named ``what``) if the kernels cannot step it, or its state
    ``st`` (torch's state names ``names`` and ``"step"``) if it does not fit it: each state
    tensor must have ``p``'s shape and device and dtype ``held`` (default ``p``'s)."""
    if p.layout is not torch.strided:
        raise TypeError(f"{owner} does not support sparse parameters: {what}")
    if p.dtype not in KERNEL_DTYPE:
        raise TypeError(
            f"{owner} supports float32 and float64 tensors (and bfloat16, and complex64 and "
            f"complex128, stepped as their real views) only: {what}"
        )
    if p.device.type not in ("cpu", "cuda"):
        raise TypeError(f"{owner} runs on CPU and CUDA tensors only: {what}")
    if layout_of(p) == OVERLAPPING:
        raise ValueError(
            f"{owner} cannot update in place a parameter whose elements may share memory "
            f"(an expanded tensor, a stride of 0): {what}"
        )
    if not st:
        return
    step = st.get("step")
    if step is not None and not (torch.is_tensor(step) and step.numel() == 1):
        desc = f"shape {tuple(step.shape)}" if torch.is_tensor(step) else type(step).__name__
        raise ValueError(f"state['step'] ({desc}) of {what} must be a 1-element tensor")
    held = p.dtype if held is None else held
    for n in names:
        t = st.get(n)
        if t is None:
            continue
        if not (
            torch.is_tensor(t) and t.dtype is held and t.shape == p.shape and t.device == p.device
        ):
            desc = (
                f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"
                if torch.is_tensor(t)
                else type(t).__name__
            )
            raise ValueError(f"state[{n!r}] ({desc}) does not match {what}")


def check_grad(owner: str, what: str, p: torch.Tensor, g: torch.Tensor) -> None:
    """Refuse gradient ``g`` of parameter ``p`` (named ``what``) if it is sparse or of another
    dtype."""
    if g.layout is not torch.strided:
        raise TypeError(f"{owner} does not support sparse gradients: the gradient of {what}")
    if g.dtype is not p.dtype:
        raise TypeError(f"the gradient of {what} has dtype {g.dtype}")


@functools.lru_cache(maxsize=256)
def check_setup_fits_float32(setup: Setup) -> None:
    """Scalars valid in float64 can overflow float32 or (eps) underflow to 0; found here, before
    any bucket is written, rather than by the launch of a later bucket."""
    check_fits_float32(LAYOUTS[setup.rule], setup.scalars)


# -- hyperparameters as torch spells them ------------------------------------------------------


def scalar(name: str, x: Any) -> Any:
    """A hyperparameter as a Python number (torch accepts 1-element tensors, and betas as a
    pair of them)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} as a tensor must have one element, got shape {x.shape}")
        return x.item()
    if isinstance(x, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in x):
        return tuple(scalar(f"{name}[{i}]", v) for i, v in enumerate(x))
    return x


@functools.cache
def hyper_values(keys: tuple[str, ...]) -> Callable[[dict], tuple]:
    """A function of a param group giving the values of ``keys``, as a tuple (in C)."""
    if len(keys) == 1:
        return lambda group: (group[keys[0]],)
    return operator.itemgetter(*keys)


_PLAIN = (float, int, bool, type(None))


def plain(values: tuple) -> bool:
    """Whether ``values`` are Python numbers (or pairs of them): a tensor can change in place,
    so a setup computed from one cannot be kept."""
    for v in values:
        if type(v) not in _PLAIN and not (type(v) is tuple and all(type(x) in _PLAIN for x in v)):
            return False
    return True
