"""The grouped step: one call over many arrays, bit for bit the per-array calls, checked first.

An optimizer class steps all its parameters through one :class:`fastrms.grouped.StepPlan`
(one parallel region per (backend, dtype) group on the CPU). These tests hold it to the
per-array functional calls bit for bit, over every optimizer and option combination and
arrays of uneven sizes (empty, one element, several threads' worth), and check the
guarantees of the cached plan: a bad gradient anywhere (the 100th of 150 arrays) or a kernel
that fails to compile for one group changes nothing, and the plan is reused only while it
still fits.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    ALGOS,
    FULL_STATE,
    Snapshot,
    all_arrays,
    assert_same_bits,
    option_cases,
    randn,
    require,
)

import fastrms
from fastrms import grouped, schedule
from fastrms.errors import BackendUnavailableError, FallbackWarning
from fastrms.specs import SPECS

#: Uneven sizes: empty, one element, odd ones, and enough in all (> PARALLEL_THRESHOLD) for the
#: parallel kernel, with one array longer than a thread's part so that it spans parts.
SIZES = (0, 1, 7, 1000, 3, 100_001, 0, 129, 40_000, 1)


def test_sizes_reach_the_parallel_kernel():
    from fastrms.kernels.cpu import PARALLEL_THRESHOLD

    assert sum(SIZES) >= PARALLEL_THRESHOLD


def _arrays(rng, sizes, dtype):
    return [randn(rng, n, dtype) if n else np.zeros(0, dtype) for n in sizes]


def _per_array(algo: str, params, grads_per_step, options):
    """The same steps, one functional call per array, with state kept by hand."""
    spec = SPECS[algo]
    fn = ALGOS[algo].step_fn
    initial = {s: float(options.get(o, 0.0)) for s, o in spec.initial.items()}
    state = [{} for _ in params]
    step_options = {k: v for k, v in options.items() if k in spec.step_options}
    for t, grads in enumerate(grads_per_step, start=1):
        used = spec.setup(t, **step_options).state
        for p, g, st in zip(params, grads, state):
            for s in used:
                st.setdefault(s, np.full_like(p, initial.get(s, 0.0)))
            step = {"step": t} if spec.counts_steps else {}
            fn(p, g, **st, **step, **step_options, backend="cpu")
    return state


@pytest.mark.parametrize(("algo", "options"), option_cases())
def test_grouped_step_equals_per_array_calls(algo, options):
    """Every option combination in float32 (float64 is covered by the mixed-dtype test: each
    combination compiles a kernel of its own, and CI compiles them all from cold)."""
    rng = np.random.default_rng(0)
    for dtype in (np.float32,):
        params = _arrays(rng, SIZES, dtype)
        mine = [p.copy() for p in params]
        grads = [_arrays(rng, SIZES, dtype) for _ in range(3)]
        opt = ALGOS[algo].cls(mine, lr=ALGOS[algo].lr, backend="cpu", **options)
        for g in grads:
            opt.step(g)
        state = _per_array(algo, params, grads, dict(lr=ALGOS[algo].lr, **options))
        for i, (p, q) in enumerate(zip(mine, params)):
            assert_same_bits(p, q, f"params[{i}]")
            for s, a in state[i].items():
                assert_same_bits(opt.state[s][i], a, f"{s}[{i}]")


@pytest.mark.parametrize("algo", ALGOS)
def test_mixed_dtypes_are_grouped_and_equal_the_reference(algo):
    rng = np.random.default_rng(1)
    dtypes = [np.float32, np.float64] * 5
    params = [randn(rng, n or 1, d) for n, d in zip(SIZES, dtypes)]
    hyper = dict(lr=ALGOS[algo].lr, **FULL_STATE[algo])
    cpu = ALGOS[algo].cls([p.copy() for p in params], backend="cpu", **hyper)
    ref = ALGOS[algo].cls([p.copy() for p in params], backend="numpy", **hyper)
    for _ in range(3):
        g = [randn(rng, p.shape, p.dtype) for p in params]
        cpu.step(g)
        ref.step(g)
    assert len(cpu._plan.groups) == 2
    got, want = all_arrays(cpu), all_arrays(ref)
    for name in want:
        assert_same_bits(got[name], want[name], name)


def test_multi_tensor_step_function():
    rng = np.random.default_rng(2)
    params = _arrays(rng, SIZES, np.float32)
    mine = [p.copy() for p in params]
    grads = _arrays(rng, SIZES, np.float32)
    state = {s: [np.zeros_like(p) for p in params] for s in ("exp_avg", "exp_avg_sq")}
    fastrms.functional.multi_tensor_step("adam", mine, grads, state, step=1, lr=1e-2)
    for i, (p, g) in enumerate(zip(params, grads)):
        m, v = np.zeros_like(p), np.zeros_like(p)
        fastrms.functional.adam(p, g, m, v, step=1, lr=1e-2, backend="numpy")
        assert_same_bits(mine[i], p)
        assert_same_bits(state["exp_avg"][i], m)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        fastrms.functional.multi_tensor_step("nonsense", mine, grads, state)
    with pytest.raises(ValueError, match=r"state\['exp_avg_sq'\]"):
        fastrms.functional.multi_tensor_step("adam", mine, grads, {"exp_avg": state["exp_avg"]})
    with pytest.raises(TypeError, match="unexpected"):
        fastrms.functional.multi_tensor_step("adam", mine, grads, state, momentum=0.9)


# -- nothing is written unless everything is right ------------------------------------------------


def _model(rng, n=150, dtype=np.float32):
    sizes = rng.integers(1, 3000, n)
    sizes[::7] = 1
    return [randn(rng, int(k), dtype) for k in sizes]


BAD_GRADS = {
    "shape": lambda g, params: np.ones(g.size + 1, g.dtype),
    "dtype": lambda g, params: g.astype(np.float64),
    "strided": lambda g, params: np.repeat(g, 2)[::2],
    "overlaps a parameter": lambda g, params: (
        params[3][: g.size] if params[3].size >= g.size else params[3]
    ),
    "not an array": lambda g, params: g.tolist(),
}


@pytest.mark.parametrize("first_step", [True, False], ids=["first-step", "later-step"])
@pytest.mark.parametrize("bad", BAD_GRADS)
def test_bad_gradient_in_the_100th_of_150_arrays_changes_nothing(bad, first_step):
    rng = np.random.default_rng(3)
    params = _model(rng)
    params[3] = randn(rng, 5000, np.float32)  # large enough to hold any gradient it aliases
    opt = fastrms.Adam(params, lr=1e-2, amsgrad=True)
    grads = [randn(rng, p.shape, p.dtype) for p in params]
    if not first_step:
        opt.step(grads)
    grads = [randn(rng, p.shape, p.dtype) for p in params]
    grads[99] = BAD_GRADS[bad](grads[99], params)
    if bad == "overlaps a parameter" and grads[99].size != params[99].size:
        grads[99] = params[3][: params[99].size]
    before = Snapshot(all_arrays(opt))
    state_before = {k: list(v) for k, v in opt.state.items()}
    with pytest.raises((TypeError, ValueError), match=r"grads\[99\]"):
        opt.step(grads)
    before.assert_unchanged()
    assert {k: list(v) for k, v in opt.state.items()} == state_before or first_step
    if first_step:
        assert opt.state == {}  # the state made for the refused step is gone
    assert opt.step_count == (0 if first_step else 1)
    grads[99] = randn(rng, params[99].shape, np.float32)
    opt.step(grads)  # and the optimizer still works


def test_gradient_may_overlap_another_gradient_but_not_state():
    p = [np.ones(10, np.float32), np.ones(10, np.float32)]
    opt = fastrms.Adam(p)
    shared = np.ones(10, np.float32)
    opt.step([shared, shared])  # gradients are only read: sharing one is fine
    state = opt.state["exp_avg"][0]
    before = Snapshot(all_arrays(opt))
    with pytest.raises(ValueError, match=r"grads\[1\] overlaps exp_avg of params\[0\]"):
        opt.step([shared, state])
    before.assert_unchanged()


def test_compile_failure_of_one_group_writes_nothing(monkeypatch):
    """A kernel that cannot compile for the second group (float64) is found before the first
    group (float32) runs: a forced cpu backend raises, auto falls back to NumPy."""
    from numba.core.errors import TypingError

    backend = fastrms.dispatch.get("cpu")
    real = backend.grouped_kernels

    def failing(rule, flags, signature):
        parallel, serial = real(rule, flags, signature)

        def kernel(table, part_ptr, items, hyper):
            if hyper[0].dtype == np.float64:
                raise TypingError("no float64 here")
            return serial(table, part_ptr, items, hyper)

        return kernel, kernel

    monkeypatch.setattr(backend, "grouped_kernels", failing)
    monkeypatch.setattr(backend, "_reason", None)
    params = [np.ones(5, np.float32), np.ones(5, np.float64)]
    opt = fastrms.Adam(params, backend="cpu")
    with pytest.raises(BackendUnavailableError, match="failed to compile"):
        opt.step([np.ones(5, np.float32), np.ones(5)])
    assert (params[0] == 1).all() and (params[1] == 1).all()
    monkeypatch.setattr(backend, "_reason", None)
    monkeypatch.setattr(fastrms.dispatch, "_warned", set())
    auto = fastrms.Adam(params)
    with pytest.warns(FallbackWarning):
        auto.step([np.ones(5, np.float32), np.ones(5)])
    ref = [np.ones(5, np.float32), np.ones(5)]
    fastrms.Adam(ref, backend="numpy").step([np.ones(5, np.float32), np.ones(5)])
    for a, b in zip(params, ref):
        assert_same_bits(a, b)


# -- the cached plan --------------------------------------------------------------------------


def test_plan_is_made_once_and_remade_when_options_change_the_state():
    rng = np.random.default_rng(4)
    params = _arrays(rng, SIZES, np.float32)
    opt = fastrms.SGD(params, lr=0.1)
    grads = _arrays(rng, SIZES, np.float32)
    opt.step(grads)
    plan = opt._plan
    opt.step(grads)
    opt.step([g.copy() for g in grads])  # new gradient arrays: checked, same plan
    assert opt._plan is plan and "momentum_buffer" not in opt.state
    opt.lr = 0.05  # scalars only: same plan
    opt.step(grads)
    assert opt._plan is plan
    opt.momentum = 0.9  # now a state array is needed: a new plan
    opt.step(grads)
    assert opt._plan is not plan and len(opt.state["momentum_buffer"]) == len(params)


def test_plan_notices_replaced_state_arrays():
    p = [np.ones(100, np.float32)]
    opt = fastrms.Adam(p, lr=0.1)
    opt.step([np.ones(100, np.float32)])
    plan = opt._plan
    opt.load_state_dict(opt.state_dict())  # new state arrays, same values
    opt.step([np.ones(100, np.float32)])
    assert opt._plan is not plan
    ref = [np.ones(100, np.float32)]
    r = fastrms.Adam(ref, lr=0.1, backend="numpy")
    r.step([np.ones(100, np.float32)])
    r.step([np.ones(100, np.float32)])
    assert_same_bits(p[0], ref[0])


def test_same_gradients_are_not_rechecked(monkeypatch):
    rng = np.random.default_rng(5)
    params = _arrays(rng, SIZES, np.float32)
    grads = _arrays(rng, SIZES, np.float32)
    opt = fastrms.Adam(params)
    opt.step(grads)
    calls = []
    monkeypatch.setattr(grouped, "host_addresses", lambda a: calls.append(len(a)) or 1 / 0)
    opt.step(grads)  # the same arrays: no check, no address lookup
    assert calls == []
    grads[4] = grads[4].copy()
    with pytest.raises(ZeroDivisionError, match="division by zero"):  # the patched lookup's
        opt.step(grads)
    assert calls == [1]  # only the new one is looked at


# -- the schedule -------------------------------------------------------------------------------


@pytest.mark.parametrize("parts", [1, 2, 3, 8, 64])
def test_schedule_covers_every_element_once_in_equal_parts(parts):
    rng = np.random.default_rng(6)
    sizes = rng.integers(0, 5000, 40)
    sizes[[0, 5, 17]] = 0
    part_ptr, items = schedule.schedule(sizes, parts)
    covered = [np.zeros(n, int) for n in sizes]
    per_part = []
    for k in range(len(part_ptr) - 1):
        work = 0
        for a, start, stop in items[part_ptr[k] : part_ptr[k + 1]]:
            assert 0 <= start < stop <= sizes[a]
            covered[a][start:stop] += 1
            work += stop - start
        per_part.append(work)
    assert all((c == 1).all() for c in covered)
    assert max(per_part) - min(per_part) <= 1  # equal parts, whatever the sizes


def test_schedule_of_nothing():
    part_ptr, items = schedule.schedule(np.array([0, 0]), 4)
    assert items.shape == (0, 3) and list(part_ptr) == [0, 0]


@pytest.mark.parametrize("threshold", [None, 0, 1 << 40], ids=["default", "parallel", "serial"])
def test_parallel_threshold_chooses_the_kernel_not_the_result(threshold):
    """A plan's own ``parallel_threshold`` (fastrms.torch's is higher) picks the one-thread or
    the parallel kernel; both give the bits of the default plan."""
    import numba

    rng = np.random.default_rng(7)
    params = _arrays(rng, SIZES, np.float32)
    grads = _arrays(rng, SIZES, np.float32)
    setup = SPECS["adam"].setup(1, lr=1e-2)
    results = []
    for t in (None, threshold):
        ps = [p.copy() for p in params]
        state = {s: [np.zeros_like(p) for p in ps] for s in setup.state}
        names = [f"params[{i}]" for i in range(len(ps))]
        plan = grouped.StepPlan(setup, ps, state, names, "cpu", parallel_threshold=t)
        plan.run(grads, setup)
        results.append((ps, state, plan.groups[0]._threads))
    (ref, ref_state, _), (got, got_state, threads) = results
    if threshold == 1 << 40:
        assert threads == 1
    else:  # SIZES reach the default threshold
        assert threads == numba.get_num_threads()
    for i, (a, b) in enumerate(zip(got, ref)):
        assert_same_bits(a, b, f"params[{i}]")
        for s in setup.state:
            assert_same_bits(got_state[s][i], ref_state[s][i], f"{s}[{i}]")


def test_torch_buckets_run_on_one_thread_below_their_threshold():
    torch = require("torch", 'pip install -e ".[test]"')
    import fastrms.torch as ft

    threshold = ft.PARALLEL_THRESHOLD if ft._torch_team() is None else ft.TEAM_THRESHOLD
    p = torch.zeros(threshold - 1, requires_grad=True)
    opt = ft.Adam([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    (plan,) = opt._plans.values()
    assert plan.groups[0]._threads == 1
    assert torch.allclose(p.detach(), torch.full_like(p, -0.1))


# -- another library's threads (fastrms.torch runs parallel steps on PyTorch's OpenMP team) ----


class ThreadTeam:
    """A :class:`fastrms.grouped.Team` made of Python threads: ctypes releases the GIL while
    the C function runs, so they claim the step's parts concurrently."""

    def __init__(self, threads: int) -> None:
        self.count, self.runs = threads, 0

    def threads(self) -> int:
        return self.count

    def run(self, function: int, args: int, threads: int) -> None:
        import ctypes
        import threading

        body = ctypes.CFUNCTYPE(None, ctypes.c_int64)(function)
        team = [threading.Thread(target=body, args=(args,)) for _ in range(threads - 1)]
        for t in team:
            t.start()
        body(args)
        for t in team:
            t.join()
        self.runs += 1


def _flag_cases() -> list:
    """One option case per distinct kernel (rule and flags), in both dtypes."""
    seen, cases = set(), []
    for case in option_cases():
        algo, options = case.values
        setup = SPECS[algo].setup(1, **{k: v for k, v in options.items()
                                        if k in SPECS[algo].step_options})  # fmt: skip
        if (setup.rule, setup.flags) not in seen:
            seen.add((setup.rule, setup.flags))
            cases += [pytest.param(algo, options, d, id=f"{case.id}-{d.__name__}")
                      for d in (np.float32, np.float64)]  # fmt: skip
    return cases


@pytest.mark.parametrize(("algo", "options", "dtype"), _flag_cases())
def test_a_team_runs_the_parallel_step_bit_for_bit(algo, options, dtype):
    """Through kernels.elementwise.team_body, three threads claiming parts as they go give
    the bits of Numba's own parallel kernel, on arrays that span parts."""
    rng = np.random.default_rng(8)
    options = {k: v for k, v in options.items() if k in SPECS[algo].step_options}
    setup = SPECS[algo].setup(2, lr=ALGOS[algo].lr, **options)
    params = _arrays(rng, SIZES, dtype)
    grads = _arrays(rng, SIZES, dtype)
    names = [f"params[{i}]" for i in range(len(params))]
    results = []
    for team in (None, ThreadTeam(3)):
        ps = [p.copy() for p in params]
        srng = np.random.default_rng(9)  # the same state for both
        state = {s: [randn(srng, p.shape, dtype) ** 2 for p in ps] for s in setup.state}
        plan = grouped.StepPlan(setup, ps, state, names, "cpu", team=team)
        plan.run(grads, setup)
        results.append((ps, state))
    assert team.runs == 1
    assert plan.groups[0]._team_args[5] == 3 * 4 + 3  # every part claimed, then one miss each
    (ref, ref_state), (got, got_state) = results
    for i, (a, b) in enumerate(zip(got, ref)):
        assert_same_bits(a, b, f"params[{i}]")
        for s in setup.state:
            assert_same_bits(got_state[s][i], ref_state[s][i], f"{s}[{i}]")


def test_a_team_of_one_thread_runs_the_serial_kernel():
    rng = np.random.default_rng(10)
    setup = SPECS["rmsprop"].setup(1, lr=1e-2)
    ps = _arrays(rng, SIZES, np.float32)
    state = {"square_avg": [np.zeros_like(p) for p in ps]}
    team = ThreadTeam(1)
    plan = grouped.StepPlan(setup, ps, state, [f"p{i}" for i in range(len(ps))], team=team)
    plan.run(_arrays(rng, SIZES, np.float32), setup)
    assert team.runs == 0 and plan.groups[0]._threads == 1


def test_run_addresses_equals_run_and_refuses_overlaps():
    """Gradients given by their addresses (as fastrms.torch gives them) step as the arrays
    do; one that overlaps a parameter is refused, naming both, before anything is written."""
    rng = np.random.default_rng(11)
    setup = SPECS["adam"].setup(1, lr=1e-2)
    params = _arrays(rng, SIZES, np.float32)
    grads = _arrays(rng, SIZES, np.float32)
    names = [f"params[{i}]" for i in range(len(params))]
    got = []
    for by_address in (False, True):
        ps = [p.copy() for p in params]
        state = {s: [np.zeros_like(p) for p in ps] for s in setup.state}
        plan = grouped.StepPlan(setup, ps, state, names, "cpu")
        if by_address:
            plan.run_addresses(np.array([g.ctypes.data for g in grads], np.int64), setup)
        else:
            plan.run(grads, setup)
        got.append((ps, state))
    for a, b in zip(*[r[0] for r in got]):
        assert_same_bits(a, b)
    addresses = np.array([g.ctypes.data for g in grads], np.int64)
    addresses[3] = ps[5].ctypes.data  # the fourth gradient is (the start of) params[5]
    snapshot = Snapshot(
        {f"a{i}": a for i, a in enumerate(ps + [a for v in state.values() for a in v])}
    )
    with pytest.raises(ValueError, match=r"grads\[3\] overlaps params\[5\]"):
        plan.run_addresses(addresses, setup)
    snapshot.assert_unchanged()


def test_run_addresses_on_the_numpy_backend():
    """The reference backend reads the gradients through views of their addresses."""
    rng = np.random.default_rng(12)
    setup = SPECS["sgd"].setup(1, lr=0.5)
    ps = [randn(rng, (3, 4), np.float64), np.zeros(0), randn(rng, 5, np.float64)]
    grads = [randn(rng, p.shape, np.float64) for p in ps]
    want = [p - 0.5 * g for p, g in zip(ps, grads)]
    plan = grouped.StepPlan(setup, ps, {}, ["a", "b", "c"], "numpy")
    plan.run_addresses(np.array([g.ctypes.data for g in grads], np.int64), setup)
    for p, w in zip(ps, want):
        assert_same_bits(p, w)
