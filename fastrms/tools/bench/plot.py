"""The ``fastrms bench`` plots (``--plot``, ``--plot-models``); they need matplotlib."""

from __future__ import annotations

import math

import numpy as np

from . import cases
from .measure import CEILING, Cell


def plot_title(info: dict) -> str:
    return f"fastrms {info['fastrms']} on {info['cpu_model']}, {info['threads']} threads"


def have_matplotlib() -> bool:
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
        ax.set_title(
            f"{cases.ALGOS[algo].title} ({cases.ALGOS[algo].bytes_per_element()} B/element)"
        )
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

    rows = [
        f"{m['model']} ({m['tensors']} tensors)\n{cases.ALGOS[m['algo']].title}" for m in models
    ]
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
