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

from conftest import FULL_STATE, assert_same_bits, randn  # noqa: E402

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


class _Counter:
    """Counts an optimizer's full-route steps (``_buckets`` is called by the full route only)."""

    def __init__(self, opt) -> None:
        self.calls, self._buckets = 0, opt._buckets
        opt._buckets = self

    def __call__(self):
        self.calls += 1
        return self._buckets()


def _stepped(name, params, grads, route, options, low):
    """A fastrms.torch optimizer stepped through ``route`` and the NumPy class stepped on
    copies of the same data, both with ``low`` (rounding=/seed= or state_dtype=)."""
    tensors = [_tensor(p) for p in params]
    opt = CLASSES[name](tensors, lr=LR, **options, **low)
    counter = _Counter(opt)
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
    """Positions run over all param groups in order; another seed gives other bits; the
    keys follow each parameter's own step count (a parameter that sat out a step)."""
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
    assert not torch.equal(_bits_t(other[1]), _bits_t(tensors[1]))


def _bits_t(t):
    return t.view(torch.uint16)


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


def test_int8_state_with_bf16_params_is_refused():
    p = torch.ones(5000, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="state_dtype='int8' needs float32 parameters"):
        ft.Adam([p], state_dtype="int8")


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
