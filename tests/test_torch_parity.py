"""fastrms matches ``torch.optim`` to float rounding, option by option.

Every option combination of RMSprop, Adagrad, Adam, AdamW and SGD runs for STEPS steps on
random parameters, with fresh random gradients at each step, in float32 and float64, on both
host backends, against PyTorch's for-loop implementation (``foreach=False``) and, where PyTorch
has one, its fused CPU kernel (``fused=True``). After every step the parameters and every state
buffer must agree to within ``conftest.ULPS`` ulps (see there for why that tolerance, and
``test_tolerance_rejects_near_misses`` for proof that it catches semantic slips).

torch is a test dependency (the ``test`` extra): these tests must run, never skip, in CI.
"""

from __future__ import annotations

import importlib
import inspect
import os

import numpy as np
import pytest

# torch is a test dependency: in CI a missing torch fails these tests instead of skipping them.
torch = importlib.import_module("torch") if os.environ.get("CI") else pytest.importorskip("torch")

from conftest import (  # noqa: E402
    ALGOS,
    DTYPES,
    FULL_STATE,
    IN_TORCH,
    all_arrays,
    assert_close,
    assert_same_bits,
    option_cases,
    randn,
)

import fastrms  # noqa: E402
from fastrms import functional  # noqa: E402

STEPS = 25
SHAPE = (25, 40)

TORCH_CLASSES = {
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}
#: fastrms state names that PyTorch spells differently
TORCH_STATE_NAME = {"state_sum": "sum"}


@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread():
    """PyTorch on one thread: its thread team costs milliseconds per step on a busy 2-core
    machine, and elementwise results do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TorchTwin:
    """A ``torch.optim`` optimizer on a copy of the parameters, stepped with given gradients."""

    def __init__(self, algo: str, p0: np.ndarray, impl: str, **hyper) -> None:
        self.param = torch.from_numpy(p0.copy())
        kind = {"for-loop": {"foreach": False}, "fused": {"fused": True}}[impl]
        self.opt = TORCH_CLASSES[algo]([self.param], **hyper, **kind)

    def set(self, **hyper) -> None:
        self.opt.param_groups[0].update(hyper)

    def step(self, grad: np.ndarray) -> None:
        self.param.grad = torch.from_numpy(grad.copy())
        self.opt.step()

    def state(self) -> dict[str, np.ndarray]:
        """The state buffers (PyTorch's SGD keeps ``momentum_buffer=None`` without momentum)."""
        st = self.opt.state[self.param]
        return {k: v.numpy() for k, v in st.items() if k != "step" and v is not None}


def assert_matches(opt: fastrms.Optimizer, twin: TorchTwin, when: str) -> None:
    """Parameters and every state buffer close to PyTorch's, and the same buffers exist."""
    assert_close(opt._params[0], twin.param.numpy(), f"param, {when}")
    theirs = twin.state()
    ours = {TORCH_STATE_NAME.get(k, k): arrays[0] for k, arrays in opt.state.items()}
    assert ours.keys() == theirs.keys()
    for name, a in ours.items():
        assert_close(a, theirs[name], f"{name}, {when}")


def _parity_cases():
    """(algo, options, PyTorch implementation, backend). The for-loop implementation runs
    against both host backends; the fused one (none for RMSprop in torch 2.13) against cpu
    only, numpy being equal to cpu bit for bit (test_reference.py)."""
    cases = []
    for case in option_cases(torch_only=True):
        algo, options = case.values
        runs = [("for-loop", "cpu"), ("for-loop", "numpy")]
        if algo != "rmsprop":
            runs.append(("fused", "cpu"))
        cases += [pytest.param(algo, options, i, b, id=f"{case.id}-{i}-{b}") for i, b in runs]
    return cases


@pytest.mark.parametrize("dtype", DTYPES, ids=[np.dtype(d).name for d in DTYPES])
@pytest.mark.parametrize(("algo", "options", "impl", "backend"), _parity_cases())
def test_matches_torch(algo, options, impl, backend, dtype):
    rng = np.random.default_rng(10)
    p0 = randn(rng, SHAPE, dtype)
    hyper = dict(lr=ALGOS[algo].lr, **options)
    opt = ALGOS[algo].cls(p := p0.copy(), backend=backend, **hyper)
    twin = TorchTwin(algo, p0, impl, **hyper)
    for t in range(1, STEPS + 1):
        g = randn(rng, SHAPE, dtype)
        opt.step(g)
        twin.step(g)
        assert_matches(opt, twin, f"step {t}")
    assert np.max(np.abs(p - p0)) > ALGOS[algo].lr  # moved by more than one plain step


SCHEDULES = {  # per step t: hyperparameters that change (the learning rate and one more)
    "rmsprop": lambda t: dict(lr=0.02 * 0.9**t, momentum=0.5 + 0.02 * t),
    "adagrad": lambda t: dict(lr=0.1 / t**0.5, weight_decay=0.01 * (t % 3)),
    "adam": lambda t: dict(lr=0.01 * min(1, t / 5), betas=(0.9 - 0.01 * t, 0.999)),
    "adamw": lambda t: dict(lr=0.01 * 0.95**t, weight_decay=0.1 / t),
    "sgd": lambda t: dict(lr=0.05 / t, momentum=0.9 - 0.01 * t, dampening=0.02 * t),
}
SCHEDULE_OPTIONS = {
    "rmsprop": dict(centered=True, momentum=0.5),
    "adagrad": dict(lr_decay=0.01),
    "adam": dict(amsgrad=True),
    "adamw": dict(),
    "sgd": dict(momentum=0.9),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=[np.dtype(d).name for d in DTYPES])
@pytest.mark.parametrize("algo", SCHEDULES)
def test_schedules_match_torch(algo, dtype):
    """Hyperparameters set on the optimizer between steps act like PyTorch's param_groups."""
    rng = np.random.default_rng(11)
    p0 = randn(rng, SHAPE, dtype)
    opt = ALGOS[algo].cls(p0.copy(), backend="cpu", **SCHEDULE_OPTIONS[algo])
    twin = TorchTwin(algo, p0, "for-loop", **SCHEDULE_OPTIONS[algo])
    for t in range(1, STEPS + 1):
        for name, value in SCHEDULES[algo](t).items():
            setattr(opt, name, value)
        twin.set(**SCHEDULES[algo](t))
        g = randn(rng, SHAPE, dtype)
        opt.step(g)
        twin.step(g)
        assert_matches(opt, twin, f"step {t}")


def assert_nonfinite_match(opt: fastrms.Optimizer, twin: TorchTwin, when: str) -> None:
    """The parameters as in assert_matches (NaN where PyTorch has NaN, the same infinities);
    a state buffer non-finite exactly where PyTorch's is, and close elsewhere. (PyTorch's
    ``lerp`` for Adam's exp_avg turns an infinite average into NaN on the next step,
    ``inf + w * (g - inf)``, where ``beta1 * m + (1 - beta1) * g`` stays infinite.)"""
    assert_close(opt._params[0], twin.param.numpy(), f"param, {when}")
    theirs = twin.state()
    for name, arrays in opt.state.items():
        ours, want = arrays[0], theirs[TORCH_STATE_NAME.get(name, name)]
        finite = np.isfinite(want)
        np.testing.assert_array_equal(np.isfinite(ours), finite, f"{name}, {when}")
        assert_close(ours[finite], want[finite], f"{name}, {when}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's 0/0
@pytest.mark.parametrize("dtype", DTYPES, ids=[np.dtype(d).name for d in DTYPES])
@pytest.mark.parametrize("algo", IN_TORCH)
def test_nonfinite_gradients_propagate_like_torch(algo, dtype):
    """fastrms does not inspect values: NaN or Inf in a gradient reach the parameter and the
    state of that element, as in PyTorch, and leave the other elements alone."""
    rng = np.random.default_rng(12)
    p0 = randn(rng, 100, dtype)
    hyper = dict(lr=ALGOS[algo].lr, **FULL_STATE[algo])
    cpu = ALGOS[algo].cls(p := p0.copy(), backend="cpu", **hyper)
    ref = ALGOS[algo].cls(p0.copy(), backend="numpy", **hyper)
    twin = TorchTwin(algo, p0, "for-loop", **hyper)
    for t in range(1, 7):
        g = randn(rng, 100, dtype)
        if t == 3:
            g[:3] = [np.nan, np.inf, -np.inf]
        cpu.step(g)
        ref.step(g)
        twin.step(g)
        assert_nonfinite_match(cpu, twin, f"step {t}")
        got, want = all_arrays(cpu), all_arrays(ref)
        for name in want:  # the two host backends agree to the bit, NaNs included
            assert_same_bits(got[name], want[name], f"{name}, step {t}")
    assert np.isnan(p[0]) and not np.isfinite(p[1:3]).any()
    assert np.isfinite(p[3:]).all()


def test_torch_defaults_are_ours():
    """Every hyperparameter PyTorch also has defaults to PyTorch's value."""
    for algo in map(ALGOS.get, IN_TORCH):
        ours = inspect.signature(algo.cls).parameters
        theirs = inspect.signature(TORCH_CLASSES[algo.name]).parameters
        shared = [n for n in ours if n in theirs and n != "params"]
        assert "lr" in shared and len(shared) >= 5
        for name in shared:
            assert ours[name].default == theirs[name].default, (algo.name, name)


# -- the tolerance is tight enough to catch the usual semantic slips -------------------------

LR = 1e-2


def _adam(p, st, g, t, **kw):
    functional.adam(p, g, st["exp_avg"], st["exp_avg_sq"], step=t, lr=LR, **kw)


def _adamw_decay_after_update(p, st, g, t):
    _adam(p, st, g, t)
    p *= 1 - LR * 0.1


def _sgd(p, st, g, t):
    functional.sgd(p, g, st["momentum_buffer"], step=t, lr=LR, momentum=0.9, dampening=0.5)


def _adagrad(p, st, g, t):
    functional.adagrad(p, g, st["state_sum"], step=t, lr=LR, lr_decay=0.1)


def _rmsprop(p, st, g, t, **kw):
    functional.rmsprop(p, g, st["square_avg"], lr=LR, **kw)


NEAR_MISSES = {  # name: (algo, PyTorch's options, right step, wrong step)
    "adam-bias-correction-off-by-one": (
        "adam", {}, _adam, lambda p, st, g, t: _adam(p, st, g, t + 1)
    ),
    "adamw-decay-after-update": (
        "adamw", dict(weight_decay=0.1),
        lambda p, st, g, t: _adam(p, st, g, t, weight_decay=0.1, decoupled_weight_decay=True),
        _adamw_decay_after_update,
    ),
    "adamw-as-l2-decay": (
        "adamw", dict(weight_decay=0.1),
        lambda p, st, g, t: _adam(p, st, g, t, weight_decay=0.1, decoupled_weight_decay=True),
        lambda p, st, g, t: _adam(p, st, g, t, weight_decay=0.1),
    ),
    "sgd-buffer-starts-at-zero": (
        "sgd", dict(momentum=0.9, dampening=0.5), _sgd, lambda p, st, g, t: _sgd(p, st, g, t + 1)
    ),
    "adagrad-lr-decay-counts-from-1": (
        "adagrad", dict(lr_decay=0.1), _adagrad, lambda p, st, g, t: _adagrad(p, st, g, t + 1)
    ),
    "rmsprop-eps-inside-sqrt": (
        "rmsprop", {}, _rmsprop, lambda p, st, g, t: _rmsprop(p, st, g, t, eps_in_sqrt=True)
    ),
}  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=[np.dtype(d).name for d in DTYPES])
@pytest.mark.parametrize("name", NEAR_MISSES)
def test_tolerance_rejects_near_misses(name, dtype):
    """A plausible wrong variant of each rule fails the parity check that the right one
    passes, with the same data and harness."""
    algo, options, right, wrong = NEAR_MISSES[name]
    rng = np.random.default_rng(13)
    p0 = randn(rng, SHAPE, dtype)
    grads = [randn(rng, SHAPE, dtype) for _ in range(STEPS)]
    twin = TorchTwin(algo, p0, "for-loop", lr=LR, **options)
    for g in grads:
        twin.step(g)
    names = functional.SLOTS["adam" if algo == "adamw" else algo]
    for variant, should_pass in ((right, True), (wrong, False)):
        p = p0.copy()
        state = {s: np.zeros_like(p) for s in names}
        for t, g in enumerate(grads, start=1):
            variant(p, state, g, t)
        if should_pass:
            assert_close(p, twin.param.numpy())
        else:
            with pytest.raises(AssertionError):
                assert_close(p, twin.param.numpy())
