"""The state dicts of :class:`fastrms.distributed.ShardedOptimizer`: the full state gathered
from the ranks' pieces, bit for bit as it is held (bfloat16, int8 codes and scales), and a full
state dict cut back into this rank's pieces, converted to how it holds its state.

:class:`ShardCheckpoints` is a base of the optimizer (its methods use the optimizer's
communicator, pieces, parameter tree and inner single-process optimizer), kept apart so that
each module holds one concern.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import lowprecision
from .arrays import describe
from .blockwise_groups import check_pair
from .lowprecision import BFLOAT16, BLOCK
from .precision import KAHAN_COMP, is_bf16
from .shard_partition import Piece, size_of
from .state import CODES, SCALES, checked_entry, convert
from .tree import state_names


class ShardCheckpoints:
    """:meth:`state_dict` and :meth:`load_state_dict` of the sharded optimizer."""

    def state_dict(
        self, root: int | None = None, dequantize: bool = False
    ) -> dict[str, Any] | None:
        """The full, unsharded state, in the format of ``optimizer(params).state_dict()``.

        Collective. With ``root=None`` every rank gets it; with ``root=r`` only rank ``r``
        does (the others get ``None``), which needs the full state's memory on that rank only.
        It loads into the single-process class over the same ``params``, and into a
        ShardedOptimizer over any number of ranks, with any ``state_dtype``.

        The state is gathered as it is held, bit for bit: bfloat16 state (and Kahan
        compensations) as ``ml_dtypes.bfloat16`` arrays, int8 state as the single-process
        class's ``"<key>:codes"`` and ``"<key>:scales"`` entries. With ``dequantize=True``
        low-precision state comes as float32 instead (bfloat16 exactly, int8 dequantized),
        which any fastrms optimizer loads.
        """
        error = None
        if root is not None and (
            isinstance(root, bool) or not isinstance(root, (int, np.integer))
            or not 0 <= root < self.size
        ):  # fmt: skip
            error = ValueError(f"root must be None or a rank in [0, {self.size}), got {root!r}")
        inner_sd = self._inner.state_dict() if error is None else {}
        self._agree(error, repr((root, self._step_signature())), "state_dict arguments")
        # Every name any rank holds (a Kahan compensation only where a shard has bfloat16).
        mine = set() if self._dummy else state_names(inner_sd)
        names = sorted(set().union(*self.comm.allgather(mine)))
        receive = root is None or root == self.rank
        sd: dict[str, Any] = {k: v for k, v in inner_sd.items() if not k.startswith("state.")}
        for name in names:
            gathered = self._gather_state(name, inner_sd, root, receive)
            for i, entry in gathered.items():
                key = self._tree.state_key(name, i)
                if isinstance(entry, lowprecision.Quantized):
                    if dequantize:
                        sd[key] = entry.dequantize(self._signed(name))
                    else:
                        sd[key + CODES], sd[key + SCALES] = entry
                else:
                    is_low = dequantize and entry.dtype == BFLOAT16
                    sd[key] = convert(entry, np.dtype(np.float32)) if is_low else entry
        if not receive:
            return None
        state = sorted((k for k in sd if k.startswith("state.")), key=self._tree.state_order)
        return {**{k: v for k, v in sd.items() if not k.startswith("state.")},
                **{k: sd[k] for k in state}}  # fmt: skip

    def _gather_state(
        self, name: str, inner_sd: dict, root: int | None, receive: bool
    ) -> dict[int, Any]:
        """State ``name`` of every parameter that has it, gathered from the ranks' pieces:
        ``{index: array as held, or Quantized pair}`` where ``receive``, else ``{}``.

        One collective per column (the arrays of one held dtype; int8's codes; its scales):
        each rank sends its pieces' entries (``inner_sd``) end to end, and the receivers cut
        every rank's part back into the tensors, knowing all ranks' pieces."""
        key = self._inner._tree.state_key
        columns: dict[tuple, list[int]] = {}  # (suffix, dtype as moved, per block) -> params
        for i in range(len(self._params)):
            for column in self._columns(name, i):
                columns.setdefault(column, []).append(i)
        parts: dict[tuple[int, str], np.ndarray] = {}
        for (suffix, bits, per_block), members in sorted(columns.items(), key=repr):
            member = set(members)
            extent = _block_extent if per_block else _element_extent
            counts = [sum(z - a for p in pieces if p.index in member for a, z in [extent(p)])
                      for pieces in self._all_pieces]  # fmt: skip
            displs = np.cumsum([0, *counts]).tolist()[:-1]
            send = [_bits(inner_sd[key(name, j) + suffix]).reshape(-1)
                    for j, p in enumerate(self.pieces) if p.index in member]  # fmt: skip
            send = np.concatenate(send) if send else np.empty(0, bits)
            full = np.empty(sum(counts) if receive else 0, bits)
            if sum(counts):
                buffer = [full, counts, displs, self._mpitype(np.dtype(bits))]
                if root is None:
                    self.comm.Allgatherv(send, buffer)
                else:
                    self.comm.Gatherv(send, buffer, root)
            if not receive:
                continue
            for i in members:
                n = size_of(self._params[i])
                parts[i, suffix] = np.empty(lowprecision.n_blocks(n) if per_block else n, bits)
            for pieces, at in zip(self._all_pieces, displs):
                for p in pieces:
                    if p.index in member:
                        a, z = extent(p)
                        parts[p.index, suffix][a:z] = full[at : at + z - a]
                        at += z - a
        out: dict[int, Any] = {}
        for (i, suffix), a in parts.items():
            shape = shape_of(self._params[i])
            if suffix == CODES:
                out[i] = lowprecision.Quantized(a.reshape(shape), parts[i, SCALES])
            elif suffix == "":
                held = self._held[i].dtype if name != KAHAN_COMP else BFLOAT16
                out[i] = a.view(held).reshape(shape)
        return out

    def _columns(self, name: str, i: int) -> list[tuple[str, np.dtype, bool]]:
        """How state ``name`` of parameter ``i`` is gathered: ``(key suffix, dtype as MPI
        moves it, one element per block)`` for each of its state-dict entries (none for a
        Kahan compensation of a parameter that is not bfloat16)."""
        if name == KAHAN_COMP:
            return [("", np.dtype(np.uint16), False)] if is_bf16(dtype_of(self._params[i])) else []
        held = self._held[i]
        if held.blockwise:
            return [(CODES, np.dtype(np.uint8), False), (SCALES, np.dtype(np.float32), True)]
        return [("", np.dtype(np.uint16) if held.dtype == BFLOAT16 else held.dtype, False)]

    def _signed(self, name: str) -> bool:
        """Whether int8 state ``name`` is held in the signed map (its slot's sign)."""
        layout = self.optimizer.spec.layout
        return layout.slot_specs[layout.slots.index(name)].sign == "signed"

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a full state dict (from this class or the single-process one, saved with any
        number of ranks, any ``state_dtype``) on every rank; each rank keeps its shard of it,
        converted to how it holds its state (float32 into int8 state: quantized; int8 into
        float state: dequantized).

        Collective: every rank passes the same dict. If it is invalid on any rank, every rank
        raises ``ValueError`` and nothing changes.
        """
        error, new = None, None
        try:
            inner_sd = self._shard_state_dict(state_dict)
            new = self._new_inner({h: getattr(self._inner, h) for h in self._inner.hyperparameters})
            new.backend = self._inner.backend
            try:
                new.load_state_dict(inner_sd)
            except ValueError as exc:
                raise ValueError(self._outer_keys(str(exc))) from None
        except (TypeError, ValueError) as exc:
            error = exc
        signature = "" if new is None else repr((new.step_count, [
            (h, getattr(new, h)) for h in new.hyperparameters]))  # fmt: skip
        self._agree(error, signature, "state dicts")
        object.__setattr__(self, "_inner", new)

    def _shard_state_dict(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """``state_dict`` (full) cut to this rank's shard, in the inner optimizer's keys."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        by_key = self._tree.state_keys(sorted(state_names(state_dict)))
        out: dict[str, Any] = {}
        full: dict[tuple[str, int], Any] = {}
        pairs: dict[tuple[str, int], dict[str, Any]] = {}
        for key, value in state_dict.items():
            if not (isinstance(key, str) and key.startswith("state.")):
                out[key] = value
                continue
            suffix = next((x for x in (CODES, SCALES) if key.endswith(x)), "")
            base = key[: len(key) - len(suffix)]
            if base not in by_key:
                raise ValueError(f"state_dict has unexpected key {key!r} for these params")
            s, i = by_key[base]
            if suffix:
                pairs.setdefault((s, i), {})[suffix] = value
                continue
            # bfloat16 or the parameter's dtype: the inner optimizer converts it to its own.
            full[s, i] = checked_entry(key, value, self._params[i], convertible=True).reshape(-1)
        for (s, i), entries in pairs.items():
            full[s, i] = self._checked_pair(s, i, entries, (s, i) in full)
        for s in {s for s, _ in full}:
            missing = [
                self._tree.state_key(s, i) for i in range(len(self._params))
                if (s, i) not in full and (s != KAHAN_COMP or is_bf16(dtype_of(self._params[i])))
            ]  # fmt: skip
            if missing:
                raise ValueError(f"state_dict lacks {missing[0]!r} (it has {s} for other params)")
            key = self._inner._tree.state_key  # the inner optimizer's keys: one per piece
            if self._dummy:
                dummy = dtype_of(self._shard[0])
                if s != KAHAN_COMP or is_bf16(dummy):
                    out[key(s, 0)] = np.empty(0, dummy)
            for j, p in enumerate(self.pieces):
                entry = full.get((s, p.index))
                if isinstance(entry, lowprecision.Quantized):
                    out[key(s, j) + CODES] = entry.codes[p.start : p.stop]
                    scales = entry.scales[p.start // BLOCK : lowprecision.n_blocks(p.stop)]
                    out[key(s, j) + SCALES] = scales
                elif entry is not None:
                    out[key(s, j)] = entry[p.start : p.stop]
        return out

    def _checked_pair(self, s: str, i: int, entries: dict, plain_too: bool):
        """The ``":codes"``/``":scales"`` entries of state ``s`` of parameter ``i``, checked:
        a flat :class:`~fastrms.lowprecision.Quantized` pair where this optimizer holds that
        state in 8 bits (each rank takes its blocks), else its float32 values (dequantized
        whole, since the ranks' cuts need not fall on blocks there)."""
        key = self._tree.state_key(s, i)
        if plain_too:
            raise ValueError(f"state_dict has both {key!r} and its {CODES!r} entries")
        if s not in self.optimizer.spec.layout.slots:
            raise ValueError(f"state_dict[{key + CODES!r}]: {s} is not held in 8 bits")
        codes, scales = (np.asarray(entries.get(x)) for x in (CODES, SCALES))
        shape = shape_of(self._params[i])
        pair = check_pair((codes, scales), shape, f"state_dict[{key!r}]", "int8 state", False)
        flat = lowprecision.Quantized(pair.codes.reshape(-1), pair.scales)
        return flat if self._held[i].blockwise else flat.dequantize(self._signed(s))

    def _outer_keys(self, message: str) -> str:
        """An inner optimizer's message, with its piece keys named as the full keys."""

        def full_key(m: re.Match) -> str:
            j = int(m.group(2))
            if self._dummy or j >= len(self.pieces):
                return m.group(0)
            return repr(self._tree.state_key(m.group(1), self.pieces[j].index) + m.group(3))

        return re.sub(r"'state\.(\w+)\.(\d+)((?::codes|:scales)?)'", full_key, message)


def _element_extent(p: Piece) -> tuple[int, int]:
    """The elements of a piece in its tensor."""
    return p.start, p.stop


def _block_extent(p: Piece) -> tuple[int, int]:
    """The blocks (scales) of a piece of a tensor held in 8 bits: its cuts are on blocks."""
    return p.start // BLOCK, lowprecision.n_blocks(p.stop)


def _bits(a: np.ndarray) -> np.ndarray:
    """A state array as MPI moves it: bfloat16 as its ``uint16`` patterns."""
    return a.view(np.uint16) if a.dtype == BFLOAT16 else a


def dtype_of(a) -> np.dtype:
    """The dtype of a NumPy or CUDA array."""
    return describe(a, "array").dtype


def shape_of(a) -> tuple:
    """The shape of a NumPy or CUDA array."""
    return describe(a, "array").shape
