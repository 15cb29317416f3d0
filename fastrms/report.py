"""``fastrms bench``: time every variant of :mod:`fastrms.benchmarks` here and report.

For each algorithm and size, every variant first takes one step from the same state and is
checked against the NumPy reference (a wrong result stops the run, exit status 1). Then all
variants and the same-pattern ceiling are timed in one process, interleaved repetition by
repetition (each repetition in a rotated order), on the same arrays: between processes,
timings here vary far more than the ratios within one run.

Each repetition times enough consecutive steps to last about :data:`SAMPLE_S` and records the
time per step. A cell reports the median over repetitions, its spread (interquartile range
over median), GB/s (bytes per element x n / median), % of the ceiling, and the speedups over
naive NumPy and over the fastest ``torch.optim`` variant measured. A ceiling is a bound, so
its cell reports its best repetition instead of its median (GB/s too); a variant that still
ran faster than its ceiling is reported in words, not as a percentage over 100.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import benchmarks as B
from . import models as M

#: Target duration of one timing sample; small steps are repeated within a sample to reach it.
SAMPLE_S = 2e-3
MAX_INNER = 10_000
DEFAULT_REPEAT = 7
CEILING = "ceiling"
SCHEMA = "fastrms-bench/1"


@dataclass
class Cell:
    """The timings of one variant for one algorithm and size (or the model workload)."""

    algo: str
    n: int
    variant: str
    label: str
    bytes_per_element: int
    inner: int  # steps per sample
    times_s: list[float]  # seconds per step, one per repetition
    median_s: float = 0.0
    best_s: float = 0.0  # the fastest repetition: a ceiling's figure (it bounds at its best)
    spread: float = 0.0  # interquartile range / median
    gbps: float = 0.0
    pct_ceiling: float | None = None  # ceiling's best time / this median; > 1: beat the bound
    speedup_naive: float | None = None
    speedup_torch: float | None = None
    torch_variant: str | None = None  # the torch variant speedup_torch compares with
    check: str = "not checked"


@dataclass
class Sweep:
    cells: list[Cell] = field(default_factory=list)
    skipped: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # variant: reason: algos
    models: list[dict] = field(default_factory=list)  # one per (model, algorithm)
    overhead: dict | None = None  # the Python-side cost of a cached step


# -- command line -------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to ``subparsers``; it sets ``func`` to :func:`run`."""
    variants = ", ".join(B.VARIANTS)
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
        default=B.DEFAULT_ALGOS,
        help=f"comma-separated algorithms, 'all' or 'none' (default: "
        f"{','.join(B.DEFAULT_ALGOS)}; all: {', '.join(B.ALGOS)})",
    )
    p.add_argument(
        "--sizes",
        type=_sizes,
        default=B.SIZES,
        help="comma-separated vector lengths, e.g. 1e4,1e6,5e7 (default: 1e4,1e5,1e6,1e7)",
    )
    p.add_argument(
        "--backends",
        type=_variants,
        default=tuple(B.VARIANTS),
        help=f"comma-separated variants to time (default: all available: {variants}); "
        "the ceiling is always measured",
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
    return () if text == "none" else _names(text, B.ALGOS, "algorithm")


def _models(text: str) -> tuple[str, ...]:
    return () if text == "none" else _names(text, M.MODELS, "model")


def _model_algos(text: str) -> tuple[str, ...]:
    return _names(text, B.ALGOS, "algorithm")


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
    return _names(text, B.VARIANTS, "backend")


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
    if (args.plot or args.plot_models) and not _have_matplotlib():
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
    B.import_torch()  # import torch now (if installed), so that its thread count is set too
    backends = args.backends
    if threads == 1:  # "cpu" is then the one-thread variant already
        backends = tuple(b for b in backends if b != "cpu-1t")
    # Timing loops repeat a step on the same arrays; the naive baselines can then reach 0/0 or
    # sqrt(<0) (as the state saturates) and NumPy would warn for each. Results are checked
    # once, from a fresh state, before any timing.
    with B.thread_count(threads), np.errstate(all="ignore"):
        try:
            warm = warm_up(args.algo, backends, threads)
            sweep = measure(args.algo, args.sizes, backends, threads, args.repeat)
            if "cpu" in backends and args.model:
                sweep.overhead = measure_overhead(args.model, args.repeat)
            for model in args.model:
                for algo in args.model_algo:
                    sweep.models.append(measure_model(model, algo, backends, threads, args.repeat))
        except B.WrongResult as exc:
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
        "dtype": str(B.DTYPE),
        "step": B.STEP,
        "sample_s": SAMPLE_S,
        "warm_up_s": round(warm, 3),
        "elapsed_s": round(time.time() - started, 3),
    }
    text = (format_markdown if args.markdown else format_text)(sweep, targets, info, settings)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(sweep, targets, info, settings), f, indent=1)
            f.write("\n")
    if args.plot:
        plot(sweep.cells, args.plot, title=_plot_title(info))
    if args.plot_models and sweep.models:
        plot_models(sweep.models, args.plot_models, title=_plot_title(info))
    return 0


def _warn_if_busy() -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > max(0.5, 0.25 * (os.cpu_count() or 1)):
        print(
            f"fastrms bench: the machine is busy (load average {load:.1f}); other processes "
            "will make the timings noisy, multithreaded ones most",
            file=sys.stderr,
        )


# -- measuring ----------------------------------------------------------------------------------


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="case", file=sys.stderr, leave=False, disable=None)


def warm_up(algos: tuple[str, ...], variants: tuple[str, ...], threads: int) -> float:
    """Compile and load every kernel the sweep uses (serial and parallel); return seconds."""
    from .kernels.cpu import PARALLEL_THRESHOLD

    t0 = time.perf_counter()
    for name in algos:
        algo = B.ALGOS[name]
        for n in (64, PARALLEL_THRESHOLD):
            start = B.make_arrays(algo, n)
            expected = B.reference_result(algo, start)
            for v in _available(algo, variants, {}):
                B.build_checked(v, algo, B.copy_arrays(start), expected, threads)
                B.ceiling_for(v, algo, start).step()
    return time.perf_counter() - t0


def _available(algo: B.Algo, names: tuple[str, ...], skipped: dict) -> list[B.Variant]:
    out = []
    for name in names:
        v = B.VARIANTS[name]
        why = v.unavailable(algo)
        if why:
            algos = skipped.setdefault(name, {}).setdefault(why, [])
            if algo.name not in algos:
                algos.append(algo.name)
        else:
            out.append(v)
    return out


def measure(
    algos: tuple[str, ...],
    sizes: tuple[int, ...],
    variants: tuple[str, ...],
    threads: int,
    repeat: int,
) -> Sweep:
    """Check and time every available variant for each algorithm and size."""
    sweep = Sweep()
    groups = [(a, n) for a in algos for n in sizes]
    with _progress(len(groups), "fastrms bench") as bar:
        for name, n in groups:
            bar.set_postfix_str(f"{name} n={n:.0e}")
            algo = B.ALGOS[name]
            chosen = _available(algo, variants, sweep.skipped)
            sweep.cells += measure_group(algo, n, chosen, threads, repeat)
            bar.update()
    return sweep


def measure_group(
    algo: B.Algo, n: int, variants: list[B.Variant], threads: int, repeat: int
) -> list[Cell]:
    """One algorithm and size: check each variant, then time them all, interleaved."""
    start = B.make_arrays(algo, n)
    expected = B.reference_result(algo, start)
    for v in variants:  # each on its own copy, from the same state
        B.build_checked(v, algo, B.copy_arrays(start), expected, threads)
    del expected
    bpe = algo.bytes_per_element()
    # The timing runs share ``start``: every variant does the same work on the same memory.
    runners = {
        v.name: (v.title(threads), v.build(algo, start, threads), "passed") for v in variants
    }
    runners[CEILING] = ("same-pattern ceiling", B.ceiling(algo, start), "n/a")
    if any(v.device == "cuda" for v in variants):
        runners["cuda-ceiling"] = ("same-pattern CUDA ceiling", B.cuda_ceiling(algo, start), "n/a")
    times = _interleave({k: r for k, (_, r, _) in runners.items()}, repeat)
    cells = [
        Cell(algo.name, n, k, label, bpe, inner, ts, check=status)
        for k, (label, _, status) in runners.items()
        for inner, ts in [times[k]]
    ]
    return summarize(cells, {v.name: v.device for v in variants})


def _interleave(runners: dict[str, B.Runner], repeat: int) -> dict[str, tuple[int, list[float]]]:
    """Time each runner ``repeat`` times, one sample of each in turn; seconds per step."""
    inner = {}
    for k, r in runners.items():
        with r.context():
            r.step()  # warm: first touch, caches, lazily created state
            t = max(r.time(1), 1e-7)
        inner[k] = max(1, min(MAX_INNER, round(SAMPLE_S / t)))
    times: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for rep in range(repeat):
        shift = rep % len(names)
        for k in names[shift:] + names[:shift]:
            r = runners[k]
            with r.context():
                times[k].append(r.time(inner[k]) / inner[k])
    return {k: (inner[k], times[k]) for k in runners}


def summarize(
    cells: list[Cell], devices: dict[str, str] | None = None, ceiling: str = CEILING
) -> list[Cell]:
    """Fill in the derived figures of one group's cells (same algorithm and size); "% ceiling"
    is against the cell named ``ceiling`` (or the CUDA one, for device variants).

    A ceiling is a bound, so its figure is its best repetition (``best_s``; its GB/s too): a
    repetition slowed by the machine says nothing about what the loop can reach. A variant's
    figure is its median."""
    devices = devices or {}
    by_name = {c.variant: c for c in cells}
    for c in cells:
        c.median_s = float(np.median(c.times_s))
        c.best_s = float(min(c.times_s))
        q1, q3 = np.percentile(c.times_s, [25, 75])
        c.spread = float((q3 - q1) / c.median_s)
        c.gbps = c.bytes_per_element * c.n / (c.best_s if is_ceiling(c) else c.median_s) / 1e9
    torch = [by_name[t] for t in B.TORCH_VARIANTS if t in by_name]
    fastest_torch = min(torch, key=lambda c: c.median_s) if torch else None
    for c in cells:
        ceiling_name = "cuda-ceiling" if devices.get(c.variant) == "cuda" else ceiling
        ceil = by_name.get(ceiling_name)
        if ceil is not None and not is_ceiling(c):
            c.pct_ceiling = ceil.best_s / c.median_s
        if "naive" in by_name and not is_ceiling(c):
            c.speedup_naive = by_name["naive"].median_s / c.median_s
        if fastest_torch is not None and not is_ceiling(c):
            c.speedup_torch = fastest_torch.median_s / c.median_s
            c.torch_variant = fastest_torch.variant
    return cells


def is_ceiling(cell: Cell) -> bool:
    return CEILING in cell.variant


def pct_text(fraction: float, ceiling: str = "its ceiling") -> str:
    """A fraction of a ceiling as a percentage, or, above 1, words that say the variant ran
    faster than its bound: the ceiling did not bound that run (a percentage over 100 would
    read as a measurement)."""
    if fraction > 1:
        return f"faster than {ceiling} ({fraction:.2f}x its best): not bounded in this run"
    return f"{fraction * 100:.0f}% of {ceiling}"


def measure_model(
    model: str, algo_name: str, variants: tuple[str, ...], threads: int, repeat: int
) -> dict:
    """Time one step of ``algo_name`` over a model's tensors, for each model variant that
    ``variants`` names (``cpu`` also brings ``cpu-per-array``), and the two ceilings."""
    algo = B.ALGOS[algo_name]
    shapes = M.MODELS[model]()
    size = M.model_size(shapes)
    wanted = set(variants) | ({"cpu-per-array"} if "cpu" in variants else set())
    with _progress(1, f"fastrms bench {model} {algo_name}") as bar:
        tensors = M.model_arrays(shapes)
        expected = M.model_reference(algo, tensors)
        chosen, skipped = [], {}
        for name, v in M.MODEL_VARIANTS.items():
            if name not in wanted:
                continue
            why = v.why_not(algo)
            if why:
                skipped[name] = why
                continue
            runner = v.build(algo, M.fresh_copies(tensors), threads)
            runner.step()
            problem = M.model_check(v, runner.result(), expected)
            if problem:
                raise B.WrongResult(f"{v.label}, {model}, {algo.title}: {problem}")
            del runner
            chosen.append(v)
        del expected
        runners = {v.name: (v.label, v.build(algo, tensors, threads), "passed") for v in chosen}
        for name, label in M.CEILINGS.items():
            runners[name] = (label, M.model_ceiling(algo, tensors, flat=name == "ceiling-flat"),
                             "n/a")  # fmt: skip
        times = _interleave({k: r for k, (_, r, _) in runners.items()}, repeat)
        bar.update()
    cells = [
        Cell(model, size, k, label, algo.bytes_per_element(), *times[k], check=status)
        for k, (label, _, status) in runners.items()
    ]
    summarize(cells, ceiling="ceiling-flat")
    by = {c.variant: c for c in cells}
    ours = by.get("cpu")

    def versus(other: str) -> float | None:
        if not ours or other not in by:
            return None
        theirs = by[other]
        return (theirs.best_s if is_ceiling(theirs) else theirs.median_s) / ours.median_s

    return {
        "model": model,
        "algo": algo_name,
        "tensors": len(shapes),
        "parameters": size,
        "optimizer": f"{algo.title}("
        + ", ".join(f"{k}={v}" for k, v in algo.options.items())
        + ")",
        "cells": cells,
        "skipped": skipped,
        "vs_torch_fused": versus("torch-fused"),
        "vs_torch_foreach": versus("torch-foreach"),
        "vs_per_array": versus("cpu-per-array"),
        "pct_flat_ceiling": versus("ceiling-flat"),
        "pct_tensor_ceiling": versus("ceiling"),
    }


def measure_overhead(models: tuple[str, ...], repeat: int) -> dict:
    """The Python-side cost of a cached fastrms.Adam step: the step's time less its bare
    kernel calls, over the models and over 1 ... 1000 tiny tensors; fitted as a + b * tensors.
    """
    algo = B.ALGOS["adam"]
    workloads = {f"{k} x 4 elements": M.tiny_tensors(k) for k in M.OVERHEAD_COUNTS}
    workloads |= {m: M.model_arrays(M.MODELS[m]()) for m in models if m in M.SMALL_MODELS}
    rows = []
    for name, tensors in workloads.items():
        step, kernels = M.overhead_runners(algo, tensors)
        times = _interleave({"step": step, "kernels": kernels}, repeat)
        t_step, t_kernels = (float(np.median(times[k][1])) for k in ("step", "kernels"))
        rows.append({"workload": name, "tensors": len(tensors), "step_s": t_step,
                     "kernels_s": t_kernels, "python_s": t_step - t_kernels})  # fmt: skip
    tiny = [r for r in rows if r["workload"].endswith("x 4 elements")]
    slope, intercept = np.polyfit([r["tensors"] for r in tiny], [r["python_s"] for r in tiny], 1)
    return {
        "rows": rows,
        "fit_us": {"base": float(intercept) * 1e6, "per_tensor": float(slope) * 1e6},
        "target_us": {"base": 25.0, "per_tensor": 0.3},
    }


def _overhead_lines(overhead: dict, markdown: bool) -> list[str]:
    fit = overhead["fit_us"]
    title = (
        f"Python-side cost of a cached fastrms.Adam step (step less its kernel calls): "
        f"{fit['base']:.1f} us + {fit['per_tensor']:.3f} us per tensor "
        f"(target: <= 25 us + 0.3 us per tensor)"
    )
    head = ["workload", "tensors", "step us", "kernels us", "Python us"]
    rows = [
        [r["workload"], str(r["tensors"]), f"{r['step_s'] * 1e6:.1f}",
         f"{r['kernels_s'] * 1e6:.1f}", f"{r['python_s'] * 1e6:.1f}"]
        for r in overhead["rows"]
    ]  # fmt: skip
    if markdown:
        return ["**" + title + "**", "", *_table_md(head, rows), ""]
    table = [head, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    return (
        [title]
        + [
            "  "
            + "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
            )  # fmt: skip
            for r in table
        ]
        + [""]
    )


# -- targets ------------------------------------------------------------------------------------


def evaluate_targets(cells: list[Cell]) -> list[dict]:
    """Each stated target, per algorithm it applies to: its measured value, and met or not."""
    index = {(c.algo, c.n, c.variant): c for c in cells}
    measured = list(dict.fromkeys(c.algo for c in cells))
    out = []
    for algo in measured:
        for t in (t for t in B.TARGETS if t.algo in (None, algo)):
            cell = index.get((algo, t.n, t.variant))
            value, note = None, ""
            if cell is None:
                note = f"not measured (no {t.variant} cell at n={t.n:,})"
            elif t.metric == "ceiling":
                value = cell.pct_ceiling
            else:
                other = index.get((algo, t.n, t.versus))
                if other is None:
                    note = f"not measured (no {t.versus} cell at n={t.n:,})"
                else:
                    value = other.median_s / cell.median_s
            out.append(
                {
                    "algo": algo,
                    "n": t.n,
                    "target": t.text,
                    "metric": t.metric,
                    "bound": t.bound,
                    "value": value,
                    "met": None if value is None else bool(value >= t.bound),
                    "note": note,
                }
            )
    return out


def evaluate_model_targets(models: list[dict]) -> list[dict]:
    """The model targets for the (model, algorithm) pairs measured."""
    by = {(m["model"], m["algo"]): m for m in models}
    out = []
    for t in M.MODEL_TARGETS:
        m = by.get((t.model, t.algo))
        if m is None:
            continue
        value = m[t.key]
        out.append(
            {
                "algo": t.algo,
                "model": t.model,
                "n": m["parameters"],
                "target": t.text,
                "metric": "ceiling" if t.key.startswith("pct") else "speedup",
                "bound": t.bound,
                "value": value,
                "met": None if value is None else bool(value >= t.bound),
                "note": "" if value is not None else f"not measured ({t.key})",
            }
        )
    return out


# -- output ---------------------------------------------------------------------------------------


def machine_info(threads: int) -> dict:
    """CPU model, cores, threads, library versions and the time, for the JSON report."""
    import numba

    import fastrms

    torch = sys.modules.get("torch")
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        layer = numba.config.THREADING_LAYER
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads,
        "numba_threading_layer": layer,
        "torch_threads": threads if torch else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "torch": torch.__version__ if torch else None,
        "fastrms": fastrms.__version__,
        "backends": {k: asdict(v) for k, v in fastrms.backends().items()},
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def to_json(sweep: Sweep, targets: list[dict], info: dict, settings: dict) -> dict:
    """The machine-readable report."""
    models = [dict(m, cells=[asdict(c) for c in m["cells"]]) for m in sweep.models]
    return {
        "schema": SCHEMA,
        "machine": info,
        "settings": settings,
        "bytes_per_element": {a.name: a.bytes_per_element() for a in B.ALGOS.values()},
        "cells": [asdict(c) for c in sweep.cells],
        "skipped": sweep.skipped,
        "targets": targets,
        "models": models,
        "overhead": sweep.overhead,
    }


_COLUMNS = ("variant", "median ms", "spread", "GB/s", "% ceiling", "x naive", "x torch")


def _row(c: Cell) -> list[str]:
    def ratio(x):
        return "" if x is None else f"{x:.2f}x"

    if c.pct_ceiling is None:
        pct = ""
    else:
        pct = "above it" if c.pct_ceiling > 1 else f"{c.pct_ceiling * 100:.0f}%"
    shown = f"{c.best_s * 1e3:.4g} best" if is_ceiling(c) else f"{c.median_s * 1e3:.4g}"
    return [
        c.label,
        shown,
        f"{c.spread * 100:.0f}%",
        f"{c.gbps:.1f}",
        pct,
        ratio(c.speedup_naive),
        ratio(c.speedup_torch),
    ]


def _groups(cells: list[Cell]) -> dict[tuple[str, int], list[Cell]]:
    groups: dict[tuple[str, int], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.algo, c.n), []).append(c)
    return groups


def _header(info: dict, settings: dict) -> list[str]:
    torch = (
        f"torch {info['torch']} on {settings['threads']} threads" if info["torch"] else "no torch"
    )
    return [
        f"fastrms {info['fastrms']} bench: {settings['dtype']}, {settings['threads']} threads "
        f"(Numba {info['numba']}, {info['numba_threading_layer']}), {torch}, "
        f"median of {settings['repeat']} interleaved repetitions",
        f"CPU: {info['cpu_model']}, {info['cores']} cores; Python {info['python']}, "
        f"NumPy {info['numpy']}; warm-up {settings['warm_up_s']:.1f} s, "
        f"total {settings['elapsed_s']:.1f} s",
    ]


_LEGEND = (
    "spread: interquartile range / median. % ceiling: the ceiling's time over the variant's "
    "median; the ceiling is a Numba loop with the same arrays read and written (the kernels' "
    "compile options, the faster of one thread and all), same run, and its figure is its best "
    'repetition; "above it": the variant ran faster, so the ceiling did not bound that run. '
    "x naive / x torch: speedup over naive NumPy / over the faster "
    "torch.optim variant measured (foreach or fused)."
)


def _target_lines(targets: list[dict], markdown: bool) -> list[str]:
    lines = []
    for t in targets:
        mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        if t["value"] is None:
            value = t["note"]
        elif t["metric"] == "ceiling":
            value = pct_text(t["value"], "the ceiling")
        else:
            value = f"{t['value']:.2f}x"
        where = f"{B.ALGOS[t['algo']].title}, n={t['n']:,}"
        if "model" in t:
            where = f"{B.ALGOS[t['algo']].title} over {t['model']}"
        if markdown:
            lines.append(f"| {where} | fastrms cpu {t['target']} | {value} | {mark} |")
        else:
            lines.append(f"  [{mark:>6}] {where}: fastrms cpu {t['target']}: {value}")
    return lines


def format_text(sweep: Sweep, targets: list[dict], info: dict, settings: dict) -> str:
    """The report as plain aligned text."""
    lines = _header(info, settings) + [_LEGEND, ""]
    for (algo, n), cells in _groups(sweep.cells).items():
        a = B.ALGOS[algo]
        lines.append(f"{a.title}, n = {n:,} ({a.bytes_per_element()} B/element)")
        lines += _table_text([_row(c) for c in cells])
        lines.append("")
    if sweep.overhead:
        lines += _overhead_lines(sweep.overhead, markdown=False)
    for m in sweep.models:
        lines += _model_title(m)
        lines += _table_text([_row(c) for c in m["cells"]])
        lines += [_model_verdict(m), ""]
    lines += _skipped_lines(sweep.skipped)
    lines += ["", "Targets (fastrms cpu against the others, same run):"]
    lines += _target_lines(targets, markdown=False)
    return "\n".join(lines)


def _skipped_lines(skipped: dict[str, dict[str, list[str]]]) -> list[str]:
    return [
        f"skipped {B.VARIANTS[name].title()} for "
        f"{', '.join(B.ALGOS[a].title for a in algos)}: {why}"
        for name, reasons in skipped.items()
        for why, algos in reasons.items()
    ]


def _table_text(rows: list[list[str]]) -> list[str]:
    table = [list(_COLUMNS), *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(_COLUMNS))]
    return [
        "  "
        + "  ".join(
            r[0].ljust(widths[0]) if i == 0 else r[i].rjust(widths[i]) for i in range(len(r))
        )
        for r in table
    ]


def _model_title(model: dict) -> list[str]:
    return [
        f"{model['model']} ({model['tensors']} tensors, {model['parameters']:,} parameters): "
        f"one {model['optimizer']} step over all of them",
    ]


def _model_verdict(model: dict) -> str:
    def ratio(key: str, what: str) -> str | None:
        r = model[key]
        return None if r is None else f"{r:.2f}x {what}"

    parts = [
        ratio("vs_torch_fused", "torch fused"),
        ratio("vs_torch_foreach", "torch foreach"),
        ratio("vs_per_array", "fastrms one call per array"),
    ]
    pct = model["pct_flat_ceiling"]
    if pct is not None:
        parts.append(pct_text(pct, f"the {M.CEILINGS['ceiling-flat']}"))
    parts = [p for p in parts if p]
    if not parts:
        return "fastrms grouped step: not measured"
    return "fastrms grouped step: " + ", ".join(parts) + "."


def format_markdown(sweep: Sweep, targets: list[dict], info: dict, settings: dict) -> str:
    """The report as GitHub Markdown: one table per algorithm, then the targets."""
    lines = [_header(info, settings)[0], "", _header(info, settings)[1], "", _LEGEND, ""]
    by_algo: dict[str, list[Cell]] = {}
    for c in sweep.cells:
        by_algo.setdefault(c.algo, []).append(c)
    head = ["n", *_COLUMNS]
    for algo, cells in by_algo.items():
        a = B.ALGOS[algo]
        lines += [f"**{a.title}** ({a.bytes_per_element()} B/element)", ""]
        lines += _table_md(head, [[f"{c.n:,}", *_row(c)] for c in cells])
        lines.append("")
    if sweep.overhead:
        lines += _overhead_lines(sweep.overhead, markdown=True)
    for m in sweep.models:
        lines += ["**" + _model_title(m)[0] + "**", ""]
        lines += _table_md(list(_COLUMNS), [_row(c) for c in m["cells"]])
        lines += ["", _model_verdict(m), ""]
    lines += ["**Targets**", ""]
    lines += ["| case | target | measured | |", "|---|---|---:|---|"]
    lines += _target_lines(targets, markdown=True)
    return "\n".join(lines)


def _table_md(head: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---" if h == "variant" else "---:" for h in head]
    return [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(align) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _plot_title(info: dict) -> str:
    return f"fastrms {info['fastrms']} on {info['cpu_model']}, {info['threads']} threads"


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(cells: list[Cell], path: str, title: str = "") -> None:
    """Write a PNG: GB/s against n, log-log, one panel per algorithm, ceiling dashed."""
    from matplotlib.figure import Figure

    algos = list(dict.fromkeys(c.algo for c in cells))
    cols = min(3, max(1, len(algos)))
    rows = math.ceil(len(algos) / cols) or 1
    fig = Figure(figsize=(5 * cols, 3.8 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, algo in zip(axes, algos, strict=False):
        mine = [c for c in cells if c.algo == algo]
        for variant in dict.fromkeys(c.variant for c in mine):
            pts = sorted((c.n, c.gbps) for c in mine if c.variant == variant)
            label = next(c.label for c in mine if c.variant == variant)
            style = {}
            if variant.endswith(CEILING):  # host ceiling black, CUDA ceiling grey
                style = {"linestyle": "--", "color": "black" if variant == CEILING else "grey"}
            ax.plot(*zip(*pts, strict=True), marker="o", label=label, **style)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n (float32 elements)")
        ax.set_ylabel("GB/s")
        ax.set_title(f"{B.ALGOS[algo].title} ({B.ALGOS[algo].bytes_per_element()} B/element)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(algos) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)


def plot_models(models: list[dict], path: str, title: str = "") -> None:
    """Write a PNG: for each (model, algorithm), each variant's speed as a fraction of the
    flat same-pattern ceiling (1 = the memory speed of one flat array), log scale."""
    from matplotlib.figure import Figure

    rows = [f"{m['model']} ({m['tensors']} tensors)\n{B.ALGOS[m['algo']].title}" for m in models]
    variants = list(dict.fromkeys(c.variant for m in models for c in m["cells"]))
    variants = [v for v in variants if v != "ceiling-flat"]
    fig = Figure(figsize=(9, 0.9 + 0.55 * len(rows) * max(1, len(variants)) / 3),
                 layout="constrained")  # fmt: skip
    ax = fig.subplots()
    height = 0.8 / max(1, len(variants))
    for k, variant in enumerate(variants):
        ys, xs, label = [], [], variant
        for r, m in enumerate(models):
            by = {c.variant: c for c in m["cells"]}
            if variant in by and "ceiling-flat" in by:
                ys.append(r + (k - (len(variants) - 1) / 2) * height)
                xs.append(by["ceiling-flat"].best_s / by[variant].median_s)
                label = by[variant].label
        ax.barh(ys, xs, height=height, label=label)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)), rows, fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("speed as a fraction of the flat same-pattern ceiling (higher is better)")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    if title:
        ax.set_title(title, fontsize="medium")
    fig.savefig(path, dpi=110)
