"""Codec columns: how a kernel loads an element of a stored array into the compute dtype and
stores a result back, for storages that do not hold their compute dtype (through a codec).

A storage of :mod:`fastrms.precision` with a ``codec`` (bf16 held as uint16, say) reaches a
rule as a :class:`CodecColumn`: an array-like whose ``column[i]`` calls the codec's ``load``
and ``column[i] = x`` its ``store``. The rules index their arrays as before and never know;
:func:`fastrms.kernels.pointers.arrays_at` builds the columns from a table row, typed by the
:class:`ColumnLike` constants that :mod:`fastrms.kernels.elementwise` closes over. The float
storages have no codec: their columns are plain arrays, so their kernels are unchanged.

A codec is a pair of ``register_jitable(inline="always")`` functions ``load(array, i)`` and
``store(array, i, x)`` over the held array, added with :func:`register`. A codec of another
:data:`KINDS` stores with more than the element: a ``"keyed"`` one (stochastic rounding) gets
``store(array, i, x, key, index)``, the column's per-array random key and the element's index
in its whole array (not in the piece a thread runs), a ``"paired"`` one (Kahan summation)
gets ``store(array, comp, i, x)`` with a second held array beside the first. Their extra
words (the key, the second array's address) follow the addresses in a grouped table's row.
"""

import operator

import numpy as np
from llvmlite import ir
from numba import types
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
from numba.np.numpy_support import from_dtype

from . import codecs

#: Load/store pairs by codec name.
CODECS: dict = {}
#: What each codec's store takes besides the element (see the module docstring), by name:
#: ``"plain"`` (nothing), ``"keyed"`` (a key and the element's index), ``"paired"`` (a second
#: array). A keyed or paired column takes one extra word of a grouped table's row.
KINDS: dict = {}


def register(name: str, load, store, kind: str = "plain") -> None:
    """Make codec ``name`` known to the kernels: ``load(array, i)`` returns element ``i`` in
    the compute dtype, ``store(array, i, x)`` writes ``x`` rounded to the held dtype (with
    the extra arguments of its ``kind``, see :data:`KINDS`)."""
    CODECS[name] = (load, store)
    KINDS[name] = kind


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
        self.kind = KINDS.get(codec, "plain")  # a pair set in CODECS directly is plain
        self.array = types.Array(held, 1, "C")
        super().__init__(name=f"CodecColumn({held}, {compute}, {codec})")

    @classmethod
    def of(cls, like: ColumnLikeType) -> "CodecColumn":
        return cls(like.held, like.compute, like.codec)


@register_model(CodecColumn)
class _CodecColumnModel(models.StructModel):
    def __init__(self, dmm, fe_type):
        members = [("data", fe_type.array)]
        if fe_type.kind == "keyed":
            members += [("key", types.uint32), ("base", types.int64)]
        elif fe_type.kind == "paired":
            members += [("comp", fe_type.array)]
        super().__init__(dmm, fe_type, members)


make_attribute_wrapper(CodecColumn, "data", "data")
make_attribute_wrapper(CodecColumn, "key", "key")
make_attribute_wrapper(CodecColumn, "base", "base")
make_attribute_wrapper(CodecColumn, "comp", "comp")


def wrap(context, builder, column_type: CodecColumn, array, extra=None):
    """Lower: the :class:`CodecColumn` over the held ``array`` (an LLVM array value).

    ``extra`` is what its kind adds: ``(key, base)`` (a ``uint32`` and an ``int64``: the
    index of the column's element 0 in its whole array) for a keyed column, the second
    array's value for a paired one.
    """
    proxy = cgutils.create_struct_proxy(column_type)(context, builder)
    proxy.data = array
    if column_type.kind == "keyed":
        proxy.key, proxy.base = extra
    elif column_type.kind == "paired":
        proxy.comp = extra
    return proxy._getvalue()


@intrinsic
def index32(typingctx, base, i):
    """``index32(base, i)``: ``(base + i) mod 2^32`` as a ``uint32``, added in 32 bits.

    The random bits of stochastic rounding read an element's index mod 2^32 only. Added in 32
    bits from the loop's own counter, the index vectorizes as 32-bit lanes; Numba's integer
    arithmetic would add in 64 bits, and LLVM then kept 64-bit index vectors (9 more
    instructions per 16 elements, the store 1.4x slower in cache).
    """
    if not isinstance(base, types.Integer) or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        word = ir.IntType(32)
        return builder.add(builder.trunc(args[0], word), builder.trunc(args[1], word))

    return types.uint32(base, i), codegen


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
        if column.kind == "keyed":
            return lambda column, i, x: store(
                column.data, i, x, column.key, index32(column.base, i)
            )
        if column.kind == "paired":
            return lambda column, i, x: store(column.data, column.comp, i, x)
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


# -- the codecs of bfloat16 parameters (option rounding=) -----------------------------------------


@register_jitable
def _bf16_stochastic_store(array, i, x, key, index):
    array[i] = codecs.bf16_stochastic(x, key, index)


@register_jitable
def _bf16_kahan_store(array, comp, i, x):
    # The rule loaded the parameter already; reloading it here is a load from cache. The
    # increment is the rule's result less the loaded value, in float32.
    p = array[i]
    p_new, k_new = codecs.kahan_add(p, comp[i], np.float32(x) - codecs.bf16_load(p))
    array[i] = p_new
    comp[i] = k_new


# A bfloat16 parameter is loaded as the state is; it is stored stochastically (random bits from
# the column's key and the element's index in its array) or with a Kahan compensation array.
register("bf16_stochastic", _bf16_load, _bf16_stochastic_store, "keyed")
register("bf16_kahan", _bf16_load, _bf16_kahan_store, "paired")
