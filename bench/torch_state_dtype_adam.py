"""fastrms.torch.Adam with bfloat16 state (``state_dtype="bfloat16"``) against float32 state
and ``torch.optim.Adam(fused=True)`` in float32, in one process, interleaved (issue 18).

As the bf16-state row of ``fastrms bench --precision``, through fastrms.torch's step (its
repeat route, on torch's OpenMP team): every variant steps its own copy of the float32
parameters with the same float32 gradients; only the optimizer and the state differ. Each
repetition runs every variant once, in a rotating order; the report gives each variant's median
and, per repetition, its speed-up over torch fused (torch's time in that repetition / the
variant's), as a range.

Usage::

    python bench/torch_state_dtype_adam.py [--model gpt2] [--n 10000000] [--reps 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import fastrms.torch as ft
from fastrms.tools.bench.models import MODELS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--model", choices=sorted(MODELS), default=None)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2, help="torch's threads (the team's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    shapes = list(MODELS[args.model]().values()) if args.model else [(args.n,)]
    params = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    grads = [torch.from_numpy(rng.standard_normal(s, dtype=np.float32) * 1e-2) for s in shapes]
    total = sum(p.size for p in params)

    def tensors() -> list[torch.Tensor]:
        ts = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
        for t, g in zip(ts, grads):
            t.grad = g
        return ts

    opts = {
        "torch fused, f32 state": torch.optim.Adam(tensors(), lr=1e-3, fused=True),
        "fastrms.torch, f32 state": ft.Adam(tensors(), lr=1e-3),
        "fastrms.torch, bf16 state": ft.Adam(tensors(), lr=1e-3, state_dtype="bfloat16"),
    }
    for opt in opts.values():  # compile, allocate the state
        opt.step()
    times: dict[str, list[float]] = {v: [] for v in opts}
    names = list(opts)
    for rep in range(args.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            start = time.perf_counter()
            opts[name].step()
            times[name].append(time.perf_counter() - start)
    what = args.model or f"one array, n = {args.n:.0e}"
    print(f"Adam, {what} ({total / 1e6:.1f}M elements, {len(params)} tensors), "
          f"{args.threads} threads, {args.reps} interleaved repetitions")  # fmt: skip
    print(
        f"{'variant':26} {'ms med':>8} {'x torch med':>11} {'x torch range':>15} {'state B/el':>10}"
    )
    base = times["torch fused, f32 state"]
    for name, ts in times.items():
        ratios = [b / t for b, t in zip(base, ts)]
        state = opts[name].state.values()
        nbytes = sum(v.nbytes for st in state for k, v in st.items() if k != "step")
        print(f"{name:26} {statistics.median(ts) * 1e3:8.2f} {statistics.median(ratios):11.2f} "
              f"{min(ratios):7.2f}-{max(ratios):.2f} {nbytes / total:10.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
