"""Optimizer state held as bfloat16 (``state_dtype="bfloat16"``, float32 parameters; issue 18).

The reference every path must match bit for bit, :func:`reference_steps`: for each parameter
and step, widen each bfloat16 state array to float32 exactly
(:func:`fastrms.lowprecision.bf16_to_float32`), run the NumPy reference rule of
:mod:`fastrms.reference` on the float32 parameter, gradient and widened state with the step's
scalars cast to float32, then round the new state to bfloat16, to nearest with ties to even
(:func:`fastrms.lowprecision.round_nearest`). The parameter stays float32 throughout. The
kernels compute each element in float32 from the loaded state and store the rounded state,
never reading it back within a step, so the two agree exactly.

Paths: the grouped CPU kernels through :class:`fastrms.grouped.StepPlan` (serial, parallel,
and on torch's OpenMP team as fastrms.torch runs them), the one-array step functions and
:func:`fastrms.functional.multi_tensor_step` (cpu and numpy backends), and the NumPy optimizer
classes, for every optimizer; every option combination of the small grids (Adam, AdamW, Lion,
Adamax), and for the others the default options and those that keep every state array
(``FULL_STATE``), to keep the compile time of the test small.
"""

from __future__ import annotations

import importlib
import os
import re

import ml_dtypes
import numpy as np
import pytest
from conftest import FULL_STATE, OPTION_GRIDS, assert_same_bits, npz_round_trip, options_id, randn
from numba import njit, types

import fastrms
from fastrms import functional, lowprecision, precision, reference, teams
from fastrms.grouped import StepPlan
from fastrms.kernels import elementwise, rules
from fastrms.specs import SPECS

BF16 = np.dtype(ml_dtypes.bfloat16)
SIZES = (1, 7, 1000, 20_000)
STEPS = 3
_WHOLE_GRID = ("adam", "adamw", "lion", "adamax")
_ON_TEAM = ("adam", "rmsprop", "sgd", "lion")  # the team's C function, as fastrms.torch runs it


def _cases() -> list:
    """(name, options, route): the serial loop on the chosen grid, the parallel one (the same
    loop body in a ``prange``) on the default options and ``FULL_STATE``."""
    cases = []
    for name, grid in OPTION_GRIDS.items():
        chosen = grid if name in _WHOLE_GRID else [{}, FULL_STATE[name]]
        for options in chosen:
            on = {k: v for k, v in options.items() if v not in (0, False)}  # as FULL_STATE is
            routes = ["serial"] + (["parallel"] if on in ({}, FULL_STATE[name]) else [])
            if on == FULL_STATE[name] and name in _ON_TEAM:
                routes.append("team")
            for route in routes:
                case = (name, options, route)
                cases.append(pytest.param(*case, id=f"{name}-{options_id(options)}-{route}"))
    return cases


CASES = _cases()
FULL = [pytest.param(n, o, id=f"{n}-{options_id(o)}") for n, o in FULL_STATE.items()]


def _problem(name: str, seed: int = 0):
    """Parameters and ``STEPS`` gradients per parameter (float32, random)."""
    rng = np.random.default_rng(seed)
    params = [randn(rng, n, np.float32) for n in SIZES]
    grads = [[randn(rng, n, np.float32) for n in SIZES] for _ in range(STEPS)]
    return params, grads


def _initial(name: str, slot: str, n: int, options: dict) -> np.ndarray:
    """The state's initial bfloat16 patterns (AdaGrad's initial accumulator, rounded)."""
    option = SPECS[name].initial.get(slot)
    value = 0.0 if option is None else options.get(option, SPECS[name].defaults[option])
    return lowprecision.round_nearest(np.full(n, value, np.float32))


def reference_steps(name: str, options: dict, params: list, grads: list) -> tuple[list, dict]:
    """The parameters and bfloat16 state (``uint16`` patterns) after ``len(grads)`` steps from
    the initial state, by the NumPy reference on widened state (see the module docstring)."""
    spec = SPECS[name]
    slots = spec.layout.slots
    params = [p.copy() for p in params]
    used = spec.setup(1, **options).state
    state = {s: [_initial(name, s, p.size, options) for p in params] for s in used}
    for step, step_grads in enumerate(grads, start=1):
        setup = spec.setup(step, **options)
        hyper = precision.cast(setup.rule, setup.scalars, np.dtype(np.float32))
        for i, (p, g) in enumerate(zip(params, step_grads)):
            wide = {s: lowprecision.bf16_to_float32(state[s][i]) for s in used}
            arrays = (p, g, *[wide.get(s, p) for s in slots])
            reference.RULES[setup.rule](arrays, hyper, setup.flags)
            for s in used:
                state[s][i] = lowprecision.round_nearest(wide[s])
    return params, state


def _bits(a: np.ndarray) -> np.ndarray:
    return lowprecision.bf16_bits(a)


def _check(name, params, state, want_params, want_state) -> None:
    for i, (p, w) in enumerate(zip(params, want_params)):
        assert_same_bits(p, w, f"{name} params[{i}]")
    for s, arrays in want_state.items():
        for i, w in enumerate(arrays):
            assert_same_bits(_bits(state[s][i]), w, f"{name} {s}[{i}]")


# -- the kernels, through the grouped step -----------------------------------------------------


@pytest.mark.parametrize(("name", "options", "route"), CASES)
def test_grouped_cpu_kernels_match_the_reference(name, options, route):
    spec = SPECS[name]
    params, grads = _problem(name)
    want_params, want_state = reference_steps(name, options, params, grads)
    setup = spec.setup(1, **options)
    # Half the state as ml_dtypes.bfloat16, half as uint16 patterns: both are accepted.
    state = {
        s: [_initial(name, s, p.size, options).view(BF16 if i % 2 else np.uint16)
            for i, p in enumerate(params)]
        for s in setup.state
    }  # fmt: skip
    names = [f"params[{i}]" for i in range(len(params))]
    threshold = 1 << 62 if route == "serial" else 0
    team = None
    if route == "team":
        os.environ.get("CI") and importlib.import_module("torch") or pytest.importorskip("torch")
        team = teams.torch_team()
        assert team is not None and team.threads() > 1, "torch's OpenMP team is not available"
    plan = StepPlan(setup, params, state, names, "cpu", parallel_threshold=threshold,
                    team=team, state_dtype="bfloat16")  # fmt: skip
    for step in range(1, STEPS + 1):
        plan.run(grads[step - 1], spec.setup(step, **options))
    _check(name, params, state, want_params, want_state)


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize(("name", "options"), FULL)
def test_multi_tensor_step_matches_the_reference(name, options, backend):
    params, grads = _problem(name, seed=1)
    want_params, want_state = reference_steps(name, options, params, grads)
    used = SPECS[name].setup(1, **options).state
    state = {s: [_initial(name, s, p.size, options).view(BF16) for p in params] for s in used}
    step_options = {k: v for k, v in options.items() if k in SPECS[name].step_options}
    for step in range(1, STEPS + 1):
        functional.multi_tensor_step(name, params, grads[step - 1], state, step=step,
                                     backend=backend, state_dtype="bfloat16",
                                     **step_options)  # fmt: skip
    _check(name, params, state, want_params, want_state)


@pytest.mark.parametrize(("name", "options"), FULL)
def test_one_array_step_functions_take_state_dtype(name, options):
    params, grads = _problem(name, seed=6)
    params, grads = params[2:3], [g[2:3] for g in grads]
    want_params, want_state = reference_steps(name, options, params, grads)
    spec = SPECS[name]
    used = spec.setup(1, **options).state
    state = {s: _initial(name, s, params[0].size, options).view(BF16) for s in used}
    step_options = {k: v for k, v in options.items() if k in spec.step_options}
    fn = getattr(functional, name)
    for step in range(1, STEPS + 1):
        counted = {"step": step} if spec.counts_steps else {}
        fn(params[0], grads[step - 1][0], **state, **counted, state_dtype="bfloat16",
           **step_options)  # fmt: skip
    _check(name, params, {s: [a] for s, a in state.items()}, want_params, want_state)


# -- the NumPy classes ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), FULL)
def test_optimizer_classes_hold_bf16_state_and_match_the_reference(name, options):
    params, grads = _problem(name, seed=2)
    want_params, want_state = reference_steps(name, options, params, grads)
    opt = fastrms.optim.OPTIMIZERS[name](
        [p.copy() for p in params], **options, state_dtype="bfloat16"
    )
    for g in grads:
        opt.step(g)
    _check(name, opt._params, opt.state, want_params, want_state)
    for s, arrays in opt.state.items():
        for p, a in zip(opt._params, arrays):
            assert a.dtype == BF16 and a.nbytes == 2 * p.size, s
    assert opt._store.nbytes() == 2 * sum(p.size for p in params) * len(opt.state)


@pytest.mark.parametrize("through_savez", [False, True])
def test_bf16_state_dict_round_trips_bit_for_bit(through_savez):
    params, grads = _problem("adam", seed=3)
    opt = fastrms.Adam([p.copy() for p in params], amsgrad=True, state_dtype="bfloat16")
    for g in grads[:2]:
        opt.step(g)
    sd = opt.state_dict()
    other = fastrms.Adam([p.copy() for p in opt._params], state_dtype="bfloat16")
    other.load_state_dict(npz_round_trip(sd) if through_savez else sd)
    for s, arrays in opt.state.items():
        for a, b in zip(arrays, other.state[s]):
            assert b.dtype == BF16
            assert_same_bits(_bits(b), _bits(a), s)
    opt.step(grads[2])  # and they step on alike
    other.step(grads[2])
    for a, b in zip(opt._params, other._params):
        assert_same_bits(b, a)


def test_state_dicts_move_between_float32_and_bf16_state():
    params, grads = _problem("adam", seed=4)
    full = fastrms.Adam([p.copy() for p in params])
    for g in grads:
        full.step(g)
    low = fastrms.Adam([p.copy() for p in params], state_dtype="bfloat16")
    low.load_state_dict(full.state_dict())  # rounds to nearest even
    for s, arrays in full.state.items():
        for a, b in zip(arrays, low.state[s]):
            assert b.dtype == BF16
            assert_same_bits(_bits(b), lowprecision.round_nearest(a), s)
            assert_same_bits(_bits(b), a.astype(BF16).view(np.uint16), s)  # ml_dtypes agrees
    back = fastrms.Adam([p.copy() for p in params])
    back.load_state_dict(npz_round_trip(low.state_dict()))  # widens exactly
    for s, arrays in low.state.items():
        for a, b in zip(arrays, back.state[s]):
            assert b.dtype == np.float32
            assert_same_bits(b, lowprecision.bf16_to_float32(a), s)


def test_adagrad_initial_accumulator_is_rounded_into_bf16_state():
    opt = fastrms.AdaGrad([np.zeros(5, np.float32)], initial_accumulator_value=0.1,
                          state_dtype="bfloat16")  # fmt: skip
    opt.step([np.ones(5, np.float32)])
    # 0.1 -> bf16 0.10009765625; + 1 in float32 -> 1.10009765625 -> bf16 1.1015625
    want = lowprecision.round_nearest(
        lowprecision.bf16_to_float32(lowprecision.round_nearest(np.float32([0.1] * 5))) + 1
    )
    assert_same_bits(_bits(opt.state["state_sum"][0]), want)
    assert float(opt.state["state_sum"][0][0]) == 1.1015625


def test_default_state_dtype_keeps_the_parameters_dtype():
    for dtype in (np.float32, np.float64):
        opt = fastrms.Adam([np.ones(4, dtype)])
        opt.step([np.ones(4, dtype)])
        assert opt.state_dtype is None and opt.state["exp_avg"][0].dtype == dtype
    opt = fastrms.Adam([np.ones(4, np.float32)], state_dtype="float32")
    opt.step([np.ones(4, np.float32)])
    assert opt.state["exp_avg"][0].dtype == np.float32


# -- bad input: a clear error naming the argument, and nothing written ---------------------------


def _adam_arrays(n=6, state=BF16):
    rng = np.random.default_rng(5)
    params = [randn(rng, n, np.float32), randn(rng, n + 1, np.float32)]
    grads = [randn(rng, p.size, np.float32) for p in params]
    st = {s: [np.zeros(p.size, state) for p in params] for s in ("exp_avg", "exp_avg_sq")}
    return params, grads, st


def _unchanged(arrays_before, arrays_after):
    for a, b in zip(arrays_before, arrays_after):
        assert a.tobytes() == b.tobytes()


def _snapshot(params, st):
    return [a.copy() for a in params] + [a.copy() for v in st.values() for a in v]


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda p, s: None, ValueError, "state_dtype must be one of"),  # unknown value
        (
            lambda p, s: p.__setitem__(1, p[1].astype(np.float64)),
            ValueError,
            r"state_dtype='bfloat16' needs float32 parameters, but params\[1\] has dtype float64",
        ),
        (
            lambda p, s: s["exp_avg"].__setitem__(1, np.zeros(7, np.float32)),
            TypeError,
            r"exp_avg of params\[1\] has dtype float32 but state_dtype='bfloat16' holds it",
        ),
        (
            lambda p, s: s["exp_avg_sq"].__setitem__(1, np.zeros(8, BF16)),
            ValueError,
            r"exp_avg_sq of params\[1\] has shape \(8,\)",
        ),
        (
            lambda p, s: s["exp_avg_sq"].__setitem__(1, np.zeros(14, BF16)[::2]),
            ValueError,
            r"exp_avg_sq of params\[1\] is not C-contiguous",
        ),
        (
            lambda p, s: s["exp_avg"].__setitem__(1, p[1].view(np.uint16)[:7]),
            ValueError,
            r"overlaps",
        ),
    ],
    ids=["unknown", "float64-params", "float32-state", "shape", "strided", "overlap"],
)
def test_multi_tensor_step_refuses_bad_bf16_state_and_writes_nothing(change, error, match):
    params, grads, st = _adam_arrays()
    change(params, st)
    state_dtype = "bf16" if match.startswith("state_dtype must") else "bfloat16"
    before = _snapshot(params, st)
    with pytest.raises(error, match=match):
        functional.multi_tensor_step("adam", params, grads, st, state_dtype=state_dtype)
    _unchanged(before, _snapshot(params, st))


@pytest.mark.parametrize("state", [BF16, np.uint16])
def test_bf16_state_without_state_dtype_is_refused_with_a_hint(state):
    params, grads, st = _adam_arrays(state=state)
    before = _snapshot(params, st)
    with pytest.raises(TypeError, match=r"exp_avg of params\[0\] has dtype .*pass state_dtype="):
        functional.multi_tensor_step("adam", params, grads, st)
    with pytest.raises(TypeError, match=r"exp_avg has dtype .*pass state_dtype="):
        functional.adam(params[0], grads[0], st["exp_avg"][0], st["exp_avg_sq"][0], step=1)
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        functional.adam(params[0], grads[0], st["exp_avg"][0], st["exp_avg_sq"][0], step=1,
                        state_dtype="half")  # fmt: skip
    with pytest.raises(ValueError, match="max_exp_avg_sq is required"):
        functional.adam(params[0], grads[0], st["exp_avg"][0], st["exp_avg_sq"][0], step=1,
                        amsgrad=True, state_dtype="bfloat16")  # fmt: skip
    _unchanged(before, _snapshot(params, st))


def test_optimizer_classes_refuse_bad_state_dtype():
    p = np.ones(4, np.float32)
    for bad in ("bf16", "int4", 3, np.float32):
        with pytest.raises(ValueError, match="state_dtype must be one of"):
            fastrms.Adam([p], state_dtype=bad)
    with pytest.raises(ValueError, match=r"needs float32 parameters, but params\[1\] has dtype"):
        fastrms.SGD([p, np.ones(3)], momentum=0.9, state_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"needs float64 parameters, but params\[0\]"):
        fastrms.Adam([p], state_dtype="float64")


def test_a_bf16_state_dict_entry_of_the_wrong_shape_is_refused():
    opt = fastrms.Adam([np.ones(4, np.float32)], state_dtype="bfloat16")
    opt.step([np.ones(4, np.float32)])
    sd = opt.state_dict()
    sd["state.exp_avg.0"] = np.zeros(5, BF16)
    before = _snapshot(opt._params, opt.state)
    with pytest.raises(ValueError, match=r"state_dict\[.state.exp_avg.0.\] has shape \(5,\)"):
        opt.load_state_dict(sd)
    _unchanged(before, _snapshot(opt._params, opt.state))


# -- the loop still vectorizes over the real codec -----------------------------------------------


def test_the_bf16_state_loop_is_float32_and_vectorized():
    b = precision.STORAGES["bfloat16"]
    sig = precision.signature("adam", np.dtype(np.float32), (b, b, b))
    serial = elementwise.grouped_loops(rules.adam, (False,), sig)[1]
    fresh = njit(cache=False, error_model="numpy")(serial.py_func)
    table = types.Array(types.int64, 2, "C")
    signature = (table, types.Array(types.int64, 1, "C"), table, types.Array(types.float32, 1, "C"))
    fresh.compile(signature)
    llvm = fresh.inspect_llvm(signature)
    assert re.search(r"<\d+ x float>", llvm), "the loop over bf16 state was not vectorized"
    assert re.search(r"store <\d+ x i16>", llvm), "the bf16 state was not stored as vectors"
    assert not re.search(r"\bfpext\b|llvm\.sqrt\.f64", llvm)
