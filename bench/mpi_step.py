"""Step time and state memory of ShardedOptimizer(Adam) over GPT-2's shapes, under MPI.

    mpirun -n 2 python bench/mpi_step.py --json out.json

Each repetition runs one sharded step on every rank with each gradient reduction
(``reduce="reduce_scatter"`` and ``"reduce"``, over the same parameters; split by the
optimizer into reduce-scatter, local step and all-gather; each rank's Numba threads = cores /
ranks), then one single-process ``fastrms.Adam`` step over the full model on rank 0 with all
the cores, while the other ranks sleep. Medians over the repetitions. As root, Open MPI needs
OMPI_ALLOW_RUN_AS_ROOT=1 and OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numba
import numpy as np
from mpi4py import MPI

import fastrms
from fastrms.distributed import REDUCTIONS, ShardedOptimizer
from fastrms.tools.bench import models as M

PHASES = ("check", "reduce_scatter", "local_step", "all_gather")


def arrays(shapes: dict, flat: bool, seed: int) -> dict[str, np.ndarray]:
    """Random float32 arrays of ``shapes``: separate, or views of one flat buffer."""
    rng = np.random.default_rng(seed)
    sizes = [int(np.prod(s)) for s in shapes.values()]
    if flat:
        arena = rng.standard_normal(sum(sizes), dtype=np.float32)
        cuts = np.cumsum([0, *sizes])
        return {k: arena[a:b].reshape(s) for (k, s), a, b in zip(shapes.items(), cuts, cuts[1:])}
    return {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}


def idle_until_all_arrive(comm) -> None:
    """A barrier that sleeps instead of spinning (so it leaves the cores to rank 0)."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.0005)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", choices=sorted(M.MODELS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layout", default="separate", choices=("separate", "flat"))
    parser.add_argument("--json", help="write the results here (rank 0)")
    args = parser.parse_args()

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    # mpirun binds each rank to one core; unbind, so that the single-process step can use all.
    cores = os.cpu_count() or 1
    os.sched_setaffinity(0, range(cores))
    shapes = M.MODELS[args.model]()
    flat = args.layout == "flat"
    params = arrays(shapes, flat, seed=0)  # the same on every rank
    grads = arrays(shapes, flat, seed=1 + rank)
    sharded = {r: ShardedOptimizer(fastrms.Adam, params, lr=1e-4, reduce=r) for r in REDUCTIONS}
    single = None
    if rank == 0:
        single = fastrms.Adam(arrays(shapes, False, seed=0), lr=1e-4)
        single_grads = arrays(shapes, False, seed=1)

    names = [*(f"{r}.{p}" for r in REDUCTIONS for p in (*PHASES, "step")), "single_step"]
    times: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(args.steps + 2):  # the first two compile and fault the pages in
        numba.set_num_threads(max(1, cores // size))
        for r, opt in sharded.items():
            comm.Barrier()
            t = time.perf_counter()
            opt.step(grads)
            wall = time.perf_counter() - t
            if rep >= 2:
                for p in PHASES:
                    times[f"{r}.{p}"].append(opt.last_step_times[p])
                times[f"{r}.step"].append(wall)
        comm.Barrier()
        if rank == 0:
            numba.set_num_threads(min(cores, numba.config.NUMBA_NUM_THREADS))
            t = time.perf_counter()
            single.step(single_grads)
            if rep >= 2:
                times["single_step"].append(time.perf_counter() - t)
        idle_until_all_arrive(comm)

    if os.environ.get("MPI_STEP_RAW"):
        print(rank, json.dumps(times))
    medians = {k: statistics.median(v) if v else None for k, v in times.items()}
    all_medians = comm.gather(medians, root=0)
    state_bytes = comm.gather(sharded["reduce_scatter"].state_nbytes(), root=0)
    if rank != 0:
        return
    n = sum(int(np.prod(s)) for s in shapes.values())
    single_bytes = sum(
        a.nbytes for arrays_ in single.state.values() for a in arrays_ if a is not None
    )
    # Per rank and step, reduce-scatter and all-gather each send (N-1)/N of the model: together
    # 2 (N-1)/N of it, the volume of one ring all-reduce of the gradients.
    model_bytes = 4 * n
    result = {
        "model": args.model,
        "layout": args.layout,
        "elements": n,
        "tensors": len(shapes),
        "ranks": size,
        "cores": cores,
        "threads_per_rank": max(1, cores // size),
        "steps": args.steps,
        "median_s_per_rank": all_medians,
        "median_s_slowest_rank": {k: max(m[k] for m in all_medians) for k in names[:-1]},
        "single_process_step_s": medians["single_step"],
        "state_bytes_per_rank": state_bytes,
        "single_process_state_bytes": single_bytes,
        "state_ratio_max_rank": max(state_bytes) / single_bytes,
        "sent_bytes_per_rank_per_step": 2 * (size - 1) / size * model_bytes,
        "ring_allreduce_bytes_per_rank": 2 * (size - 1) / size * model_bytes,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
