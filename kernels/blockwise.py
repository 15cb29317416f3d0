"""The block-shaped computation: steps of optimizer state held as 8-bit blockwise codes.

State held with ``state_dtype="int8"`` is, per state array, ``uint8`` codes (one per element)
and float32 scales (one per block of :data:`BLOCK` elements, the block's absmax). A code is an
index into an 8-bit float-like map (:class:`fastrms.lowprecision.Float8Map`): signed (sign bit
and E4M3) for first moments, unsigned (E5M3) for second moments, as each layout's
:class:`fastrms.specs.Slot` declares. :mod:`fastrms.lowprecision` is the NumPy reference.

Per block of 256 elements, the kernels here:

1. run the rule, unchanged, on the parameter's and gradient's block (plain float32 arrays, or
   a bfloat16 parameter's codec columns, :mod:`fastrms.kernels.columns`) and a :class:`BlockColumn`
   per state slot, which decodes each code as the rule reads it (``code -> value * scale``)
   and takes what the rule writes into a float32 scratch block (a rule reads each element of
   its state once, before writing it), so the decoder's integer work runs in the rule's loop,
   beside its square roots and divisions (5-25% faster than a separate decoding loop);
2. find each slot's new absmax in the scratch block (an integer max over the float patterns);
3. encode the scratch block back into codes and write the scale.

The scratch, ``slots * 256`` float32, is on the stack of the function that steps a piece
(:func:`stack_scratch`), so nothing is proportional to ``n``; each block is in L1 between the
passes, so memory is read and written once. Work splits fall on multiples of 256 within each
array (the last block of an array may be short).

Encoding is the nearest code by integer arithmetic on the float32 pattern: rounding the
pattern to 3 mantissa bits is rounding the value to the map's nearest (a binade's carry moves
to the next exponent by itself), so the encoder is about 15 branch-free vector instructions
per 16 elements, about 8x cheaper than the dynamic map's closed form. Decoding is the inverse
shift. Even so the step is bound by computation, not memory: the codec's work about equals
Adam's own (``bench/int8_phases.py``; figures in the README).

The kernels are closures defined in this file (Numba's ``cache=True`` keys them on it), and
bind :data:`TOKEN` as :mod:`fastrms.kernels.elementwise` does.
"""

import operator
from functools import cache

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.imputils import lower_constant
from numba.extending import (
    intrinsic,
    make_attribute_wrapper,
    models,
    overload,
    register_jitable,
    register_model,
    typeof_impl,
)
from numba.np.arrayobj import make_array, populate_array

from . import columns
from ._options import FASTMATH
from .elementwise import TOKEN as ELEMENTWISE_TOKEN
from .elementwise import _column_likes
from .pointers import (
    _column_type,
    address_of,
    as_array_from,
    codec_extra,
    load_int64,
    scalars_at,
    takes_word,
)

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


# Inlined, so that each slot's loops are compiled for its own map, and no call per block and
# slot spills and reloads the rule's vector constants.
@register_jitable(inline="always")
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


class BlockLike:
    """A kernel's compile-time description of one state slot's column (a closure constant):
    a block of codes read through the decoder of the signed or unsigned map."""

    def __init__(self, signed: bool) -> None:
        self.signed = bool(signed)

    def __reduce__(self):  # pickled into Numba's cache key: by value
        return BlockLike, (self.signed,)


class BlockLikeType(types.Type):
    def __init__(self, signed: bool) -> None:
        self.signed = signed
        super().__init__(name=f"BlockLike({signed})")


@typeof_impl.register(BlockLike)
def _typeof_block_like(value, context):
    return BlockLikeType(value.signed)


register_model(BlockLikeType)(models.OpaqueModel)


@lower_constant(BlockLikeType)
def _lower_block_like(context, builder, ty, value):
    return context.get_constant_null(ty)


class BlockColumn(types.Type):
    """What a rule sees for a state slot: ``column[i]`` decodes code ``i`` of the block (times
    its scale), ``column[i] = x`` writes ``x`` to the block's float32 scratch, which the kernel
    then quantizes. A rule reads each element of its state once, before writing it."""

    def __init__(self, signed: bool) -> None:
        self.signed = signed
        self.codes = types.Array(types.uint8, 1, "C")
        self.scratch = types.Array(types.float32, 1, "C")
        super().__init__(name=f"BlockColumn({signed})")


@register_model(BlockColumn)
class _BlockColumnModel(models.StructModel):
    def __init__(self, dmm, fe_type):
        members = [("codes", fe_type.codes), ("scratch", fe_type.scratch), ("scale", types.float32)]
        super().__init__(dmm, fe_type, members)


make_attribute_wrapper(BlockColumn, "codes", "codes")
make_attribute_wrapper(BlockColumn, "scratch", "scratch")
make_attribute_wrapper(BlockColumn, "scale", "scale")


@overload(operator.getitem, inline="always")
def _block_load(column, i):
    if isinstance(column, BlockColumn) and isinstance(i, types.Integer):
        if column.signed:
            return lambda column, i: decode_signed(column.codes[i], column.scale)
        return lambda column, i: decode_unsigned(column.codes[i], column.scale)
    return None


@register_jitable
def _put(array, i, x):
    array[i] = x


@overload(operator.setitem)
def _block_store(column, i, x):
    if isinstance(column, BlockColumn) and isinstance(i, types.Integer):
        return lambda column, i, x: _put(column.scratch, i, x)
    return None


def _array_value(context, builder, array_type, data, size):
    itemsize = context.get_constant(
        types.intp, context.get_abi_sizeof(context.get_data_type(array_type.dtype))
    )
    array = make_array(array_type)(context, builder)
    populate_array(array, data=data, shape=cgutils.pack_array(builder, [size]),
                   strides=cgutils.pack_array(builder, [itemsize]), itemsize=itemsize,
                   meminfo=None)  # fmt: skip
    return array._getvalue()


@intrinsic
def block_columns(typingctx, entry, start, size, block, scratch, likes):
    """``block_columns(entry, start, size, block, scratch, likes)``: the rule's tuple for the
    ``size`` elements from ``start`` (block number ``block``) of the table row whose param
    column is at ``entry``: param and grad as :func:`~fastrms.kernels.pointers.arrays_at`
    makes them (plain arrays, or codec columns: a bfloat16 parameter's, keyed or paired by
    the row's extra word after the codes' addresses, :func:`~fastrms.kernels.pointers.
    codec_extra`), then a :class:`BlockColumn` per slot over its codes, its block's scale and
    its part of ``scratch`` (``BLOCK`` float32 per slot, :func:`stack_scratch`)."""
    if not isinstance(likes, types.BaseTuple) or len(likes) < 2:
        return None
    if not isinstance(scratch, types.Array) or scratch.dtype != types.float32:
        return None
    heads = [_column_type(like) for like in likes[:2]]
    slots = list(likes[2:])
    if any(t is None for t in heads) or not all(isinstance(t, BlockLikeType) for t in slots):
        return None
    n_slots = len(slots)
    column_types = [*heads, *(BlockColumn(t.signed) for t in slots)]
    tuple_type = types.Tuple(column_types)

    def codegen(context, builder, signature, args):
        entry, start, size, block, scratch, _ = args
        scratch_data = make_array(signature.args[4])(context, builder, scratch).data
        word = ir.IntType(64)
        base = builder.inttoptr(entry, word.as_pointer())

        def word_at(j):
            return builder.load(builder.gep(base, [ir.Constant(word, j)]))

        values = []
        extra_word = 2 + n_slots  # the head columns' extra words follow the addresses
        for j, column_type in enumerate(heads):
            codec = isinstance(column_type, columns.CodecColumn)
            array_type = column_type.array if codec else column_type

            def array_at(address, array_type=array_type):
                data_type = context.get_data_type(array_type.dtype)
                data = builder.gep(builder.inttoptr(address, data_type.as_pointer()), [start])
                return _array_value(context, builder, array_type, data, size)

            value = array_at(word_at(j))
            if not codec:
                values.append(value)
                continue
            extra = None
            if takes_word(column_type):
                extra = codec_extra(builder, column_type, word_at(extra_word), start, array_at)
                extra_word += 1
            values.append(columns.wrap(context, builder, column_type, value, extra))
        f32 = context.get_data_type(types.float32)
        for s, column_type in enumerate(column_types[2:]):
            codes = builder.gep(builder.inttoptr(word_at(2 + s), ir.IntType(8).as_pointer()),
                                [start])  # fmt: skip
            out = builder.gep(scratch_data, [ir.Constant(word, BLOCK * s)])
            scale_at = builder.gep(builder.inttoptr(word_at(extra_word + s), f32.as_pointer()),
                                   [block])  # fmt: skip
            proxy = cgutils.create_struct_proxy(column_type)(context, builder)
            proxy.codes = _array_value(context, builder, column_type.codes, codes, size)
            proxy.scratch = _array_value(context, builder, column_type.scratch, out, size)
            proxy.scale = builder.load(scale_at)
            values.append(proxy._getvalue())
        return context.make_tuple(builder, tuple_type, values)

    sig = tuple_type(types.int64, types.int64, types.int64, types.int64, scratch, likes)
    return sig, codegen


@intrinsic
def stack_scratch(typingctx, likes):
    """``stack_scratch(likes)``: a float32 array of ``BLOCK`` elements per state slot of the
    tuple of column likes ``likes``, on the calling function's stack, with no reference count.

    On the stack, LLVM knows that no table address points into it, so the rule's loop checks
    fewer pairs of arrays for overlap at run time; and its slices take no reference count
    (a heap array's slices took four atomic operations per slot and block)."""
    if not isinstance(likes, types.BaseTuple):
        return None
    slots = sum(isinstance(t, BlockLikeType) for t in likes)
    array_type = types.Array(types.float32, 1, "C")

    def codegen(context, builder, signature, args):
        f32 = context.get_data_type(types.float32)
        size = BLOCK * max(slots, 1)
        block = cgutils.alloca_once(builder, ir.ArrayType(f32, size))
        block.align = 64
        data = builder.bitcast(block, f32.as_pointer())
        return _array_value(context, builder, array_type, data, ir.Constant(ir.IntType(64), size))

    return array_type(likes), codegen


def _shape(signature, used):
    """What the kernels close over: the likes of the rule's columns (param and grad as their
    storages say, the state slots float32 scratch), the scalars' likes, the table's row stride,
    each slot's signedness, whether the options use it, and the word of the first slot's
    scales counted from the row's first address (the kernels read rows from there)."""
    slots = signature.storages[2:]
    if not all(s.blockwise for s in slots):
        raise ValueError("a blockwise kernel needs every state slot held blockwise")
    compute = np.dtype(signature.compute).type(0)
    columns = (*_column_likes(signature.storages[:2]), *(BlockLike(s.signed) for s in slots))
    scalars = (compute,) * signature.scalars
    signs = tuple(s.signed for s in slots)
    scales = signature.extra_word(2) - 1
    return columns, scalars, 8 * signature.table_width, signs, tuple(used), scales


@cache
def grouped_block_loops(rule, flags, signature, used):
    """Return ``(parallel, serial)`` kernels ``kernel(table, part_ptr, items, scalars)`` that
    step many arrays whose state is held blockwise, as
    :func:`fastrms.kernels.elementwise.grouped_loops` does for plain state.

    ``table`` holds one int64 row per array of ``signature.table_width`` words: element
    count, the addresses of param and grad, of each slot's codes (``uint8``), the param's
    extra word if its storage takes one (a bfloat16 parameter's stochastic-rounding key or
    Kahan compensation's address, as in :func:`fastrms.kernels.elementwise.grouped_loops`),
    then the addresses of each slot's scales (float32). ``used`` says, per slot, whether the
    options use it (a slot they leave unused is never read or written: its addresses may be
    anything). Each piece of ``items`` must start at a multiple of :data:`BLOCK`
    (:func:`fastrms.blockwise_groups.block_schedule`). The results are bit for bit those of
    the NumPy reference step on the dequantized state, quantized again
    (:mod:`fastrms.lowprecision`).
    """
    token = TOKEN  # read below only so that it is part of the closure, hence the cache key
    columns, scalar_likes, stride, signs, used, scales_word = _shape(signature, used)
    n_slots = len(signs)
    codes_like, scale_like = np.uint8(0), np.float32(0)

    # One compiled function, called per piece by both kernels (its loops vectorize inside
    # it): inlined into the parallel kernel, it tripled the compile time for the same code.
    @njit(cache=True, fastmath=FASTMATH, error_model="numpy")
    def piece(rows, row, start, stop, hyper):
        """Step elements ``start .. stop`` (``start`` a multiple of BLOCK) of table row ``row``."""
        entry = rows + stride * row  # the address of the row's param column
        scratch = stack_scratch(columns)
        for b0 in range(start, stop, BLOCK):
            k = min(BLOCK, stop - b0)
            block = b0 // BLOCK
            # The rule decodes each slot's codes as it reads them, and writes the scratch.
            arrays = block_columns(entry, b0, k, block, scratch, columns)
            for i in range(k):
                rule(i, arrays, hyper, flags)
            for s in range(n_slots):
                if used[s]:
                    codes = as_array_from(load_int64(entry + 8 * (2 + s)), b0, k, codes_like)
                    scale = as_array_from(
                        load_int64(entry + 8 * (scales_word + s)), block, 1, scale_like
                    )
                    values = scratch[BLOCK * s : BLOCK * s + k]
                    scale[0] = quantize_block(values, codes, k, signs[s])

    @njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
    def parallel(table, part_ptr, items, scalars):
        token  # noqa: B018
        hyper = scalars_at(address_of(scalars), scalar_likes)
        rows = address_of(table) + 8  # the param column of row 0
        for p in prange(part_ptr.size - 1):
            for j in range(part_ptr[p], part_ptr[p + 1]):
                piece(rows, items[j, 0], items[j, 1], items[j, 2], hyper)

    @njit(cache=True, fastmath=FASTMATH, error_model="numpy")
    def serial(table, part_ptr, items, scalars):
        token  # noqa: B018
        hyper = scalars_at(address_of(scalars), scalar_likes)
        rows = address_of(table) + 8
        for j in range(part_ptr[0], part_ptr[part_ptr.size - 1]):
            piece(rows, items[j, 0], items[j, 1], items[j, 2], hyper)

    return parallel, serial
