"""Optimizer steps inside a torch CPU training loop: ``fastrms.torch`` against ``torch.optim``.

:func:`step_times` builds one copy of a model per optimizer variant (the same initial weights),
then, repetition by repetition, runs a few training steps of each variant in turn (forward,
backward, ``opt.step()``, ``zero_grad``), timing only ``opt.step()``; it returns the median
step time of each variant. Interleaving the variants keeps their ratio stable on a shared
machine (see the notes on noise in the project's NOTES).

Models:

- ``"mlp"``: Linear 784-128-256-64-10 with ReLUs (the shapes of ``fastrms.models``' MLP),
  8 tensors, 150,602 parameters, trained on random batches of 64 (cross-entropy).
- ``"gpt2"`` / ``"gpt2-tiny"``: GPT-2's parameter shapes (``gpt2_shapes``), random gradients,
  no forward pass (a forward pass of GPT-2 small would dwarf the step on a CPU); ``"gpt2"``
  holds 124M parameters, about 1.5 GB per variant.

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

import torch

import fastrms.torch as ft
from fastrms import benchmarks as B
from fastrms.models import gpt2_shapes

#: Optimizer variants by name: each makes an optimizer over the given parameters.
VARIANTS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "fastrms-adam": lambda ps: ft.Adam(ps, lr=1e-3),
    "torch-adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
    "torch-adam-foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
    "fastrms-rmsprop": lambda ps: ft.RMSprop(ps, lr=1e-3),
    "torch-rmsprop-foreach": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, foreach=True),
}

MLP_SIZES = (784, 128, 256, 64, 10)
BATCH = 64
#: GPT-2 configurations: small, and the same structure scaled down for smoke tests.
GPT2 = {"gpt2": {}, "gpt2-tiny": dict(n_layer=2, n_embd=64, vocab=1000, n_positions=128)}


def mlp(seed: int = 0) -> torch.nn.Sequential:
    """The 8-tensor MLP (150,602 parameters)."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for a, b in zip(MLP_SIZES[:-1], MLP_SIZES[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


class _MlpLoop:
    """One variant's model, optimizer and data. ``prepare()`` runs the forward and backward
    pass, ``opt.step()`` the step; ``run()`` is one training step, timing the step."""

    def __init__(self, make: Callable, seed: int) -> None:
        self.model = mlp(seed)
        self.opt = make(list(self.model.parameters()))
        gen = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(BATCH, MLP_SIZES[0], generator=gen)
        self.y = torch.randint(0, MLP_SIZES[-1], (BATCH,), generator=gen)

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def prepare(self) -> None:
        self.opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()

    def run(self) -> float:
        self.prepare()
        t0 = time.perf_counter()
        self.opt.step()
        return time.perf_counter() - t0


class _ShapesLoop:
    """Parameters of the given shapes with fixed random gradients; ``run()`` times one step
    (``prepare()`` has nothing to do)."""

    def __init__(self, make: Callable, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.params = []
        for shape in shapes.values():
            p = torch.randn(shape, generator=gen).requires_grad_()
            p.grad = torch.randn(shape, generator=gen)
            self.params.append(p)
        self.opt = make(self.params)

    def prepare(self) -> None:
        pass

    def run(self) -> float:
        t0 = time.perf_counter()
        self.opt.step()
        return time.perf_counter() - t0


def make_loop(model: str, variant: str | Callable, seed: int = 0):
    """One training loop: ``model`` ("mlp", "gpt2-tiny", "gpt2") stepped by ``variant`` (a
    name from :data:`VARIANTS`, or a function of the parameter list making an optimizer).
    It has ``params``, ``opt``, ``prepare()`` and ``run()`` (which returns the step's time)."""
    make = VARIANTS[variant] if isinstance(variant, str) else variant
    if model == "mlp":
        return _MlpLoop(make, seed)
    if model not in GPT2:
        raise ValueError(f"model must be 'mlp' or one of {list(GPT2)}, got {model!r}")
    return _ShapesLoop(make, gpt2_shapes(**GPT2[model]), seed)


def model_size(model: str) -> tuple[int, int]:
    """``(tensors, parameters)`` of a model name."""
    if model == "mlp":
        ps = list(mlp().parameters())
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
    """
    import numba

    variants = list(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    with B.thread_count(threads or numba.config.NUMBA_NUM_THREADS):
        loops = {v: make_loop(model, v, seed) for v in variants}
        for loop in loops.values():
            for _ in range(warmup):
                loop.run()
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(repeats):
            for v, loop in loops.items():
                times[v] += [loop.run() for _ in range(steps)]
    return {v: statistics.median(t) for v, t in times.items()}


def main() -> None:  # pragma: no cover - a manual measurement
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--variants", default="fastrms-adam,torch-adam-fused")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", help="also write the times and the machine to this file")
    args = parser.parse_args()
    names = args.variants.split(",")
    t = step_times(args.model, names, repeats=args.repeats, steps=args.steps)
    tensors, size = model_size(args.model)
    print(f"{args.model}: {tensors} tensors, {size:,} parameters; median opt.step():")
    for v in names:
        print(f"  {v:24s} {t[v] * 1e6:10.1f} us   ({t[v] / t[names[0]]:.2f}x {names[0]})")
    if args.json:
        import json

        import numba

        from fastrms.report import machine_info

        result = {
            "command": "python -m bench.torch_loop " + " ".join(sys.argv[1:]),
            "model": args.model,
            "tensors": tensors,
            "parameters": size,
            "repeats": args.repeats,
            "steps": args.steps,
            "median_step_seconds": t,
            "machine": machine_info(numba.config.NUMBA_NUM_THREADS),
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":  # pragma: no cover
    main()
