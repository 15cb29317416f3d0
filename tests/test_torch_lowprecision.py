"""fastrms.torch with ``torch.bfloat16`` parameters (``rounding=``, ``seed=``) and with 8-bit
blockwise state (``state_dtype="int8"``; issue 18).

Every class steps bit for bit as fastrms's NumPy class on the same data (bfloat16 parameters as
``ml_dtypes.bfloat16`` copies; that class is itself bit-identical to the reference,
tests/test_bf16_params.py and tests/test_int8_state.py), through the full route, the short
(repeat) route and torch's OpenMP team. Stochastic rounding is keyed by the parameter's step
count and its position in the optimizer, as the NumPy class keys it by its step count and the
parameter's position. Checkpoints round-trip bit for bit; bad input is refused with nothing
written.
"""

from __future__ import annotations

import importlib
import io
import os

import ml_dtypes
import numpy as np
import pytest

torch = importlib.import_module("torch") if os.environ.get("CI") else pytest.importorskip("torch")

from conftest import (  # noqa: E402
    FULL_STATE,
    FullRouteCounter,
    assert_same_bits,
    randn,
    torch_round_trip,
)

import fastrms  # noqa: E402
import fastrms.torch as ft  # noqa: E402
from fastrms import teams  # noqa: E402
from fastrms.optim import OPTIMIZERS  # noqa: E402
from fastrms.torch_precision import storage_for  # noqa: E402

CLASSES = {getattr(ft, n)._spec_name: getattr(ft, n) for n in ft.__all__}
BF16 = np.dtype(ml_dtypes.bfloat16)
SMALL = (7, 1000, (30, 40))
#: Past ft.TEAM_THRESHOLD elements in all: the bucket runs on torch's OpenMP team.
LARGE = (7, 1000, (300, 300))
STEPS = 3
LR = 1e-2
ROUNDINGS = ("stochastic", "nearest", "kahan")


def _tensor(a: np.ndarray):
    """A torch tensor with a copy of ``a`` (bfloat16 arrays through their patterns)."""
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _bits(t) -> np.ndarray:
    """A tensor's (or array's) bytes as a flat array of its width, for bit comparisons."""
    if torch.is_tensor(t):
        t = t.contiguous()
        return t.view(torch.uint16).numpy() if t.dtype is torch.bfloat16 else t.numpy()
    return t.view(np.uint16) if t.dtype == BF16 else t


def _problem(sizes, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = [randn(rng, n, np.float32).astype(dtype) for n in sizes]
    grads = [[randn(rng, p.shape, np.float32).astype(dtype) for p in params] for _ in range(STEPS)]
    return params, grads


def _stepped(name, params, grads, route, options, low):
    """A fastrms.torch optimizer stepped through ``route`` and the NumPy class stepped on
    copies of the same data, both with ``low`` (rounding=/seed= or state_dtype=)."""
    tensors = [_tensor(p) for p in params]
    opt = CLASSES[name](tensors, lr=LR, **options, **low)
    counter = FullRouteCounter(opt)
    ref = OPTIMIZERS[name]([p.copy() for p in params], lr=LR, **options, **low)
    for g in grads:
        for t, gg in zip(tensors, g):
            t.grad = _tensor(gg)
        if route == "full":
            opt._last = None  # forget the last step: the full route again
        opt.step()
        ref.step(g)
    assert counter.calls == (STEPS if route == "full" else 1), route
    return opt, tensors, ref


def _check_params(tensors, ref) -> None:
    for i, t in enumerate(tensors):
        assert_same_bits(_bits(t).reshape(-1), _bits(ref._params[i]).reshape(-1), f"params[{i}]")


def _check_float_state(opt, tensors, ref, extra=()) -> None:
    """Every state tensor equals the NumPy class's array bit for bit (``extra``: state that is
    no slot of the rule, the Kahan compensation)."""
    names = {t: n for t, (n, _) in type(opt)._slots.items()} | {e: e for e in extra}
    for i, t in enumerate(tensors):
        st = opt.state[t]
        for torch_name, name in names.items():
            if name not in ref.state or ref.state[name][i] is None:
                assert st.get(torch_name) is None, torch_name
                continue
            want = ref.state[name][i]
            assert st[torch_name].shape == t.shape
            assert_same_bits(_bits(st[torch_name]).reshape(-1), _bits(want).reshape(-1),
                             f"{torch_name}[{i}]")  # fmt: skip


# -- bfloat16 parameters -------------------------------------------------------------------------


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_bf16_params_match_the_numpy_class_bit_for_bit(name, rounding):
    params, grads = _problem(SMALL, BF16)
    low = {"rounding": rounding, "seed": 11}
    opt, tensors, ref = _stepped(name, params, grads, "repeat", FULL_STATE[name], low)
    _check_params(tensors, ref)
    _check_float_state(opt, tensors, ref, ("kahan_comp",) if rounding == "kahan" else ())
    for t in tensors:
        st = opt.state[t]
        assert all(st[n].dtype is torch.float32 for n in type(opt)._slots if n in st)
        if rounding == "kahan":
            assert st["kahan_comp"].dtype is torch.bfloat16


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("route", ["full", "team"])
@pytest.mark.parametrize("name", ["adam", "sgd", "rmsprop"])
def test_bf16_params_full_and_team_routes(name, route, rounding):
    if route == "team":
        team = teams.torch_team()
        assert team is not None and team.threads() > 1, "torch's OpenMP team is not available"
    params, grads = _problem(LARGE if route == "team" else SMALL, BF16, seed=1)
    low = {"rounding": rounding}
    opt, tensors, ref = _stepped(name, params, grads, route, FULL_STATE[name], low)
    _check_params(tensors, ref)
    _check_float_state(opt, tensors, ref, ("kahan_comp",) if rounding == "kahan" else ())
    if route == "team":
        (run,) = opt._last.runs
        assert run.plan.groups[0].team is not None


def test_bf16_params_with_bf16_state_and_default_rounding():
    params, grads = _problem(SMALL, BF16, seed=2)
    low = {"state_dtype": "bfloat16"}  # rounding: stochastic, seed 0 (the defaults)
    opt, tensors, ref = _stepped("adam", params, grads, "repeat", {}, low)
    _check_params(tensors, ref)
    _check_float_state(opt, tensors, ref)
    assert opt.state[tensors[1]]["exp_avg"].dtype is torch.bfloat16


def test_stochastic_rounding_is_keyed_by_position_seed_and_step():
    """Positions run over all param groups in order (the NumPy class's positions over one
    list); another seed gives other bits."""
    params, grads = _problem(SMALL, BF16, seed=3)
    tensors = [_tensor(p) for p in params]
    opt = ft.Adam([{"params": tensors[:1]}, {"params": tensors[1:]}], lr=LR, seed=4)
    ref = fastrms.Adam([p.copy() for p in params], lr=LR, seed=4)
    for g in grads:
        for t, gg in zip(tensors, g):
            t.grad = _tensor(gg)
        opt.step()
        ref.step(g)
    _check_params(tensors, ref)
    other = [_tensor(p) for p in params]
    opt2 = ft.Adam(other, lr=LR, seed=5)
    for g in grads:
        for t, gg in zip(other, g):
            t.grad = _tensor(gg)
        opt2.step()
    assert not torch.equal(other[1].view(torch.uint16), tensors[1].view(torch.uint16))


def test_stochastic_rounding_moves_what_nearest_leaves():
    """A parameter gaining less than half a bfloat16 ulp per step stays put under "nearest"
    and moves under "stochastic" and "kahan"."""
    moved = {}
    for rounding in ROUNDINGS:
        p = torch.ones(4096, dtype=torch.bfloat16)
        opt = ft.SGD([p], lr=1e-3, rounding=rounding)  # ulp of 1.0 is 2^-7; the step 1e-3
        for _ in range(20):
            p.grad = -torch.ones_like(p)
            opt.step()
        moved[rounding] = float(p.float().mean()) - 1.0
    assert moved["nearest"] == 0.0
    assert 0.01 < moved["stochastic"] < 0.03  # 20 steps of 1e-3: 0.02 expected, unbiased
    assert 0.01 < moved["kahan"] < 0.03


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_bf16_params_state_dict_round_trips(rounding):
    params, grads = _problem(SMALL, BF16, seed=6)
    tensors = [_tensor(p) for p in params]
    opt = ft.Adam(tensors, lr=LR, rounding=rounding, seed=2)
    for g in grads[:2]:
        for t, gg in zip(tensors, g):
            t.grad = _tensor(gg)
        opt.step()
    f = io.BytesIO()
    torch.save(opt.state_dict(), f)
    f.seek(0)
    sd = torch.load(f)
    clones = [t.clone() for t in tensors]
    other = ft.Adam(clones, lr=LR, rounding=rounding, seed=2)
    other.load_state_dict(sd)
    for t, c in zip(tensors, clones):
        for n, v in opt.state[t].items():
            w = other.state[c][n]
            assert w.dtype is v.dtype, n  # float32 state is not cast to the param's bfloat16
            assert_same_bits(_bits(w), _bits(v), n)
    for t, c, g in zip(tensors, clones, grads[2]):
        t.grad, c.grad = _tensor(g), _tensor(g)
    opt.step()
    other.step()
    for t, c in zip(tensors, clones):
        assert_same_bits(_bits(c), _bits(t))


def test_a_strided_bf16_parameter_steps_as_its_contiguous_copy():
    rng = np.random.default_rng(7)
    base = randn(rng, (20, 30), np.float32).astype(BF16)
    strided = _tensor(base)[:, ::2]
    ref = fastrms.Adam([_bits(strided.contiguous()).view(BF16).copy()], lr=LR, rounding="kahan")
    opt = ft.Adam([strided], lr=LR, rounding="kahan")
    for _ in range(STEPS):
        g = randn(rng, strided.shape, np.float32).astype(BF16)
        strided.grad = _tensor(g)
        opt.step()
        ref.step([g])
    assert_same_bits(_bits(strided.contiguous()), _bits(ref._params[0]))


# -- refusals ------------------------------------------------------------------------------------


def test_a_cuda_bf16_parameter_is_refused():
    class FakeCuda:  # what storage_for reads of a tensor (no GPU here)
        dtype, device = torch.bfloat16, torch.device("cuda", 0)

        def is_complex(self):
            return False

    with pytest.raises(TypeError, match=r"bfloat16 parameters are not supported on cuda"):
        storage_for("fastrms.torch.Adam", "p", FakeCuda(), None, None, None)


def test_float64_state_with_bf16_params_is_refused():
    # (int8 state beside bfloat16 parameters is supported: tests/test_bf16_int8.py)
    p = torch.ones(5000, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="state_dtype='float64' needs float64 parameters"):
        ft.Adam([p], state_dtype="float64")


def _unchanged_after(opt, tensors, error, match):
    before = [t.clone() for t in tensors] + [
        v.clone() for t in tensors for v in opt.state.get(t, {}).values()
    ]
    n_state = {t: len(opt.state.get(t, {})) for t in tensors}
    with pytest.raises(error, match=match):
        opt.step()
    after = [*tensors, *[v for t in tensors for v in opt.state.get(t, {}).values()]]
    assert {t: len(opt.state.get(t, {})) for t in tensors} == n_state
    for a, b in zip(before, after):
        assert a.dtype is b.dtype
        assert a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))


def test_float16_params_are_refused_and_nothing_is_written():
    tensors = [torch.ones(5, dtype=torch.bfloat16), torch.ones(3, dtype=torch.float16)]
    opt = ft.Adam(tensors)
    for t in tensors:
        t.grad = torch.ones_like(t)
    match = r"float32 and float64 tensors \(and bfloat16, .* only: parameter param_groups\[0\]"
    _unchanged_after(opt, tensors, TypeError, match + r"\['params'\]\[1\]")


def test_bad_bf16_gradient_or_compensation_is_refused_and_nothing_is_written():
    tensors = [torch.ones(5, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)]
    opt = ft.Adam(tensors, rounding="kahan")
    for t in tensors:
        t.grad = torch.ones_like(t)
    opt.step()
    tensors[1].grad_dtype = None  # torch allows a gradient of another dtype then
    tensors[1].grad = torch.ones(3)  # float32 beside a bfloat16 parameter
    _unchanged_after(opt, tensors, TypeError, "has dtype torch.float32")
    tensors[1].grad = torch.ones_like(tensors[1])
    opt.state[tensors[1]]["kahan_comp"] = torch.zeros(3)  # float32: not its storage
    match = r"state\['kahan_comp'\] \(shape \(3,\), torch.float32"
    _unchanged_after(opt, tensors, ValueError, match)


# -- 8-bit state ---------------------------------------------------------------------------------

#: A tensor under 4096 elements (float32 state), one with a ragged last block, a 2-D one.
INT8_SIZES = (7, 5000, (80, 70))
INT8 = {"state_dtype": "int8"}


def _check_int8_state(opt, tensors, ref) -> None:
    """Codes and scales (or float32 state for a small tensor) equal the NumPy class's."""
    for i, t in enumerate(tensors):
        st = opt.state[t]
        for torch_name, (name, _) in type(opt)._slots.items():
            if name not in ref.state or ref.state[name][i] is None:
                continue
            want = ref.state[name][i]
            if t.numel() < 4096:
                assert isinstance(want, np.ndarray) and torch_name + "_scales" not in st
                assert st[torch_name].dtype is torch.float32
                assert_same_bits(st[torch_name].numpy(), want, f"{torch_name}[{i}]")
                continue
            codes, scales = st[torch_name], st[torch_name + "_scales"]
            assert codes.dtype is torch.uint8 and codes.shape == t.shape
            assert scales.dtype is torch.float32 and scales.shape == (-(-t.numel() // 256),)
            assert_same_bits(codes.numpy(), want.codes, f"{torch_name}[{i}] codes")
            assert_same_bits(scales.numpy(), want.scales, f"{torch_name}[{i}] scales")


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_int8_state_matches_the_numpy_class_bit_for_bit(name):
    params, grads = _problem(INT8_SIZES, np.float32, seed=8)
    opt, tensors, ref = _stepped(name, params, grads, "repeat", FULL_STATE[name], INT8)
    _check_params(tensors, ref)
    _check_int8_state(opt, tensors, ref)


@pytest.mark.parametrize("route", ["full", "repeat"])
@pytest.mark.parametrize("name", ["adam", "adagrad", "sgd"])
def test_int8_state_full_route_and_large_buckets(name, route):
    params, grads = _problem(LARGE + INT8_SIZES, np.float32, seed=9)
    options = FULL_STATE[name] | ({"initial_accumulator_value": 0.1} if name == "adagrad" else {})
    opt, tensors, ref = _stepped(name, params, grads, route, options, INT8)
    _check_params(tensors, ref)
    _check_int8_state(opt, tensors, ref)


def test_int8_state_memory_is_its_codes_and_scales():
    p = torch.zeros(1 << 16)
    opt = ft.Adam([p], state_dtype="int8")
    p.grad = torch.ones_like(p)
    opt.step()
    st = opt.state[p]
    nbytes = sum(v.nbytes for n, v in st.items() if n != "step")
    assert set(st) == {"step", "exp_avg", "exp_avg_scales", "exp_avg_sq", "exp_avg_sq_scales"}
    assert nbytes == 2 * (p.numel() + 4 * p.numel() // 256)  # 2.03 bytes per parameter


def test_a_dense_parameter_is_blocked_in_memory_order():
    """A transposed weight's codes take its strides; its blocks run through its memory, so it
    steps as the NumPy class steps the contiguous array that memory holds."""
    rng = np.random.default_rng(10)
    base = randn(rng, (70, 80), np.float32)
    dense = torch.from_numpy(base.copy()).t()
    opt = ft.Adam([dense], lr=LR, state_dtype="int8")
    ref = fastrms.Adam([base.copy()], lr=LR, state_dtype="int8")
    for _ in range(STEPS):
        g = randn(rng, base.shape, np.float32)
        dense.grad = torch.from_numpy(g.copy()).t()
        opt.step()
        ref.step([g])
    assert opt.state[dense]["exp_avg"].stride() == dense.stride()
    assert_same_bits(dense.t().numpy(), ref._params[0])
    for n in ("exp_avg", "exp_avg_sq"):
        assert_same_bits(opt.state[dense][n].t().numpy(), ref.state[n][0].codes, n)
        assert_same_bits(opt.state[dense][n + "_scales"].numpy(), ref.state[n][0].scales, n)


def _trained_int8(seed=11, **options):
    params, grads = _problem(INT8_SIZES, np.float32, seed=seed)
    tensors = [_tensor(p) for p in params]
    opt = ft.Adam(tensors, lr=LR, amsgrad=True, **options)
    for g in grads[:2]:
        for t, gg in zip(tensors, g):
            t.grad = _tensor(gg)
        opt.step()
    return opt, tensors, grads[2]


def test_int8_state_dict_round_trips_bit_for_bit():
    opt, tensors, last = _trained_int8(**INT8)
    clones = [t.clone() for t in tensors]
    other = ft.Adam(clones, lr=LR, amsgrad=True, **INT8)
    other.load_state_dict(torch_round_trip(opt.state_dict()))
    for t, c in zip(tensors, clones):
        assert set(opt.state[t]) == set(other.state[c])
        for n, v in opt.state[t].items():
            assert other.state[c][n].dtype is v.dtype, n
            assert_same_bits(other.state[c][n].numpy(), v.numpy(), n)
    for t, c, g in zip(tensors, clones, last):
        t.grad, c.grad = _tensor(g), _tensor(g)
    opt.step()
    other.step()
    for t, c in zip(tensors, clones):
        assert_same_bits(c.numpy(), t.numpy())


def test_int8_dequantized_export_loads_into_torch_optim():
    opt, tensors, last = _trained_int8(**INT8)
    sd = torch_round_trip(opt.state_dict(dequantize=True))
    assert opt.state[tensors[1]]["exp_avg"].dtype is torch.uint8  # its own state unchanged
    clones = [t.clone() for t in tensors]
    twin = torch.optim.Adam(clones, lr=LR, amsgrad=True, foreach=False)
    twin.load_state_dict(sd)
    signed = {"exp_avg": True, "exp_avg_sq": False, "max_exp_avg_sq": False}
    for t, c in zip(tensors, clones):
        assert not any(n.endswith("_scales") for n in twin.state[c])
        for n, s in signed.items():
            held, got = opt.state[t][n], twin.state[c][n]
            assert got.dtype is torch.float32 and got.shape == t.shape
            if t.numel() < 4096:
                assert_same_bits(got.numpy(), held.numpy(), n)
            else:
                q = fastrms.lowprecision.Quantized(
                    held.numpy(), opt.state[t][n + "_scales"].numpy()
                )
                assert_same_bits(got.numpy(), q.dequantize(s), n)
    for c, g in zip(clones, last):
        c.grad = _tensor(g)
    twin.step()
    assert all(torch.isfinite(c).all() for c in clones)


def test_a_float32_checkpoint_loads_into_int8_state_quantized_and_back():
    f32, tensors, _ = _trained_int8(seed=12)
    clones = [t.clone() for t in tensors]
    low = ft.Adam(clones, lr=LR, amsgrad=True, **INT8)
    low.load_state_dict(torch_round_trip(f32.state_dict()))
    for t, c in zip(tensors, clones):
        for n, s in (("exp_avg", True), ("exp_avg_sq", False)):
            a = f32.state[t][n].numpy()
            if t.numel() < 4096:
                assert_same_bits(low.state[c][n].numpy(), a, n)
                continue
            q = fastrms.lowprecision.Quantized.of(a, s)
            assert_same_bits(low.state[c][n].numpy(), q.codes, n)
            assert_same_bits(low.state[c][n + "_scales"].numpy(), q.scales, n)
    back_clones = [t.clone() for t in tensors]
    back = ft.Adam(back_clones, lr=LR, amsgrad=True)  # int8 into float32 state: dequantized
    back.load_state_dict(torch_round_trip(low.state_dict()))
    want = low.state_dict(dequantize=True)["state"]
    for i, b in enumerate(back_clones):
        assert not any(n.endswith("_scales") for n in back.state[b])
        for n in ("exp_avg", "exp_avg_sq"):
            assert back.state[b][n].dtype is torch.float32
            assert_same_bits(back.state[b][n].numpy(), want[i][n].numpy(), n)
    for c in back_clones:
        c.grad = torch.ones_like(c)
    back.step()


def test_bad_int8_scales_are_refused_and_nothing_is_written():
    opt, tensors, last = _trained_int8(**INT8)
    for t, g in zip(tensors, last):
        t.grad = _tensor(g)
    opt.state[tensors[1]]["exp_avg_scales"] = torch.zeros(3)
    _unchanged_after(opt, tensors, ValueError, r"state\['exp_avg_scales'\] \(shape \(3,\)")
    del opt.state[tensors[1]]["exp_avg_scales"]
    _unchanged_after(opt, tensors, ValueError, r"state\['exp_avg_scales'\] \(NoneType\)")
