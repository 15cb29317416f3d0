"""Measuring for ``fastrms bench``: check each variant, then time them all, interleaved.

For each algorithm and size, every variant first takes one step from the same state and is
checked against the NumPy reference (a wrong result stops the run, exit status 1). Then all
variants and the same-pattern ceiling are timed in one process, interleaved repetition by
repetition (each repetition in a rotated order), on the same arrays: between processes,
timings here vary far more than the ratios within one run.

Each repetition times enough consecutive steps to last about :data:`SAMPLE_S` and records the
time per step. A cell reports the median over repetitions, its spread (interquartile range
over median), GB/s (bytes per element x n / median), % of the ceiling, and the speedups over
naive NumPy and over the fastest ``torch.optim`` variant measured. A ceiling is a bound, so
its cell reports its best repetition instead of its median (GB/s too).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import cases, ceilings
from . import models as M
from .variants import (
    TORCH_CUDA_VARIANTS,
    TORCH_VARIANTS,
    VARIANTS,
    Runner,
    Variant,
    WrongResult,
    build_checked,
)

#: Target duration of one timing sample; small steps are repeated within a sample to reach it.
SAMPLE_S = 2e-3
MAX_INNER = 10_000
CEILING = "ceiling"


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


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="case", file=sys.stderr, leave=False, disable=None)


def warm_up(algos: tuple[str, ...], variants: tuple[str, ...], threads: int) -> float:
    """Compile and load every kernel the sweep uses (serial and parallel); return seconds."""
    from ...kernels.cpu import PARALLEL_THRESHOLD

    t0 = time.perf_counter()
    for name in algos:
        algo = cases.ALGOS[name]
        for n in (64, PARALLEL_THRESHOLD):
            start = cases.make_arrays(algo, n)
            expected = cases.reference_result(algo, start)
            for v in _available(algo, variants, {}):
                if v.device == "cuda" and n > 64:
                    continue  # CUDA has no serial/parallel switch: one small step compiles it
                build_checked(v, algo, cases.copy_arrays(start), expected, threads)
                ceilings.ceiling_for(v, algo, start).step()
    return time.perf_counter() - t0


def _available(algo: cases.Algo, names: tuple[str, ...], skipped: dict) -> list[Variant]:
    out = []
    for name in names:
        v = VARIANTS[name]
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
            algo = cases.ALGOS[name]
            chosen = _available(algo, variants, sweep.skipped)
            sweep.cells += measure_group(algo, n, chosen, threads, repeat)
            bar.update()
    return sweep


def measure_group(
    algo: cases.Algo, n: int, variants: list[Variant], threads: int, repeat: int
) -> list[Cell]:
    """One algorithm and size: check each variant, then time them all, interleaved."""
    start = cases.make_arrays(algo, n)
    expected = cases.reference_result(algo, start)
    for v in variants:  # each on its own copy, from the same state
        build_checked(v, algo, cases.copy_arrays(start), expected, threads)
    del expected
    bpe = algo.bytes_per_element()
    # The timing runs share ``start``: every variant does the same work on the same memory.
    runners = {
        v.name: (v.title(threads), v.build(algo, start, threads), "passed") for v in variants
    }
    runners[CEILING] = ("same-pattern ceiling", ceilings.ceiling(algo, start), "n/a")
    if any(v.device == "cuda" for v in variants):
        runners["cuda-ceiling"] = (
            "same-pattern CUDA ceiling",
            ceilings.cuda_ceiling(algo, start),
            "n/a",
        )
        runners[ceilings.COPY] = (
            ceilings.COPY_LABEL,
            ceilings.cuda_copy_ceiling(algo.bytes_per_element() * n),
            "n/a",
        )
    times = _interleave({k: r for k, (_, r, _) in runners.items()}, repeat)
    cells = [
        Cell(algo.name, n, k, label, bpe, inner, ts, check=status)
        for k, (label, _, status) in runners.items()
        for inner, ts in [times[k]]
    ]
    return summarize(cells, {v.name: v.device for v in variants})


def _interleave(runners: dict[str, Runner], repeat: int) -> dict[str, tuple[int, list[float]]]:
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
    fastest = {}
    for device, names in (("host", TORCH_VARIANTS), ("cuda", TORCH_CUDA_VARIANTS)):
        torch = [by_name[t] for t in names if t in by_name]
        fastest[device] = min(torch, key=lambda c: c.median_s) if torch else None
    for c in cells:
        fastest_torch = fastest["cuda" if devices.get(c.variant) == "cuda" else "host"]
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


def measure_model(
    model: str, algo_name: str, variants: tuple[str, ...], threads: int, repeat: int
) -> dict:
    """Time one step of ``algo_name`` over a model's tensors, for each model variant that
    ``variants`` names (``cpu`` also brings ``cpu-per-array``), and the two ceilings."""
    algo = cases.ALGOS[algo_name]
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
                raise WrongResult(f"{v.label}, {model}, {algo.title}: {problem}")
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
    algo = cases.ALGOS["adam"]
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
