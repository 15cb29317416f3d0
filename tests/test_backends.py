"""Backend choice, availability reports, and fallback when a dependency is unavailable."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

import fastrms
from fastrms import dispatch, functional
from fastrms.errors import BackendUnavailableError, FallbackWarning


@pytest.fixture
def fresh(monkeypatch):
    """Fresh backend objects and warning memory, restored after the test."""
    monkeypatch.setitem(dispatch._INSTANCES, "cpu", dispatch._CpuBackend())
    monkeypatch.setitem(dispatch._INSTANCES, "cuda", dispatch._CudaBackend())
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


@pytest.fixture
def numba_missing(monkeypatch, fresh):
    """Make ``import numba`` fail, as on a platform without it."""
    import fastrms.kernels

    monkeypatch.setitem(sys.modules, "numba", None)
    for name in ("cpu", "elementwise", "rules", "cuda", "_options"):
        monkeypatch.delitem(sys.modules, f"fastrms.kernels.{name}", raising=False)
        monkeypatch.delattr(fastrms.kernels, name, raising=False)


@pytest.fixture
def compile_fails(monkeypatch, fresh):
    """Make every CPU kernel fail to compile, as on a platform LLVM cannot target."""
    from numba.core.errors import TypingError

    from fastrms.kernels import cpu

    def broken(*args):
        raise TypingError("simulated compile failure")

    monkeypatch.setattr(cpu, "launch", broken)
    monkeypatch.setattr(cpu, "grouped_loops", lambda rule, flags, signature: (broken, broken))


def _adam_case(seed=0):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(257).astype(np.float32)
    grads = [rng.standard_normal(257).astype(np.float32) for _ in range(3)]
    return p, grads


def _run(p, grads, **kw):
    opt = fastrms.Adam(p.copy(), amsgrad=True, weight_decay=0.1, **kw)
    for g in grads:
        opt.step(g)
    return opt


def _expected(p, grads):
    return _run(p, grads, backend="numpy")


def _assert_same(opt, ref):
    np.testing.assert_array_equal(opt._params[0], ref._params[0])
    for key in ref.state:
        np.testing.assert_array_equal(opt.state[key][0], ref.state[key][0])


def test_auto_picks_cpu_for_numpy_arrays(fresh):
    plan = functional.plan(functional.sgd_setup(step=1), np.ones(3), np.ones(3), {})
    assert (plan.backend.name, plan.auto) == ("cpu", True)


def test_environment_variable_overrides_auto_but_not_an_explicit_choice(fresh, monkeypatch):
    monkeypatch.setenv("FASTRMS_BACKEND", "numpy")
    setup = functional.sgd_setup(step=1)
    assert functional.plan(setup, np.ones(3), np.ones(3), {}).backend.name == "numpy"
    assert functional.plan(setup, np.ones(3), np.ones(3), {}, "cpu").backend.name == "cpu"


def test_bad_environment_variable_is_named(fresh, monkeypatch):
    monkeypatch.setenv("FASTRMS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FASTRMS_BACKEND"):
        functional.sgd(np.ones(3), np.ones(3), step=1)


def test_bad_backend_argument_is_named():
    with pytest.raises(ValueError, match="backend"):
        fastrms.SGD(np.ones(3), backend="fast")
    with pytest.raises(ValueError, match="backend"):
        functional.sgd(np.ones(3), np.ones(3), step=1, backend="fast")


def test_numpy_backend_is_always_available(numba_missing):
    assert fastrms.backends()["numpy"].available


def test_without_numba_auto_falls_back_with_one_warning(numba_missing):
    p, grads = _adam_case()
    with pytest.warns(FallbackWarning, match="numba cannot be imported") as record:
        opt = _run(p, grads)
    assert len([w for w in record if w.category is FallbackWarning]) == 1
    _assert_same(opt, _expected(p, grads))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # no second warning
        _run(p, grads)


def test_without_numba_a_forced_cpu_backend_is_an_error(numba_missing, monkeypatch):
    p, grads = _adam_case()
    opt = fastrms.Adam(p.copy(), backend="cpu")
    with pytest.raises(BackendUnavailableError, match="numba cannot be imported"):
        opt.step(grads[0])
    np.testing.assert_array_equal(opt._params[0], p)
    monkeypatch.setenv("FASTRMS_BACKEND", "cpu")
    with pytest.raises(BackendUnavailableError, match="numba cannot be imported"):
        fastrms.Adam(p.copy()).step(grads[0])


def test_without_numba_backends_reports_why(numba_missing):
    info = fastrms.backends()
    assert not info["cpu"].available
    assert "numba cannot be imported" in info["cpu"].detail
    assert not info["cuda"].available


def test_compile_failure_falls_back_under_auto(compile_fails):
    p, grads = _adam_case()
    with pytest.warns(FallbackWarning, match="failed to compile"):
        opt = _run(p, grads)
    _assert_same(opt, _expected(p, grads))
    assert "failed to compile" in fastrms.backends()["cpu"].detail


def test_compile_failure_with_forced_cpu_is_an_error_and_changes_nothing(compile_fails):
    p, grads = _adam_case()
    opt = fastrms.Adam(p.copy(), amsgrad=True, backend="cpu")
    with pytest.raises(BackendUnavailableError, match="failed to compile"):
        opt.step(grads[0])
    np.testing.assert_array_equal(opt._params[0], p)
    for arrays in opt.state.values():
        assert not arrays[0].any()


def test_without_numba_cuda_the_reason_says_how_to_install(fresh, monkeypatch):
    import numba

    monkeypatch.setitem(sys.modules, "numba.cuda", None)
    monkeypatch.delattr(numba, "cuda", raising=False)
    info = fastrms.backends()["cuda"]
    assert not info.available
    assert "fastrms[cuda]" in info.detail


def test_without_a_driver_the_reason_is_the_drivers(fresh, monkeypatch):
    cuda = pytest.importorskip("numba.cuda")
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    monkeypatch.setattr(cuda, "is_available", lambda: False)

    def no_driver():
        raise RuntimeError("CUDA driver library cannot be found")

    monkeypatch.setattr(cuda, "get_current_device", no_driver)
    info = fastrms.backends()["cuda"]
    assert not info.available
    assert "CUDA driver library cannot be found" in info.detail


def test_cpu_report_names_threads(fresh):
    import numba

    info = fastrms.backends()["cpu"]
    assert info.available
    assert f"{numba.get_num_threads()} threads" in info.detail


def test_one_thread_gives_the_same_result():
    import numba

    p, grads = _adam_case()
    big = np.tile(p, 300)  # above the parallel threshold
    big_grads = [np.tile(g, 300) for g in grads]
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _run(big, big_grads)
    finally:
        numba.set_num_threads(before)
    _assert_same(_run(big, big_grads), one)


def test_info_command_lists_backends_and_versions(capsys):
    from fastrms import cli

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert fastrms.__version__ in out and "numba" in out
    for name, info in fastrms.backends().items():
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert ("available" if info.available else "unavailable") in line
        assert info.detail.split("(")[0].strip() in line
