"""Arrays from raw device addresses inside a CUDA kernel: the CUDA twin of
:mod:`fastrms.kernels.pointers`, for the grouped kernels (:func:`fastrms.kernels.elementwise
.cuda_grouped`). Importing it imports ``numba.cuda``."""

import numpy as np
from numba import cuda

#: Whether numba.cuda is the simulator (chosen by NUMBA_ENABLE_CUDASIM=1 before numba loads).
SIMULATOR = cuda.config.ENABLE_CUDASIM == 1

if SIMULATOR:
    # Simulator kernels are plain Python, and its "device" arrays are NumPy arrays in host
    # memory, so the table's addresses are host addresses: wrap them with NumPy.

    class _Buffer:
        def __init__(self, address, size, dtype):
            self.__array_interface__ = {
                "data": (int(address), False),
                "shape": (int(size),),
                "typestr": dtype.str,
                "version": 3,
            }

    def as_device_array(address, size, like):
        """The 1-D array of ``size`` elements of ``like``'s dtype at host ``address``."""
        return np.asarray(_Buffer(address, size, np.dtype(type(like))))

else:
    from numba.core import types
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic
    from numba.cuda.np.arrayobj import make_array, populate_array

    @intrinsic
    def as_device_array(typingctx, address, size, like):
        """``as_device_array(address, size, like)`` in a kernel: the C-contiguous 1-D array of
        ``size`` elements of ``like``'s type (a float, or an integer such as ``uint8``
        codes) at device ``address``.

        The CUDA twin of :func:`fastrms.kernels.pointers.as_array`, registered with
        numba-cuda's own ``intrinsic`` and lowered with its own array helpers. The array
        borrows the memory (no reference count); the caller keeps it alive.
        """
        if not isinstance(like, (types.Float, types.Integer)):
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
