"""The CUDA kernel of steps whose state is held blockwise in 8 bits (``state_dtype="int8"``).

The CUDA twin of :func:`fastrms.kernels.blockwise.grouped_block_loops`, over the same table
(one int64 row per array of :attr:`~fastrms.precision.Signature.table_width` words: element
count, the addresses of param, grad, each slot's ``uint8`` codes, a bfloat16 parameter's
extra word, then each slot's float32 scales) and with the same results, bit for bit
(:mod:`fastrms.lowprecision` is the reference). Parameters are float32, or bfloat16 held as
``uint16`` patterns under every rounding (nearest, stochastic, Kahan).

One thread block of :data:`BLOCK` threads steps one quantization block of :data:`BLOCK`
elements at a time; a host-built table of ``(table row, first element)`` per quantization
block, in device memory and cached by content as :func:`fastrms.kernels.cuda.launch_grouped`
caches its tables, lists them, and a launch of at most a full wave of thread blocks
(:func:`fastrms.kernels.cuda.max_blocks`) strides through it. Thread ``t`` of a block:

1. decodes element ``t`` of each slot the options use into a shared-memory float32 scratch
   (``code -> value * scale``, :func:`fastrms.kernels.blockwise.decode_signed` /
   ``decode_unsigned``);
2. runs the rule, unchanged (:mod:`fastrms.kernels.rules`, as a device function) on index
   ``t`` of the param's and grad's piece of the block and the scratch rows;
3. takes the atomic max of the magnitude pattern of its new value (the float32 bits with the
   sign cleared) into shared memory: the block's absmax as
   :func:`fastrms.kernels.blockwise.absmax` finds it, NaN above Inf above every finite value
   (an integer max, so the order of the threads does not matter);
4. encodes its element with the block's scale (:func:`block_scale`: 0 for a block of zeros
   or subnormals, NaN for one holding NaN or Inf, both with zero codes), and thread 0 writes
   the scale.

A bfloat16 parameter and its gradient are loaded through their codec into two more scratch
rows, so the rule sees float32 arrays at index ``t`` as it does the slots', and the
parameter is stored back through its codec (:mod:`fastrms.kernels.columns`: to nearest,
stochastically with the row's key word and the element's index in its tensor, or with its
Kahan compensation array), as the CPU kernel stores it.

Threads past the end of a ragged last block do nothing but reach every ``syncthreads``.
Importing this module imports ``numba.cuda``; fastrms imports it only when the ``cuda``
backend steps int8 state.
"""

from functools import cache

import numpy as np
from numba import cuda, types
from numba.extending import register_jitable

from . import columns
from . import cuda as cuda_kernels
from ._options import FASTMATH
from .blockwise import (
    _ABS,
    _INF_BITS,
    _NORMAL_BITS,
    BLOCK,
    decode_signed,
    decode_unsigned,
    encode_signed,
    encode_unsigned,
)
from .cuda_pointers import as_device_array


@register_jitable
def magnitude_bits(x):
    """The float32 pattern of ``|x|`` (``uint32``): ordered as the magnitudes, NaN above Inf."""
    return np.uint32(np.float32(x).view(np.uint32) & _ABS)


@register_jitable
def block_scale(bits):
    """``(scale, inv, normal)`` of a block whose largest magnitude pattern is ``bits``: its
    absmax, the reciprocal and True if that is a normal float32; ``(0, 0, False)`` for a
    block of zeros or subnormals, ``(NaN, 0, False)`` for one holding NaN or Inf, whose codes
    are then all zero (:func:`fastrms.kernels.blockwise.quantize_block`)."""
    if bits < _NORMAL_BITS:
        return np.float32(0), np.float32(0), False
    if bits >= _INF_BITS:
        return np.float32(np.nan), np.float32(0), False
    m = np.uint32(bits).view(np.float32)
    return m, np.float32(1) / m, True


# Generated per (slot count, signs, used slots), so that the rule's tuple of arrays has a static
# length and each slot's codec is fixed. CUDA kernels are compiled per process (no disk cache),
# so a kernel made by exec loses nothing; the simulator runs it as Python.
#
# One barrier per block stepped: the absmax is an atomic max into shared memory, in one of
# three rotating rows of ``peaks``. Thread 0 clears the row of the next block before this
# block's barrier; that row was last read two blocks ago (before the previous barrier) and is
# next written after this barrier. (A tree reduction took nine barriers, each costing the
# simulator a poll of every thread.)
_SOURCE = """
def make(device_rule, as_device_array, flags, codes_like, load_p, store_p, {codecs}):
    def kernel(meta, first, count, hyper{words}):
        like = hyper[0]
        half_like = uint16(0)
        scratch = cuda.shared.array(({rows}, {block}), float32)
        peaks = cuda.shared.array((3, {slots}), uint32)
        t = cuda.threadIdx.x
        if t == 0:
            for s in range({slots}):
                peaks[0, s] = uint32(0)
        cuda.syncthreads()
        c = cuda.blockIdx.x
        turn = 0
        while c < count:
            at = first + 2 * c
            row = meta[at] * {width}
            start = meta[at + 1]
            k = min({block}, meta[row] - start)
            number = start // {block}
            inside = t < k
            if t == 0:
                for s in range({slots}):
                    peaks[(turn + 1) % 3, s] = uint32(0)
{load}
{heads}
            if inside:
                arrays = ({arrays})
                device_rule(t, arrays, hyper, flags)
{store_param}
{peak}
            cuda.syncthreads()
{store}
            turn = (turn + 1) % 3
            c += cuda.gridDim.x

    return kernel
"""

_LOAD = """\
            codes{s} = as_device_array(meta[row + {codes}] + start, k, codes_like)
            scale{s} = as_device_array(meta[row + {scales}] + 4 * number, 1, like)
            if inside:
                scratch[{s}, t] = decode{s}(codes{s}[t], scale{s}[0])
"""

_PEAK = """\
            if inside:
                cuda.atomic.max(peaks, (turn, {s}), magnitude_bits(scratch[{s}, t]))
"""

_STORE = """\
            scale, inv, normal = block_scale(peaks[turn, {s}])
            if inside:
                codes{s}[t] = encode{s}(scratch[{s}, t] * inv) if normal else uint8(0)
            if t == 0:
                scale{s}[0] = scale
"""


# A float32 parameter and its gradient: the rule steps the block's piece of them in place.
_FLOAT_HEADS = """\
            pa = as_device_array(meta[row + 1] + 4 * start, k, like)
            ga = as_device_array(meta[row + 2] + 4 * start, k, like)"""

# A bfloat16 one: both loaded into the scratch rows after the slots'.
_BF16_HEADS = """\
            pa = as_device_array(meta[row + 1] + 2 * start, k, half_like)
            ga = as_device_array(meta[row + 2] + 2 * start, k, half_like)
            if inside:
                scratch[{p}, t] = load_p(pa, t)
                scratch[{g}, t] = load_p(ga, t)"""

# Its store, by the codec's kind (kernels.columns.KINDS).
_PARAM_STORES = {
    "plain": "store_p(pa, t, scratch[{p}, t])",
    "keyed": "store_p(pa, t, scratch[{p}, t], key, uint32((base + start + t) & 0xFFFFFFFF))",
    "paired": "store_p(pa, comp, t, scratch[{p}, t])",
}
# What the kind needs from the row: a stochastically rounded parameter's key word (the key in
# the low 32 bits, the index of the array's element 0 in its tensor above) comes from
# ``words``, one per table row, so the table on the device stays the same from step to step.
_PARAM_WORDS = {
    "plain": "",
    "keyed": """
            word = words[meta[at]]
            key = uint32(word & 0xFFFFFFFF)
            base = word >> 32""",
    "paired": """
            comp = as_device_array(meta[row + {comp}] + 2 * start, k, half_like)""",
}


def kernel_source(signature, used: tuple) -> str:
    """The Python source of the kernel for ``signature`` (float32 or bfloat16 parameters,
    every state slot held blockwise), of whose slots ``used`` are stepped (a slot the options
    leave unused is never read or written)."""
    slots = signature.storages[2:]
    n = len(slots)
    live = [s for s in range(n) if used[s]]
    codec = signature.storages[0].codec
    scales = signature.extra_word(2)
    arrays = [f"scratch[{s}]" for s in range(n)]  # the rule's columns: param, grad, slots
    if codec is None:
        heads, store_param, kind = _FLOAT_HEADS, "", None
        arrays = ["pa", "ga", *arrays]
    else:
        kind = columns.KINDS.get(codec, "plain")
        heads = _BF16_HEADS.format(p=n, g=n + 1)
        heads += _PARAM_WORDS[kind].format(comp=signature.extra_word(0))
        store_param = " " * 16 + _PARAM_STORES[kind].format(p=n)
        arrays = [f"scratch[{n}]", f"scratch[{n + 1}]", *arrays]
    return _SOURCE.format(
        codecs=", ".join(f"decode{s}, encode{s}" for s in range(n)),
        words=", words" if kind == "keyed" else "",
        slots=n,
        rows=n if codec is None else n + 2,
        block=BLOCK,
        width=signature.table_width,
        heads=heads,
        arrays=", ".join(arrays) + ",",
        store_param=store_param,
        load="".join(_LOAD.format(s=s, codes=3 + s, scales=scales + s) for s in live),
        peak="".join(_PEAK.format(s=s) for s in live),
        store="".join(_STORE.format(s=s) for s in live),
    )


@cache
def block_kernel(rule, flags: tuple, signature, used: tuple):
    """The kernel ``kernel[blocks, BLOCK, stream](meta, first, count, hyper)`` stepping the
    ``count`` quantization blocks listed from ``meta[first]``, for a rule of ``signature``
    (a :class:`fastrms.precision.Signature` whose state slots are held blockwise), ``used``
    saying which slots the options step. A stochastically rounded bfloat16 parameter's kernel
    takes its key words too, ``kernel[...](meta, first, count, hyper, words)``.

    ``meta`` is one int64 device array: the table (``n`` rows of the signature's
    ``table_width`` words, see :func:`launch_blockwise`), flattened, then the block table
    (pairs of table row and first element). ``hyper`` is the rule's scalars, float32. Launch
    it with exactly :data:`BLOCK` threads per block.
    """
    slots = signature.storages[2:]
    if len(slots) != len(used) or not slots or not all(s.blockwise for s in slots):
        raise ValueError("a blockwise kernel needs every state slot held blockwise, and one "
                         "used flag per slot")  # fmt: skip
    codec = signature.storages[0].codec
    if codec is not None and codec not in columns.CODECS:
        raise ValueError(f"no codec {codec!r} has CUDA kernels (kernels.columns)")
    device_rule = cuda.jit(device=True, fastmath=FASTMATH)(rule)
    codecs = []
    for slot in slots:
        signed = slot.signed
        codecs += [decode_signed, encode_signed] if signed else [decode_unsigned, encode_unsigned]
    namespace = {
        "cuda": cuda,
        "float32": types.float32,
        "uint32": np.uint32,
        "uint16": np.uint16,
        "uint8": np.uint8,
        "magnitude_bits": magnitude_bits,
        "block_scale": block_scale,
    }
    source = kernel_source(signature, tuple(used))
    exec(compile(source, f"<blockwise kernel, {signature}, used={used}>", "exec"), namespace)
    load_p, store_p = columns.CODECS[codec] if codec is not None else (None, None)
    make = namespace["make"]
    return cuda.jit(fastmath=FASTMATH)(
        make(device_rule, as_device_array, flags, np.uint8(0), load_p, store_p, *codecs)
    )


def launch_blockwise(rule, flags, signature, used, table, hyper, stream=0, words=None) -> None:
    """Run one step of ``rule`` over the arrays of ``table``, whose state is held blockwise.

    Parameters
    ----------
    rule, flags
        As for :func:`fastrms.kernels.cuda.launch`.
    signature : fastrms.precision.Signature
        The storages: float32 or bfloat16 (``uint16`` patterns) parameters, under any of the
        roundings of :data:`fastrms.precision.PARAM_STORAGES`, and every state slot held
        blockwise (its map signed or not).
    used : tuple of bool
        Per state slot: whether the options use it.
    table : numpy.ndarray of int64, shape (n_arrays, signature.table_width)
        Per array (:func:`fastrms.blockwise_groups.block_table`): its element count, then the
        device addresses of its param and grad, of each slot's ``uint8`` codes (as many as
        elements), a Kahan parameter's compensation array (its extra word; a stochastically
        rounded one's is not read: ``words`` holds it), then of each slot's float32 scales
        (one per block of :data:`BLOCK`). An unused slot's columns may hold any address (the
        param's): they are never read. The arrays must stay alive until the step has run on
        the device.
    hyper : tuple of numpy.float32
        The rule's scalars.
    stream : numba.cuda stream or 0
        Every upload and launch is queued on it.
    words : numpy.ndarray of int64, optional
        A stochastically rounded parameter's key words, one per table row (the key in the low
        32 bits, the index of the array's element 0 in its tensor in the high 32, as
        :func:`fastrms.kernels.cuda.launch_grouped` takes them); copied to the device per
        step, so the table's own copy is reused.

    Notes
    -----
    The block table is built on the host and uploaded with the table once per content, cached
    as :func:`fastrms.kernels.cuda.launch_grouped` caches its own (keyed apart from them). A
    table of more than :data:`~fastrms.kernels.cuda.MAX_CHUNKS_PER_LAUNCH` blocks takes
    several launches on ``stream``. Each launch has at most a full wave of thread blocks
    (:func:`fastrms.kernels.cuda.max_blocks`), each stepping every ``gridDim``-th block.
    """
    cuda_kernels._check_table(table)
    if table.shape[1] != signature.table_width:
        raise ValueError(f"table must have {signature.table_width} columns, got {table.shape[1]}")
    keyed = signature.storages[0].codec == "bf16_stochastic"
    words = cuda_kernels._key_words(words, signature, table.shape[0])
    if not table.shape[0]:
        return
    key = ("blockwise", table.shape[1], BLOCK, cuda_kernels.MAX_CHUNKS_PER_LAUNCH,
           table.tobytes())  # fmt: skip
    plan = cuda_kernels._plan(key, table, BLOCK)
    if not plan.launches:
        return
    meta = cuda_kernels._device_copy(key, plan, stream)
    extra = (cuda_kernels._device_words(key, words, stream),) if keyed else ()
    kernel = block_kernel(rule, tuple(flags), signature, tuple(used))
    wave = cuda_kernels.max_blocks()
    for first, count in plan.launches:
        kernel[min(count, wave), BLOCK, stream](meta, first, count, hyper, *extra)
