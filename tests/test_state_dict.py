"""``state_dict()`` round-trips through ``np.savez`` / ``np.load`` and restores exactly.

k steps, save, load into a fresh optimizer, m more steps gives the same bits as k + m steps
without interruption. (Bad state dicts are in test_validation.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ALGOS, DTYPES, FULL_STATE, all_arrays, assert_same_bits, randn

import fastrms

#: Parameter structures, with a 0-d and an empty array among them.
STRUCTURES = {
    "array": (5, 6),
    "list": [(), (0,), (7,), (3, 4)],
    "dict": {"w": (3, 4), "b": (7,), "s": (), "e": (0, 2)},
}


def _params(kind: str, rng, dtype):
    spec = STRUCTURES[kind]
    if kind == "array":
        return randn(rng, spec, dtype)
    if kind == "list":
        return [randn(rng, s, dtype) for s in spec]
    return {k: randn(rng, s, dtype) for k, s in spec.items()}


def _copy(params):
    if isinstance(params, dict):
        return {k: v.copy() for k, v in params.items()}
    if isinstance(params, list):
        return [p.copy() for p in params]
    return params.copy()


def _grads(params, rng):
    if isinstance(params, dict):
        return {k: randn(rng, v.shape, v.dtype) for k, v in params.items()}
    if isinstance(params, list):
        return [randn(rng, p.shape, p.dtype) for p in params]
    return randn(rng, params.shape, params.dtype)


def _assign(dst, src) -> None:
    """Copy parameter values in place (what a user's checkpoint code does for the model)."""
    if isinstance(dst, dict):
        for k in dst:
            dst[k][...] = src[k]
    elif isinstance(dst, list):
        for d, s in zip(dst, src):
            d[...] = s
    else:
        dst[...] = src


def _save_load(sd: dict, path) -> dict:
    np.savez(path, **sd)
    with np.load(path) as f:  # allow_pickle=False: a state dict holds no Python objects
        return dict(f)


def _assert_same(a: fastrms.Optimizer, b: fastrms.Optimizer) -> None:
    assert a.step_count == b.step_count
    got, want = all_arrays(a), all_arrays(b)
    assert got.keys() == want.keys()
    for name in want:
        assert_same_bits(got[name], want[name], name)
    for h in a.hyperparameters:
        assert getattr(a, h) == getattr(b, h), h


@pytest.mark.parametrize("k", [0, 1, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=[np.dtype(d).name for d in DTYPES])
@pytest.mark.parametrize("kind", STRUCTURES)
@pytest.mark.parametrize("algo", ALGOS)
def test_round_trip(algo, kind, dtype, k, tmp_path):
    """k steps, save to .npz, load into a fresh optimizer (made with other hyperparameters,
    after steps of its own), m = 3 more steps: the same bits as k + 3 steps in one go."""
    rng = np.random.default_rng(30)
    params = _params(kind, rng, dtype)
    grads = [_grads(params, rng) for _ in range(k + 3)]
    cls, hyper = ALGOS[algo].cls, dict(lr=ALGOS[algo].lr, **FULL_STATE[algo])

    whole = cls(_copy(params), **hyper)
    for g in grads:
        whole.step(g)

    first = cls(p := _copy(params), **hyper)
    for g in grads[:k]:
        first.step(g)
    sd = _save_load(first.state_dict(), tmp_path / "opt.npz")

    fresh = cls(q := _copy(params))  # default hyperparameters: the state dict brings them
    for g in grads[-2:]:
        fresh.step(g)  # a state of its own, which the load must replace entirely
    _assign(q, p)
    fresh.load_state_dict(sd)
    assert fresh.step_count == k
    for g in grads[k:]:
        fresh.step(g)
    _assert_same(fresh, whole)


def test_contents():
    p = np.ones((2, 3), np.float32)
    opt = fastrms.Adam({"w": p}, lr=0.5, betas=(0.8, 0.9), amsgrad=True)
    opt.step({"w": np.full((2, 3), 2.0, np.float32)})
    sd = opt.state_dict()
    assert sd["optimizer"] == "Adam" and sd["step"] == 1
    assert sd["hyper.lr"] == 0.5 and sd["hyper.betas"] == (0.8, 0.9)
    assert sd["hyper.amsgrad"] is True and sd["hyper.maximize"] is False
    assert sorted(k for k in sd if k.startswith("state.")) == [
        "state.exp_avg.w", "state.exp_avg_sq.w", "state.max_exp_avg_sq.w"
    ]  # fmt: skip
    for name, arrays in opt.state.items():
        a = sd[f"state.{name}.w"]
        assert type(a) is np.ndarray and a.dtype == np.float32 and a.shape == (2, 3)
        assert_same_bits(a, arrays[0])
        assert not np.shares_memory(a, arrays[0])  # a copy: the caller may keep or change it


def test_fresh_optimizer_round_trip(tmp_path):
    """A state dict taken before any step: the state at its initial value (AdaGrad's
    initial_accumulator_value), and the next step is still the first."""
    opt = fastrms.AdaGrad(np.ones(4), initial_accumulator_value=0.5, lr_decay=0.1)
    sd = _save_load(opt.state_dict(), tmp_path / "opt.npz")
    assert sd["step"] == 0
    np.testing.assert_array_equal(sd["state.state_sum"], np.full(4, 0.5))
    other = fastrms.AdaGrad(np.ones(4))
    other.load_state_dict(sd)
    g = np.arange(4.0)
    opt.step(g)
    other.step(g)
    _assert_same(other, opt)


def test_loaded_arrays_are_copied():
    opt = fastrms.RMSProp(np.ones(3), momentum=0.9)
    opt.step(np.ones(3))
    sd = opt.state_dict()
    twin = fastrms.RMSProp(opt._params[0].copy())
    twin.load_state_dict(sd)
    for value in sd.values():
        if isinstance(value, np.ndarray):
            value[...] = np.nan  # the loaded optimizer does not see this
    for o in (opt, twin):
        o.step(np.ones(3))
    _assert_same(twin, opt)


def _set(opt, options: dict) -> None:
    for name, value in options.items():
        setattr(opt, name, value)


def test_options_switched_off_and_on(tmp_path):
    """Momentum and centering off for a while: their buffers wait in the state (and in the
    state dict), and come back as they were, as in an uninterrupted run."""
    rng = np.random.default_rng(31)
    p0 = randn(rng, 50, np.float64)
    grads = [randn(rng, 50, np.float64) for _ in range(8)]
    schedule = [dict(momentum=0.9, centered=True)] * 2 + [dict(momentum=0.0, centered=False)] * 3
    schedule += [dict(momentum=0.5, centered=True)] * 3

    whole = fastrms.RMSProp(p0.copy())
    for g, options in zip(grads, schedule):
        _set(whole, options)
        whole.step(g)

    opt = fastrms.RMSProp(p := p0.copy())
    for t, (g, options) in enumerate(zip(grads, schedule)):
        _set(opt, options)
        opt.step(g)
        if t in (0, 3):  # save and restart with buffers in use, then with buffers idle
            sd = _save_load(opt.state_dict(), tmp_path / "opt.npz")
            opt = fastrms.RMSProp(p)
            opt.load_state_dict(sd)
    _assert_same(opt, whole)


def test_load_restores_the_schedule():
    opt = fastrms.SGD([np.ones(2)], lr=0.1, momentum=0.9)
    opt.step([np.ones(2)])
    opt.lr = 0.025  # a schedule's value
    other = fastrms.SGD([np.ones(2)])
    other.load_state_dict(opt.state_dict())
    assert (other.lr, other.momentum, other.step_count) == (0.025, 0.9, 1)
