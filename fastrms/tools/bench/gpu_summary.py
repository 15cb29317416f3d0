"""The GPU check's summary (:mod:`fastrms.tools.bench.gpu`): the phases' status and key
figures, read from the JSON each phase wrote, and the merge of the sweep's parts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from . import ceilings

#: Every phase's JSON says which clock its CUDA figures are from.
TIMING_KEY = "cuda_timing"

# -- summary ------------------------------------------------------------------------------------


def _load(out: Path, name: str) -> dict | None:
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None


def _statuses(path: Path | None) -> list[dict]:
    """The script's phase log: ``phase<TAB>exit code<TAB>seconds<TAB>limit`` per line."""
    rows = []
    if path is None or not path.exists():
        return rows
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == 4:
            phase, rc, seconds, limit = parts
            # timeout's 124 (137 after its SIGKILL); the script stops phases by SIGINT
            status = {"0": "ok", "124": "timed out", "137": "killed", "skip": "skipped"}
            rows.append({"phase": phase, "rc": rc, "status": status.get(rc, f"failed ({rc})"),
                         "seconds": float(seconds), "limit_s": int(limit)})  # fmt: skip
    return rows


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


def key_figures(out: Path) -> dict[str, str]:
    """Per phase, its key figures in words, read from its JSON (where the phase wrote one)."""
    figures: dict[str, str] = {}
    figures["tests"] = _tests_figure(out / "tests.xml")
    sweep = _load(out, "sweep.json")
    if sweep:
        figures["sweep"] = _sweep_figure(sweep)
    models = _load(out, "models.json")
    if models:
        figures["models"] = _models_figure(models)
    precision = _load(out, "precision.json")
    if precision:
        figures["precision"] = (
            "; ".join(
                f"{r['variant']} {_fmt(r.get('x_torch_fused_f32'), '.2f', 'x')}"
                for r in precision["result"]["rows"]
                if r["variant"].startswith("fastrms")
            )
            or f"no fastrms row ({len(precision['result']['skipped'])} variants not run)"
        )
    loop = _load(out, "torch_loop.json")
    if loop and loop["result"].get("unavailable"):
        figures["torch-loop"] = "not run: " + loop["result"]["unavailable"]
    elif loop:
        figures["torch-loop"] = "; ".join(
            f"{r['model']} {r['algo']}: "
            + ", ".join(f"{v} {_fmt(x, '.2f', 'x')}" for v, x in r["x_fastrms"].items())
            for r in loop["result"]["rows"]
        )
    versions = _load(out, "versions.json")
    if versions:
        v = versions["result"]
        nc = v.get("numba_cuda", {})
        figures["versions"] = (
            f"{nc.get('device', 'simulator' if v.get('simulator') else '?')}, "
            f"cc {nc.get('compute_capability', '?')}, runtime {nc.get('runtime_version', '?')}, "
            f"launch counter {'ok' if v.get('launch_counter', {}).get('ok') else 'NOT ok'}"
        )
    return figures


def _tests_figure(path: Path) -> str:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return "no junit report"
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors",
                                                               "skipped")}  # fmt: skip
    return (f"{total['tests']} tests: {total['failures']} failed, {total['errors']} errors, "
            f"{total['skipped']} skipped")  # fmt: skip


def sweep_rows(sweep: dict) -> list[dict]:
    """Per algorithm at its largest size: fastrms cuda's GB/s, the copy's, the ratio, and the
    ratio to torch foreach and fused on CUDA."""
    cells = sweep["cells"]
    rows = []
    for algo in dict.fromkeys(c["algo"] for c in cells):
        n = max(c["n"] for c in cells if c["algo"] == algo)
        by = {c["variant"]: c for c in cells if c["algo"] == algo and c["n"] == n}
        ours = by.get("cuda")
        copy = by.get(ceilings.COPY)
        row = {"algo": algo, "n": n, "cuda_gbps": ours and ours["gbps"],
               "copy_gbps": copy and copy["gbps"],
               "pct_copy": ours and copy and copy["best_s"] / ours["median_s"]}  # fmt: skip
        for t in ("torch-cuda-foreach", "torch-cuda-fused"):
            theirs = by.get(t)
            row["x_" + t] = ours and theirs and theirs["median_s"] / ours["median_s"]
        rows.append(row)
    return rows


def merge_sweeps(paths: list[Path]) -> dict:
    """One ``fastrms bench --json`` document from several (one per algorithm): their cells,
    skipped variants and targets together, each part's settings in a list, the first's
    machine; a part that is not valid JSON is named under ``"unreadable"``."""
    merged: dict[str, Any] = {"machine": None, "settings": [], "cells": [], "skipped": {},
                              "targets": [], "unreadable": []}  # fmt: skip
    for path in paths:
        try:
            part = json.loads(path.read_text())
        except (OSError, ValueError):
            merged["unreadable"].append(path.name)
            continue
        merged["machine"] = merged["machine"] or part.get("machine")
        merged["schema"] = part.get("schema")
        merged["settings"].append(part.get("settings"))
        merged["cells"] += part.get("cells", [])
        merged["targets"] += part.get("targets", [])
        for variant, reasons in part.get("skipped", {}).items():
            for why, algos in reasons.items():
                merged["skipped"].setdefault(variant, {}).setdefault(why, []).extend(algos)
    merged[TIMING_KEY] = next((s.get(TIMING_KEY) for s in merged["settings"] if s), "unknown")
    return merged


def _sweep_figure(sweep: dict) -> str:
    parts = []
    for r in sweep_rows(sweep):
        pct = r["pct_copy"] and 100 * r["pct_copy"]
        parts.append(
            f"{r['algo']} n={r['n']:.0e}: {_fmt(r['cuda_gbps'], '.0f')} vs copy "
            f"{_fmt(r['copy_gbps'], '.0f')} GB/s ({_fmt(pct, '.0f', '%')}), "
            f"x foreach {_fmt(r['x_torch-cuda-foreach'], '.2f')}"
        )
    return "; ".join(parts)


def _models_figure(models: dict) -> str:
    parts = []
    for m in models["result"]["runs"]:
        launches = m.get("launches") or {}
        parts.append(
            f"{m['model']} {m['algo']}: x fused {_fmt(m.get('vs_torch_cuda_fused'))}, "
            f"launches/group {_fmt(launches.get('per_group'), '.0f')}"
        )
    return "; ".join(parts)


def summary(out: Path, status_file: Path | None) -> dict:
    """The phases' statuses and key figures; printed as a table by :func:`main`."""
    statuses = _statuses(status_file)
    figures = key_figures(out)
    smoke = any((_load(out, f) or {}).get(TIMING_KEY) == "simulator"
                for f in ("versions.json", "models.json", "precision.json"))  # fmt: skip
    return {"phases": [s | {"figures": figures.get(s["phase"], "")} for s in statuses],
            "figures": figures, "simulator": smoke}  # fmt: skip


def format_summary(result: dict) -> str:
    lines = ["", "GPU check summary" + (" (SIMULATOR: no figure is a timing)"
                                          if result["simulator"] else ""),
             f"{'phase':<11} {'status':<12} {'seconds':>8}  key figures"]  # fmt: skip
    for s in result["phases"]:
        lines.append(
            f"{s['phase']:<11} {s['status']:<12} {s['seconds']:>8.1f}  {s['figures'][:400]}"
        )
    return "\n".join(lines)
