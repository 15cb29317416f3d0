"""Prototype Adam steps on low-precision storage, built on fastrms.kernels.codecs, timed against
the same step in float32, in one process (issue 18; sizes the next step's kernel design).

Not fastrms's kernels: each variant is a hand-written Numba loop with the codecs inlined, so
that the cost of the storage shows and nothing else. Variants (bytes per element per step):

- ``f32``: p, g, m, v float32 (28 B), the baseline every ratio is against;
- ``f32 + bf16 state``: m, v bfloat16, rounded to nearest (20 B);
- ``bf16 all, stochastic``: p, g, m, v bfloat16, p rounded stochastically (14 B);
- ``f32 + int8 state``: m, v blockwise 8-bit (signed / unsigned map), one pass per block:
  decode, update, write p, keep the new m and v in a per-thread buffer of 256, then quantize
  the block (about 16.1 B);
- ``bf16 p,g + int8 state``: the same with bfloat16 p (stochastic) and g (about 10.1 B).

Usage::

    python bench/lowprecision_adam_proto.py [--n 10000000] [--reps 7]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numba
import numpy as np
from numba import njit, prange

from fastrms import lowprecision as lp
from fastrms.kernels import codecs
from fastrms.kernels._options import KERNEL_OPTIONS

BLOCK = codecs.BLOCK


@njit(parallel=True, **KERNEL_OPTIONS)
def adam_f32(p, g, m, v, h):
    lr, b1, c1, b2, c2, bc2, eps = h
    for i in prange(p.size):
        mi = b1 * m[i] + c1 * g[i]
        vi = b2 * v[i] + c2 * g[i] * g[i]
        m[i] = mi
        v[i] = vi
        p[i] -= lr * mi / (math.sqrt(vi) / bc2 + eps)


@njit(parallel=True, **KERNEL_OPTIONS)
def adam_bf16_state(p, g, m, v, h):
    lr, b1, c1, b2, c2, bc2, eps = h
    for i in prange(p.size):
        mi = b1 * codecs.bf16_load(m[i]) + c1 * g[i]
        vi = b2 * codecs.bf16_load(v[i]) + c2 * g[i] * g[i]
        m[i] = codecs.bf16_nearest(mi)
        v[i] = codecs.bf16_nearest(vi)
        p[i] -= lr * mi / (math.sqrt(vi) / bc2 + eps)


@njit(parallel=True, **KERNEL_OPTIONS)
def adam_bf16_all(p, g, m, v, h, key):
    lr, b1, c1, b2, c2, bc2, eps = h
    for i in prange(p.size):
        gi = codecs.bf16_load(g[i])
        mi = b1 * codecs.bf16_load(m[i]) + c1 * gi
        vi = b2 * codecs.bf16_load(v[i]) + c2 * gi * gi
        m[i] = codecs.bf16_nearest(mi)
        v[i] = codecs.bf16_nearest(vi)
        pi = codecs.bf16_load(p[i]) - lr * mi / (math.sqrt(vi) / bc2 + eps)
        p[i] = codecs.bf16_stochastic(pi, key, i)


@njit(parallel=True, **KERNEL_OPTIONS)
def adam_int8_state(p, g, mc, ms, vc, vs, h, scratch):
    lr, b1, c1, b2, c2, bc2, eps = h
    for b in prange(ms.size):
        start = b * BLOCK
        pb = p[start : min(start + BLOCK, p.size)]
        k = pb.size
        gb = g[start : start + k]
        mcb = mc[start : start + k]
        vcb = vc[start : start + k]
        buf = scratch[numba.get_thread_id()]
        mbuf = buf[0, :k]
        vbuf = buf[1, :k]
        m_scale = ms[b]
        v_scale = vs[b]
        for i in range(k):
            mi = b1 * codecs.decode_signed(mcb[i], m_scale) + c1 * gb[i]
            vi = b2 * codecs.decode_unsigned(vcb[i], v_scale) + c2 * gb[i] * gb[i]
            mbuf[i] = mi
            vbuf[i] = vi
            pb[i] -= lr * mi / (math.sqrt(vi) / bc2 + eps)
        ms[b] = codecs.quantize_block_signed(mbuf, mcb)
        vs[b] = codecs.quantize_block_unsigned(vbuf, vcb)


@njit(parallel=True, **KERNEL_OPTIONS)
def adam_bf16_int8(p, g, mc, ms, vc, vs, h, scratch, key):
    lr, b1, c1, b2, c2, bc2, eps = h
    for b in prange(ms.size):
        start = b * BLOCK
        pb = p[start : min(start + BLOCK, p.size)]
        k = pb.size
        gb = g[start : start + k]
        mcb = mc[start : start + k]
        vcb = vc[start : start + k]
        buf = scratch[numba.get_thread_id()]
        mbuf = buf[0, :k]
        vbuf = buf[1, :k]
        m_scale = ms[b]
        v_scale = vs[b]
        for i in range(k):
            gi = codecs.bf16_load(gb[i])
            mi = b1 * codecs.decode_signed(mcb[i], m_scale) + c1 * gi
            vi = b2 * codecs.decode_unsigned(vcb[i], v_scale) + c2 * gi * gi
            mbuf[i] = mi
            vbuf[i] = vi
            pi = codecs.bf16_load(pb[i]) - lr * mi / (math.sqrt(vi) / bc2 + eps)
            pb[i] = codecs.bf16_stochastic(pi, key, start + i)
        ms[b] = codecs.quantize_block_signed(mbuf, mcb)
        vs[b] = codecs.quantize_block_unsigned(vbuf, vcb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    n = args.n
    rng = np.random.default_rng(0)
    h = tuple(np.float32(s) for s in (1e-3, 0.9, 0.1, 0.999, 0.001, math.sqrt(1 - 0.999), 1e-8))
    g32 = (rng.standard_normal(n) * 1e-2).astype(np.float32)
    p32 = rng.standard_normal(n).astype(np.float32)
    m32 = (g32 * 0.1).astype(np.float32)
    v32 = (g32 * g32 * 1e-3).astype(np.float32)
    mc, ms = lp.quantize_blockwise(m32, True)
    vc, vs = lp.quantize_blockwise(v32, False)
    scratch = np.zeros((numba.config.NUMBA_NUM_THREADS, 2, BLOCK), np.float32)
    key = np.uint32(lp.step_key(0, 1))
    arrays = {
        "f32": (adam_f32, (p32.copy(), g32, m32.copy(), v32.copy(), h), 28),
        "f32 + bf16 state": (
            adam_bf16_state,
            (p32.copy(), g32, lp.round_nearest(m32), lp.round_nearest(v32), h),
            20,
        ),
        "bf16 all, stochastic": (
            adam_bf16_all,
            (
                lp.round_nearest(p32),
                lp.round_nearest(g32),
                lp.round_nearest(m32),
                lp.round_nearest(v32),
                h,
                key,
            ),
            14,
        ),
        "f32 + int8 state": (
            adam_int8_state,
            (p32.copy(), g32, mc.copy(), ms.copy(), vc.copy(), vs.copy(), h, scratch),
            8 + 4 + 2 + 2 + 16 / BLOCK,
        ),
        "bf16 p,g + int8 state": (
            adam_bf16_int8,
            (
                lp.round_nearest(p32),
                lp.round_nearest(g32),
                mc.copy(),
                ms.copy(),
                vc.copy(),
                vs.copy(),
                h,
                scratch,
                key,
            ),
            4 + 2 + 2 + 2 + 16 / BLOCK,
        ),
    }
    for fn, call_args, _ in arrays.values():
        fn(*call_args)
    threads = sorted({1, numba.config.NUMBA_NUM_THREADS}, reverse=True)
    times = {(name, t): [] for name in arrays for t in threads}
    for rep in range(args.reps):
        order = list(arrays)
        order = order[rep % len(order) :] + order[: rep % len(order)]
        for t in threads:
            numba.set_num_threads(t)
            for name in order:
                fn, call_args, _ = arrays[name]
                start = time.perf_counter()
                fn(*call_args)
                times[name, t].append(time.perf_counter() - start)
    numba.set_num_threads(max(threads))
    print(f"n = {n}, {args.reps} interleaved repetitions; speed-up = f32 time / variant time")
    print(f"{'variant':24} {'thr':>3} {'B/el':>5} {'ms med':>7} {'GB/s':>6} {'speed-up':>8} range")
    for t in threads:
        base = times["f32", t]
        for name, (_, _, nbytes) in arrays.items():
            ts = times[name, t]
            ratios = [b / x for b, x in zip(base, ts)]
            med = statistics.median(ts)
            print(
                f"{name:24} {t:>3} {nbytes:5.1f} {med * 1e3:7.2f} {nbytes * n / med / 1e9:6.1f} "
                f"{statistics.median(ratios):8.2f} {min(ratios):.2f}-{max(ratios):.2f}"
            )


if __name__ == "__main__":
    main()
