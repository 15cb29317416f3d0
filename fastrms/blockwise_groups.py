"""Grouped steps of parameters whose state is held blockwise in 8 bits (``state_dtype="int8"``).

A state array of such a parameter is a :class:`fastrms.lowprecision.Quantized` pair: ``uint8``
codes shaped as the parameter and float32 scales, one per block of 256 elements, both NumPy
arrays or both CUDA arrays. This module checks the pairs (:func:`split_state`) and runs them:

- :class:`BlockwiseCpuGroup`: the Numba kernels of :mod:`fastrms.kernels.blockwise`, over a
  table whose rows hold the codes' and then the scales' addresses, cut into parts on block
  boundaries (:func:`block_schedule`);
- :class:`BlockwiseCudaGroup`: the CUDA kernel of :mod:`fastrms.kernels.cuda_blockwise`,
  over the same table of device addresses, one thread block per block of 256 elements;
- :class:`BlockwiseNumpyGroup`: the reference: dequantize, the NumPy rule, quantize
  (:mod:`fastrms.lowprecision`).

:class:`fastrms.grouped.StepPlan` builds them for a kernel signature whose slots are
blockwise (:func:`fastrms.precision.slot_storages`).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from . import lowprecision
from .arrays import describe, extent
from .launch_groups import CpuGroup, CudaGroup, NumpyGroup
from .lowprecision import BLOCK, Quantized, n_blocks
from .schedule import schedule

__all__ = [
    "BlockwiseCpuGroup",
    "BlockwiseCudaGroup",
    "BlockwiseNumpyGroup",
    "block_schedule",
    "split_state",
]


def block_schedule(sizes: np.ndarray, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`fastrms.schedule.schedule`, with every cut on a multiple of :data:`BLOCK`
    elements of its array (an array's last piece ends at its size)."""
    sizes = np.asarray(sizes, np.int64)
    part_ptr, items = schedule(-(-sizes // BLOCK), parts)
    items = items.copy()
    items[:, 1:] *= BLOCK
    items[:, 2] = np.minimum(items[:, 2], sizes[items[:, 0]])
    return part_ptr, np.ascontiguousarray(items)


def check_pair(
    value: Any, shape: tuple, label: str, option: str, written: bool = True
) -> Quantized:
    """``value`` as a :class:`Quantized` pair for a parameter of ``shape``, checked: a pair of
    arrays on one side (NumPy arrays, or CUDA arrays on one device), codes ``uint8`` of
    ``shape``, scales float32 of ``n_blocks`` entries, both C-contiguous and writeable (if
    ``written``). Raises ``TypeError``/``ValueError`` naming ``label``."""
    if not isinstance(value, tuple) or len(value) != 2:
        raise TypeError(
            f"{label} must be a fastrms.lowprecision.Quantized (codes, scales) pair under "
            f"{option}, got {type(value).__name__}"
        )
    codes, scales = value
    size = int(np.prod(shape, dtype=np.int64))
    infos = []
    for part, a, dtype, want in (
        ("codes", codes, np.uint8, tuple(shape)),
        ("scales", scales, np.float32, (n_blocks(size),)),
    ):
        try:
            info = describe(a, f"{part} of {label}")
        except TypeError:
            raise TypeError(
                f"{part} of {label} must be a NumPy array or a CUDA array, got {type(a).__name__}"
            ) from None
        if info.dtype != dtype:
            raise TypeError(
                f"{part} of {label} has dtype {info.dtype}; {option} holds it as {dtype.__name__}"
            )
        if tuple(info.shape) != want:
            raise ValueError(f"{part} of {label} has shape {tuple(info.shape)}, expected {want}")
        infos.append(info)
        if not written:
            continue
        if not info.c_contiguous:
            raise ValueError(f"{part} of {label} must be C-contiguous")
        if not info.writeable:
            raise ValueError(f"{part} of {label} is read-only")
    codes_info, scales_info = infos
    if codes_info.kind != scales_info.kind:
        raise TypeError(
            f"codes and scales of {label} must both be NumPy arrays or both CUDA arrays"
        )
    devices = (codes_info.device, scales_info.device)
    if None not in devices and devices[0] != devices[1]:
        raise ValueError(
            f"scales of {label} are on CUDA device {devices[1]} but its codes on device "
            f"{devices[0]}"
        )
    return Quantized(codes, scales)


def split_state(named: dict, labels: tuple, shape: tuple, option: str) -> tuple[dict, dict]:
    """Check the pairs ``named[label]`` for each of ``labels``; return ``named`` with each pair
    replaced by its codes (checked as arrays by the caller), and ``{label: scales}``."""
    named = dict(named)
    scales = {}
    for label in labels:
        pair = check_pair(named[label], shape, label, option)
        named[label] = pair.codes
        scales[f"scales of {label}"] = pair.scales
    return named, scales


def refuse_pairs(named: dict, labels: tuple, size: int, option: str) -> None:
    """State of a parameter too small for 8 bits must be plain arrays: refuse pairs."""
    for label in labels:
        if isinstance(named[label], tuple):
            raise TypeError(
                f"{label}: a parameter of {size} elements (under "
                f"{lowprecision.MIN_8BIT_SIZE}) keeps float32 state under {option}; pass an "
                "array, not codes and scales"
            )


def _used(group) -> tuple[bool, ...]:
    from .precision import SLOTS

    return tuple(s in group.setup.state for s in SLOTS[group.setup.rule])


def _pairs(arrays: list) -> list:
    """The groups' arrays with each state pair as a :class:`Quantized` (a plain ``(codes,
    scales)`` tuple passes :func:`check_pair` too)."""
    return [[Quantized(*a) if isinstance(a, tuple) else a for a in row] for row in arrays]


def block_table(signature, arrays: list) -> np.ndarray:
    """One int64 row per array: element count, the addresses of param, grad (per step),
    each slot's codes, the param's extra word if it has one (a bfloat16 parameter's key of
    stochastic rounding, set per step, or its Kahan compensation's address, the last of its
    arrays), then each slot's scales (an unused slot: the param's, never read). Host or
    device addresses, as the arrays are (the CPU and CUDA kernels read the same table)."""
    storages = signature.storages
    slots = len(storages) - 2
    scales = signature.extra_word(2)
    table = np.zeros((len(arrays), signature.table_width), np.int64)
    for r, row in enumerate(arrays):
        p = row[0]
        table[r, 0] = int(np.prod(describe(p, "param").shape, dtype=np.int64))
        table[r, 1:] = extent(p)[0]
        for k, a in enumerate(row[2 : 2 + slots]):
            if isinstance(a, Quantized):
                table[r, 3 + k] = extent(a.codes)[0]
                table[r, scales + k] = extent(a.scales)[0]
        if storages[0].codec == "bf16_kahan":
            table[r, signature.extra_word(0)] = extent(row[-1])[0]
    return table


class BlockwiseNumpyGroup(NumpyGroup):
    """The reference: per array, each used slot dequantized into float32, the NumPy rule, then
    quantized back into the same codes and scales arrays. A bfloat16 parameter and its
    gradient are widened to float32 first, and the parameter is stored back as
    :class:`~fastrms.launch_groups.NumpyGroup` stores it (:meth:`NumpyGroup._store_param`:
    rounded to nearest, stochastically, or with its Kahan compensation)."""

    def __init__(self, setup, backend, auto, signature, rows, arrays):
        super().__init__(setup, backend, auto, signature, rows, _pairs(arrays))

    def launch(self, hyper, grads):
        view = self.backend.view
        rule, flags = self.setup.rule, self.setup.flags
        storages = self.signature.storages
        coded_param = storages[0].codec is not None
        n_state = len(storages) - 2
        used = _used(self)
        for r, (i, arrays) in enumerate(zip(self.rows, self.arrays)):
            p, g = view(arrays[0]), view(grads[i])
            if coded_param:
                bits = lowprecision.bf16_bits(p)
                p, g = lowprecision.bf16_to_float32(bits), lowprecision.bf16_to_float32(g)
                before = p.copy()
            state = arrays[2 : 2 + n_state]
            views = [p, g]
            for k, a in enumerate(state):
                views.append(a.dequantize(storages[2 + k].signed).ravel() if used[k] else p)
            self.backend.launch(rule, flags, tuple(views), hyper)
            for k, a in enumerate(state):
                if used[k]:
                    new = Quantized.of(views[2 + k], storages[2 + k].signed)
                    a.codes.reshape(-1)[...] = new.codes.reshape(-1)
                    a.scales[...] = new.scales
            if coded_param:
                self._store_param(bits, p, before, arrays[2 + n_state :], int(self.keys[r]))


class BlockwiseCpuGroup(CpuGroup):
    """The Numba kernels of :mod:`fastrms.kernels.blockwise`. Runs on Numba's threads (not on
    another library's team); cuts the work on block boundaries."""

    def __init__(self, setup, backend, auto, signature, rows, arrays):
        super().__init__(setup, backend, auto, signature, rows, _pairs(arrays))

    def prepare(self):
        self.team = None  # no team body is generated for blockwise kernels (yet)
        return super().prepare()

    def _table(self) -> np.ndarray:
        return block_table(self.signature, self.arrays)

    def _kernels(self):
        return self.backend.blockwise_kernels(
            self.setup.rule, self.setup.flags, self.signature, _used(self)
        )

    def _cut(self, sizes: np.ndarray, parts: int):
        return block_schedule(sizes, parts)

    def _fall_back(self):
        from . import dispatch

        numpy = dispatch.fall_back(self.backend._reason)
        return BlockwiseNumpyGroup(self.setup, numpy, False, self.signature, self.rows, self.arrays)


class BlockwiseCudaGroup(CudaGroup):
    """The CUDA kernel of :mod:`fastrms.kernels.cuda_blockwise` over the same table of
    (device) addresses as :class:`BlockwiseCpuGroup`: one thread block per block of
    :data:`BLOCK` elements, one launch (or a few) for the group, on the parameters' stream."""

    def __init__(self, setup, backend, auto, signature, rows, arrays):
        super().__init__(setup, backend, auto, signature, rows, _pairs(arrays))

    def _table(self) -> np.ndarray:
        return block_table(self.signature, self.arrays)

    def prepare(self):
        self.backend.grouped_launcher()  # imports numba.cuda, or says why it cannot
        from .kernels import cuda_blockwise, rules

        self._launch = functools.partial(
            cuda_blockwise.launch_blockwise,
            rules.RULES[self.setup.rule],
            self.setup.flags,
            self.signature,
            _used(self),
        )
        return self

    def launch(self, hyper, grads):
        stream = self.backend.stream_of(self.arrays[0][0])
        self._launch(self.table, hyper, stream, self._words)


#: The group class of each backend for blockwise signatures.
BLOCKWISE_GROUPS = {
    "numpy": BlockwiseNumpyGroup,
    "cpu": BlockwiseCpuGroup,
    "cuda": BlockwiseCudaGroup,
}
