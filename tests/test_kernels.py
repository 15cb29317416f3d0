"""Properties of the compiled CPU kernels: float32 stays float32, loops vectorize, no allocation
proportional to n, lazy compilation with an on-disk cache, fastmath off."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
from numba import njit, types

import fastrms
from fastrms import functional, precision, reference
from fastrms.kernels import _options, cpu, rules
from fastrms.specs import LAYOUTS

N_FLAGS = {name: len(layout.flags) for name, layout in LAYOUTS.items()}
N_HYPER = {name: len(layout.scalars) for name, layout in LAYOUTS.items()}
CASES = [
    (rule, flags)
    for rule, n in N_FLAGS.items()
    for flags in itertools.product([False, True], repeat=n)
    if not (rule == "sgd" and flags == (False, True))  # nesterov needs momentum
]
DOUBLE_OP = re.compile(
    r"\b(fadd|fsub|fmul|fdiv|fpext|fptrunc|fcmp)\b[^\n]*\bdouble\b|llvm\.sqrt\.f64"
)


def _llvm_ir(rule, flags, dtype):
    """LLVM IR of the serial loop, compiled afresh (cached code cannot be inspected)."""
    serial = cpu.loops(rules.RULES[rule], flags)[1]
    fresh = njit(cache=False, error_model=serial.targetoptions["error_model"])(serial.py_func)
    arrays = types.UniTuple(types.Array(dtype, 1, "C"), 2 + len(functional.SLOTS[rule]))
    sig = (types.int64, arrays, types.UniTuple(dtype, N_HYPER[rule]))
    fresh.compile(sig)
    module = fresh.inspect_llvm(sig)
    # Keep the loop's own functions, not the CPython wrapper that unboxes the arguments.
    functions = re.split(r"\n(?=define )", module)
    own = [f for f in functions if f.startswith("define") and "cpython" not in f.split("\n", 1)[0]]
    assert own, "no compiled function found in the module"
    return "\n".join(own)


def _grouped_llvm_ir(rule, flags, dtype):
    """LLVM IR of the serial grouped kernel (the same body as the parallel one's parts)."""
    signature = precision.signature(rule, np.dtype(str(dtype)))
    serial = cpu.grouped_loops(rules.RULES[rule], flags, signature)[1]
    fresh = njit(cache=False, error_model=serial.targetoptions["error_model"])(serial.py_func)
    table = types.Array(types.int64, 2, "C")
    sig = (table, types.Array(types.int64, 1, "C"), table, types.Array(dtype, 1, "C"))
    fresh.compile(sig)
    functions = re.split(r"\n(?=define )", fresh.inspect_llvm(sig))
    own = [f for f in functions if f.startswith("define") and "cpython" not in f.split("\n", 1)[0]]
    assert own, "no compiled function found in the module"
    return "\n".join(own)


@pytest.mark.parametrize(("rule", "flags"), CASES, ids=str)
def test_grouped_float32_kernel_is_float32_and_vectorized(rule, flags):
    """The grouped kernel's pieces vectorize as the single-array loops do (indexed from an
    unknown start instead of 0, they did not, and ran 4.8x slower)."""
    ir = _grouped_llvm_ir(rule, flags, types.float32)
    assert not DOUBLE_OP.search(ir), DOUBLE_OP.search(ir)
    assert re.search(r"<\d+ x float>", ir), "the grouped loop was not vectorized"


@pytest.mark.parametrize(("rule", "flags"), CASES, ids=str)
def test_team_body_is_float32_vectorized_and_claims_parts_atomically(rule, flags):
    """The C function that torch's OpenMP team runs (kernels.elementwise.team_body) has the
    grouped kernels' vectorized float32 loop, and takes parts with an atomic add."""
    from numba import cfunc

    body = cpu.team_body(rules.RULES[rule], flags, precision.signature(rule, np.dtype("float32")))
    fresh = cfunc(body._sig, cache=False, error_model="numpy")(body._pyfunc)  # not cached
    ir = fresh.inspect_llvm()
    assert not DOUBLE_OP.search(ir), DOUBLE_OP.search(ir)
    assert re.search(r"<\d+ x float>", ir), "the team's loop was not vectorized"
    assert re.search(r"atomicrmw add [^\n]*, i64 1 monotonic", ir), "no atomic claim"


@pytest.mark.parametrize(("rule", "flags"), CASES, ids=str)
def test_float32_loop_is_float32_and_vectorized(rule, flags):
    ir = _llvm_ir(rule, flags, types.float32)
    assert not DOUBLE_OP.search(ir), DOUBLE_OP.search(ir)
    assert re.search(r"<\d+ x float>", ir), "the loop was not vectorized"


def test_double_pattern_does_match_a_float64_loop():
    # Guards against the check above passing vacuously.
    assert DOUBLE_OP.search(_llvm_ir("rmsprop", (True, True, True), types.float64))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scalars_are_cast_to_the_array_dtype(dtype):
    p = np.ones(4, dtype)
    setup = functional.adam_setup(step=3, amsgrad=True)
    state = {s: np.zeros(4, dtype) for s in setup.state}
    plan = functional.plan(setup, p, np.ones(4, dtype), state)
    assert all(type(x) is dtype for x in plan.hyper)


def _peak_bytes(step, repeats=3):
    step()  # compile, allocate state
    tracemalloc.start()
    try:
        for _ in range(repeats):
            step()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_a_step_allocates_nothing_proportional_to_n(backend):
    peaks = {}
    for n in (1 << 18, 1 << 21):
        p, g = np.ones(n, np.float32), np.full(n, 0.5, np.float32)
        opt = fastrms.RMSProp(p, centered=True, momentum=0.9, backend=backend)
        peaks[n] = _peak_bytes(lambda opt=opt, g=g: opt.step(g))
    # The numpy backend's scratch space is bounded by its chunk size; the kernels use none.
    bound = 4 * reference.CHUNK * 4 + 64 * 1024 if backend == "numpy" else 64 * 1024
    assert max(peaks.values()) < bound, peaks
    assert peaks[1 << 21] < peaks[1 << 18] + 16 * 1024, peaks  # does not grow with n


def _python(code: str, **env) -> dict:
    """Run ``code`` in a fresh interpreter; it prints a JSON object as its last line."""
    import os

    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_is_cheap():
    # fastrms's own import is timed apart from its dependencies' (ml_dtypes alone takes about
    # 0.6 s here, and several times that on a loaded machine): ~0.07 s idle, bounded at 7x.
    result = _python("""
        import json, sys, time
        t = time.perf_counter()
        import numpy, ml_dtypes
        t_deps = time.perf_counter()
        import fastrms
        t_own = time.perf_counter()
        print(json.dumps({"deps": t_deps - t, "own": t_own - t_deps,
                          "numba": "numba" in sys.modules}))
    """)
    assert result["numba"] is False  # so nothing can have been compiled, and no CUDA import
    assert result["own"] < 0.5, result
    assert result["deps"] + result["own"] < 10.0, result  # a gross regression, not load


def test_a_cpu_step_never_imports_cuda():
    result = _python("""
        import json, sys, numpy as np, fastrms
        fastrms.Adam(np.ones(4)).step(np.ones(4))
        target = ("numba.cuda", "numba_cuda.", "cuda.", "cupy")  # not numba-cuda's import hook
        print(json.dumps({"cuda": sorted(m for m in sys.modules if m.startswith(target))}))
    """)
    assert result["cuda"] == []


def test_kernels_compile_lazily_and_load_from_the_disk_cache(tmp_path):
    code = """
        import json, numpy as np, fastrms
        from fastrms import precision
        from fastrms.kernels import cpu, rules
        assert cpu.loops.cache_info().currsize == 0  # importing compiled nothing
        assert cpu.grouped_loops.cache_info().currsize == 0
        p = np.ones(1 << 17, np.float32)
        fastrms.AdaGrad(p, eps_in_sqrt=True).step(np.ones_like(p))
        signature = precision.signature("adagrad", np.dtype(np.float32))
        parallel = cpu.grouped_loops(rules.adagrad, (True,), signature)[0]
        print(json.dumps({"hits": sum(parallel.stats.cache_hits.values()),
                          "misses": sum(parallel.stats.cache_misses.values()),
                          "p0": float(p[0])}))
    """
    first = _python(code, NUMBA_CACHE_DIR=str(tmp_path))
    second = _python(code, NUMBA_CACHE_DIR=str(tmp_path))
    assert (first["hits"], first["misses"]) == (0, 1)
    assert (second["hits"], second["misses"]) == (1, 0)
    assert first["p0"] == second["p0"] != 1.0
    assert list(tmp_path.rglob("*.nbi"))


def test_fastmath_is_off_unless_asked_for():
    assert _options.FASTMATH is False
    parallel, serial = cpu.loops(rules.rmsprop, (False, False, False))
    assert not parallel.targetoptions.get("fastmath") and not serial.targetoptions.get("fastmath")
    result = _python(
        """
        import json
        from fastrms.kernels import _options
        print(json.dumps({"fastmath": _options.FASTMATH}))
        """,
        FASTRMS_FASTMATH="1",
    )
    assert result["fastmath"] is True


def test_serial_and_parallel_loops_agree_bit_for_bit():
    rng = np.random.default_rng(1)
    n = cpu.PARALLEL_THRESHOLD + 1001
    p, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    big = fastrms.RMSProp(p.copy(), centered=True)
    big.step(g)
    head = fastrms.RMSProp(p[:1000].copy(), centered=True)  # below the threshold: serial loop
    head.step(g[:1000].copy())
    np.testing.assert_array_equal(big._params[0][:1000], head._params[0])
