"""How the sharded optimizer splits the parameters across ranks (ZeRO stage 1 partitions).

The parameters of one dtype are laid end to end (in their order in ``params``) and split into
N contiguous element ranges of sizes differing by at most one, across tensor boundaries, as
DeepSpeed's flat partitions are (:func:`bounds`, :func:`partition`). A tensor whose state is
held in blocks (``state_dtype="int8"``: 256 elements a scale) is cut on block boundaries only
(``aligns``), each cut moved to the nearest one, so that every rank holds whole blocks and
quantizes them as the single-process optimizer does. A :class:`Group` holds one dtype's
parameters: their flat layout, each rank's :class:`Piece` of them, and the buffers the
reduce-scatter and the all-gather of :mod:`fastrms.distributed` go through. bfloat16
parameters' gradients are reduced as float32 (MPI has no bfloat16 sum) and handed to the step
rounded to nearest even (:meth:`Group.round_grads`). Nothing here imports mpi4py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .arrays import describe
from .lowprecision import BFLOAT16


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


def aligned_bounds(
    sizes: Sequence[int], nranks: int, aligns: Sequence[int] | None = None
) -> list[int]:
    """:func:`bounds` of tensors of ``sizes`` elements laid end to end, each cut that falls
    inside tensor ``i`` moved to the nearest multiple of ``aligns[i]`` elements of it (or to
    its end, whichever is nearer; ties go down). None, or all ones: :func:`bounds` itself.

    Moving every cut by the same nondecreasing rule keeps the bounds in order; the ranges may
    then differ by up to an alignment in size, and a rank may get an empty one.
    """
    b = bounds(sum(sizes), nranks)
    if aligns is None or all(a == 1 for a in aligns):
        return b
    starts = np.cumsum([0, *sizes]).tolist()
    out = [b[0]]
    for cut in b[1:-1]:
        i = int(np.searchsorted(starts, cut, "right")) - 1  # the tensor the cut falls in
        if i < len(sizes) and cut > starts[i] and aligns[i] > 1:
            local, a = cut - starts[i], aligns[i]
            down, up = local // a * a, min(-(-local // a) * a, sizes[i])
            cut = starts[i] + (down if local - down <= up - local else up)
        out.append(cut)
    return [*out, b[-1]]


def partition(
    sizes: Sequence[int], nranks: int, aligns: Sequence[int] | None = None
) -> list[list[Piece]]:
    """Split tensors of ``sizes`` elements, laid end to end, into ``nranks`` contiguous ranges
    (:func:`aligned_bounds`: cuts inside tensor ``i`` on multiples of ``aligns[i]``).

    Returns, for each rank, the pieces of the tensors that its range covers, in order. A rank
    may get no piece (more ranks than elements); zero-size tensors are in no piece.
    """
    b = aligned_bounds(sizes, nranks, aligns)
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


class Group:
    """The parameters of one dtype: their flat layout, partition and communication buffers.

    ``aligns`` gives each parameter's cut alignment (1, or 256 for blockwise state); a
    bfloat16 group moves its gradients as float32 (:attr:`wire`) and its parameters as their
    ``uint16`` patterns (:attr:`gathered_bits`)."""

    def __init__(self, mem, dtype, indices: list[int], params: list, nranks, rank, aligns=None):
        self.mem, self.dtype = mem, dtype
        #: The dtype the gradients are reduced in: float32 for bfloat16 parameters.
        self.wire = np.dtype(np.float32) if dtype == BFLOAT16 else dtype
        self.indices = indices  # positions in the flattened params
        sizes = [size_of(params[i]) for i in indices]
        self.total = sum(sizes)
        self.offsets = np.cumsum([0, *sizes]).tolist()[:-1]
        mine_aligns = None if aligns is None else [aligns[i] for i in indices]
        b = aligned_bounds(sizes, nranks, mine_aligns)
        self.counts = [b[r + 1] - b[r] for r in range(nranks)]
        self.displs = b[:-1]
        self.lo, self.hi = b[rank], b[rank + 1]
        # Pieces in this group's local numbering, mapped back to params' positions.
        self.pieces = [
            [Piece(indices[p.index], p.start, p.stop, p.offset) for p in rank_pieces]
            for rank_pieces in partition(sizes, nranks, mine_aligns)
        ]
        flat = {i: mem.flat(params[i]) for i in indices}
        # Parameters laid end to end in one array already: gather straight into their memory.
        self.param_flat = mem.flat_view([flat[i] for i in indices])
        self.gathered = (
            self.param_flat if self.param_flat is not None else mem.empty(self.total, dtype)
        )
        self.send = None  # the gradients' flat buffer, allocated on first need
        self.recv = mem.empty(self.counts[rank], self.wire)
        # bfloat16: the reduced gradient rounded to nearest even, what the local step reads.
        self.low = None if self.wire == dtype else mem.empty(self.counts[rank], dtype)
        grads = self.recv if self.low is None else self.low
        self.mine = [flat[p.index][p.start : p.stop] for p in self.pieces[rank]]
        self.mine_in_gathered = [self.gathered[p.offset : p.offset + p.stop - p.start]
                                 for p in self.pieces[rank]]  # fmt: skip
        self.grad_shard = [grads[p.offset - self.lo : p.offset - self.lo + p.stop - p.start]
                           for p in self.pieces[rank]]  # fmt: skip
        # (destination in params, source in the gathered buffer) for the other ranks' pieces.
        self.unpack = [
            (flat[p.index][p.start : p.stop],
             self.gathered[p.offset : p.offset + p.stop - p.start])
            for r, rank_pieces in enumerate(self.pieces) if r != rank
            for p in rank_pieces
        ]  # fmt: skip

    @property
    def gathered_bits(self):
        """The gathered parameters as MPI moves them (bfloat16 as its ``uint16`` patterns)."""
        return self.gathered.view(np.uint16) if self.dtype == BFLOAT16 else self.gathered

    def send_buffer(self, grads: list) -> np.ndarray:
        """The gradients of this group as one flat array of :attr:`wire` dtype: a view if they
        are laid end to end already (and need no conversion), else a copy into the persistent
        send buffer (bfloat16 widened to float32, exactly)."""
        if self.wire == self.dtype:
            flat = self.mem.flat_view([grads[i] for i in self.indices], writeable=False)
            if flat is not None:
                return flat
        if self.send is None:
            self.send = self.mem.empty(self.total, self.wire)
        for i, off in zip(self.indices, self.offsets):
            self.mem.pack(self.send[off : off + size_of(grads[i])], grads[i])
        return self.send

    def round_grads(self) -> None:
        """bfloat16 parameters: the reduced float32 gradient (averaged already) rounded to
        nearest even (:func:`fastrms.lowprecision.round_nearest`'s bits) into the buffer the
        local step reads. Nothing for other dtypes."""
        if self.low is not None:
            self.mem.round_bf16(self.low, self.recv)


def make_groups(
    mem, params: list, nranks: int, rank: int, aligns: Sequence[int] | None = None
) -> list[Group]:
    """One :class:`Group` per dtype of ``params``, in the order the dtypes first appear;
    ``aligns[i]`` (default 1) aligns the cuts inside parameter ``i`` (:func:`partition`)."""
    by_dtype: dict[np.dtype, list[int]] = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(describe(p, "array").dtype, []).append(i)
    return [Group(mem, dt, idx, params, nranks, rank, aligns) for dt, idx in by_dtype.items()]


def size_of(a) -> int:
    """The number of elements of an array (host or device)."""
    return int(np.prod(describe(a, "array").shape, dtype=np.int64))
