"""bfloat16 parameters with 8-bit blockwise state (``state_dtype="int8"``, issue 18).

The reference every path must match bit for bit, :func:`reference_steps`, is built from the
NumPy oracles only, as in ``test_bf16_params.py`` and ``test_int8_state.py`` together: per
parameter and step, widen the bfloat16 parameter and gradient to float32 exactly, dequantize
each 8-bit state array (:func:`fastrms.lowprecision.dequantize_blockwise`; a parameter under
``MIN_8BIT_SIZE`` elements keeps float32 state), run the reference rule of
:mod:`fastrms.reference` with the step's scalars cast to float32, quantize the new state
(:func:`fastrms.lowprecision.quantize_blockwise`), and store the parameter as ``rounding``
says (nearest even; stochastic with the key ``step_key(seed, step, position)`` and each
element's index in its whole tensor; or Kahan with its bfloat16 compensation).

Compiling a kernel per (rule, options, storages) is what costs time: the numpy backend runs
every optimizer under every rounding, the CPU kernels every optimizer under stochastic
rounding (the default, and the one whose random bits need each element's index in its
tensor, block after block) and Adam and SGD under the other two roundings.
"""

from __future__ import annotations

import copy
import re

import ml_dtypes
import numba
import numpy as np
import pytest
from conftest import FULL_STATE, Snapshot, assert_same_bits
from numba import njit

import fastrms
from fastrms import functional, lowprecision, precision, reference
from fastrms import threads as threads_layer
from fastrms.grouped import StepPlan
from fastrms.kernels import blockwise, rules
from fastrms.lowprecision import MIN_8BIT_SIZE, Quantized
from fastrms.specs import SPECS

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
#: A ragged parameter (5000 = 19 blocks of 256 and one of 136), one under MIN_8BIT_SIZE
#: (float32 state, in the same call), and a 2-D one of whole blocks.
SHAPES = ((5000,), (1000,), (64, 72))
STEPS = 3
ROUNDINGS = precision.ROUNDINGS
KAHAN = precision.KAHAN_COMP


def _problem(seed: int = 0, shapes=SHAPES, steps=STEPS):
    """bfloat16 parameters and ``steps`` bfloat16 gradients per parameter (random, nonzero)."""
    rng = np.random.default_rng(seed)

    def bf(shape):
        return (rng.standard_normal(shape) + 0.01).astype(BF16)

    return [bf(s) for s in shapes], [[bf(s) for s in shapes] for _ in range(steps)]


def _signed(name: str, slot: str) -> bool:
    layout = SPECS[name].layout
    return layout.slot_specs[layout.slots.index(slot)].sign == "signed"


def _fresh_state(name: str, options: dict, params: list, rounding: str) -> dict:
    """The state at its initial value, as ``state_dtype="int8"`` holds it beside bfloat16
    parameters: Quantized pairs (float32 arrays under MIN_8BIT_SIZE elements)."""
    spec = SPECS[name]
    state = {}
    for s in spec.setup(1, **options).state:
        option = spec.initial.get(s)
        value = 0.0 if option is None else options.get(option, spec.defaults[option])
        state[s] = []
        for p in params:
            full = np.full(p.shape, value, F32)
            big = p.size >= MIN_8BIT_SIZE
            state[s].append(Quantized.of(full, _signed(name, s)) if big else full)
    if rounding == "kahan":
        state[KAHAN] = [np.zeros(p.shape, BF16) for p in params]
    return state


def _copy(a):
    return Quantized(a.codes.copy(), a.scales.copy()) if isinstance(a, tuple) else a.copy()


def reference_steps(name, options, params, grads, rounding, seed=0, offset=0):
    """Parameters and state after ``len(grads)`` steps by the NumPy reference (see the module
    docstring); ``offset``: the index of each parameter's element 0 in its whole tensor."""
    spec = SPECS[name]
    slots = spec.layout.slots
    params = [p.copy() for p in params]
    state = _fresh_state(name, options, params, rounding)
    for step, step_grads in enumerate(grads, start=1):
        setup = spec.setup(step, **options)
        hyper = precision.cast(setup.rule, setup.scalars, F32)
        for i, (p, g) in enumerate(zip(params, step_grads)):
            p32 = lowprecision.bf16_to_float32(p).ravel()
            before = p32.copy()
            wide = {}
            for s in setup.state:
                a = state[s][i]
                if isinstance(a, tuple):
                    wide[s] = lowprecision.dequantize_blockwise(
                        a.codes.ravel(), a.scales, _signed(name, s), map="float8"
                    )
                else:
                    wide[s] = a.ravel()  # float32 state, stepped in place
            g32 = lowprecision.bf16_to_float32(g).ravel()
            with np.errstate(all="ignore"):
                reference.RULES[setup.rule]((p32, g32, *[wide.get(s, p32) for s in slots]),
                                            hyper, setup.flags)  # fmt: skip
            for s in setup.state:
                if isinstance(state[s][i], tuple):
                    codes, scales = lowprecision.quantize_blockwise(
                        wide[s], _signed(name, s), map="float8"
                    )
                    state[s][i] = Quantized(codes.reshape(p.shape), scales)
            flat = p.reshape(-1)
            if rounding == "nearest":
                flat[...] = lowprecision.round_nearest(p32).view(BF16)
            elif rounding == "stochastic":
                key = lowprecision.step_key(seed, step, i)
                flat[...] = lowprecision.round_stochastic(p32, key, offset).view(BF16)
            else:
                comp = state[KAHAN][i].reshape(-1)
                with np.errstate(all="ignore"):
                    new, k = lowprecision.kahan_add(flat, comp, p32 - before)
                flat[...], comp[...] = new.view(BF16), k.view(BF16)
    return params, state


def _check(what, params, state, want_params, want_state) -> None:
    """Parameters' bits, codes, scales, float32 state and Kahan compensation all equal."""
    for i, (p, w) in enumerate(zip(params, want_params)):
        assert p.dtype == BF16
        assert_same_bits(p.view(np.uint16), w.view(np.uint16), f"{what} params[{i}]")
    for s, arrays in want_state.items():
        for i, w in enumerate(arrays):
            got = state[s][i]
            if isinstance(w, tuple):
                assert isinstance(got, tuple), f"{what} {s}[{i}] is not quantized"
                assert_same_bits(
                    got.codes.reshape(w.codes.shape), w.codes, f"{what} {s}[{i}] codes"
                )
                assert_same_bits(got.scales, w.scales, f"{what} {s}[{i}] scales")
            else:
                assert_same_bits(got.view(np.uint16) if got.dtype == BF16 else got,
                                 w.view(np.uint16) if w.dtype == BF16 else w,
                                 f"{what} {s}[{i}]")  # fmt: skip


def _moved(params, before) -> None:
    """The steps did something: many parameter elements changed (the reference is no no-op)."""
    for p, b in zip(params, before):
        assert np.mean(p.view(np.uint16) != b.view(np.uint16)) > 0.1


def _step_options(name: str, options: dict) -> dict:
    return {k: v for k, v in options.items() if k in SPECS[name].step_options}


def _options(name: str) -> dict:
    """Every state slot in use, and a learning rate that moves bfloat16 parameters by more
    than half an ulp in a few steps (Lion's and Adam's defaults do not, under "nearest")."""
    return FULL_STATE[name] | {"lr": max(SPECS[name].defaults["lr"], 0.01)}


# -- the numpy backend (the reference group) and the functional API ---------------------------


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("name", list(SPECS))
def test_numpy_backend_matches_the_reference(name, rounding):
    options = _options(name)
    params, grads = _problem(1)
    want_params, want_state = reference_steps(name, options, params, grads, rounding, seed=5)
    _moved(want_params, params)
    state = _fresh_state(name, options, params, rounding)
    for step, g in enumerate(grads, start=1):
        functional.multi_tensor_step(name, params, g, state, step=step, backend="numpy",
                                     state_dtype="int8", rounding=rounding, seed=5,
                                     **_step_options(name, options))  # fmt: skip
    _check(f"{name} {rounding}", params, state, want_params, want_state)


# -- the CPU kernels, through the grouped step ------------------------------------------------

#: Every optimizer under stochastic rounding; the other roundings on Adam (3 slots with
#: amsgrad) and Kahan on SGD (1 slot, set to the gradient on the first step).
KERNEL_CASES = [(name, "stochastic") for name in SPECS] + [
    ("adam", "nearest"),
    ("adam", "kahan"),
    ("sgd", "kahan"),
]


@pytest.mark.parametrize(("name", "rounding"), KERNEL_CASES)
def test_cpu_kernels_match_the_reference(name, rounding):
    options = _options(name)
    params, grads = _problem(2)
    want_params, want_state = reference_steps(name, options, params, grads, rounding, seed=7)
    state = _fresh_state(name, options, params, rounding)
    setup = SPECS[name].setup(1, **options)
    plan = StepPlan(setup, params, state, ["a", "b", "c"], "cpu", parallel_threshold=1 << 62,
                    team=None, state_dtype="int8", rounding=rounding, seed=7)  # fmt: skip
    assert [type(g).__name__ for g in plan.groups] == ["BlockwiseCpuGroup", "CpuGroup"]
    for step, g in enumerate(grads, start=1):
        plan.run(g, SPECS[name].setup(step, **options), step)
    _check(f"{name} {rounding}", params, state, want_params, want_state)


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_one_and_two_threads_give_the_same_bits(rounding):
    """The parallel kernel, cut into parts on block boundaries, on 1 and 2 threads."""
    params, grads = _problem(3, shapes=((70_001,), (30_000,), (7,)))
    want_params, want_state = reference_steps("adam", {}, params, grads, rounding)
    threads_layer.configure()  # fastrms chooses Numba's threading layer, before numba starts it
    before = numba.get_num_threads()
    try:
        for threads in (1, 2):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            ps = [p.copy() for p in params]
            state = _fresh_state("adam", {}, ps, rounding)
            plan = StepPlan(SPECS["adam"].setup(1), ps, state, ["a", "b", "c"], "cpu",
                            parallel_threshold=0, team=None, state_dtype="int8",
                            rounding=rounding)  # fmt: skip
            for step, g in enumerate(grads, start=1):
                plan.run(g, SPECS["adam"].setup(step), step)
            _check(f"{threads} threads", ps, state, want_params, want_state)
    finally:
        numba.set_num_threads(before)


def test_the_key_words_high_half_offsets_the_index_of_the_random_bits():
    """The keyed column's table word holds the key in its low 32 bits and, in its high 32, the
    index of the array's element 0 in its whole tensor (a shard's offset; the convention of
    :func:`fastrms.kernels.pointers.codec_extra`): the blockwise kernel adds it to each
    element's index, block after block."""
    params, grads = _problem(11, shapes=((70_001,),), steps=1)
    offset = 123_457
    want, _ = reference_steps("adam", {}, params, grads, "stochastic", offset=offset)
    unshifted, _ = reference_steps("adam", {}, params, grads, "stochastic")
    assert not np.array_equal(want[0].view(np.uint16), unshifted[0].view(np.uint16))
    ps = [params[0].copy()]
    state = _fresh_state("adam", {}, ps, "stochastic")
    setup = SPECS["adam"].setup(1)
    plan = StepPlan(setup, ps, state, ["a"], "cpu", parallel_threshold=0, team=None,
                    state_dtype="int8", rounding="stochastic")  # fmt: skip
    hypers = plan.check(grads[0], setup, 1)  # sets the keys
    (group,) = plan.groups
    group.table[:, 1 + len(group.signature.storages)] |= offset << 32
    plan.launch(hypers, grads[0])
    assert_same_bits(ps[0].view(np.uint16), want[0].view(np.uint16))


def test_the_block_loops_stay_float32_and_vectorized():
    """With a keyed bfloat16 parameter column in the block loop, the rule's loop still runs
    on float32 vectors, stores the parameter as 16-bit vectors, and the codes are encoded and
    decoded as vectors (the kernel compiled afresh, its LLVM IR inspected)."""
    s, u = precision.STORAGES["int8_signed"], precision.STORAGES["int8_unsigned"]
    sig = precision.signature("adam", BF16, (s, u, u), rounding="stochastic")
    serial = blockwise.grouped_block_loops(rules.adam, (False,), sig, (True, True, False))[1]
    inner = [getattr(c.cell_contents, "py_func", None) for c in serial.py_func.__closure__]
    piece = next(f for f in inner if getattr(f, "__name__", "") == "piece")
    fresh = njit(cache=False, error_model="numpy")(piece)
    table = np.zeros((1, sig.table_width), np.int64)
    hyper = precision.cast("adam", SPECS["adam"].setup(1).scalars, F32)
    fresh(table.ctypes.data + 8, 0, 0, 0, hyper)  # no work
    llvm = next(iter(fresh.inspect_llvm().values()))
    assert re.search(r"llvm\.sqrt\.v\d+f32", llvm), "the rule's loop was not vectorized"
    assert re.search(r"store <\d+ x i16>", llvm), "the bf16 param was not stored as vectors"
    assert re.search(r"store <\d+ x i8>", llvm), "the codes were not encoded as vectors"
    assert re.search(r"zext <\d+ x i8>", llvm), "the codes were not decoded as vectors"
    assert not re.search(r"\bfpext\b|llvm\.sqrt\.f64", llvm)


# -- the NumPy classes and the one-array functions ---------------------------------------------


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_numpy_class_matches_the_reference_and_round_trips(rounding):
    options = FULL_STATE["adam"]
    params, grads = _problem(4)
    want_params, want_state = reference_steps("adam", options, params, grads, rounding, seed=2)
    opt = fastrms.Adam(params, backend="cpu", state_dtype="int8", rounding=rounding, seed=2,
                       **options)  # fmt: skip
    for g in grads[:-1]:
        opt.step(g)
    sd = opt.state_dict()
    assert "state.exp_avg.0:codes" in sd and "state.exp_avg.1" in sd  # small: float32
    twin_params = [p.copy() for p in params]
    twin = fastrms.Adam(twin_params, backend="cpu", state_dtype="int8", rounding=rounding,
                        seed=2)  # fmt: skip
    twin.load_state_dict(copy.deepcopy(sd))
    for o in (opt, twin):
        o.step(grads[-1])
    _check(f"class {rounding}", params, opt.state, want_params, want_state)
    _check(f"reloaded {rounding}", twin_params, twin.state, want_params, want_state)
    # The memory of the 8-bit state: codes and one float32 scale per 256 elements.
    q = opt.state["exp_avg"][0]
    assert q.codes.nbytes + q.scales.nbytes == 5000 + 4 * 20


def test_one_array_functions_match_the_reference():
    options = FULL_STATE["adam"]
    params, grads = _problem(5, shapes=((5000,),))
    want_params, want_state = reference_steps("adam", options, params, grads, "stochastic", 3)
    (p,) = params
    state = _fresh_state("adam", options, params, "stochastic")
    m, v, vmax = (state[s][0] for s in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))
    for step, (g,) in enumerate(grads, start=1):
        functional.adam(p, g, m, v, max_exp_avg_sq=vmax, step=step, backend="cpu",
                        state_dtype="int8", seed=3, **options)  # fmt: skip
    _check("functional.adam", params, state, want_params, want_state)


# -- fastrms.torch ----------------------------------------------------------------------------


def _torch_tensor(a: np.ndarray):
    import torch

    return torch.from_numpy(a.view(np.uint16).astype(np.int16)).view(torch.bfloat16)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_torch_matches_the_numpy_class(rounding):
    torch = pytest.importorskip("torch")
    import fastrms.torch as ft

    options = FULL_STATE["adam"]
    params, grads = _problem(6)
    mine = [p.copy() for p in params]
    opt = fastrms.AdamW(mine, backend="cpu", state_dtype="int8", rounding=rounding, seed=9,
                        **options)  # fmt: skip
    tps = [torch.nn.Parameter(_torch_tensor(p).clone()) for p in params]
    topt = ft.AdamW(tps, state_dtype="int8", rounding=rounding, seed=9, **options)
    for g in grads:
        opt.step(g)
        for t, x in zip(tps, g):
            t.grad = _torch_tensor(x).clone()
        topt.step()
    torch_state = {}
    for s in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        st = [topt.state[t] for t in tps]
        torch_state[s] = [
            Quantized(x[s].numpy(), x[s + "_scales"].numpy())
            if s + "_scales" in x
            else x[s].numpy()
            for x in st
        ]
    if rounding == "kahan":
        torch_state[KAHAN] = [topt.state[t][KAHAN].view(torch.uint16).numpy() for t in tps]
    torch_params = [t.detach().view(torch.uint16).numpy().view(BF16) for t in tps]
    want_state = {s: opt.state[s] for s in torch_state}
    if rounding == "kahan":
        want_state[KAHAN] = [k.view(np.uint16) for k in opt.state[KAHAN]]
    _check(f"torch {rounding}", torch_params, torch_state, mine, want_state)
    st = topt.state[tps[0]]
    assert st["exp_avg"].dtype is torch.uint8 and st["exp_avg_scales"].dtype is torch.float32
    assert topt.state[tps[1]]["exp_avg"].dtype is torch.float32  # under MIN_8BIT_SIZE

    # The stored form round-trips bit for bit (the scales are not cast to bfloat16).
    twin_ps = [torch.nn.Parameter(t.detach().clone()) for t in tps]
    twin = ft.AdamW(twin_ps, state_dtype="int8", rounding=rounding, seed=9, **options)
    twin.load_state_dict(copy.deepcopy(topt.state_dict()))
    for t, u in zip(tps, twin_ps):
        for k, v in topt.state[t].items():
            assert v.dtype == twin.state[u][k].dtype and torch.equal(v, twin.state[u][k]), k

    # Exported as float32, it loads back into int8 state quantized from the float32 values
    # (not from torch's cast of them to the parameters' bfloat16), as the NumPy class loads it.
    sd = topt.state_dict(dequantize=True)
    back = ft.AdamW([torch.nn.Parameter(t.detach().clone()) for t in tps], state_dtype="int8",
                    rounding=rounding, seed=9, **options)  # fmt: skip
    back.load_state_dict(copy.deepcopy(sd))
    np_back = fastrms.AdamW([p.copy() for p in mine], state_dtype="int8", rounding=rounding,
                            seed=9, **options)  # fmt: skip
    np_back.load_state_dict(opt.state_dict(dequantize=True))
    for s in ("exp_avg", "exp_avg_sq"):
        x, q = back.state[back.param_groups[0]["params"][0]], np_back.state[s][0]
        assert_same_bits(x[s].numpy(), q.codes, f"{s} codes loaded from float32")
        assert_same_bits(x[s + "_scales"].numpy(), q.scales, f"{s} scales loaded from float32")

    # And it loads into torch.optim.AdamW (params cast to float32 there).
    ref = torch.optim.AdamW([torch.nn.Parameter(t.detach().float()) for t in tps], **options)
    ref.load_state_dict(sd)
    got = ref.state[ref.param_groups[0]["params"][0]]["exp_avg"]
    q = opt.state["exp_avg"][0]
    assert got.dtype is torch.float32
    assert_same_bits(got.numpy(), q.dequantize(True).reshape(got.shape))


# -- refusals: nothing written ----------------------------------------------------------------


def test_bad_int8_state_beside_bf16_params_is_refused_and_nothing_is_written():
    params, grads = _problem(8, shapes=((5000,), (1000,)), steps=1)
    state = _fresh_state("adam", {}, params, "nearest")
    snap = Snapshot({"p0": params[0], "p1": params[1], "m0": state["exp_avg"][0].codes})

    def run(state):
        functional.multi_tensor_step("adam", params, grads[0], state, step=1, backend="cpu",
                                     state_dtype="int8", rounding="nearest")  # fmt: skip

    small_pair = dict(state, exp_avg=[state["exp_avg"][0], Quantized.of(np.zeros(1000), True)])
    with pytest.raises(TypeError, match="keeps float32 state"):
        run(small_pair)
    big_plain = dict(state, exp_avg=[np.zeros(5000, F32), state["exp_avg"][1]])
    with pytest.raises(TypeError, match="Quantized"):
        run(big_plain)
    with pytest.raises(ValueError, match="state_dtype='float64' needs float64 parameters"):
        fastrms.Adam(params, state_dtype="float64")
    snap.assert_unchanged()
