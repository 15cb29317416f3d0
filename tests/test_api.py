"""The optimizer classes and the functional one-step form: structures, schedules, state, and
the public surface. Numerical agreement with PyTorch and between backends is tested elsewhere;
here each class is checked against the functional form it is built on, bit for bit."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
from conftest import ALGOS, DTYPES, FULL_STATE, assert_same_bits, options_id, randn

import fastrms
from fastrms import dispatch, functional

SHAPES = [(3, 4), (), (0,), (7,)]


class FunctionalRun:
    """The same optimizer run by hand: one ``fastrms.functional`` call per array and step.

    It keeps every state array of the rule and passes them all: the functional form uses
    those its options need and ignores the others."""

    def __init__(self, algo: str, params: list, **hyper) -> None:
        self.algo, self.params, self.hyper = algo, params, hyper
        initial = hyper.pop("initial_accumulator_value", 0.0)
        slots = functional.SLOTS["adam" if algo == "adamw" else algo]
        self.state = [
            {s: np.full_like(p, initial if s == "state_sum" else 0.0) for s in slots}
            for p in params
        ]
        self.t = 0

    def step(self, grads: list, **changes) -> None:
        self.hyper.update(changes)
        self.t += 1
        step = {"step": self.t} if ALGOS[self.algo].counts_steps else {}
        for p, g, state in zip(self.params, grads, self.state):
            ALGOS[self.algo].step_fn(p, g, **state, **step, **self.hyper)


def _structured(arrays: list, kind: str):
    return {
        "list": list,
        "tuple": tuple,
        "dict": lambda a: {f"p{i}": x for i, x in enumerate(a)},
    }[kind](arrays)


@pytest.mark.parametrize("dtype", DTYPES, ids=[np.dtype(d).name for d in DTYPES])
@pytest.mark.parametrize("kind", ["array", "list", "tuple", "dict"])
@pytest.mark.parametrize("algo", ALGOS)
def test_class_equals_functional(algo, kind, dtype):
    """Params as one array, a list, a tuple or a dict; grads in the same structure; the
    class gives exactly what one functional call per array gives."""
    rng = np.random.default_rng(40)
    shapes = SHAPES[:1] if kind == "array" else SHAPES
    p0 = [randn(rng, s, dtype) for s in shapes]
    hyper = dict(lr=ALGOS[algo].lr, **FULL_STATE[algo])
    mine = [p.copy() for p in p0]
    opt = ALGOS[algo].cls(mine[0] if kind == "array" else _structured(mine, kind), **hyper)
    by_hand = FunctionalRun(algo, theirs := [p.copy() for p in p0], **hyper)
    for _ in range(4):
        grads = [randn(rng, s, dtype) for s in shapes]
        opt.step(grads[0] if kind == "array" else _structured(grads, kind))
        by_hand.step(grads)
    assert opt.step_count == 4
    for i, (a, b) in enumerate(zip(mine, theirs)):
        assert_same_bits(a, b, f"param {i}")  # the caller's arrays, updated in place
        if a.size:
            assert not np.array_equal(a, p0[i])
    for name, arrays in opt.state.items():
        for i, a in enumerate(arrays):
            assert_same_bits(a, by_hand.state[i][name], f"{name} {i}")


def test_dict_grads_are_matched_by_key():
    """The grads dict may list its keys in any order; each gradient goes to its key's
    parameter (here all arrays have one shape, so a mix-up would pass every check)."""
    rng = np.random.default_rng(41)
    p0 = {k: randn(rng, 5, np.float64) for k in "abc"}
    grads = {k: randn(rng, 5, np.float64) for k in "abc"}
    in_order = fastrms.Adam(a := {k: v.copy() for k, v in p0.items()})
    shuffled = fastrms.Adam(b := {k: v.copy() for k, v in p0.items()})
    in_order.step(grads)
    shuffled.step({k: grads[k] for k in "cab"})
    for k in "abc":
        assert_same_bits(b[k], a[k], k)
    assert not np.array_equal(a["a"], p0["a"])


SCHEDULE = [0.1, 0.05, 0.2, 0.0, 0.01, 0.3]  # includes lr = 0: a step that moves nothing


@pytest.mark.parametrize("algo", ALGOS)
def test_schedule_equals_functional_calls(algo):
    """``opt.lr = ...`` between steps is the same as passing that lr to the functional form;
    other hyperparameters may change too."""
    rng = np.random.default_rng(42)
    p0 = [randn(rng, s, np.float32) for s in SHAPES]
    hyper = dict(FULL_STATE[algo])
    opt = ALGOS[algo].cls(mine := [p.copy() for p in p0], **hyper)
    by_hand = FunctionalRun(algo, theirs := [p.copy() for p in p0], **hyper)
    for t, lr in enumerate(SCHEDULE):
        grads = [randn(rng, s, np.float32) for s in SHAPES]
        changes = dict(lr=lr, weight_decay=0.01 * t)
        for name, value in changes.items():
            setattr(opt, name, value)
        before = [p.copy() for p in mine]
        opt.step(grads)
        by_hand.step(grads, **changes)
        for a, b in zip(mine, theirs):
            assert_same_bits(a, b)
        if lr == 0:  # AdamW's decay factor 1 - lr * weight_decay is 1 too
            for a, b in zip(mine, before):
                assert_same_bits(a, b)


def test_writes_reach_the_callers_arrays():
    """0-d and 2-D parameters are updated in place, through the flat views the kernels use."""
    for backend in ("cpu", "numpy"):
        s, m = np.array(1.0), np.ones((2, 3), order="C")
        opt = fastrms.SGD({"s": s, "m": m}, lr=0.5, backend=backend)
        opt.step({"s": np.array(2.0), "m": np.full((2, 3), 2.0)})
        assert s.shape == () and s == 0.0
        np.testing.assert_array_equal(m, np.zeros((2, 3)))


def test_empty_arrays_and_step_count():
    opt = fastrms.Adam([e := np.zeros(0, np.float32), np.ones((0, 4), np.float32)])
    for t in range(1, 4):
        opt.step([np.zeros(0, np.float32), np.zeros((0, 4), np.float32)])
        assert opt.step_count == t
    assert e.size == 0 and opt.state["exp_avg"][1].shape == (0, 4)


STATE_BUFFERS = [  # (algo, options, the buffers they use and their initial values)
    ("rmsprop", {}, {"square_avg": 0.0}),
    ("rmsprop", dict(momentum=0.9), {"square_avg": 0.0, "momentum_buffer": 0.0}),
    ("rmsprop", dict(centered=True), {"square_avg": 0.0, "grad_avg": 0.0}),
    ("adagrad", {}, {"state_sum": 0.0}),
    ("adagrad", dict(initial_accumulator_value=0.1), {"state_sum": 0.1}),
    ("adam", {}, {"exp_avg": 0.0, "exp_avg_sq": 0.0}),
    ("adam", dict(amsgrad=True), {"exp_avg": 0, "exp_avg_sq": 0, "max_exp_avg_sq": 0}),
    ("sgd", {}, {}),
    ("sgd", dict(momentum=0.9), {"momentum_buffer": 0.0}),
]


@pytest.mark.parametrize(
    ("algo", "options", "expected"),
    STATE_BUFFERS,
    ids=[f"{a}-{options_id(o)}" for a, o, _ in STATE_BUFFERS],
)
def test_state_buffers(algo, options, expected):
    """Exactly the buffers the options use, created on the first step at their initial
    value, with the parameters' shape and dtype."""
    p = np.ones((2, 2), np.float32)
    opt = ALGOS[algo].cls(p, **options)
    assert opt.state == {}
    opt.step(np.zeros_like(p))
    assert opt.state.keys() == expected.keys()
    fresh = ALGOS[algo].cls(p.copy(), **options)
    sd = fresh.state_dict()  # before any step: the state at its initial value
    held = sorted(k for k in sd if k.startswith("state."))
    assert held == [f"state.{k}" for k in sorted(expected)]
    for name, value in expected.items():
        (a,) = opt.state[name]
        assert a.shape == p.shape and a.dtype == p.dtype
        assert_same_bits(sd[f"state.{name}"], np.full(p.shape, value, np.float32), name)


def test_auto_backend_is_the_compiled_one(monkeypatch):
    """``auto`` runs the Numba kernels on host arrays, without falling back; the environment
    variable overrides it."""
    info = fastrms.backends()
    assert info["cpu"].available and info["numpy"].available, info
    assert dispatch.resolve("auto", "host")[0].name == "cpu"
    rng = np.random.default_rng(44)
    p0, g = randn(rng, 1000, np.float32), randn(rng, 1000, np.float32)
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastrms.FallbackWarning)
        for backend in ("auto", "cpu"):
            fastrms.RMSProp(p := p0.copy(), backend=backend, centered=True).step(g)
            results[backend] = p
    assert_same_bits(results["auto"], results["cpu"])
    monkeypatch.setenv("FASTRMS_BACKEND", "numpy")
    assert dispatch.resolve("auto", "host")[0].name == "numpy"


# -- the public surface ------------------------------------------------------------------------

FUNCTIONS = ["rmsprop", "adagrad", "adam", "adamw", "sgd"]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_functional_form_is_public_and_documented(name):
    fn = getattr(fastrms.functional, name)
    doc = inspect.getdoc(fn)
    assert "in place" in doc.splitlines()[0] and "::" in doc and "Parameters" in doc
    params = inspect.signature(fn).parameters
    arrays = [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert arrays[:2] == ["param", "grad"]
    assert all(p.kind is not p.POSITIONAL_OR_KEYWORD for n, p in params.items() if n == "step")
    p, g = np.ones(3), np.ones(3)
    positional = r"takes (from \d+ to )?\d+ positional arguments? but \d+ were given"
    with pytest.raises(TypeError, match=positional):  # keyword-only hyperparameters: no mix-ups
        fn(p, g, *[np.zeros(3)] * (len(arrays) - 2), 0.1)


@pytest.mark.parametrize("algo", ALGOS)
def test_class_and_functional_defaults_agree(algo):
    """A class with its defaults steps as the functional form with none given (both take
    them from the spec; AdamW: weight_decay 1e-2 and decoupled in both)."""
    cls, fn = ALGOS[algo].cls, ALGOS[algo].step_fn
    spec = cls.spec
    rng = np.random.default_rng(3)
    p0, g = rng.standard_normal(50), rng.standard_normal(50)
    opt = cls(p := p0.copy(), backend="numpy")
    opt.step(g)
    q = p0.copy()
    state = {s: np.zeros_like(q) for s in opt.state}
    fn(q, g, **state, **({"step": 1} if spec.counts_steps else {}), backend="numpy")
    np.testing.assert_array_equal(p, q)
    # state_dtype is how the state is held (every class has it), not a hyperparameter; nor
    # are rounding and seed (how bfloat16 parameters are stored)
    assert set(cls.hyperparameters) == set(inspect.signature(cls).parameters) - {
        "params", "backend", "state_dtype", "rounding", "seed",
    }  # fmt: skip
    if algo == "adamw":
        assert spec.defaults["weight_decay"] == 1e-2 and spec.defaults["decoupled_weight_decay"]


def test_graves_preset():
    opt = fastrms.RMSProp.graves(np.ones(3), weight_decay=0.1, backend="numpy")
    assert isinstance(opt, fastrms.RMSProp)
    expected = dict(lr=1e-4, alpha=0.95, momentum=0.9, eps=1e-4, centered=True)
    expected.update(eps_in_sqrt=True, weight_decay=0.1, maximize=False)
    assert {h: getattr(opt, h) for h in opt.hyperparameters} == expected
    assert opt.backend == "numpy"


def test_repr():
    r = repr(fastrms.AdamW([np.ones(2), np.ones(3)], lr=0.5))
    assert r.startswith("AdamW(2 arrays") and "lr=0.5" in r and "weight_decay=0.01" in r


def test_exports():
    for name in ("RMSProp", "AdaGrad", "Adam", "AdamW", "SGD", "Optimizer", "functional"):
        assert name in fastrms.__all__ and hasattr(fastrms, name)
    assert all(issubclass(a.cls, fastrms.Optimizer) for a in ALGOS.values())
    assert all(a.step_fn is getattr(fastrms.functional, a.name) for a in ALGOS.values())
    assert "Parameters" in inspect.getdoc(fastrms.RMSProp)
    assert all(inspect.getdoc(a.cls) for a in ALGOS.values())
