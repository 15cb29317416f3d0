"""Bad input gets a clear error, and nothing changes.

Each case is checked through the optimizer classes and through the functional one-step form
(where it applies to both: state arrays are the functional form's, gradient structures and
state dicts the classes'): the call raises ``TypeError`` or ``ValueError`` whose message names
the argument, and every array (parameters, gradients, state) is the same, bit for bit, after
the call as before. A class that refused a step has not counted it, and its next valid step
gives exactly what an optimizer that never saw the bad call gives. Multi-array cases put the
error in the LAST array, after arrays that a careless implementation would already have
updated.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import ALGOS, FULL_STATE, Snapshot, all_arrays, assert_same_bits, randn

import fastrms
from fastrms import functional

SHAPE = (4, 5)
SHAPES = [(30,), (3,), SHAPE]  # three parameters of the class tests; the bad one is the last
ALGO_NAMES = list(ALGOS)


def _structure(arrays: list, kind: str):
    return {k: a for k, a in zip("abc", arrays)} if kind == "dict" else list(arrays)


def _name(kind: str, what: str, i: int = 2) -> str:
    """How the classes name array ``i`` in messages: ``grads[2]`` or ``grads['c']``."""
    return re.escape(f"{what}[{i!r}]" if kind == "list" else f"{what}[{'abc'[i]!r}]")


class Pair:
    """An optimizer that will see bad input and its twin that will not, both a few steps in
    (so their state is not zero), on three parameters of SHAPES."""

    def __init__(
        self, algo: str, kind: str = "list", dtype=np.float64, shapes=SHAPES, **options
    ) -> None:
        self.rng = np.random.default_rng(20)
        self.kind, self.dtype, self.shapes = kind, dtype, shapes
        params = [randn(self.rng, s, dtype) for s in shapes]
        hyper = {**FULL_STATE[algo], **options}
        cls = ALGOS[algo].cls
        self.opt = cls(_structure([p.copy() for p in params], kind), **hyper)
        self.twin = cls(_structure([p.copy() for p in params], kind), **hyper)
        for _ in range(2):
            self.step_both()

    def grads(self) -> list[np.ndarray]:
        return [randn(self.rng, s, self.dtype) for s in self.shapes]

    def step_both(self) -> None:
        grads = _structure(self.grads(), self.kind)
        self.opt.step(grads)
        self.twin.step(grads)

    def assert_unharmed(self) -> None:
        """Same step count and arrays as the twin, and the same after one more valid step."""
        for _ in range(2):
            assert self.opt.step_count == self.twin.step_count
            got, want = all_arrays(self.opt), all_arrays(self.twin)
            assert got.keys() == want.keys()
            for name in want:
                assert_same_bits(got[name], want[name], name)
            self.step_both()


def _functional_call(algo: str, param, grad, state: dict | None = None, **hyper):
    """Call fastrms.functional.<algo> with every state array its options may use."""
    spec = ALGOS[algo]
    if state is None:
        state = _state_for(algo, param)
    if spec.counts_steps:
        hyper.setdefault("step", 1)
    hyper.pop("initial_accumulator_value", None)  # a class option: the caller fills state_sum
    return lambda: spec.step_fn(param, grad, **state, **hyper)


def _state_for(algo: str, param) -> dict:
    p = np.asarray(param)
    dtype = p.dtype if p.dtype.kind == "f" and p.dtype.itemsize >= 4 else np.float64
    slots = functional.SLOTS["adam" if algo == "adamw" else algo]
    return {s: np.full(p.shape, 0.25, dtype) for s in slots}


def _assert_rejected(call, arrays: dict, exc: type, match: str) -> None:
    """``call()`` raises ``exc`` matching ``match`` and leaves every array as it was."""
    snap = Snapshot({k: a for k, a in arrays.items() if isinstance(a, np.ndarray)})
    with pytest.raises(exc, match=match):
        call()
    snap.assert_unchanged()


# -- gradients ---------------------------------------------------------------------------------

BAD_GRADS = {  # name: (make a bad gradient for parameter p, exception, words of the message)
    "longer": (lambda p: np.ones(p.size + 1, p.dtype), ValueError, "shape"),
    "transposed-shape": (lambda p: np.ones(p.shape[::-1], p.dtype), ValueError, "shape"),
    "flattened": (lambda p: np.ones(p.size, p.dtype), ValueError, "shape"),
    "other-float-dtype": (lambda p: np.ones(p.shape, np.float32), TypeError, "dtype"),
    "float16": (lambda p: np.ones(p.shape, np.float16), TypeError, "dtype"),
    "integer": (lambda p: np.ones(p.shape, np.int64), TypeError, "dtype"),
    "complex": (lambda p: np.ones(p.shape, np.complex128), TypeError, "dtype"),
    "strided": (lambda p: np.ones(p.shape + (2,), p.dtype)[..., 0], ValueError, "contiguous"),
    "fortran-order": (lambda p: np.asfortranarray(np.ones(p.shape, p.dtype)), ValueError,
                      "contiguous"),
    "is-the-param": (lambda p: p, ValueError, "overlaps"),
    "view-of-the-param": (lambda p: p.view(), ValueError, "overlaps"),
    "list": (lambda p: np.ones(p.shape).tolist(), TypeError, "NumPy array"),
    "python-float": (lambda p: 1.0, TypeError, "NumPy array"),
}  # fmt: skip


@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize("case", BAD_GRADS)
@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_bad_grad_class(algo, case, kind):
    make, exc, words = BAD_GRADS[case]
    pair = Pair(algo, kind)
    grads = pair.grads()
    grads[2] = make(pair.opt._params[2])
    arrays = {**all_arrays(pair.opt), **{f"grad{i}": g for i, g in enumerate(grads)}}
    call = lambda: pair.opt.step(_structure(grads, kind))  # noqa: E731
    _assert_rejected(call, arrays, exc, f"^{_name(kind, 'grads')} .*{words}")
    pair.assert_unharmed()


@pytest.mark.parametrize("case", BAD_GRADS)
@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_bad_grad_functional(algo, case):
    make, exc, words = BAD_GRADS[case]
    p = randn(np.random.default_rng(21), SHAPE, np.float64)
    g = make(p)
    state = _state_for(algo, p)
    call = _functional_call(algo, p, g, state, **FULL_STATE[algo])
    _assert_rejected(call, {"param": p, "grad": g, **state}, exc, f"^grad .*{words}")


def test_bad_grad_single_array_class():
    """With one array as params, the message says ``grads``."""
    opt = fastrms.RMSProp(p := np.ones(5))
    _assert_rejected(lambda: opt.step(np.ones(6)), {"p": p}, ValueError, r"^grads has shape \(6,\)")
    assert opt.step_count == 0
    assert all(not a.any() for arrays in opt.state.values() for a in arrays)  # still zero


def test_grad_overlapping_another_param():
    """The grad of parameter 2 is a view into parameter 0: a naive loop would update
    parameters 0 and 1, then write parameter 0 while reading it as a gradient."""
    pair = Pair("adam")
    grads = pair.grads()
    grads[2] = pair.opt._params[0][5:25].reshape(SHAPE)
    arrays = {**all_arrays(pair.opt), **{f"grad{i}": g for i, g in enumerate(grads)}}
    call = lambda: pair.opt.step(grads)  # noqa: E731
    _assert_rejected(call, arrays, ValueError, r"grads\[2\] overlaps params\[0\]")
    pair.assert_unharmed()


def test_grad_overlapping_state_of_another_param():
    pair = Pair("rmsprop")
    grads = pair.grads()
    grads[2] = pair.opt.state["square_avg"][0][:20].reshape(SHAPE)
    arrays = {**all_arrays(pair.opt), **{f"grad{i}": g for i, g in enumerate(grads)}}
    call = lambda: pair.opt.step(grads)  # noqa: E731
    _assert_rejected(call, arrays, ValueError, r"grads\[2\] overlaps square_avg of params\[0\]")
    pair.assert_unharmed()


def test_grads_may_share_memory():
    """Gradients are only read: one array may serve as the gradient of several parameters,
    and a read-only gradient is fine."""
    g = randn(np.random.default_rng(22), 6, np.float32)
    g.flags.writeable = False
    a, b = np.ones(6, np.float32), np.ones(6, np.float32)
    fastrms.Adam([a, b], backend="cpu").step([g, g])
    fastrms.functional.rmsprop(c := np.ones(6, np.float32), g, np.zeros(6, np.float32))
    assert_same_bits(a, b)
    assert not np.array_equal(a, np.ones(6)) and not np.array_equal(c, np.ones(6))


# -- gradient structure --------------------------------------------------------------------

BAD_STRUCTURES = {  # (params kind, make grads from the right list of 3, exception, message)
    "list-too-short": ("list", lambda g: g[:2], ValueError, "grads has 2 arrays"),
    "list-too-long": ("list", lambda g: g + g[:1], ValueError, "grads has 4 arrays"),
    "dict-for-list": ("list", lambda g: _structure(g, "dict"), TypeError, "grads must be"),
    "array-for-list": ("list", lambda g: g[0], TypeError, "grads must be"),
    "tuple-nested": ("list", lambda g: [g], ValueError, "grads has 1 arrays"),
    "missing-key": ("dict", lambda g: {"a": g[0], "b": g[1]}, ValueError,
                    r"grads keys .*missing \['c'\]"),
    "extra-key": ("dict", lambda g: {**_structure(g, "dict"), "d": g[0]}, ValueError,
                  r"grads keys .*unexpected \['d'\]"),
    "renamed-key": ("dict", lambda g: {"a": g[0], "b": g[1], "C": g[2]}, ValueError,
                    r"grads keys .*missing \['c'\], unexpected \['C'\]"),
    "non-str-key": ("dict", lambda g: {"a": g[0], "b": g[1], 2: g[2]}, TypeError,
                    "grads dict keys must be str"),
    "list-for-dict": ("dict", lambda g: g, TypeError, "grads must be"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_STRUCTURES)
def test_bad_grads_structure(case):
    kind, make, exc, match = BAD_STRUCTURES[case]
    pair = Pair("rmsprop", kind)
    grads = pair.grads()
    arrays = {**all_arrays(pair.opt), **{f"grad{i}": g for i, g in enumerate(grads)}}
    _assert_rejected(lambda: pair.opt.step(make(grads)), arrays, exc, match)
    pair.assert_unharmed()


def test_array_params_take_array_grads():
    opt = fastrms.SGD(p := np.ones(3))
    _assert_rejected(lambda: opt.step([np.ones(3)]), {"p": p}, TypeError, "grads must be")


# -- parameters ----------------------------------------------------------------------------


def _read_only(shape):
    a = np.ones(shape)
    a.flags.writeable = False
    return a


BAD_PARAMS = {  # name: (bad parameter of SHAPE, exception, words of the message)
    "integer": (lambda: np.ones(SHAPE, np.int32), TypeError, "float32 or float64"),
    "complex": (lambda: np.ones(SHAPE, np.complex64), TypeError, "float32 or float64"),
    "float16": (lambda: np.ones(SHAPE, np.float16), TypeError, "float32 or float64"),
    "bool": (lambda: np.ones(SHAPE, bool), TypeError, "float32 or float64"),
    "strided": (lambda: np.ones((4, 10))[:, ::2], ValueError, "C-contiguous"),
    "fortran-order": (lambda: np.ones(SHAPE[::-1]).T, ValueError, "C-contiguous"),
    "read-only": (lambda: _read_only(SHAPE), ValueError, "read-only"),
    "list": (lambda: np.ones(SHAPE).tolist(), TypeError, "NumPy array"),
    "torch-cpu-tensor": (lambda: torch.ones(SHAPE, dtype=torch.float64), TypeError,
                         "NumPy array"),
}  # fmt: skip


@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize("case", BAD_PARAMS)
def test_bad_param_class(case, kind):
    make, exc, words = BAD_PARAMS[case]
    rng = np.random.default_rng(23)
    params = [randn(rng, s, np.float64) for s in SHAPES[:2]] + [make()]
    arrays = {f"param{i}": p for i, p in enumerate(params)}
    for algo in ALGOS.values():
        call = lambda: algo.cls(_structure(params, kind))  # noqa: B023, E731
        _assert_rejected(call, arrays, exc, f"^{_name(kind, 'params')} .*{words}")


@pytest.mark.parametrize("case", BAD_PARAMS)
@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_bad_param_functional(algo, case):
    make, exc, words = BAD_PARAMS[case]
    p = make()
    g = randn(np.random.default_rng(24), SHAPE, np.float64)
    state = _state_for(algo, p)
    call = _functional_call(algo, p, g, state, **FULL_STATE[algo])
    _assert_rejected(call, {"param": p, "grad": g, **state}, exc, f"^param .*{words}")


def test_params_overlapping_each_other():
    p = np.ones(10)
    for params, match in (
        ([p, p], r"params\[1\] overlaps params\[0\]"),
        ([p[:6], p[4:]], r"params\[1\] overlaps params\[0\]"),
        ({"w": p[5:], "b": p[:5].reshape(1, 5), "x": p[2:7]}, r"params\['x'\] overlaps"),
    ):
        _assert_rejected(lambda: fastrms.SGD(params), {"p": p}, ValueError, match)  # noqa: B023
    fastrms.SGD([p[:5], p[5:]])  # adjacent, not overlapping: fine


@pytest.mark.parametrize("params", [[], {}, ()], ids=["list", "dict", "tuple"])
def test_empty_params(params):
    with pytest.raises(ValueError, match="params is empty"):
        fastrms.RMSProp(params)


def test_non_str_param_keys():
    with pytest.raises(TypeError, match="params dict keys must be str"):
        fastrms.RMSProp({1: np.ones(3)})


# -- state arrays of the functional form ---------------------------------------------------

BAD_STATE = {  # name: (change the right state dict in place, exception, message)
    "shape": (lambda st, p, g: st.update(square_avg=np.zeros(7)), ValueError,
              r"^square_avg has shape \(7,\)"),
    "dtype": (lambda st, p, g: st.update(grad_avg=np.zeros(p.shape, np.float32)), TypeError,
              "^grad_avg has dtype float32"),
    "integer": (lambda st, p, g: st.update(momentum_buffer=np.zeros(p.shape, int)), TypeError,
                "^momentum_buffer has dtype int"),
    "read-only": (lambda st, p, g: st.update(square_avg=_read_only(p.shape)), ValueError,
                  "^square_avg is read-only"),
    "strided": (lambda st, p, g: st.update(grad_avg=np.zeros((4, 10))[:, ::2]), ValueError,
                "^grad_avg is not C-contiguous"),
    "is-the-param": (lambda st, p, g: st.update(square_avg=p), ValueError,
                     "square_avg overlaps param|param overlaps square_avg"),
    "is-the-grad": (lambda st, p, g: st.update(grad_avg=g), ValueError,
                    "grad_avg overlaps grad|grad overlaps grad_avg"),
    "shared-state": (lambda st, p, g: st.update(momentum_buffer=st["square_avg"]), ValueError,
                     "momentum_buffer overlaps square_avg|square_avg overlaps momentum_buffer"),
    "missing": (lambda st, p, g: st.update(momentum_buffer=None), ValueError,
                "^momentum_buffer is required"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_STATE)
def test_bad_state_functional(case):
    change, exc, match = BAD_STATE[case]
    rng = np.random.default_rng(25)
    p, g = randn(rng, SHAPE, np.float64), randn(rng, SHAPE, np.float64)
    state = _state_for("rmsprop", p)
    arrays = {"param": p, "grad": g, **state}
    change(state, p, g)
    arrays.update({f"new {k}": a for k, a in state.items()})
    call = _functional_call("rmsprop", p, g, state, **FULL_STATE["rmsprop"])
    _assert_rejected(call, arrays, exc, match)


@pytest.mark.parametrize(
    ("algo", "options", "missing"),
    [
        ("adam", dict(amsgrad=True), "max_exp_avg_sq"),
        ("adamw", dict(amsgrad=True), "max_exp_avg_sq"),
        ("sgd", dict(momentum=0.9), "momentum_buffer"),
        ("rmsprop", dict(centered=True), "grad_avg"),
    ],
)
def test_missing_state_functional(algo, options, missing):
    p, g = np.ones(4), np.ones(4)
    state = _state_for(algo, p)
    state[missing] = None
    call = _functional_call(algo, p, g, state, **options)
    _assert_rejected(call, {"p": p, **state}, ValueError, f"^{missing} is required")


# -- hyperparameters -----------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
BAD_HYPER = [  # (algo, options, exception, the argument named)
    ("rmsprop", dict(lr=-1e-3), ValueError, "lr"),
    ("rmsprop", dict(lr=NAN), ValueError, "lr"),
    ("rmsprop", dict(lr=INF), ValueError, "lr"),
    ("rmsprop", dict(lr="0.01"), TypeError, "lr"),
    ("rmsprop", dict(lr=None), TypeError, "lr"),
    ("rmsprop", dict(alpha=1.5), ValueError, "alpha"),
    ("rmsprop", dict(alpha=-0.1), ValueError, "alpha"),
    ("rmsprop", dict(eps=0.0), ValueError, "eps"),
    ("rmsprop", dict(eps=-1e-8), ValueError, "eps"),
    ("rmsprop", dict(eps=NAN), ValueError, "eps"),
    ("rmsprop", dict(weight_decay=-0.1), ValueError, "weight_decay"),
    ("rmsprop", dict(momentum=-0.9), ValueError, "momentum"),
    ("rmsprop", dict(momentum=INF), ValueError, "momentum"),
    ("rmsprop", dict(centered="yes"), TypeError, "centered"),
    ("rmsprop", dict(eps_in_sqrt=2), TypeError, "eps_in_sqrt"),
    ("rmsprop", dict(maximize=None), TypeError, "maximize"),
    ("adagrad", dict(lr=True), TypeError, "lr"),
    ("adagrad", dict(lr_decay=-0.1), ValueError, "lr_decay"),
    ("adagrad", dict(eps=0.0), ValueError, "eps"),
    ("adagrad", dict(weight_decay=NAN), ValueError, "weight_decay"),
    ("adagrad", dict(initial_accumulator_value=-1.0), ValueError, "initial_accumulator_value"),
    ("adam", dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
    ("adam", dict(betas=(-0.1, 0.999)), ValueError, r"betas\[0\]"),
    ("adam", dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\]"),
    ("adam", dict(betas=(0.9, NAN)), ValueError, r"betas\[1\]"),
    ("adam", dict(betas=(0.9,)), TypeError, "betas"),
    ("adam", dict(betas=0.9), TypeError, "betas"),
    ("adam", dict(eps=0.0), ValueError, "eps"),
    ("adam", dict(weight_decay=-0.01), ValueError, "weight_decay"),
    ("adam", dict(amsgrad="no"), TypeError, "amsgrad"),
    ("adamw", dict(weight_decay=INF), ValueError, "weight_decay"),
    ("adamw", dict(betas=(0.9, 1.5)), ValueError, r"betas\[1\]"),
    ("adamw", dict(lr=-1.0), ValueError, "lr"),
    ("sgd", dict(momentum=0.0, nesterov=True), ValueError, "nesterov"),
    ("sgd", dict(momentum=0.9, dampening=0.1, nesterov=True), ValueError, "nesterov"),
    ("sgd", dict(momentum=0.9, dampening=1.5), ValueError, "dampening"),
    ("sgd", dict(momentum=-0.5), ValueError, "momentum"),
    ("sgd", dict(lr=-0.1), ValueError, "lr"),
    ("sgd", dict(maximize="false"), TypeError, "maximize"),
    ("adamax", dict(lr=-2e-3), ValueError, "lr"),
    ("adamax", dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
    ("adamax", dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
    ("adamax", dict(eps=0.0), ValueError, "eps"),
    ("adamax", dict(weight_decay=-0.1), ValueError, "weight_decay"),
    ("adadelta", dict(lr=-1.0), ValueError, "lr"),
    ("adadelta", dict(rho=1.5), ValueError, "rho"),
    ("adadelta", dict(rho=-0.1), ValueError, "rho"),
    ("adadelta", dict(rho=NAN), ValueError, "rho"),
    ("adadelta", dict(eps=0.0), ValueError, "eps"),
    ("adadelta", dict(weight_decay=-0.1), ValueError, "weight_decay"),
    ("radam", dict(lr=-1e-3), ValueError, "lr"),
    ("radam", dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\]"),
    ("radam", dict(eps=-1e-8), ValueError, "eps"),
    ("radam", dict(weight_decay=-0.1), ValueError, "weight_decay"),
    ("radam", dict(decoupled_weight_decay="yes"), TypeError, "decoupled_weight_decay"),
    ("nadam", dict(lr=-2e-3), ValueError, "lr"),
    ("nadam", dict(betas=(-0.5, 0.999)), ValueError, r"betas\[0\]"),
    ("nadam", dict(eps=0.0), ValueError, "eps"),
    ("nadam", dict(weight_decay=-0.1), ValueError, "weight_decay"),
    ("nadam", dict(momentum_decay=-4e-3), ValueError, "momentum_decay"),
    ("nadam", dict(momentum_decay=INF), ValueError, "momentum_decay"),
    ("nadam", dict(decoupled_weight_decay=2), TypeError, "decoupled_weight_decay"),
]
HYPER_IDS = [f"{a}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for a, o, _, _ in BAD_HYPER]


@pytest.mark.parametrize(("algo", "options", "exc", "name"), BAD_HYPER, ids=HYPER_IDS)
def test_bad_hyperparameter_constructor(algo, options, exc, name):
    p = np.ones(SHAPE)
    _assert_rejected(lambda: ALGOS[algo].cls(p, **options), {"p": p}, exc, f"^{name}(?!\\w)")


@pytest.mark.parametrize(("algo", "options", "exc", "name"), BAD_HYPER, ids=HYPER_IDS)
def test_bad_hyperparameter_set_between_steps(algo, options, exc, name):
    """A schedule that sets a bad value: the step is refused; put right, training goes on."""
    pair = Pair(algo)
    saved = {k: getattr(pair.opt, k) for k in options}
    for k, v in options.items():
        setattr(pair.opt, k, v)
    grads = pair.grads()
    arrays = {**all_arrays(pair.opt), **{f"grad{i}": g for i, g in enumerate(grads)}}
    _assert_rejected(lambda: pair.opt.step(grads), arrays, exc, f"^{name}(?!\\w)")
    for k, v in saved.items():
        setattr(pair.opt, k, v)
    pair.assert_unharmed()


@pytest.mark.parametrize(
    ("algo", "options", "exc", "name"),
    [c for c in BAD_HYPER if "initial_accumulator_value" not in c[1]],  # a class option only
    ids=[i for i, c in zip(HYPER_IDS, BAD_HYPER) if "initial_accumulator_value" not in c[1]],
)
def test_bad_hyperparameter_functional(algo, options, exc, name):
    rng = np.random.default_rng(26)
    p, g = randn(rng, SHAPE, np.float64), randn(rng, SHAPE, np.float64)
    state = _state_for(algo, p)
    call = _functional_call(algo, p, g, state, **options)
    _assert_rejected(call, {"param": p, "grad": g, **state}, exc, f"^{name}(?!\\w)")


@pytest.mark.parametrize("step", [0, -1, 1.5, True, None, "1"])
@pytest.mark.parametrize("algo", [a for a in ALGO_NAMES if ALGOS[a].counts_steps])
def test_bad_step_functional(algo, step):
    p, g = np.ones(3), np.ones(3)
    state = _state_for(algo, p)
    call = _functional_call(algo, p, g, state, step=step)
    _assert_rejected(call, {"p": p, "g": g, **state}, ValueError, "^step must be an int >= 1")


# -- backends ----------------------------------------------------------------------------------


def test_unknown_backend():
    p, g = np.ones(3), np.ones(3)
    with pytest.raises(ValueError, match="^backend must be one of"):
        fastrms.RMSProp(p, backend="gpu")
    call = _functional_call("rmsprop", p, g, backend="gpu")
    _assert_rejected(call, {"p": p}, ValueError, "^backend must be one of")


def test_cuda_backend_refuses_numpy_arrays():
    """No silent copies to the device: host arrays with backend='cuda' are refused, before
    CUDA is even looked for."""
    p, g = np.ones(3), np.ones(3)
    opt = fastrms.Adam(p, backend="cuda")
    _assert_rejected(lambda: opt.step(g), {"p": p}, TypeError, "^params: backend 'cuda' needs")
    assert opt.step_count == 0
    call = _functional_call("adam", p, g, backend="cuda")
    _assert_rejected(call, {"p": p}, TypeError, "^backend 'cuda' needs CUDA arrays")


def test_bad_backend_environment_variable(monkeypatch):
    monkeypatch.setenv("FASTRMS_BACKEND", "fast")
    p, g = np.ones(3), np.ones(3)
    call = _functional_call("sgd", p, g)
    _assert_rejected(call, {"p": p}, ValueError, "^FASTRMS_BACKEND must be one of")


# -- state dicts -------------------------------------------------------------------------------


def _other(algo="rmsprop", kind="list", dtype=np.float64, shapes=SHAPES) -> dict:
    """The state dict of another optimizer, a few steps in."""
    return Pair(algo, kind, dtype, shapes).opt.state_dict()


def _without(key):
    return lambda sd: {k: v for k, v in sd.items() if k != key}


def _with(**items):
    return lambda sd: {**sd, **{k.replace("__", "."): v for k, v in items.items()}}


BAD_STATE_DICTS = {  # name: (make a bad state dict from a good one, exception, message)
    "other-optimizer": (lambda sd: _other("adam"), ValueError,
                        "state_dict is from optimizer 'Adam', not 'RMSProp'"),
    "other-shape": (lambda sd: _other(shapes=[(30,), (3,), (5, 4)]), ValueError,
                    r"state_dict\['state.square_avg.2'\] has shape \(5, 4\)"),
    "other-dtype": (lambda sd: _other(dtype=np.float32), ValueError,
                    r"state_dict\['state.square_avg.0'\] has shape \(30,\) and dtype float32"),
    "other-structure": (lambda sd: _other(kind="dict"), ValueError,
                        "state_dict lacks 'state.square_avg.0'"),
    "missing-state": (_without("state.momentum_buffer.2"), ValueError,
                      "state_dict lacks 'state.momentum_buffer.2'"),
    "missing-hyperparameter": (_without("hyper.alpha"), ValueError,
                               "state_dict lacks hyperparameter 'alpha'"),
    "missing-step": (_without("step"), ValueError, "state_dict has an invalid step None"),
    "missing-name": (_without("optimizer"), ValueError, "state_dict is from optimizer None"),
    "extra-key": (_with(state__bogus__0=np.zeros(30)), ValueError,
                  "state_dict has unexpected keys"),
    "negative-step": (_with(step=-1), ValueError, "state_dict has an invalid step -1"),
    "float-step": (_with(step=2.5), ValueError, "state_dict has an invalid step 2.5"),
    "bad-hyperparameter": (_with(hyper__lr=-1.0), ValueError, "^lr must be"),
    "bad-flag": (_with(hyper__centered="yes"), TypeError, "^centered must be a bool"),
    "string-state": (_with(state__square_avg__1="abc"), ValueError,
                     r"state_dict\['state.square_avg.1'\] has shape \(\)"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_STATE_DICTS)
def test_bad_state_dict(case):
    make, exc, match = BAD_STATE_DICTS[case]
    pair = Pair("rmsprop")
    bad = make(_other())
    hyper = {h: getattr(pair.opt, h) for h in pair.opt.hyperparameters}
    _assert_rejected(lambda: pair.opt.load_state_dict(bad), all_arrays(pair.opt), exc, match)
    assert {h: getattr(pair.opt, h) for h in pair.opt.hyperparameters} == hyper
    pair.assert_unharmed()


def test_state_dict_from_adamw_into_adam():
    """AdamW and Adam have the same hyperparameter names but not the same rule."""
    pair = Pair("adam")
    bad = Pair("adamw").opt.state_dict()
    call = lambda: pair.opt.load_state_dict(bad)  # noqa: E731
    _assert_rejected(call, all_arrays(pair.opt), ValueError, "from optimizer 'AdamW'")
    pair.assert_unharmed()
