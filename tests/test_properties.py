"""Hypothesis: random hyperparameters, sizes, shapes and data; the compiled cpu backend equals
the NumPy reference bit for bit, and a few properties hold for any valid input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ALGOS, DTYPES, all_arrays, assert_same_bits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastrms.kernels.cpu import PARALLEL_THRESHOLD

rate = st.floats(0.0, 1.0)  # lr, weight_decay, lr_decay, ...: anywhere in [0, 1]
decay = st.floats(0.0, 1.0, exclude_max=True)  # betas: [0, 1)
eps = st.floats(-12, 0).map(lambda e: 10.0**e)  # 1e-12 .. 1, spread over the decades
flag = st.booleans()
momentum = st.one_of(st.just(0.0), st.floats(0.0, 0.99))


@st.composite
def _sgd(draw):
    options = dict(lr=draw(rate), weight_decay=draw(rate), maximize=draw(flag))
    options["momentum"] = draw(momentum)
    options["nesterov"] = options["momentum"] > 0 and draw(flag)
    options["dampening"] = 0.0 if options["nesterov"] else draw(rate)
    return options


HYPER = {
    "rmsprop": st.fixed_dictionaries(
        dict(
            lr=rate, alpha=rate, eps=eps, weight_decay=rate, momentum=momentum,
            centered=flag, eps_in_sqrt=flag, maximize=flag,
        )
    ),
    "adagrad": st.fixed_dictionaries(
        dict(
            lr=rate, lr_decay=rate, weight_decay=rate, initial_accumulator_value=rate,
            eps=eps, eps_in_sqrt=flag, maximize=flag,
        )
    ),
    "adam": st.fixed_dictionaries(
        dict(
            lr=rate, betas=st.tuples(decay, decay), eps=eps, weight_decay=rate, amsgrad=flag,
            maximize=flag,
        )
    ),
    "sgd": _sgd(),
    "lion": st.fixed_dictionaries(
        dict(lr=rate, betas=st.tuples(decay, decay), weight_decay=rate, maximize=flag)
    ),
    "adamax": st.fixed_dictionaries(
        dict(lr=rate, betas=st.tuples(decay, decay), eps=eps, weight_decay=rate, maximize=flag)
    ),
    "adadelta": st.fixed_dictionaries(
        dict(lr=rate, rho=rate, eps=eps, weight_decay=rate, maximize=flag)
    ),
    "radam": st.fixed_dictionaries(
        dict(
            lr=rate, betas=st.tuples(decay, decay), eps=eps, weight_decay=rate,
            decoupled_weight_decay=flag, maximize=flag,
        )
    ),
    "nadam": st.fixed_dictionaries(
        dict(
            lr=rate, betas=st.tuples(decay, decay), eps=eps, weight_decay=rate,
            momentum_decay=st.floats(0.0, 1.0), decoupled_weight_decay=flag, maximize=flag,
        )
    ),
}  # fmt: skip
HYPER["adamw"] = HYPER["adam"]

shapes = st.one_of(
    st.integers(0, 3000).map(lambda n: (n,)),
    st.tuples(st.integers(0, 60), st.integers(0, 50)),
    st.just(()),
)

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _data(seed: int, shape, dtype, steps: int, scale: float):
    """Parameters and gradients: normal, times ``scale``, with a few magnitudes mixed in."""
    rng = np.random.default_rng(seed)

    def draw():
        a = rng.standard_normal(shape) * scale * 10.0 ** rng.integers(-3, 4, shape)
        return np.asarray(a, dtype)

    return draw(), [draw() for _ in range(steps)]


def _run_both(algo: str, hyper: dict, p0, grads):
    """The same steps on the cpu and numpy backends; every array equal bit for bit."""
    opts = {b: ALGOS[algo].cls(p0.copy(), backend=b, **hyper) for b in ("cpu", "numpy")}
    for g in grads:
        for opt in opts.values():
            opt.step(g)
    got, want = all_arrays(opts["cpu"]), all_arrays(opts["numpy"])
    assert got.keys() == want.keys()
    for name in want:
        assert_same_bits(got[name], want[name], name)
    return opts["cpu"]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("algo", ALGOS)
@SETTINGS
@given(
    data=st.data(),
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_cpu_equals_reference(algo, data, shape, dtype, steps, seed, scale):
    """Any valid hyperparameters, any size up to 3000, any shape: cpu == numpy, exactly.

    (Extreme values may overflow to Inf or NaN in float32; NumPy warns about it, and the
    two backends must still agree to the bit. The warnings are silenced as expected.)"""
    hyper = data.draw(HYPER[algo], label="hyper")
    p0, grads = _data(seed, shape, dtype, steps, scale)
    _run_both(algo, hyper, p0, grads)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("algo", ALGOS)
@settings(max_examples=6, deadline=None)
@given(
    data=st.data(),
    n=st.sampled_from([PARALLEL_THRESHOLD - 1, PARALLEL_THRESHOLD, PARALLEL_THRESHOLD + 999]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
def test_parallel_threshold(algo, data, n, dtype, seed):
    """Either side of the switch to the parallel kernel, the result does not change."""
    hyper = data.draw(HYPER[algo], label="hyper")
    p0, grads = _data(seed, (n,), dtype, 2, 1.0)
    _run_both(algo, hyper, p0, grads)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("algo", ALGOS)
@SETTINGS
@given(
    data=st.data(),
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
def test_maximize_is_descent_on_minus_grad(algo, data, shape, dtype, seed):
    """``maximize=True`` with ``g`` is ``maximize=False`` with ``-g``, to the bit, whatever
    the other hyperparameters (NaN from extreme ones included)."""
    hyper = {**data.draw(HYPER[algo], label="hyper"), "maximize": False}
    p0, grads = _data(seed, shape, dtype, 3, 1.0)
    up = ALGOS[algo].cls(p0.copy(), backend="cpu", **{**hyper, "maximize": True})
    down = ALGOS[algo].cls(p0.copy(), backend="cpu", **hyper)
    for g in grads:
        up.step(g)
        down.step(np.asarray(-g))  # (-g of a 0-d array is a NumPy scalar)
    got, want = all_arrays(up), all_arrays(down)
    for name in want:
        assert_same_bits(got[name], want[name], name)
