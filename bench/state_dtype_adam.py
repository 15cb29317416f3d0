"""fastrms.Adam with bfloat16 state (``state_dtype="bfloat16"``) against float32 state and
``torch.optim.Adam(fused=True)`` in float32, in one process, interleaved (issue 18).

Every variant steps float32 parameters with float32 gradients; only the state differs:
float32 moments (28 B per element per step) or bfloat16 moments stored round-to-nearest-even
(20 B). Each repetition runs every variant once, in a rotating order; the report gives each
variant's median and, per repetition, its speed-up over torch fused (torch's time in that
repetition / the variant's), as a range over the repetitions.

Usage::

    python bench/state_dtype_adam.py [--n 10000000] [--model gpt2] [--reps 9] [--threads 2]

``--model gpt2`` steps GPT-2 small's 148 tensors (124.4M parameters) instead of one array;
``--n`` is then ignored.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import fastrms
from fastrms.tools.bench.models import MODELS


def _shapes(args) -> list[tuple]:
    if args.model:
        return list(MODELS[args.model]().values())
    return [(args.n,)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--model", choices=sorted(MODELS), default=None)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2, help="torch's (set NUMBA_NUM_THREADS)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    shapes = _shapes(args)
    params = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    grads = [(rng.standard_normal(s, dtype=np.float32) * 1e-2) for s in shapes]
    total = sum(p.size for p in params)

    f32 = fastrms.Adam([p.copy() for p in params], lr=1e-3)
    bf16 = fastrms.Adam([p.copy() for p in params], lr=1e-3, state_dtype="bfloat16")
    tp = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    for t, g in zip(tp, grads):
        t.grad = torch.from_numpy(g)
    topt = torch.optim.Adam(tp, lr=1e-3, fused=True)
    variants = {
        "torch fused, f32 state": topt.step,
        "fastrms, f32 state": lambda: f32.step(grads),
        "fastrms, bf16 state": lambda: bf16.step(grads),
    }
    for step in variants.values():  # compile, allocate the state
        step()
    times: dict[str, list[float]] = {v: [] for v in variants}
    names = list(variants)
    for rep in range(args.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    what = args.model or f"one array, n = {args.n:.0e}"
    print(f"Adam, {what} ({total / 1e6:.1f}M elements, {len(params)} tensors), "
          f"{args.threads} threads, {args.reps} interleaved repetitions")  # fmt: skip
    state_bytes = {
        "fastrms, f32 state": f32._store.nbytes(),
        "fastrms, bf16 state": bf16._store.nbytes(),
    }
    base = times["torch fused, f32 state"]
    print(
        f"{'variant':24} {'ms med':>8} {'x torch med':>11} {'x torch range':>15} {'state B/el':>10}"
    )
    for name, ts in times.items():
        ratios = [b / t for b, t in zip(base, ts)]
        sb = state_bytes.get(name, 8 * total)
        print(f"{name:24} {statistics.median(ts) * 1e3:8.2f} {statistics.median(ratios):11.2f} "
              f"{min(ratios):7.2f}-{max(ratios):.2f} {sb / total:10.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
