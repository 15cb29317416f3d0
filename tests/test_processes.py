"""fastrms in forked, forkserver and spawned children, and from several Python threads at once.

Numba starts one threading layer per process; GNU OpenMP (``omp``) kills a child forked after
the parent ran a parallel region, and ``workqueue`` aborts when two threads run parallel regions
at once. :mod:`fastrms.threads` picks TBB (or serializes the launches under ``workqueue``).

The process tests run this file as a script in a fresh interpreter (``python test_processes.py
MODE OUT``), since the layer is fixed once a process has started it: the script writes each
result to ``OUT`` and prints a JSON summary; the tests compare the results bit for bit with the
NumPy reference computed here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import all_arrays, assert_same_bits, randn

import fastrms
from fastrms import functional

#: Above the kernels' PARALLEL_THRESHOLD, so that a step runs a parallel region (and so starts
#: Numba's threading layer); checked in test_sizes_run_the_parallel_kernels.
N = 1 << 17
STEPS = 20  # per thread: enough that the four threads' steps overlap
TIMEOUT = 120  # seconds for a script (a cold Numba cache compiles for about 10 s)
OPTIMIZERS = {
    "adam": (fastrms.Adam, dict(lr=1e-2, amsgrad=True)),
    "rmsprop": (fastrms.RMSProp, dict(lr=1e-2, centered=True, momentum=0.9)),
    "adagrad": (fastrms.AdaGrad, dict(lr=1e-1, weight_decay=0.1)),
    "sgd": (fastrms.SGD, dict(lr=5e-2, momentum=0.9, nesterov=True)),
}
#: Sizes of the parameters of one grouped step: parallel and serial kernels, odd lengths.
MULTI_SIZES = (N, (1 << 17) + 7, 300, 5000)
TBB_IS_A_DEPENDENCY = sys.platform == "linux" and os.uname().machine == "x86_64"


# -- the work: the same in the scripts and in the reference -------------------------------------


def train(name: str, seed: int, backend: str = "auto", steps: int = 3) -> dict[str, np.ndarray]:
    """``steps`` steps of optimizer ``name`` on random data; every array it owns afterwards."""
    cls, options = OPTIMIZERS[name]
    rng = np.random.default_rng(seed)
    opt = cls(randn(rng, N, np.float32), backend=backend, **options)
    for _ in range(steps):
        opt.step(randn(rng, N, np.float32))
    return all_arrays(opt)


def train_grouped(seed: int, backend: str = "auto", steps: int = 3) -> dict[str, np.ndarray]:
    """``steps`` grouped Adam steps (functional.multi_tensor_step) over MULTI_SIZES."""
    rng = np.random.default_rng(seed)
    params = [randn(rng, n, np.float32) for n in MULTI_SIZES]
    state = {k: [np.zeros_like(p) for p in params] for k in ("exp_avg", "exp_avg_sq")}
    for t in range(1, steps + 1):
        grads = [randn(rng, n, np.float32) for n in MULTI_SIZES]
        functional.multi_tensor_step(
            "adam", params, grads, state, step=t, lr=1e-2, weight_decay=0.1, backend=backend
        )
    out = {f"param{i}": p for i, p in enumerate(params)}
    out.update({f"{k}{i}": a for k, arrays in state.items() for i, a in enumerate(arrays)})
    return out


def concurrently(jobs: list) -> list:
    """Run the callables ``jobs`` in one thread each, started together; their results."""
    barrier = threading.Barrier(len(jobs))
    results: list = [None] * len(jobs)
    errors: list = []

    def run(i):
        barrier.wait()
        try:
            results[i] = jobs[i]()
        except BaseException as exc:  # re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]
    return results


def thread_jobs(backend: str = "auto") -> list:
    """Four optimizers, then four grouped steps, each stepping STEPS times (seeds 10-13, 20-23)."""
    jobs = [lambda n=n, s=s: train(n, 10 + s, backend, STEPS) for s, n in enumerate(OPTIMIZERS)]
    return jobs + [lambda s=s: train_grouped(20 + s, backend, STEPS) for s in range(4)]


def assert_same_results(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for k in expected:
        assert_same_bits(actual[k], expected[k], f"{what}: {k}")


# -- tests in this process ------------------------------------------------------------------------


def test_sizes_run_the_parallel_kernels():
    from fastrms.kernels import cpu

    assert min(N, *MULTI_SIZES[:2]) >= cpu.PARALLEL_THRESHOLD > max(MULTI_SIZES[2:])


def test_four_threads_step_four_optimizers_at_once():
    jobs = thread_jobs()[:4]
    results = concurrently(jobs)
    for name, s, got in zip(OPTIMIZERS, range(4), results):
        assert_same_results(got, train(name, 10 + s, "numpy", STEPS), name)


def test_four_threads_take_grouped_steps_at_once():
    results = concurrently(thread_jobs()[4:])
    for s, got in enumerate(results):
        assert_same_results(got, train_grouped(20 + s, "numpy", STEPS), f"grouped, seed {20 + s}")


def test_info_names_the_layer_and_its_safety():
    detail = fastrms.backends()["cpu"].detail
    assert "threading layer" in detail and "fork-safe" in detail, detail


# -- tests in fresh processes ---------------------------------------------------------------------


def run_script(mode: str, out: Path, *flags: str, env: dict | None = None) -> dict:
    """Run this file as a script; return its JSON summary (the last line of its output)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING")}
    environ.update(same_fastrms_env(), **(env or {}))
    proc = subprocess.run(
        [sys.executable, __file__, mode, str(out), *flags],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=environ,
    )
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_fastrms_env() -> dict[str, str]:
    """``PYTHONPATH`` for a child Python that must import the fastrms this process imported.

    A script's own folder is its ``sys.path[0]``, not the project root (which pytest puts on
    this process's path), so without this the child would import whatever ``fastrms``
    site-packages holds first, even a left-over folder of cache files (issue 20).
    """
    home = str(Path(fastrms.__file__).resolve().parents[1])
    return {"PYTHONPATH": os.pathsep.join(filter(None, [home, os.environ.get("PYTHONPATH")]))}


def test_a_script_child_imports_this_fastrms(tmp_path):
    summary = run_script("info", tmp_path)
    assert summary["fastrms"] == str(Path(fastrms.__file__).resolve()), summary


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return dict(f)


def assert_children_right(summary: dict, out: Path) -> None:
    assert summary["child_exitcode"] == 0, summary
    assert_same_results(load(out / "parent.npz"), train("adam", 0, "numpy"), "parent")
    assert_same_results(load(out / "child.npz"), train("adam", 1, "numpy"), "child")


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_a_child_steps_after_its_parent_did(method, tmp_path):
    if method not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip(f"no {method} start method on this platform")
    summary = run_script(method, tmp_path)
    assert_children_right(summary, tmp_path)
    assert summary["warnings"] == [], summary
    if TBB_IS_A_DEPENDENCY:  # the tbb wheel is installed with fastrms and must load
        assert summary["layer"] == "tbb", summary
        assert summary["child_layer"] == "tbb", summary


def test_without_tbb_a_fork_safe_layer_with_one_warning(tmp_path):
    """TBB made unloadable: workqueue, one warning, and forks and threads still work (the
    child is forked while the launch lock is held, and must not wait for it)."""
    summary = run_script("fork", tmp_path, "--no-tbb", "--threads")
    assert summary["layer"] == "workqueue", summary
    [message] = summary["warnings"]
    assert "ThreadingLayerWarning" in message and "simulated" in message, message
    assert "one at a time" in summary["info"], summary
    assert_children_right(summary, tmp_path)
    assert_threads_right(tmp_path)


def test_user_workqueue_choice_is_kept_and_serialized(tmp_path):
    summary = run_script("threads", tmp_path, env={"NUMBA_THREADING_LAYER": "workqueue"})
    assert summary["layer"] == "workqueue" and summary["warnings"] == [], summary
    assert "chosen by the user" in summary["info"], summary
    assert_threads_right(tmp_path)


@pytest.mark.skipif(sys.platform != "linux", reason="GNU OpenMP is Linux's omp")
def test_user_omp_choice_is_kept_and_reported(tmp_path):
    summary = run_script("info", tmp_path, env={"NUMBA_THREADING_LAYER": "omp"})
    assert summary["layer"] == "omp" and summary["warnings"] == [], summary
    assert "NOT fork-safe" in summary["info"] and "chosen by the user" in summary["info"]


def test_user_choice_that_cannot_load_falls_back_to_numpy(tmp_path):
    """A named layer that cannot load: ``auto`` steps with NumPy (one FallbackWarning), and
    ``backend="cpu"`` raises BackendUnavailableError that says why."""
    summary = run_script("info", tmp_path, "--no-tbb", env={"NUMBA_THREADING_LAYER": "tbb"})
    assert summary["layer"] is None, summary
    [message] = summary["warnings"]
    assert message.startswith("FallbackWarning") and "'tbb' cannot be loaded" in message
    assert "BackendUnavailableError" in summary["forced_cpu"], summary
    assert_same_results(load(tmp_path / "parent.npz"), train("adam", 0, "numpy"), "fallback")


HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_next_to_torch_steps_run_on_its_team_and_children_still_step(method, tmp_path):
    """With torch imported, a plain fastrms step runs its parallel region on torch's OpenMP
    team (fastrms.teams.default_team); a child forked after that still steps (on one thread:
    GNU OpenMP does not survive a fork) and gets the parent's bits, and four Python threads
    stepping at once on the team get the reference's."""
    summary = run_script(method, tmp_path, "--torch", "--threads")
    if summary["torch_team"] is None:
        pytest.skip("this torch does not run on an OpenMP runtime fastrms can use")
    assert summary["plan_team"] == "OpenMPTeam", summary
    assert_children_right(summary, tmp_path)
    assert summary["warnings"] == [], summary
    assert_threads_right(tmp_path)


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_one_array_next_to_torch_runs_on_its_team(monkeypatch, name, dtype):
    """functional's one-array step (dispatch) takes torch's team as the classes do, from
    kernels.cpu.PARALLEL_THRESHOLD on, with the reference's bits (odd length: uneven parts)."""
    import torch

    from fastrms import teams
    from fastrms.kernels import cpu as cpu_kernels

    if teams.default_team() is None:
        pytest.skip("this torch does not run on an OpenMP runtime fastrms can use")
    runs = []
    run = teams.OpenMPTeam.run
    monkeypatch.setattr(teams.OpenMPTeam, "run", lambda self, *a: runs.append(a) or run(self, *a))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rng = np.random.default_rng(5)
        n = cpu_kernels.PARALLEL_THRESHOLD + 11
        start = {k: randn(rng, n, dtype) for k in ("param", "grad")}
        state = {"exp_avg": np.zeros(n, dtype), "exp_avg_sq": np.abs(randn(rng, n, dtype))}
        if name == "rmsprop":
            state = {"square_avg": state["exp_avg_sq"]}
        results = {}
        for backend in ("cpu", "numpy"):
            arrays = {k: a.copy() for k, a in {**start, **state}.items()}
            step = {"step": 2} if name == "adam" else {}
            getattr(functional, name)(*arrays.values(), backend=backend, lr=1e-2, **step)
            results[backend] = arrays
    finally:
        torch.set_num_threads(threads)
    assert len(runs) == 1, runs
    assert_same_results(results["cpu"], results["numpy"], name)


def assert_threads_right(out: Path) -> None:
    for i, name in enumerate(OPTIMIZERS):
        assert_same_results(load(out / f"thread{i}.npz"), train(name, 10 + i, "numpy", STEPS), name)
    for s in range(4):
        got = load(out / f"thread{4 + s}.npz")
        assert_same_results(got, train_grouped(20 + s, "numpy", STEPS), f"grouped {20 + s}")


# -- the script -----------------------------------------------------------------------------------


def _layer() -> str | None:
    import numba

    try:
        return numba.threading_layer()
    except ValueError:
        return None


def _child(out: str) -> None:
    np.savez(Path(out) / "child.npz", **train("adam", 1))
    Path(out, "child_layer").write_text(str(_layer()))


def _no_tbb() -> None:
    """Make TBB unloadable, as on a machine without it (before fastrms first runs)."""
    from numba.np.ufunc import parallel

    from fastrms import threads

    def refuse():
        raise ImportError("simulated: no TBB")

    parallel._check_tbb_version_compatible = refuse
    threads._load_tbb = lambda: "simulated: no TBB here"


def _torch_first() -> dict:
    import torch

    from fastrms import teams

    torch.set_num_threads(2)
    torch.mm(torch.randn(256, 256), torch.randn(256, 256))
    team = teams.default_team()
    opt = fastrms.Adam(np.zeros(N, np.float32))
    opt.step(np.ones(N, np.float32))
    (group,) = opt._plan.groups
    return {
        "torch_team": None if team is None else type(team).__name__,
        "plan_team": None if group.team is None else type(group.team).__name__,
    }


def _script(mode: str, out: Path, flags: list[str]) -> dict:
    import multiprocessing

    if "--no-tbb" in flags:
        _no_tbb()
    summary: dict = {"fastrms": str(Path(fastrms.__file__).resolve())}
    if "--torch" in flags:  # as in a training loop: torch's threads work, then fastrms steps
        summary.update(_torch_first())
    np.savez(out / "parent.npz", **train("adam", 0))  # the parent steps first (in parallel)
    summary["layer"] = _layer()
    summary["info"] = fastrms.backends()["cpu"].detail
    if mode == "info":
        try:
            train("adam", 0, "cpu")
            summary["forced_cpu"] = "ran"
        except Exception as exc:
            summary["forced_cpu"] = f"{type(exc).__name__}: {exc}"
    if mode in ("threads",) or "--threads" in flags:
        for i, result in enumerate(concurrently(thread_jobs())):
            np.savez(out / f"thread{i}.npz", **result)
    if mode in multiprocessing.get_all_start_methods():
        from fastrms import threads

        child = multiprocessing.get_context(mode).Process(target=_child, args=(str(out),))
        with threads._launch_lock:  # as if another thread were stepping under workqueue
            child.start()
        child.join(TIMEOUT / 2)
        if child.exitcode is None:
            child.kill()
        summary["child_exitcode"] = child.exitcode
        layer_file = out / "child_layer"
        summary["child_layer"] = layer_file.read_text() if layer_file.exists() else None
    return summary


if __name__ == "__main__":
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _script(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
    result["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
    print(json.dumps(result))
