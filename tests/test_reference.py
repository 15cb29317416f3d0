"""The compiled CPU kernels equal the NumPy reference backend bit for bit.

Both backends perform the same float operations in the same order, so every option
combination, dtype, size and shape must agree exactly, on the parameters and on every state
array. Where PyTorch has no equivalent (eps inside the square root, Chainer's RMSpropGraves),
both are checked against the formulas written out below, in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    ALGOS,
    DTYPES,
    FULL_STATE,
    all_arrays,
    assert_close,
    assert_same_bits,
    option_cases,
    randn,
)

import fastrms
from fastrms import reference
from fastrms.kernels.cpu import PARALLEL_THRESHOLD

STEPS = 6  # covers SGD's first step (buffer = gradient) and changing bias corrections

#: 1-D sizes: 150,000 runs the parallel (prange) kernel, the others the serial one.
SIZES = (0, 1, 7, 1000, 150_000)
#: Other shapes: the kernels see a flat view, whose writes must reach the caller's array.
SHAPES = {"0d": (), "2d-7x3": (7, 3), "2d-0x5": (0, 5), "2d-400x400-parallel": (400, 400)}

DTYPE_IDS = [np.dtype(d).name for d in DTYPES]


def test_sizes_cover_both_loops():
    assert max(SIZES) >= PARALLEL_THRESHOLD > 1000
    assert np.prod(SHAPES["2d-400x400-parallel"]) >= PARALLEL_THRESHOLD


def _cpu_vs_numpy(algo: str, options: dict, dtype, shape, seed: int = 0) -> None:
    """STEPS steps with both backends on the same data; every array equal bit for bit."""
    rng = np.random.default_rng(seed)
    p0 = randn(rng, shape, dtype)
    cls, lr = ALGOS[algo].cls, ALGOS[algo].lr
    cpu = cls(p0.copy(), lr=lr, backend="cpu", **options)
    ref = cls(p0.copy(), lr=lr, backend="numpy", **options)
    for _ in range(STEPS):
        g = randn(rng, shape, dtype)
        cpu.step(g)
        ref.step(g)
    got, want = all_arrays(cpu), all_arrays(ref)
    assert got.keys() == want.keys()
    for name in want:
        assert_same_bits(got[name], want[name], name)
    if p0.size:  # the comparison is not between two no-ops
        assert not np.array_equal(got["param0"], p0)


@pytest.mark.parametrize("size", SIZES, ids=[f"n={n}" for n in SIZES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("algo", "options"), option_cases())
def test_cpu_equals_numpy_sizes(algo, options, dtype, size):
    _cpu_vs_numpy(algo, options, dtype, (size,))


# The shape only changes how the arrays are flattened, not the kernel: checked with the options
# that use every state array of each optimizer.
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("algo", "options"), FULL_STATE.items(), ids=FULL_STATE.keys())
def test_cpu_equals_numpy_shapes(algo, options, dtype, shape):
    _cpu_vs_numpy(algo, options, dtype, shape)


# -- formulas for what PyTorch lacks: eps inside the square root, and RMSpropGraves ----------


def _rmsprop_eps_in_sqrt(p, grads, *, lr, alpha, eps, weight_decay, momentum, centered, maximize):
    """RMSProp with eps inside the sqrt (TF/Keras ``ApplyRMSProp``, Optax ``eps_in_sqrt``),
    momentum in PyTorch's form (lr outside the buffer)."""
    v, m, b = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    for g in grads:
        g = (-g if maximize else g) + weight_decay * p
        v = alpha * v + (1 - alpha) * g**2
        if centered:
            m = alpha * m + (1 - alpha) * g
            step = g / np.sqrt(v - m**2 + eps)
        else:
            step = g / np.sqrt(v + eps)
        if momentum:
            b = momentum * b + step
            p = p - lr * b
        else:
            p = p - lr * step
    state = {"square_avg": v, "momentum_buffer": b, "grad_avg": m}
    return p, state


def _adagrad_eps_in_sqrt(
    p, grads, *, lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize
):
    """AdaGrad with eps inside the sqrt (Keras, Optax), PyTorch's learning-rate decay."""
    s = np.full_like(p, initial_accumulator_value)
    for t, g in enumerate(grads, start=1):
        g = (-g if maximize else g) + weight_decay * p
        s = s + g**2
        p = p - lr / (1 + (t - 1) * lr_decay) * g / np.sqrt(s + eps)
    return p, {"state_sum": s}


FORMULAS = {"rmsprop": _rmsprop_eps_in_sqrt, "adagrad": _adagrad_eps_in_sqrt}
HYPER = {  # non-default values, so that a swapped or ignored hyperparameter shows
    "rmsprop": dict(alpha=0.9, eps=1e-3),
    "adagrad": dict(eps=1e-3),
}
EPS_IN_SQRT_CASES = [c for c in option_cases() if c.values[1].get("eps_in_sqrt")]


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize(("algo", "options"), EPS_IN_SQRT_CASES)
def test_eps_in_sqrt_matches_formula(algo, options, backend):
    rng = np.random.default_rng(2)
    p0 = randn(rng, 500, np.float64)
    grads = [randn(rng, 500, np.float64) for _ in range(20)]
    hyper = dict(lr=ALGOS[algo].lr, **HYPER[algo], **options)
    opt = ALGOS[algo].cls(p := p0.copy(), backend=backend, **hyper)
    for g in grads:
        opt.step(g)
    del hyper["eps_in_sqrt"]
    want_p, want_state = FORMULAS[algo](p0, grads, **hyper)
    assert_close(p, want_p, "param")
    for name, arrays in opt.state.items():
        assert_close(arrays[0], want_state[name], name)
    # eps really is inside: the same run with eps outside ends elsewhere
    other = ALGOS[algo].cls(q := p0.copy(), backend=backend, **{**hyper, "eps_in_sqrt": False})
    for g in grads:
        other.step(g)
    assert np.max(np.abs(q - want_p)) > 1e3 * np.max(np.abs(p - want_p))


def _chainer_rmsprop_graves(param, grads, *, lr, alpha, momentum, eps):
    """chainer.optimizers.RMSpropGraves.update_core_cpu, written out (Graves 2013, 38-41)."""
    ms, mg, delta = np.zeros_like(param), np.zeros_like(param), np.zeros_like(param)
    for grad in grads:
        ms = alpha * ms + (1 - alpha) * grad * grad
        mg = alpha * mg + (1 - alpha) * grad
        delta = momentum * delta - lr * grad / np.sqrt(ms - mg * mg + eps)
        param = param + delta
    return param, ms, mg, delta


CHAINER_DEFAULTS = dict(lr=1e-4, alpha=0.95, momentum=0.9, eps=1e-4)


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize(
    "hyper",
    [{}, dict(lr=1e-2, alpha=0.9, momentum=0.5, eps=1e-3)],
    ids=["chainer-defaults", "custom"],
)
def test_graves_matches_chainer(hyper, backend):
    rng = np.random.default_rng(3)
    p0 = randn(rng, (20, 30), np.float64)
    grads = [randn(rng, p0.shape, np.float64) for _ in range(25)]
    opt = fastrms.RMSProp.graves(p := p0.copy(), backend=backend, **hyper)
    for g in grads:
        opt.step(g)
    want = {**CHAINER_DEFAULTS, **hyper}
    param, ms, mg, delta = _chainer_rmsprop_graves(p0, grads, **want)
    assert_close(p, param, "param")
    # Chainer's lr = 1e-4 moves p by ~0.03 here; the tolerance, 16 ulps of |p| ~ 1e-14, is
    # a 1e-12 part of that.
    assert np.max(np.abs(p - p0)) > 1e-2
    assert_close(opt.state["square_avg"][0], ms, "ms")
    assert_close(opt.state["grad_avg"][0], mg, "mg")
    # PyTorch-form buffer b and Chainer's delta: delta = -lr * b while lr is constant
    assert_close(-want["lr"] * opt.state["momentum_buffer"][0], delta, "delta")


# -- the naive textbook versions the benchmarks race against compute the same update ------


NAIVE_CASES = {  # naive function -> (state arrays, takes step=, the fastrms optimizer)
    "naive_rmsprop": (1, False, lambda p: fastrms.RMSProp(p)),
    "naive_rmsprop_centered_momentum": (
        3, False, lambda p: fastrms.RMSProp(p, centered=True, momentum=0.9)
    ),
    "naive_adagrad": (1, False, lambda p: fastrms.AdaGrad(p)),
    "naive_adam": (2, True, lambda p: fastrms.Adam(p)),
    "naive_amsgrad": (3, True, lambda p: fastrms.Adam(p, amsgrad=True)),
    # starts its buffer at zero, fastrms (like PyTorch) at the gradient: the same with
    # dampening 0, where the first step gives buf = g either way
    "naive_sgd_momentum": (1, False, lambda p: fastrms.SGD(p, momentum=0.9)),
}  # fmt: skip


@pytest.mark.parametrize("name", NAIVE_CASES)
def test_naive_versions_agree(name):
    n_state, takes_step, make = NAIVE_CASES[name]
    rng = np.random.default_rng(4)
    p0 = randn(rng, 300, np.float64)
    grads = [randn(rng, 300, np.float64) for _ in range(10)]
    naive, state = p0.copy(), [np.zeros(300) for _ in range(n_state)]
    for t, g in enumerate(grads, start=1):
        getattr(reference, name)(naive, g, *state, **({"step": t} if takes_step else {}))
    opt = make(p := p0.copy())
    for g in grads:
        opt.step(g)
    assert_close(naive, p, name)
    assert not np.array_equal(p, p0)


# -- edge values -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize(("option", "value"), [("eps", 1e-50), ("weight_decay", 1e39)])
def test_hyperparameters_that_do_not_fit_float32_are_refused(backend, option, value):
    """eps = 1e-50 is valid in float64 but rounds to 0 in float32 (0/0 = NaN wherever the
    gradient and state are 0); weight_decay = 1e39 overflows. With float32 arrays both are
    refused, naming the argument, before anything is written; float64 arrays take them."""
    g = np.ones(7, np.float32)
    p, v = np.ones(7, np.float32), np.zeros(7, np.float32)
    with pytest.raises(ValueError, match=f"{option} = .* does not fit in float32"):
        fastrms.functional.rmsprop(p, g, v, backend=backend, **{option: value})
    assert_same_bits(p, np.ones(7, np.float32))
    assert_same_bits(v, np.zeros(7, np.float32))
    p64 = np.ones(7)
    fastrms.functional.rmsprop(p64, np.ones(7), np.zeros(7), backend=backend, **{option: value})
    assert not np.array_equal(p64, np.ones(7))


def test_amsgrad_keeps_nan_in_max_like_np_maximum():
    """A NaN in max_exp_avg_sq (state passed to the functional form, or loaded) stays NaN
    next to a finite v, as torch.maximum(v_max, v) and np.maximum keep it. (Through the
    classes alone v is NaN too by then: an EMA never forgets a NaN, since 0 * NaN is NaN.)"""
    out = {}
    for backend in ("cpu", "numpy"):
        p, g, m, v = np.ones(2), np.ones(2), np.zeros(2), np.zeros(2)
        vmax = np.array([np.nan, 0.0])
        fastrms.functional.adam(
            p, g, m, v, step=1, max_exp_avg_sq=vmax, amsgrad=True, backend=backend
        )
        out[backend] = vmax
    assert np.isnan(out["numpy"][0])
    assert_same_bits(out["cpu"], out["numpy"])
