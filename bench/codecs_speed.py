"""Throughput of the low-precision codecs (issue 18) against plain copies, in one process.

Each loop streams ``n`` float32 values through one codec of :mod:`fastrms.kernels.codecs`;
the variants run interleaved, repetition by repetition, on 2 threads and on 1, so their ratios
are comparable even on a shared machine:

- ``copy f32``: ``out[i] = x[i]`` (8 B per element), the stream ceiling;
- ``copy f32->u8 (linear)``: a per-block absmax, then ``uint8(|x| * 127 / absmax)``, the same
  memory pattern as the 8-bit quantizer with the cheapest possible code (5 B + scales);
- ``quantize int8 signed`` / ``unsigned``: :func:`quantize_block_signed` / ``_unsigned`` per
  block of 256, codes and scales written (5 B + 4 B per 256);
- ``dequantize int8 signed``: :func:`decode_signed`, codes and scales to float32 (5 B);
- ``copy f32->u16 (truncate)``: the top 16 bits of each float32, the bf16 store's pattern (6 B);
- ``bf16 nearest`` / ``bf16 stochastic``: :func:`bf16_nearest` / :func:`bf16_stochastic` (6 B).

It also reports, from ``dispatcher.inspect_llvm()``, the widest float vector each kernel's IR
holds and whether it uses gathers, to show which inner loops vectorize. Usage::

    python bench/codecs_speed.py [--n 10000000] [--reps 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import numba
import numpy as np
from numba import njit, prange

from fastrms.kernels import codecs
from fastrms.kernels._options import KERNEL_OPTIONS

BLOCK = codecs.BLOCK


@njit(parallel=True, **KERNEL_OPTIONS)
def copy_f32(x, out):
    for i in prange(x.size):
        out[i] = x[i]


@njit(parallel=True, **KERNEL_OPTIONS)
def copy_linear_u8(x, codes, scales):
    for b in prange(scales.size):
        start = b * BLOCK
        xb = x[start : min(start + BLOCK, x.size)]
        cb = codes[start : start + xb.size]
        m = codecs.absmax(xb)
        scales[b] = m
        inv = np.float32(127) / m if m > 0 else np.float32(0)
        for i in range(xb.size):
            cb[i] = np.uint8(abs(xb[i]) * inv)


@njit(parallel=True, **KERNEL_OPTIONS)
def quantize_signed(x, codes, scales):
    for b in prange(scales.size):
        start = b * BLOCK
        xb = x[start : min(start + BLOCK, x.size)]
        scales[b] = codecs.quantize_block_signed(xb, codes[start : start + xb.size])


@njit(parallel=True, **KERNEL_OPTIONS)
def quantize_unsigned(x, codes, scales):
    for b in prange(scales.size):
        start = b * BLOCK
        xb = x[start : min(start + BLOCK, x.size)]
        scales[b] = codecs.quantize_block_unsigned(xb, codes[start : start + xb.size])


@njit(parallel=True, **KERNEL_OPTIONS)
def dequantize_signed(codes, scales, out):
    for b in prange(scales.size):
        start = b * BLOCK
        cb = codes[start : min(start + BLOCK, codes.size)]
        ob = out[start : start + cb.size]
        scale = scales[b]
        for i in range(cb.size):
            ob[i] = codecs.decode_signed(cb[i], scale)


@njit(parallel=True, **KERNEL_OPTIONS)
def copy_truncate_u16(x, out):
    for i in prange(x.size):
        out[i] = np.uint16(np.float32(x[i]).view(np.uint32) >> np.uint32(16))


@njit(parallel=True, **KERNEL_OPTIONS)
def bf16_nearest(x, out):
    for i in prange(x.size):
        out[i] = codecs.bf16_nearest(x[i])


@njit(parallel=True, **KERNEL_OPTIONS)
def bf16_stochastic(x, out, key):
    for i in prange(x.size):
        out[i] = codecs.bf16_stochastic(x[i], key, i)


def _ir_summary(dispatcher) -> str:
    ir = dispatcher.inspect_llvm(dispatcher.signatures[0])
    widths = [int(w) for w in re.findall(r"<(\d+) x (?:float|i8|i16|i32|i64)>", ir)]
    gathers = len(re.findall(r"masked\.gather", ir))
    return f"widest vector {max(widths, default=1)} lanes, {gathers} gathers"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    n = args.n
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n).astype(np.float32)
    f32 = np.empty(n, np.float32)
    u16 = np.empty(n, np.uint16)
    u8 = np.empty(n, np.uint8)
    scales = np.empty(-(-n // BLOCK), np.float32)
    key = np.uint32(0x12345678)
    quantize_signed(x, u8, scales)
    coded = u8.copy()
    coded_scales = scales.copy()
    sb = scales.nbytes
    variants = {
        "copy f32": (copy_f32, (x, f32), 8 * n),
        "copy f32->u8 (linear)": (copy_linear_u8, (x, u8, scales), 5 * n + sb),
        "quantize int8 signed": (quantize_signed, (x, u8, scales), 5 * n + sb),
        "quantize int8 unsigned": (quantize_unsigned, (np.abs(x), u8, scales), 5 * n + sb),
        "dequantize int8 signed": (dequantize_signed, (coded, coded_scales, f32), 5 * n + sb),
        "copy f32->u16 (truncate)": (copy_truncate_u16, (x, u16), 6 * n),
        "bf16 nearest": (bf16_nearest, (x, u16), 6 * n),
        "bf16 stochastic": (bf16_stochastic, (x, u16, key), 6 * n),
    }
    for fn, call_args, _ in variants.values():
        fn(*call_args)  # compile
    threads = sorted({1, numba.config.NUMBA_NUM_THREADS}, reverse=True)
    times = {(name, t): [] for name in variants for t in threads}
    for rep in range(args.reps):
        order = list(variants)
        order = order[rep % len(order) :] + order[: rep % len(order)]
        for t in threads:
            numba.set_num_threads(t)
            for name in order:
                fn, call_args, _ = variants[name]
                start = time.perf_counter()
                fn(*call_args)
                times[name, t].append(time.perf_counter() - start)
    numba.set_num_threads(max(threads))
    rows = []
    for t in threads:
        copy_median = statistics.median(times["copy f32", t])
        for name, (fn, _, nbytes) in variants.items():
            ts = times[name, t]
            rows.append(
                {
                    "variant": name,
                    "threads": t,
                    "gbps_median": nbytes / statistics.median(ts) / 1e9,
                    "gbps_min": nbytes / max(ts) / 1e9,
                    "gbps_max": nbytes / min(ts) / 1e9,
                    "ns_per_element": statistics.median(ts) / n * 1e9,
                    "elements_vs_copy": copy_median / statistics.median(ts),
                    "ir": _ir_summary(fn),
                }
            )
    print(f"n = {n}, {args.reps} interleaved repetitions; GB/s = bytes moved / time")
    header = f"{'variant':28} {'thr':>3} {'GB/s med':>8} {'range':>13} {'ns/el':>6} {'el/copy':>7}"
    print(header + "  IR")
    for r in rows:
        rng_s = f"{r['gbps_min']:.1f}-{r['gbps_max']:.1f}"
        print(
            f"{r['variant']:28} {r['threads']:>3} {r['gbps_median']:8.1f} {rng_s:>13} "
            f"{r['ns_per_element']:6.2f} {r['elements_vs_copy']:7.2f}  {r['ir']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": n, "reps": args.reps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
