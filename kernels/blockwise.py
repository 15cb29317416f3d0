"""The block-shaped computation: steps of optimizer state held as 8-bit blockwise codes.

State held with ``state_dtype="int8"`` is, per state array, ``uint8`` codes (one per element)
and float32 scales (one per block of :data:`BLOCK` elements, the block's absmax). A code is an
index into an 8-bit float-like map (:class:`fastrms.lowprecision.Float8Map`): signed (sign bit
and E4M3) for first moments, unsigned (E5M3) for second moments, as each layout's
:class:`fastrms.specs.Slot` declares. :mod:`fastrms.lowprecision` is the NumPy reference.

Per block of 256 elements, the kernels here:

1. decode each state slot's codes into a float32 scratch block (``code -> value * scale``);
2. run the rule, unchanged, on the parameter's and gradient's block and the scratch blocks;
3. find each slot's new absmax in the scratch block (an integer max over the float patterns);
4. encode the scratch block back into codes and write the scale.

The scratch is one array of ``slots * 256`` float32 per part of the work (a few per thread),
so nothing is proportional to ``n``; each block is in L1 between the passes, so memory is read
and written once. Work splits fall on multiples of 256 within each array (the last block of an
array may be short).

Encoding is the nearest code by integer arithmetic on the float32 pattern: rounding the
pattern to 3 mantissa bits is rounding the value to the map's nearest (a binade's carry moves
to the next exponent by itself), so the encoder is about 15 branch-free vector instructions
per 16 elements, about 8x cheaper than the dynamic map's closed form. Decoding is the inverse
shift. Even so the step is bound by computation, not memory: the codec's work about equals
Adam's own (``bench/int8_state_adam.py --phases``; figures in the README).

The kernels are closures defined in this file (Numba's ``cache=True`` keys them on it), and
bind :data:`TOKEN` as :mod:`fastrms.kernels.elementwise` does.
"""

from functools import cache

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, register_jitable
from numba.np.arrayobj import make_array, populate_array

from ._options import FASTMATH
from .elementwise import TOKEN as ELEMENTWISE_TOKEN
from .elementwise import _column_likes
from .pointers import address_of, arrays_at, load_int64, scalars_at

#: Elements per block (one scale each): fastrms.lowprecision.BLOCK.
BLOCK = 256

TOKEN = ELEMENTWISE_TOKEN

_ABS = np.uint32(0x7FFFFFFF)
_SIGN = np.uint32(0x80000000)
_INF_BITS = np.uint32(0x7F800000)
_NORMAL_BITS = np.uint32(0x00800000)
_U20 = np.uint32(20)
_U24 = np.uint32(24)
_HALF = np.uint32(0x80000)  # half of the pattern's unit at 3 mantissa bits


# -- the float8 maps' codecs (fastrms.lowprecision.float8_encode / float8_decode) ----------------


def _float8_codec(bias: int, signed: bool):
    """``(encode, decode)`` of the map of exponent bias ``bias``: ``encode(y)`` the code of a
    finite float32 ``|y| <= 1``, ``decode(c, scale)`` the value of code ``c`` times ``scale``
    (fastrms.lowprecision.Float8Map gives the formulas).

    All in 32-bit lanes (``uint32``/``float32``), every step truncated to 32 bits: Numba widens
    unsigned arithmetic to 64 bits otherwise, which halves the vector width.
    """
    shift = np.uint32(8 * (127 - bias) - 1)
    floor = np.uint32(8 * (127 - bias))  # shift + 1: the rounded pattern of index 1
    qmax = np.uint32(8 * bias + 1)
    threshold = np.uint32(np.float32(2.0 ** (-bias - 1)).view(np.uint32))
    magnitude_mask = np.uint32(0x7F if signed else 0xFF)
    zero = np.uint32(0)

    @register_jitable
    def magnitude_index(u):
        # The index q of the magnitude nearest to |y|, y of float32 pattern u.
        bits = np.uint32(u & _ABS)
        rounded = np.uint32(np.uint32(bits + _HALF) >> _U20)
        q = np.uint32(max(rounded, floor) - shift)
        q = q if bits >= threshold else zero
        return min(q, qmax)

    @register_jitable
    def magnitude(code):
        # The pattern of the magnitude of index q = code's magnitude bits.
        q = np.uint32(code & magnitude_mask)
        pattern = np.uint32(np.uint32(q + shift) << _U20)
        return pattern if q != zero else zero

    if signed:

        @register_jitable
        def encode(y):
            u = np.float32(y).view(np.uint32)
            return np.uint8(magnitude_index(u) | np.uint32((u >> _U24) & np.uint32(0x80)))

        @register_jitable
        def decode(c, scale):
            code = np.uint32(c)
            sign = np.uint32(np.uint32(code & np.uint32(0x80)) << _U24)
            return np.uint32(magnitude(code) | sign).view(np.float32) * scale

    else:

        @register_jitable
        def encode(y):
            u = np.float32(y).view(np.uint32)
            q = magnitude_index(u)
            return np.uint8(q if u < _SIGN else zero)

        @register_jitable
        def decode(c, scale):
            return np.uint32(magnitude(np.uint32(c))).view(np.float32) * scale

    return encode, decode


encode_signed, decode_signed = _float8_codec(15, True)
encode_unsigned, decode_unsigned = _float8_codec(31, False)


@register_jitable
def absmax(values, k):
    """``max |values[:k]|`` (NaN if one is NaN), as an integer max over the patterns with the
    sign cleared: a reduction LLVM vectorizes, which a float max with NaN rules is not."""
    m = np.uint32(0)
    for i in range(k):
        m = max(m, np.uint32(np.float32(values[i]).view(np.uint32) & _ABS))
    return m


@register_jitable
def decode_block(codes, scratch, k, scale, signed):
    """Values of ``codes[:k]`` in a block of absmax ``scale``, into ``scratch[:k]``."""
    if signed:
        for i in range(k):
            scratch[i] = decode_signed(codes[i], scale)
    else:
        for i in range(k):
            scratch[i] = decode_unsigned(codes[i], scale)


@register_jitable
def quantize_block(scratch, codes, k, signed):
    """Encode ``scratch[:k]`` into ``codes[:k]``; return the block's scale (its absmax; 0 for a
    block of zeros or subnormals, NaN for one holding NaN or Inf, both with zero codes:
    fastrms.lowprecision.quantize_blockwise)."""
    bits = absmax(scratch, k)
    if bits < _NORMAL_BITS or bits >= _INF_BITS:
        for i in range(k):
            codes[i] = 0
        return np.float32(0) if bits < _NORMAL_BITS else np.float32(np.nan)
    m = np.uint32(bits).view(np.float32)
    inv = np.float32(1) / m
    if signed:
        for i in range(k):
            codes[i] = encode_signed(scratch[i] * inv)
    else:
        for i in range(k):
            codes[i] = encode_unsigned(scratch[i] * inv)
    return m


@intrinsic
def view_at(typingctx, address, start, size, like):
    """``view_at(address, start, size, like)``: the 1-D C array of ``size`` elements of
    ``like``'s type (any number type) from element ``start`` of the array at ``address``."""
    if not isinstance(like, types.Number):
        return None
    array_type = types.Array(like, 1, "C")

    def codegen(context, builder, signature, args):
        address, start, size, _ = args
        data_type = context.get_data_type(like)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(data_type))
        base = builder.inttoptr(address, data_type.as_pointer())
        array = make_array(array_type)(context, builder)
        populate_array(
            array,
            data=builder.gep(base, [start]),
            shape=cgutils.pack_array(builder, [size]),
            strides=cgutils.pack_array(builder, [itemsize]),
            itemsize=itemsize,
            meminfo=None,
        )
        return array._getvalue()

    return array_type(types.int64, types.int64, types.int64, like), codegen


@intrinsic
def store_int64(typingctx, address, value):
    """``store_int64(address, value)``: write int64 ``value`` at ``address``."""
    if not isinstance(address, types.Integer) or not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        pointer = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        builder.store(context.cast(builder, args[1], signature.args[1], types.int64), pointer)
        return context.get_dummy_value()

    return types.void(address, value), codegen


def _shape(signature, used):
    """What the kernels close over: the likes of the rule's columns (param and grad as their
    storages say, the state slots float32 scratch), the scalars' likes, the table's row stride,
    each slot's signedness and whether the options use it."""
    slots = signature.storages[2:]
    if not all(s.blockwise for s in slots):
        raise ValueError("a blockwise kernel needs every state slot held blockwise")
    compute = np.dtype(signature.compute).type(0)
    columns = (*_column_likes(signature.storages[:2]), *(compute,) * len(slots))
    scalars = (compute,) * signature.scalars
    signs = tuple(s.signed for s in slots)
    return columns, scalars, 8 * signature.table_width, signs, tuple(used)


@cache
def grouped_block_loops(rule, flags, signature, used):
    """Return ``(parallel, serial)`` kernels ``kernel(table, part_ptr, items, scalars)`` that
    step many arrays whose state is held blockwise, as
    :func:`fastrms.kernels.elementwise.grouped_loops` does for plain state.

    ``table`` holds one int64 row per array of ``signature.table_width`` words: element
    count, the addresses of param and grad, of each slot's codes (``uint8``), then of each
    slot's scales (float32). ``used`` says, per slot, whether the options use it (a slot they
    leave unused is never read or written: its addresses may be anything). Each piece of
    ``items`` must start at a multiple of :data:`BLOCK` (:func:`fastrms.blockwise_groups.
    block_schedule`). The results are bit for bit those of the NumPy reference step on the
    dequantized state, quantized again (:mod:`fastrms.lowprecision`).
    """
    token = TOKEN  # read below only so that it is part of the closure, hence the cache key
    columns, scalar_likes, stride, signs, used = _shape(signature, used)
    n_slots = len(signs)
    n_columns = len(columns)
    codes_like, scale_like = np.uint8(0), np.float32(0)
    p_size, g_size = (np.dtype(s.dtype).itemsize for s in signature.storages[:2])

    # One compiled function, called per piece by both kernels (its loops vectorize inside
    # it): inlined into the parallel kernel, it tripled the compile time for the same code.
    @njit(cache=True, fastmath=FASTMATH, error_model="numpy")
    def piece(rows, row, start, stop, hyper, scratch, words):
        """Step elements ``start .. stop`` (``start`` a multiple of BLOCK) of table row ``row``."""
        entry = rows + stride * row  # the address of the row's param column
        scratch_at = address_of(scratch)
        words_at = address_of(words)
        for s in range(n_slots):
            store_int64(words_at + 8 * (2 + s), scratch_at + 4 * BLOCK * s)
        for b0 in range(start, stop, BLOCK):
            k = min(BLOCK, stop - b0)
            block = b0 // BLOCK
            for s in range(n_slots):
                if used[s]:
                    codes = view_at(load_int64(entry + 8 * (2 + s)), b0, k, codes_like)
                    scale = view_at(load_int64(entry + 8 * (2 + n_slots + s)), block, 1, scale_like)
                    values = scratch[BLOCK * s : BLOCK * s + k]
                    decode_block(codes, values, k, scale[0], signs[s])
            # The rule's columns from 0: param and grad from b0, the scratch blocks.
            store_int64(words_at, load_int64(entry) + p_size * b0)
            store_int64(words_at + 8, load_int64(entry + 8) + g_size * b0)
            arrays = arrays_at(words_at, 0, k, columns)
            for i in range(k):
                rule(i, arrays, hyper, flags)
            for s in range(n_slots):
                if used[s]:
                    codes = view_at(load_int64(entry + 8 * (2 + s)), b0, k, codes_like)
                    scale = view_at(load_int64(entry + 8 * (2 + n_slots + s)), block, 1, scale_like)
                    values = scratch[BLOCK * s : BLOCK * s + k]
                    scale[0] = quantize_block(values, codes, k, signs[s])

    @njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
    def parallel(table, part_ptr, items, scalars):
        token  # noqa: B018
        hyper = scalars_at(address_of(scalars), scalar_likes)
        rows = address_of(table) + 8  # the param column of row 0
        for p in prange(part_ptr.size - 1):
            scratch = np.empty(BLOCK * max(n_slots, 1), np.float32)
            words = np.empty(n_columns, np.int64)
            for j in range(part_ptr[p], part_ptr[p + 1]):
                piece(rows, items[j, 0], items[j, 1], items[j, 2], hyper, scratch, words)

    @njit(cache=True, fastmath=FASTMATH, error_model="numpy")
    def serial(table, part_ptr, items, scalars):
        token  # noqa: B018
        hyper = scalars_at(address_of(scalars), scalar_likes)
        rows = address_of(table) + 8
        scratch = np.empty(BLOCK * max(n_slots, 1), np.float32)
        words = np.empty(n_columns, np.int64)
        for j in range(part_ptr[0], part_ptr[part_ptr.size - 1]):
            piece(rows, items[j, 0], items[j, 1], items[j, 2], hyper, scratch, words)

    return parallel, serial
