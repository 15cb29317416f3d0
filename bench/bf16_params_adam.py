"""fastrms.Adam on bfloat16 parameters (``rounding=``, ``state_dtype=``) against float32
fastrms Adam and ``torch.optim.Adam(fused=True)`` on float32 and on bfloat16 parameters, in one
process, interleaved (issue 18).

Bytes per element per step (in place): float32 params, grads and state 28; bfloat16 params and
grads with float32 state 22 (+4 for a Kahan buffer); bfloat16 everything 14 (+4 Kahan).
Each repetition runs every variant once, in a rotating order; the report gives each variant's
median time and, per repetition, its speed-up over torch fused float32 (torch's time in that
repetition / the variant's), as a median and a range over the repetitions, the ratio of the
fastest repetitions (torch's minimum / the variant's: the least disturbed by other processes
on a shared machine), and the state's bytes per element.

Usage::

    python bench/bf16_params_adam.py [--n 10000000] [--model gpt2] [--reps 9] [--threads 2]
                                     [--runs 1]

``--model gpt2`` steps GPT-2 small's 148 tensors (124.4M parameters) instead of one array of
``--n``. ``--runs`` repeats the whole measurement in the same process (a table per run).

``--in-cache`` instead times the bare serial kernels (no Python around them) over 2^16
elements, in cache, one thread, and prints the best of 300 calls in ns per element: the
compute cost of each variant's loop, which bounds it where memory does not.
"""

from __future__ import annotations

import argparse
import statistics
import time

import ml_dtypes
import numpy as np
import torch

import fastrms
import fastrms.specs
from fastrms.tools.bench.models import MODELS

BF16 = np.dtype(ml_dtypes.bfloat16)


def _variants(shapes: list[tuple]) -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    p32 = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    g32 = [rng.standard_normal(s, dtype=np.float32) * np.float32(1e-2) for s in shapes]
    p16, g16 = [p.astype(BF16) for p in p32], [g.astype(BF16) for g in g32]
    n = sum(p.size for p in p32)
    variants, state_bytes = {}, {}

    def torch_fused(dtype):
        ts = [torch.nn.Parameter(torch.from_numpy(p.copy()).to(dtype)) for p in p32]
        for t, g in zip(ts, g32):
            t.grad = torch.from_numpy(g).to(dtype)
        opt = torch.optim.Adam(ts, lr=1e-3, fused=True)
        return opt.step

    variants["torch fused, f32"] = torch_fused(torch.float32)
    variants["torch fused, bf16 params"] = torch_fused(torch.bfloat16)
    f32 = fastrms.Adam([p.copy() for p in p32], lr=1e-3)
    variants["fastrms f32"] = lambda: f32.step(g32)
    opts = {"fastrms f32": f32}
    for state in (None, "bfloat16"):
        for rounding in ("stochastic", "nearest", "kahan"):
            opt = fastrms.Adam([p.copy() for p in p16], lr=1e-3, rounding=rounding,
                               state_dtype=state)  # fmt: skip
            name = f"bf16 p, {'bf16' if state else 'f32'} st, {rounding}"
            variants[name] = lambda opt=opt: opt.step(g16)
            opts[name] = opt
    for name, opt in opts.items():
        opt.step(g32 if name == "fastrms f32" else g16)  # compile, allocate the state
        state_bytes[name] = opt._store.nbytes() / n
    for step in variants.values():
        step()
    return variants, state_bytes


def in_cache(n: int = 1 << 16, reps: int = 300) -> None:
    """The best time per element of each variant's serial kernel over ``n`` elements."""
    from fastrms.grouped import StepPlan

    rng = np.random.default_rng(0)
    setup = fastrms.specs.SPECS["adam"].setup(1)
    keep, calls = [], {}
    variants = [("f32 params, f32 state", np.float32, np.float32, None),
                ("f32 params, bf16 state", np.float32, BF16, None)]  # fmt: skip
    for state in (np.float32, BF16):
        for rounding in ("stochastic", "nearest", "kahan"):
            name = f"bf16 params, {'bf16' if state == BF16 else 'f32'} state, {rounding}"
            variants.append((name, BF16, state, rounding))
    for name, pd, sd, rounding in variants:
        p = rng.standard_normal(n).astype(pd)
        g = (rng.standard_normal(n) * 1e-2).astype(pd)
        st = {"exp_avg": [np.zeros(n, sd)], "exp_avg_sq": [np.zeros(n, sd)]}
        if rounding == "kahan":
            st["kahan_comp"] = [np.zeros(n, BF16)]
        plan = StepPlan(setup, [p], st, ["p"], "cpu", parallel_threshold=1 << 62, team=None,
                        state_dtype="bfloat16" if sd == BF16 else None,
                        **({"rounding": rounding} if rounding else {}))  # fmt: skip
        plan.run([g], setup, 1)
        keep.append((p, g, st))  # the kernel call holds their addresses
        calls[name] = plan.kernel_calls(setup)[0]
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(reps):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"Adam serial kernel, {n} elements in cache, 1 thread, best of {reps}")
    for name, t in best.items():
        print(f"{name:38} {t / n * 1e9:6.3f} ns/element")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--model", choices=sorted(MODELS), default=None)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2, help="torch's (set NUMBA_NUM_THREADS)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--in-cache", action="store_true")
    args = parser.parse_args()
    if args.in_cache:
        in_cache()
        return
    torch.set_num_threads(args.threads)
    shapes = list(MODELS[args.model]().values()) if args.model else [(args.n,)]
    variants, state_bytes = _variants(shapes)
    what = f"{args.model}, {len(shapes)} tensors" if args.model else "one array"
    total = sum(int(np.prod(s)) for s in shapes)
    names = list(variants)
    for run in range(args.runs):
        times: dict[str, list[float]] = {v: [] for v in variants}
        for rep in range(args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                start = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - start)
        print(f"run {run + 1}: Adam, {what}, n = {total:.3g}, {args.threads} threads, "
              f"{args.reps} interleaved repetitions")  # fmt: skip
        base = times["torch fused, f32"]
        print(f"{'variant':28} {'ms med':>8} {'ms min':>8} {'x torch med':>11} "
              f"{'x torch range':>15} {'x min/min':>9} {'state B/el':>10}")  # fmt: skip
        for name, ts in times.items():
            ratios = [b / t for b, t in zip(base, ts)]
            sb = state_bytes.get(name, float("nan"))
            print(f"{name:28} {statistics.median(ts) * 1e3:8.2f} {min(ts) * 1e3:8.2f} "
                  f"{statistics.median(ratios):11.2f} {min(ratios):7.2f}-{max(ratios):.2f} "
                  f"{min(base) / min(ts):9.2f} {sb:10.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
