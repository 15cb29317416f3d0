"""Arrays from raw addresses, so that one kernel call can reach many arrays.

A grouped kernel takes a table of addresses and sizes (int64) instead of the arrays
themselves: Numba handles tuples of arrays badly past about a hundred items, indexes a
``typed.List`` through a call that stops vectorization, and unboxes a reflected list of arrays
slowly. :func:`as_array` turns one address back into a 1-D array inside the kernel, with no
reference counting, so it costs nothing per element.

:func:`load_words` reads many words at once; :func:`fastrms.arrays.host_addresses` uses it to
read the data pointers of many NumPy arrays in one call (25x cheaper than asking each array
for its ``__array_interface__``).
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import make_array, populate_array

from . import columns


@intrinsic
def as_array(typingctx, address, size, like):
    """``as_array(address, size, like)``: the C-contiguous 1-D array of ``size`` elements of
    ``like``'s type (a float32 or float64 scalar) that starts at ``address`` (an int64).

    The caller guarantees that the memory is alive and holds that many elements.
    """
    if not isinstance(like, types.Float):
        return None
    array_type = types.Array(like, 1, "C")

    def codegen(context, builder, signature, args):
        address, size, _ = args
        data_type = context.get_data_type(like)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(data_type))
        array = make_array(array_type)(context, builder)
        populate_array(
            array,
            data=builder.inttoptr(address, data_type.as_pointer()),
            shape=cgutils.pack_array(builder, [size]),
            strides=cgutils.pack_array(builder, [itemsize]),
            itemsize=itemsize,
            meminfo=None,
        )
        return array._getvalue()

    return array_type(types.int64, types.int64, like), codegen


@intrinsic
def as_array_from(typingctx, address, start, size, like):
    """``as_array_from(address, start, size, like)``: as :func:`as_array`, for the ``size``
    elements from element ``start`` on.

    A kernel then indexes the piece from 0, as the single-array loops do: with a loop from an
    unknown ``start``, Numba would wrap negative indices on every access and the loop would
    not vectorize (4.8x slower, measured).
    """
    if not isinstance(like, types.Number):  # float columns, and int8 state's uint8 codes
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
def address_of(typingctx, array):
    """``address_of(array)``: the address of a C-contiguous array's first element, as an int64
    (``array.ctypes.data`` is unsigned, and Numba types unsigned plus signed as a float)."""
    if not isinstance(array, types.Array):
        return None

    def codegen(context, builder, signature, args):
        data = make_array(array)(context, builder, args[0]).data
        return builder.ptrtoint(data, ir.IntType(64))

    return types.int64(array), codegen


@intrinsic
def load_int64(typingctx, address):
    """``load_int64(address)``: the int64 stored at ``address``."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        pointer = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.load(pointer)

    return types.int64(address), codegen


@intrinsic
def fetch_add(typingctx, address):
    """``fetch_add(address)``: atomically add 1 to the int64 at ``address``; return its value
    before. Threads that share a counter so each take a different value."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        pointer = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        one = ir.Constant(ir.IntType(64), 1)
        return builder.atomic_rmw("add", pointer, one, "monotonic")

    return types.int64(address), codegen


@njit(cache=True)
def load_words(addresses):
    """The int64 at each of ``addresses`` (an int64 array), as a new array."""
    out = np.empty_like(addresses)
    for i in range(addresses.size):
        out[i] = load_int64(addresses[i])
    return out


@njit(cache=True)
def first_overlap(starts, ends, query_starts, query_nbytes):
    """The index of the first query range ``[query_starts[i], + query_nbytes[i])`` that
    overlaps one of the sorted, disjoint ranges ``[starts[k], ends[k])``, else -1; and that
    ``k``. Binary search per query: only the last range starting before a query's end can
    overlap it."""
    for i in range(query_starts.size):
        if query_nbytes[i] == 0:
            continue
        end = query_starts[i] + query_nbytes[i]
        k = np.searchsorted(starts, end) - 1  # side="left": the ranges starting before end
        if k >= 0 and ends[k] > query_starts[i]:
            return i, k
    return -1, -1


# -- the width-dependent parts of the grouped kernels, generated from their types ----------------


def _likes(likes):
    """The element types a tuple of ``like`` scalars names, or None if it is not one."""
    if not isinstance(likes, types.BaseTuple) or not all(isinstance(t, types.Float) for t in likes):
        return None
    return tuple(likes)


def _column_type(like):
    """What a table column becomes in a kernel: a plain array for a float ``like``, a
    :class:`~fastrms.kernels.columns.CodecColumn` for a codec's ``ColumnLike``; else None."""
    if isinstance(like, types.Float):
        return types.Array(like, 1, "C")
    if isinstance(like, columns.ColumnLikeType):
        return columns.CodecColumn.of(like)
    return None


@intrinsic
def arrays_at(typingctx, words, start, size, likes):
    """``arrays_at(words, start, size, likes)``: a tuple of 1-D arrays, one per element of the
    tuple ``likes``: column ``j`` is the ``size`` elements from element ``start`` on of the
    array whose address is the int64 at ``words + 8 * j``, of ``likes[j]``'s type (a float
    scalar), or a :class:`~fastrms.kernels.columns.CodecColumn` over it (for a
    :class:`~fastrms.kernels.columns.ColumnLike`: a storage with a codec). A keyed or paired
    codec column (:data:`~fastrms.kernels.columns.KINDS`) also takes the next of the row's
    words after the addresses: its key (the low 32 bits) and the index of its array's first
    element in its whole tensor (the high 32 bits: the keyed column's element ``i`` has index
    ``start + i + (word >> 32)``, mod 2^32), or its second array's address.

    The grouped kernels build their arrays from a table row with it, so the number of columns
    and their types come from the rule's signature, not from code written per width. It is one
    call in Numba's IR (an inlined helper returning the tuple trips the parfor array analysis)
    and lowers to the same loads and pointer arithmetic as :func:`as_array_from` per column.
    """
    if not isinstance(likes, types.BaseTuple) or not isinstance(words, types.Integer):
        return None
    column_types = [_column_type(like) for like in likes]
    if any(t is None for t in column_types):
        return None
    if len(set(column_types)) == 1:
        tuple_type = types.UniTuple(column_types[0], len(column_types))
    else:
        tuple_type = types.Tuple(column_types)

    def codegen(context, builder, signature, args):
        words, start, size, _ = args
        word_type = ir.IntType(64)
        base = builder.inttoptr(words, word_type.as_pointer())

        def word(k):
            return builder.load(builder.gep(base, [ir.Constant(word_type, k)]))

        def piece(array_type, address):
            data_type = context.get_data_type(array_type.dtype)
            itemsize = context.get_constant(types.intp, context.get_abi_sizeof(data_type))
            data = builder.gep(builder.inttoptr(address, data_type.as_pointer()), [start])
            array = make_array(array_type)(context, builder)
            populate_array(
                array,
                data=data,
                shape=cgutils.pack_array(builder, [size]),
                strides=cgutils.pack_array(builder, [itemsize]),
                itemsize=itemsize,
                meminfo=None,
            )
            return array._getvalue()

        values = []
        extra_word = len(column_types)  # a keyed or paired column's word follows the addresses
        for j, column_type in enumerate(column_types):
            codec = isinstance(column_type, columns.CodecColumn)
            array_type = column_type.array if codec else column_type
            value = piece(array_type, word(j))
            if not codec:
                values.append(value)
                continue
            extra = None
            if column_type.kind == "keyed":  # the key, and the index of the piece's start
                key_word = word(extra_word)  # key | offset << 32 (fastrms.grouped.key_words)
                offset = builder.lshr(key_word, ir.Constant(word_type, 32))
                extra = (builder.trunc(key_word, ir.IntType(32)), builder.add(start, offset))
                extra_word += 1
            elif column_type.kind == "paired":  # the second array, from the same element
                extra = piece(array_type, word(extra_word))
                extra_word += 1
            values.append(columns.wrap(context, builder, column_type, value, extra))
        return context.make_tuple(builder, tuple_type, values)

    return tuple_type(words, types.int64, types.int64, likes), codegen


@intrinsic
def scalars_at(typingctx, address, likes):
    """``scalars_at(address, likes)``: the tuple of ``len(likes)`` scalars of ``likes``'
    types stored one after the other at ``address`` (an int64).

    The grouped kernels unpack their scalar array with it once, before the loops, so that the
    loops see values, not loads that might alias the arrays being written.
    """
    element_types = _likes(likes)
    if element_types is None or not isinstance(address, types.Integer):
        return None
    tuple_type = likes

    def codegen(context, builder, signature, args):
        address, _ = args
        offset = 0
        values = []
        for like in element_types:
            data_type = context.get_data_type(like)
            byte = builder.add(address, ir.Constant(address.type, offset))
            values.append(builder.load(builder.inttoptr(byte, data_type.as_pointer())))
            offset += context.get_abi_sizeof(data_type)
        return context.make_tuple(builder, tuple_type, values)

    return tuple_type(address, likes), codegen
