"""A step refused after the first ones changes nothing: every frontend but fastrms.torch
(whose tests are in tests/test_torch_optim.py; the sharded optimizer's in tests/mpi_worker.py).

Each case takes two good steps over a mixed-dtype list of parameters (float64 first, float32
last, so the plan has two dtype groups and the float32 one runs last), then makes the LAST
parameter or group bad in one way: a bad hyperparameter, a scalar that overflows float32, a
corrupt state array or step count, a gradient that overlaps an array the step writes, a
gradient of the other dtype. The step must raise ``TypeError``/``ValueError`` naming what is
wrong, and every parameter, state array and step count must be the same, bit for bit, as
before; put right, the optimizer goes on exactly as a twin that never saw the bad step.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ALGOS, FULL_STATE, Snapshot, all_arrays, assert_same_bits, randn

from fastrms import functional
from fastrms.grouped import StepPlan
from fastrms.specs import SPECS

#: float64 parameters first, float32 last: the float32 group is the plan's last.
SHAPES = [(30,), (3,), (4, 5), (7,)]
DTYPES = [np.float64, np.float64, np.float32, np.float32]
LAST = len(SHAPES) - 1
BACKENDS = ["cpu", "numpy"]
ALGO_NAMES = list(ALGOS)
HAS_EPS = [a for a in ALGO_NAMES if "eps" in SPECS[a].defaults]


def _grads(rng: np.random.Generator) -> list[np.ndarray]:
    return [randn(rng, s, d) for s, d in zip(SHAPES, DTYPES)]


def _snapshot(arrays: dict) -> Snapshot:
    """A snapshot of the NumPy arrays among ``arrays`` (a corrupt "state" may be a list)."""
    return Snapshot({k: a for k, a in arrays.items() if isinstance(a, np.ndarray)})


class Trained:
    """An optimizer two good steps in, and a twin that never sees the bad step."""

    def __init__(self, algo: str, backend: str) -> None:
        self.rng = np.random.default_rng(22)
        params = [randn(self.rng, s, d) for s, d in zip(SHAPES, DTYPES)]
        cls = ALGOS[algo].cls
        options = {**FULL_STATE[algo], "lr": ALGOS[algo].lr, "backend": backend}
        self.opt = cls([p.copy() for p in params], **options)
        self.twin = cls([p.copy() for p in params], **options)
        for _ in range(2):
            self.step_both()
        assert self.opt.step_count == 2

    def step_both(self) -> None:
        grads = _grads(self.rng)
        self.opt.step(grads)
        self.twin.step([g.copy() for g in grads])

    def assert_refused(self, grads: list, exc: type, match: str) -> None:
        """``opt.step(grads)`` raises ``exc`` matching ``match``; not one bit changes."""
        arrays = all_arrays(self.opt)
        snap = _snapshot({**arrays, **{f"grad{i}": g for i, g in enumerate(grads)}})
        count = self.opt.step_count
        with pytest.raises(exc, match=match):
            self.opt.step(grads)
        snap.assert_unchanged()
        assert all_arrays(self.opt).keys() == arrays.keys()
        assert self.opt.step_count is count

    def assert_goes_on(self) -> None:
        """Two more good steps give exactly the twin's arrays and step count."""
        for _ in range(2):
            self.step_both()
            assert self.opt.step_count == self.twin.step_count
            got, want = all_arrays(self.opt), all_arrays(self.twin)
            assert got.keys() == want.keys()
            for name in want:
                assert_same_bits(got[name], want[name], name)


#: (option, bad value, exception, what the message names): set between steps on the class.
BAD_VALUES = [
    ("lr", -1.0, ValueError, "^lr must be"),
    ("lr", "0.1", TypeError, "^lr must be"),
    ("lr", 1e39, ValueError, r"lr.* does not fit in float32"),  # fine in float64
    ("weight_decay", float("nan"), ValueError, "^weight_decay must be"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("option", "value", "exc", "match"), BAD_VALUES,
                         ids=[f"{o}={v}" for o, v, _, _ in BAD_VALUES])  # fmt: skip
@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_class_refuses_a_bad_hyperparameter_after_steps(algo, option, value, exc, match, backend):
    t = Trained(algo, backend)
    good = getattr(t.opt, option)
    setattr(t.opt, option, value)
    t.assert_refused(_grads(t.rng), exc, match)
    setattr(t.opt, option, good)
    t.assert_goes_on()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", HAS_EPS)
def test_class_refuses_an_eps_that_underflows_float32_after_steps(algo, backend):
    t = Trained(algo, backend)
    t.opt.eps = 1e-50  # a valid float64 eps, 0 in float32: only the last group refuses it
    t.assert_refused(_grads(t.rng), ValueError, r"^eps = 1e-50 does not fit in float32")
    t.opt.eps = SPECS[algo].defaults["eps"]
    t.assert_goes_on()


def _state_name(algo: str) -> str:
    """The last state array the test options use (the one the kernel writes last)."""
    return SPECS[algo].setup(1, **FULL_STATE[algo]).state[-1]


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


#: How to corrupt the last parameter's last state array: (make the bad array from the
#: parameters, exception, message).
BAD_STATE = {
    "other-dtype": (lambda ps: np.zeros(ps[LAST].shape, np.float64), TypeError, "dtype"),
    "other-shape": (lambda ps: np.zeros(ps[LAST].size + 1, ps[LAST].dtype), ValueError, "shape"),
    "read-only": (lambda ps: _read_only(np.zeros_like(ps[LAST])), ValueError, "read-only"),
    "strided": (lambda ps: np.zeros((ps[LAST].size, 2), ps[LAST].dtype)[:, 0], ValueError,
                "contiguous"),
    "is-the-param": (lambda ps: ps[LAST], ValueError, "overlaps"),
    "in-another-param": (lambda ps: ps[2].reshape(-1)[: ps[LAST].size], ValueError, "overlaps"),
    "a-list": (lambda ps: [0.0] * ps[LAST].size, TypeError, "NumPy array"),
}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_STATE)
@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_class_refuses_a_corrupt_state_array_after_steps(algo, case, backend):
    t = Trained(algo, backend)
    name = _state_name(algo)
    make, exc, words = BAD_STATE[case]
    good = t.opt.state[name][LAST]
    t.opt.state[name][LAST] = make(t.opt._params)
    t.assert_refused(_grads(t.rng), exc, rf"{name} of params\[{LAST}\].*{words}|{words}.*"
                     rf"{name} of params\[{LAST}\]")  # fmt: skip
    t.opt.state[name][LAST] = good
    t.assert_goes_on()


@pytest.mark.parametrize("case", ["shorter", "none", "tuple-with-a-hole"])
@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_class_refuses_a_corrupt_state_list(algo, case):
    t = Trained(algo, "cpu")
    name = _state_name(algo)
    good = t.opt.state[name]
    grads = _grads(t.rng)
    snap = _snapshot({**all_arrays(t.opt), **{f"grad{i}": g for i, g in enumerate(grads)}})
    t.opt.state[name] = {
        "shorter": good[:LAST], "none": None, "tuple-with-a-hole": (*good[:LAST], None)
    }[case]  # fmt: skip
    with pytest.raises(ValueError, match=rf"^state\['{name}'\] must be a list of one"):
        t.opt.step(grads)
    snap.assert_unchanged()
    assert t.opt.step_count == 2
    t.opt.state[name] = good
    t.assert_goes_on()


@pytest.mark.parametrize(
    ("count", "exc"),
    [
        (-1, ValueError),
        (2.0, TypeError),
        (None, TypeError),
        ("2", TypeError),
        (True, TypeError),
    ],  # fmt: skip
)
@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_class_refuses_a_corrupt_step_count(algo, count, exc):
    t = Trained(algo, "cpu")
    t.opt.step_count = count
    grads = _grads(t.rng)
    arrays = all_arrays(t.opt)
    snap = _snapshot({**arrays, **{f"grad{i}": g for i, g in enumerate(grads)}})
    with pytest.raises(exc, match="^step_count must be an int >= 0"):
        t.opt.step(grads)
    snap.assert_unchanged()
    assert t.opt.step_count is count
    t.opt.step_count = 2
    t.assert_goes_on()


#: A gradient of the last parameter that overlaps an array the step writes.
OVERLAPPING = {
    "the-param": (lambda opt, name: opt._params[LAST], rf"params\[{LAST}\]"),
    "another-param": (lambda opt, name: opt._params[2].reshape(-1)[:7], r"params\[2\]"),
    "a-state-array": (
        lambda opt, name: opt.state[name][2].reshape(-1)[2:9],
        r"{name} of params\[2\]",
    ),  # fmt: skip
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", OVERLAPPING)
@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_class_refuses_an_overlapping_gradient_after_steps(algo, case, backend):
    t = Trained(algo, backend)
    name = _state_name(algo)
    make, label = OVERLAPPING[case]
    grads = _grads(t.rng)
    grads[LAST] = make(t.opt, name)
    t.assert_refused(grads, ValueError, rf"^grads\[{LAST}\] overlaps {label.format(name=name)}")
    t.assert_goes_on()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_class_refuses_a_gradient_of_the_other_dtype_after_steps(algo, backend):
    t = Trained(algo, backend)
    grads = _grads(t.rng)
    grads[LAST] = grads[LAST].astype(np.float64)
    t.assert_refused(grads, TypeError, rf"grads\[{LAST}\].*dtype")
    t.assert_goes_on()


# -- the functional grouped step ------------------------------------------------------------


class Functional:
    """multi_tensor_step over the same arrays, two good steps in (and a twin)."""

    def __init__(self, algo: str, backend: str) -> None:
        self.algo, self.backend = algo, backend
        self.rng = np.random.default_rng(23)
        self.options = {**FULL_STATE[algo], "lr": ALGOS[algo].lr}
        self.options.pop("initial_accumulator_value", None)  # a class option
        state_names = SPECS[algo].setup(1, **self.options).state
        params = [randn(self.rng, s, d) for s, d in zip(SHAPES, DTYPES)]
        self.params = [p.copy() for p in params]
        self.twin_params = [p.copy() for p in params]
        self.state = {s: [np.zeros_like(p) for p in params] for s in state_names}
        self.twin_state = {s: [np.zeros_like(p) for p in params] for s in state_names}
        self.step = 1
        for _ in range(2):
            self.step_both()

    def call(self, params, grads, state, **changes) -> None:
        options = {**self.options, **changes}
        if SPECS[self.algo].counts_steps:
            options.setdefault("step", self.step)
        functional.multi_tensor_step(self.algo, params, grads, state, backend=self.backend,
                                     **options)  # fmt: skip

    def step_both(self) -> None:
        grads = _grads(self.rng)
        self.call(self.params, grads, self.state)
        self.call(self.twin_params, grads, self.twin_state)
        self.step += 1

    def arrays(self) -> dict[str, np.ndarray]:
        out = {f"params[{i}]": p for i, p in enumerate(self.params)}
        for s, arrays in self.state.items():
            out |= {f"{s}[{i}]": a for i, a in enumerate(arrays)}
        return out

    def assert_refused(self, call, exc: type, match: str, grads=()) -> None:
        snap = _snapshot({**self.arrays(), **{f"grad{i}": g for i, g in enumerate(grads)}})
        with pytest.raises(exc, match=match):
            call()
        snap.assert_unchanged()

    def assert_goes_on(self) -> None:
        self.step_both()
        twin = {f"params[{i}]": p for i, p in enumerate(self.twin_params)}
        for s, arrays in self.twin_state.items():
            twin |= {f"{s}[{i}]": a for i, a in enumerate(arrays)}
        for k, a in self.arrays().items():
            assert_same_bits(a, twin[k], k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("option", "value", "exc", "match"), BAD_VALUES,
                         ids=[f"{o}={v}" for o, v, _, _ in BAD_VALUES])  # fmt: skip
@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_multi_tensor_step_refuses_bad_scalars_after_steps(
    algo, option, value, exc, match, backend
):
    f = Functional(algo, backend)
    grads = _grads(f.rng)
    call = lambda: f.call(f.params, grads, f.state, **{option: value})  # noqa: E731
    f.assert_refused(call, exc, match, grads)
    if "eps" in SPECS[algo].defaults:
        call = lambda: f.call(f.params, grads, f.state, eps=1e-50)  # noqa: E731
        f.assert_refused(call, ValueError, "^eps = 1e-50 does not fit in float32", grads)
    if SPECS[algo].counts_steps:
        for step, kind in [(0, ValueError), (2.5, ValueError), ("3", ValueError)]:
            call = lambda: f.call(f.params, grads, f.state, step=step)  # noqa: E731,B023
            f.assert_refused(call, kind, "^step must be an int >= 1", grads)
    f.assert_goes_on()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ALGO_NAMES)
def test_multi_tensor_step_refuses_bad_arrays_in_the_last_group_after_steps(algo, backend):
    f = Functional(algo, backend)
    name = next(iter(f.state))
    grads = _grads(f.rng)
    for make, exc, words in BAD_STATE.values():
        state = {s: list(a) for s, a in f.state.items()}
        state[name][LAST] = make(f.params)
        call = lambda: f.call(f.params, grads, state)  # noqa: E731,B023
        f.assert_refused(call, exc, words, grads)
    for bad, exc, match in [
        (f.params[LAST], ValueError, rf"^grads\[{LAST}\] overlaps params\[{LAST}\]"),
        (f.state[name][2].reshape(-1)[:7], ValueError, rf"^grads\[{LAST}\] overlaps"),
        (grads[LAST].astype(np.float64), TypeError, rf"grads\[{LAST}\].*dtype"),
    ]:
        wrong = grads[:LAST] + [bad]
        call = lambda: f.call(f.params, wrong, f.state)  # noqa: E731,B023
        f.assert_refused(call, exc, match, grads)
    f.assert_goes_on()


# -- StepPlan, reused as the classes reuse it ------------------------------------------------


@pytest.mark.parametrize("route", ["run", "run_addresses"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", HAS_EPS)
def test_step_plan_checks_every_groups_scalars_before_the_first_group_runs(algo, backend, route):
    """A reused plan, two steps in, given scalars that only the last (float32) group cannot
    take: the float64 group must not have run."""
    rng = np.random.default_rng(24)
    options = {k: v for k, v in FULL_STATE[algo].items() if k != "initial_accumulator_value"}
    spec = SPECS[algo]
    setup = spec.setup(1, **options)
    params = [randn(rng, s, d) for s, d in zip(SHAPES, DTYPES)]
    state = {s: [np.zeros_like(p) for p in params] for s in setup.state}
    names = [f"params[{i}]" for i in range(len(params))]
    plan = StepPlan(setup, params, state, names, backend)
    assert [g.dtype for g in plan.groups] == [np.float64, np.float32]
    grads = _grads(rng)

    def run(setup):
        if route == "run":
            plan.run(grads, setup)
        else:
            plan.run_addresses(np.array([g.ctypes.data for g in grads], np.int64), setup)

    for step in (1, 2):
        run(spec.setup(step, **options))
    arrays = {
        **{n: p for n, p in zip(names, params)},
        **{f"{s}{i}": a for s, arrays in state.items() for i, a in enumerate(arrays)},
    }
    snap = Snapshot(arrays)  # fmt: skip
    with pytest.raises(ValueError, match="^eps = 1e-50 does not fit in float32"):
        run(spec.setup(3, **{**options, "eps": 1e-50}))
    snap.assert_unchanged()


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_plan_refuses_a_wrong_number_of_gradients_after_steps(backend):
    """StepPlan checks the count itself (fastrms.torch and other callers rely on it)."""
    rng = np.random.default_rng(25)
    spec = SPECS["adam"]
    params = [randn(rng, s, d) for s, d in zip(SHAPES, DTYPES)]
    state = {s: [np.zeros_like(p) for p in params] for s in spec.setup(1).state}
    plan = StepPlan(spec.setup(1), params, state, [f"params[{i}]" for i in range(4)], backend)
    grads = _grads(rng)
    for step in (1, 2):
        plan.run(grads, spec.setup(step))
    arrays = {f"p{i}": p for i, p in enumerate(params)}
    arrays |= {f"{s}{i}": a for s, per_param in state.items() for i, a in enumerate(per_param)}
    snap = Snapshot(arrays)
    for wrong in (grads[:LAST], [*grads, grads[0]]):
        with pytest.raises(ValueError, match=f"^grads has {len(wrong)} arrays but params has 4"):
            plan.run(wrong, spec.setup(3))
    snap.assert_unchanged()
