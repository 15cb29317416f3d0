"""fastrms.distributed with bfloat16 optimizer state (``state_dtype="bfloat16"``; issue 18).

The MPI checks live in tests/mpi_worker_state_dtype.py (see its docstring): under ``mpirun -n
2`` and ``-n 3`` (3 ranks on 2 cores: uneven shards, oversubscribed), each rank with one Numba
thread, the sharded optimizer with bfloat16 shards matches the single-process class with
bfloat16 state bit for bit, and its state dicts convert between state dtypes and rank counts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_distributed import _run_worker

WORKER = Path(__file__).with_name("mpi_worker_state_dtype.py")


@pytest.mark.parametrize("nranks", [2, 3])
def test_sharded_bf16_state_under_mpirun(nranks, monkeypatch):
    import test_distributed

    monkeypatch.setattr(test_distributed, "WORKER", WORKER)
    _run_worker(nranks)
