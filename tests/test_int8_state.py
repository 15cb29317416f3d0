"""Optimizer state held blockwise in 8 bits (``state_dtype="int8"``, float32 parameters).

Each state array of a parameter of at least ``MIN_8BIT_SIZE`` elements is a
:class:`fastrms.lowprecision.Quantized` pair: ``uint8`` codes into a float8 map (signed for
first moments, unsigned for second moments, as each layout's Slot declares) and one float32
scale (absmax) per block of 256 elements. Smaller parameters keep float32 state.

The reference every path must match bit for bit, :func:`reference_steps`: per parameter and
step, dequantize each state array (:func:`fastrms.lowprecision.dequantize_blockwise`), run the
NumPy reference rule of :mod:`fastrms.reference` on the float32 parameter, gradient and
dequantized state with the step's scalars cast to float32, then quantize the new state
(:func:`fastrms.lowprecision.quantize_blockwise`). The kernels decode a block into float32,
run the rule on it, and quantize it from the same float32 values, so the two agree exactly.

The map itself is checked against its definition independently of the encoder's formula: the
code chosen is the nearest of the 256 values (a brute-force search), so the error is within
half a code gap times the block's absmax.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from conftest import FULL_STATE, OPTION_GRIDS, assert_same_bits, npz_round_trip, options_id, randn
from numba import njit

import fastrms
from fastrms import functional, lowprecision, precision, reference
from fastrms.grouped import StepPlan
from fastrms.kernels import blockwise, rules
from fastrms.lowprecision import BLOCK, MIN_8BIT_SIZE, Quantized
from fastrms.specs import SPECS

#: A ragged parameter (not a multiple of 256), one of exactly MIN_8BIT_SIZE, one under it
#: (float32 state), and one large enough to be cut into several parts on two threads.
SIZES = (5000, MIN_8BIT_SIZE, 1000, 70_000)
STEPS = 3
SEVERAL = [{}, *[o for o in OPTION_GRIDS["adam"] if o]]  # Adam: every option combination


def _cases() -> list:
    cases = []
    for name in SPECS:
        chosen = SEVERAL if name == "adam" else [{}, FULL_STATE[name]]
        for options in chosen:
            for route in ("serial", "parallel"):
                cases.append(pytest.param(name, options, route,
                                          id=f"{name}-{options_id(options)}-{route}"))  # fmt: skip
    return cases


CASES = _cases()
FULL = [pytest.param(n, o, id=f"{n}-{options_id(o)}") for n, o in FULL_STATE.items()]


def _signed(name: str, slot: str) -> bool:
    layout = SPECS[name].layout
    return layout.slot_specs[layout.slots.index(slot)].sign == "signed"


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = [randn(rng, n, np.float32) for n in SIZES]
    grads = [[randn(rng, n, np.float32) for n in SIZES] for _ in range(STEPS)]
    return params, grads


def _initial(name: str, slot: str, n: int, options: dict):
    """The state's initial value, held as ``state_dtype="int8"`` holds it."""
    option = SPECS[name].initial.get(slot)
    value = 0.0 if option is None else options.get(option, SPECS[name].defaults[option])
    full = np.full(n, value, np.float32)
    return Quantized.of(full, _signed(name, slot)) if n >= MIN_8BIT_SIZE else full


def _copy(a):
    return Quantized(a.codes.copy(), a.scales.copy()) if isinstance(a, tuple) else a.copy()


def reference_steps(name: str, options: dict, params: list, grads: list) -> tuple[list, dict]:
    """The parameters and state after ``len(grads)`` steps by the NumPy reference on the
    dequantized state, quantized again after each step (see the module docstring)."""
    spec = SPECS[name]
    slots = spec.layout.slots
    params = [p.copy() for p in params]
    used = spec.setup(1, **options).state
    state = {s: [_initial(name, s, p.size, options) for p in params] for s in used}
    for step, step_grads in enumerate(grads, start=1):
        setup = spec.setup(step, **options)
        hyper = precision.cast(setup.rule, setup.scalars, np.dtype(np.float32))
        for i, (p, g) in enumerate(zip(params, step_grads)):
            wide = {}
            for s in used:
                a = state[s][i]
                if isinstance(a, tuple):
                    codes, scales = a
                    wide[s] = lowprecision.dequantize_blockwise(
                        codes, scales, _signed(name, s), map="float8"
                    )
                else:
                    wide[s] = a.copy()
            reference.RULES[setup.rule]((p, g, *[wide.get(s, p) for s in slots]), hyper,
                                        setup.flags)  # fmt: skip
            for s in used:
                if isinstance(state[s][i], tuple):
                    codes, scales = lowprecision.quantize_blockwise(
                        wide[s], _signed(name, s), map="float8"
                    )
                    state[s][i] = Quantized(codes, scales)
                else:
                    state[s][i] = wide[s]
    return params, state


def _check(name, params, state, want_params, want_state) -> None:
    for i, (p, w) in enumerate(zip(params, want_params)):
        assert_same_bits(p, w, f"{name} params[{i}]")
    for s, arrays in want_state.items():
        for i, w in enumerate(arrays):
            got = state[s][i]
            if isinstance(w, tuple):
                assert isinstance(got, tuple), f"{name} {s}[{i}] is not quantized"
                assert_same_bits(got[0].ravel(), w.codes, f"{name} {s}[{i}] codes")
                assert_same_bits(got[1], w.scales, f"{name} {s}[{i}] scales")
            else:
                assert_same_bits(got, w, f"{name} {s}[{i}]")


# -- the map and the reference quantizer ----------------------------------------------------


def _special_values(signed: bool) -> np.ndarray:
    """Random magnitudes over 40 binades, every map value, the midpoints between neighbours
    and the floats either side of them, 0 and -0."""
    rng = np.random.default_rng(3)
    y = rng.standard_normal(20_000) * np.exp2(rng.uniform(-40, 0, 20_000))
    m = lowprecision.float8_magnitudes(signed).astype(np.float64)
    mids = ((m[1:] + m[:-1]) / 2).astype(np.float32)
    y = np.concatenate([np.clip(y, -1, 1), m, mids, np.nextafter(mids, 0), np.nextafter(mids, 1),
                        [0.0, -0.0]]).astype(np.float32)  # fmt: skip
    return np.concatenate([y, -y]).astype(np.float32) if signed else np.abs(y)


@pytest.mark.parametrize("signed", [True, False])
def test_the_encoder_picks_the_nearest_code(signed):
    y = _special_values(signed)
    table = lowprecision.float8_table(signed)
    fmap = lowprecision.float8_map(signed)
    valid = np.nonzero((np.arange(256) & (0x7F if signed else 0xFF)) <= fmap.qmax)[0]
    codes = lowprecision.float8_encode(y, signed)
    assert np.isin(codes, valid).all(), "a code past 1.0 was written"
    err = np.abs(table[codes].astype(np.float64) - y)
    best = np.min(np.abs(table[valid][None, :].astype(np.float64) - y[:, None]), axis=1)
    assert (err <= best).all(), y[err > best][:5]
    assert table[fmap.qmax] == 1 and table[0] == 0


@pytest.mark.parametrize("signed", [True, False])
def test_the_kernels_codecs_give_the_references_bits(signed):
    encode = blockwise.encode_signed if signed else blockwise.encode_unsigned
    decode = blockwise.decode_signed if signed else blockwise.decode_unsigned

    @njit
    def run(y, codes, values, scale):
        for i in range(y.size):
            codes[i] = encode(y[i])
        for i in range(y.size):
            values[i] = decode(codes[i], scale)

    y = _special_values(signed)
    codes, values = np.empty(y.size, np.uint8), np.empty(y.size, np.float32)
    scale = np.float32(3.5)
    run(y, codes, values, scale)
    assert_same_bits(codes, lowprecision.float8_encode(y, signed))
    assert_same_bits(values, lowprecision.float8_decode(codes, signed) * scale)


@pytest.mark.parametrize("signed", [True, False])
def test_quantization_error_is_within_half_a_code_gap_of_each_block(signed):
    rng = np.random.default_rng(4)
    n = 10 * BLOCK + 37  # a ragged last block
    x = (rng.standard_normal(n) * np.exp2(rng.uniform(-20, 4, n))).astype(np.float32)
    x = x if signed else np.abs(x)
    codes, scales = lowprecision.quantize_blockwise(x, signed, map="float8")
    assert scales.size == 11 and codes.size == n
    back = lowprecision.dequantize_blockwise(codes, scales, signed, map="float8")
    mags = lowprecision.float8_magnitudes(signed).astype(np.float64)
    gaps = np.diff(mags)
    for b in range(scales.size):
        block = slice(b * BLOCK, (b + 1) * BLOCK)
        assert scales[b] == np.max(np.abs(x[block]))
        y = np.abs(x[block].astype(np.float64)) / scales[b]
        # half the gap of the cell y lies in (the rounding of x / absmax adds an ulp or so)
        cell = np.clip(np.searchsorted(mags, y) - 1, 0, gaps.size - 1)
        bound = (gaps[cell] / 2 + 2.0**-23) * scales[b]
        assert (np.abs(back[block] - x[block]) <= bound).all(), b


@pytest.mark.parametrize("signed", [True, False])
def test_zeros_nan_and_inf_follow_the_documented_rule(signed):
    x = np.ones(4 * BLOCK, np.float32)
    x[:BLOCK] = 0  # an all-zero block: scale 0, exact zeros
    x[BLOCK + 5] = 0  # a zero in a block: exact
    x[2 * BLOCK + 3] = np.nan  # NaN: the block's scale is NaN, every value NaN
    x[3 * BLOCK + 7] = np.inf  # Inf: the same
    codes, scales = lowprecision.quantize_blockwise(x, signed, map="float8")
    back = lowprecision.dequantize_blockwise(codes, scales, signed, map="float8")
    assert scales[0] == 0 and (codes[:BLOCK] == 0).all()
    assert_same_bits(back[:BLOCK], np.zeros(BLOCK, np.float32))
    assert back[BLOCK + 5] == 0 and (np.delete(back[BLOCK : 2 * BLOCK], 5) == 1).all()
    assert np.isnan(scales[2:]).all() and np.isnan(back[2 * BLOCK :]).all()
    assert (codes[2 * BLOCK :] == 0).all()


def test_the_kernel_applies_the_nan_rule_and_keeps_zero_blocks_exact():
    """A NaN gradient poisons its block's state (scale NaN) and no other block; a block whose
    gradient and state are zero stays exactly zero."""
    n = 3 * BLOCK + 100 + MIN_8BIT_SIZE
    p = np.ones(n, np.float32)
    g = np.ones(n, np.float32)
    g[:BLOCK] = 0
    g[BLOCK + 9] = np.nan
    m, v = Quantized.of(np.zeros(n), True), Quantized.of(np.zeros(n), False)
    functional.adam(p, g, m, v, step=1, state_dtype="int8", backend="cpu")
    assert m.scales[0] == 0 and v.scales[0] == 0 and (m.codes[:BLOCK] == 0).all()
    assert (p[:BLOCK] == 1).all()
    assert np.isnan(m.scales[1]) and np.isnan(v.scales[1]) and np.isnan(p[BLOCK + 9])
    assert np.isfinite(m.scales[2:]).all() and np.isfinite(p[2 * BLOCK :]).all()


def test_slots_declare_their_sign():
    assert _signed("adam", "exp_avg") and not _signed("adam", "exp_avg_sq")
    assert not _signed("adam", "max_exp_avg_sq") and not _signed("adagrad", "state_sum")
    assert _signed("sgd", "momentum_buffer") and _signed("rmsprop", "grad_avg")
    assert not _signed("rmsprop", "square_avg") and not _signed("adadelta", "acc_delta")
    storages = precision.slot_storages("adam", precision.STORAGES["int8"], MIN_8BIT_SIZE)
    assert [s.name for s in storages] == ["int8_signed", "int8_unsigned", "int8_unsigned"]
    assert precision.slot_storages("adam", precision.STORAGES["int8"], MIN_8BIT_SIZE - 1) is None


# -- the kernels, through the grouped step -----------------------------------------------------


@pytest.mark.parametrize(("name", "options", "route"), CASES)
def test_grouped_cpu_kernels_match_the_reference(name, options, route):
    spec = SPECS[name]
    params, grads = _problem()
    want_params, want_state = reference_steps(name, options, params, grads)
    setup = spec.setup(1, **options)
    state = {s: [_initial(name, s, p.size, options) for p in params] for s in setup.state}
    names = [f"params[{i}]" for i in range(len(params))]
    threshold = 1 << 62 if route == "serial" else 0
    plan = StepPlan(setup, params, state, names, "cpu", parallel_threshold=threshold,
                    state_dtype="int8")  # fmt: skip
    assert len(plan.groups) == 2  # the int8 arrays, and the one under MIN_8BIT_SIZE
    for step in range(1, STEPS + 1):
        plan.run(grads[step - 1], spec.setup(step, **options))
    _check(name, params, state, want_params, want_state)


def test_one_and_two_threads_give_the_same_bits():
    params, grads = _problem(seed=5)
    results = []
    for threads in (1, 2):
        ps = [p.copy() for p in params]
        state = {
            s: [_initial("adam", s, p.size, {}) for p in ps] for s in ("exp_avg", "exp_avg_sq")
        }
        previous = numba.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            for step in range(1, STEPS + 1):
                functional.multi_tensor_step("adam", ps, grads[step - 1], state, step=step,
                                             backend="cpu", state_dtype="int8")  # fmt: skip
        finally:
            numba.set_num_threads(previous)
        results.append((ps, state))
    (p1, s1), (p2, s2) = results
    _check("adam", p2, s2, p1, s1)


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize(("name", "options"), FULL)
def test_multi_tensor_step_matches_the_reference(name, options, backend):
    params, grads = _problem(seed=1)
    want_params, want_state = reference_steps(name, options, params, grads)
    used = SPECS[name].setup(1, **options).state
    state = {s: [_initial(name, s, p.size, options) for p in params] for s in used}
    step_options = {k: v for k, v in options.items() if k in SPECS[name].step_options}
    for step in range(1, STEPS + 1):
        functional.multi_tensor_step(name, params, grads[step - 1], state, step=step,
                                     backend=backend, state_dtype="int8",
                                     **step_options)  # fmt: skip
    _check(name, params, state, want_params, want_state)


@pytest.mark.parametrize("name", ["adam", "rmsprop", "sgd"])
def test_one_array_step_functions_take_int8_state(name):
    options = FULL_STATE[name]
    params, grads = _problem(seed=6)
    params, grads = params[:1], [g[:1] for g in grads]
    want_params, want_state = reference_steps(name, options, params, grads)
    spec = SPECS[name]
    state = {s: _initial(name, s, params[0].size, options) for s in spec.setup(1, **options).state}
    step_options = {k: v for k, v in options.items() if k in spec.step_options}
    counted = spec.counts_steps
    for step in range(1, STEPS + 1):
        getattr(functional, name)(params[0], grads[step - 1][0], **state,
                                  **({"step": step} if counted else {}), state_dtype="int8",
                                  **step_options)  # fmt: skip
    _check(name, params, {s: [a] for s, a in state.items()}, want_params, want_state)


# -- the NumPy classes ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), FULL)
def test_optimizer_classes_hold_int8_state_and_match_the_reference(name, options):
    params, grads = _problem(seed=2)
    want_params, want_state = reference_steps(name, options, params, grads)
    opt = fastrms.optim.OPTIMIZERS[name]([p.copy() for p in params], **options,
                                         state_dtype="int8")  # fmt: skip
    for g in grads:
        opt.step(g)
    _check(name, opt._params, opt.state, want_params, want_state)
    expected = 0
    for arrays in opt.state.values():
        for p, a in zip(opt._params, arrays):
            if p.size >= MIN_8BIT_SIZE:
                assert isinstance(a, Quantized) and a.codes.dtype == np.uint8
                expected += p.size + 4 * -(-p.size // BLOCK)
            else:  # small tensors keep float32 state
                assert isinstance(a, np.ndarray) and a.dtype == np.float32
                expected += 4 * p.size
    assert opt._store.nbytes() == expected


def test_adam_int8_state_takes_at_most_2_1_bytes_per_parameter():
    p = np.zeros(1 << 20, np.float32)
    opt = fastrms.Adam([p], state_dtype="int8")
    opt.step([np.ones_like(p)])
    assert opt._store.nbytes() / p.size <= 2.1  # 2 codes + 2 scales per 256


def _stepped(state_dtype, seed=7, name="adam", steps=2):
    params, grads = _problem(seed)
    opt = fastrms.optim.OPTIMIZERS[name]([p.copy() for p in params], state_dtype=state_dtype)
    for g in grads[:steps]:
        opt.step(g)
    return opt, params, grads


def test_int8_state_dict_round_trips_bit_for_bit_and_steps_on_alike():
    opt, params, grads = _stepped("int8")
    sd = npz_round_trip(opt.state_dict())
    assert "state.exp_avg.0:codes" in sd and "state.exp_avg.2" in sd  # the small one: float32
    other = fastrms.Adam([p.copy() for p in opt._params], state_dtype="int8")
    other.load_state_dict(sd)
    _check("adam", other._params, other.state, opt._params, opt.state)
    opt.step(grads[2])
    other.step(grads[2])
    _check("adam", other._params, other.state, opt._params, opt.state)


def test_state_dicts_move_between_float32_and_int8_state():
    opt, params, grads = _stepped("int8")
    exported = opt.state_dict(dequantize=True)
    for s, arrays in opt.state.items():
        for i, a in enumerate(arrays):
            value = exported[f"state.{s}.{i}"]
            assert value.dtype == np.float32 and value.shape == params[i].shape
            if isinstance(a, Quantized):
                assert_same_bits(value, a.dequantize(_signed("adam", s)))
    as_float = fastrms.Adam([p.copy() for p in params])
    as_float.load_state_dict(opt.state_dict())  # int8 entries load dequantized
    for s in opt.state:
        for i, a in enumerate(as_float.state[s]):
            assert_same_bits(a, exported[f"state.{s}.{i}"])
    back = fastrms.Adam([p.copy() for p in params], state_dtype="int8")
    back.load_state_dict(as_float.state_dict())  # float32 loads quantized
    _check("adam", back._params, back.state, as_float._params, opt.state)
    f32, _, _ = _stepped(None)
    quantized = fastrms.Adam([p.copy() for p in params], state_dtype="int8")
    quantized.load_state_dict(f32.state_dict())
    for s in f32.state:
        for i, a in enumerate(quantized.state[s]):
            if isinstance(a, Quantized):
                want = Quantized.of(f32.state[s][i], _signed("adam", s))
                assert_same_bits(a.codes, want.codes) and assert_same_bits(a.scales, want.scales)


def test_adagrad_initial_accumulator_is_quantized_into_int8_state():
    p = np.zeros(MIN_8BIT_SIZE, np.float32)
    opt = fastrms.AdaGrad([p], initial_accumulator_value=0.25, state_dtype="int8")
    opt.step([np.zeros_like(p)])
    state_sum = opt.state["state_sum"][0]
    assert (state_sum.dequantize(False) == 0.25).all()


# -- refusals: nothing is written ------------------------------------------------------------------


def _snapshot(params, state):
    copies = [p.copy() for p in params]
    for arrays in state.values():
        copies += [x.copy() for a in arrays for x in (a if isinstance(a, tuple) else (a,))]
    return copies


def _bad_state(change: str):
    params, grads = _problem(seed=8)
    state = {
        s: [_initial("adam", s, p.size, {}) for p in params] for s in ("exp_avg", "exp_avg_sq")
    }
    m = state["exp_avg"]
    if change == "scales shape":
        m[3] = Quantized(m[3].codes, np.zeros(3, np.float32))
    elif change == "scales dtype":
        m[3] = Quantized(m[3].codes, m[3].scales.astype(np.float64))
    elif change == "codes dtype":
        m[3] = Quantized(m[3].codes.astype(np.int8), m[3].scales)
    elif change == "codes shape":
        m[3] = Quantized(m[3].codes[:-1], m[3].scales)
    elif change == "plain array":
        m[3] = np.zeros(SIZES[3], np.float32)
    elif change == "pair for small":
        m[2] = Quantized.of(np.zeros(SIZES[2]), True)
    elif change == "read-only scales":
        m[3].scales.flags.writeable = False
    return params, grads, state


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ("scales shape", ValueError, r"scales of exp_avg of params\[3\] has shape \(3,\)"),
        ("scales dtype", TypeError, r"scales of exp_avg of params\[3\] has dtype float64"),
        ("codes dtype", TypeError, r"codes of exp_avg of params\[3\] has dtype int8"),
        ("codes shape", ValueError, r"codes of exp_avg of params\[3\] has shape"),
        ("plain array", TypeError, r"exp_avg of params\[3\] must be a .*Quantized"),
        ("pair for small", TypeError, r"exp_avg of params\[2\].*keeps float32 state"),
        ("read-only scales", ValueError, r"scales of exp_avg of params\[3\] is read-only"),
    ],
)
def test_multi_tensor_step_refuses_bad_int8_state_and_writes_nothing(change, error, match):
    params, grads, state = _bad_state(change)
    before = _snapshot(params, state)
    with pytest.raises(error, match=match):
        functional.multi_tensor_step("adam", params, grads[0], state, step=1, backend="cpu",
                                     state_dtype="int8")  # fmt: skip
    for a, b in zip(_snapshot(params, state), before):
        assert_same_bits(a, b)


def test_bad_state_dtype_and_float64_params_are_refused():
    p = np.ones(MIN_8BIT_SIZE, np.float32)
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        fastrms.Adam([p], state_dtype="int4")
    with pytest.raises(ValueError, match=r"state_dtype='int8' needs float32 parameters, but "
                                         r"params\[0\] has dtype float64"):  # fmt: skip
        fastrms.Adam([np.ones(MIN_8BIT_SIZE)], state_dtype="int8")
    m, v = Quantized.of(np.zeros(p.size), True), Quantized.of(np.zeros(p.size), False)
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        functional.adam(p, p.copy(), m, v, step=1, state_dtype="int16")
    assert (p == 1).all()


def test_a_state_dict_pair_of_the_wrong_shape_is_refused():
    opt, params, _ = _stepped("int8")
    sd = opt.state_dict()
    sd["state.exp_avg.0:scales"] = sd["state.exp_avg.0:scales"][:-1]
    other = fastrms.Adam([p.copy() for p in params], state_dtype="int8")
    with pytest.raises(ValueError, match=r"scales of state_dict\['state.exp_avg.0'\] has shape"):
        other.load_state_dict(sd)
    assert other.state == {} and other.step_count == 0


# -- the loops stay vectorized ---------------------------------------------------------------------


def test_the_block_loops_are_float32_and_vectorized():
    s, u = precision.STORAGES["int8_signed"], precision.STORAGES["int8_unsigned"]
    sig = precision.signature("adam", np.dtype(np.float32), (s, u, u))
    piece = blockwise.grouped_block_loops(rules.adam, (False,), sig, (True, True, False))[
        1
    ].py_func.__closure__
    piece = next(c.cell_contents for c in piece if getattr(c.cell_contents, "py_func", None)
                 and c.cell_contents.py_func.__name__ == "piece")  # fmt: skip
    fresh = njit(cache=False, error_model="numpy")(piece.py_func)
    table = np.zeros((1, sig.table_width), np.int64)
    hyper = precision.cast("adam", SPECS["adam"].setup(1).scalars, np.dtype(np.float32))
    fresh(table.ctypes.data + 8, 0, 0, 0, hyper)  # nothing to step
    llvm = next(iter(fresh.inspect_llvm().values()))
    import re

    assert re.search(r"store <\d+ x i8>", llvm), "the codes were not encoded as vectors"
    assert re.search(r"zext <\d+ x i8>", llvm), "the codes were not decoded as vectors"
    assert re.search(r"llvm\.sqrt\.v\d+f32", llvm), "the rule's loop was not vectorized"
    assert not re.search(r"\bfpext\b|llvm\.sqrt\.f64", llvm)
