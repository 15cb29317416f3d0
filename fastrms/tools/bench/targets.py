"""The stated targets of ``fastrms bench`` and their evaluation against a run's measurements.

:data:`TARGETS` are per algorithm at a size (what the report checks at n = 10**7 and the
per-call overhead at 10**5); :data:`MODEL_TARGETS` are per model workload.
"""

from __future__ import annotations

from dataclasses import dataclass

from .measure import Cell


@dataclass(frozen=True)
class Target:
    """A stated goal: ``variant``'s ``metric`` for ``algo`` at size ``n`` is at least ``bound``.

    ``metric`` is ``"speedup"`` (the time of ``versus`` over the variant's; both from the same
    run) or ``"ceiling"`` (the variant's bandwidth as a fraction of the same-pattern ceiling).
    ``algo=None`` applies to every algorithm measured.
    """

    text: str
    algo: str | None
    n: int
    metric: str
    bound: float
    variant: str = "cpu"
    versus: str | None = None


TARGETS: tuple[Target, ...] = (
    Target(">= 10x naive NumPy", None, 10**7, "speedup", 10.0, versus="naive"),
    Target(">= 85% of the same-pattern ceiling", None, 10**7, "ceiling", 0.85),
    Target(
        ">= 4x torch RMSprop(foreach=True)",
        "rmsprop",
        10**7,
        "speedup",
        4.0,
        versus="torch-foreach",
    ),
    Target(">= 0.95x torch Adam(fused=True)", "adam", 10**7, "speedup", 0.95, versus="torch-fused"),
    Target(
        ">= 0.95x torch Adagrad(fused=True)",
        "adagrad",
        10**7,
        "speedup",
        0.95,
        versus="torch-fused",
    ),  # fmt: skip
    Target(
        ">= 2.2x torch Adam(fused=True), per-call overhead",
        "adam",
        10**5,
        "speedup",
        2.2,
        versus="torch-fused",
    ),  # fmt: skip
)


@dataclass(frozen=True)
class ModelTarget:
    """A stated goal for the grouped step over a model: ``key`` of the model's report (a ratio
    such as ``vs_torch_fused``) is at least ``bound``."""

    model: str
    algo: str
    key: str
    bound: float
    text: str


MODEL_TARGETS = (
    ModelTarget("gpt2-tiny", "adam", "vs_torch_fused", 3.0, ">= 3x torch Adam(fused=True)"),
    ModelTarget("mlp", "adam", "vs_torch_fused", 2.5, ">= 2.5x torch Adam(fused=True)"),
    ModelTarget("mlp", "rmsprop", "vs_torch_foreach", 5.0, ">= 5x torch RMSprop(foreach=True)"),
    ModelTarget("resnet50", "adam", "vs_torch_fused", 1.05, ">= 1.05x torch Adam(fused=True)"),
    ModelTarget("resnet50", "adam", "pct_flat_ceiling", 0.90, ">= 90% of the flat ceiling"),
    ModelTarget("gpt2", "adam", "vs_torch_fused", 1.0, ">= 1.0x torch Adam(fused=True)"),
    ModelTarget("gpt2", "adam", "pct_flat_ceiling", 0.95, ">= 95% of the flat ceiling"),
)


def evaluate_targets(cells: list[Cell]) -> list[dict]:
    """Each stated target, per algorithm it applies to: its measured value, and met or not."""
    index = {(c.algo, c.n, c.variant): c for c in cells}
    measured = list(dict.fromkeys(c.algo for c in cells))
    out = []
    for algo in measured:
        for t in (t for t in TARGETS if t.algo in (None, algo)):
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
    for t in MODEL_TARGETS:
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
