"""Codec columns: how a kernel loads an element of a stored array into the compute dtype and
stores a result back, for storages that do not hold their compute dtype (through a codec).

A storage of :mod:`fastrms.precision` with a ``codec`` (bf16 held as uint16, say) reaches a
rule as a :class:`CodecColumn`: an array-like whose ``column[i]`` calls the codec's ``load``
and ``column[i] = x`` its ``store``. The rules index their arrays as before and never know;
:func:`fastrms.kernels.pointers.arrays_at` builds the columns from a table row, typed by the
:class:`ColumnLike` constants that :mod:`fastrms.kernels.elementwise` closes over. The float
storages have no codec: their columns are plain arrays, so their kernels are unchanged.

A codec is a pair of ``register_jitable(inline="always")`` functions ``load(array, i)`` and
``store(array, i, x)`` over the held array, added with :func:`register`.
"""

import operator

import numpy as np
from numba import types
from numba.core import cgutils
from numba.core.imputils import lower_constant
from numba.extending import (
    make_attribute_wrapper,
    models,
    overload,
    register_jitable,
    register_model,
    typeof_impl,
)
from numba.np.numpy_support import from_dtype

from . import codecs

#: Load/store pairs by codec name.
CODECS: dict = {}


def register(name: str, load, store) -> None:
    """Make codec ``name`` known to the kernels: ``load(array, i)`` returns element ``i`` in
    the compute dtype, ``store(array, i, x)`` writes ``x`` rounded to the held dtype."""
    CODECS[name] = (load, store)


class ColumnLike:
    """A kernel's compile-time description of one codec column (a closure constant)."""

    def __init__(self, held, compute, codec: str) -> None:
        self.held, self.compute, self.codec = np.dtype(held), np.dtype(compute), codec

    def __reduce__(self):  # pickled into Numba's cache key: by value
        return ColumnLike, (self.held.str, self.compute.str, self.codec)


class ColumnLikeType(types.Type):
    def __init__(self, held, compute, codec: str) -> None:
        self.held, self.compute, self.codec = held, compute, codec
        super().__init__(name=f"ColumnLike({held}, {compute}, {codec})")


@typeof_impl.register(ColumnLike)
def _typeof_column_like(value, context):
    return ColumnLikeType(from_dtype(value.held), from_dtype(value.compute), value.codec)


register_model(ColumnLikeType)(models.OpaqueModel)


@lower_constant(ColumnLikeType)
def _lower_column_like(context, builder, ty, value):
    return context.get_constant_null(ty)  # a type marker: no value is ever read


class CodecColumn(types.Type):
    """The array-like a rule sees for a codec column: the held 1-D array, loaded and stored
    through the codec."""

    def __init__(self, held, compute, codec: str) -> None:
        self.held, self.compute, self.codec = held, compute, codec
        self.array = types.Array(held, 1, "C")
        super().__init__(name=f"CodecColumn({held}, {compute}, {codec})")

    @classmethod
    def of(cls, like: ColumnLikeType) -> "CodecColumn":
        return cls(like.held, like.compute, like.codec)


@register_model(CodecColumn)
class _CodecColumnModel(models.StructModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, [("data", fe_type.array)])


make_attribute_wrapper(CodecColumn, "data", "data")


def wrap(context, builder, column_type: CodecColumn, array):
    """Lower: the :class:`CodecColumn` over the held ``array`` (an LLVM array value)."""
    proxy = cgutils.create_struct_proxy(column_type)(context, builder)
    proxy.data = array
    return proxy._getvalue()


@overload(operator.getitem, inline="always")
def _load(column, i):
    if isinstance(column, CodecColumn) and isinstance(i, types.Integer):
        load = CODECS[column.codec][0]
        return lambda column, i: load(column.data, i)
    return None


# Not inline="always": Numba inlines overloads of expressions only, and a store is a
# statement. LLVM inlines the call, and the loop still vectorizes (checked in the tests).
@overload(operator.setitem)
def _store(column, i, x):
    if isinstance(column, CodecColumn) and isinstance(i, types.Integer):
        store = CODECS[column.codec][1]
        return lambda column, i, x: store(column.data, i, x)
    return None


# -- the codecs of fastrms.precision's storages -------------------------------------------------


@register_jitable
def _bf16_load(array, i):
    return codecs.bf16_load(array[i])


@register_jitable
def _bf16_store(array, i, x):
    array[i] = codecs.bf16_nearest(x)


# Optimizer state held as bfloat16 is stored round-to-nearest-even (stochastic rounding is for
# parameters, whose updates can be smaller than half an ulp).
register("bf16", _bf16_load, _bf16_store)
