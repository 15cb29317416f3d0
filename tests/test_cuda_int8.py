"""int8 blockwise state (``state_dtype="int8"``) on the ``cuda`` backend, bit for bit against
the ``numpy`` backend, the ``cpu`` backend and the NumPy reference (:mod:`fastrms.lowprecision`
with :mod:`fastrms.reference`).

Tests marked ``cudasim`` run the kernel of :mod:`fastrms.kernels.cuda_blockwise`: ``.ci/run``
runs them under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, a pytest process of its
own), where they must match bit for bit; without the simulator or a device they are skipped.
The simulator runs a Python thread per CUDA thread (256 per block), so the arrays are small:
one parameter of 4140 elements (at least ``MIN_8BIT_SIZE``, its last block ragged) beside one
of 1000 that keeps float32 state, and a few blocks for the sweep of every optimizer, which
calls the kernel directly. The PTX of the kernel is checked in ``tests/test_cuda_ptx.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FULL_STATE, assert_same_bits, options_id, quiet, randn

import fastrms
from fastrms import functional, lowprecision, precision, reference
from fastrms.blockwise_groups import block_table
from fastrms.lowprecision import BLOCK, MIN_8BIT_SIZE, Quantized
from fastrms.specs import SPECS

CUDA = fastrms.backends()["cuda"]

#: A ragged int8 parameter (17 blocks, the last of 44 elements) and one that keeps float32 state.
SIZES = (MIN_8BIT_SIZE + 44, 1000)
#: Two options of each of two optimizers through the grouped step (the sweep covers the rest).
PLAN_CASES = [
    pytest.param("adam", FULL_STATE["adam"], id=f"adam-{options_id(FULL_STATE['adam'])}"),
    pytest.param(
        "rmsprop", FULL_STATE["rmsprop"], id=f"rmsprop-{options_id(FULL_STATE['rmsprop'])}"
    ),  # fmt: skip
]


def runs_kernels(test):
    """Runs kernels: under the simulator (``-m cudasim``) or on a device, else skipped."""
    skip = pytest.mark.skipif(not CUDA.available, reason=f"no CUDA target: {CUDA.detail}")
    return pytest.mark.cudasim(skip(test))


def _cuda():
    from numba import cuda

    return cuda


def _signed(rule: str, slot: str) -> bool:
    layout = SPECS[rule].layout
    return layout.slot_specs[layout.slots.index(slot)].sign == "signed"


def _values(rng: np.random.Generator, n: int, signed: bool) -> np.ndarray:
    """Random state values, never zero (so every code and scale is read): first moments in
    [-0.2, 0.2], second moments in [0.1, 0.2), so that centered RMSProp's ``v - m*m`` stays
    positive through the quantization error (at most 1/16 of a value)."""
    x = randn(rng, n, np.float32)
    if signed:
        return np.clip(x * np.float32(0.1), -0.2, 0.2).astype(np.float32)
    return (np.float32(0.1) + np.float32(0.1) * rng.random(n, np.float32)).astype(np.float32)


def _initial(name: str, slot: str, n: int, rng: np.random.Generator):
    """:func:`_values` held as ``state_dtype="int8"`` holds them: a pair for
    ``n >= MIN_8BIT_SIZE``, else float32."""
    signed = _signed(name, slot)
    x = _values(rng, n, signed)
    return Quantized.of(x, signed) if n >= MIN_8BIT_SIZE else x


def _copy(a):
    return Quantized(a.codes.copy(), a.scales.copy()) if isinstance(a, tuple) else a.copy()


def _to_device(a):
    cuda = _cuda()
    if isinstance(a, tuple):
        return Quantized(cuda.to_device(a.codes), cuda.to_device(a.scales))
    return cuda.to_device(a)


def _to_host(a):
    if isinstance(a, tuple):
        return Quantized(a.codes.copy_to_host(), a.scales.copy_to_host())
    return a.copy_to_host()


def _assert_same(got, want, what: str) -> None:
    if isinstance(want, tuple):
        assert isinstance(got, tuple), f"{what} is not quantized"
        assert_same_bits(got.codes, want.codes, f"{what} codes")
        assert_same_bits(got.scales, want.scales, f"{what} scales")
    else:
        assert_same_bits(got, want, what)


def _problem(name: str, seed: int, sizes=SIZES, steps: int = 2):
    rng = np.random.default_rng(seed)
    used = SPECS[name].setup(1, **FULL_STATE[name]).state
    params = [randn(rng, n, np.float32) for n in sizes]
    grads = [[randn(rng, n, np.float32) for n in sizes] for _ in range(steps)]
    state = {s: [_initial(name, s, n, rng) for n in sizes] for s in used}
    return params, grads, state


# -- the grouped step, through functional ------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), PLAN_CASES)
@runs_kernels
def test_multi_tensor_step_matches_the_numpy_and_cpu_backends(name, options):
    params, grads, state = _problem(name, seed=1)
    step_options = {k: v for k, v in options.items() if k in SPECS[name].step_options}
    results = {}
    for backend in ("numpy", "cpu", "cuda"):
        move = _to_device if backend == "cuda" else _copy
        ps = [move(p) for p in params]
        st = {s: [move(a) for a in arrays] for s, arrays in state.items()}
        for step, gs in enumerate(grads, start=1):
            gs = [move(g) for g in gs]
            functional.multi_tensor_step(name, ps, gs, st, step=step, backend=backend,
                                         state_dtype="int8", **step_options)  # fmt: skip
        back = _to_host if backend == "cuda" else (lambda a: a)
        results[backend] = ([back(p) for p in ps], {s: [back(a) for a in v] for s, v in st.items()})
    want_params, want_state = results["numpy"]
    for backend in ("cpu", "cuda"):
        got_params, got_state = results[backend]
        for i, (p, w) in enumerate(zip(got_params, want_params)):
            assert_same_bits(p, w, f"{backend} params[{i}]")
        for s, arrays in want_state.items():
            for i, w in enumerate(arrays):
                _assert_same(got_state[s][i], w, f"{backend} {s}[{i}]")
    # the small parameter kept float32 state, the large one codes and scales
    assert isinstance(want_state[next(iter(want_state))][0], Quantized)
    assert isinstance(want_state[next(iter(want_state))][1], np.ndarray)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@runs_kernels
def test_zero_blocks_stay_exact_and_nan_and_inf_poison_only_their_block():
    """As on the cpu (tests/test_int8_state.py): a block whose gradient and state are zero
    stays exactly zero (scale 0, zero codes); a NaN or Inf in a gradient makes its block's
    scale NaN (lowprecision.quantize_blockwise's rule) and no other block's. Plain ``(codes,
    scales)`` tuples are accepted as pairs."""
    n = SIZES[0]
    p = np.ones(n, np.float32)
    g = np.ones(n, np.float32)
    g[:BLOCK] = 0
    g[BLOCK + 9] = np.nan
    g[2 * BLOCK + 3] = np.inf
    m, v = Quantized.of(np.zeros(n), True), Quantized.of(np.zeros(n), False)
    want = [p.copy(), _copy(m), _copy(v)]
    functional.adam(want[0], g, want[1], want[2], step=1, state_dtype="int8", backend="numpy")
    dp, dm, dv = _to_device(p), _to_device(m), _to_device(v)
    functional.adam(dp, _to_device(g), tuple(dm), tuple(dv), step=1, state_dtype="int8")
    got = [_to_host(a) for a in (dp, dm, dv)]
    for what, a, w in zip(("param", "exp_avg", "exp_avg_sq"), got, want):
        _assert_same(a, w, what)
    p1, m1, v1 = got
    assert m1.scales[0] == 0 and v1.scales[0] == 0 and (m1.codes[:BLOCK] == 0).all()
    assert (v1.codes[:BLOCK] == 0).all() and (p1[:BLOCK] == 1).all()
    for b in (1, 2):
        assert np.isnan(m1.scales[b]) and np.isnan(v1.scales[b])
        assert (m1.codes[b * BLOCK : (b + 1) * BLOCK] == 0).all()
    assert np.isnan(p1[BLOCK + 9]) and np.isnan(p1[2 * BLOCK + 3])
    assert np.isfinite(m1.scales[3:]).all() and np.isfinite(p1[3 * BLOCK :]).all()
    assert (m1.scales[3:] > 0).all() and (v1.scales[3:] > 0).all()


# -- the kernel itself, for every optimizer ----------------------------------------------------


def _storages(rule: str) -> tuple:
    return precision.slot_storages(rule, precision.STORAGES["int8"], MIN_8BIT_SIZE)


def _kernel_case(name: str, sizes: tuple, seed: int, options: dict | None = None):
    """A small problem for :func:`launch_blockwise` (any size can be held blockwise there):
    the setup (``options``, default FULL_STATE's), host params, grads and pairs per slot
    (random, nonzero; unused slots too), signs and used."""
    setup = SPECS[name].setup(1, **(FULL_STATE[name] if options is None else options))
    slots = SPECS[setup.rule].layout.slots
    rng = np.random.default_rng(seed)
    params = [randn(rng, n, np.float32) for n in sizes]
    grads = [randn(rng, n, np.float32) for n in sizes]
    signs = tuple(s.signed for s in _storages(setup.rule))
    used = tuple(s in setup.state for s in slots)
    state = []
    for n in sizes:
        state.append([Quantized.of(_values(rng, n, sg), sg) for sg in signs])
    return setup, params, grads, state, signs, used


def _reference(setup, params, grads, state, signs, used):
    """Per array: dequantize each used slot, the NumPy reference rule, quantize again."""
    hyper = precision.cast(setup.rule, setup.scalars, np.dtype(np.float32))
    params = [p.copy() for p in params]
    new_state = []
    for p, g, pairs in zip(params, grads, state):
        wide = [
            lowprecision.dequantize_blockwise(q.codes, q.scales, s, map="float8") if u else p
            for q, s, u in zip(pairs, signs, used)
        ]
        reference.RULES[setup.rule]((p, g, *wide), hyper, setup.flags)
        new_state.append([Quantized.of(w, s) if u else q
                          for w, q, s, u in zip(wide, pairs, signs, used)])  # fmt: skip
    return params, new_state


def _launch(setup, params, grads, state, signs, used):
    """The kernel's step of device copies of the arrays; returns them on the host."""
    from fastrms.arrays import extent
    from fastrms.kernels import cuda_blockwise, rules

    dp = [_to_device(p) for p in params]
    dg = [_to_device(g) for g in grads]
    ds = [[_to_device(q) for q in pairs] for pairs in state]
    sig = precision.signature(setup.rule, np.dtype(np.float32), _storages(setup.rule))
    assert tuple(s.signed for s in sig.storages[2:]) == signs
    table = block_table(sig, [[p, None, *pairs] for p, pairs in zip(dp, ds)])
    table[:, 2] = [extent(g)[0] for g in dg]
    hyper = precision.cast(setup.rule, setup.scalars, np.dtype(np.float32))
    rule = rules.RULES[setup.rule]
    cuda_blockwise.launch_blockwise(rule, setup.flags, sig, used, table, hyper)
    return [p.copy_to_host() for p in dp], [[_to_host(q) for q in pairs] for pairs in ds]


def _check_kernel(case, what: str) -> None:
    setup, params, grads, state, signs, used = case
    want_params, want_state = _reference(setup, params, grads, state, signs, used)
    got_params, got_state = _launch(setup, params, grads, state, signs, used)
    for i, (p, w) in enumerate(zip(got_params, want_params)):
        assert_same_bits(p, w, f"{what} params[{i}]")
    for i, (pairs, wants) in enumerate(zip(got_state, want_state)):
        for k, (q, w) in enumerate(zip(pairs, wants)):
            _assert_same(q, w, f"{what} slot {k} of params[{i}]")


@pytest.mark.parametrize("name", list(SPECS))
@runs_kernels
def test_the_kernel_matches_the_reference_for_every_optimizer(name):
    # Two arrays in one table, 300 elements (a ragged second block) and 40 (one short block).
    _check_kernel(_kernel_case(name, (300, 40), seed=2), name)


@runs_kernels
def test_a_slot_the_options_leave_unused_is_not_touched():
    case = _kernel_case("adam", (300,), seed=6, options={})  # max_exp_avg_sq unused
    assert case[-1] == (True, True, False)
    _check_kernel(case, "adam without amsgrad")  # its codes and scales come back as they were


@runs_kernels
def test_several_launches_and_blocks_strided_by_a_small_grid(monkeypatch):
    """Five blocks in launches of at most two, each by one thread block: its loop takes the
    three rows of shared peaks in turn and wraps around."""
    from fastrms.kernels import cuda as cuda_kernels

    monkeypatch.setattr(cuda_kernels, "MAX_CHUNKS_PER_LAUNCH", 2)
    monkeypatch.setattr(cuda_kernels, "max_blocks", lambda: 1)
    _check_kernel(_kernel_case("adam", (700, 300), seed=3), "adam, 2 blocks per launch")
    monkeypatch.setattr(cuda_kernels, "MAX_CHUNKS_PER_LAUNCH", 65535)
    _check_kernel(_kernel_case("rmsprop", (700, 300), seed=4), "rmsprop, one thread block")


# -- refusals: a clear error, nothing written --------------------------------------------------


def _adam_on_device(change: str):
    n = SIZES[0]
    cuda = _cuda()
    p, g = np.ones(n, np.float32), np.ones(n, np.float32)
    m, v = _to_device(Quantized.of(np.zeros(n), True)), _to_device(Quantized.of(np.zeros(n), False))
    if change == "scales on the host":
        m = Quantized(m.codes, m.scales.copy_to_host())
    elif change == "pair on the host":
        m = Quantized(m.codes.copy_to_host(), m.scales.copy_to_host())
    elif change == "scales dtype":
        m = Quantized(m.codes, cuda.to_device(np.zeros(lowprecision.n_blocks(n), np.float64)))
    elif change == "codes shape":
        m = Quantized(cuda.to_device(np.zeros(n - 1, np.uint8)), m.scales)
    return cuda.to_device(p), cuda.to_device(g), m, v


def _host_copies(*arrays) -> list:
    out = []
    for a in arrays:
        for x in a if isinstance(a, tuple) else (a,):
            out.append(x.copy_to_host() if hasattr(x, "copy_to_host") else x.copy())
    return out


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ("scales on the host", TypeError, r"codes and scales of exp_avg of param must both"),
        ("pair on the host", TypeError, r"exp_avg of param is in host memory .* but param is"),
        ("scales dtype", TypeError, r"scales of exp_avg of param has dtype float64"),
        ("codes shape", ValueError, r"codes of exp_avg of param has shape \(4139,\)"),
    ],
)
@runs_kernels
def test_bad_int8_state_on_cuda_is_refused_and_nothing_is_written(change, error, match):
    p, g, m, v = _adam_on_device(change)
    before = _host_copies(p, m, v)
    with pytest.raises(error, match=match):
        functional.adam(p, g, m, v, step=1, state_dtype="int8", backend="cuda")
    for a, b in zip(_host_copies(p, m, v), before):
        assert_same_bits(a, b)


# -- bfloat16 parameters (uint16 device arrays of their patterns) -------------------------------


@pytest.mark.parametrize(
    ("name", "rounding"),
    [("adam", "stochastic"), ("adam", "nearest"), ("adam", "kahan"), ("sgd", "kahan")],
)
@runs_kernels
def test_bf16_params_match_the_reference(name, rounding):
    """bfloat16 parameters and gradients with int8 state, bit for bit against the NumPy
    reference of ``test_bf16_int8`` (every slot of Adam in use, with amsgrad; SGD's one slot,
    set to the gradient on the first step): the parameter and its gradient are loaded through
    the bfloat16 codec, and the parameter is stored as ``rounding`` says (stochastically with
    its key and the element's index, to nearest, or with its Kahan compensation array)."""
    from test_bf16_int8 import KAHAN, _fresh_state, _options, _problem, reference_steps

    options = _options(name)
    params, grads = _problem(4, shapes=((SIZES[0],), (SIZES[1],)), steps=2)
    want_params, want_state = reference_steps(name, options, params, grads, rounding, seed=3)
    device = [_to_device(p.view(np.uint16)) for p in params]
    state = {
        s: [_to_device(a.view(np.uint16) if s == KAHAN else a) for a in arrays]
        for s, arrays in _fresh_state(name, options, params, rounding).items()
    }
    step_options = {k: v for k, v in options.items() if k in SPECS[name].step_options}
    for step, gs in enumerate(grads, start=1):
        quiet(functional.multi_tensor_step, name, device,
              [_to_device(g.view(np.uint16)) for g in gs], state, step=step, backend="cuda",
              state_dtype="int8", rounding=rounding, seed=3, **step_options)  # fmt: skip
    for i, (d, w) in enumerate(zip(device, want_params)):
        assert_same_bits(d.copy_to_host(), w.view(np.uint16), f"params[{i}]")
    for s, arrays in want_state.items():
        for i, w in enumerate(arrays):
            got = _to_host(state[s][i])
            _assert_same(got, w.view(np.uint16) if s == KAHAN else w, f"{s}[{i}]")
    assert isinstance(want_state[next(iter(want_state))][0], Quantized)
    moved = want_params[0].view(np.uint16) != params[0].view(np.uint16)
    assert moved.mean() > 0.1  # the steps moved the parameters: the comparison means something


@pytest.mark.parametrize("change", ["scales on the host", "scales dtype", "float32 grad"])
@runs_kernels
def test_a_bad_call_after_good_bf16_int8_steps_writes_nothing(change):
    """After a good step of bfloat16 parameters with int8 state, a call whose last parameter
    brings a bad array is refused (before any kernel runs), and the next good step gives the
    bits of a twin that never saw the bad call."""
    from test_bf16_int8 import _fresh_state, _problem

    params, grads = _problem(6, shapes=((SIZES[0],), (SIZES[0],)), steps=2)
    twins = []
    for _ in range(2):
        device = [_to_device(p.view(np.uint16)) for p in params]
        fresh = _fresh_state("adam", {}, params, "stochastic")
        state = {s: [_to_device(a) for a in arrays] for s, arrays in fresh.items()}
        twins.append((device, state))

    def step(twin, gs, step):
        device, state = twin
        quiet(functional.multi_tensor_step, "adam", device, gs, state, step=step,
              state_dtype="int8", seed=1)  # fmt: skip

    def host(twin):
        device, state = twin
        return [d.copy_to_host() for d in device] + [
            x for arrays in state.values() for a in arrays for x in _to_host(a)
        ]

    first = [_to_device(g.view(np.uint16)) for g in grads[0]]
    for twin in twins:
        step(twin, first, 1)
    before = host(twins[1])
    bad_state = twins[1][1]
    good_exp_avg = bad_state["exp_avg"][-1]
    bad_grads = list(first)
    if change == "scales on the host":
        bad_state["exp_avg"][-1] = Quantized(good_exp_avg.codes, _to_host(good_exp_avg).scales)
    elif change == "scales dtype":
        wide = _cuda().to_device(_to_host(good_exp_avg).scales.astype(np.float64))
        bad_state["exp_avg"][-1] = Quantized(good_exp_avg.codes, wide)
    else:
        bad_grads[-1] = _to_device(grads[1][-1].astype(np.float32))
    with pytest.raises((TypeError, ValueError), match=r"params\[1\]|exp_avg of params\[1\]"):
        step(twins[1], bad_grads, 2)
    bad_state["exp_avg"][-1] = good_exp_avg
    for a, b in zip(host(twins[1]), before):
        assert_same_bits(a, b, "written by the refused call")
    second = [_to_device(g.view(np.uint16)) for g in grads[1]]
    for twin in twins:
        step(twin, second, 2)
    for a, b in zip(host(twins[1]), host(twins[0])):
        assert_same_bits(a, b, "after the refusal")


# -- the cpu and numpy backends take plain (codes, scales) tuples too --------------------------


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_plain_tuples_step_as_quantized_pairs(backend):
    """A ``(codes, scales)`` tuple passes the pair checks, so it must be stepped as a pair (the
    cpu kernel once wrote its codes into the parameter)."""
    params, grads, state = _problem("adam", seed=5, steps=1)
    want_params = [p.copy() for p in params]
    want_state = {s: [_copy(a) for a in v] for s, v in state.items()}
    functional.multi_tensor_step("adam", want_params, grads[0], want_state, step=1,
                                 backend=backend, state_dtype="int8")  # fmt: skip
    plain = {s: [tuple(a) if isinstance(a, tuple) else a for a in v] for s, v in state.items()}
    functional.multi_tensor_step("adam", params, grads[0], plain, step=1, backend=backend,
                                 state_dtype="int8")  # fmt: skip
    for i, (p, w) in enumerate(zip(params, want_params)):
        assert_same_bits(p, w, f"params[{i}]")
    for s, arrays in want_state.items():
        for i, w in enumerate(arrays):
            _assert_same(state[s][i], w, f"{s}[{i}]")  # the tuples' arrays, stepped
