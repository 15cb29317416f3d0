"""``fastrms bench``: time every variant of :mod:`fastrms.tools.bench.variants` here and report.

The measuring is :mod:`~fastrms.tools.bench.measure`'s, the report
:mod:`~fastrms.tools.bench.render`'s, the targets :mod:`~fastrms.tools.bench.targets`', the
plots :mod:`~fastrms.tools.bench.plot`'s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np

from . import cases
from . import models as M
from .measure import SAMPLE_S, measure, measure_model, measure_overhead, warm_up
from .plot import have_matplotlib, plot, plot_models, plot_title
from .render import format_markdown, format_text, machine_info, to_json
from .targets import evaluate_model_targets, evaluate_targets
from .variants import (
    DEFAULT_VARIANTS,
    VARIANTS,
    WrongResult,
    allow_simulator,
    import_torch,
    simulated,
    thread_count,
)

DEFAULT_REPEAT = 7


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to ``subparsers``; it sets ``func`` to :func:`run`."""
    variants = ", ".join(DEFAULT_VARIANTS)
    on_request = ", ".join(v for v in VARIANTS if v not in DEFAULT_VARIANTS)
    p = subparsers.add_parser(
        "bench",
        help="time the fused steps against naive NumPy and torch.optim on this machine",
        description=(
            "Time fastrms's fused optimizer steps against the NumPy reference, naive NumPy, "
            "torch.optim and a same-pattern memory ceiling, on this machine, and report "
            "the stated targets as met or missed. The default sweep takes under a minute "
            "on two cores."
        ),
    )
    p.add_argument(
        "--algo",
        type=_algos,
        default=cases.DEFAULT_ALGOS,
        help=f"comma-separated algorithms, 'all' or 'none' (default: "
        f"{','.join(cases.DEFAULT_ALGOS)}; all: {', '.join(cases.ALGOS)})",
    )
    p.add_argument(
        "--sizes",
        type=_sizes,
        default=cases.SIZES,
        help="comma-separated vector lengths, e.g. 1e4,1e6,5e7 (default: 1e4,1e5,1e6,1e7)",
    )
    p.add_argument(
        "--backends",
        type=_variants,
        default=DEFAULT_VARIANTS,
        help=f"comma-separated variants to time (default: all available: {variants}; "
        f"on request: {on_request}); the ceiling is always measured, and with a CUDA variant "
        "the same-pattern CUDA ceiling and a device-to-device copy too",
    )
    p.add_argument(
        "--allow-simulator",
        action="store_true",
        help="let the CUDA variants run under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), "
        "to exercise the plumbing: its figures are not timings, and the JSON says so",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="threads for fastrms cpu and torch (default: all Numba threads)",
    )
    p.add_argument(
        "--repeat",
        type=_positive_int,
        default=DEFAULT_REPEAT,
        help=f"timed repetitions per variant (default: {DEFAULT_REPEAT})",
    )
    p.add_argument("--json", metavar="PATH", help="write the results and machine info as JSON")
    p.add_argument(
        "--plot", metavar="PATH", help="write a PNG of GB/s against n (needs fastrms[plot])"
    )
    p.add_argument(
        "--plot-models",
        metavar="PATH",
        help="write a PNG of each model workload's variants against the flat ceiling",
    )
    p.add_argument("--markdown", action="store_true", help="print the tables as GitHub Markdown")
    p.add_argument(
        "--model",
        type=_models,
        default=M.SMALL_MODELS,
        help="comma-separated model-shaped workloads (one step over all of a model's tensors), "
        f"'all' or 'none' (default: {','.join(M.SMALL_MODELS)}; all: {', '.join(M.MODELS)}; "
        "resnet50 needs about 1 GB of memory, gpt2 about 6 GB)",
    )
    p.add_argument(
        "--model-algo",
        type=_model_algos,
        default=M.MODEL_ALGOS,
        help=f"algorithms stepped over the models (default: {','.join(M.MODEL_ALGOS)})",
    )
    p.add_argument(
        "--precision",
        nargs="?",
        const="gpt2",
        type=_precision_shapes,
        metavar="MODEL",
        help="instead of the sweep, time Adam at each precision (float32, bf16 and int8 state, "
        "bf16 parameters) over a model's tensors (default gpt2: GPT-2 small, about 8 GB; or a "
        "number of elements, e.g. 1e7, for one array), with each variant's memory and compute "
        "bounds, "
        "against torch fused Adam and, where installed, torchao, optimi and bitsandbytes",
    )
    p.set_defaults(func=run)
    return p


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _names(text: str, table: dict, what: str) -> tuple[str, ...]:
    """Comma-separated names from ``table`` ("all" for every one)."""
    if text == "all":
        return tuple(table)
    names = _split(text)
    unknown = [a for a in names if a not in table]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or text!r}; choose from {', '.join(table)}"
        )
    return tuple(names)


def _algos(text: str) -> tuple[str, ...]:
    return () if text == "none" else _names(text, cases.ALGOS, "algorithm")


def _models(text: str) -> tuple[str, ...]:
    return () if text == "none" else _names(text, M.MODELS, "model")


def _model(text: str) -> str:
    return _names(text, M.MODELS, "model")[0] if "," not in text else _models(text)[0]


def _precision_shapes(text: str) -> str:
    """A model's name, or a number of elements (one array), for ``--precision``."""
    try:
        n = float(text)
    except ValueError:
        return _model(text)
    if not n.is_integer() or n < 1:
        raise argparse.ArgumentTypeError(f"a number of elements must be an integer >= 1: {text}")
    return str(int(n))


def _model_algos(text: str) -> tuple[str, ...]:
    return _names(text, cases.ALGOS, "algorithm")


def _sizes(text: str) -> tuple[int, ...]:
    sizes = []
    for t in _split(text):
        try:
            x = float(t)
        except ValueError:
            x = math.nan
        if not (x >= 1 and x == int(x)):
            raise argparse.ArgumentTypeError(f"sizes must be positive integers, got {t!r}")
        sizes.append(int(x))
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes given")
    return tuple(sorted(set(sizes)))


def _variants(text: str) -> tuple[str, ...]:
    return _names(text, VARIANTS, "backend")


def _positive_int(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return k


def run(args: argparse.Namespace) -> int:
    """Run the benchmark that ``args`` describes and print the report; return the exit code."""
    started = time.time()
    if args.allow_simulator and not simulated():
        print(
            "fastrms bench --allow-simulator: the CUDA simulator is not enabled here "
            "(set NUMBA_ENABLE_CUDASIM=1 before starting Python)",
            file=sys.stderr,
        )
        return 1
    allow_simulator(args.allow_simulator)
    if (args.plot or args.plot_models) and not have_matplotlib():
        print("fastrms bench --plot needs matplotlib: pip install 'fastrms[plot]'", file=sys.stderr)
        return 1
    import numba

    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    if threads > numba.config.NUMBA_NUM_THREADS:
        print(
            f"--threads {threads}: Numba was started with {numba.config.NUMBA_NUM_THREADS} "
            "threads (set NUMBA_NUM_THREADS to allow more)",
            file=sys.stderr,
        )
        return 1
    _warn_if_busy()
    import_torch()  # import torch now (if installed), so that its thread count is set too
    if args.precision:
        return run_precision(args, threads)
    backends = args.backends
    if threads == 1:  # "cpu" is then the one-thread variant already
        backends = tuple(b for b in backends if b != "cpu-1t")
    # Timing loops repeat a step on the same arrays; the naive baselines can then reach 0/0 or
    # sqrt(<0) (as the state saturates) and NumPy would warn for each. Results are checked
    # once, from a fresh state, before any timing.
    with thread_count(threads), np.errstate(all="ignore"):
        try:
            warm = warm_up(args.algo, backends, threads)
            sweep = measure(args.algo, args.sizes, backends, threads, args.repeat)
            if "cpu" in backends and args.model:
                sweep.overhead = measure_overhead(args.model, args.repeat)
            for model in args.model:
                for algo in args.model_algo:
                    sweep.models.append(measure_model(model, algo, backends, threads, args.repeat))
        except WrongResult as exc:
            print(f"fastrms bench: wrong result, stopping: {exc}", file=sys.stderr)
            return 1
    targets = evaluate_targets(sweep.cells) + evaluate_model_targets(sweep.models)
    info = machine_info(threads)
    settings = {
        "algos": list(args.algo),
        "sizes": list(args.sizes),
        "backends": list(backends),
        "models": list(args.model),
        "model_algos": list(args.model_algo),
        "threads": threads,
        "repeat": args.repeat,
        "dtype": str(cases.DTYPE),
        "step": cases.STEP,
        "sample_s": SAMPLE_S,
        "warm_up_s": round(warm, 3),
        "elapsed_s": round(time.time() - started, 3),
        # The CUDA figures' clock: the simulator's are no timings (see --allow-simulator).
        "cuda_timing": "simulator" if simulated() else "device",
    }
    text = (format_markdown if args.markdown else format_text)(sweep, targets, info, settings)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(sweep, targets, info, settings), f, indent=1)
            f.write("\n")
    if args.plot:
        plot(sweep.cells, args.plot, title=plot_title(info))
    if args.plot_models and sweep.models:
        plot_models(sweep.models, args.plot_models, title=plot_title(info))
    return 0


def run_precision(args: argparse.Namespace, threads: int) -> int:
    """``fastrms bench --precision MODEL``: the precision variants, side by side."""
    from .precision import PRECISION_VARIANTS, format_precision, measure_precision

    print(f"fastrms bench --precision {args.precision}: {threads} threads", file=sys.stderr)
    with thread_count(threads), np.errstate(all="ignore"):
        result = measure_precision(args.precision, tuple(PRECISION_VARIANTS), args.repeat)
    info = machine_info(threads)
    print(format_precision(result, args.markdown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "threads": threads, "precision": result}, f, indent=1)
            f.write("\n")
    return 0


def _warn_if_busy() -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > max(0.5, 0.25 * (os.cpu_count() or 1)):
        print(
            f"fastrms bench: the machine is busy (load average {load:.1f}); other processes "
            "will make the timings noisy, multithreaded ones most",
            file=sys.stderr,
        )
