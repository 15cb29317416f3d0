"""bfloat16 parameters (``ml_dtypes.bfloat16``) with ``rounding=`` and ``seed=`` (issue 18).

The reference every path must match bit for bit, :func:`reference_steps`, built from the NumPy
oracles only: for each parameter and step, widen the bfloat16 parameter and gradient to
float32 exactly (:func:`fastrms.lowprecision.bf16_to_float32`), and the state too where it is
held as bfloat16; run the reference rule of :mod:`fastrms.reference` on them with the step's
scalars cast to float32; round bfloat16 state to nearest even; and store the parameter:

- ``"nearest"``: :func:`~fastrms.lowprecision.round_nearest`;
- ``"stochastic"``: :func:`~fastrms.lowprecision.round_stochastic` with the key
  ``step_key(seed, step, stream)`` and element ``j``'s index ``j`` in its array, where
  ``stream`` is the parameter's position in the list (or the one-array functions' ``stream=``);
- ``"kahan"``: :func:`~fastrms.lowprecision.kahan_add` of the increment ``new - old``
  (float32) to the parameter and its bfloat16 compensation.

The kernels compute each element in float32 from the loaded values and store the rounded
results, so they agree with it exactly. Compiling a kernel per (rule, options, storages) is
what costs time here: the CPU kernels run on each optimizer's ``FULL_STATE`` options (and
Adam's under every rounding and state dtype), the numpy backend on every option combination.
"""

from __future__ import annotations

import re

import ml_dtypes
import numba
import numpy as np
import pytest
from conftest import (
    FULL_STATE,
    OPTION_GRIDS,
    Snapshot,
    assert_same_bits,
    npz_round_trip,
    options_id,
    patterns,
)
from numba import njit, types

import fastrms
from fastrms import functional, lowprecision, precision, reference
from fastrms.grouped import StepPlan
from fastrms.kernels import elementwise, rules
from fastrms.specs import SPECS

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
SIZES = (1, 7, 1000, 5000)
STEPS = 3
ROUNDINGS = precision.ROUNDINGS
KAHAN = precision.KAHAN_COMP


def _problem(seed: int = 0, sizes=SIZES, steps=STEPS):
    """bfloat16 parameters and ``steps`` bfloat16 gradients per parameter (random, nonzero)."""
    rng = np.random.default_rng(seed)

    def bf(n):
        return (rng.standard_normal(n) + 0.01).astype(BF16)

    return [bf(n) for n in sizes], [[bf(n) for n in sizes] for _ in range(steps)]


def _initial(name: str, slot: str, n: int, options: dict, state_dtype) -> np.ndarray:
    option = SPECS[name].initial.get(slot)
    value = 0.0 if option is None else options.get(option, SPECS[name].defaults[option])
    full = np.full(n, value, np.float32)
    return lowprecision.round_nearest(full).view(BF16) if state_dtype == "bfloat16" else full


def _fresh_state(name, options, params, state_dtype=None, rounding=None) -> dict:
    used = SPECS[name].setup(1, **options).state
    state = {s: [_initial(name, s, p.size, options, state_dtype) for p in params] for s in used}
    if rounding == "kahan":
        state[KAHAN] = [np.zeros(p.size, BF16) for p in params]
    return state


def reference_steps(name, options, params, grads, rounding="stochastic", seed=0,
                    state_dtype=None, streams=None, first_step=1):  # fmt: skip
    """Parameters (bfloat16) and state after ``len(grads)`` steps, by the NumPy reference on
    widened values (see the module docstring)."""
    spec = SPECS[name]
    slots = spec.layout.slots
    params = [p.copy() for p in params]
    state = _fresh_state(name, options, params, state_dtype, rounding)
    streams = range(len(params)) if streams is None else streams
    for step, step_grads in enumerate(grads, start=first_step):
        setup = spec.setup(step, **options)
        hyper = precision.cast(setup.rule, setup.scalars, F32)
        for i, (p, g) in enumerate(zip(params, step_grads)):
            p32 = lowprecision.bf16_to_float32(p)
            before = p32.copy()
            wide = {
                s: lowprecision.bf16_to_float32(state[s][i]) if state_dtype else state[s][i]
                for s in setup.state
            }
            arrays = (p32, lowprecision.bf16_to_float32(g), *[wide.get(s, p32) for s in slots])
            with np.errstate(all="ignore"):
                reference.RULES[setup.rule](arrays, hyper, setup.flags)
            if state_dtype:
                for s in setup.state:
                    state[s][i] = lowprecision.round_nearest(wide[s]).view(BF16)
            if rounding == "nearest":
                p[...] = lowprecision.round_nearest(p32).view(BF16)
            elif rounding == "stochastic":
                key = lowprecision.step_key(seed, step, streams[i])
                p[...] = lowprecision.round_stochastic(p32, key, 0).view(BF16)
            else:
                with np.errstate(all="ignore"):
                    new, comp = lowprecision.kahan_add(p, state[KAHAN][i], p32 - before)
                p[...], state[KAHAN][i] = new.view(BF16), comp.view(BF16)
    return params, state


def _check(what, params, state, want_params, want_state) -> None:
    for i, (p, w) in enumerate(zip(params, want_params)):
        assert p.dtype == BF16
        assert_same_bits(patterns(p), patterns(w), f"{what} params[{i}]")
    for s, arrays in want_state.items():
        for i, w in enumerate(arrays):
            assert_same_bits(patterns(state[s][i]), patterns(w), f"{what} {s}[{i}]")


def _step_options(name: str, options: dict) -> dict:
    return {k: v for k, v in options.items() if k in SPECS[name].step_options}


# -- the CPU kernels, through the grouped step -------------------------------------------------


def _kernel_cases() -> list:
    cases = [(name, FULL_STATE[name], "stochastic", None, "serial") for name in SPECS]
    cases += [("adam", {}, r, None, "serial") for r in ("nearest", "kahan")]
    cases += [("adam", {}, r, "bfloat16", "serial") for r in ROUNDINGS]
    cases += [("adam", {}, "stochastic", None, "parallel"), ("adam", {}, "kahan", None, "parallel")]
    return [
        pytest.param(*c, id=f"{c[0]}-{options_id(c[1])}-{c[2]}-{c[3] or 'f32'}-{c[4]}")
        for c in cases
    ]


@pytest.mark.parametrize(("name", "options", "rounding", "state_dtype", "route"), _kernel_cases())
def test_grouped_cpu_kernels_match_the_reference(name, options, rounding, state_dtype, route):
    params, grads = _problem(1)
    want_params, want_state = reference_steps(name, options, params, grads, rounding, 7,
                                              state_dtype)  # fmt: skip
    state = _fresh_state(name, options, params, state_dtype, rounding)
    setup = SPECS[name].setup(1, **options)
    names = [f"params[{i}]" for i in range(len(params))]
    threshold = 1 << 62 if route == "serial" else 0
    plan = StepPlan(setup, params, state, names, "cpu", parallel_threshold=threshold, team=None,
                    state_dtype=state_dtype, rounding=rounding, seed=7)  # fmt: skip
    for step in range(1, STEPS + 1):
        plan.run(grads[step - 1], SPECS[name].setup(step, **options), step)
    _check(name, params, state, want_params, want_state)


# -- the numpy backend, every option combination -------------------------------------------------

_GRID = [
    pytest.param(name, options, id=f"{name}-{options_id(options)}")
    for name, grid in OPTION_GRIDS.items()
    for options in grid
]


@pytest.mark.parametrize(("name", "options"), _GRID)
def test_numpy_backend_matches_the_reference_on_every_option(name, options):
    params, grads = _problem(2, sizes=(3, 50))
    for rounding in ROUNDINGS:
        ps = [p.copy() for p in params]
        want_params, want_state = reference_steps(name, options, ps, grads, rounding, 5)
        state = _fresh_state(name, options, ps, None, rounding)
        for step in range(1, STEPS + 1):
            with np.errstate(all="ignore"):
                functional.multi_tensor_step(name, ps, grads[step - 1], state, step=step,
                                             backend="numpy", rounding=rounding, seed=5,
                                             **_step_options(name, options))  # fmt: skip
        _check(f"{name} {rounding}", ps, state, want_params, want_state)


# -- the other frontends -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_multi_tensor_step_matches_the_reference(rounding, backend):
    params, grads = _problem(3)
    want_params, want_state = reference_steps("adam", {}, params, grads, rounding, 11)
    state = _fresh_state("adam", {}, params, None, rounding)
    for step in range(1, STEPS + 1):
        functional.multi_tensor_step("adam", params, grads[step - 1], state, step=step,
                                     backend=backend, rounding=rounding, seed=11)  # fmt: skip
    _check(f"adam {rounding}", params, state, want_params, want_state)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_one_array_functions_match_the_reference(rounding):
    params, grads = _problem(4, sizes=(5000,))
    stream = 3
    want_params, want_state = reference_steps("adam", {}, params, grads, rounding, 2, None,
                                              streams=[stream])  # fmt: skip
    state = _fresh_state("adam", {}, params, None, rounding)
    extra = {KAHAN: state[KAHAN][0]} if rounding == "kahan" else {}
    for step in range(1, STEPS + 1):
        functional.adam(params[0], grads[step - 1][0], state["exp_avg"][0],
                        state["exp_avg_sq"][0], step=step, rounding=rounding, seed=2,
                        stream=stream, **extra)  # fmt: skip
    _check(f"adam {rounding}", params, state, want_params, want_state)


def test_rules_without_a_step_count_take_step_for_stochastic_rounding():
    params, grads = _problem(5, sizes=(300,))
    want_params, want_state = reference_steps("rmsprop", {}, params, grads, "stochastic", 0)
    state = _fresh_state("rmsprop", {}, params)
    for step in range(1, STEPS + 1):
        functional.rmsprop(params[0], grads[step - 1][0], state["square_avg"][0], step=step)
    _check("rmsprop", params, state, want_params, want_state)
    with pytest.raises(TypeError, match="needs step="):
        functional.lion(params[0], grads[0][0], np.zeros(300, np.float32))


@pytest.mark.parametrize(("rounding", "state_dtype"), [*((r, None) for r in ROUNDINGS),
                                                        ("stochastic", "bfloat16")])  # fmt: skip
def test_optimizer_classes_match_the_reference(rounding, state_dtype):
    params, grads = _problem(6)
    want_params, want_state = reference_steps("adamw", {}, params, grads, rounding, 9,
                                              state_dtype)  # fmt: skip
    opt = fastrms.AdamW([p.copy() for p in params], rounding=rounding, seed=9,
                        state_dtype=state_dtype)  # fmt: skip
    for g in grads:
        opt.step(g)
    _check(f"AdamW {rounding}", opt._params, opt.state, want_params, want_state)
    held = BF16 if state_dtype else F32
    assert all(a.dtype == held for a in opt.state["exp_avg"] + opt.state["exp_avg_sq"])
    assert (KAHAN in opt.state) == (rounding == "kahan")


def test_classes_count_steps_for_rules_that_count_none():
    """Lion's scalars do not depend on the step, but its random bits do: the class passes its
    step count, so two steps from the same values round differently."""
    params, grads = _problem(7, sizes=(4000,), steps=2)
    want_params, _ = reference_steps("lion", {}, params, grads, "stochastic", 0)
    opt = fastrms.Lion([params[0].copy()])
    for g in grads:
        opt.step(g)
    assert opt.step_count == 2
    assert_same_bits(patterns(opt._params[0]), patterns(want_params[0]), "Lion")


# -- what stochastic rounding promises ----------------------------------------------------------

ULP = 2.0**-7  # of a bfloat16 in [1, 2)


def _sgd_plan(p: np.ndarray, rounding: str, seed: int = 0, threshold: int = 1 << 62):
    state = {KAHAN: [np.zeros_like(p)]} if rounding == "kahan" else {}
    setup = SPECS["sgd"].setup(1, lr=1.0)
    return StepPlan(setup, [p], state, ["params[0]"], "cpu", parallel_threshold=threshold,
                    team=None, rounding=rounding, seed=seed), setup  # fmt: skip


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.9])
def test_stochastic_rounding_is_unbiased(fraction):
    """x = 1 + fraction ulp, rounded stochastically in one step over n elements, and for one
    element over many steps: the mean lies within 5 binomial standard deviations of x.

    Each element rounds up with probability ``fraction`` if its 16 random bits are uniform;
    with independent draws the count of ups is binomial, so the mean's standard deviation is
    ``ulp * sqrt(f (1 - f) / n)``, and 5 of them are exceeded with probability < 1e-6. (Within
    a step the draws form a Weyl-like sequence, more even than independent ones; over steps
    the keys come from SplitMix64.)
    """
    n = 1 << 16
    p = np.ones(n, BF16)
    grad = np.full(n, -fraction * ULP, np.float32).astype(BF16)
    x = 1.0 - float(lowprecision.bf16_to_float32(grad)[0])  # p - grad, exact in float32
    f = (x - 1.0) / ULP
    bound = 5 * ULP * np.sqrt(f * (1 - f) / n)
    plan, setup = _sgd_plan(p, "stochastic", seed=1)
    plan.run([grad], setup, 1)
    values = lowprecision.bf16_to_float32(p).astype(np.float64)
    assert set(np.unique(values)) <= {1.0, 1.0 + ULP}
    assert abs(values.mean() - x) < bound, (values.mean(), x, bound)
    # One element over many steps (each step a new key), reset before each step.
    m, steps = 16, 4096
    q = np.ones(m, BF16)
    plan, setup = _sgd_plan(q, "stochastic", seed=2)
    ups = np.zeros(m)
    for step in range(1, steps + 1):
        q[...] = 1.0
        plan.run([grad[:m]], setup, step)
        ups += lowprecision.bf16_to_float32(q) > 1.0
    sd = np.sqrt(f * (1 - f) / steps)
    assert np.all(np.abs(ups / steps - f) < 5 * sd), (ups / steps, f)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_increments_below_half_an_ulp(rounding):
    """Adding a quarter ulp 40 times: nearest never moves, stochastic moves by 10 ulp on
    average (binomial bound as above, 1000 elements), Kahan ends within one ulp of 10."""
    n, steps = 1000, 40
    p = np.ones(n, BF16)
    grad = np.full(n, -0.25 * ULP, BF16)
    plan, setup = _sgd_plan(p, rounding)
    for step in range(1, steps + 1):
        plan.run([grad], setup, step)
    moved = (lowprecision.bf16_to_float32(p).astype(np.float64) - 1.0) / ULP
    if rounding == "nearest":
        assert np.all(moved == 0)
    elif rounding == "stochastic":
        # each step adds a Bernoulli(1/4) ulp: variance 40 * 3/16 = 7.5 ulp^2 per element
        assert abs(moved.mean() - 10) < 5 * np.sqrt(7.5 / n), moved.mean()
        assert moved.min() > 0
    else:
        assert np.all(np.abs(moved - 10) <= 1), np.unique(moved)


def test_same_seed_same_bits_other_seed_other_bits():
    params, grads = _problem(8, sizes=(4096,), steps=2)
    results = []
    for seed in (0, 0, 1):
        opt = fastrms.Adam([params[0].copy()], seed=seed)
        for g in grads:
            opt.step(g)
        results.append(patterns(opt._params[0]).copy())
    assert np.array_equal(results[0], results[1])
    assert not np.array_equal(results[0], results[2])
    # Many elements round the other way under another seed, but not all.
    assert 0.05 < (results[0] != results[2]).mean() < 0.95


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_one_and_two_threads_give_the_same_bits(rounding):
    params, grads = _problem(9, sizes=(7, 30_000, 50_001))
    results = []
    before = numba.get_num_threads()
    try:
        for threads in (1, 2, 1):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            ps = [p.copy() for p in params]
            state = _fresh_state("adam", {}, ps, None, rounding)
            setup = SPECS["adam"].setup(1)
            plan = StepPlan(setup, ps, state, ["a", "b", "c"], "cpu", parallel_threshold=0,
                            team=None, rounding=rounding)  # fmt: skip
            for step in range(1, STEPS + 1):
                plan.run(grads[step - 1], SPECS["adam"].setup(step), step)
            results.append([patterns(p).copy() for p in ps])
    finally:
        numba.set_num_threads(before)
    want, _ = reference_steps("adam", {}, params, grads, rounding)
    for got in results:
        for g, w in zip(got, want):
            assert_same_bits(g, patterns(w))


def test_grouping_does_not_change_the_bits():
    """One grouped step over 3 tensors equals 3 one-array steps with the same streams."""
    params, grads = _problem(10, sizes=(100, 3000, 7))
    grouped = [p.copy() for p in params]
    single = [p.copy() for p in params]
    gs = _fresh_state("adam", {}, grouped)
    ss = _fresh_state("adam", {}, single)
    for step in range(1, STEPS + 1):
        functional.multi_tensor_step("adam", grouped, grads[step - 1], gs, step=step, seed=4)
        for i in range(3):
            functional.adam(single[i], grads[step - 1][i], ss["exp_avg"][i],
                            ss["exp_avg_sq"][i], step=step, seed=4, stream=i)  # fmt: skip
    for a, b in zip(grouped, single):
        assert_same_bits(patterns(a), patterns(b))


def test_step_keys_is_step_key_for_many_streams():
    streams = np.array([0, 1, 2, 77, 2**40, 2**63 - 1, -1], np.int64)
    for seed, step in [(0, 1), (5, 2**40), (2**64 - 1, 3), (-7, 0)]:
        want = [lowprecision.step_key(seed, step, int(s)) for s in streams]
        assert lowprecision.step_keys(seed, step, streams).tolist() == want


def test_bf16_and_float32_parameters_in_one_optimizer():
    """Each parameter keeps its own policy: the float32 one steps as it would alone, the
    bfloat16 one as the reference with its position (1) as its stream."""
    rng = np.random.default_rng(12)
    p32 = rng.standard_normal(300).astype(np.float32)
    params, grads = _problem(12, sizes=(500,))
    g32 = [rng.standard_normal(300).astype(np.float32) for _ in range(STEPS)]
    opt = fastrms.Adam([p32.copy(), params[0].copy()], rounding="kahan", seed=1)
    alone = fastrms.Adam([p32.copy()])
    for step in range(STEPS):
        opt.step([g32[step], grads[step][0]])
        alone.step([g32[step]])
    assert_same_bits(opt._params[0], alone._params[0])
    want, want_state = reference_steps("adam", {}, params, grads, "kahan", 1, streams=[1])
    assert_same_bits(patterns(opt._params[1]), patterns(want[0]))
    assert opt.state[KAHAN][0] is None
    assert_same_bits(patterns(opt.state[KAHAN][1]), patterns(want_state[KAHAN][0]))


# -- state dicts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_state_dict_round_trips_with_the_kahan_buffer_and_step(rounding):
    params, grads = _problem(11, sizes=(5, 3000), steps=4)
    opt = fastrms.Adam([p.copy() for p in params], rounding=rounding, seed=3)
    for g in grads[:2]:
        opt.step(g)
    sd = npz_round_trip(opt.state_dict())
    assert int(sd["step"]) == 2
    assert (f"state.{KAHAN}.1" in sd) == (rounding == "kahan")
    if rounding == "kahan":
        assert np.any(patterns(opt.state[KAHAN][1]) != 0)  # it holds something to restore
    other = fastrms.Adam([p.copy() for p in opt._params], rounding=rounding, seed=3)
    other.load_state_dict(sd)
    assert other.step_count == 2
    for g in grads[2:]:
        opt.step(g)
        other.step(g)
    for a, b in zip(opt._params, other._params):
        assert_same_bits(patterns(a), patterns(b))
    for s in opt.state:
        for a, b in zip(opt.state[s], other.state[s]):
            assert_same_bits(patterns(a), patterns(b), s)


# -- refusals: nothing written ----------------------------------------------------------------


def _arrays(n=10):
    p = np.ones(n, BF16)
    return p, np.ones(n, BF16), np.zeros(n, np.float32), np.zeros(n, np.float32)


def _refusals():
    p, g, m, v = _arrays()
    f = np.ones(10, np.float32)
    k = np.zeros(10, BF16)
    yield "float16 params", TypeError, "float16", lambda: fastrms.Adam([np.ones(3, np.float16)])
    yield "int params", TypeError, "int32", lambda: functional.adam(
        np.ones(10, np.int32), g, m, v, step=1)  # fmt: skip
    yield "uint16 params", TypeError, "uint16", lambda: functional.multi_tensor_step(
        "adam", [p.view(np.uint16)], [g], {"exp_avg": [m], "exp_avg_sq": [v]})  # fmt: skip
    yield "unknown rounding", ValueError, "rounding must be", lambda: functional.adam(
        p, g, m, v, step=1, rounding="up")  # fmt: skip
    yield "rounding on float32", ValueError, "bfloat16 parameters only", lambda: functional.adam(
        f, f.copy(), m, v, step=1, rounding="nearest")  # fmt: skip
    yield "seed on float32", ValueError, "seed=", lambda: fastrms.Adam([f], seed=1)
    yield "seed not an int", TypeError, "seed must be an int", lambda: functional.adam(
        p, g, m, v, step=1, seed=1.5)  # fmt: skip
    yield "bf16 on cuda", TypeError, "cuda", lambda: functional.adam(
        p, g, m, v, step=1, backend="cuda")  # fmt: skip
    yield "bf16 grads, f32 params", TypeError, "grad has dtype bfloat16", lambda: functional.adam(
        f, g, m, v, step=1)  # fmt: skip
    yield "f32 grads, bf16 params", TypeError, "grad has dtype float32", lambda: functional.adam(
        p, f, m, v, step=1)  # fmt: skip
    yield "f32 grads, bf16 class", TypeError, r"grads\[0\] has dtype float32", lambda: (
        fastrms.Adam([p]).step([f]))  # fmt: skip
    yield "float64 state", ValueError, "state_dtype='float64'", lambda: functional.adam(
        p, g, m, v, step=1, state_dtype="float64")  # fmt: skip
    yield "bf16 state, not asked", TypeError, "exp_avg", lambda: functional.adam(
        p, g, k, v, step=1)  # fmt: skip
    yield "kahan without buffer", ValueError, "kahan_comp", lambda: functional.adam(
        p, g, m, v, step=1, rounding="kahan")  # fmt: skip
    yield "kahan buffer float32", TypeError, "kahan_comp", lambda: functional.adam(
        p, g, m, v, step=1, rounding="kahan", kahan_comp=f)  # fmt: skip
    yield "stochastic without step", TypeError, "needs step=", lambda: functional.rmsprop(
        p, g, m)  # fmt: skip
    yield "stream on float32", ValueError, "stream=", lambda: functional.adam(
        f, f.copy(), m, v, step=1, stream=2)  # fmt: skip


_REFUSALS = list(_refusals())


@pytest.mark.parametrize("index", range(len(_REFUSALS)), ids=[r[0] for r in _REFUSALS])
def test_bad_input_is_refused_and_nothing_is_written(index):
    _, error, match, call = _REFUSALS[index]
    # The arrays the calls close over, as made by _refusals (the same objects).
    cells = [c.cell_contents for c in (call.__closure__ or ())]
    arrays = {f"a{i}": a for i, a in enumerate(cells) if isinstance(a, np.ndarray)}
    snap = Snapshot(arrays)
    with pytest.raises(error, match=match):
        call()
    snap.assert_unchanged()


# -- the loop still vectorizes ----------------------------------------------------------------


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_the_bf16_param_loop_is_float32_and_vectorized(rounding):
    b = precision.STORAGES["bfloat16"]
    sig = precision.signature("adam", BF16, (b, b, b), rounding=rounding)
    serial = elementwise.grouped_loops(rules.adam, (False,), sig)[1]
    fresh = njit(cache=False, error_model="numpy")(serial.py_func)
    table = types.Array(types.int64, 2, "C")
    signature = (table, types.Array(types.int64, 1, "C"), table, types.Array(types.float32, 1, "C"))
    fresh.compile(signature)
    llvm = fresh.inspect_llvm(signature)
    assert re.search(r"<\d+ x float>", llvm), "the bf16 param loop was not vectorized"
    assert re.search(r"store <\d+ x i16>", llvm), "the bf16 param was not stored as vectors"
    assert not re.search(r"\bfpext\b|llvm\.sqrt\.f64", llvm)
