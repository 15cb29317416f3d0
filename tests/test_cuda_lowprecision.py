"""bfloat16 state and bfloat16 parameters on the ``cuda`` backend (issue 18), against the NumPy
reference, bit for bit.

Every test here runs kernels: ``.ci/run`` runs this file under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, ``-m cudasim``); without the simulator or a device it is skipped.
On a real device the results are compared within two bfloat16 ulps instead (see ``_check``):
not yet run on one.
The reference is the ``numpy`` backend on host twins of the same arrays (its bfloat16 paths
are themselves checked against independent formulas in ``test_bf16_params.py`` and
``test_state_dtype.py``, and the ``cpu`` backend against it). bfloat16 arrays go to the
device as their ``uint16`` patterns, as CUDA's array interface has no bfloat16 type.

Sizes are small (the simulator runs a Python thread per CUDA thread), and the grouped launch
takes chunks of 64 elements and blocks of 32 threads, so a 200-element tensor spans four
chunks: stochastic rounding must then draw by the element's index in its whole tensor.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
from conftest import (
    ALGOS,
    FULL_STATE,
    assert_same_bits,
    from_device,
    options_id,
    patterns,
    quiet,
    randn,
    to_device,
)

import fastrms
from fastrms import functional, lowprecision, precision, reference
from fastrms.arrays import extent
from fastrms.specs import SPECS

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
CUDA = fastrms.backends()["cuda"]
pytestmark = [
    pytest.mark.cudasim,
    pytest.mark.skipif(not CUDA.available, reason=f"no CUDA target: {CUDA.detail}"),
]

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
KAHAN = precision.KAHAN_COMP
#: Uneven sizes: empty, one element, and one tensor over several chunks (of SMALL_CHUNK).
SIZES = (0, 1, 5, 200, 33)
SMALL_CHUNK, SMALL_THREADS = 64, 32
STEPS = 3


@pytest.fixture
def ck(monkeypatch):
    """fastrms.kernels.cuda with small chunks and blocks (see the module docstring)."""
    from fastrms.kernels import cuda as kernels

    monkeypatch.setattr(kernels, "GROUP_CHUNK", SMALL_CHUNK)
    monkeypatch.setattr(kernels, "GROUP_THREADS", SMALL_THREADS)
    return kernels


def _check(actual: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    """The same bits under the simulator (which computes with NumPy scalars, as the
    reference does). On a GPU the compiler contracts ``a*b + c`` into one fused multiply-add
    (see test_cuda_grouped.py), so a float32 result may differ by an ulp and then round to
    the neighbouring bfloat16, which later steps carry on: there, within two bfloat16 ulps."""
    if SIMULATOR:
        assert_same_bits(patterns(actual), patterns(expected), what)
        return
    wide = [
        lowprecision.bf16_to_float32(a.view(np.uint16)) if a.dtype == BF16 else a
        for a in (actual, expected)
    ]
    scale = float(np.max(np.abs(wide[1]), initial=1.0))
    np.testing.assert_allclose(*wide, rtol=2**-6, atol=2**-6 * scale, err_msg=what)


def _initial(name, slot, n, options, state_dtype) -> np.ndarray:
    option = SPECS[name].initial.get(slot)
    value = 0.0 if option is None else options.get(option, SPECS[name].defaults[option])
    full = np.full(n, value, np.float32)
    return lowprecision.round_nearest(full).view(BF16) if state_dtype == "bfloat16" else full


def _compare(name, options, *, param_dtype, state_dtype=None, rounding=None, seed=None):
    """``STEPS`` steps of ``multi_tensor_step`` on the cuda backend and on the numpy backend,
    from the same arrays; every parameter and state array must agree bit for bit."""
    spec = SPECS[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    step_options = {k: v for k, v in options.items() if k in spec.step_options}
    used = spec.setup(1, **step_options).state
    params = [randn(rng, n, F32).astype(param_dtype) for n in SIZES]
    state = {s: [_initial(name, s, n, options, state_dtype) for n in SIZES] for s in used}
    if rounding == "kahan":
        state[KAHAN] = [np.zeros(n, BF16) for n in SIZES]
    start = [p.copy() for p in params]
    device = [to_device(p) for p in params]
    device_state = {s: [to_device(a) for a in arrays] for s, arrays in state.items()}
    low = dict(state_dtype=state_dtype, rounding=rounding, seed=seed, lr=ALGOS[name].lr)
    for step in range(1, STEPS + 1):
        grads = [randn(rng, n, F32).astype(param_dtype) for n in SIZES]
        functional.multi_tensor_step(name, params, grads, state, step=step, backend="numpy",
                                     **low, **step_options)  # fmt: skip
        quiet(functional.multi_tensor_step, name, device, [to_device(g) for g in grads],
               device_state, step=step, backend="cuda", **low, **step_options)  # fmt: skip
    for i, (d, p) in enumerate(zip(device, params)):
        _check(from_device(d, p), p, f"params[{i}]")
    for s, arrays in state.items():
        for i, (d, a) in enumerate(zip(device_state[s], arrays)):
            _check(from_device(d, a), a, f"{s}[{i}]")
    # The test means something only if the step moved the parameters.
    assert not np.array_equal(patterns(params[3]), patterns(start[3]))


# -- float32 parameters, bfloat16 state -------------------------------------------------------

STATE_CASES = [(name, FULL_STATE[name]) for name in SPECS] + [("adam", {}), ("rmsprop", {})]


@pytest.mark.parametrize(
    ("name", "options"),
    [pytest.param(n, o, id=f"{n}-{options_id(o)}") for n, o in STATE_CASES],
)
def test_bf16_state_matches_the_reference(ck, name, options):
    _compare(name, options, param_dtype=F32, state_dtype="bfloat16")


# -- bfloat16 parameters, each rounding, float32 or bfloat16 state ----------------------------

PARAM_CASES = (
    [(name, FULL_STATE[name], rounding, None) for name in SPECS for rounding in precision.ROUNDINGS]
    + [  # unused state slots (they repeat the parameter's address: never loaded or stored)
        ("adam", {}, "stochastic", None),
        ("rmsprop", {}, "kahan", None),
    ]
    + [("adam", FULL_STATE["adam"], rounding, "bfloat16") for rounding in precision.ROUNDINGS]
)


@pytest.mark.parametrize(
    ("name", "options", "rounding", "state_dtype"),
    [pytest.param(*c, id=f"{c[0]}-{options_id(c[1])}-{c[2]}-{c[3] or 'f32'}") for c in PARAM_CASES],
)
def test_bf16_params_match_the_reference(ck, name, options, rounding, state_dtype):
    _compare(name, options, param_dtype=BF16, rounding=rounding, seed=11, state_dtype=state_dtype)


# -- the key word of stochastic rounding ------------------------------------------------------


def test_stochastic_rounding_draws_by_index_in_the_whole_tensor(ck):
    """A row's key word holds the key in its low 32 bits and, in its high 32 bits, the index
    of the array's element 0 in its whole tensor (the convention of the CPU kernels); element
    ``i`` draws the bits of index ``high + i`` (mod 2^32), whichever chunk it falls in. On
    CUDA the words travel beside the table (``words=``), whose key column is not read."""
    from fastrms.kernels import rules

    n, key, offset = 200, lowprecision.step_key(5, 3, 1), 2**32 - 70  # wraps inside the tensor
    rng = np.random.default_rng(4)
    p = (rng.standard_normal(n) * 10).astype(BF16)
    g = rng.standard_normal(n).astype(BF16)
    sig = precision.signature("sgd", BF16, None, rounding="stochastic")
    setup = SPECS["sgd"].setup(1, lr=1e-3)
    hyper = functional._cast(setup.rule, setup.scalars, F32)
    dp, dg = to_device(p), to_device(g)
    words = np.array([key | offset << 32], np.uint64).view(np.int64)
    table = np.array([[n, extent(dp)[0], extent(dg)[0], extent(dp)[0], -1]], np.int64)
    quiet(ck.launch_grouped, rules.RULES["sgd"], setup.flags, table, hyper, 0, sig, words)

    p32, g32 = lowprecision.bf16_to_float32(p), lowprecision.bf16_to_float32(g)
    reference.RULES["sgd"]((p32, g32, p32), hyper, setup.flags)
    want = lowprecision.round_stochastic(p32, key, offset)
    got = dp.copy_to_host()
    _check(got.view(BF16), want.view(BF16))
    # Each of those would be a different result: indices from the chunk's start, or no offset.
    in_chunk = np.concatenate([
        lowprecision.round_stochastic(p32[c : c + SMALL_CHUNK], key, offset)
        for c in range(0, n, SMALL_CHUNK)
    ])  # fmt: skip
    assert not np.array_equal(got, in_chunk)
    assert not np.array_equal(got, lowprecision.round_stochastic(p32, key, 0))
    assert not np.array_equal(got, lowprecision.round_nearest(p32))


@pytest.mark.parametrize(
    ("columns", "words", "match"),
    [
        (4, [0], "table has 4 columns but signature's rows are 5"),
        (5, None, r"words must hold 1 key word\(s\) per table row \(2\), got 0"),
        (5, [1, 2, 3], r"words must hold .* \(2\), got 3"),
    ],
    ids=["table width", "no words", "too many words"],
)
def test_bad_codec_launches_are_refused(ck, columns, words, match):
    from fastrms.kernels import rules

    sig = precision.signature("sgd", BF16, None, rounding="stochastic")
    hyper = functional._cast("sgd", SPECS["sgd"].setup(1, lr=1e-3).scalars, F32)
    table = np.zeros((2, columns), np.int64)
    with pytest.raises(ValueError, match=match):
        ck.launch_grouped(rules.sgd, (False, False), table, hyper, 0, sig, words)


def test_stochastic_steps_reuse_the_table_on_the_device(ck, monkeypatch):
    """The keys change every step, the table does not: over several steps of a plan, the
    table is uploaded once and its key words are copied into one reused buffer."""
    from collections import OrderedDict

    from numba import cuda

    from fastrms.grouped import StepPlan

    rng = np.random.default_rng(6)
    params = [to_device(rng.standard_normal(n).astype(BF16)) for n in (70, 5)]
    grads = [to_device(rng.standard_normal(n).astype(BF16)) for n in (70, 5)]
    state = {"momentum_buffer": [to_device(np.zeros(n, F32)) for n in (70, 5)]}
    setup = SPECS["sgd"].setup(1, lr=0.1, momentum=0.9)
    plan = StepPlan(setup, params, state, ["params[0]", "params[1]"], "cuda", seed=1)
    monkeypatch.setattr(ck, "_copies", OrderedDict())
    monkeypatch.setattr(ck, "_words", OrderedDict())
    uploads, real = [], cuda.to_device
    monkeypatch.setattr(
        cuda, "to_device", lambda a, *args, **kw: uploads.append(a) or real(a, *args, **kw)
    )
    before = [p.copy_to_host() for p in params]
    for step in (1, 2, 3):
        quiet(plan.run, grads, SPECS["sgd"].setup(step, lr=0.1, momentum=0.9), step)
    assert len(uploads) == 1 and len(ck._copies) == 1 and len(ck._words) == 1
    assert all(not np.array_equal(p.copy_to_host(), b) for p, b in zip(params, before))


# -- the other entry points --------------------------------------------------------------------


def test_one_array_functions_take_uint16_device_params(ck):
    """functional.adam on a CUDA array's uint16 patterns steps it as a bfloat16 parameter
    (stochastic rounding by default), as on an ml_dtypes.bfloat16 host array."""
    rng = np.random.default_rng(2)
    p, g = (rng.standard_normal(200).astype(BF16) for _ in range(2))
    m, v = np.zeros(200, F32), np.zeros(200, F32)
    dp, dg, dm, dv = map(to_device, (p, g, m, v))
    functional.adam(p, g, m, v, step=2, lr=0.01, seed=3, stream=4, backend="numpy")
    quiet(functional.adam, dp, dg, dm, dv, step=2, lr=0.01, seed=3, stream=4)
    _check(dp.copy_to_host().view(BF16), p)
    _check(dm.copy_to_host(), m)
    _check(dv.copy_to_host(), v)


def test_simulator_bf16_device_arrays_work_too(ck):
    """The simulator keeps ml_dtypes.bfloat16 on its device arrays (a GPU has only the
    patterns): they are bfloat16 parameters and state as well."""
    from numba import cuda

    rng = np.random.default_rng(3)
    p, g = (rng.standard_normal(70).astype(BF16) for _ in range(2))
    m, v = np.zeros(70, BF16), np.zeros(70, BF16)
    dp, dg, dm, dv = (cuda.to_device(a) for a in (p, g, m, v))
    assert dp.dtype == BF16
    arrays = {"exp_avg": [m], "exp_avg_sq": [v]}
    functional.multi_tensor_step("adam", [p], [g], arrays, state_dtype="bfloat16",
                                 rounding="nearest", backend="numpy")  # fmt: skip
    quiet(functional.multi_tensor_step, "adam", [dp], [dg], {"exp_avg": [dm], "exp_avg_sq": [dv]},
           state_dtype="bfloat16", rounding="nearest")  # fmt: skip
    for d, h in zip((dp, dm, dv), (p, m, v)):
        _check(d.copy_to_host().view(BF16), h)


# -- refusals: nothing written -----------------------------------------------------------------


def _adam_device(n=8, p_dtype=BF16, g_dtype=BF16, state_dtype=F32):
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n).astype(p_dtype)
    g = rng.standard_normal(n).astype(g_dtype)
    return [to_device(a) for a in (p, g, np.zeros(n, state_dtype), np.zeros(n, state_dtype))]


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"g_dtype": F32}, TypeError, r"grads\[0\] has dtype float32"),
        ({"state_dtype": BF16}, TypeError, r"exp_avg of params\[0\] has dtype uint16"),
        ({"p_dtype": np.int16, "g_dtype": np.int16}, TypeError, "float32 or float64"),
    ],
    ids=["float32 grads", "bf16 state not asked", "int16 params"],
)
def test_bad_bf16_device_arrays_are_refused_and_nothing_is_written(ck, change, error, match):
    p, g, m, v = _adam_device(**change)
    before = [a.copy_to_host() for a in (p, m, v)]
    with pytest.raises(error, match=match):
        functional.multi_tensor_step("adam", [p], [g], {"exp_avg": [m], "exp_avg_sq": [v]})
    for a, b in zip((p, m, v), before):
        assert_same_bits(a.copy_to_host(), b)


def test_optimizer_classes_refuse_integer_cuda_params(ck):
    """The NumPy classes take ``uint16`` CUDA arrays as bfloat16 patterns
    (tests/test_cuda_classes_lowprecision.py); other integer parameters stay refused."""
    ip = _adam_device(p_dtype=np.int16)[0]
    with pytest.raises(TypeError, match="float32 or float64"):
        fastrms.Adam([ip])
