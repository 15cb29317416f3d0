"""How ``fastrms.torch`` hands a parameter of any memory layout to the elementwise kernels.

The kernels step C-contiguous arrays element by element, and an elementwise step does not care
in which order the elements lie, as long as the parameter, its gradient and its state lie in
the same order. So:

- A **contiguous** parameter is stepped as it is.
- A **dense** one in another order (channels_last, channels_last_3d, a transposed weight: its
  elements fill one block of memory without gaps) is stepped as the flat block it occupies.
  Its state takes its strides (``torch.zeros_like`` with ``preserve_format``, as torch.optim's
  state does), and a gradient with the same strides is read as its flat block too, with no
  copy; a gradient in another order is copied into the parameter's order first.
- A **strided** one (a stride of 2, a slice: gaps between its elements) is gathered into a
  contiguous buffer before its bucket runs and scattered back after. Its state is contiguous
  (``preserve_format`` gives contiguous strides to a tensor that is not dense).
- A **complex** tensor is stepped as its real view (``torch.view_as_real``), as torch.optim
  steps it; its state stays complex, as torch's does, so checkpoints match.

A tensor whose elements share memory (an expanded tensor, a stride of 0) cannot be updated in
place element by element, and is refused.

New state tensors are made by :func:`zeros_like`, which also places them in memory.
"""

from __future__ import annotations

import numpy as np
import torch

from .dispatch import _staggered_zeros_like

CONTIGUOUS, DENSE, STRIDED, OVERLAPPING = "contiguous", "dense", "strided", "overlapping"

#: The real dtype each supported parameter dtype is stepped in (a bfloat16 parameter goes to
#: the kernels as its bfloat16 patterns, is computed in float32 and stored back rounded).
KERNEL_DTYPE = {
    torch.bfloat16: torch.bfloat16,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}


def real(t: torch.Tensor) -> torch.Tensor:
    """``t``, or its real view if it is complex (a trailing dimension of 2, stride 1)."""
    return torch.view_as_real(t) if t.is_complex() else t


def layout_of(t: torch.Tensor) -> str:
    """:data:`CONTIGUOUS`, :data:`DENSE`, :data:`STRIDED` or :data:`OVERLAPPING`.

    Sorted by stride, the dimensions of a tensor whose elements do not share memory each step
    over all the elements of the smaller ones (a stride at least their extent); it is dense
    when each stride is exactly that extent.
    """
    if t.is_contiguous():
        return CONTIGUOUS
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1)
    extent, dense = 1, True  # one past the furthest offset reached by the smaller dimensions
    for stride, size in dims:
        if stride < extent:
            return OVERLAPPING
        dense = dense and stride == extent
        extent = stride * (size - 1) + extent
    return DENSE if dense else STRIDED


def flat(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor as the 1-D contiguous block of memory its elements fill (its element
    at the lowest address, that of ``t.data_ptr()``, first)."""
    return t.as_strided((t.numel(),), (1,))


def fits(t: torch.Tensor, p: torch.Tensor, layout: str) -> bool:
    """Whether state tensor ``t`` lies in the order that parameter ``p`` (of ``layout``) is
    stepped in: contiguous, or, for a dense ``p``, ``p``'s strides."""
    return t.stride() == p.stride() if layout == DENSE else t.is_contiguous()


def state_like(p: torch.Tensor, flat_zeros: torch.Tensor) -> torch.Tensor:
    """A state tensor for ``p`` over ``flat_zeros`` (real, 1-D, ``p.numel()`` elements, twice
    that for a complex ``p``): ``p``'s strides if ``p`` is dense, else contiguous, as
    ``torch.zeros_like(p, memory_format=torch.preserve_format)`` gives."""
    t = torch.view_as_complex(flat_zeros.view(-1, 2)) if p.is_complex() else flat_zeros
    if layout_of(p) == DENSE:
        return t.as_strided(p.shape, p.stride(), 0)
    return t.view(p.shape)


def zeros_like(p: torch.Tensor, slot: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A zero state tensor like ``p``, in the layout of ``torch.zeros_like(p,
    memory_format=torch.preserve_format)`` (``p``'s strides if ``p`` is dense, else
    contiguous). ``slot``: the state array's place among its rule's (1 for the first,
    :attr:`fastrms.specs.Layout.slots`), as fastrms's own classes count them. ``dtype``: the
    state's torch dtype where it is held in another than ``p``'s (``torch.bfloat16`` beside a
    real parameter, :mod:`fastrms.torch_precision`).

    On the CPU it is placed ``slot`` KiB away from ``p`` modulo 4 KiB, as fastrms's own state
    is (``fastrms.dispatch._staggered_zeros_like``): torch's allocator tends to put
    same-sized tensors at the same offset modulo 4 KiB, and a loop that loads and stores
    arrays at (nearly) the same offset stalls on "4K aliasing" (the MLP's Adam step ran 2x
    slower so)."""
    if dtype is None or dtype is p.dtype:
        dtype = None
    if p.device.type != "cpu":
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    want = p.dtype if dtype is None else dtype
    held = _numpy_bits(want)
    if p.is_contiguous() and not p.is_complex():
        bits = p.detach()
        bits = bits.view(torch.uint16) if bits.dtype is torch.bfloat16 else bits
        zeros = torch.from_numpy(_staggered_zeros_like(bits.numpy(), slot, held))
        return zeros.view(want)
    k = real(p.detach())
    like = np.empty(k.numel(), _numpy_bits(k.dtype))
    held = None if dtype is None else held  # a complex parameter's zeros are its real view's
    zeros = torch.from_numpy(_staggered_zeros_like(like, slot, held))  # placed from a fresh array
    return state_like(p, zeros.view(k.dtype if dtype is None else dtype))


def _numpy_bits(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype whose arrays hold tensors of ``dtype`` bit for bit (bfloat16: uint16,
    which NumPy has and torch can view as)."""
    return (
        np.dtype(np.uint16)
        if dtype is torch.bfloat16
        else torch.empty((), dtype=dtype).numpy().dtype
    )
