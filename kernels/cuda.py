"""CUDA kernels around a rule: one array per launch, or many arrays per launch.

- :func:`launch` / :func:`grid_stride`: one array (and its state), a grid-stride loop
  generated like the CPU loop, at most :data:`BLOCKS_PER_SM` blocks of
  :data:`THREADS_PER_BLOCK` threads per multiprocessor.
- :func:`launch_grouped` / :func:`grouped_kernel`: a table of many arrays of uneven sizes,
  cut into chunks of :data:`GROUP_CHUNK` elements, one block of :data:`GROUP_THREADS` threads
  per chunk, as torch's ``multi_tensor_apply`` does. Each launch costs some microseconds on
  the host whatever its size; this pays it once per step instead of once per tensor.

Importing this module imports ``numba.cuda`` (numba-cuda); fastrms imports it only when the
``cuda`` backend is used.
"""

import math
import threading
from collections import OrderedDict
from functools import cache
from typing import NamedTuple

import numpy as np
from numba import cuda

from ._options import FASTMATH, RULES_TOKEN

#: Threads per block of the single-array kernel: a multiple of the 32-thread warp, small enough
#: that several blocks share a multiprocessor.
THREADS_PER_BLOCK = 256
#: Enough resident blocks per multiprocessor to hide memory latency; the grid-stride loop
#: covers the rest of the array.
BLOCKS_PER_SM = 8


@cache
def grid_stride(rule, flags):
    """Return a kernel ``kernel[blocks, threads, stream](n, arrays, hyper)`` for ``rule``.

    ``flags`` is bound as a closure constant, as in :func:`fastrms.kernels.cpu.loops`. The rule
    is compiled as a device function of its own: numba-cuda 0.30 cannot type a
    ``register_jitable(inline="always")`` function called directly from a kernel, and NVVM
    inlines the device function anyway.
    """
    token = RULES_TOKEN  # read below only so that it is part of the closure
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


@cache
def max_blocks():
    """Blocks for a full wave on the current device (the simulator reports no SM count)."""
    sms = getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", None) or 1
    return sms * BLOCKS_PER_SM


def launch(rule, flags, arrays, hyper, stream=0):
    """Run one step of ``rule`` over 1-D Numba device arrays, on ``stream``."""
    n = arrays[0].size
    if n == 0:
        return
    blocks = min(math.ceil(n / THREADS_PER_BLOCK), max_blocks())
    grid_stride(rule, flags)[blocks, THREADS_PER_BLOCK, stream](n, arrays, hyper)


# ---------------------------------------------------------------------------------------------
# Grouped launch: one kernel steps many arrays of uneven sizes.

#: Elements per chunk, as in torch's and apex's ``multi_tensor_apply``. A tensor is cut into
#: chunks of this many elements (its last chunk shorter); each chunk is one block's work.
GROUP_CHUNK = 65536
#: Threads per block of the grouped kernel (torch's multi-tensor kernels use 512): each thread
#: steps every ``GROUP_THREADS``-th element of its block's chunk, 128 of them in a full chunk,
#: in coalesced sweeps.
GROUP_THREADS = 512
#: Most blocks (chunks) one grouped launch takes: 65535, the grid limit of old devices and
#: of the y and z dimensions. One launch so covers 65535 * 65536 (about 4.3e9) elements at the
#: default chunk; a larger table is stepped in several launches, one after the other on the
#: same stream. There is no limit from kernel arguments as in torch (whose tables travel in
#: the 4 KB argument space): the tables are in device memory.
MAX_CHUNKS_PER_LAUNCH = 65535
#: Tables kept, keyed by their content: as many host plans, and as many device copies (see
#: :func:`launch_grouped`).
TABLE_CACHE_SIZE = 64

_SIMULATOR = cuda.config.ENABLE_CUDASIM == 1

if _SIMULATOR:
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
        ``size`` elements of ``like``'s type (float32 or float64) at device ``address``.

        The CUDA twin of :func:`fastrms.kernels.pointers.as_array`, registered with
        numba-cuda's own ``intrinsic`` and lowered with its own array helpers. The array
        borrows the memory (no reference count); the caller keeps it alive.
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


# Generated per k (arrays per tensor), so that the tuple of arrays has a static length.
_GROUPED_SOURCE = """
def make(device_rule, as_device_array, flags, token):
    def kernel(meta, first, count, chunk, hyper):
        token
        like = hyper[0]
        c = cuda.blockIdx.x
        while c < count:
            at = first + 2 * c
            row = meta[at] * {width}
            start = meta[at + 1]
            n = meta[row]
            stop = min(start + chunk, n)
            arrays = ({arrays},)
            i = start + cuda.threadIdx.x
            while i < stop:
                device_rule(i, arrays, hyper, flags)
                i += cuda.blockDim.x
            c += cuda.gridDim.x

    return kernel
"""


@cache
def grouped_kernel(rule, flags, k):
    """Return the grouped kernel for ``rule`` over tensors of ``k`` arrays each::

        kernel[blocks, threads, stream](meta, first, count, chunk, hyper)

    ``meta`` is one int64 device array: the tensor table (``n_tensors`` rows of ``1 + k``:
    element count, then the ``k`` addresses), flattened, followed by the chunk table (pairs of
    tensor row and first element). Block ``b`` steps the chunks ``b, b + gridDim, ...`` of the
    ``count`` that start at ``meta[first]``, elements ``start .. min(start + chunk, n) - 1`` of
    its tensor, its threads striding by ``blockDim``. The rule is a device function, as in
    :func:`grid_stride`.
    """
    token = RULES_TOKEN
    device_rule = cuda.jit(device=True, fastmath=FASTMATH)(rule)
    arrays = ", ".join(f"as_device_array(meta[row + {j}], n, like)" for j in range(1, k + 1))
    source = _GROUPED_SOURCE.format(width=k + 1, arrays=arrays)
    namespace = {"cuda": cuda}
    exec(compile(source, f"<grouped kernel, k={k}>", "exec"), namespace)
    return cuda.jit(fastmath=FASTMATH)(
        namespace["make"](device_rule, as_device_array, flags, token)
    )


def chunk_table(counts, chunk=None):
    """The ``(tensor row, first element)`` of every chunk, as an int64 array of shape
    ``(n_chunks, 2)``, for tensors of ``counts`` elements cut into ``chunk``-element pieces
    (default :data:`GROUP_CHUNK`). Empty tensors have no chunk."""
    chunk = GROUP_CHUNK if chunk is None else chunk
    counts = np.asarray(counts, np.int64)
    per_tensor = -(-counts // chunk)
    rows = np.repeat(np.arange(counts.size, dtype=np.int64), per_tensor)
    firsts = np.repeat(np.cumsum(per_tensor) - per_tensor, per_tensor)
    starts = (np.arange(rows.size, dtype=np.int64) - firsts) * chunk
    return np.stack([rows, starts], axis=1)


def grouped_launches(table, chunk=None):
    """How many kernel launches :func:`launch_grouped` makes for ``table``: its chunks over
    :data:`MAX_CHUNKS_PER_LAUNCH`, rounded up (0 when every tensor is empty)."""
    chunk = GROUP_CHUNK if chunk is None else chunk
    counts = _counts(_check_table(table))
    return -(-int((-(-counts // chunk)).sum()) // MAX_CHUNKS_PER_LAUNCH)


def _check_table(table):
    """Check what is cheap to check on every call (the counts are checked once per table)."""
    if not isinstance(table, np.ndarray) or table.dtype != np.int64 or table.ndim != 2:
        raise TypeError(f"table must be a 2-D int64 NumPy array, got {_describe(table)}")
    if table.shape[1] < 2:
        raise ValueError(f"table must have 1 + k columns (count, k addresses), got {table.shape}")
    return table


def _counts(table):
    counts = table[:, 0]
    if counts.size and counts.min() < 0:
        raise ValueError("table's element counts (column 0) must not be negative")
    return counts


def _describe(x):
    shape = getattr(x, "shape", None)
    return f"{type(x).__name__} {getattr(x, 'dtype', '')} {shape}" if shape else type(x).__name__


class _Plan(NamedTuple):
    host: np.ndarray  # the tensor table, flattened, then the chunk table
    launches: tuple  # (first, count) per launch: offset of its chunks in ``host``, how many


#: Host plans by (width, chunk, launch size, table bytes); device copies by that key, the
#: device and the stream.
#: Both are least recently used first. Only the lock's holder reads or changes them.
_plans: OrderedDict = OrderedDict()
_copies: OrderedDict = OrderedDict()
_lock = threading.Lock()


def _plan(key, table, chunk):
    """The chunk table and launches of ``table`` (validated and built once per content)."""
    with _lock:
        plan = _plans.get(key)
        if plan is not None:
            _plans.move_to_end(key)
            return plan
    chunks = chunk_table(_counts(table), chunk)
    launches = tuple(
        (table.size + 2 * c, min(MAX_CHUNKS_PER_LAUNCH, len(chunks) - c))
        for c in range(0, len(chunks), MAX_CHUNKS_PER_LAUNCH)
    )
    plan = _Plan(np.concatenate([table.ravel(), chunks.ravel()]), launches)
    with _lock:
        _plans[key] = plan
        if len(_plans) > TABLE_CACHE_SIZE:
            _plans.popitem(last=False)
    return plan


def _device_id():
    return 0 if _SIMULATOR else cuda.get_current_device().id


def _stream_key(stream):
    """The stream's handle (0 for the default stream; the simulator's uploads are synchronous)."""
    return 0 if _SIMULATOR or not stream else int(getattr(stream, "handle", stream))


def _device_copy(key, plan, stream):
    """``plan.host`` on the current device, uploaded on ``stream`` once and then reused."""
    key = (*key, _device_id(), _stream_key(stream))
    # One lock over lookup, upload and insertion: two threads racing to upload one table
    # would otherwise drop a copy that an upload is still writing or a kernel still reads.
    with _lock:
        entry = _copies.get(key)
        if entry is not None:
            _copies.move_to_end(key)
            return entry[1]
        meta = cuda.to_device(plan.host, stream=stream)
        # The host array stays referenced too: an asynchronous copy may read it after return.
        _copies[key] = (plan.host, meta)
        if len(_copies) > TABLE_CACHE_SIZE:
            old = next(iter(_copies))
            _synchronize(old[-2])
            del _copies[old]
    return meta


def _synchronize(device):
    """Wait for ``device``'s work, so that an evicted table is not freed under a kernel still
    reading it (with an external memory pool, freed memory can be reused at once)."""
    if _SIMULATOR:
        return
    with cuda.gpus[device]:
        cuda.synchronize()


def launch_grouped(rule, flags, table, hyper, stream=0):
    """Run one step of ``rule`` over many tensors in as few launches as possible, on ``stream``.

    Parameters
    ----------
    rule, flags, hyper
        As for :func:`launch`; ``hyper``'s dtype is that of every array in ``table``.
    table : numpy.ndarray of int64, shape (n_tensors, 1 + k)
        Per tensor, its element count, then the device addresses of its ``k`` arrays in the
        rule's order (param, grad, state; an unused slot holds the parameter's address). The
        arrays must stay alive until the step has run on the device.
    stream : numba.cuda stream or 0
        Every upload and launch is queued on it.

    Notes
    -----
    Work is split as in torch's ``multi_tensor_apply``: each tensor is cut into chunks of
    :data:`GROUP_CHUNK` elements; a host-built table of ``(tensor row, first element)`` gives
    each block its chunk, and the block's :data:`GROUP_THREADS` threads stride through it. Empty
    tensors have no chunk; a table with no elements launches nothing and touches no device.
    Past :data:`MAX_CHUNKS_PER_LAUNCH` chunks the step takes several launches
    (:func:`grouped_launches`).

    The tensor and chunk tables travel to the device as one int64 array, uploaded on
    ``stream`` and cached by the table's bytes, the device and the stream (at most
    :data:`TABLE_CACHE_SIZE` copies): a training loop names the same arrays every step, so it
    uploads its table once. A cached copy is never written again, so reusing it is correct
    whatever became of the arrays it names: it holds the same addresses and counts. It is
    keyed by stream because its upload is ordered only before work queued on that stream.
    Evicting a copy first waits for its device, so that no kernel still reads freed memory;
    only a loop over more distinct tables than the cache holds pays for that.
    """
    _check_table(table)
    if not table.shape[0]:
        return
    key = (table.shape[1], GROUP_CHUNK, MAX_CHUNKS_PER_LAUNCH, table.tobytes())
    plan = _plan(key, table, GROUP_CHUNK)
    if not plan.launches:
        return
    meta = _device_copy(key, plan, stream)
    kernel = grouped_kernel(rule, flags, table.shape[1] - 1)
    for first, count in plan.launches:
        kernel[count, GROUP_THREADS, stream](meta, first, count, GROUP_CHUNK, hyper)
