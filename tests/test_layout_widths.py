"""Nothing in the kernels is sized by hand (issue 17): a rule with more state arrays and more
scalars than any built-in one runs through every route with no edit outside its own rule and
layout.

The test registers a throwaway layout ``wide`` (4 state slots, 13 scalars, one flag) and its
rule, steps it through the one-array loops (serial and ``prange``), the grouped kernels
(serial, parallel and on another library's thread team) and the CUDA simulator's one-array and
grouped kernels, and compares every result bit for bit with a NumPy formula of the same
operations in the same order (float32 throughout, fastmath off, so there is one right answer).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numba.extending import register_jitable

from fastrms import dispatch, functional, grouped, precision, specs
from fastrms.kernels import cpu, rules
from fastrms.specs import Layout, Setup, Slot

N_SLOTS, N_SCALARS = 4, 13
SLOT_NAMES = tuple(f"s{k}" for k in range(N_SLOTS))
WIDE = Layout(
    "wide",
    (Slot("s0"), Slot("s1"), "s2", "s3"),
    {f"h{k}": f"h{k}" for k in range(N_SCALARS)},
    ("keep_max",),
)


@register_jitable(inline="always")
def wide(i, arrays, hyper, flags):
    """Every slot and scalar in use, so a column or scalar read from the wrong place shows."""
    param = arrays[0]
    grad = arrays[1]
    s0 = arrays[2]
    s1 = arrays[3]
    s2 = arrays[4]
    s3 = arrays[5]
    keep_max = flags[0]
    p = param[i]
    g = grad[i]
    a = hyper[0] * s0[i] + hyper[1] * g
    s0[i] = a
    b = hyper[2] * s1[i] + hyper[3] * g * g
    s1[i] = b
    if keep_max:
        c = s2[i]
        if c < b:
            c = b
    else:
        c = s2[i] + hyper[4]
    s2[i] = c
    d = s3[i] * hyper[5] + hyper[6]
    s3[i] = d
    u = hyper[7] * a / (math.sqrt(b) + hyper[8]) + hyper[9] * c - hyper[10] * d
    param[i] = p - u + hyper[11] * g - hyper[12] * p


def numpy_wide(arrays, hyper, keep_max):
    """The same update with NumPy, on float32 arrays and float32 scalars, in place."""
    p, g, s0, s1, s2, s3 = arrays
    h = hyper
    a = h[0] * s0 + h[1] * g
    b = h[2] * s1 + h[3] * g * g
    c = np.where(s2 < b, b, s2) if keep_max else s2 + h[4]
    d = s3 * h[5] + h[6]
    u = h[7] * a / (np.sqrt(b) + h[8]) + h[9] * c - h[10] * d
    p[...] = p - u + h[11] * g - h[12] * p
    s0[...], s1[...], s2[...], s3[...] = a, b, c, d


SCALARS = tuple(float(x) for x in np.linspace(0.05, 0.95, N_SCALARS))


@pytest.fixture
def registered(monkeypatch):
    """``wide`` in the registries the kernels and the policy read, removed afterwards."""
    monkeypatch.setitem(specs.LAYOUTS, "wide", WIDE)
    monkeypatch.setitem(rules.RULES, "wide", wide)
    assert N_SLOTS > specs.MAX_SLOTS and N_SCALARS > specs.MAX_SCALARS  # wider than any


def _data(sizes, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        p, g = rng.standard_normal(n), rng.standard_normal(n)
        state = [rng.random(n) for _ in SLOT_NAMES]  # positive: s1 stays a sum of squares
        out.append([x.astype(np.float32) for x in (p, g, *state)])
    return out


def _expected(data, keep_max, steps):
    hyper = np.array(SCALARS, np.float32)
    out = [[a.copy() for a in arrays] for arrays in data]
    for _ in range(steps):
        for arrays in out:
            numpy_wide(arrays, hyper, keep_max)
    return out


def _assert_equal(got, want):
    for arrays, expected in zip(got, want):
        for a, b in zip(arrays, expected):
            np.testing.assert_array_equal(a, b)


def test_a_layout_takes_slots_as_names_or_slots():
    assert WIDE.slots == SLOT_NAMES
    assert [s.name for s in WIDE.slot_specs] == list(SLOT_NAMES)
    assert all(s.initial == 0.0 and s.like == "param" for s in WIDE.slot_specs)


def test_the_policy_sizes_the_signature_from_the_layout(registered):
    sig = precision.signature("wide", np.dtype(np.float32))
    assert sig.scalars == N_SCALARS
    assert sig.table_width == 1 + 2 + N_SLOTS
    assert sig.columns == ("float32",) * (2 + N_SLOTS) and sig.compute == "float32"
    assert precision.SLOTS["wide"] == SLOT_NAMES and len(precision.SCALARS["wide"]) == N_SCALARS


@pytest.mark.parametrize("rounding", ["stochastic", "nearest", "kahan"])
@pytest.mark.parametrize("state", ["float32", "int8"])
def test_extra_words_follow_the_addresses_in_the_arrays_order(rounding, state):
    """A table row: the count, one address per array, then each storage's extra words
    (a bfloat16 parameter's key or Kahan compensation, then each int8 slot's scales)."""
    s, u = precision.STORAGES["int8_signed"], precision.STORAGES["int8_unsigned"]
    slots = (s, u, u) if state == "int8" else None
    bf16 = precision.signature("adam", precision.BFLOAT16, slots, rounding=rounding)
    n = len(bf16.storages)  # param, grad and Adam's three slots
    param_words = 0 if rounding == "nearest" else 1
    assert bf16.extra_word(0) == 1 + n
    assert bf16.extra_word(1) == bf16.extra_word(2) == 1 + n + param_words  # grad: no words
    slot_words = 3 if state == "int8" else 0
    assert bf16.table_width == bf16.extra_word(n) == 1 + n + param_words + slot_words
    # float32 parameters with int8 state: no extra word before the scales
    f32 = precision.signature("adam", np.dtype(np.float32), (s, u, u))
    assert (f32.table_width, f32.extra_word(2)) == (3 + 2 * 3, 3 + 3)


def test_the_policy_refuses_storages_it_cannot_load():
    """Without a codec, a storage must hold the compute dtype: float64 state beside float32
    parameters, or a float32 step computed in float64, has no kernel yet."""
    f32, f64 = precision.STORAGES["float32"], precision.STORAGES["float64"]
    assert precision.signature("adam", np.dtype(np.float32), (f32,) * 3).storages == (f32,) * 5
    with pytest.raises(ValueError, match="exp_avg_sq held as float64 cannot be computed"):
        precision.signature("adam", np.dtype(np.float32), (f32, f64, f32))
    with pytest.raises(ValueError, match="param held as float32 cannot be computed in float64"):
        precision.signature("adam", np.dtype(np.float32), compute=np.dtype(np.float64))
    with pytest.raises(ValueError, match="adam has 3 state slots, got 2"):
        precision.signature("adam", np.dtype(np.float32), (f32, f32))


@pytest.mark.parametrize("keep_max", [False, True])
@pytest.mark.parametrize("n", [1000, cpu.PARALLEL_THRESHOLD + 17])  # serial, prange
def test_one_array_loops(registered, keep_max, n):
    data = _data([n])
    setup = Setup("wide", (keep_max,), SCALARS, SLOT_NAMES)
    p, g, *state = [a.copy() for a in data[0]]
    for _ in range(3):
        functional.plan(setup, p, g, dict(zip(SLOT_NAMES, state)), backend="cpu").run()
    _assert_equal([[p, g, *state]], _expected(data, keep_max, 3))


class ThreadTeam:
    """Another library's team of threads, made of Python threads (ctypes drops the GIL)."""

    def __init__(self, threads: int) -> None:
        self.count = threads

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


@pytest.mark.parametrize("route", ["serial", "parallel", "team"])
@pytest.mark.parametrize("keep_max", [False, True])
def test_grouped_kernels(registered, route, keep_max):
    sizes = [0, 1, 7, 300, 5000, 70_000]
    data = _data(sizes, seed=1)
    arrays = [[a.copy() for a in row] for row in data]
    setup = Setup("wide", (keep_max,), SCALARS, SLOT_NAMES)
    params = [row[0] for row in arrays]
    state = {s: [row[2 + k] for row in arrays] for k, s in enumerate(SLOT_NAMES)}
    names = [f"params[{i}]" for i in range(len(sizes))]
    threshold = {"serial": 1 << 60, "parallel": 0, "team": 0}[route]
    team = ThreadTeam(3) if route == "team" else None
    plan = grouped.StepPlan(setup, params, state, names, "cpu", None, threshold, team)
    for _ in range(3):
        plan.run([row[1] for row in arrays], setup)
    assert plan.groups[0].table.shape[1] == 1 + 2 + N_SLOTS
    _assert_equal(arrays, _expected(data, keep_max, 3))


def test_one_array_step_on_a_team(registered):
    """The one-array step on another library's team runs as a grouped step of one row."""
    data = _data([cpu.PARALLEL_THRESHOLD + 5], seed=2)
    arrays = [a.copy() for a in data[0]]
    hyper = precision.cast("wide", SCALARS, np.dtype(np.float32))
    for _ in range(2):
        dispatch.get("cpu")._team_launch(ThreadTeam(2), "wide", (True,), tuple(arrays), hyper)
    _assert_equal([arrays], _expected(data, True, 2))


def test_cuda_simulator_kernels():
    """The CUDA one-array and grouped kernels, in the simulator (a fresh process: the
    simulator must be chosen before numba is imported)."""
    code = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        sys.path.insert(0, sys.argv[1])
        import test_layout_widths as t
        from numba import cuda
        from fastrms import functional, grouped, specs
        from fastrms.kernels import rules
        specs.LAYOUTS["wide"] = t.WIDE
        rules.RULES["wide"] = t.wide
        setup = specs.Setup("wide", (True,), t.SCALARS, t.SLOT_NAMES)
        data = t._data([5, 300], seed=3)
        want = t._expected(data, True, 2)
        one = [cuda.to_device(a) for a in data[0]]
        for _ in range(2):
            functional.plan(setup, one[0], one[1], dict(zip(t.SLOT_NAMES, one[2:])),
                            backend="cuda").run()
        rows = [[cuda.to_device(a) for a in row] for row in data]
        state = {s: [row[2 + k] for row in rows] for k, s in enumerate(t.SLOT_NAMES)}
        plan = grouped.StepPlan(setup, [r[0] for r in rows], state, ["a", "b"], "cuda")
        for _ in range(2):
            plan.run([r[1] for r in rows], setup)
        got = [[a.copy_to_host() for a in one]] + [[a.copy_to_host() for a in r] for r in rows]
        t._assert_equal(got, [want[0]] + want)
        print(json.dumps({"ok": True, "width": int(plan.groups[0].table.shape[1])}))
        """
    )
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-c", code, here], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"ok": True, "width": 7}
