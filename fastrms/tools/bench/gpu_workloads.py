"""The GPU check's workloads (:mod:`fastrms.tools.bench.gpu` runs them as phases): one step
over model shapes on CUDA, fastrms's grouped launch against ``torch.optim`` fused and foreach
on CUDA tensors with the kernel launches per group counted (``models``); Adam at each
precision CUDA supports (``precision``); ``fastrms.torch`` in a CUDA training loop
(``torch-loop``). Every timing on a device is by CUDA events after a warm-up step, the median
over repetitions interleaved variant by variant."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
from numba import cuda  # this module only runs where CUDA (or its simulator) is wanted

from . import cases, ceilings
from . import models as M
from .gpu_device import counting_launches
from .measure import Cell, _interleave, summarize
from .precision import (
    ADAM,
    FASTRMS_PRECISIONS,
    PrecisionVariant,
    first_step_error,
    state_bytes,
    values_for,
)
from .variants import (
    TORCH_STATE,
    Runner,
    _backend_problem,
    cuda_time,
    import_torch,
    simulated,
    torch_cuda_problem,
    torch_cuda_time,
    torch_cuda_why_not,
)

# -- models on CUDA ---------------------------------------------------------------------------

#: The models phase's (model, algorithm) runs, the issue's target first; and a tiny model for
#: the smoke run.
MODEL_RUNS = (("gpt2", "adam"), ("resnet50", "adam"), ("mlp", "adam"), ("gpt2", "rmsprop"))
SMOKE_SHAPES = {"fc0.weight": (6, 8), "fc0.bias": (6,), "fc1.weight": (2, 6), "fc1.bias": (2,)}
#: The fastrms variant on CUDA and the torch ones it is compared with, by name.
FASTRMS_CUDA = "cuda"
TORCH_CUDA_MODES = {"torch-cuda-fused": "fused", "torch-cuda-foreach": "foreach"}


def _fastrms_cuda_model(algo: cases.Algo, tensors: M.Tensors) -> Runner:
    """fastrms's optimizer class over Numba device copies of ``tensors``: one grouped step."""

    from ...optim import OPTIMIZERS

    names = list(tensors)
    params = [cuda.to_device(tensors[k]["param"]) for k in names]
    grads = [cuda.to_device(tensors[k]["grad"]) for k in names]
    opt = OPTIMIZERS[algo.rule](params, backend="cuda", **algo.options)
    launch = functools.partial(opt.step, grads)

    def step() -> None:
        launch()
        cuda.synchronize()

    def result() -> M.Tensors:
        return {
            k: {
                "param": params[i].copy_to_host(),
                **{s: opt.state[s][i].copy_to_host() for s in algo.state},
            }
            for i, k in enumerate(names)
        }

    return Runner(step, result, timer=functools.partial(cuda_time, launch), keep=(opt, grads))


def _torch_cuda_model(mode: str) -> Callable[[cases.Algo, M.Tensors], Runner]:
    def build(algo: cases.Algo, tensors: M.Tensors) -> Runner:
        torch = import_torch()
        params = {}
        for k, t in tensors.items():
            p = params[k] = torch.from_numpy(t["param"]).to("cuda")
            p.grad = torch.from_numpy(t["grad"]).to("cuda")
        opt = getattr(torch.optim, algo.torch_class)(
            list(params.values()), **algo.options, **{mode: True}
        )
        names = {s: TORCH_STATE.get(s, s) for s in algo.state}

        def step() -> None:
            opt.step()
            torch.cuda.synchronize()

        def result() -> M.Tensors:
            return {
                k: {
                    "param": p.cpu().numpy(),
                    **{s: opt.state[p][n].cpu().numpy() for s, n in names.items()},
                }
                for k, p in params.items()
            }

        timer = functools.partial(torch_cuda_time, opt.step)
        return Runner(step, result, timer=timer, keep=(opt, params))

    return build


def _model_variants(algo: cases.Algo) -> tuple[dict[str, tuple[str, Callable]], dict[str, str]]:
    """``({name: (label, build)}, {name: why not})`` of the models phase for ``algo``."""
    chosen, skipped = {}, {}
    why = _cuda_problem()
    if why:
        skipped[FASTRMS_CUDA] = why
    else:
        chosen[FASTRMS_CUDA] = ("fastrms cuda (grouped launch)", _fastrms_cuda_model)
    for name, mode in TORCH_CUDA_MODES.items():
        why = torch_cuda_why_not(mode)(algo)
        if why:
            skipped[name] = why
        else:
            chosen[name] = (f"torch {mode}, CUDA", _torch_cuda_model(mode))
    return chosen, skipped


def _cuda_problem() -> str | None:
    if simulated() and not _SMOKE[0]:
        return "the CUDA simulator is not benchmarked (NUMBA_ENABLE_CUDASIM=1)"
    return _backend_problem("cuda")


#: Whether this process runs a smoke phase (set by :func:`main`; allows the simulator).
_SMOKE = [False]


def measure_model_cuda(model: str, shapes: M.Shapes, algo_name: str, repeat: int) -> dict:
    """One step of ``algo_name`` over ``shapes`` on CUDA: each variant checked against the NumPy
    reference after one step from zero state, fastrms's launches counted over a step, then all
    timed interleaved with the flat same-pattern CUDA ceiling and a device-to-device copy of
    the step's bytes."""
    algo = cases.ALGOS[algo_name]
    size = M.model_size(shapes)
    chosen, skipped = _model_variants(algo)
    if not chosen:  # nothing to run here: no arrays, no reference
        return {"model": model, "algo": algo_name, "tensors": len(shapes), "parameters": size,
                "skipped": skipped}  # fmt: skip
    tensors = M.model_arrays(shapes)
    expected = M.model_reference(algo, tensors)
    checks, launches = {}, None
    for name, (_, build) in chosen.items():
        runner = build(algo, M.fresh_copies(tensors))
        runner.step()
        result = runner.result()
        problem = M.check_tensors(result, expected, exact=False)
        checks[name] = {"within_tolerance": problem is None, "problem": problem}
        if name == FASTRMS_CUDA:
            exact = M.check_tensors(result, expected, exact=True)
            checks[name]["bit_exact_with_numpy"] = exact is None
            checks[name]["first_difference"] = exact
            launches = count_step_launches(runner, tensors)
        del runner, result
    del expected
    good = {k: v for k, v in chosen.items() if checks[k]["within_tolerance"]}
    runners = {k: (label, build(algo, tensors)) for k, (label, build) in good.items()}
    if good:
        runners["cuda-ceiling"] = (
            "same-pattern CUDA ceiling, one flat array",
            ceilings.cuda_ceiling(algo, cases.make_arrays(algo, size)),
        )
        runners[ceilings.COPY] = (
            ceilings.COPY_LABEL,
            ceilings.cuda_copy_ceiling(algo.bytes_per_element() * size),
        )
    times = _interleave({k: r for k, (_, r) in runners.items()}, repeat) if runners else {}
    cells = [
        Cell(model, size, k, label, algo.bytes_per_element(), *times[k],
             check="passed" if k in checks else "n/a")
        for k, (label, _) in runners.items()
    ]  # fmt: skip
    summarize(cells, {k: "cuda" for k in runners})
    by = {c.variant: c for c in cells}
    ours = by.get(FASTRMS_CUDA)

    def versus(other: str) -> float | None:
        if ours is None or other not in by:
            return None
        theirs = by[other]
        return (theirs.best_s if "ceiling" in other else theirs.median_s) / ours.median_s

    return {
        "model": model,
        "algo": algo_name,
        "tensors": len(shapes),
        "parameters": size,
        "cells": [asdict(c) for c in cells],
        "checks": checks,
        "skipped": skipped,
        "launches": launches,
        "vs_torch_cuda_fused": versus("torch-cuda-fused"),
        "vs_torch_cuda_foreach": versus("torch-cuda-foreach"),
        "pct_cuda_ceiling": versus("cuda-ceiling"),
        "pct_copy": versus(ceilings.COPY),
    }


def count_step_launches(runner: Runner, tensors: M.Tensors) -> dict:
    """The kernel launches one fastrms step made, counted in numba-cuda's launch path, and the
    (dtype, device) groups its parameters form: the issue's target is at most 2 per group."""
    opt, _ = runner.keep
    groups = {(str(t["param"].dtype), 0) for t in tensors.values()}  # one device here
    with counting_launches() as n:
        runner.step()
    return {"per_step": n[0], "groups": len(groups), "per_group": n[0] / len(groups)}


# -- precision on CUDA ----------------------------------------------------------------------


def _fastrms_precision_cuda(param_dtype: str, **options) -> Callable[[M.Shapes, dict], Runner]:
    """fastrms's Adam class on Numba device copies of the values (bfloat16 as its patterns)."""

    def build(shapes: M.Shapes, values: dict) -> Runner:

        import fastrms

        from ...lowprecision import BFLOAT16

        bf16 = param_dtype == "bfloat16"

        def held(a: np.ndarray) -> np.ndarray:
            return a.astype(BFLOAT16).view(np.uint16) if bf16 else a

        params = [cuda.to_device(held(p)) for p, _ in values.values()]
        grads = [cuda.to_device(held(g)) for _, g in values.values()]
        opt = fastrms.Adam(params, backend="cuda", **ADAM, **options)
        launch = functools.partial(opt.step, grads)

        def step() -> None:
            launch()
            cuda.synchronize()

        def result() -> list[np.ndarray]:
            out = [d.copy_to_host() for d in params]
            return [a.view(BFLOAT16).astype(np.float32) if bf16 else a for a in out]

        return Runner(step, result, timer=functools.partial(cuda_time, launch), keep=opt)

    return build


def _torch_precision_cuda(dtype: str) -> Callable[[M.Shapes, dict], Runner]:
    def build(shapes: M.Shapes, values: dict) -> Runner:
        torch = import_torch()
        params = []
        for p, g in values.values():
            t = torch.from_numpy(p).to("cuda", getattr(torch, dtype))
            t.grad = torch.from_numpy(g).to("cuda", getattr(torch, dtype))
            params.append(t)
        opt = torch.optim.Adam(params, **ADAM, fused=True)

        def step() -> None:
            opt.step()
            torch.cuda.synchronize()

        def result() -> list[np.ndarray]:
            return [p.detach().float().cpu().numpy() for p in params]

        timer = functools.partial(torch_cuda_time, opt.step)
        return Runner(step, result, timer=timer, keep=opt)

    return build


def _ours(name: str, label: str, param_dtype: str, options: dict) -> PrecisionVariant:
    build = _fastrms_precision_cuda(param_dtype, **options)
    return PrecisionVariant(name, label, build, _cuda_problem, param_dtype)


def _theirs(name: str, label: str, dtype: str) -> PrecisionVariant:
    return PrecisionVariant(name, label, _torch_precision_cuda(dtype), torch_cuda_problem, dtype)


#: The precision phase's variants (the names of ``fastrms bench --precision``'s, on CUDA). A
#: variant fastrms refuses on CUDA is recorded with its refusal instead of a time.
CUDA_PRECISION_VARIANTS: dict[str, PrecisionVariant] = {
    v.name: v
    for v in (
        _theirs("torch-fused-f32", "torch fused Adam, float32, CUDA", "float32"),
        _theirs("torch-fused-bf16", "torch fused Adam, bf16 params, CUDA", "bfloat16"),
        *(_ours(name, f"fastrms cuda, {what}", *how) for name, (what, *how) in
          FASTRMS_PRECISIONS.items()),
    )
}  # fmt: skip
PRECISION_BASELINES = {"float32": "torch-fused-f32", "bfloat16": "torch-fused-bf16"}
#: GPT-2 small for the phase; a tensor past the 8-bit threshold and a small one when smoking.
PRECISION_SMOKE_SHAPES = {"w": (4160,), "b": (64,)}


#: Tensors whose first step is checked (:func:`first_step_error`, on the host, slow at GPT-2's
#: size): the first ones, GPT-2's embeddings and first blocks included.
CHECKED_TENSORS = 20


def measure_precision_cuda(
    model: str, shapes: M.Shapes, repeat: int, save: Callable[[dict], None] | None = None
) -> dict:
    """Adam at each precision on CUDA over ``shapes``, timed interleaved; each row's ratio to
    torch's fused Adam on float32 and on bfloat16 CUDA tensors, its state's bytes per parameter
    and its first step's error (:func:`fastrms.tools.bench.precision.first_step_error`)."""
    size = M.model_size(shapes)
    runners, errors, skipped = {}, {}, {}
    for name, v in CUDA_PRECISION_VARIANTS.items():
        why = v.why_not()
        if why:
            skipped[name] = why
    values = values_for(shapes) if len(skipped) < len(CUDA_PRECISION_VARIANTS) else {}
    for name, v in CUDA_PRECISION_VARIANTS.items():
        if name in skipped:
            continue
        try:  # what fastrms does not support on CUDA yet, it refuses before writing anything
            runner = v.build(shapes, values)
            runner.step()  # the first step allocates the state
        except (TypeError, ValueError) as error:
            skipped[name] = f"{type(error).__name__}: {error}"
            continue
        except Exception as error:  # a failure on the device: reported, the rest still run
            skipped[name] = "FAILED: " + _error(error)
            continue
        checked = dict(list(values.items())[:CHECKED_TENSORS])
        errors[name] = first_step_error(v, checked, runner.result()[:CHECKED_TENSORS])
        runners[name] = runner
    if save is not None:  # what is known before the timing, in case it is stopped
        save({"model": model, "size": size, "skipped": skipped, "first_step_errors": errors})
    times = _interleave(runners, repeat) if runners else {}
    medians = {k: float(np.median(ts)) for k, (_, ts) in times.items()}
    rows = []
    for name, (inner, ts) in times.items():
        v = CUDA_PRECISION_VARIANTS[name]
        row = {"variant": name, "label": v.label, "median_s": medians[name],
               "best_s": float(min(ts)), "times_s": [float(t) for t in ts], "inner": inner,
               "state_bytes_per_param": state_bytes(runners[name].keep) / size,
               "first_step_error": errors[name]}  # fmt: skip
        for dtype, base in PRECISION_BASELINES.items():
            key = "x_torch_fused_" + ("f32" if dtype == "float32" else "bf16")
            row[key] = medians[base] / medians[name] if base in medians else None
        rows.append(row)
    return {"model": model, "size": size, "tensors": len(shapes), "rows": rows,
            "skipped": skipped}  # fmt: skip


# -- fastrms.torch in a CUDA training loop ------------------------------------------------------

TORCH_LOOP_CASES = {
    "adam": ("fastrms-adam", "torch-adam-fused", "torch-adam-foreach"),
    "rmsprop": ("fastrms-rmsprop", "torch-rmsprop-foreach"),
}


def torch_loop(
    models: tuple[str, ...],
    device: str,
    repeats: int,
    steps: int,
    repo: str,
    save: Callable[[dict], None] | None = None,
) -> dict:
    """``bench/torch_loop.py``'s :func:`step_times` per model and algorithm on ``device``."""
    if repo not in sys.path:
        sys.path.append(repo)  # after the installed fastrms: only ``bench`` is wanted from it
    from bench import torch_loop as T

    rows: list[dict] = []
    for model in models:
        for algo, variants in TORCH_LOOP_CASES.items():
            t = T.step_times(model, variants, repeats=repeats, steps=steps, device=device)
            tensors, size = T.model_size(model)
            first = variants[0]
            rows.append({
                "model": model, "algo": algo, "tensors": tensors, "parameters": size,
                "median_step_s": t,
                "x_fastrms": {v: t[v] / t[first] for v in variants[1:]},
            })  # fmt: skip
            if save is not None:
                save({"device": device, "rows": rows})
    return {"device": device, "repeats": repeats, "steps": steps, "rows": rows}


def _error(error: BaseException) -> str:
    """An exception and where it was raised, on a few lines (the log has the rest)."""
    import traceback

    traceback.print_exception(error, file=sys.stderr)
    where = traceback.extract_tb(error.__traceback__)[-3:]
    return (
        f"{type(error).__name__}: {error} (at "
        + "; ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in where)
        + ")"
    )
