"""Arrays from raw addresses, so that one kernel call can reach many arrays.

A grouped kernel takes a table of addresses and sizes (int64) instead of the arrays
themselves: Numba handles tuples of arrays badly past about a hundred items, indexes a
``typed.List`` through a call that stops vectorization, and unboxes a reflected list of arrays
slowly. :func:`as_array` turns one address back into a 1-D array inside the kernel, with no
reference counting, so it costs nothing per element.
"""

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import make_array, populate_array


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
