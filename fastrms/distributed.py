"""Optimizer state sharded across MPI processes (ZeRO stage 1), with mpi4py.

Each of the N ranks of a communicator holds every parameter, but owns the optimizer state of
one contiguous 1/N of the flattened parameters and updates only that part::

    g_shard = reduce_scatter(grads) / N         (summed instead when average=False)
    p_shard = optimizer step on p_shard, g_shard, with the state of the shard only
    p       = all_gather(p_shard)               (into every rank's arrays, in place)

The parameters of one dtype are laid end to end (in their order in ``params``) and split into
N contiguous element ranges of sizes differing by at most one, across tensor boundaries, as
DeepSpeed's flat partitions are. Importing this module does not import mpi4py; creating a
:class:`ShardedOptimizer` does (``pip install "fastrms[mpi]"``).
"""

from __future__ import annotations

import ctypes
import os
import re
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from . import dispatch
from .arrays import DEVICE, FLOAT_DTYPES, check_no_overlap, describe, extent
from .optim import Optimizer

Params = Any  # an array, a list/tuple of arrays, or a dict of str -> array
REDUCTIONS = ("reduce_scatter", "reduce")


class Piece(NamedTuple):
    """A contiguous element range ``[start, stop)`` of the flattened parameter ``index``,
    stored at ``offset`` in its dtype group's flat buffer."""

    index: int
    start: int
    stop: int
    offset: int


def bounds(total: int, nranks: int) -> list[int]:
    """The ``nranks + 1`` boundaries of an even split of ``total`` elements: rank ``r`` owns
    ``[b[r], b[r + 1])``, and the sizes differ by at most one."""
    if nranks < 1:
        raise ValueError(f"nranks must be >= 1, got {nranks}")
    return [total * r // nranks for r in range(nranks + 1)]


def partition(sizes: Sequence[int], nranks: int) -> list[list[Piece]]:
    """Split tensors of ``sizes`` elements, laid end to end, into ``nranks`` contiguous ranges.

    Returns, for each rank, the pieces of the tensors that its range covers, in order. A rank
    may get no piece (more ranks than elements); zero-size tensors are in no piece.
    """
    b = bounds(sum(sizes), nranks)
    starts = np.cumsum([0, *sizes]).tolist()
    pieces: list[list[Piece]] = []
    for r in range(nranks):
        lo, hi = b[r], b[r + 1]
        mine = []
        for i, n in enumerate(sizes):
            a, z = max(lo, starts[i]), min(hi, starts[i] + n)
            if a < z:
                mine.append(Piece(i, a - starts[i], z - starts[i], a))
        pieces.append(mine)
    return pieces


class _Group:
    """The parameters of one dtype: their flat layout, partition and communication buffers."""

    def __init__(self, mem, dtype: np.dtype, indices: list[int], params: list, nranks, rank):
        self.mem, self.dtype = mem, dtype
        self.indices = indices  # positions in the flattened params
        sizes = [_size(params[i]) for i in indices]
        self.total = sum(sizes)
        self.offsets = np.cumsum([0, *sizes]).tolist()[:-1]
        b = bounds(self.total, nranks)
        self.counts = [b[r + 1] - b[r] for r in range(nranks)]
        self.displs = b[:-1]
        self.lo, self.hi = b[rank], b[rank + 1]
        # Pieces in this group's local numbering, mapped back to params' positions.
        self.pieces = [
            [Piece(indices[p.index], p.start, p.stop, p.offset) for p in rank_pieces]
            for rank_pieces in partition(sizes, nranks)
        ]
        flat = {i: mem.flat(params[i]) for i in indices}
        # Parameters laid end to end in one array already: gather straight into their memory.
        self.param_flat = mem.flat_view([flat[i] for i in indices])
        self.gathered = (
            self.param_flat if self.param_flat is not None else mem.empty(self.total, dtype)
        )
        self.send = None  # the gradients' flat buffer, allocated on first need
        self.recv = mem.empty(self.counts[rank], dtype)
        self.mine = [flat[p.index][p.start : p.stop] for p in self.pieces[rank]]
        self.mine_in_gathered = [self.gathered[p.offset : p.offset + p.stop - p.start]
                                 for p in self.pieces[rank]]  # fmt: skip
        self.grad_shard = [self.recv[p.offset - self.lo : p.offset - self.lo + p.stop - p.start]
                           for p in self.pieces[rank]]  # fmt: skip
        # (destination in params, source in the gathered buffer) for the other ranks' pieces.
        self.unpack = [
            (flat[p.index][p.start : p.stop],
             self.gathered[p.offset : p.offset + p.stop - p.start])
            for r, rank_pieces in enumerate(self.pieces) if r != rank
            for p in rank_pieces
        ]  # fmt: skip

    def send_buffer(self, grads: list) -> np.ndarray:
        """The gradients of this group as one flat array: a view if they are laid end to end
        already, else a copy into the persistent send buffer."""
        flat = self.mem.flat_view([grads[i] for i in self.indices], writeable=False)
        if flat is not None:
            return flat
        if self.send is None:
            self.send = self.mem.empty(self.total, self.dtype)
        for i, off in zip(self.indices, self.offsets):
            self.mem.pack(self.send[off : off + _size(grads[i])], grads[i])
        return self.send


class ShardedOptimizer:
    """A fastrms optimizer whose state is sharded across the ranks of an MPI communicator.

    Parameters
    ----------
    optimizer : type
        A fastrms optimizer class: ``fastrms.Adam``, ``AdamW``, ``RMSProp``, ``AdaGrad``, ``SGD``.
    params : array, list/tuple of arrays, or dict of str -> array
        As for ``optimizer``: float32/float64 arrays, C-contiguous, writeable; NumPy arrays,
        or CUDA arrays with a CUDA-aware MPI (the device is synchronized around each MPI
        call). Every rank passes the same structure, shapes and dtypes (checked) and the same
        values (not checked: after the first step every rank holds the owners' values).
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
            self._structure, self._keys, self._params = _flatten(params)
            if not self._params:
                raise ValueError("params is empty")
            self._names = self._labels("params")
            self._mem = _memory_for(self._params, self._names)
            # What the step writes, for the gradients' overlap check.
            self._written = [(name, p, True) for name, p in zip(self._names, self._params)]
        except (TypeError, ValueError) as exc:
            error = exc
        signature = None
        if error is None:
            signature = (
                optimizer.__name__, self._structure, self._keys, self.average, self.reduce,
                self._mem.kind, [(_shape(p), _dtype(p).str) for p in self._params],
                repr(sorted(hyperparameters.items())),
            )  # fmt: skip
        self._agree(error, repr(signature), "params, optimizer and options")
        self._groups = self._make_groups()
        self.pieces = [p for g in self._groups for p in g.pieces[self.rank]]
        self._shard = [v for g in self._groups for v in g.mine]
        self._grad_shard = [v for g in self._groups for v in g.grad_shard]
        self._dummy = not self._shard  # a rank with no element steps one empty array
        if self._dummy:
            self._shard = [self._mem.empty(0, _dtype(self._params[0]))]
            self._grad_shard = [self._mem.empty(0, _dtype(self._params[0]))]
        error = None
        try:
            object.__setattr__(self, "_inner", optimizer(self._shard, **hyperparameters))
        except (TypeError, ValueError) as exc:
            error = exc
        self._agree(error, "", "hyperparameters")
        self.last_step_times: dict[str, float] = {}

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

    def _all_gather(self, g: _Group) -> None:
        """Every rank's updated shard into every rank's parameters: through the flat buffer
        (own pieces copied in, the others' copied out), or in place where the parameters lie
        end to end in one array."""
        mem = self._mem
        if g.param_flat is None:
            for dst, src in zip(g.mine_in_gathered, g.mine):
                mem.copy(dst, src)
            mem.sync()
        if g.total:
            buffer = [mem.mpi(g.gathered), g.counts, g.displs, self._mpitype(g.dtype)]
            self.comm.Allgatherv(self._MPI.IN_PLACE, buffer)
        if g.param_flat is None:
            for dst, src in g.unpack:
                mem.copy(dst, src)

    def _mpitype(self, dtype: np.dtype):
        return self._MPI.FLOAT if dtype == np.float32 else self._MPI.DOUBLE

    def _match_grads(self, grads: Params) -> list:
        structure, keys, arrays = _flatten(grads)
        if structure != self._structure:
            raise TypeError(
                f"grads must be structured like params (a {self._structure}), got {structure}"
            )
        if structure == "dict":
            if set(keys) != set(self._keys):
                missing = sorted(set(self._keys) - set(keys), key=str)
                extra = sorted(set(keys) - set(self._keys), key=str)
                raise ValueError(
                    f"grads keys differ from params keys: missing {missing}, unexpected {extra}"
                )
            by_key = dict(zip(keys, arrays))
            arrays = [by_key[k] for k in self._keys]
        elif len(arrays) != len(self._params):
            raise ValueError(f"grads has {len(arrays)} arrays but params has {len(self._params)}")
        for g, p, name in zip(arrays, self._params, self._labels("grads")):
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
        read = [(name, g, False) for name, g in zip(self._labels("grads"), grads)]
        check_no_overlap(self._written + read)

    def _step_signature(self) -> str:
        inner = self._inner
        return repr((inner.step_count, [(h, getattr(inner, h)) for h in inner.hyperparameters]))

    # -- state ---------------------------------------------------------------------------------

    def state_nbytes(self) -> int:
        """Bytes of optimizer state held by this rank (its shard's state arrays)."""
        if self._dummy:
            return 0
        return sum(a.nbytes for arrays in self._inner.state.values() for a in arrays
                   if a is not None)  # fmt: skip

    def state_dict(self, root: int | None = None) -> dict[str, Any] | None:
        """The full, unsharded state, in the format of ``optimizer(params).state_dict()``.

        Collective. With ``root=None`` every rank gets it; with ``root=r`` only rank ``r``
        does (the others get ``None``), which needs the full state's memory on that rank only.
        It loads into the single-process class over the same ``params``, and into a
        ShardedOptimizer over any number of ranks.
        """
        error = None
        if root is not None and (
            isinstance(root, bool) or not isinstance(root, (int, np.integer))
            or not 0 <= root < self.size
        ):  # fmt: skip
            error = ValueError(f"root must be None or a rank in [0, {self.size}), got {root!r}")
        inner_sd = self._inner.state_dict() if error is None else {}
        buffers = sorted({k.split(".")[1] for k in inner_sd if k.startswith("state.")})
        self._agree(error, repr((root, buffers, self._step_signature())), "state_dict arguments")
        receive = root is None or root == self.rank
        sd: dict[str, Any] = {k: v for k, v in inner_sd.items() if not k.startswith("state.")}
        for name in buffers:
            for g in self._groups:
                if receive:
                    g_full = np.empty(g.total, g.dtype)
                else:
                    g_full = np.empty(0, g.dtype)
                shard = [inner_sd[f"state.{name}.{j}"] for j in self._shard_indices(g)]
                mine = np.concatenate(shard) if shard else np.empty(0, g.dtype)
                mpitype = self._mpitype(g.dtype)
                if g.total:
                    if root is None:
                        self.comm.Allgatherv(mine, [g_full, g.counts, g.displs, mpitype])
                    else:
                        self.comm.Gatherv(mine, [g_full, g.counts, g.displs, mpitype], root)
                if receive:
                    for i, off in zip(g.indices, g.offsets):
                        shape = _shape(self._params[i])
                        n = int(np.prod(shape, dtype=np.int64))
                        sd[self._state_key(name, i)] = g_full[off : off + n].reshape(shape)
        if not receive:
            return None
        state = sorted((k for k in sd if k.startswith("state.")), key=self._state_order)
        return {**{k: v for k, v in sd.items() if not k.startswith("state.")},
                **{k: sd[k] for k in state}}  # fmt: skip

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a full state dict (from this class or the single-process one, saved with any
        number of ranks) on every rank; each rank keeps its shard of it.

        Collective: every rank passes the same dict. If it is invalid on any rank, every rank
        raises ``ValueError`` and nothing changes.
        """
        error, new = None, None
        try:
            inner_sd = self._shard_state_dict(state_dict)
            new = self.optimizer(self._shard, **{h: getattr(self._inner, h)
                                                 for h in self._inner.hyperparameters})  # fmt: skip
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
        by_key = {self._state_key(s, i): (s, i) for i in range(len(self._params))
                  for s in _state_names(state_dict)}  # fmt: skip
        out: dict[str, Any] = {}
        full: dict[tuple[str, int], np.ndarray] = {}
        for key, value in state_dict.items():
            if not (isinstance(key, str) and key.startswith("state.")):
                out[key] = value
                continue
            if key not in by_key:
                raise ValueError(f"state_dict has unexpected key {key!r} for these params")
            s, i = by_key[key]
            a, shape, dtype = np.asarray(value), _shape(self._params[i]), _dtype(self._params[i])
            if a.shape != shape or a.dtype != dtype:
                raise ValueError(
                    f"state_dict[{key!r}] has shape {a.shape} and dtype {a.dtype}, but the "
                    f"parameter has shape {shape} and dtype {dtype}"
                )
            full[s, i] = a.reshape(-1)
        for s in {s for s, _ in full}:
            missing = [
                self._state_key(s, i) for i in range(len(self._params)) if (s, i) not in full
            ]
            if missing:
                raise ValueError(f"state_dict lacks {missing[0]!r} (it has {s} for other params)")
            if self._dummy:
                out[f"state.{s}.0"] = np.empty(0, _dtype(self._shard[0]))
            for j, p in enumerate(self.pieces):
                out[f"state.{s}.{j}"] = full[s, p.index][p.start : p.stop]
        return out

    def _outer_keys(self, message: str) -> str:
        """An inner optimizer's message, with its piece keys named as the full keys."""

        def full_key(m: re.Match) -> str:
            j = int(m.group(2))
            if self._dummy or j >= len(self.pieces):
                return m.group(0)
            return repr(self._state_key(m.group(1), self.pieces[j].index))

        return re.sub(r"'state\.(\w+)\.(\d+)'", full_key, message)

    def _shard_indices(self, g: _Group) -> list[int]:
        """Positions in the inner optimizer's list of this rank's pieces of group ``g``."""
        if self._dummy:
            return []
        start = sum(len(h.pieces[self.rank]) for h in self._groups[: self._groups.index(g)])
        return list(range(start, start + len(g.pieces[self.rank])))

    def _state_key(self, name: str, i: int) -> str:
        return f"state.{name}" if self._structure == "array" else f"state.{name}.{self._keys[i]}"

    def _state_order(self, key: str) -> tuple:
        name = key.split(".")[1]
        rest = key[len("state.") + len(name) + 1 :]
        index = 0 if self._structure == "array" else self._key_strings.index(rest)
        return name, index

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

    # -- structure -------------------------------------------------------------------------------

    def _labels(self, what: str) -> list[str]:
        if self._structure == "array":
            return [what]
        return [f"{what}[{k!r}]" for k in self._keys]

    @property
    def _key_strings(self) -> list[str]:
        return [str(k) for k in self._keys]

    def _make_groups(self) -> list[_Group]:
        by_dtype: dict[np.dtype, list[int]] = {}
        for i, p in enumerate(self._params):
            by_dtype.setdefault(_dtype(p), []).append(i)
        return [
            _Group(self._mem, dt, idx, self._params, self.size, self.rank)
            for dt, idx in by_dtype.items()
        ]

    def __repr__(self) -> str:
        return (
            f"ShardedOptimizer({self.optimizer.__name__}, rank {self.rank} of {self.size}, "
            f"{sum(p.stop - p.start for p in self.pieces)} of "
            f"{sum(_size(p) for p in self._params)} elements)"
        )


# -- helpers -------------------------------------------------------------------------------------


def _flatten(params: Params) -> tuple[str, list, list]:
    if isinstance(params, Mapping):
        return "dict", list(params), list(params.values())
    if isinstance(params, (list, tuple)):
        return "list", list(range(len(params))), list(params)
    return "array", [None], [params]


def _memory_for(params: list, names: list[str]):
    """Check the parameters; return how to allocate, copy and communicate their memory."""
    infos = [describe(p, name) for p, name in zip(params, names)]
    for info, name in zip(infos, names):
        if info.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have dtype float32 or float64, got {info.dtype}")
        if not info.c_contiguous:
            raise ValueError(f"{name} is not C-contiguous")
        if not info.writeable:
            raise ValueError(f"{name} is read-only; fastrms updates it in place")
        if info.kind != infos[0].kind:
            raise TypeError(f"{name} and {names[0]} must all be NumPy arrays or all CUDA arrays")
    spans = sorted((*extent(p), name) for p, name in zip(params, names))
    for (a, n, name), (b, m, other) in zip(spans, spans[1:]):
        if n and m and b < a + n:
            raise ValueError(f"{other} overlaps {name} in memory; pass separate arrays")
    return _Device() if infos[0].kind == DEVICE else _Host()


class _Host:
    """NumPy memory."""

    kind = "host"

    def flat(self, a):
        return a.reshape(-1)

    def flat_view(self, flats: list, writeable: bool = True):
        if any(not f.flags.c_contiguous for f in flats):
            return None
        return _flat_view([f.reshape(-1) for f in flats], writeable)

    def empty(self, n: int, dtype):
        return np.empty(n, dtype)

    def copy(self, dst, src) -> None:
        np.copyto(dst, src)

    def pack(self, dst, grad) -> None:
        np.copyto(dst.reshape(grad.shape), grad)

    def divide(self, a, n: int) -> None:
        np.divide(a, n, out=a)

    def sync(self) -> None:
        pass

    def mpi(self, a):
        return a


class _Device:
    """CUDA memory (Numba views of any CUDA array), passed to a CUDA-aware MPI as is. Under
    Numba's CUDA simulator the "device" memory is host memory, which any MPI takes."""

    kind = "cuda"

    def __init__(self) -> None:
        from numba import cuda

        self.cuda, self.backend = cuda, dispatch.get("cuda")
        self.simulator = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"
        if not self.simulator and not _mpi_is_cuda_aware():
            raise TypeError(
                "params are CUDA arrays, but this MPI library does not report CUDA support "
                "(MPIX_Query_cuda_support); use a CUDA-aware MPI, or NumPy arrays"
            )
        self._scale = None

    def flat(self, a):
        return self.backend.view(a)

    def flat_view(self, flats: list, writeable: bool = True):
        return None  # always through the flat buffers

    def empty(self, n: int, dtype):
        return self.cuda.device_array(n, dtype)

    def copy(self, dst, src) -> None:
        if dst.size:
            dst.copy_to_device(src)

    def pack(self, dst, grad) -> None:
        self.copy(dst, self.backend.view(grad))

    def divide(self, a, n: int) -> None:
        if self._scale is None:
            global cuda
            cuda = self.cuda
            self._scale = cuda.jit(_divide_kernel)
        if a.size:
            self._scale[(a.size + 255) // 256, 256](a, a.dtype.type(n))

    def sync(self) -> None:
        self.cuda.synchronize()

    def mpi(self, a):
        return a._ary if self.simulator else a


cuda: Any = None  # numba.cuda, imported by the first _Device (import fastrms must not)


def _divide_kernel(x, n):
    """``x /= n`` on the device (compiled with numba.cuda.jit on first use)."""
    i = cuda.grid(1)
    if i < x.size:
        x[i] = x[i] / n


def _mpi_is_cuda_aware() -> bool:
    """Whether the loaded MPI library says it supports CUDA memory (Open MPI, MPICH)."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "libmpi" in line and "/" in line}
    for path in sorted(paths):
        query = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support", None)
        if query is not None:
            query.restype = ctypes.c_int
            return bool(query())
    return False


def _dtype(a) -> np.dtype:
    return describe(a, "array").dtype


def _shape(a) -> tuple:
    return describe(a, "array").shape


def _size(a) -> int:
    return int(np.prod(_shape(a), dtype=np.int64))


def _state_names(state_dict: Mapping) -> set[str]:
    return {k.split(".")[1] for k in state_dict if isinstance(k, str) and k.startswith("state.")}


def _type_name(x: Any) -> str:
    return f"{type(x).__module__}.{type(x).__qualname__}"


def _flat_view(flats: list[np.ndarray], writeable: bool = True) -> np.ndarray | None:
    """One 1-D array over the memory of the 1-D arrays ``flats`` if they lie end to end, in
    order, in one C-contiguous base array (writeable if ``writeable``); else None."""
    flats = [f for f in flats if f.size]
    if not flats:
        return None
    root = _root(flats[0])
    if not root.flags.c_contiguous or (writeable and not root.flags.writeable):
        return None
    base = root.__array_interface__["data"][0]
    start = pos = flats[0].__array_interface__["data"][0]
    for f in flats:
        if _root(f) is not root or f.__array_interface__["data"][0] != pos:
            return None
        if f.dtype != flats[0].dtype:
            return None
        pos += f.nbytes
    return root.reshape(-1).view(np.uint8)[start - base : pos - base].view(flats[0].dtype)


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a
