"""The ``fastrms bench`` report as text, GitHub Markdown and JSON.

A variant that ran faster than its ceiling is reported in words, not as a percentage over
100: the ceiling did not bound that run.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from dataclasses import asdict

import numpy as np

from . import cases
from . import models as M
from .measure import Cell, Sweep, is_ceiling
from .variants import VARIANTS

SCHEMA = "fastrms-bench/1"


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
        "bytes_per_element": {a.name: a.bytes_per_element() for a in cases.ALGOS.values()},
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
        where = f"{cases.ALGOS[t['algo']].title}, n={t['n']:,}"
        if "model" in t:
            where = f"{cases.ALGOS[t['algo']].title} over {t['model']}"
        if markdown:
            lines.append(f"| {where} | fastrms cpu {t['target']} | {value} | {mark} |")
        else:
            lines.append(f"  [{mark:>6}] {where}: fastrms cpu {t['target']}: {value}")
    return lines


def format_text(sweep: Sweep, targets: list[dict], info: dict, settings: dict) -> str:
    """The report as plain aligned text."""
    lines = _header(info, settings) + [_LEGEND, ""]
    for (algo, n), cells in _groups(sweep.cells).items():
        a = cases.ALGOS[algo]
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
        f"skipped {VARIANTS[name].title()} for "
        f"{', '.join(cases.ALGOS[a].title for a in algos)}: {why}"
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
        a = cases.ALGOS[algo]
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


def pct_text(fraction: float, ceiling: str = "its ceiling") -> str:
    """A fraction of a ceiling as a percentage, or, above 1, words that say the variant ran
    faster than its bound: the ceiling did not bound that run (a percentage over 100 would
    read as a measurement)."""
    if fraction > 1:
        return f"faster than {ceiling} ({fraction:.2f}x its best): not bounded in this run"
    return f"{fraction * 100:.0f}% of {ceiling}"


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
