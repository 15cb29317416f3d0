"""The CPU schedule of a grouped step: the table of a group's arrays, and its cut into parts.

Below :mod:`fastrms.grouped` (whose groups build the tables) and :mod:`fastrms.dispatch`
(whose one-array step on another library's thread team runs as a group of one row), which both
use it.
"""

from __future__ import annotations

import numpy as np

#: Equal parts per thread: a little slack for threads that start late or run slower.
PARTS_PER_THREAD = 4


def schedule(sizes: np.ndarray, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut the concatenation of arrays of ``sizes`` elements into ``parts`` equal parts.

    Returns ``(part_ptr, items)``: part ``k`` is ``items[part_ptr[k]:part_ptr[k + 1]]``, each
    item an int64 row ``(array, start, stop)`` of elements of one array. Empty arrays make no
    items; an array may span several parts and a part several arrays.
    """
    sizes = np.asarray(sizes, np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    total = int(offsets[-1])
    parts = max(1, min(parts, total))
    bounds = (np.arange(parts + 1, dtype=np.int64) * total) // parts
    cuts = np.union1d(offsets, bounds)
    starts, stops = cuts[:-1], cuts[1:]
    array = np.searchsorted(offsets, starts, "right") - 1
    items = np.stack([array, starts - offsets[array], stops - offsets[array]], axis=1)
    part = np.searchsorted(bounds, starts, "right") - 1
    part_ptr = np.searchsorted(part, np.arange(parts + 1), "left").astype(np.int64)
    return part_ptr, np.ascontiguousarray(items, np.int64)


def team_block(table: np.ndarray, part_ptr: np.ndarray, items: np.ndarray, scalars: np.ndarray):
    """The int64 argument block of ``kernels.elementwise.team_body`` (its ``TEAM_ARGS``): the
    addresses of ``table``, ``part_ptr`` and ``items``, the number of parts, the address of
    ``scalars``, and the claim counter, 0. The arrays must outlive the team's run."""
    return np.array([table.ctypes.data, part_ptr.ctypes.data, items.ctypes.data,
                     part_ptr.size - 1, scalars.ctypes.data, 0], np.int64)  # fmt: skip
