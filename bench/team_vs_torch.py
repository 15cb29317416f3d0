"""A fastrms Adam step right after torch's own multithreaded work, for each way of running
its parallel region, against ``torch.optim.Adam(fused=True)`` (issue 20).

A training loop is "torch works, then the optimizer steps". Which threads fastrms's parallel
step runs on then matters: Numba's thread pool (whose threads slept while torch's worked) or
torch's own OpenMP team (awake). Numba's threading layer is fixed once per process, and one
pool's spinning threads slow another's, so the script runs itself once per configuration
(:data:`CONFIGS`, each a process as a user's would be):

- ``tbb``: Numba's TBB layer runs fastrms's parallel regions (``FASTRMS_TORCH_TEAM=0``);
- ``omp``: Numba's omp layer (GNU OpenMP; not fork-safe) runs them (``FASTRMS_TORCH_TEAM=0``);
- ``team``: torch's OpenMP team runs them (:func:`fastrms.teams.default_team`, the default
  once torch is imported; Numba's layer is TBB, unused by these steps).

In each process it interleaves, step by step and in an order that rotates each repetition,
these variants, each step preceded by the same torch work (a 512x512 matmul and an
elementwise op over 2^20 floats, on torch's threads):

- ``torch-fused``: ``torch.optim.Adam(fused=True)``;
- ``fastrms``: ``fastrms.Adam(param).step(grad)`` as shipped (one thread below
  :data:`fastrms.teams.TEAM_THRESHOLD`, 2^16, on torch's team; below
  ``kernels.cpu.PARALLEL_THRESHOLD``, 2^17, on Numba's layer);
- ``fastrms-parallel``: the same step always on two threads (a plan with threshold 1);
- ``functional``: ``fastrms.functional.adam`` on the one array, as shipped.

Only the step is timed. Usage::

    python bench/team_vs_torch.py --json bench/results/team-vs-torch-cpu-2core.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

#: Configuration: (Numba threading layer, FASTRMS_TORCH_TEAM).
CONFIGS = {"tbb": ("tbb", "0"), "omp": ("omp", "0"), "team": ("tbb", "1")}
VARIANTS = ("torch-fused", "fastrms", "fastrms-parallel", "functional")
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def measure(sizes: list[int], repeat: int, steps: int, threads: int) -> dict:
    """In this process: {n: {"median" / "fastest": {variant: [the median / fastest step's
    seconds in each repetition]}}}."""
    import numpy as np
    import torch

    import fastrms
    from fastrms import teams
    from fastrms.grouped import StepPlan
    from fastrms.specs import SPECS

    torch.set_num_threads(threads)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    x = torch.randn(1 << 20)

    def torch_work() -> None:
        torch.mm(a, b)
        x.mul_(1.0000001).add_(1e-7)

    team = teams.default_team()
    on_team = os.environ.get("FASTRMS_TORCH_TEAM") == "1"
    assert (team is not None) == on_team, "torch here does not run on OpenMP"
    spec = SPECS["adam"]
    out: dict = {}
    for n in sizes:
        rng = np.random.default_rng(0)
        p0, g = rng.standard_normal(n, np.float32), rng.standard_normal(n, np.float32)

        def plan_step(threshold, p0=p0, g=g):
            p = p0.copy()
            state = {"exp_avg": [np.zeros_like(p)], "exp_avg_sq": [np.zeros_like(p)]}
            count = [0]
            setup0 = spec.setup(1, **HYPER)
            plan = StepPlan(setup0, [p], state, ["params[0]"], "cpu",
                            parallel_threshold=threshold)  # fmt: skip

            def plan_run() -> None:
                count[0] += 1
                plan.run([g], spec.setup(count[0], **HYPER))

            return plan_run

        def class_step(p0=p0, g=g):
            opt = fastrms.Adam(p0.copy(), **HYPER)
            return functools.partial(opt.step, g)

        def functional_step(p0=p0, g=g):
            from fastrms import functional

            p = p0.copy()
            m, v = np.zeros_like(p), np.zeros_like(p)
            count = [0]

            def run() -> None:
                count[0] += 1
                functional.adam(p, g, m, v, step=count[0], **HYPER)

            return run

        tp = torch.from_numpy(p0.copy())
        tp.grad = torch.from_numpy(g.copy())
        topt = torch.optim.Adam([tp], fused=True, **HYPER)
        runs = {
            "torch-fused": topt.step,
            "fastrms": class_step(),
            "fastrms-parallel": plan_step(1),
            "functional": functional_step(),
        }
        for step in runs.values():  # compile, allocate state, wake everything once
            for _ in range(3):
                torch_work()
                step()
        times: dict = {v: [] for v in VARIANTS}
        fastest: dict = {v: [] for v in VARIANTS}
        for r in range(repeat):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            samples: dict = {v: [] for v in VARIANTS}
            for _ in range(steps):  # interleaved step by step: each sees the same machine
                for v in order:
                    torch_work()
                    t0 = time.perf_counter()
                    runs[v]()
                    samples[v].append(time.perf_counter() - t0)
            for v in VARIANTS:
                times[v].append(statistics.median(samples[v]))
                fastest[v].append(min(samples[v]))
        out[str(n)] = {"median": times, "fastest": fastest}
    return out


def summary(measured: dict) -> dict:
    """Medians (ms), torch-fused's median over the variant's, and the range of that ratio
    over repetitions (each repetition's median step against torch's in the same repetition);
    and the same from the fastest step of each: on a shared machine, a step whose thread was
    descheduled is slow for reasons that are not its own, and the fastest step shows what
    the variant does when it gets the cores."""
    times, fastest = measured["median"], measured["fastest"]
    torch_t = times["torch-fused"]
    rows = {}
    for v, ts in times.items():
        ratios = [t / s for t, s in zip(torch_t, ts)]
        rows[v] = {
            "fastest_ms": min(fastest[v]) * 1e3,
            "vs_torch_fused_fastest": min(fastest["torch-fused"]) / min(fastest[v]),
            "median_ms": statistics.median(ts) * 1e3,
            "vs_torch_fused": statistics.median(torch_t) / statistics.median(ts),
            "min_ms": min(ts) * 1e3,
            "max_ms": max(ts) * 1e3,
            "vs_torch_fused_median": statistics.median(ratios),
            "vs_torch_fused_range": [min(ratios), max(ratios)],
        }
    return rows


def _machine() -> dict:
    import platform

    import numba
    import torch

    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
        platform.processor() or platform.machine(),
    ) if os.path.exists("/proc/cpuinfo") else platform.machine()  # fmt: skip
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "numba": numba.__version__,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e7, 1e5])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per repetition")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--runs", type=int, default=1, help="processes per config, in turn")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes]
    if args.child:
        print(json.dumps(measure(sizes, args.repeat, args.steps, args.threads)))
        return
    result: dict = {"sizes": sizes, "repeat": args.repeat, "steps": args.steps,
                    "threads": args.threads, "machine": _machine(),
                    "configs": {c: [] for c in args.configs}}  # fmt: skip
    for config in [c for _ in range(args.runs) for c in args.configs]:
        layer, team = CONFIGS[config]
        env = dict(os.environ, NUMBA_THREADING_LAYER=layer, FASTRMS_TORCH_TEAM=team,
                   NUMBA_NUM_THREADS=str(args.threads))  # fmt: skip
        command = [sys.executable, __file__, "--child", "--sizes", *map(str, sizes),
                   "--repeat", str(args.repeat), "--steps", str(args.steps),
                   "--threads", str(args.threads)]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        times = json.loads(done.stdout.strip().splitlines()[-1])
        run = {n: {**t, "summary": summary(t)} for n, t in times.items()}
        result["configs"][config].append(run)
        for n, t in run.items():
            for v, row in t["summary"].items():
                lo, hi = row["vs_torch_fused_range"]
                ratio = row["vs_torch_fused"]
                best = row["vs_torch_fused_fastest"]
                print(f"{config:4} n={int(n):>9,} {v:15} {row['median_ms']:8.3f} ms  "
                      f"torch/this {ratio:.2f}x ({lo:.2f}-{hi:.2f}); fastest "
                      f"{row['fastest_ms']:.3f} ms, {best:.2f}x")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
