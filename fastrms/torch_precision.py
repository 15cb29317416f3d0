"""How :mod:`fastrms.torch` holds optimizer state in another dtype than the parameter's
(``state_dtype=``, issue 18), through the precision policy of :mod:`fastrms.precision`.

- The policy, :func:`fastrms.precision.state_storage`, gives each parameter's state
  :class:`~fastrms.precision.Storage`; :data:`TORCH_DTYPES` says which torch dtype holds it in
  ``opt.state[p]`` (``torch.bfloat16`` for ``"bfloat16"``), so that a state tensor's
  ``nbytes`` is the state's memory and ``state_dict()`` saves the stored form.
- The kernels see a ``bfloat16`` tensor through :func:`kernel_view`: its ``uint16`` patterns
  (the same bits, no copy), as :class:`fastrms.grouped.StepPlan` takes them with
  ``state_dtype="bfloat16"``.
- State goes into the stored form by :func:`to_held` (rounded to nearest even, by
  :func:`fastrms.lowprecision.round_nearest`: the bits fastrms's NumPy classes give) and out
  of it by :func:`to_float32` (exact), for checkpoints.

8-bit blockwise state (``state_dtype="int8"``, float32 parameters of at least 4096
elements) holds two tensors per state slot: ``opt.state[p][n]`` the ``uint8`` codes, laid
out as the parameter, and ``opt.state[p][n + SCALES]`` the float32 scales, one per block of
256 elements in the codes' memory order (:func:`new_int8_state`); the kernels take them as
:class:`fastrms.lowprecision.Quantized` pairs of NumPy views. Checkpoints quantize
(:func:`quantize_into`) and dequantize (:func:`dequantized`) as fastrms's NumPy classes do.

``rounding=`` and ``seed=`` choose how ``torch.bfloat16`` *parameters* are stored back
(refused, naming the parameter, on any other parameter: :func:`storage_for`). Such a
parameter goes to the kernels as its ``uint16`` patterns viewed as ``ml_dtypes.bfloat16``
(:func:`param_view`), its state is float32 unless ``state_dtype="bfloat16"`` or ``"int8"``
(codes and scales as above, for a tensor of at least 4096 elements), and
``rounding="kahan"`` keeps a bfloat16 compensation tensor, ``opt.state[p]["kahan_comp"]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import lowprecision
from .precision import Storage, check_rounding, check_state_dtype, state_storage
from .torch_layout import KERNEL_DTYPE, flat, real, zeros_like

#: The torch dtype that holds each storage that is not a parameter's own dtype (int8: the
#: codes; their scales are float32 tensors of their own, :data:`SCALES`).
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "int8": torch.uint8}

#: Under ``state_dtype="int8"``, state tensor ``n`` of ``opt.state[p]`` holds the ``uint8``
#: codes and ``n + SCALES`` the float32 scales, one per block of 256 elements.
SCALES = "_scales"

#: The values of ``rounding=`` (how a bfloat16 parameter is stored back; issue 18).
ROUNDINGS = ("stochastic", "nearest", "kahan")

_NUMPY_OF = {
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.bfloat16: lowprecision.BFLOAT16,
}


def check_options(state_dtype: str | None, rounding: str | None, seed: int | None) -> None:
    """Refuse an unknown ``state_dtype`` or ``rounding``, or a ``seed`` that is not an int
    (``ValueError``/``TypeError`` naming the option)."""
    check_state_dtype(state_dtype)
    check_rounding(rounding, seed)


def storage_for(
    owner: str, what: str, p: torch.Tensor, state_dtype: str | None, rounding: str | None,
    seed: int | None,
) -> Storage | None:  # fmt: skip
    """The storage of parameter ``p``'s state (named ``what`` in errors), or None where the
    state is held as ``p`` is (a torch parameter's own dtype, complex included). A bfloat16
    parameter's state is float32 (or bfloat16 with ``state_dtype="bfloat16"``).

    Raises ``ValueError`` for ``rounding=``/``seed=`` on a parameter that is not bfloat16 and
    for a ``state_dtype`` the parameter's dtype cannot hold (bfloat16 and int8 state need
    float32 or bfloat16 parameters), ``TypeError``
    for a held form fastrms.torch cannot step (a complex or CUDA parameter with low-precision
    state, a bfloat16 CUDA parameter). Other parameter problems are left to the step's checks.
    """
    low = p.dtype is torch.bfloat16
    if (rounding is not None or seed is not None) and not low:
        option = "rounding=" if rounding is not None else "seed="
        raise ValueError(
            f"{owner}: {option} applies to bfloat16 parameters; {what} is {p.dtype} (its "
            "update is stored exactly as computed)"
        )
    kdtype = KERNEL_DTYPE.get(p.dtype)
    if kdtype is None or (state_dtype is None and not low):
        return None
    storage = state_storage(state_dtype, _NUMPY_OF[kdtype], what)
    if storage.identity and not low:
        return None
    if p.is_complex():
        raise TypeError(
            f"{owner}: state_dtype={state_dtype!r} is for real parameters; {what} is complex"
        )
    if p.device.type != "cpu":
        option = "bfloat16 parameters are" if low else f"state_dtype={state_dtype!r} is"
        raise TypeError(
            f"{owner}: {option} not supported on {p.device.type} tensors yet (CPU only): {what}"
        )
    if storage.name == "int8" and not lowprecision.uses_8bit(p.numel()):
        # A small tensor keeps float32 state, as bitsandbytes does (a bfloat16 one too).
        return state_storage(None, _NUMPY_OF[kdtype], what) if low else None
    return storage


def is_int8(storage: Storage | None) -> bool:
    """Whether ``storage`` holds state blockwise in 8 bits (codes and scales)."""
    return storage is not None and storage.name == "int8"


def _memory(t: torch.Tensor) -> torch.Tensor:
    """A state tensor (contiguous, or dense in its parameter's order) as the 1-D block of
    memory it fills: the order in which the kernels cut it into blocks of 256."""
    return t.view(-1) if t.is_contiguous() else flat(t)


def new_int8_state(
    p: torch.Tensor, slot: int, value: float, signed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``p``'s state held in 8 bits at ``value``: ``uint8`` codes laid out as
    :func:`fastrms.torch_layout.zeros_like` lays them out, and float32 scales, one per
    block (zeros are code 0 with scale 0, as :meth:`fastrms.lowprecision.Quantized.of`
    gives)."""
    codes = zeros_like(p, slot, torch.uint8)
    scales = torch.zeros(lowprecision.n_blocks(p.numel()), dtype=torch.float32)
    if value:
        quantize_into(codes, scales, torch.full(p.shape, value, dtype=torch.float32), signed)
    return codes, scales


def quantize_into(
    codes: torch.Tensor, scales: torch.Tensor, values: torch.Tensor, signed: bool
) -> None:
    """Quantize ``values`` (any float tensor of the codes' shape) into ``codes`` and
    ``scales`` as fastrms's NumPy classes do (:meth:`fastrms.lowprecision.Quantized.of`),
    block by block in the codes' memory order."""
    laid = torch.empty_like(codes, dtype=torch.float32).copy_(values.detach().to("cpu"))
    q = lowprecision.Quantized.of(_memory(laid).numpy(), signed)
    _memory(codes).copy_(torch.from_numpy(q.codes))
    scales.copy_(torch.from_numpy(q.scales))


def check_scales(
    what: str, p: torch.Tensor, codes: torch.Tensor | None, scales: Any, name: str
) -> None:
    """Refuse 8-bit state whose scales (``name``) are missing beside its codes or do not fit
    parameter ``p`` (named ``what``): one float32 CPU scale per block of 256 elements."""
    if codes is None and scales is None:
        return
    n = lowprecision.n_blocks(p.numel())
    if not (
        torch.is_tensor(scales)
        and scales.dtype is torch.float32
        and scales.shape == (n,)
        and scales.device.type == "cpu"
        and scales.is_contiguous()
    ):
        desc = (
            f"shape {tuple(scales.shape)}, {scales.dtype}, {scales.device}"
            if torch.is_tensor(scales)
            else type(scales).__name__
        )
        raise ValueError(
            f"state[{name!r}] ({desc}) does not fit {what}: 8-bit state needs {n} float32 "
            "scales, one per block of 256 elements"
        )


def dequantized(codes: torch.Tensor, scales: torch.Tensor, signed: bool) -> torch.Tensor:
    """8-bit state as a float32 tensor laid out as its codes."""
    q = lowprecision.Quantized(_memory(codes).numpy(), scales.numpy())
    out = torch.empty_like(codes, dtype=torch.float32)
    _memory(out).copy_(torch.from_numpy(q.dequantize(signed)))
    return out


def held_dtype(p: torch.Tensor, storage: Storage | None) -> torch.dtype:
    """The torch dtype of ``p``'s state tensors under ``storage`` (None: ``p``'s own)."""
    return p.dtype if storage is None else TORCH_DTYPES[storage.name]


def new_state(p: torch.Tensor, slot: int, value: float, storage: Storage | None) -> torch.Tensor:
    """A state tensor of ``p`` held as ``storage`` says, laid out as
    :func:`fastrms.torch_layout.zeros_like` lays it out, filled with ``value`` (rounded to
    nearest even into bfloat16, as fastrms's NumPy classes round it)."""
    dtype = held_dtype(p, storage)
    t = zeros_like(p, slot, dtype)
    if not value:
        return t
    if storage is not None:
        return t.copy_(to_held(torch.full(p.shape, value, dtype=torch.float32), dtype))
    if p.is_complex():  # both halves of the real view start there, as in torch
        return t.fill_(complex(value, value))
    return t.fill_(value)


def kernel_view(t: torch.Tensor) -> torch.Tensor:
    """State tensor ``t`` as the kernels take it: a bfloat16 tensor as its ``uint16``
    patterns (the same memory), a complex one as its real view."""
    return t.view(torch.uint16) if t.dtype is torch.bfloat16 else real(t)


def param_view(t: torch.Tensor) -> np.ndarray:
    """A CPU parameter (or gradient) as the kernels take it: a NumPy view of the same memory,
    ``ml_dtypes.bfloat16`` for a bfloat16 tensor (torch's ``.numpy()`` has no bfloat16)."""
    if t.dtype is torch.bfloat16:
        return t.view(torch.uint16).numpy().view(lowprecision.BFLOAT16)
    return t.numpy()


def to_held(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """State ``t`` (a CPU tensor) as ``dtype``: into bfloat16 rounded to nearest even
    (:func:`fastrms.lowprecision.round_nearest`; torch's own cast differs on a negative NaN),
    anything else by torch's cast (bfloat16 -> float widens exactly)."""
    if t.dtype is dtype:
        return t
    if dtype is torch.bfloat16 and t.is_floating_point() and t.device.type == "cpu":
        wide = t.detach().to(torch.float32).contiguous().numpy()
        return torch.from_numpy(lowprecision.round_nearest(wide)).view(torch.bfloat16)
    return t.to(dtype)


def to_float32(t: torch.Tensor) -> torch.Tensor:
    """A low-precision state tensor as float32 (exact for bfloat16), for checkpoints that
    ``torch.optim`` loads; any other tensor as it is."""
    return t.to(torch.float32) if t.dtype is torch.bfloat16 else t
