"""The grouped CUDA launch (one kernel over a table of many arrays) against the NumPy reference.

- Host-side tests (chunking, validation, empty tables) and the PTX test run in the plain
  ``pytest`` pass: they need numba-cuda and NVVM, not a GPU.
- Tests marked ``cudasim`` run the kernel: ``.ci/run`` runs them under Numba's CUDA simulator
  (``NUMBA_ENABLE_CUDASIM=1``, in a pytest process of its own); without the simulator or a
  device they are skipped. The simulator computes with NumPy scalars, so results must equal
  the reference bit for bit; on a GPU, where the compiler contracts a*b + c into one fused
  multiply-add, within conftest's ``ULPS``.
- Tests marked ``gpu`` need a real device (CuPy and PyTorch arrays on side streams).
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
from conftest import ALGOS, DTYPES, OPTION_GRIDS, assert_close, assert_same_bits, randn

import fastrms
from fastrms import functional, reference
from fastrms.arrays import extent
from fastrms.specs import LAYOUTS, SPECS

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
CUDA = fastrms.backends()["cuda"]


def runs_kernels(test):
    """Runs kernels: under the simulator (``-m cudasim``) or on a device, else skipped."""
    skip = pytest.mark.skipif(not CUDA.available, reason=f"no CUDA target: {CUDA.detail}")
    return pytest.mark.cudasim(skip(test))


def gpu(test):
    """Needs a real device."""
    skip = pytest.mark.skipif(SIMULATOR or not CUDA.available, reason="needs a real CUDA device")
    return pytest.mark.gpu(skip(test))


#: Arrays per tensor in the table (param, grad, state slots), by rule.
K = {rule: 2 + len(slots) for rule, slots in functional.SLOTS.items()}
#: Uneven sizes, empty and one-element tensors among them; with the small chunks below the
#: 200-element tensor spans four chunks, the last one partial. On a GPU one tensor also spans
#: several chunks of the default size.
SIZES = [0, 1, 5, 200, 1, 0, 64, 33, 130]
GPU_SIZES = [0, 1, 70_001, 5, 200_000, 1, 4096]
SMALL_CHUNK, SMALL_THREADS = 64, 32


@pytest.fixture
def ck():
    """fastrms.kernels.cuda (imports numba.cuda, so only where a test needs it)."""
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    from fastrms.kernels import cuda as kernels

    return kernels


@pytest.fixture
def small_chunks(ck, monkeypatch):
    """Small chunks and blocks, so that the simulator (a Python thread per CUDA thread) is fast
    and a tensor of a few hundred elements spans several chunks."""
    monkeypatch.setattr(ck, "GROUP_CHUNK", SMALL_CHUNK)
    monkeypatch.setattr(ck, "GROUP_THREADS", SMALL_THREADS)
    return ck


def _setup(name: str, options: dict, step: int) -> functional.Setup:
    lr = ALGOS[name].lr
    options = {k: v for k, v in options.items() if k != "initial_accumulator_value"}
    if name == "rmsprop":
        return functional.rmsprop_setup(lr=lr, **options)
    if name == "adagrad":
        return functional.adagrad_setup(step=step, lr=lr, **options)
    if name in ("adam", "adamw"):
        return functional.adam_setup(
            step=step, lr=lr, decoupled_weight_decay=name == "adamw", **options
        )
    if name == "sgd":
        return functional.sgd_setup(step=step, lr=lr, **options)
    return SPECS[name].setup(step, lr=lr, **options)


def _covering(name: str) -> list[dict]:
    """A few option combinations from OPTION_GRIDS in which every option takes each of its
    values and every kernel flag combination occurs: greedily, the combination that adds the
    most (option, value) pairs and flag combinations not yet seen."""

    def features(options):
        return {*options.items(), ("flags", _setup(name, options, 1).flags)}

    grid = OPTION_GRIDS[name]
    wanted = set().union(*map(features, grid))
    chosen = []
    while wanted:
        best = max(grid, key=lambda o: len(features(o) & wanted))
        chosen.append(best)
        wanted -= features(best)
    return chosen


CASES = [
    pytest.param(name, options, id=f"{name}-{'-'.join(f'{k}={v}' for k, v in options.items())}")
    for name in OPTION_GRIDS
    for options in _covering(name)
]


def test_covering_covers_every_option_value_and_flag_combination():
    for name, grid in OPTION_GRIDS.items():
        chosen = _covering(name)
        for key in set().union(*grid):
            values = {o[key] for o in grid if key in o}
            assert {o[key] for o in chosen if key in o} == values, (name, key)
        flags = {_setup(name, o, 1).flags for o in chosen}
        assert flags == {_setup(name, o, 1).flags for o in grid}, name
    assert {c.values[0] for c in CASES} == set(OPTION_GRIDS)


class Group:
    """Tensors of uneven sizes on the device, their host twins, and the table naming them."""

    def __init__(self, name, options, dtype, sizes, to_device, address, seed=0):
        self.name, self.options, self.dtype = name, options, np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        setup = _setup(name, options, 1)
        self.rule, used = setup.rule, setup.state
        init = options.get("initial_accumulator_value", 0.0)
        self.host = []  # per tensor: [param, grad, *slots], an unused slot is param itself
        for n in sizes:
            p = randn(self.rng, n, self.dtype)
            arrays = [p, np.zeros(n, self.dtype)]
            for slot in functional.SLOTS[self.rule]:
                fill = init if slot == "state_sum" else 0.0
                arrays.append(np.full(n, fill, self.dtype) if slot in used else p)
            self.host.append(arrays)
        # Device twins: one device array per distinct host array, unused slots alias param.
        self.device = []
        for arrays in self.host:
            d = [to_device(a) for a in arrays[:2]]
            d += [to_device(a) if a is not arrays[0] else d[0] for a in arrays[2:]]
            self.device.append(d)
        self.table = np.array(
            [[len(h[0])] + [address(a) for a in d] for h, d in zip(self.host, self.device)],
            dtype=np.int64,
        ).reshape(len(sizes), 1 + K[self.rule])

    def step(self, ck, step, stream, copy_grad):
        """New gradients, then one grouped step on the device and one reference step."""
        setup = _setup(self.name, self.options, step)
        hyper = functional._cast(setup.rule, setup.scalars, self.dtype)
        for h, d in zip(self.host, self.device):
            h[1][:] = randn(self.rng, h[1].size, self.dtype)
            copy_grad(d[1], h[1])
        from fastrms.kernels import rules

        ck.launch_grouped(rules.RULES[self.rule], setup.flags, self.table, hyper, stream)
        for h in self.host:
            reference.RULES[self.rule](tuple(h), hyper, setup.flags)

    def check(self, to_host):
        check = assert_same_bits if SIMULATOR else assert_close
        for t, (h, d) in enumerate(zip(self.host, self.device)):
            names = ("param", "grad", *functional.SLOTS[self.rule])
            for what, a, b in zip(names, h, d):
                check(to_host(b), a, f"tensor {t} ({a.size} elements), {what}")


def _numba_group(name, options, dtype, sizes, seed=0):
    from numba import cuda

    return Group(name, options, dtype, sizes, cuda.to_device, lambda a: extent(a)[0], seed)


def _run_numba(ck, name, options, dtype, sizes, steps=2):
    from numba import cuda

    stream = cuda.stream()
    group = _numba_group(name, options, dtype, sizes)
    for step in range(1, steps + 1):
        group.step(ck, step, stream, lambda d, h: d.copy_to_device(h, stream=stream))
    stream.synchronize()
    group.check(lambda d: d.copy_to_host())
    return group


# --- host side: no device needed ---------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunk_table_covers_each_tensor_once_in_order(ck, chunk):
    counts = np.array([0, 1, 5, 64, 65, 0, 130, 1])
    chunks = ck.chunk_table(counts, chunk)
    assert chunks.dtype == np.int64 and chunks.shape == (sum(-(-counts // chunk)), 2)
    for row, n in enumerate(counts):
        starts = chunks[chunks[:, 0] == row, 1]
        np.testing.assert_array_equal(starts, np.arange(0, n, chunk))
    assert (np.diff(chunks[:, 0]) >= 0).all()  # tensor by tensor


def test_launch_count(ck, monkeypatch):
    table = np.zeros((4, 4), np.int64)
    table[:, 0] = [0, 3 * ck.GROUP_CHUNK, 1, ck.GROUP_CHUNK + 1]  # 0 + 3 + 1 + 2 chunks
    assert ck.grouped_launches(table) == 1
    monkeypatch.setattr(ck, "MAX_CHUNKS_PER_LAUNCH", 4)
    assert ck.grouped_launches(table) == 2
    monkeypatch.setattr(ck, "MAX_CHUNKS_PER_LAUNCH", 1)
    assert ck.grouped_launches(table) == 6
    table[:, 0] = 0
    assert ck.grouped_launches(table) == 0


@pytest.mark.parametrize("rows", [0, 3])
def test_a_table_without_elements_launches_nothing(ck, monkeypatch, rows):
    # Runs without a device: nothing is uploaded and no kernel is compiled or launched.
    def fail(*args):
        raise AssertionError("touched the device")

    monkeypatch.setattr(ck, "_device_copy", fail)
    monkeypatch.setattr(ck, "grouped_kernel", fail)
    table = np.zeros((rows, 4), np.int64)
    hyper = functional._cast("sgd", _setup("sgd", {}, 1).scalars, np.dtype(np.float32))
    from fastrms.kernels import rules

    assert ck.launch_grouped(rules.sgd, (False, False), table, hyper) is None


@pytest.mark.parametrize(
    ("table", "error", "match"),
    [
        ([[1, 2, 3, 4]], TypeError, "2-D int64 NumPy array"),
        (np.zeros((2, 4), np.int32), TypeError, "2-D int64"),
        (np.zeros(4, np.int64), TypeError, "2-D int64"),
        (np.zeros((2, 1), np.int64), ValueError, "1 \\+ k columns"),
        (np.array([[3, 0, 0, 0], [-1, 0, 0, 0]]), ValueError, "must not be negative"),
    ],
    ids=["list", "int32", "1-D", "no addresses", "negative count"],
)
def test_bad_tables_are_refused(ck, table, error, match):
    from fastrms.kernels import rules

    hyper = functional._cast("sgd", _setup("sgd", {}, 1).scalars, np.dtype(np.float32))
    with pytest.raises(error, match=match):
        ck.launch_grouped(rules.sgd, (False, False), table, hyper)


@pytest.mark.skipif(SIMULATOR, reason="the simulator keys every table to stream 0")
def test_tables_are_cached_per_stream(ck):
    from numba.cuda.cudadrv.driver import Stream, binding

    def stream(handle):  # a Stream object needs no driver until it is used
        return Stream(binding.CUstream(handle))

    keys = [ck._stream_key(s) for s in (0, stream(0), stream(0x1234), stream(0x5678))]
    assert keys == [0, 0, 0x1234, 0x5678]


# --- PTX: compiles with NVVM, no device ---------------------------------------------------------

F64 = re.compile(r"^\s*[a-z]+(\.[a-z0-9]+)*\.f64\b", re.M)  # any instruction typed .f64
N_FLAGS = {name: len(layout.flags) for name, layout in LAYOUTS.items()}  # every rule
DIVIDES = ("rmsprop", "adagrad", "adam")  # the rules with a division and a square root
PTX_CASES = [
    pytest.param(rule, flags, dtype, id=f"{rule}-{flags}-{np.dtype(dtype).name}")
    for rule, n in N_FLAGS.items()
    for dtype in DTYPES
    for flags in dict.fromkeys([(True,) * n] + [(False,) * n] * (dtype == np.float32))
]


def _ptx(ck, rule, flags, dtype):
    from numba import cuda, types

    from fastrms.kernels import rules

    kernel = ck.grouped_kernel(rules.RULES[rule], flags, K[rule])
    scalar = types.float32 if dtype == np.float32 else types.float64
    n_hyper = len(functional.SCALARS[rule])
    sig = (types.int64[::1], types.int64, types.int64, types.int64, types.UniTuple(scalar, n_hyper))
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
    return ptx


@pytest.mark.skipif(SIMULATOR, reason="the CUDA simulator compiles no PTX")
@pytest.mark.parametrize(("rule", "flags", "dtype"), PTX_CASES)
def test_grouped_kernel_compiles_to_ptx(ck, monkeypatch, rule, flags, dtype):
    import numba.cuda.dispatcher

    class Sm90:
        compute_capability = (9, 0)

    # numba-cuda asks the driver for the compute capability when it compiles a rule as a
    # device function; CI has no driver, so name the Hopper target the PTX is built for.
    monkeypatch.setattr(numba.cuda.dispatcher, "get_current_device", Sm90)
    try:
        ptx = _ptx(ck, rule, flags, dtype)
    except ImportError as exc:
        pytest.skip(f"NVVM is unavailable here ({exc})")
    if dtype == np.float64:
        assert F64.search(ptx), "a float64 kernel without float64 arithmetic"
        return
    assert not F64.findall(ptx), "float64 instruction in a float32 kernel"
    assert re.search(r"\b(mul|fma\.rn)\.f32\b", ptx), "no float32 arithmetic found at all"
    if rule in DIVIDES:  # precise (not fastmath) float32 division and square root
        assert re.search(r"\bdiv\.rn\.f32\b", ptx)
        assert re.search(r"\bsqrt\.rn\.f32\b", ptx)


# --- the kernel, under the simulator or on a GPU -----------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "options"), CASES)
@runs_kernels
def test_grouped_step_matches_reference(small_chunks, name, options, dtype):
    _run_numba(small_chunks, name, options, dtype, SIZES)


@pytest.mark.parametrize("name", ["rmsprop", "adam"])
@runs_kernels
def test_several_launches_when_chunks_exceed_one_launch(small_chunks, monkeypatch, name):
    ck = small_chunks
    monkeypatch.setattr(ck, "MAX_CHUNKS_PER_LAUNCH", 3)
    launches = []
    real = ck.grouped_kernel

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, config):
            launches.append(config[0])
            return self.kernel[config]

    monkeypatch.setattr(ck, "grouped_kernel", lambda *a: Counting(real(*a)))
    options = {"centered": True, "momentum": 0.9} if name == "rmsprop" else {"amsgrad": True}
    group = _run_numba(ck, name, options, np.float32, SIZES, steps=1)
    n_chunks = len(ck.chunk_table(group.table[:, 0], SMALL_CHUNK))
    assert ck.grouped_launches(group.table, SMALL_CHUNK) == math.ceil(n_chunks / 3) > 1
    assert launches == [3] * (n_chunks // 3) + [n_chunks % 3] * (n_chunks % 3 > 0)


@runs_kernels
def test_fewer_blocks_than_chunks_stride_over_the_chunks(small_chunks):
    # launch_grouped gives each chunk a block; the kernel also strides over chunks when the
    # grid is smaller, as a hand-made launch with two blocks shows.
    ck = small_chunks
    from fastrms.kernels import rules

    group = _numba_group("adagrad", {"weight_decay": 0.1}, np.float64, SIZES)
    setup = _setup("adagrad", {"weight_decay": 0.1}, 1)
    hyper = functional._cast(setup.rule, setup.scalars, group.dtype)
    for h, d in zip(group.host, group.device):
        h[1][:] = randn(group.rng, h[1].size, group.dtype)
        d[1].copy_to_device(h[1])
        reference.RULES[setup.rule](tuple(h), hyper, setup.flags)
    key = (group.table.shape[1], SMALL_CHUNK, ck.MAX_CHUNKS_PER_LAUNCH, group.table.tobytes())
    plan = ck._plan(key, group.table, SMALL_CHUNK)
    ((first, count),) = plan.launches
    meta = ck._device_copy(key, plan, 0)
    assert count > 2
    kernel = ck.grouped_kernel(rules.adagrad, setup.flags, K["adagrad"])
    kernel[2, SMALL_THREADS](meta, first, count, SMALL_CHUNK, hyper)
    group.check(lambda d: d.copy_to_host())


@runs_kernels
def test_tables_are_uploaded_once_and_evicted_oldest_first(small_chunks, monkeypatch):
    from numba import cuda

    ck = small_chunks
    monkeypatch.setattr(ck, "_copies", type(ck._copies)())
    monkeypatch.setattr(ck, "TABLE_CACHE_SIZE", 2)
    uploads = []
    real_to_device = cuda.to_device

    def counting_to_device(a, *args, **kwargs):
        uploads.append(a.dtype)
        return real_to_device(a, *args, **kwargs)

    groups = [_numba_group("sgd", {"momentum": 0.9}, np.float32, SIZES, seed=s) for s in range(3)]
    monkeypatch.setattr(cuda, "to_device", counting_to_device)
    copy = lambda d, h: d.copy_to_device(h)  # noqa: E731
    for step in (1, 2):  # the second step finds the table uploaded
        groups[0].step(ck, step, 0, copy)
    assert len(uploads) == 1 and len(ck._copies) == 1
    for g in groups[1:]:
        g.step(ck, 1, 0, copy)
    assert len(uploads) == 3 and len(ck._copies) == 2  # the first table was evicted
    groups[0].step(ck, 3, 0, copy)  # and comes back
    assert len(uploads) == 4
    for g in groups:
        g.check(lambda d: d.copy_to_host())


# --- a real GPU: CuPy and PyTorch arrays on side streams ----------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(OPTION_GRIDS))
@gpu
def test_gpu_default_chunks_with_numba_arrays(ck, name, dtype):
    options = max(OPTION_GRIDS[name], key=lambda o: sum(map(bool, o.values())))  # most options
    _run_numba(ck, name, options, dtype, GPU_SIZES, steps=3)


@pytest.mark.parametrize(("name", "options"), CASES)
@gpu
def test_gpu_cupy_arrays_on_a_side_stream(ck, name, options):
    cp = pytest.importorskip("cupy")
    from numba import cuda

    side = cp.cuda.Stream(non_blocking=True)
    with side:
        group = Group(name, options, np.float32, GPU_SIZES, cp.asarray, lambda a: a.data.ptr)
        stream = cuda.external_stream(side.ptr)
        for step in (1, 2, 3):
            group.step(ck, step, stream, lambda d, h: d.set(h, stream=side))
        side.synchronize()
    group.check(cp.asnumpy)


@pytest.mark.parametrize(("name", "options"), CASES)
@gpu
def test_gpu_torch_tensors_on_a_side_stream(ck, name, options):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    from numba import cuda

    def to_device(a):
        return torch.as_tensor(a, device="cuda")

    def copy_grad(d, h):
        d.copy_(torch.as_tensor(h))

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        group = Group(name, options, np.float32, GPU_SIZES, to_device, lambda t: t.data_ptr())
        stream = cuda.external_stream(side.cuda_stream)
        for step in (1, 2, 3):
            group.step(ck, step, stream, copy_grad)
        side.synchronize()
    group.check(lambda t: t.cpu().numpy())


@pytest.mark.cudasim
@pytest.mark.parametrize("algo", ["adam", "rmsprop", "sgd", "lion"])
def test_optimizer_class_steps_many_device_arrays_as_one_group(algo):
    """fastrms's classes group CUDA arrays too: one grouped launch, equal to the reference."""
    if not SIMULATOR:
        pytest.skip("the simulator run checks this; the gpu tests check real devices")
    from conftest import ALGOS, FULL_STATE
    from numba import cuda

    rng = np.random.default_rng(9)
    sizes = [0, 1, 5, 70, 1, 0, 33]
    host = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    device = [cuda.to_device(h) for h in host]
    hyper = dict(lr=ALGOS[algo].lr, **FULL_STATE[algo])
    opt = ALGOS[algo].cls(device, **hyper)
    ref = ALGOS[algo].cls([h.copy() for h in host], backend="numpy", **hyper)
    for _ in range(2):
        grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        opt.step([cuda.to_device(g) for g in grads])
        ref.step(grads)
    assert [g.backend.name for g in opt._plan.groups] == ["cuda"]
    for d, want in zip(device, ref._params):
        np.testing.assert_array_equal(d.copy_to_host(), want)


@runs_kernels
def test_int8_state_on_cuda_is_refused_with_host_pairs():
    """8-bit blockwise state (state_dtype="int8") on CUDA needs CUDA codes and scales
    (tests/test_cuda_int8.py steps them); host pairs beside CUDA parameters are refused with a
    clear error before anything runs."""
    from numba import cuda

    from fastrms.lowprecision import MIN_8BIT_SIZE, Quantized

    rng = np.random.default_rng(0)
    p, g = (cuda.to_device(randn(rng, MIN_8BIT_SIZE, np.float32)) for _ in range(2))
    m = Quantized.of(np.zeros(MIN_8BIT_SIZE), True)
    v = Quantized.of(np.zeros(MIN_8BIT_SIZE), False)
    before = p.copy_to_host()
    with pytest.raises(TypeError, match=r"exp_avg of params\[0\] is in host memory \(NumPy\) "
                                        "but params"):  # fmt: skip
        functional.multi_tensor_step("adam", [p], [g], {"exp_avg": [m], "exp_avg_sq": [v]},
                                     state_dtype="int8")  # fmt: skip
    assert_same_bits(p.copy_to_host(), before)
    assert (m.codes == 0).all() and (v.scales == 0).all()
