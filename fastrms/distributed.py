"""Optimizer state sharded across MPI processes (ZeRO stage 1), with mpi4py.

Each of the N ranks of a communicator holds every parameter, but owns the optimizer state of
one contiguous 1/N of the flattened parameters and updates only that part::

    g_shard = reduce_scatter(grads) / N         (summed instead when average=False)
    p_shard = optimizer step on p_shard, g_shard, with the state of the shard only
    p       = all_gather(p_shard)               (into every rank's arrays, in place)

This module holds the public :class:`ShardedOptimizer`: its steps and collective checks; its
state dicts (gathered from and cut into the ranks' pieces) are in
:mod:`fastrms.shard_checkpoint`. How the parameters are split (pieces, groups of one dtype) is in
:mod:`fastrms.shard_partition`; the host or CUDA memory and MPI buffers in
:mod:`fastrms.shard_memory`; the parameter tree and state-dict keys in :mod:`fastrms.tree`.
Importing this module does not import mpi4py; creating a :class:`ShardedOptimizer` does
(``pip install "fastrms[mpi]"``).
"""

from __future__ import annotations

import time
import zlib
from typing import Any, NamedTuple

import numpy as np

from . import lowprecision
from .arrays import DEVICE, check_no_overlap, describe
from .lowprecision import BLOCK
from .optim import Optimizer
from .precision import check_rounding, is_bf16, state_dtype_of, state_storage
from .shard_checkpoint import ShardCheckpoints, dtype_of, shape_of
from .shard_memory import memory_for
from .shard_partition import Group, Piece, bounds, make_groups, partition, size_of
from .tree import Params, Tree

__all__ = ["REDUCTIONS", "Piece", "ShardedOptimizer", "bounds", "partition"]

REDUCTIONS = ("reduce_scatter", "reduce")


class ShardedOptimizer(ShardCheckpoints):
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
            low = any(is_bf16(dtype_of(p)) for p in self._params)
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
                self.reduce, self._mem.kind, [(shape_of(p), dtype_of(p).str) for p in self._params],
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
            self._shard = [self._mem.empty(0, dtype_of(self._params[0]))]
            self._grad_shard = [self._mem.empty(0, dtype_of(self._params[0]))]
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
        if any(is_bf16(dtype_of(a)) for a in self._shard):
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


def _type_name(x: Any) -> str:
    return f"{type(x).__module__}.{type(x).__qualname__}"
