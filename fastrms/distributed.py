"""Optimizer state sharded across MPI processes (ZeRO stage 1), with mpi4py.

Each of the N ranks of a communicator holds every parameter, but owns the optimizer state of
one contiguous 1/N of the flattened parameters and updates only that part::

    g_shard = reduce_scatter(grads) / N         (summed instead when average=False)
    p_shard = optimizer step on p_shard, g_shard, with the state of the shard only
    p       = all_gather(p_shard)               (into every rank's arrays, in place)

This module holds the public :class:`ShardedOptimizer`: its steps, collective checks and
state dicts. How the parameters are split (pieces, groups of one dtype) is in
:mod:`fastrms.shard_partition`; the host or CUDA memory and MPI buffers in
:mod:`fastrms.shard_memory`; the parameter tree and state-dict keys in :mod:`fastrms.tree`.
Importing this module does not import mpi4py; creating a :class:`ShardedOptimizer` does
(``pip install "fastrms[mpi]"``).
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from . import lowprecision
from .arrays import DEVICE, check_no_overlap, describe
from .blockwise_groups import check_pair
from .lowprecision import BFLOAT16, BLOCK
from .optim import Optimizer
from .precision import KAHAN_COMP, check_rounding, is_bf16, state_dtype_of, state_storage
from .shard_memory import memory_for
from .shard_partition import Group, Piece, bounds, make_groups, partition, size_of
from .state import CODES, SCALES, checked_entry, convert
from .tree import Params, Tree, state_names

__all__ = ["REDUCTIONS", "Piece", "ShardedOptimizer", "bounds", "partition"]

REDUCTIONS = ("reduce_scatter", "reduce")


class ShardedOptimizer:
    """A fastrms optimizer whose state is sharded across the ranks of an MPI communicator.

    Parameters
    ----------
    optimizer : type
        A fastrms optimizer class (any of :data:`fastrms.optim.OPTIMIZERS`, e.g.
        ``fastrms.Adam``): each rank steps its shard with one, over its pieces.
    params : array, list/tuple of arrays, or dict of str -> array
        As for ``optimizer``: float32/float64 arrays, C-contiguous, writeable; NumPy arrays,
        or CUDA arrays with a CUDA-aware MPI (the device is synchronized around each MPI
        call); or ``ml_dtypes.bfloat16`` NumPy arrays (see ``rounding``). Every rank passes
        the same structure, shapes and dtypes (checked) and the same values (not checked:
        after the first step every rank holds the owners' values).
    comm : mpi4py.MPI.Intracomm, optional
        The communicator; default ``MPI.COMM_WORLD``.
    average : bool
        Average the ranks' gradients (default); ``False`` sums them.
    reduce : {"reduce_scatter", "reduce"}
        How the gradients (copied into one flat buffer, unless they lie end to end in one
        array already) are reduced: one ``MPI_Reduce_scatter`` (default; MPI's
        bandwidth-optimal algorithms as the ranks grow), or one ``MPI_Reduce`` per rank's
        range, rooted at its owner: the same bytes sent, in N calls. With Open MPI 5 on one
        machine the latter was several times faster (see the README); the sums are the same.
    state_dtype : {None, "float32", "float64", "bfloat16", "int8"}, optional
        How each rank's shard of the state is held, as for ``optimizer``: None (default) as
        the parameters are; ``"bfloat16"`` (float32 host parameters) holds it as bfloat16,
        half the memory; ``"int8"`` (float32 host parameters) holds the state of each tensor
        of at least 4096 elements (the whole tensor's size decides) as ``uint8`` codes and one
        float32 scale per block of 256 elements, and smaller tensors' state as float32. Cuts
        between the ranks' shards fall on block boundaries inside such a tensor, so each rank
        holds and quantizes whole blocks, bit for bit as the single-process optimizer does.
        :meth:`state_dict` gathers the state as it is held (int8: the ``":codes"`` and
        ``":scales"`` entries of the single-process class) or, with ``dequantize=True``, as
        float32; :meth:`load_state_dict` converts (quantizes) what it loads. CUDA arrays take
        None only (``TypeError`` otherwise).
    rounding : {None, "stochastic", "nearest", "kahan"}, optional
        How bfloat16 parameters are stored after their float32 update, as for ``optimizer``
        (None: ``"stochastic"``; refused unless a parameter is bfloat16). MPI has no bfloat16
        sum: their gradients are reduced as float32 (widened exactly, summed, averaged) and
        the local step reads that reduced gradient rounded to nearest even, so the update is
        the single-process one with the bfloat16-rounded mean gradient, bit for bit, for any
        number of ranks (where the float32 sum does not depend on MPI's order of addition).
        Stochastic rounding draws each element's bits from ``seed``, the step, the tensor's
        position in ``params`` and the element's index in its whole tensor, as the
        single-process class does; ``"kahan"`` compensation arrays are sharded as the state
        is. The parameters are all-gathered as their ``uint16`` patterns.
    seed : int, optional
        The seed of stochastic rounding (None: 0).
    **hyperparameters
        As for ``optimizer`` (``lr=...``, ``backend=...``); each is an attribute, changeable
        between steps on every rank alike.

    Every method is collective: each rank of ``comm`` must call it, in the same order. The
    update is the single-process one on the reduced gradient::

        g = (g_0 + ... + g_{N-1}) / N      (g_r: rank r's gradient; no division if not average)
        p = optimizer step (p, g, state)   (each rank computes its 1/N of the elements)

    Attributes
    ----------
    pieces : list of (index, start, stop, offset)
        This rank's shard: element ranges of the flattened parameters (``index`` in the order
        of ``params``).
    last_step_times : dict of str -> float
        Seconds spent by the last :meth:`step` in ``"check"``, ``"reduce_scatter"``,
        ``"local_step"`` and ``"all_gather"``.
    """

    def __init__(
        self,
        optimizer: type[Optimizer],
        params: Params,
        comm: Any = None,
        average: bool = True,
        reduce: str = "reduce_scatter",
        *,
        state_dtype: str | None = None,
        rounding: str | None = None,
        seed: int | None = None,
        **hyperparameters: Any,
    ) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
            what = repr(comm) if isinstance(comm, MPI.Comm) else _type_name(comm)
            raise TypeError(
                f"comm must be an mpi4py intracommunicator such as MPI.COMM_WORLD, got {what}"
            )
        object.__setattr__(self, "_inner", None)
        self.comm, self.rank, self.size = comm, comm.Get_rank(), comm.Get_size()
        error = None
        try:
            if not (isinstance(optimizer, type) and issubclass(optimizer, Optimizer)):
                raise TypeError(f"optimizer must be a fastrms optimizer class, got {optimizer!r}")
            if not isinstance(average, (bool, np.bool_)):
                raise TypeError(f"average must be a bool, got {average!r}")
            if reduce not in REDUCTIONS:
                raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
            self.optimizer, self.average, self.reduce = optimizer, bool(average), reduce
            self._tree = Tree(params, "params")
            self._params = self._tree.arrays
            if not self._params:
                raise ValueError("params is empty")
            self._names = self._tree.labels("params")
            self._mem = memory_for(self._params, self._names)
            self.state_dtype = state_dtype
            self._held = _held_dtypes(state_dtype, self._params, self._names)
            low = any(is_bf16(_dtype(p)) for p in self._params)
            check_rounding(rounding, seed, low)
            #: As the optimizer classes' (None without bfloat16 parameters); fixed.
            self.rounding = (rounding or "stochastic") if low else None
            self.seed = 0 if seed is None else int(seed)
            # What the step writes, for the gradients' overlap check.
            self._written = [(name, p, True) for name, p in zip(self._names, self._params)]
        except (TypeError, ValueError) as exc:
            error = exc
        signature = None
        if error is None:
            signature = (
                optimizer.__name__, self._tree.structure, self._tree.keys, self.average,
                self.reduce, self._mem.kind, [(_shape(p), _dtype(p).str) for p in self._params],
                repr(sorted(hyperparameters.items())), state_dtype, self.rounding, self.seed,
            )  # fmt: skip
        self._agree(error, repr(signature), "params, optimizer and options")
        aligns = [BLOCK if h.blockwise else 1 for h in self._held]
        self._groups = make_groups(self._mem, self._params, self.size, self.rank, aligns)
        #: Every rank's pieces, in the order of its inner optimizer's parameters.
        self._all_pieces = [[p for g in self._groups for p in g.pieces[r]]
                            for r in range(self.size)]  # fmt: skip
        self.pieces = self._all_pieces[self.rank]
        self._shard = [v for g in self._groups for v in g.mine]
        self._grad_shard = [v for g in self._groups for v in g.grad_shard]
        self._dummy = not self._shard  # a rank with no element steps one empty array
        if self._dummy:
            self._shard = [self._mem.empty(0, _dtype(self._params[0]))]
            self._grad_shard = [self._mem.empty(0, _dtype(self._params[0]))]
        error = None
        try:
            object.__setattr__(self, "_inner", self._new_inner(hyperparameters))
        except (TypeError, ValueError) as exc:
            error = exc
        self._agree(error, "", "hyperparameters")
        self.last_step_times: dict[str, float] = {}

    def _new_inner(self, hyperparameters: dict[str, Any]) -> Optimizer:
        """The optimizer of this rank's pieces (as pieces of their tensors: the random bits of
        stochastic rounding and the 8-bit threshold are the whole tensors')."""
        low = {}
        if any(is_bf16(_dtype(a)) for a in self._shard):
            low = {"rounding": self.rounding, "seed": self.seed}
        inner = self.optimizer(self._shard, state_dtype=self.state_dtype, **low,
                               **hyperparameters)  # fmt: skip
        if not self._dummy:
            sizes = [size_of(self._params[p.index]) for p in self.pieces]
            inner._as_pieces([p.index for p in self.pieces], [p.start for p in self.pieces],
                             sizes)  # fmt: skip
        return inner

    # -- hyperparameters as attributes -------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("_inner")
        if inner is not None and name in inner.hyperparameters + ("backend",):
            return getattr(inner, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        inner = self.__dict__.get("_inner")
        if inner is not None and name in inner.hyperparameters + ("backend",):
            setattr(inner, name, value)
        else:
            object.__setattr__(self, name, value)

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        return self._inner.hyperparameters

    @property
    def step_count(self) -> int:
        """Steps taken (as ``Optimizer.step_count``)."""
        return self._inner.step_count

    # -- stepping ------------------------------------------------------------------------------

    def step(self, grads: Params) -> None:
        """Reduce-scatter ``grads`` (this rank's gradients, structured like ``params``), step
        this rank's shard, and all-gather the updated parameters into every rank's arrays.

        Everything is checked on every rank first; if anything is wrong on any rank, every rank
        raises (``TypeError``/``ValueError``, naming the rank and the argument) and no array is
        changed.
        """
        t0 = time.perf_counter()
        error, flat = None, None
        try:
            flat = self._match_grads(grads)
            # The local step, checked before any rank communicates or writes: its gradient
            # shard is a buffer of this rank's, the same at every step.
            take_local_step = self._inner._checked_step(self._grad_shard)
        except (TypeError, ValueError) as exc:
            error = exc
        try:
            self._agree(error, self._step_signature(), "step count and hyperparameters")
        except (TypeError, ValueError):
            self._inner._forget_created()  # the state a first step made for its shard
            raise
        t1 = time.perf_counter()
        MPI, mem = self._MPI, self._mem
        mem.sync()  # CUDA: the gradients are complete before MPI reads them
        for g in self._groups:
            send = g.send_buffer(flat)
            mem.sync()
            if self.reduce == "reduce_scatter":
                self.comm.Reduce_scatter(mem.mpi(send), mem.mpi(g.recv), g.counts, op=MPI.SUM)
            else:
                for r, (n, at) in enumerate(zip(g.counts, g.displs)):
                    if n:
                        mine = mem.mpi(g.recv) if r == self.rank else None
                        self.comm.Reduce(mem.mpi(send[at : at + n]), mine, op=MPI.SUM, root=r)
            if self.average and self.size > 1:
                mem.divide(g.recv, self.size)
            g.round_grads()  # bfloat16 parameters: the float32 sum rounded, to step with
        t2 = time.perf_counter()
        take_local_step()
        mem.sync()
        t3 = time.perf_counter()
        for g in self._groups:
            self._all_gather(g)
        mem.sync()
        t4 = time.perf_counter()
        self.last_step_times = {
            "check": t1 - t0, "reduce_scatter": t2 - t1, "local_step": t3 - t2,
            "all_gather": t4 - t3,
        }  # fmt: skip

    def _all_gather(self, g: Group) -> None:
        """Every rank's updated shard into every rank's parameters: through the flat buffer
        (own pieces copied in, the others' copied out), or in place where the parameters lie
        end to end in one array."""
        mem = self._mem
        if g.param_flat is None:
            for dst, src in zip(g.mine_in_gathered, g.mine):
                mem.copy(dst, src)
            mem.sync()
        if g.total:
            bits = g.gathered_bits  # bfloat16 as its uint16 patterns
            buffer = [mem.mpi(bits), g.counts, g.displs, self._mpitype(bits.dtype)]
            self.comm.Allgatherv(self._MPI.IN_PLACE, buffer)
        if g.param_flat is None:
            for dst, src in g.unpack:
                mem.copy(dst, src)

    def _mpitype(self, dtype: np.dtype):
        if dtype == np.uint16:  # bfloat16 parameters and state, moved as their patterns
            return self._MPI.UINT16_T
        if dtype == np.uint8:  # int8 state's codes
            return self._MPI.UINT8_T
        return self._MPI.FLOAT if dtype == np.float32 else self._MPI.DOUBLE

    def _match_grads(self, grads: Params) -> list:
        arrays = self._tree.match(grads, "grads")
        for g, p, name in zip(arrays, self._params, self._tree.labels("grads")):
            gi, pi = describe(g, name), describe(p, "param")
            if gi.kind != pi.kind:
                where = "on a CUDA device" if pi.kind == DEVICE else "in host memory (NumPy)"
                raise TypeError(f"{name} must be {where}, like its parameter")
            if gi.dtype != pi.dtype:
                raise TypeError(
                    f"{name} has dtype {gi.dtype} but its parameter has dtype {pi.dtype}: "
                    "fastrms does not cast arrays"
                )
            if gi.shape != pi.shape:
                raise ValueError(
                    f"{name} has shape {gi.shape} but its parameter has shape {pi.shape}"
                )
            if gi.kind == DEVICE and not gi.c_contiguous:
                raise ValueError(f"{name} is not C-contiguous (CUDA gradients must be)")
        self._refuse_overlaps(arrays)
        return arrays

    def _refuse_overlaps(self, grads: list) -> None:
        """A gradient must not share memory with a parameter, which the step writes."""
        read = [(name, g, False) for name, g in zip(self._tree.labels("grads"), grads)]
        check_no_overlap(self._written + read)

    def _step_signature(self) -> str:
        inner = self._inner
        return repr((inner.step_count, [(h, getattr(inner, h)) for h in inner.hyperparameters]))

    # -- state ---------------------------------------------------------------------------------

    def state_nbytes(self) -> int:
        """Bytes of optimizer state held by this rank (its shard's state arrays: int8 state's
        codes and scales, a Kahan compensation's bfloat16)."""
        return 0 if self._dummy else self._inner._store.nbytes()

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
            shape = _shape(self._params[i])
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
            return [("", np.dtype(np.uint16), False)] if is_bf16(_dtype(self._params[i])) else []
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
                if (s, i) not in full and (s != KAHAN_COMP or is_bf16(_dtype(self._params[i])))
            ]  # fmt: skip
            if missing:
                raise ValueError(f"state_dict lacks {missing[0]!r} (it has {s} for other params)")
            key = self._inner._tree.state_key  # the inner optimizer's keys: one per piece
            if self._dummy:
                dummy = _dtype(self._shard[0])
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
        shape = _shape(self._params[i])
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

    # -- collective checks ---------------------------------------------------------------------

    def _agree(self, error: Exception | None, signature: str, what: str) -> None:
        """Raise on every rank if ``error`` is set on any rank, or ``signature`` differs."""
        h = zlib.crc32(signature.encode()) & 0x7FFFFFFF
        flags = np.array([error is not None, h, -h], np.int64)
        self.comm.Allreduce(self._MPI.IN_PLACE, flags, op=self._MPI.MAX)
        if not flags[0] and flags[1] == -flags[2]:
            return
        errors = self.comm.allgather(None if error is None else (type(error), str(error)))
        signatures = self.comm.allgather(signature)
        if error is not None:
            raise error
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            r, (kind, message) = failed[0]
            raise (kind if kind in (TypeError, ValueError) else RuntimeError)(
                f"rank {r} failed: {message}"
            )
        odd = next(r for r, s in enumerate(signatures) if s != signatures[0])
        raise ValueError(
            f"ranks disagree on the {what}: rank 0 has {signatures[0]}, rank {odd} has "
            f"{signatures[odd]}"
        )

    def __repr__(self) -> str:
        return (
            f"ShardedOptimizer({self.optimizer.__name__}, rank {self.rank} of {self.size}, "
            f"{sum(p.stop - p.start for p in self.pieces)} of "
            f"{sum(size_of(p) for p in self._params)} elements)"
        )


class _Held(NamedTuple):
    """How one parameter's state arrays are held: ``dtype`` (float32, float64 or
    ``ml_dtypes.bfloat16``), or, if ``blockwise``, as int8 codes and scales."""

    dtype: np.dtype
    blockwise: bool = False


def _held_dtypes(state_dtype: str | None, params: list, names: list[str]) -> list[_Held]:
    """How each parameter's state is held under ``state_dtype`` (None: as each parameter
    is; float32 beside bfloat16 parameters), refused as the single-process class refuses it:
    ``ValueError`` for a value or a parameter dtype the option does not fit, ``TypeError``
    for CUDA arrays. int8 state is blockwise for a tensor of at least 4096 elements (its
    whole size: the ranks' pieces follow it), float32 for a smaller one."""
    held = []
    for p, name in zip(params, names):
        info = describe(p, name)
        storage = state_storage(state_dtype, info.dtype, name)
        if storage.codec is not None and info.kind == DEVICE:
            raise TypeError(
                f"state_dtype={state_dtype!r} is not supported for CUDA arrays yet ({name}); "
                "use NumPy arrays"
            )
        if storage.name == "int8":
            size = int(np.prod(info.shape, dtype=np.int64))
            blockwise = lowprecision.uses_8bit(size)
            held.append(_Held(np.dtype(np.float32), blockwise))
        else:
            held.append(_Held(state_dtype_of(storage)))
    return held


def _element_extent(p: Piece) -> tuple[int, int]:
    """The elements of a piece in its tensor."""
    return p.start, p.stop


def _block_extent(p: Piece) -> tuple[int, int]:
    """The blocks (scales) of a piece of a tensor held in 8 bits: its cuts are on blocks."""
    return p.start // BLOCK, lowprecision.n_blocks(p.stop)


def _bits(a: np.ndarray) -> np.ndarray:
    """A state array as MPI moves it: bfloat16 as its ``uint16`` patterns."""
    return a.view(np.uint16) if a.dtype == BFLOAT16 else a


def _dtype(a) -> np.dtype:
    return describe(a, "array").dtype


def _shape(a) -> tuple:
    return describe(a, "array").shape


def _type_name(x: Any) -> str:
    return f"{type(x).__module__}.{type(x).__qualname__}"
