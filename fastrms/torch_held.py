"""How :mod:`fastrms.torch`'s optimizers hold their state and bfloat16 parameters (issue 18):
the part of :class:`fastrms.torch_optimizer.FusedOptimizer` that knows ``state_dtype=``,
``rounding=`` and ``seed=`` (:mod:`fastrms.torch_precision` has the conversions).

- Each parameter's state storage (:meth:`HeldState._storage`), its state tensors' names
  (:meth:`HeldState._names_of`: the Kahan compensation of a bfloat16 parameter under
  ``rounding="kahan"``; the scales beside the codes of 8-bit state) and their making at their
  initial value (:meth:`HeldState._fill_state`), and their checks.
- Checkpoints: the stored form round-trips, ``state_dict(dequantize=True)`` exports float32
  state that ``torch.optim`` loads, and a float32 checkpoint loads into any ``state_dtype``
  (:meth:`HeldState._hold`, :meth:`HeldState.load_state_dict`).
"""

from __future__ import annotations

from typing import Any

import torch

from .precision import KAHAN_COMP
from .torch_checks import check_param, scalar
from .torch_layout import KERNEL_DTYPE
from .torch_precision import (
    SCALES,
    check_scales,
    dequantized,
    held_dtype,
    is_int8,
    new_int8_state,
    new_state,
    quantize_into,
    storage_for,
    to_float32,
    to_held,
)


class HeldState(torch.optim.Optimizer):
    """State storage, bfloat16 parameters and checkpoints of a
    :class:`fastrms.torch_optimizer.FusedOptimizer` (which sets ``state_dtype``,
    ``rounding``, ``seed``, ``_spec``, ``_slots``, ``_name``, ``_views`` and ``_last``)."""

    def _new_state(self, group: dict[str, Any], p: torch.Tensor, name: str) -> torch.Tensor:
        """State tensor ``name`` (torch's name) of ``p``, at its initial value: zero, or the
        group's value of the option the spec names (:attr:`fastrms.specs.Spec.initial`)."""
        slot, place = self._slots[name]
        option = self._spec.initial.get(slot)
        value = 0.0 if option is None else float(scalar(option, group[option]))
        return new_state(p, place, value, self._storage(p))

    def _storage(self, p: torch.Tensor, what: str = "") -> Any:
        """How ``p``'s state is held (:func:`fastrms.torch_precision.storage_for`; None: as
        ``p`` is); ``what`` names ``p`` in a refusal."""
        plain = self.state_dtype is None and self.rounding is None and self.seed is None
        if plain and p.dtype is not torch.bfloat16:
            return None
        owner = f"fastrms.torch.{type(self).__name__}"
        return storage_for(owner, what or "a parameter", p, self.state_dtype, self.rounding,
                           self.seed)  # fmt: skip

    def _held(self, p: torch.Tensor) -> torch.dtype:
        """The torch dtype of ``p``'s state tensors."""
        return held_dtype(p, self._storage(p))

    def _hold(self, p: torch.Tensor, st: dict) -> None:
        """Put parameter ``p``'s state tensors (``st``) in the form they are held in.

        ``torch.optim.Optimizer.load_state_dict`` casts a checkpoint's state to the
        parameter's dtype; a float32 checkpoint (torch.optim's, or fastrms's exported with
        ``dequantize=True``) loads into bfloat16 state rounded to nearest even, and bfloat16
        state through float32 back to the same bits. 8-bit state (codes ``n`` beside scales
        ``n + SCALES``; torch's cast leaves the codes' whole values exact) loads as it was
        stored, or dequantized where the state is held otherwise; float state loads into
        8-bit state quantized, as fastrms's NumPy classes quantize it. A parameter that
        cannot hold its state so is left for the step to refuse, naming it."""
        try:
            held = self._held(p)
            int8 = self._int8(p)
        except (TypeError, ValueError):
            return
        for n in self._slots:
            t, scales = st.get(n), st.get(n + SCALES)
            if not torch.is_tensor(t) or t.shape != p.shape:
                continue
            if torch.is_tensor(scales):  # stored in 8 bits
                codes = t if t.dtype is torch.uint8 else t.to(torch.uint8)
                if int8:
                    st[n], st[n + SCALES] = codes, scales.to(torch.float32)
                else:
                    wide = dequantized(codes, scales.to(torch.float32), self._signed(n))
                    st[n] = to_held(wide, held)
                    del st[n + SCALES]
            elif int8 and t.is_floating_point():
                place = self._slots[n][1]
                codes, scales = new_int8_state(p, place, 0.0, self._signed(n))
                quantize_into(codes, scales, t, self._signed(n))
                st[n], st[n + SCALES] = codes, scales
            elif t.dtype is not held and t.is_floating_point():
                st[n] = to_held(t, held)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``; state held in another dtype than its
        parameter's (a bfloat16 parameter's float32 state, or the float32 scales of its 8-bit
        state) loads from the checkpoint's own tensors, which torch's load would have cast to
        the parameter's dtype first."""
        saved = [i for g in state_dict.get("param_groups", ()) for i in g.get("params", ())]
        mine = [p for g in self.param_groups for p in g["params"]]
        low = {
            p: state_dict["state"][i]
            for i, p in zip(saved, mine)
            if p.dtype is torch.bfloat16 and i in state_dict.get("state", {})
        }
        super().load_state_dict(state_dict)
        for p, st in low.items():
            try:
                held, int8 = self._held(p), self._int8(p)
            except (TypeError, ValueError):  # the step refuses it, naming it
                continue
            for n in self._slots:
                self._reload(p, n, st.get(n), st.get(n + SCALES), held, int8)
        self._views = {}
        self._last = None

    def _reload(self, p: torch.Tensor, n: str, t: Any, scales: Any, held, int8: bool) -> None:
        """Load state ``n`` of bfloat16 parameter ``p`` again from the checkpoint's tensor
        ``t`` (and ``scales``, if it was stored in 8 bits), as :meth:`_hold` does from the
        tensors torch's load cast to bfloat16."""
        mine = self.state[p]
        if not torch.is_tensor(t) or n not in mine:
            return
        t = t.detach().to("cpu")
        if t.shape != p.shape:  # as _hold, left for the step to refuse, naming it
            if not int8 and t.is_floating_point():
                mine[n] = to_held(t, held).clone()
        elif torch.is_tensor(scales):  # stored in 8 bits: its scales as they were saved
            scales = scales.detach().to("cpu", torch.float32)
            if int8:
                mine[n + SCALES] = scales.clone()
            else:
                mine[n] = to_held(dequantized(t.to(torch.uint8), scales, self._signed(n)), held)
        elif t.is_floating_point():
            if int8 and n + SCALES in mine:  # quantized from the saved values, not bfloat16's
                quantize_into(mine[n], mine[n + SCALES], t, self._signed(n))
            elif not int8:
                mine[n] = to_held(t, held).clone()

    def state_dict(self, dequantize: bool = False) -> dict[str, Any]:
        """torch's ``state_dict()``: the state tensors as they are held (bfloat16 state as
        bfloat16 tensors, which load back bit for bit).

        With ``dequantize=True``, low-precision state is exported as float32 (exact for
        bfloat16; 8-bit state as its codes' values times their block's scale, one float32
        tensor per state without its scales), in the format ``torch.optim``'s optimizers
        load; the optimizer's own tensors are not changed.
        """
        sd = super().state_dict()
        if not dequantize:
            return sd
        sd["state"] = {k: self._dequantized(st) for k, st in sd["state"].items()}
        return sd

    def _dequantized(self, st: dict) -> dict:
        """One parameter's state dict with its state as float32 (see :meth:`state_dict`)."""
        out = {}
        for n, v in st.items():
            if n.endswith(SCALES) and n.removesuffix(SCALES) in self._slots:
                continue
            if n in self._slots and torch.is_tensor(v):
                scales = st.get(n + SCALES)
                if torch.is_tensor(scales):
                    v = dequantized(v, scales, self._signed(n))
                else:
                    v = to_float32(v)
            out[n] = v
        return out

    def _names_of(self, p: torch.Tensor, names: tuple) -> tuple:
        """The torch names of ``p``'s state tensors for a step using state ``names``: the
        scales beside 8-bit codes, then the Kahan compensation of a bfloat16 parameter under
        ``rounding="kahan"`` (last: the step takes it as the last of its state)."""
        if self.state_dtype == "int8" and self._int8(p):  # the codes, then their scales
            names = (*names, *(n + SCALES for n in names))
        if self.rounding == "kahan" and p.dtype is torch.bfloat16:
            return (*names, KAHAN_COMP)
        return names

    def _int8(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s state is held in 8 bits (False where it cannot be held at all: the
        step refuses it, naming it)."""
        try:
            return is_int8(self._storage(p))
        except (TypeError, ValueError):
            return False

    def _signed(self, name: str) -> bool:
        """Whether state ``name`` (torch's name) takes the signed 8-bit map (first moments)."""
        return self._spec.layout.slot_specs[self._slots[name][1] - 1].sign == "signed"

    def _fill_state(self, group: dict[str, Any], p: torch.Tensor, name: str, st: dict) -> None:
        """Make state ``name`` of ``p`` in ``st`` at its initial value (8-bit state: its codes
        and scales)."""
        if self._int8(p):
            slot, place = self._slots[name]
            option = self._spec.initial.get(slot)
            value = 0.0 if option is None else float(scalar(option, group[option]))
            st[name], st[name + SCALES] = new_int8_state(p, place, value, self._signed(name))
        else:
            st[name] = self._new_state(group, p, name)

    def _check_param(self, group, gi, pi, p, st, names) -> None:
        owner = f"fastrms.torch.{type(self).__name__}"
        what = self._name(group, gi, pi, p)
        held = held_dtype(p, self._storage(p, what)) if p.dtype in KERNEL_DTYPE else None
        kahan = KAHAN_COMP in names
        scales = tuple(n for n in names if n.endswith(SCALES))
        plain = tuple(n for n in names if n != KAHAN_COMP and n not in scales)
        check_param(owner, what, p, st, plain, held)
        if kahan and st:  # the compensation of rounding="kahan" is bfloat16, as p is
            check_param(owner, what, p, {KAHAN_COMP: st.get(KAHAN_COMP)}, (KAHAN_COMP,))
        for n in scales if st else ():
            check_scales(what, p, st.get(n.removesuffix(SCALES)), st.get(n), n)
