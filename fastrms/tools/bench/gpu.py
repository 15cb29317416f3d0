"""The GPU check of issue 21: every CUDA path, run and measured in one command on a lent GPU.

``bench/gpu_check.sh`` runs the phases in order of importance, each in a process of its own
under its own time limit, and this module is their Python side::

    python -m fastrms.tools.bench.gpu PHASE --out DIR [--smoke] [--repo PATH]

- ``versions``: the GPU, driver, CUDA runtime and library versions, and a probe that compiles
  and launches a kernel and checks that :func:`counting_launches` counts its launches;
- ``models``: one step over MLP, ResNet-50 and GPT-2 small shapes, fastrms's grouped launch on
  CUDA against ``torch.optim`` fused and foreach on CUDA tensors, the same-pattern CUDA ceiling
  over one flat array and a device-to-device copy of as many bytes; with the kernel launches
  fastrms made per (dtype, device) group, counted by :func:`counting_launches`;
- ``precision``: the low-precision variants CUDA supports over GPT-2 small against torch's fused
  Adam on float32 and bfloat16 CUDA tensors;
- ``torch-loop``: ``fastrms.torch`` against ``torch.optim`` in a CUDA training loop
  (``bench/torch_loop.py``);
- ``summary``: the phases' status, seconds and key figures as one table, and ``summary.json``.

(The ``tests`` and ``sweep`` phases are pytest and ``fastrms bench`` themselves; the script
runs them.) The launch counter and ``versions`` are in :mod:`~fastrms.tools.bench.gpu_device`,
the workloads in :mod:`~fastrms.tools.bench.gpu_workloads`, the summary in
:mod:`~fastrms.tools.bench.gpu_summary`.

Every phase writes ``DIR/<phase>.json``. ``--smoke`` runs the phase at tiny sizes, meant for
Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) without torch CUDA, to exercise the
plumbing here: its JSON says ``"cuda_timing": "simulator"``, and its figures are no timings.
Every timing on a device is by CUDA events after a warm-up step, the median over repetitions
interleaved variant by variant (:func:`fastrms.tools.bench.measure._interleave`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import gpu_workloads
from . import models as M
from .command import _positive_int
from .gpu_device import versions
from .gpu_summary import TIMING_KEY, format_summary, merge_sweeps, summary
from .gpu_workloads import (
    MODEL_RUNS,
    PRECISION_SMOKE_SHAPES,
    SMOKE_SHAPES,
    _error,
    measure_model_cuda,
    measure_precision_cuda,
    torch_loop,
)
from .variants import (
    allow_simulator,
    simulated,
    torch_cuda_problem,
)

PHASES = ("versions", "models", "precision", "torch-loop", "merge-sweep", "summary")

# -- the command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastrms.tools.bench.gpu",
        description="One phase of the GPU check (bench/gpu_check.sh runs them all).",
    )
    p.add_argument("phase", choices=PHASES)
    p.add_argument("--out", required=True, type=Path, help="folder the phase's JSON goes to")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) and without "
        "torch CUDA: checks the plumbing; no figure is a timing",
    )
    p.add_argument("--repeat", type=_positive_int, default=5, help="timed repetitions")
    p.add_argument("--repo", default=".", help="the source tree (bench/ is read from it)")
    p.add_argument("--status", type=Path, help="summary: the script's phase log")
    p.add_argument("--parts", type=Path, help="merge-sweep: the folder of sweep-*.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke and not simulated():
        print(
            "--smoke runs under Numba's CUDA simulator: set NUMBA_ENABLE_CUDASIM=1",
            file=sys.stderr,
        )
        return 2
    if not args.out.is_dir():
        print(f"--out {args.out}: no such folder", file=sys.stderr)
        return 2
    gpu_workloads._SMOKE[0] = args.smoke
    allow_simulator(args.smoke)
    if args.phase == "merge-sweep":
        if args.parts is None or not args.parts.is_dir():
            print(f"merge-sweep needs --parts, a folder (got {args.parts})", file=sys.stderr)
            return 2
        merged = merge_sweeps(sorted(args.parts.glob("sweep-*.json")))
        (args.out / "sweep.json").write_text(json.dumps(merged, indent=1) + "\n")
        print(f"merge-sweep: {len(merged['settings'])} parts", file=sys.stderr)
        return 0
    if args.phase == "summary":
        result = summary(args.out, args.status)
        (args.out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
        print(format_summary(result))
        return 0
    started = time.perf_counter()
    path = args.out / (args.phase.replace("-", "_") + ".json")

    def save(result: dict, complete: bool = False) -> None:
        """Write the phase's JSON (also part way: a phase stopped at its limit keeps what it
        measured)."""
        document = {
            "phase": args.phase,
            TIMING_KEY: "simulator" if simulated() else "device",
            "smoke": args.smoke,
            "complete": complete,
            "seconds": time.perf_counter() - started,
            "result": result,
        }
        path.write_text(json.dumps(document, indent=1, default=_jsonable) + "\n")

    args.save = save
    save(PHASE_RUNNERS[args.phase](args), complete=True)
    print(f"{args.phase}: wrote {path}", file=sys.stderr)
    return 0


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _run_models(args) -> dict:
    todo = [("mlp-smoke", "adam"), ("mlp-smoke", "rmsprop")] if args.smoke else MODEL_RUNS
    runs: list[dict] = []
    for model, algo in todo:
        shapes = SMOKE_SHAPES if args.smoke else M.MODELS[model]()
        print(f"models: {model} {algo}", file=sys.stderr, flush=True)
        try:
            runs.append(measure_model_cuda(model, shapes, algo, 1 if args.smoke else args.repeat))
        except Exception as error:  # reported, and the next run still goes
            runs.append({"model": model, "algo": algo, "error": _error(error)})
        args.save({"runs": runs})
    return {"runs": runs}


def _run_precision(args) -> dict:
    model, shapes = ("smoke", PRECISION_SMOKE_SHAPES) if args.smoke else ("gpt2", M.gpt2_shapes())
    return measure_precision_cuda(model, shapes, 1 if args.smoke else args.repeat, args.save)


def _run_torch_loop(args) -> dict:
    if args.smoke:  # no torch CUDA here: the plumbing on the host, at a tiny size
        result = torch_loop(("mlp:8-4-2",), "cpu", 1, 1, args.repo, args.save)
        result["cuda"] = torch_cuda_problem() or "available"
        return result
    problem = torch_cuda_problem()
    if problem:
        return {"device": "cuda", "unavailable": problem, "rows": []}
    return torch_loop(("mlp", "gpt2"), "cuda", args.repeat, 10, args.repo, args.save)


PHASE_RUNNERS: dict[str, Callable[[Any], dict]] = {
    "versions": lambda args: versions(),
    "models": _run_models,
    "precision": _run_precision,
    "torch-loop": _run_torch_loop,
}


if __name__ == "__main__":
    sys.exit(main())
