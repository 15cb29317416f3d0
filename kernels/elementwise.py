"""The elementwise computation shape: every kernel that steps arrays element by element,
generated in one place from (rule, flags, signature).

A rule (:mod:`fastrms.kernels.rules`) updates element ``i`` of its arrays. Around it this
module emits:

- :func:`loops`: the one-array CPU loops, ``prange`` and serial, ``kernel(n, arrays, hyper)``;
- :func:`grouped_loops`: the grouped CPU kernels over a table of many arrays, parallel and
  serial, ``kernel(table, part_ptr, items, scalars)``;
- :func:`team_body`: the same grouped step as a C function for another library's OpenMP team;
- :func:`cuda_grid_stride` and :func:`cuda_grouped`: the CUDA kernels (imported lazily).

Nothing here is written per width: a grouped kernel's table columns and scalars come from its
:class:`fastrms.precision.Signature` (one column per array of the rule, one scalar per
scalar of its layout), read by the intrinsics :func:`~fastrms.kernels.pointers.arrays_at` and
:func:`~fastrms.kernels.pointers.scalars_at`, which type the tuples they return from the
signature's dtypes. A rule with 4 state arrays or 12 scalars needs no edit here.

Storages: each array is loaded and stored through its storage
(:class:`fastrms.precision.Storage`). The float storages hold their compute dtype and have no
codec: the rule indexes the arrays themselves, and the loops compile to exactly the code they
did before the storage model (checked bit for bit and timed). A storage with a codec (bf16 held
as uint16, 8-bit blockwise) registers its load/store pair in :mod:`fastrms.kernels.columns`; its
column then reaches the rule as an array-like whose ``[i]`` loads and ``[i] = x`` stores through
them, so neither the rules nor these loops change (a test runs Adam with bf16 state so).

The kernels are closures defined in this file, so Numba's ``cache=True`` keeps working (a
function made by ``exec`` has no file to cache beside). Each binds :data:`TOKEN` (a digest of
the rules, and the fastmath setting), because Numba keys a cached kernel on
this file, not on what it inlines.
"""

from functools import cache
from pathlib import Path

import numpy as np
from numba import cfunc, njit, prange, types

from . import columns
from ._options import FASTMATH, RULES_TOKEN, digest
from .pointers import address_of, arrays_at, fetch_add, load_int64, scalars_at

#: Part of every kernel's closure, hence of Numba's cache key: the rules' digest and the
#: fastmath setting, and the digests of the codec columns, of the codecs they inline and of the
#: intrinsics that build the columns from a table row. The
#: widths need no token: the tuples that carry them (the columns' and scalars' likes, the row
#: stride) are closure values too, and Numba keys its cache on those.
TOKEN = (
    RULES_TOKEN,
    *(digest(Path(__file__).with_name(f)) for f in ("columns.py", "codecs.py", "pointers.py")),
)


def _column_likes(storages):
    """What types each column of a table row: a zero of the held dtype for a float storage
    (a plain array), a :class:`~fastrms.kernels.columns.ColumnLike` for one with a codec."""
    likes = []
    for storage in storages:
        if storage.codec is None:
            likes.append(np.dtype(storage.dtype).type(0))
        elif storage.codec in columns.CODECS:
            likes.append(columns.ColumnLike(storage.dtype, storage.compute, storage.codec))
        else:
            raise ValueError(f"no codec {storage.codec!r} is registered (kernels.columns)")
    return tuple(likes)


def _shape(signature):
    """What the kernels close over: the columns' likes, the scalars' likes, the row stride."""
    columns = _column_likes(signature.storages)
    scalars = (np.dtype(signature.compute).type(0),) * signature.scalars
    return columns, scalars, 8 * signature.table_width


@cache
def loops(rule, flags):
    """Return ``(parallel, serial)`` kernels ``kernel(n, arrays, hyper)`` for ``rule``.

    ``flags`` is bound as a closure constant, so Numba compiles one specialization per flag
    combination and LLVM folds the rule's branches on it. ``error_model="numpy"`` gives IEEE
    division (as NumPy and PyTorch do) instead of a zero check that keeps the loop scalar.
    """
    token = TOKEN  # read below only so that it is part of the closure, hence the cache key

    @njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
    def parallel(n, arrays, hyper):
        token  # noqa: B018
        for i in prange(n):
            rule(i, arrays, hyper, flags)

    @njit(cache=True, fastmath=FASTMATH, error_model="numpy")
    def serial(n, arrays, hyper):
        token  # noqa: B018
        for i in range(n):
            rule(i, arrays, hyper, flags)

    return parallel, serial


@cache
def grouped_loops(rule, flags, signature):
    """Return ``(parallel, serial)`` kernels ``kernel(table, part_ptr, items, scalars)`` that
    step many arrays of ``signature`` in one call.

    ``scalars`` is a 1-D array of the signature's compute dtype holding the rule's scalars.
    ``table`` holds one int64 row per array of :attr:`~fastrms.precision.Signature.table_width`
    words: its element count, then the addresses of its param, grad and state arrays (a slot
    the options leave unused holds the param's address and is never touched). Part ``k`` of
    the work is the pieces ``items[part_ptr[k]:part_ptr[k + 1]]``, each an ``(array, start,
    stop)`` row: the parallel kernel hands the parts to the threads (see
    :func:`fastrms.schedule.schedule`), the serial one runs them in order. Each piece's arrays
    start at its first element (indexed from 0), so it runs the same inlined, vectorized loop
    as the one-array kernels, and the results are bit for bit theirs.
    """
    token = TOKEN  # read below only so that it is part of the closure, hence the cache key
    columns, scalar_likes, stride = _shape(signature)

    @njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
    def parallel(table, part_ptr, items, scalars):
        token  # noqa: B018
        hyper = scalars_at(address_of(scalars), scalar_likes)
        rows = address_of(table) + 8  # the first address of row 0
        for k in prange(part_ptr.size - 1):
            for j in range(part_ptr[k], part_ptr[k + 1]):
                row, start = items[j, 0], items[j, 1]
                n = items[j, 2] - start
                arrays = arrays_at(rows + stride * row, start, n, columns)
                for i in range(n):
                    rule(i, arrays, hyper, flags)

    @njit(cache=True, fastmath=FASTMATH, error_model="numpy")
    def serial(table, part_ptr, items, scalars):
        token  # noqa: B018
        hyper = scalars_at(address_of(scalars), scalar_likes)
        rows = address_of(table) + 8
        for j in range(part_ptr[0], part_ptr[part_ptr.size - 1]):
            row, start = items[j, 0], items[j, 1]
            n = items[j, 2] - start
            arrays = arrays_at(rows + stride * row, start, n, columns)
            for i in range(n):
                rule(i, arrays, hyper, flags)

    return parallel, serial


#: The int64 words of a team step's argument block (see :func:`team_body`).
TEAM_ARGS = ("table", "part_ptr", "items", "parts", "scalars", "counter")


@cache
def team_body(rule, flags, signature):
    """Return a C function ``void body(int64 args)`` that runs a grouped step (the work of
    :func:`grouped_loops`' kernels) on a team of threads that someone else starts.

    Every thread of an OpenMP team calls ``body(args)`` with the same ``args``: the address
    of an int64 block of the words named by :data:`TEAM_ARGS`: the addresses of ``table``,
    ``part_ptr`` and ``items`` (as :func:`grouped_loops` takes them), the number of parts, the
    address of the scalars (as :func:`grouped_loops` takes them) and a counter that starts at
    0. Each thread claims the next part by an atomic increment of the counter until none is
    left, so parts go to the threads that are free, as Numba's own schedulers hand them out.
    Each piece runs the same vectorized loop as the other kernels, so the results are bit for
    bit theirs.

    fastrms.torch runs it on PyTorch's own OpenMP team, whose threads are awake after
    torch's ops, instead of starting Numba's thread pool beside it.
    """
    token = TOKEN  # read below only so that it is part of the closure, hence the cache key
    columns, scalar_likes, stride = _shape(signature)

    @cfunc(types.void(types.int64), cache=True, fastmath=FASTMATH, error_model="numpy")
    def body(args):
        token  # noqa: B018
        rows = load_int64(args) + 8
        part_ptr = load_int64(args + 8)
        items = load_int64(args + 16)
        parts = load_int64(args + 24)
        hyper = scalars_at(load_int64(args + 32), scalar_likes)
        k = fetch_add(args + 40)
        while k < parts:
            for j in range(load_int64(part_ptr + 8 * k), load_int64(part_ptr + 8 * k + 8)):
                item = items + 24 * j
                row, start = load_int64(item), load_int64(item + 8)
                n = load_int64(item + 16) - start
                arrays = arrays_at(rows + stride * row, start, n, columns)
                for i in range(n):
                    rule(i, arrays, hyper, flags)
            k = fetch_add(args + 40)

    return body


# -- CUDA (numba.cuda is imported only here, when a CUDA kernel is asked for) ------------------

cuda = None  # numba.cuda, once a CUDA kernel is asked for


def _import_cuda() -> None:
    """Import numba.cuda as this module's global ``cuda``: the simulator runs a kernel with
    its own ``cuda`` swapped into the kernel's globals, which a local name would escape."""
    global cuda
    if cuda is None:
        from numba import cuda as module

        cuda = module


@cache
def cuda_grid_stride(rule, flags):
    """Return a kernel ``kernel[blocks, threads, stream](n, arrays, hyper)`` for ``rule``.

    ``flags`` is bound as a closure constant, as in :func:`loops`. The rule is compiled as a
    device function of its own: numba-cuda 0.30 cannot type a
    ``register_jitable(inline="always")`` function called directly from a kernel, and NVVM
    inlines the device function anyway.
    """
    _import_cuda()
    token = TOKEN  # read below only so that it is part of the closure
    device_rule = cuda.jit(device=True, fastmath=FASTMATH)(rule)

    @cuda.jit(fastmath=FASTMATH)
    def kernel(n, arrays, hyper):
        token  # noqa: B018
        i = cuda.grid(1)
        stride = cuda.gridsize(1)
        while i < n:
            device_rule(i, arrays, hyper, flags)
            i += stride

    return kernel


# Generated per k (arrays per tensor), so that the tuple of arrays has a static length. CUDA
# kernels are compiled per process (no disk cache), so a kernel made by exec loses nothing;
# the simulator runs it as Python, which an intrinsic like the CPU kernels' could not be.
# Both grouped kernels, float and codec, are this chunk loop; the ``{...}`` fields are their
# own: the codec kernel's codec bindings and key words (none for the float kernel), the
# locals, the columns a chunk's arrays are made of, and the body that steps element ``i``.
_CUDA_GROUPED_SOURCE = """
def make(device_rule, as_device_array, codecs, flags, token):
{bindings}
    def kernel(meta, first, count, chunk, hyper{words}):
        token
{locals}
        c = cuda.blockIdx.x
        while c < count:
            at = first + 2 * c
            row = meta[at] * {width}
            start = meta[at + 1]
            n = meta[row]
            stop = min(start + chunk, n)
{columns}
            i = start + cuda.threadIdx.x
            while i < stop:
{body}
                i += cuda.blockDim.x
            c += cuda.gridDim.x

    return kernel
"""


def _block(lines, depth):
    """``lines`` indented by ``depth`` spaces (a line's own newlines too), for the template."""
    return "\n".join(" " * depth + line.replace("\n", "\n" + " " * depth) for line in lines)


@cache
def cuda_grouped(rule, flags, k):
    """Return the grouped CUDA kernel for ``rule`` over tensors of ``k`` arrays each::

        kernel[blocks, threads, stream](meta, first, count, chunk, hyper)

    ``meta`` is one int64 device array: the tensor table (``n_tensors`` rows of ``1 + k``:
    element count, then the ``k`` addresses), flattened, followed by the chunk table (pairs of
    tensor row and first element). Block ``b`` steps the chunks ``b, b + gridDim, ...`` of the
    ``count`` that start at ``meta[first]``, elements ``start .. min(start + chunk, n) - 1`` of
    its tensor, its threads striding by ``blockDim``. The rule is a device function, as in
    :func:`cuda_grid_stride`. ``k`` is the table's width less one
    (:attr:`fastrms.precision.Signature.table_width`), so it follows the rule's layout.
    """
    _import_cuda()
    from .cuda_pointers import as_device_array

    token = TOKEN
    device_rule = cuda.jit(device=True, fastmath=FASTMATH)(rule)
    arrays = ", ".join(f"as_device_array(meta[row + {j}], n, like)" for j in range(1, k + 1))
    source = _CUDA_GROUPED_SOURCE.format(
        bindings=_block(["pass"], 4),
        words="",
        locals=_block(["like = hyper[0]"], 8),
        width=k + 1,
        columns=_block([f"arrays = ({arrays},)"], 12),
        body=_block(["device_rule(i, arrays, hyper, flags)"], 16),
    )
    namespace = {"cuda": cuda}
    exec(compile(source, f"<grouped kernel, k={k}>", "exec"), namespace)
    return cuda.jit(fastmath=FASTMATH)(
        namespace["make"](device_rule, as_device_array, (), flags, token)
    )


# A codec group's kernel (bfloat16 parameters or state): generated per signature. Each
# element of every column is staged through a one-element local array of the compute dtype
# (registers, after NVVM's scalar replacement): loaded through its storage's codec, stepped by
# the unchanged rule at index 0, and stored back through the codec, so the rules and the float
# kernels above stay as they are and numba-cuda needs no column type of its own. A state slot
# the options leave unused repeats the parameter's address in the table: it is neither loaded
# nor stored, and the rule never touches its local (handing it the parameter's local instead,
# as the CPU kernels hand it the parameter, would select between two locals and keep them in
# local memory rather than registers: 9 local loads and stores in the PTX of an Adam step).
# The template's fields are filled per signature by :func:`cuda_grouped_codecs`.


def _codec_source(signature):
    """The fields of :data:`_CUDA_GROUPED_SOURCE` for ``signature``: per column ``j``, its held
    array ``a{j}``, its local ``v{j}``, whether it is used (state slots), its extra word (a
    keyed codec's key and index base, a paired codec's second array), its loads and stores."""
    bindings, local_arrays, columns_, arrays, loads, stores = [], [], [], [], [], []
    keyed = _keyed(signature)
    for j, storage in enumerate(signature.storages):
        like = f"np.{np.dtype(storage.dtype).name}(0)"
        local_arrays.append(f"v{j} = cuda.local.array(1, compute)")
        columns_.append(f"a{j} = as_device_array(meta[row + {j + 1}], n, {like})")
        state = j >= 2  # the gradient is only read, and param and grad are always used
        if state:
            columns_.append(f"used{j} = meta[row + {j + 1}] != meta[row + 1]")
        arrays.append(f"v{j}")
        if storage.codec is None:
            load, store = f"v{j}[0] = a{j}[i]", f"a{j}[i] = v{j}[0]"
        else:
            kind = columns.KINDS.get(storage.codec, "plain")
            bindings += [f"load{j}, store{j} = codecs[{j}]"]
            load, store = f"v{j}[0] = load{j}(a{j}, i)", f"store{j}(a{j}, i, v{j}[0])"
            if kind == "keyed":  # the key in the word's low 32 bits, the index base above
                word = f"words[meta[at] * {len(keyed)} + {keyed.index(j)}]"
                columns_ += [f"word{j} = {word}",
                             f"key{j} = np.uint32(word{j} & 0xFFFFFFFF)",
                             f"base{j} = word{j} >> 32"]  # fmt: skip
                index = f"np.uint32((base{j} + i) & 0xFFFFFFFF)"
                store = f"store{j}(a{j}, i, v{j}[0], key{j}, {index})"
            elif kind == "paired":  # the second held array, at the word's address
                extra = signature.extra_word(j)
                columns_.append(f"comp{j} = as_device_array(meta[row + {extra}], n, {like})")
                store = f"store{j}(a{j}, comp{j}, i, v{j}[0])"
        if state:
            load, store = f"if used{j}:\n    {load}", f"if used{j}:\n    {store}"
        loads.append(load)
        if j != 1:
            stores.append(store)
    columns_.append(f"arrays = ({', '.join(arrays)},)")
    return dict(
        words=", words" if keyed else "",
        bindings=_block(bindings or ["pass"], 4),
        locals=_block(local_arrays, 8),
        width=signature.table_width,
        columns=_block(columns_, 12),
        body=_block([*loads, "device_rule(0, arrays, hyper, flags)", *stores], 16),
    )


def _keyed(signature) -> list[int]:
    """The columns of ``signature`` whose codec is keyed (stochastic rounding's)."""
    return [
        j
        for j, s in enumerate(signature.storages)
        if s.codec is not None and columns.KINDS.get(s.codec) == "keyed"
    ]


def cuda_keyed_columns(signature) -> int:
    """How many key words per tensor the kernel of ``signature`` takes (see
    :func:`cuda_grouped_codecs`)."""
    return len(_keyed(signature))


@cache
def cuda_grouped_codecs(rule, flags, signature):
    """Return the grouped CUDA kernel for ``rule`` over tensors of ``signature``, whose
    storages include codecs (bfloat16 parameters or state)::

        kernel[blocks, threads, stream](meta, first, count, chunk, hyper)
        kernel[blocks, threads, stream](meta, first, count, chunk, hyper, words)  # keyed

    ``meta``, the launch and the chunks are those of :func:`cuda_grouped`; a tensor's row is
    :attr:`~fastrms.precision.Signature.table_width` words: its element count, the addresses
    of its arrays, then the storages' extra words in the arrays' order (a Kahan parameter's:
    its compensation array's address). A keyed column's word (a stochastically rounded
    parameter's: its key in the low 32 bits, the index of its element 0 in its whole tensor
    in the high 32 bits, mod 2^32) changes every step, so it is read from ``words`` instead,
    an int64 device array of :func:`cuda_keyed_columns` words per tensor row: the table stays
    the same from step to step, and so does its copy on the device. Each element is loaded
    through its storage's codec (:data:`fastrms.kernels.columns.CODECS`, the CPU kernels' own
    functions, compiled as device functions) into a local of the compute dtype, stepped by the
    rule, and stored back through the codec; element ``i`` of a chunk is element ``i`` of its
    whole tensor, so stochastic rounding draws the same bits as on the CPU. Float signatures
    take :func:`cuda_grouped`.
    """
    _import_cuda()
    from numba.np.numpy_support import from_dtype

    from .cuda_pointers import as_device_array

    for storage in signature.storages:
        if storage.codec is not None and storage.codec not in columns.CODECS:
            raise ValueError(f"no codec {storage.codec!r} has CUDA kernels (kernels.columns)")
    token = TOKEN
    device_rule = cuda.jit(device=True, fastmath=FASTMATH)(rule)
    codecs = tuple(columns.CODECS.get(s.codec) for s in signature.storages)
    source = _CUDA_GROUPED_SOURCE.format(**_codec_source(signature))
    namespace = {"cuda": cuda, "np": np, "compute": from_dtype(np.dtype(signature.compute))}
    exec(compile(source, f"<grouped codec kernel, {signature}>", "exec"), namespace)
    return cuda.jit(fastmath=FASTMATH)(
        namespace["make"](device_rule, as_device_array, codecs, flags, token)
    )
