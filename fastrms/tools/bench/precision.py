"""``fastrms bench --precision``: one Adam step over a model's tensors at each precision, against
torch.optim and the low-precision libraries users would pick instead.

Every variant steps the same model shapes (GPT-2 small by default) from the same values, and
the variants are timed interleaved, repetition by repetition, in one process, so their ratios
are measured side by side. Each is reported as its time per step, the ratio of torch's fused
float32 Adam's time to it (the issue's "x torch fused"), and its state's bytes per parameter.

:data:`PRECISION_VARIANTS` is the one table of cases, read by this command and by
``bench/bench_precision.py`` (pytest-benchmark). fastrms's variants run its NumPy optimizer
classes (the grouped step, as ``fastrms.torch`` does) with ``state_dtype=`` and, for bfloat16
parameters, ``rounding=``; a variant the installed fastrms refuses is reported as not
available, with the reason. The anchors run where their library is installed: torch's fused
Adam on float32 and on bfloat16 parameters, torchao's ``AdamW8bit`` and bf16 stochastic-rounding
``_AdamW``, optimi's ``AdamW`` with Kahan summation, and bitsandbytes' ``Adam8bit``.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import models as M
from .variants import Runner, import_torch

#: Adam's hyperparameters for every variant (torch's defaults but a typical lr).
ADAM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}

Shapes = M.Shapes


@dataclass(frozen=True)
class PrecisionVariant:
    """One way to run Adam at some precision.

    ``build(shapes, values)`` makes the parameters (of ``param_dtype``), gradients and
    optimizer and returns a :class:`Runner` whose ``keep`` is the optimizer (its state measures
    the bytes) and whose ``result()`` is the parameters as float32 NumPy arrays;
    ``why_not()`` says why the variant cannot run here (None if it can).
    """

    name: str
    label: str
    build: Callable[[Shapes, dict], Runner]
    why_not: Callable[[], str | None] = lambda: None
    param_dtype: str = "float32"


def values_for(shapes: Shapes, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per tensor, a float32 parameter (standard normal) and gradient (scaled by 1e-2)."""
    rng = np.random.default_rng(seed)
    return {
        k: (
            rng.standard_normal(s, dtype=np.float32),
            np.float32(1e-2) * rng.standard_normal(s, dtype=np.float32),
        )
        for k, s in shapes.items()
    }


# -- fastrms ---------------------------------------------------------------------------------


def _fastrms(param_dtype: str, **options) -> Callable[[Shapes, dict], Runner]:
    def build(shapes: Shapes, values: dict) -> Runner:
        import fastrms

        from ...lowprecision import BFLOAT16

        dtype = BFLOAT16 if param_dtype == "bfloat16" else np.dtype(param_dtype)
        params = [p.astype(dtype) for p, _ in values.values()]
        grads = [g.astype(dtype) for _, g in values.values()]
        opt = fastrms.Adam(params, backend="cpu", **ADAM, **options)

        def result() -> list[np.ndarray]:
            return [p.astype(np.float32) for p in params]

        return Runner(functools.partial(opt.step, grads), result, keep=opt)

    return build


def _fastrms_why_not(param_dtype: str, **options) -> Callable[[], str | None]:
    """Try the variant on one small tensor: the installed fastrms refuses what it lacks."""

    def why_not() -> str | None:
        try:
            build = _fastrms(param_dtype, **options)
            runner = build({"w": (8192,)}, values_for({"w": (8192,)}))
            runner.step()
        except (TypeError, ValueError) as error:
            return f"{type(error).__name__}: {error}"
        return None

    return why_not


# -- torch and the libraries users would pick instead -----------------------------------------


def _torch_tensors(values: dict, dtype: str):
    torch = import_torch()
    params = []
    for p, g in values.values():
        t = torch.from_numpy(p.copy()).to(getattr(torch, dtype))
        t.grad = torch.from_numpy(g).to(getattr(torch, dtype))
        params.append(t)
    return params


def _torch_runner(opt, params) -> Runner:
    def result() -> list[np.ndarray]:
        return [p.detach().float().numpy() for p in params]

    return Runner(opt.step, result, keep=opt)


def _torch_optimizer(module: str, cls: str, dtype: str, **options):
    def build(shapes: Shapes, values: dict) -> Runner:
        params = _torch_tensors(values, dtype)
        opt = getattr(importlib.import_module(module), cls)(params, **ADAM, **options)
        return _torch_runner(opt, params)

    return build


def _needs(module: str) -> Callable[[], str | None]:
    def why_not() -> str | None:
        try:
            importlib.import_module(module)
        except ImportError:
            return f"{module.split('.')[0]} is not installed"
        except Exception as error:  # a library that fails on import here (no GPU, say)
            return f"{module} does not import: {type(error).__name__}: {error}"
        return None

    return why_not


def _torch_why_not() -> str | None:
    return None if import_torch() is not None else "torch is not installed"


#: The baseline every ratio is taken against.
BASELINE = "torch-fused-f32"


def _ours(name: str, label: str, param_dtype: str, options: dict) -> PrecisionVariant:
    """A fastrms variant: the NumPy Adam class on ``param_dtype`` parameters with ``options``."""
    build, why_not = _fastrms(param_dtype, **options), _fastrms_why_not(param_dtype, **options)
    return PrecisionVariant(name, label, build, why_not, param_dtype)


def _theirs(name: str, label: str, module: str, cls: str, param_dtype: str, **options):
    """A torch-side variant: ``module.cls`` (where installed) on ``param_dtype`` tensors."""
    why_not = _torch_why_not if module == "torch.optim" else _needs(module)
    build = _torch_optimizer(module, cls, param_dtype, **options)
    return PrecisionVariant(name, label, build, why_not, param_dtype)


#: fastrms's precisions, by variant name: what they are, the parameters' dtype and the Adam
#: class's options. The host table and the GPU check's CUDA table are both made from it.
FASTRMS_PRECISIONS: dict[str, tuple[str, str, dict]] = {
    "fastrms-f32": ("float32 params and state", "float32", {}),
    "fastrms-f32-bf16state": ("float32 params, bf16 state", "float32",
                              {"state_dtype": "bfloat16"}),
    "fastrms-f32-int8state": ("float32 params, int8 state", "float32", {"state_dtype": "int8"}),
    "fastrms-bf16-f32state": ("bf16 params (stochastic), float32 state", "bfloat16",
                              {"rounding": "stochastic"}),
    "fastrms-bf16-bf16state": ("bf16 params (stochastic), bf16 state", "bfloat16",
                               {"state_dtype": "bfloat16", "rounding": "stochastic"}),
    "fastrms-bf16-int8state": ("bf16 params (stochastic), int8 state", "bfloat16",
                               {"state_dtype": "int8", "rounding": "stochastic"}),
}  # fmt: skip
#: Those ``fastrms bench --precision`` times on the host.
HOST_PRECISIONS = ("fastrms-f32", "fastrms-f32-bf16state", "fastrms-f32-int8state",
                   "fastrms-bf16-bf16state", "fastrms-bf16-int8state")  # fmt: skip

PRECISION_VARIANTS: dict[str, PrecisionVariant] = {
    v.name: v
    for v in (
        _theirs(BASELINE, "torch fused Adam, float32", "torch.optim", "Adam", "float32",
                fused=True),
        *(_ours(name, f"fastrms, {what}", *how) for name, (what, *how) in FASTRMS_PRECISIONS.items()
          if name in HOST_PRECISIONS),
        _theirs("torch-fused-bf16", "torch fused Adam, bf16 params (nearest)", "torch.optim",
                "Adam", "bfloat16", fused=True),
        _theirs("torchao-adamw8bit", "torchao AdamW8bit", "torchao.optim", "AdamW8bit",
                "float32"),
        _theirs("torchao-bf16-sr", "torchao _AdamW, bf16 stochastic rounding", "torchao.optim",
                "_AdamW", "bfloat16", bf16_stochastic_round=True),
        _theirs("optimi-kahan", "optimi AdamW, bf16 + Kahan", "optimi", "AdamW", "bfloat16",
                kahan_sum=True),
        _theirs("bnb-adam8bit", "bitsandbytes Adam8bit", "bitsandbytes.optim", "Adam8bit",
                "float32"),
    )
}  # fmt: skip

#: The model the targets are set on (GPT-2 small's shapes: memory-bound, unlike the small ones).
TARGET_MODEL = "gpt2"
#: The issue's targets: variant -> least ratio to torch fused float32 Adam over TARGET_MODEL.
TARGETS = {
    "fastrms-f32-bf16state": 1.3,
    "fastrms-f32-int8state": 1.5,
    "fastrms-bf16-bf16state": 1.8,
    "fastrms-bf16-int8state": 2.3,
}


def first_step_error(variant: PrecisionVariant, values: dict, result: list) -> float:
    """How far one step from zero state put the parameters from Adam's first step, in units
    of the tolerance (fails above 1).

    From zero state Adam's first step is ``p - lr * g / (|g| + eps')``, nearly ``p - lr *
    sign(g)``, computed in float32 from the parameter and gradient as the variant holds them
    (bf16 ones rounded to nearest). The tolerance is one bf16 ulp for bf16 parameters (either
    rounding), and 1e-4 relative (+1e-6) for float32 ones, which covers 8-bit state that
    quantizes the moments before the update uses them.
    """
    import ml_dtypes

    worst = 0.0
    for (p, g), got in zip(values.values(), result):
        if variant.param_dtype == "bfloat16":
            p = p.astype(ml_dtypes.bfloat16).astype(np.float32)
            g = g.astype(ml_dtypes.bfloat16).astype(np.float32)
        lr, eps = np.float32(ADAM["lr"]), np.float32(ADAM["eps"])
        want = p - lr * g / (np.abs(g) + eps)
        if variant.param_dtype == "bfloat16":
            tol = np.abs(want) * np.float32(2.0**-7) + np.float32(1e-6)
        else:
            tol = np.abs(want) * np.float32(1e-4) + np.float32(1e-6)
        worst = max(worst, float(np.max(np.abs(got.ravel() - want.ravel()) / tol.ravel())))
    return worst


def _nbytes(a) -> int:
    """Held bytes of one state entry: an array, a list of arrays, or a quantized tensor
    subclass that keeps its codes and scales as attributes (torchao's ``OptimState8bit``,
    whose own ``nbytes`` reports the dequantized size)."""
    if isinstance(a, (list, tuple)):
        return sum(_nbytes(x) for x in a)
    if hasattr(a, "codes") and hasattr(a, "scale"):
        return _nbytes(a.codes) + _nbytes(a.scale)
    return int(getattr(a, "nbytes", 0))


def state_bytes(opt) -> int:
    """The bytes of an optimizer's state arrays (NumPy or torch), step counters included."""
    total = 0
    for entry in opt.state.values():
        items = entry.values() if isinstance(entry, dict) else [entry]
        total += sum(_nbytes(a) for a in items)
    return total


def shapes_of(model: str) -> Shapes:
    """The shapes ``fastrms bench --precision`` steps: a model of
    :data:`fastrms.tools.bench.models.MODELS`, or one array of ``model`` elements (``"1e7"``)."""
    if model in M.MODELS:
        return M.MODELS[model]()
    return {"array": (int(float(model)),)}


def measure_precision(model: str, names: tuple[str, ...], repeat: int) -> dict:
    """Build every available variant of ``names`` over ``model``'s shapes (:func:`shapes_of`),
    time them interleaved with the flat memory ceiling, and return the report's rows (and the
    reasons for those left out). Each fastrms variant's row also gives its bounds
    (:mod:`fastrms.tools.bench.precision_bounds`) on the current thread count."""
    from numba import get_num_threads

    from ...optim import Optimizer
    from . import precision_bounds as B
    from .measure import _interleave

    shapes = shapes_of(model)
    size = M.model_size(shapes)
    values = values_for(shapes)
    runners, rows, skipped, errors, per_element = {}, [], {}, {}, {}
    for name in names:
        v = PRECISION_VARIANTS[name]
        why = v.why_not()
        if why:
            skipped[name] = why
            print(f"  {v.label}: not available ({why})", file=sys.stderr, flush=True)
            continue
        print(f"  {v.label}: building", file=sys.stderr, flush=True)
        runner = v.build(shapes, values)
        runner.step()  # the first step allocates lazily made state
        errors[name] = first_step_error(v, values, runner.result())
        runners[name] = runner
        if isinstance(runner.keep, Optimizer):
            per_element[name] = B.compute_floor(v.build, values_for, get_num_threads())
    runners[B.CEILING] = B.flat_ceiling(size)
    print(f"  timing {len(runners)} rows x {repeat} repetitions", file=sys.stderr, flush=True)
    times = _interleave(runners, repeat)
    ceiling_best = float(min(times.pop(B.CEILING)[1]))
    base = np.median(times[BASELINE][1]) if BASELINE in times else None
    for name, (inner, ts) in times.items():
        median = float(np.median(ts))
        v = PRECISION_VARIANTS[name]
        row = {
            "variant": name,
            "label": v.label,
            "median_s": median,
            "best_s": float(min(ts)),
            "times_s": [float(t) for t in ts],
            "inner": inner,
            "x_torch_fused_f32": float(base / median) if base else None,
            "state_bytes_per_param": state_bytes(runners[name].keep) / size,
            "target": TARGETS.get(name),
            "first_step_error": errors[name],
        }
        if name in per_element:
            width = 2 if v.param_dtype == "bfloat16" else 4
            moved = B.bytes_moved(width * size, width * size, state_bytes(runners[name].keep))
            row |= B.bound_fields(size, moved, per_element[name], ceiling_best, base)
        rows.append(row)
    ceiling = {"label": B.CEILING_LABEL, "best_s": ceiling_best,
               "gb_per_s": B.CEILING_BYTES * size / ceiling_best / 1e9}  # fmt: skip
    return {"model": model, "size": size, "tensors": len(shapes), "rows": rows,
            "ceiling": ceiling, "skipped": skipped}  # fmt: skip


def format_precision(result: dict, markdown: bool = False) -> str:
    """The report: a table of the variants, then those left out and why. "first step" says
    whether the variant's first step matched Adam's (:func:`first_step_error`); "at best"
    is the most a fastrms variant's "x torch" could be here, and "bound by" what sets it
    (:mod:`fastrms.tools.bench.precision_bounds`)."""
    head = (
        f"Adam over {result['model']} ({result['tensors']} tensors, {result['size']:,} "
        "parameters), one step, interleaved in one process"
    )
    cols = ("variant", "ms/step", "x torch fused f32", "state B/param", "first step", "target",
            "at best", "bound by")  # fmt: skip
    lines = [head, ""]
    sep = " | " if markdown else "  "
    rows = [cols]
    for r in result["rows"]:
        x = r["x_torch_fused_f32"]
        target = r["target"]
        verdict = ""
        if target is not None and x is not None:
            verdict = f">= {target}x: {'met' if x >= target else 'missed'}"
            if result["model"] != TARGET_MODEL:  # small models run in cache: no verdict
                verdict = f">= {target}x on {TARGET_MODEL}"
        rows.append(
            (
                r["label"],
                f"{r['median_s'] * 1e3:.1f}",
                f"{x:.2f}" if x is not None else "-",
                f"{r['state_bytes_per_param']:.2f}",
                "ok" if r["first_step_error"] <= 1 else f"WRONG ({r['first_step_error']:.3g} tol)",
                verdict,
                f"{r['bound_x_torch_fused_f32']:.2f}" if r.get("bound_x_torch_fused_f32") else "",
                r.get("bound_by", ""),
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(cols))]
    for k, row in enumerate(rows):
        cells = [str(c).ljust(w) for c, w in zip(row, widths)]
        lines.append(("| " + sep.join(cells) + " |") if markdown else sep.join(cells))
        if markdown and k == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    ceiling = result.get("ceiling")
    if ceiling:
        lines.append("")
        lines.append(f"{ceiling['label']}: {ceiling['best_s'] * 1e3:.1f} ms, "
                     f"{ceiling['gb_per_s']:.1f} GB/s (best repetition)")  # fmt: skip
    if result["skipped"]:
        lines.append("")
        lines.append("not available here:")
        for name, why in result["skipped"].items():
            lines.append(f"  {PRECISION_VARIANTS[name].label}: {why}")
    return "\n".join(lines)
