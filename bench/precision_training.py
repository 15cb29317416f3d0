"""Real training at low precision: loss against step for each precision variant of fastrms.torch.

Two tasks, both on data that ships with the installed packages (nothing is downloaded):

- ``mlp``: a 64-256-256-10 MLP on scikit-learn's handwritten digits (1,797 8x8 images, 1,437
  for training, 360 held out), minibatches of 64, cross-entropy.
- ``charlm``: a 2-layer character-level transformer (width 128, 4 heads, context 64, batches
  of 16) on the Python Language Reference as the interpreter ships it (``pydoc_data.topics``,
  ~465,000 characters; the last 10% held out), next-character cross-entropy.

Each variant trains the same model from the same initial weights on the same batches with
``fastrms.torch.AdamW``; only how the parameters and the state are held differs:

=========================================  ===============================================
``float32``                                float32 parameters and state (the baseline)
``int8 state``                             float32 parameters, ``state_dtype="int8"``
``bf16 state``                             float32 parameters, ``state_dtype="bfloat16"``
``bf16 params, stochastic``                bfloat16 parameters, ``rounding="stochastic"``
``bf16 params, nearest``                   bfloat16 parameters, ``rounding="nearest"``
``bf16 params, kahan``                     bfloat16 parameters, ``rounding="kahan"``
``bf16 params + int8 state (stochastic)``  bfloat16 parameters, ``rounding="stochastic"``,
                                           ``state_dtype="int8"``
=========================================  ===============================================

A bfloat16 model runs its forward and backward passes in bfloat16 (its loss in float32). The
report gives each variant's final held-out loss and its ratio to float32's, and the plot
(``--plot``, default ``docs/precision.png``) the training loss (a moving mean) against step.
A variant the installed fastrms refuses is reported with its error and left out of the plot::

    python bench/precision_training.py --json bench/results/precision-training.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

import fastrms
import fastrms.torch as ft

#: The variants: (name, parameter dtype, optimizer keywords).
VARIANTS = (
    ("float32", torch.float32, {}),
    ("int8 state", torch.float32, {"state_dtype": "int8"}),
    ("bf16 state", torch.float32, {"state_dtype": "bfloat16"}),
    ("bf16 params, stochastic", torch.bfloat16, {"rounding": "stochastic"}),
    ("bf16 params, nearest", torch.bfloat16, {"rounding": "nearest"}),
    ("bf16 params, kahan", torch.bfloat16, {"rounding": "kahan"}),
    ("bf16 params + int8 state (stochastic)", torch.bfloat16,
     {"rounding": "stochastic", "state_dtype": "int8"}),
)  # fmt: skip


@dataclass
class Task:
    """A model factory, a batch sampler and a held-out loss, with the optimizer's settings."""

    name: str
    title: str
    make_model: object
    batch: object  # batch(step, dtype) -> (inputs, targets)
    held_out: object  # held_out(model, dtype) -> float
    steps: int
    lr: float
    weight_decay: float = 0.01
    extra: dict = field(default_factory=dict)


# -- the digits MLP ------------------------------------------------------------------------------


def digits_task(steps: int) -> Task:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = torch.from_numpy(x[order]), torch.from_numpy(y[order])
    cut = int(0.8 * len(x))
    train_x, train_y, test_x, test_y = x[:cut], y[:cut], x[cut:], y[cut:]
    picks = torch.from_numpy(np.random.default_rng(1).integers(0, cut, size=(steps, 64)))

    def make_model() -> nn.Module:
        return nn.Sequential(
            nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10)
        )

    def batch(step: int, dtype: torch.dtype):
        rows = picks[step]
        return train_x[rows].to(dtype), train_y[rows]

    def held_out(model: nn.Module, dtype: torch.dtype) -> float:
        with torch.no_grad():
            return nn.functional.cross_entropy(model(test_x.to(dtype)).float(), test_y).item()

    return Task("mlp", "MLP on scikit-learn digits", make_model, batch, held_out, steps, 1e-3)


# -- the character-level transformer -------------------------------------------------------------


class CharTransformer(nn.Module):
    def __init__(
        self, vocab: int, width: int = 128, heads: int = 4, layers: int = 2, context: int = 64
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(context, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        h = self.embed(tokens) + self.position[:n]
        mask = self.mask[:n, :n].to(h.dtype)
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))


def charlm_task(steps: int, context: int = 64, batch_size: int = 16) -> Task:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    chars = sorted(set(text))
    codes = torch.tensor([chars.index(c) for c in text], dtype=torch.int64)
    cut = int(0.9 * len(codes))
    train, test = codes[:cut], codes[cut:]
    starts = torch.from_numpy(
        np.random.default_rng(1).integers(0, cut - context - 1, size=(steps, batch_size))
    )
    test_starts = torch.arange(0, len(test) - context - 1, (len(test) - context - 1) // 64)[:64]

    def windows(source: torch.Tensor, at: torch.Tensor):
        index = at[:, None] + torch.arange(context + 1)
        chunk = source[index]
        return chunk[:, :-1], chunk[:, 1:]

    def make_model() -> nn.Module:
        return CharTransformer(len(chars), context=context)

    def batch(step: int, dtype: torch.dtype):
        return windows(train, starts[step])

    def held_out(model: nn.Module, dtype: torch.dtype) -> float:
        x, y = windows(test, test_starts)
        with torch.no_grad():
            logits = model(x).float()
            return nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
            ).item()

    return Task(
        "charlm",
        "character transformer on the Python reference",
        make_model,
        batch,
        held_out,
        steps,
        2e-3,
    )


def loss_of(model: nn.Module, x, y) -> torch.Tensor:
    logits = model(x).float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def train(task: Task, dtype: torch.dtype, options: dict, initial: dict) -> dict:
    """Train one variant from ``initial`` weights; return its losses, or the refusal."""
    model = task.make_model()
    model.load_state_dict(initial)
    model.to(dtype)
    try:
        opt = ft.AdamW(model.parameters(), lr=task.lr, weight_decay=task.weight_decay, **options)
    except (TypeError, ValueError) as error:
        return {"refused": f"{type(error).__name__}: {error}"}
    losses, started = [], time.perf_counter()
    report_every = max(1, task.steps // 10)
    for step in range(task.steps):
        x, y = task.batch(step, dtype)
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % report_every == 0:
            print(
                f"    step {step + 1}/{task.steps}  loss {np.mean(losses[-report_every:]):.4f}",
                flush=True,
            )
    return {
        "train_loss": losses,
        "held_out_loss": task.held_out(model, dtype),
        "seconds": time.perf_counter() - started,
        "state_bytes": sum(
            t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
        ),
    }


def smooth(values: list[float], width: int) -> np.ndarray:
    kernel = np.ones(width) / width
    return np.convolve(values, kernel, mode="valid")


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, runs in zip(axes[0], results.values()):
        for name, run in runs["variants"].items():
            if "train_loss" not in run:
                continue
            width = max(1, len(run["train_loss"]) // 25)
            curve = smooth(run["train_loss"], width)
            style = "-" if name == "float32" else ("--" if "state" in name else ":")
            ax.plot(
                np.arange(len(curve)) + width,
                curve,
                style,
                label=f"{name} ({run['held_out_loss']:.3f})",
            )
        ax.set_title(runs["title"])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (moving mean); legend: held-out loss")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle("fastrms.torch.AdamW: float32 against low-precision parameters and state")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="mlp,charlm", help="comma-separated: mlp, charlm")
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default: per task)")
    parser.add_argument("--variants", default="all", help="comma-separated variant names, or all")
    parser.add_argument("--plot", default="docs/precision.png", help="PNG path ('' for none)")
    parser.add_argument("--json", help="write the losses and the final ratios here")
    args = parser.parse_args()

    makers = {"mlp": (digits_task, 600), "charlm": (charlm_task, 400)}
    chosen = [v for v in VARIANTS if args.variants == "all" or v[0] in args.variants.split(",")]
    results = {}
    for name in args.tasks.split(","):
        make, default_steps = makers[name]
        task = make(args.steps or default_steps)
        torch.manual_seed(0)
        initial = task.make_model().state_dict()
        print(f"{task.title}: {task.steps} steps, {len(chosen)} variants", flush=True)
        runs = {}
        for variant, dtype, options in chosen:
            print(f"  {variant}", flush=True)
            torch.manual_seed(0)
            runs[variant] = train(task, dtype, options, initial)
            if "refused" in runs[variant]:
                print(f"    refused: {runs[variant]['refused']}")
        results[name] = {"title": task.title, "steps": task.steps, "variants": runs}

    print("\nfinal held-out loss, and its ratio to float32's")
    for name, runs in results.items():
        base = runs["variants"].get("float32", {}).get("held_out_loss")
        for variant, run in runs["variants"].items():
            if "held_out_loss" in run:
                ratio = run["held_out_loss"] / base if base else math.nan
                run["ratio_to_float32"] = ratio
                print(f"  {name:7s} {variant:26s} {run['held_out_loss']:.4f}  {ratio:.4f}")
            else:
                print(f"  {name:7s} {variant:26s} refused")
    if args.plot:
        plot(results, args.plot)
    if args.json:
        meta = {
            "fastrms": fastrms.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
