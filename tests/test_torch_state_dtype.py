"""fastrms.torch with optimizer state held as bfloat16 (``state_dtype="bfloat16"``; issue 18).

Every class steps bit for bit as fastrms's NumPy class with ``state_dtype="bfloat16"`` on the
same data (that class is itself bit-identical to the reference, tests/test_state_dtype.py),
through the full route, the short (repeat) route and torch's OpenMP team; ``opt.state[p]``
holds ``torch.bfloat16`` tensors. Checkpoints: the stored form round-trips bit for bit,
``state_dict(dequantize=True)`` loads into ``torch.optim``, a ``torch.optim`` float32
checkpoint loads rounded to nearest even, and a checkpoint moves between state dtypes. Bad
input is refused with nothing written.
"""

from __future__ import annotations

import copy
import importlib
import os
import pickle

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
from fastrms import lowprecision, teams  # noqa: E402
from fastrms.optim import OPTIMIZERS  # noqa: E402
from fastrms.torch_precision import storage_for  # noqa: E402

CLASSES = {getattr(ft, n)._spec_name: getattr(ft, n) for n in ft.__all__}
SMALL = (7, 1000, (30, 40))
#: Past ft.TEAM_THRESHOLD elements in all: the bucket runs on torch's OpenMP team.
LARGE = (7, 1000, (300, 300))
STEPS = 3
LR = 1e-2


def _problem(sizes, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = [randn(rng, n, np.float32) for n in sizes]
    grads = [[randn(rng, p.shape, np.float32) for p in params] for _ in range(STEPS)]
    return params, grads


def _bits(t) -> np.ndarray:
    """A bfloat16 tensor's (or ml_dtypes array's) ``uint16`` patterns."""
    if torch.is_tensor(t):
        assert t.dtype is torch.bfloat16, t.dtype
        return t.view(torch.uint16).numpy()
    return lowprecision.bf16_bits(t)


def _stepped(name: str, params, grads, route: str, **options):
    """A fastrms.torch optimizer (bf16 state) stepped through ``route``, and the NumPy class
    stepped on copies of the same data."""
    tensors = [torch.from_numpy(p.copy()) for p in params]
    opt = CLASSES[name](tensors, lr=LR, **options, state_dtype="bfloat16")
    counter = FullRouteCounter(opt)
    ref = OPTIMIZERS[name]([p.copy() for p in params], lr=LR, **options, state_dtype="bfloat16")
    for g in grads:
        for t, gg in zip(tensors, g):
            t.grad = torch.from_numpy(gg.copy())
        if route == "full":
            opt._last = None  # forget the last step: the full route again
        opt.step()
        ref.step(g)
    assert counter.calls == (STEPS if route == "full" else 1), route
    return opt, tensors, ref


def _check_same(opt, tensors, ref) -> None:
    for i, t in enumerate(tensors):
        assert_same_bits(t.numpy(), ref._params[i], f"params[{i}]")
        st = opt.state[t]
        for torch_name, (name, _) in type(opt)._slots.items():
            if name not in ref.state:
                assert torch_name not in st or st[torch_name] is None
                continue
            held = st[torch_name]
            assert held.dtype is torch.bfloat16 and held.shape == t.shape
            assert held.untyped_storage().nbytes() >= 2 * t.numel()
            assert_same_bits(_bits(held).reshape(-1), _bits(ref.state[name][i]).reshape(-1),
                             f"{torch_name}[{i}]")  # fmt: skip


@pytest.mark.parametrize("route", ["full", "repeat", "team"])
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_class_matches_the_numpy_class_bit_for_bit(name, route):
    if route == "team":
        team = teams.torch_team()
        assert team is not None and team.threads() > 1, "torch's OpenMP team is not available"
    params, grads = _problem(LARGE if route == "team" else SMALL)
    opt, tensors, ref = _stepped(name, params, grads, route, **FULL_STATE[name])
    _check_same(opt, tensors, ref)


def test_the_team_route_runs_on_the_team():
    params, grads = _problem(LARGE)
    assert sum(p.size for p in params) >= ft.TEAM_THRESHOLD
    opt, tensors, ref = _stepped("adam", params, grads, "repeat")
    (run,) = opt._last.runs
    assert run.plan.groups[0].team is not None


def test_dense_and_strided_parameters_hold_bf16_state_in_their_layout():
    rng = np.random.default_rng(1)
    base = randn(rng, (40, 30), np.float32)
    dense = torch.from_numpy(base.copy()).t()  # dense, not contiguous
    strided = torch.from_numpy(randn(rng, (20, 30), np.float32))[:, ::2]
    opt = ft.Adam([dense, strided], lr=LR, amsgrad=True, state_dtype="bfloat16")
    ref = fastrms.Adam([dense.contiguous().numpy(), strided.contiguous().numpy()], lr=LR,
                       amsgrad=True, state_dtype="bfloat16")  # fmt: skip
    for _ in range(STEPS):
        grads = [randn(rng, t.shape, np.float32) for t in (dense, strided)]
        dense.grad = torch.from_numpy(grads[0].T.copy()).t()  # the parameter's strides
        strided.grad = torch.from_numpy(grads[1])
        opt.step()
        ref.step(grads)
    assert opt.state[dense]["exp_avg"].stride() == dense.stride()
    for i, t in enumerate((dense, strided)):
        assert_same_bits(t.contiguous().numpy(), ref._params[i])
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            held = opt.state[t][name].contiguous()
            assert_same_bits(_bits(held), _bits(ref.state[name][i]), name)


def test_state_is_half_the_memory_and_adagrad_starts_rounded():
    p = torch.zeros(5)
    opt = ft.Adagrad([p], initial_accumulator_value=0.1, state_dtype="bfloat16")
    held = opt.state[p]["sum"]  # made at construction, as torch does
    assert held.dtype is torch.bfloat16 and held.element_size() * held.numel() == 10
    assert_same_bits(_bits(held), lowprecision.round_nearest(np.full(5, 0.1, np.float32)))
    p.grad = torch.ones(5)
    opt.step()
    assert float(opt.state[p]["sum"][0]) == 1.1015625  # bf16(bf16(0.1) + 1)


def test_default_and_float_state_dtypes_keep_the_parameters_dtype():
    for dtype, state_dtype in [(torch.float32, None), (torch.float32, "float32"),
                               (torch.float64, None), (torch.float64, "float64"),
                               (torch.complex64, "float32")]:  # fmt: skip
        p = torch.ones(4, dtype=dtype)
        opt = ft.Adam([p], state_dtype=state_dtype)
        p.grad = torch.ones(4, dtype=dtype)
        opt.step()
        assert opt.state_dtype == state_dtype
        assert opt.state[p]["exp_avg"].dtype is dtype


# -- checkpoints ----------------------------------------------------------------------------------


def _trained(name="adam", state_dtype="bfloat16", seed=2, **options):
    params, grads = _problem(SMALL, seed)
    tensors = [torch.from_numpy(p.copy()) for p in params]
    opt = CLASSES[name](tensors, lr=LR, **options, state_dtype=state_dtype)
    for g in grads[:2]:
        for t, gg in zip(tensors, g):
            t.grad = torch.from_numpy(gg.copy())
        opt.step()
    return opt, tensors, grads[2]


def _state(opt, tensors, name):
    return [opt.state[t][name] for t in tensors]


@pytest.mark.parametrize("name", ["adam", "rmsprop", "sgd"])
def test_the_stored_form_round_trips_bit_for_bit(name):
    opt, tensors, last = _trained(name, **FULL_STATE[name])
    sd = torch_round_trip(opt.state_dict())
    slots = [n for n in type(opt)._slots if n in opt.state[tensors[0]]]
    for n in slots:
        assert all(st[n].dtype is torch.bfloat16 for st in sd["state"].values())
    clones = [t.clone() for t in tensors]
    other = CLASSES[name](clones, lr=LR, **FULL_STATE[name], state_dtype="bfloat16")
    other.load_state_dict(sd)
    for n in slots:
        for a, b in zip(_state(opt, tensors, n), _state(other, clones, n)):
            assert_same_bits(_bits(b), _bits(a), n)
    for t, c, g in zip(tensors, clones, last):  # and they step on alike
        t.grad, c.grad = torch.from_numpy(g.copy()), torch.from_numpy(g.copy())
    opt.step()
    other.step()
    for t, c in zip(tensors, clones):
        assert_same_bits(c.numpy(), t.numpy())


def test_dequantized_export_loads_into_torch_optim():
    opt, tensors, last = _trained("adam", amsgrad=True, weight_decay=0.1)
    held = {n: [t.clone() for t in _state(opt, tensors, n)] for n in ("exp_avg", "exp_avg_sq")}
    sd = torch_round_trip(opt.state_dict(dequantize=True))
    for n, tensors_held in held.items():  # the optimizer's own state is unchanged
        for a, b in zip(_state(opt, tensors, n), tensors_held):
            assert a.dtype is torch.bfloat16 and torch.equal(a, b)
    clones = [t.clone() for t in tensors]
    twin = torch.optim.Adam(clones, lr=LR, amsgrad=True, weight_decay=0.1, foreach=False)
    twin.load_state_dict(sd)
    for n in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        for a, b in zip(_state(opt, tensors, n), _state(twin, clones, n)):
            assert b.dtype is torch.float32
            assert_same_bits(b.numpy(), lowprecision.bf16_to_float32(_bits(a)), n)
    for c, g in zip(clones, last):
        c.grad = torch.from_numpy(g.copy())
    twin.step()  # torch steps on from it
    assert all(torch.isfinite(c).all() for c in clones)


def test_a_torch_optim_checkpoint_loads_rounded_to_nearest_even():
    params, grads = _problem(SMALL, seed=3)
    tensors = [torch.from_numpy(p.copy()) for p in params]
    twin = torch.optim.Adam(tensors, lr=LR, amsgrad=True, foreach=False)
    for g in grads:
        for t, gg in zip(tensors, g):
            t.grad = torch.from_numpy(gg.copy())
        twin.step()
    clones = [t.clone() for t in tensors]
    opt = ft.Adam(clones, lr=LR, amsgrad=True, state_dtype="bfloat16")
    opt.load_state_dict(torch_round_trip(twin.state_dict()))
    for n in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        for a, b in zip(_state(twin, tensors, n), _state(opt, clones, n)):
            want = lowprecision.round_nearest(a.numpy())
            assert_same_bits(_bits(b), want, n)
            assert_same_bits(_bits(b), a.to(torch.bfloat16).view(torch.uint16).numpy(), n)
    for c in clones:  # and it steps on
        c.grad = torch.ones_like(c)
    opt.step()
    assert float(opt.state[clones[0]]["step"]) == STEPS + 1


def test_a_checkpoint_moves_between_state_dtypes():
    low, tensors, _ = _trained("adam")
    full_clones = [t.clone() for t in tensors]
    full = ft.Adam(full_clones, lr=LR)  # float32 state
    full.load_state_dict(torch_round_trip(low.state_dict()))  # widens exactly
    for n in ("exp_avg", "exp_avg_sq"):
        for a, b in zip(_state(low, tensors, n), _state(full, full_clones, n)):
            assert_same_bits(b.numpy(), lowprecision.bf16_to_float32(_bits(a)), n)
    f32, f32_tensors, _ = _trained("adam", state_dtype=None, seed=4)
    back_clones = [t.clone() for t in f32_tensors]
    back = ft.Adam(back_clones, lr=LR, state_dtype="bfloat16")
    back.load_state_dict(f32.state_dict())  # rounds to nearest even
    for n in ("exp_avg", "exp_avg_sq"):
        for a, b in zip(_state(f32, f32_tensors, n), _state(back, back_clones, n)):
            assert_same_bits(_bits(b), lowprecision.round_nearest(a.numpy()), n)


def test_copies_keep_the_state_dtype():
    opt, tensors, _ = _trained("adam")
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert other.state_dtype == "bfloat16"
        p = other.param_groups[0]["params"][0]
        assert other.state[p]["exp_avg"].dtype is torch.bfloat16
        p.grad = torch.ones_like(p)
        other.step()


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "options", "error", "match"),
    [
        ([torch.ones(3)], {"state_dtype": "bf16"}, ValueError, "state_dtype must be one of"),
        ([torch.ones(3)], {"state_dtype": "int4"}, ValueError, "state_dtype must be one of"),
        ([torch.ones(3)], {"rounding": "up"}, ValueError, "rounding must be one of"),
        ([torch.ones(3)], {"seed": 1.5}, TypeError, "seed must be an int"),
        ([torch.ones(3)], {"rounding": "stochastic"}, ValueError,
         r"rounding= applies to bfloat16 parameters; parameter param_groups\[0\]\['params'\]\[0\]"),
        ([torch.ones(3, dtype=torch.float64)], {"seed": 0}, ValueError,
         "seed= applies to bfloat16 parameters"),
        ([torch.ones(3), torch.ones(2, dtype=torch.float64)], {"state_dtype": "bfloat16"},
         ValueError, r"state_dtype='bfloat16' needs float32 parameters, but parameter "
                     r"param_groups\[0\]\['params'\]\[1\]"),
        ([torch.ones(3)], {"state_dtype": "float64"}, ValueError, "needs float64 parameters"),
        ([torch.ones(3, dtype=torch.complex64)], {"state_dtype": "bfloat16"}, TypeError,
         "is for real parameters"),
        ([torch.ones(3, device="meta")], {"state_dtype": "bfloat16"}, TypeError,
         "not supported on meta tensors yet"),
    ],
    ids=["bf16", "int4", "rounding-value", "seed-type", "rounding-f32", "seed-f64", "f64-params",
         "float64-state", "complex", "not-cpu"],
)  # fmt: skip
def test_bad_options_are_refused_at_construction(params, options, error, match):
    with pytest.raises(error, match=match):
        ft.Adam(params, **options)


def test_a_cuda_tensor_with_bf16_state_is_refused():
    class FakeCuda:  # what storage_for reads of a tensor (no GPU here)
        dtype, device = torch.float32, torch.device("cuda", 0)

        def is_complex(self):
            return False

    with pytest.raises(TypeError, match=r"not supported on cuda tensors yet \(CPU only\): p"):
        storage_for("fastrms.torch.Adam", "p", FakeCuda(), "bfloat16", None, None)


def test_a_refused_param_group_is_not_added_and_nothing_is_written():
    p = torch.ones(4)
    opt = ft.Adam([p], state_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\]"):
        opt.add_param_group({"params": [torch.ones(2, dtype=torch.float64)]})
    assert len(opt.param_groups) == 1 and not opt.state


def test_float32_state_in_a_bf16_optimizer_is_refused_and_nothing_is_written():
    opt, tensors, last = _trained("adam")
    opt.state[tensors[1]]["exp_avg"] = torch.zeros_like(tensors[1])  # float32: not held so
    for t, g in zip(tensors, last):
        t.grad = torch.from_numpy(g.copy())
    before = [t.clone() for t in tensors] + [
        v.clone() for t in tensors for v in opt.state[t].values()
    ]
    with pytest.raises(ValueError, match=r"state\['exp_avg'\] \(shape \(1000,\), torch.float32"):
        opt.step()
    after = [*tensors, *[v for t in tensors for v in opt.state[t].values()]]
    for a, b in zip(before, after):
        assert a.dtype is b.dtype and a.reshape(-1).view(torch.uint8).equal(
            b.reshape(-1).view(torch.uint8)
        )
