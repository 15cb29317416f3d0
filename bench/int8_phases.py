"""The parts of an Adam step with 8-bit blockwise state (``state_dtype="int8"``), timed one
by one on one thread, over 2^13 elements in cache, in ns per element (issue 18): decoding each
map, the Adam rule alone, the block absmax, encoding each map, and, for comparison, the
closed-form encoder and decoder of Dettmers' dynamic map (:mod:`fastrms.kernels.codecs`), which
the float8 map replaced. The whole step against torch and the other precisions is
``fastrms bench --precision`` (its "bound by" column says what limits each variant).

Usage::

    python bench/int8_phases.py [--reps 7]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    phases(parser.parse_args().reps)


if __name__ == "__main__":
    main()
