"""fastrms.Adam with 8-bit blockwise state (``state_dtype="int8"``) against float32 state and
``torch.optim.Adam(fused=True)`` in float32, in one process, interleaved (issue 18).

Every variant steps float32 parameters with float32 gradients; only the state differs:
float32 moments (28 B per element per step), or 8-bit codes with one float32 scale per 256
(about 16.1 B). Each repetition runs every variant once, in a rotating order; the report gives
each variant's median and, per repetition, its speed-up over torch fused (torch's time in that
repetition / the variant's), as a range over the repetitions, and the state's bytes per
parameter.

``--phases`` instead times each part of the int8 step on one thread, over 2^13 elements in
cache (ns per element): decoding each map, the Adam rule alone, the block absmax, encoding each
map, and, for comparison, the closed-form encoder and decoder of Dettmers' dynamic map
(:mod:`fastrms.kernels.codecs`), which the float8 map replaced.

Usage::

    python bench/int8_state_adam.py [--n 10000000] [--model gpt2] [--reps 9] [--threads 2]
    python bench/int8_state_adam.py --phases [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from numba import njit

from fastrms import precision
from fastrms.kernels import blockwise as bw
from fastrms.kernels import codecs as dynamic
from fastrms.kernels import rules
from fastrms.specs import SPECS

_N_CACHE = 1 << 13  # 128 KiB of Adam arrays: L2, so compute shows, not traffic


@njit(cache=True)
def _decode(codes, out, signed, reps):
    for _ in range(reps):
        if signed:
            for i in range(codes.size):
                out[i] = bw.decode_signed(codes[i], np.float32(0.5))
        else:
            for i in range(codes.size):
                out[i] = bw.decode_unsigned(codes[i], np.float32(0.5))


@njit(cache=True)
def _encode(x, codes, signed, reps):
    for _ in range(reps):
        if signed:
            for i in range(x.size):
                codes[i] = bw.encode_signed(x[i] * np.float32(0.9))
        else:
            for i in range(x.size):
                codes[i] = bw.encode_unsigned(x[i] * np.float32(0.9))


@njit(cache=True)
def _absmax(x, reps):
    m = np.uint32(0)
    for _ in range(reps):
        for b in range(0, x.size, 256):
            m = max(m, bw.absmax(x[b : b + 256], 256))
    return m


@njit(cache=True, error_model="numpy")
def _adam(p, g, m, v, hyper, reps):
    """fastrms's Adam rule (kernels.rules, as every kernel inlines it) over float32 arrays."""
    arrays = (p, g, m, v, p)
    for _ in range(reps):
        for i in range(p.size):
            rules.adam(i, arrays, hyper, (False,))


@njit(cache=True)
def _dynamic_encode(x, codes, reps):
    for _ in range(reps):
        for i in range(x.size):
            codes[i] = dynamic.encode_signed(x[i] * np.float32(0.9))


@njit(cache=True)
def _dynamic_decode(codes, out, reps):
    for _ in range(reps):
        for i in range(codes.size):
            out[i] = dynamic.decode_signed(codes[i], np.float32(0.5))


def phases(reps: int) -> None:
    """Time each part of the int8 step on one thread, in cache (see the module docstring)."""
    rng = np.random.default_rng(0)
    n = _N_CACHE
    x = np.clip(rng.standard_normal(n, dtype=np.float32) * 0.3, -1, 1).astype(np.float32)
    ax = np.abs(x)
    codes = rng.integers(0, 120, n).astype(np.uint8)
    out = np.empty(n, np.float32)
    p, g = x.copy(), x * np.float32(0.01)
    m, v = x * np.float32(0.1), ax * np.float32(1e-3)
    hyper = precision.cast("adam", SPECS["adam"].setup(2).scalars, np.dtype(np.float32))
    parts = {
        "decode signed": lambda r: _decode(codes, out, True, r),
        "decode unsigned": lambda r: _decode(codes, out, False, r),
        "Adam rule (f32, in cache)": lambda r: _adam(p, g, m, v, hyper, r),
        "block absmax": lambda r: _absmax(x, r),
        "encode signed": lambda r: _encode(x, codes, True, r),
        "encode unsigned": lambda r: _encode(ax, codes, False, r),
        "dynamic map encode": lambda r: _dynamic_encode(x, codes, r),
        "dynamic map decode": lambda r: _dynamic_decode(codes, out, r),
    }
    for run in parts.values():
        run(1)
    inner = 800
    times: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(reps):
        for name, run in parts.items():
            start = time.perf_counter()
            run(inner)
            times[name].append((time.perf_counter() - start) / inner / n * 1e9)
    print(f"ns per element, one thread, {n} elements in cache, {reps} interleaved repetitions")
    for name, ts in times.items():
        print(f"{name:28} median {statistics.median(ts):6.3f}  range {min(ts):.3f}-{max(ts):.3f}")


def steps(args) -> None:
    """Time the whole steps, interleaved (see the module docstring)."""
    import torch

    import fastrms
    from fastrms.tools.bench.models import MODELS

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    shapes = list(MODELS[args.model]().values()) if args.model else [(args.n,)]
    params = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    grads = [(rng.standard_normal(s, dtype=np.float32) * 1e-2) for s in shapes]
    total = sum(p.size for p in params)

    f32 = fastrms.Adam([p.copy() for p in params], lr=1e-3)
    int8 = fastrms.Adam([p.copy() for p in params], lr=1e-3, state_dtype="int8")
    tp = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    for t, g in zip(tp, grads):
        t.grad = torch.from_numpy(g)
    topt = torch.optim.Adam(tp, lr=1e-3, fused=True)
    variants = {
        "torch fused, f32 state": topt.step,
        "fastrms, f32 state": lambda: f32.step(grads),
        "fastrms, int8 state": lambda: int8.step(grads),
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
        "torch fused, f32 state": sum(
            s.nbytes for st in topt.state.values() for k, s in st.items() if k != "step"
        ),
        "fastrms, f32 state": f32._store.nbytes(),
        "fastrms, int8 state": int8._store.nbytes(),
    }
    base = times["torch fused, f32 state"]
    print(f"{'variant':24} {'ms med':>8} {'x torch med':>11} {'x torch range':>15} "
          f"{'state B/param':>13}")  # fmt: skip
    for name, ts in times.items():
        ratios = [b / t for b, t in zip(base, ts)]
        per_param = state_bytes[name] / total
        print(f"{name:24} {statistics.median(ts) * 1e3:8.2f} {statistics.median(ratios):11.2f} "
              f"{min(ratios):7.2f}-{max(ratios):.2f} {per_param:13.3f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--model", default=None, help="a model of fastrms.tools.bench.models")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2, help="torch's (set NUMBA_NUM_THREADS)")
    parser.add_argument("--phases", action="store_true", help="time each part, one thread")
    args = parser.parse_args()
    if args.phases:
        phases(args.reps)
    else:
        steps(args)


if __name__ == "__main__":
    main()
