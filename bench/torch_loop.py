"""Optimizer steps inside a torch CPU training loop: ``fastrms.torch`` against ``torch.optim``.

:func:`step_times` builds one copy of a model per optimizer variant (the same initial weights),
then, repetition by repetition, runs a few training steps of each variant in turn (forward,
backward, ``opt.step()``, ``zero_grad``), timing only ``opt.step()``; it returns the median
step time of each variant. Interleaving the variants keeps their ratio stable on a shared
machine (see the notes on noise in the project's NOTES).

Models:

- ``"mlp"``: Linear 784-128-256-64-10 with ReLUs (the shapes of the MLP of
  ``fastrms.tools.bench.models``),
  8 tensors, 150,602 parameters, trained on random batches of 64 (cross-entropy);
  ``"mlp:784-512-1024-256-10"`` gives other widths, and :func:`sweep` scales them.
- ``"gpt2"`` / ``"gpt2-tiny"``: GPT-2's parameter shapes (``gpt2_shapes``), random gradients,
  no forward pass (a forward pass of GPT-2 small would dwarf the step on a CPU); ``"gpt2"``
  holds 124M parameters, about 1.5 GB per variant.

Variants (:data:`VARIANTS`): ``fastrms.torch`` optimizers (also on Numba's threads instead of
torch's), ``torch.optim``'s, and the floor (:class:`Floor`): torch's step wrapper around the
bare kernel call, the least any ``torch.optim``-compatible step with fastrms's kernels costs.

``device="cuda"`` (``--device cuda``) runs the loop on CUDA tensors instead, timing each step
by CUDA events on torch's current stream (the step only queues work there); the floor
variants are CPU-only.

Example::

    from bench.torch_loop import step_times
    t = step_times("mlp", ["fastrms-adam", "torch-adam-fused"])
    print(t["torch-adam-fused"] / t["fastrms-adam"])
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch

import fastrms.torch as ft
from fastrms.tools.bench.models import gpt2_shapes
from fastrms.tools.bench.variants import thread_count, torch_cuda_time


class Floor(torch.optim.Optimizer):
    """The least a ``torch.optim`` step with fastrms's kernels can cost: torch's step wrapper
    (profiler label, hooks) around the bare grouped kernel call of ``inner``'s plan, with no
    check and no state bookkeeping. Not an optimizer to train with: its scalars stay those of
    step 1 and it ignores the parameters' groups.

    ``inner`` (a ``fastrms.torch`` optimizer over ``params``, one CPU bucket) takes one step
    here on zero gradients, to make its plan.
    """

    def __init__(self, params: list[torch.Tensor], inner: Callable) -> None:
        super().__init__(params, {})
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = inner(params)
        opt.step()
        (run,) = opt._last.runs
        (self._group,) = run.plan.groups
        self._call = self._group.kernel_call(self._group.cast(self._group.setup))
        self._params = params

    def step(self, closure: Callable | None = None) -> None:
        self._group.set_grads(np.array([p.grad.data_ptr() for p in self._params], np.int64))
        self._call()


class _NumbaThreads:
    """A fastrms.torch optimizer whose parallel steps run on Numba's threads, not torch's."""

    _torch_team = False


class NumbaThreadsAdam(_NumbaThreads, ft.Adam):
    pass


class NumbaThreadsRMSprop(_NumbaThreads, ft.RMSprop):
    pass


#: Optimizer variants by name: each makes an optimizer over the given parameters.
VARIANTS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "fastrms-adam": lambda ps: ft.Adam(ps, lr=1e-3),
    "fastrms-adam-numba-threads": lambda ps: NumbaThreadsAdam(ps, lr=1e-3),
    "torch-adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
    "torch-adam-foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
    "floor-adam": lambda ps: Floor(ps, lambda q: ft.Adam(q, lr=1e-3)),
    "fastrms-rmsprop": lambda ps: ft.RMSprop(ps, lr=1e-3),
    "fastrms-rmsprop-numba-threads": lambda ps: NumbaThreadsRMSprop(ps, lr=1e-3),
    "torch-rmsprop-foreach": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, foreach=True),
    "floor-rmsprop": lambda ps: Floor(ps, lambda q: ft.RMSprop(q, lr=1e-3)),
}

MLP_SIZES = (784, 128, 256, 64, 10)
BATCH = 64
#: GPT-2 configurations: small, and the same structure scaled down for smoke tests.
GPT2 = {"gpt2": {}, "gpt2-tiny": dict(n_layer=2, n_embd=64, vocab=1000, n_positions=128)}


def mlp(seed: int = 0, sizes: tuple[int, ...] = MLP_SIZES) -> torch.nn.Sequential:
    """The MLP of layer widths ``sizes``: by default the 8-tensor one (150,602 parameters)."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


class _MlpLoop:
    """One variant's model, optimizer and data. ``prepare()`` runs the forward and backward
    pass, ``opt.step()`` the step; ``run()`` is one training step, timing the step."""

    def __init__(
        self, make: Callable, seed: int, sizes: tuple[int, ...], device: str = "cpu"
    ) -> None:
        self.model = mlp(seed, sizes).to(device)
        self.opt = make(list(self.model.parameters()))
        gen = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(BATCH, sizes[0], generator=gen).to(device)
        self.y = torch.randint(0, sizes[-1], (BATCH,), generator=gen).to(device)
        self.device = device

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def prepare(self) -> None:
        self.opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()

    def run(self) -> float:
        self.prepare()
        return timed_step(self.opt, self.device)


class _ShapesLoop:
    """Parameters of the given shapes with fixed random gradients; ``run()`` times one step
    (``prepare()`` has nothing to do)."""

    def __init__(
        self, make: Callable, shapes: dict[str, tuple[int, ...]], seed: int, device: str = "cpu"
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.params = []
        for shape in shapes.values():
            p = torch.randn(shape, generator=gen).to(device).requires_grad_()
            p.grad = torch.randn(shape, generator=gen).to(device)
            self.params.append(p)
        self.opt = make(self.params)
        self.device = device

    def prepare(self) -> None:
        pass

    def run(self) -> float:
        return timed_step(self.opt, self.device)


def timed_step(opt: torch.optim.Optimizer, device: str) -> float:
    """Seconds of one ``opt.step()``: by the host clock on the CPU; on CUDA by CUDA events on
    torch's current stream, after the work queued before it (forward, backward) has run."""
    if torch.device(device).type != "cuda":
        t0 = time.perf_counter()
        opt.step()
        return time.perf_counter() - t0
    torch.cuda.synchronize()
    return torch_cuda_time(opt.step, 1)


def check_device(device: str, variants: Iterable[str] = ()) -> str:
    """``device`` ("cpu" or "cuda", or "cuda:N") if this loop can run there, else ValueError
    naming what is wrong: an unknown device, torch without CUDA, or a CPU-only variant."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r} ({error})") from None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r}: torch {torch.__version__} sees no CUDA device"
                + ("" if torch.version.cuda else " (built without CUDA)")
            )
        host_only = [v for v in variants if isinstance(v, str) and v.startswith("floor-")]
        if host_only:
            raise ValueError(f"variants {host_only} run on the CPU only, not on {device!r}")
    return device


def mlp_sizes(model: str) -> tuple[int, ...] | None:
    """The layer widths of an MLP model name ("mlp", or "mlp:784-512-1024-256-10"), else
    None."""
    if model == "mlp":
        return MLP_SIZES
    if model.startswith("mlp:"):
        try:
            sizes = tuple(int(w) for w in model[4:].split("-"))
        except ValueError:
            sizes = ()
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"an MLP is 'mlp:' and two or more widths (mlp:784-64-10): {model!r}")
        return sizes
    return None


def make_loop(model: str, variant: str | Callable, seed: int = 0, device: str = "cpu"):
    """One training loop: ``model`` ("mlp", "mlp:W0-W1-...", "gpt2-tiny", "gpt2") stepped by
    ``variant`` (a name from :data:`VARIANTS`, or a function of the parameter list making an
    optimizer), on ``device`` ("cpu" or "cuda"). It has ``params``, ``opt``, ``prepare()`` and
    ``run()`` (which returns the step's time)."""
    check_device(device, [variant])
    make = VARIANTS[variant] if isinstance(variant, str) else variant
    sizes = mlp_sizes(model)
    if sizes is not None:
        return _MlpLoop(make, seed, sizes, device)
    if model not in GPT2:
        raise ValueError(f"model must be 'mlp', 'mlp:W0-W1-...' or one of {list(GPT2)}, "
                         f"got {model!r}")  # fmt: skip
    return _ShapesLoop(make, gpt2_shapes(**GPT2[model]), seed, device)


def model_size(model: str) -> tuple[int, int]:
    """``(tensors, parameters)`` of a model name."""
    sizes = mlp_sizes(model)
    if sizes is not None:
        ps = list(mlp(0, sizes).parameters())
        return len(ps), sum(p.numel() for p in ps)
    shapes = gpt2_shapes(**GPT2[model])
    return len(shapes), sum(torch.Size(s).numel() for s in shapes.values())


def step_times(
    model: str = "mlp",
    variants: Iterable[str] = ("fastrms-adam", "torch-adam-fused"),
    *,
    repeats: int = 15,
    steps: int = 10,
    warmup: int = 3,
    threads: int | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, float]:
    """Median seconds of one ``opt.step()`` per variant, measured interleaved in this process.

    Parameters
    ----------
    model : {"mlp", "gpt2-tiny", "gpt2"}
    variants : names from :data:`VARIANTS`
    repeats, steps : each repetition runs ``steps`` timed steps of every variant in turn; the
        median is over all ``repeats * steps`` steps of a variant.
    warmup : untimed steps of each variant first (compilation, first-touch allocation).
    threads : torch's and Numba's thread count (default: Numba's, all cores).
    device : "cpu" or "cuda" (CUDA tensors, each step timed by CUDA events).
    """
    import numba

    variants = list(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    check_device(device, variants)
    with thread_count(threads or numba.config.NUMBA_NUM_THREADS):
        loops = {v: make_loop(model, v, seed, device) for v in variants}
        for loop in loops.values():
            for _ in range(warmup):
                loop.run()
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(repeats):
            for v, loop in loops.items():
                times[v] += [loop.run() for _ in range(steps)]
    return {v: statistics.median(t) for v, t in times.items()}


#: Hidden widths of the MLP are scaled by these in :func:`sweep` (1 is the 150,602 model).
SWEEP_SCALES = (0.125, 0.25, 0.5, 1, 2, 4, 8)
SWEEP_VARIANTS = ("fastrms-adam", "fastrms-adam-numba-threads", "torch-adam-fused", "floor-adam")


def sweep(
    variants: Iterable[str] = SWEEP_VARIANTS,
    scales: Iterable[float] = SWEEP_SCALES,
    *,
    repeats: int = 10,
    steps: int = 10,
    progress: Callable[[str], None] = print,
) -> list[dict]:
    """:func:`step_times` of the MLP with its hidden widths scaled by each of ``scales``; one
    row per model: ``{"model", "parameters", "median_step_seconds": {variant: s}}``."""
    rows = []
    inner = MLP_SIZES[1:-1]
    for scale in scales:
        widths = (MLP_SIZES[0], *(max(1, round(w * scale)) for w in inner), MLP_SIZES[-1])
        model = "mlp:" + "-".join(map(str, widths))
        t = step_times(model, variants, repeats=repeats, steps=steps)
        rows.append({"model": model, "parameters": model_size(model)[1],
                     "median_step_seconds": t})  # fmt: skip
        progress(f"{model:32s} {rows[-1]['parameters']:>10,} parameters: "
                 + ", ".join(f"{v} {x * 1e6:.0f} us" for v, x in t.items()))  # fmt: skip
    return rows


def plot_sweep(
    rows: list[dict], path: str, baseline: str = "torch-adam-fused", target: float | None = 2.5
) -> None:
    """Step time against model size, and each variant's speed-up over ``baseline`` (with the
    issue's ``target`` for the MLP as a line)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    times, ratios = fig.subplots(1, 2)
    sizes = [r["parameters"] for r in rows]
    base = [r["median_step_seconds"][baseline] for r in rows]
    for k, v in enumerate(rows[0]["median_step_seconds"]):
        t = [r["median_step_seconds"][v] for r in rows]
        style = dict(ls="--" if v.startswith("floor") else "-", marker="o", color=f"C{k}")
        times.plot(sizes, [x * 1e6 for x in t], label=v, **style)
        if v != baseline:
            ratios.plot(sizes, [b / x for b, x in zip(base, t)], label=v, **style)
    times.set(xscale="log", yscale="log", xlabel="parameters (8 tensors)",
              ylabel="median opt.step() in the loop (us)",
              title="Adam step in a torch CPU training loop")  # fmt: skip
    ratios.axhline(1.0, color="gray", lw=0.8)
    if target:
        ratios.axhline(target, color="gray", lw=0.8, ls=":", label=f"target {target}x")
    ratios.set(xscale="log", xlabel="parameters (8 tensors)",
               ylabel=f"speed-up over {baseline} (higher is faster)",
               title="floor: torch's step wrapper + the bare kernel")  # fmt: skip
    for ax in (times, ratios):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


#: Parameters of :func:`layout_times`: ``n`` float32 elements each, in several layouts.
LAYOUTS: dict[str, Callable[[int], torch.Tensor]] = {
    "contiguous": lambda n: torch.randn(n),
    "transposed (dense)": lambda n: torch.randn(1000, n // 1000).t(),
    "channels_last (dense)": lambda n: torch.randn(n // 4096, 64, 8, 8).to(
        memory_format=torch.channels_last
    ),
    "stride 2 (gathered)": lambda n: torch.randn(n, 2)[:, 0],
    "complex64 (real view)": lambda n: torch.randn(n // 2, dtype=torch.complex64),
}


def layout_times(n: int = 1 << 20, repeats: int = 30, threads: int | None = None) -> dict:
    """Median seconds of ``fastrms.torch.Adam``'s step on one parameter of ``n`` float32
    elements (real view) in each of :data:`LAYOUTS`, and of ``torch.optim.Adam``'s
    (``foreach=False``, the implementation that takes every layout) on the same, interleaved
    step by step, gradients in the parameter's layout."""
    import numba

    with thread_count(threads or numba.config.NUMBA_NUM_THREADS):
        opts = {}
        for layout, make in LAYOUTS.items():
            for kind, cls, kw in (("fastrms", ft.Adam, {}),
                                  ("torch", torch.optim.Adam, {"foreach": False})):  # fmt: skip
                p = torch.nn.Parameter(make(n))
                p.grad = torch.randn_like(p, memory_format=torch.preserve_format)
                opts[(layout, kind)] = cls([p], lr=1e-3, **kw)
        for opt in opts.values():
            for _ in range(3):
                opt.step()
        times: dict = {k: [] for k in opts}
        for _ in range(repeats):
            for k, opt in opts.items():
                t0 = time.perf_counter()
                opt.step()
                times[k].append(time.perf_counter() - t0)
    return {f"{layout} / {kind}": statistics.median(t) for (layout, kind), t in times.items()}


def main() -> None:  # pragma: no cover - a manual measurement
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--variants", default="fastrms-adam,torch-adam-fused")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", help="also write the times and the machine to this file")
    parser.add_argument(
        "--sweep", action="store_true", help="time the MLP at several widths (SWEEP_SCALES) instead"
    )
    parser.add_argument("--plot", help="with --sweep: draw it to this image file")
    parser.add_argument(
        "--layouts",
        type=int,
        metavar="N",
        help="time Adam on one parameter of N elements in each layout (LAYOUTS) instead",
    )
    parser.add_argument("--threads", type=int, help="with --layouts: the thread count")
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda: where the model and its optimizer run"
    )
    args = parser.parse_args()  # fmt: skip
    try:
        check_device(args.device, args.variants.split(","))
    except ValueError as error:
        parser.error(f"--device: {error}")
    if args.layouts:
        t = layout_times(args.layouts, repeats=args.repeats * args.steps, threads=args.threads)
        base = t["contiguous / fastrms"]
        for k, x in t.items():
            print(f"  {k:40s} {x * 1e6:10.1f} us   ({x / base:.2f}x contiguous / fastrms)")
        if args.json:
            _write_json(args, {"layouts": args.layouts, "median_step_seconds": t})
        return
    if args.sweep:
        names = args.variants.split(",") if "--variants" in sys.argv else list(SWEEP_VARIANTS)
        rows = sweep(names, repeats=args.repeats, steps=args.steps)
        if args.plot:
            plot_sweep(rows, args.plot)
        if args.json:
            _write_json(args, {"sweep": rows})
        return
    names = args.variants.split(",")
    t = step_times(args.model, names, repeats=args.repeats, steps=args.steps, device=args.device)
    tensors, size = model_size(args.model)
    print(f"{args.model}: {tensors} tensors, {size:,} parameters; median opt.step():")
    for v in names:
        print(f"  {v:30s} {t[v] * 1e6:10.1f} us   ({t[v] / t[names[0]]:.2f}x {names[0]})")
    if args.json:
        _write_json(args, {"model": args.model, "tensors": tensors, "parameters": size,
                           "device": args.device, "median_step_seconds": t})  # fmt: skip


def _write_json(args, result: dict) -> None:  # pragma: no cover - a manual measurement
    import json

    import numba

    from fastrms.tools.bench.render import machine_info

    result = {
        "command": "python -m bench.torch_loop " + " ".join(sys.argv[1:]),
        **result,
        "repeats": args.repeats,
        "steps": args.steps,
        "machine": machine_info(numba.config.NUMBA_NUM_THREADS),
        # Whether fastrms.torch ran its parallel CPU steps on torch's OpenMP team.
        "torch_openmp_team": ft._torch_team() is not None,
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


if __name__ == "__main__":  # pragma: no cover
    main()
