"""How the sharded optimizer splits the parameters across ranks (ZeRO stage 1 partitions).

The parameters of one dtype are laid end to end (in their order in ``params``) and split into
N contiguous element ranges of sizes differing by at most one, across tensor boundaries, as
DeepSpeed's flat partitions are (:func:`bounds`, :func:`partition`). A :class:`Group` holds one
dtype's parameters: their flat layout, each rank's :class:`Piece` of them, and the buffers the
reduce-scatter and the all-gather of :mod:`fastrms.distributed` go through. Nothing here
imports mpi4py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .arrays import describe


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


class Group:
    """The parameters of one dtype: their flat layout, partition and communication buffers."""

    def __init__(self, mem, dtype: np.dtype, indices: list[int], params: list, nranks, rank):
        self.mem, self.dtype = mem, dtype
        self.indices = indices  # positions in the flattened params
        sizes = [size_of(params[i]) for i in indices]
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
            self.mem.pack(self.send[off : off + size_of(grads[i])], grads[i])
        return self.send


def make_groups(mem, params: list, nranks: int, rank: int) -> list[Group]:
    """One :class:`Group` per dtype of ``params``, in the order the dtypes first appear."""
    by_dtype: dict[np.dtype, list[int]] = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(describe(p, "array").dtype, []).append(i)
    return [Group(mem, dt, idx, params, nranks, rank) for dt, idx in by_dtype.items()]


def size_of(a) -> int:
    """The number of elements of an array (host or device)."""
    return int(np.prod(describe(a, "array").shape, dtype=np.int64))
