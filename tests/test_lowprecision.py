"""Low-precision storage (issue 18): the NumPy reference (fastrms.lowprecision) against
independent oracles (ml_dtypes, brute-force nearest codes, statistics), and the Numba codecs
(fastrms.kernels.codecs) bit for bit against the reference, driven by small test-only loops."""

from __future__ import annotations

import re

import ml_dtypes
import numba
import numpy as np
import pytest
from numba import njit, prange

from fastrms import lowprecision as lp
from fastrms.kernels import codecs

BF16 = np.dtype(ml_dtypes.bfloat16)
BLOCK = lp.BLOCK


# -- test-only drivers of the codecs -------------------------------------------------------------


@njit
def _bf16_load(b, out):
    for i in range(b.size):
        out[i] = codecs.bf16_load(b[i])


@njit
def _bf16_nearest(x, out):
    for i in range(x.size):
        out[i] = codecs.bf16_nearest(x[i])


@njit
def _bf16_stochastic(x, out, key, start):
    for i in range(x.size):
        out[i] = codecs.bf16_stochastic(x[i], key, start + i)


@njit(parallel=True)
def _bf16_stochastic_parallel(x, out, key):
    for i in prange(x.size):
        out[i] = codecs.bf16_stochastic(x[i], key, i)


@njit
def _kahan(p, k, delta, p_out, k_out):
    for i in range(p.size):
        p_out[i], k_out[i] = codecs.kahan_add(p[i], k[i], delta[i])


@njit
def _encode(y, out, signed):
    for i in range(y.size):
        out[i] = codecs.encode_signed(y[i]) if signed else codecs.encode_unsigned(y[i])


@njit
def _quantize(x, codes, scales, signed):
    for b in range(scales.size):
        start = b * BLOCK
        xb = x[start : min(start + BLOCK, x.size)]
        cb = codes[start : start + xb.size]
        if signed:
            scales[b] = codecs.quantize_block_signed(xb, cb)
        else:
            scales[b] = codecs.quantize_block_unsigned(xb, cb)


@njit
def _dequantize(codes, scales, out, signed):
    for b in range(scales.size):
        start = b * BLOCK
        cb = codes[start : min(start + BLOCK, codes.size)]
        ob = out[start : start + cb.size]
        for i in range(cb.size):
            if signed:
                ob[i] = codecs.decode_signed(cb[i], scales[b])
            else:
                ob[i] = codecs.decode_unsigned(cb[i], scales[b])


def codec_quantize(x, signed):
    codes = np.empty(x.size, np.uint8)
    scales = np.empty(lp.n_blocks(x.size), np.float32)
    _quantize(x, codes, scales, signed)
    return codes, scales


def codec_dequantize(codes, scales, signed):
    out = np.empty(codes.size, np.float32)
    _dequantize(codes, scales, out, signed)
    return out


def random_patterns(n, seed=0):
    """float32 values from uniformly random bit patterns: every exponent, both signs,
    subnormals, Inf and NaN (with payloads) included."""
    return np.random.default_rng(seed).integers(0, 2**32, n, dtype=np.uint32).view(np.float32)


def wide_values(n, seed=0):
    """Normal values times scales spread over 25 orders of magnitude."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * np.exp(rng.uniform(-40, 18, n))).astype(np.float32)


def ulps(a, b):
    """|a - b| in float32 ulps of b (computed in float64)."""
    b = np.asarray(b, np.float32)
    return np.abs(np.float64(1) * a - b) / np.spacing(np.abs(b)).astype(np.float64)


# -- the codecs' constants are the reference's ---------------------------------------------------


def test_codec_constants_match_the_reference():
    assert codecs.BLOCK == lp.BLOCK == 256
    assert codecs.HASH_MULTIPLIER == lp.HASH_MULTIPLIER
    assert [v.view(np.uint32) for v in codecs.DECADES] == [v.view(np.uint32) for v in lp.DECADES]
    assert lp.MIN_8BIT_SIZE == 4096
    assert not lp.uses_8bit(4095) and lp.uses_8bit(4096)


# -- bfloat16 ------------------------------------------------------------------------------------


def test_bf16_widening_is_exact_for_every_pattern():
    bits = np.arange(2**16, dtype=np.uint16)
    expected = bits.view(BF16).astype(np.float32)
    ref = lp.bf16_to_float32(bits)
    out = np.empty(bits.size, np.float32)
    _bf16_load(bits, out)
    assert np.array_equal(ref.view(np.uint32), expected.view(np.uint32))
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))
    assert np.array_equal(lp.bf16_to_float32(bits.view(BF16)).view(np.uint32), ref.view(np.uint32))


def test_round_nearest_matches_ml_dtypes_and_the_codec():
    x = np.concatenate(
        [
            random_patterns(1 << 20),
            np.array([0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 3.4e38, -3.4e38], np.float32),
            # ties: the dropped half is exactly 0x8000, with an even and an odd bf16 below
            np.array([0x3F808000, 0x3F818000, 0x7F7F8000, 0x00008000], np.uint32).view(np.float32),
        ]
    )
    with np.errstate(all="ignore"):
        expected = x.astype(BF16).view(np.uint16)
    ref = lp.round_nearest(x)
    out = np.empty(x.size, np.uint16)
    _bf16_nearest(x, out)
    assert np.array_equal(ref, expected)
    assert np.array_equal(out, ref)


def test_nan_rule_keeps_the_sign_and_drops_the_payload():
    nans = np.array([0x7F800001, 0xFF800001, 0x7FC12345, 0xFFFFFFFF], np.uint32).view(np.float32)
    assert list(lp.round_nearest(nans)) == [0x7FC0, 0xFFC0, 0x7FC0, 0xFFC0]
    assert list(lp.round_stochastic(nans, key=123)) == [0x7FC0, 0xFFC0, 0x7FC0, 0xFFC0]
    inf = np.array([np.inf, -np.inf], np.float32)
    assert (
        list(lp.round_stochastic(np.repeat(inf, 1000), key=5)) == [0x7F80] * 1000 + [0xFF80] * 1000
    )


@pytest.mark.parametrize("start", [0, 12345, 2**32 - 1000])  # the last crosses 2^32
def test_round_stochastic_codec_is_the_reference(start):
    x = random_patterns(1 << 18, seed=1)
    key = lp.step_key(seed=7, step=3)
    out = np.empty(x.size, np.uint16)
    _bf16_stochastic(x, out, key, start)
    assert np.array_equal(out, lp.round_stochastic(x, key, start))


def test_round_stochastic_is_between_the_two_neighbours():
    x = wide_values(1 << 16, seed=2)
    down = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncation of the magnitude
    r = lp.round_stochastic(x, lp.step_key(0, 0))
    assert np.all((r == down) | (r == down + 1))
    exact = (x.view(np.uint32) & 0xFFFF) == 0
    assert np.array_equal(r[exact], down[exact])  # representable values never move


def test_round_stochastic_is_unbiased():
    """Elements sitting a fraction f of a bf16 ulp above a bf16 value, rounded at 20,000 steps
    (keys): the share rounded up estimates f. With independent uniform draws the count is
    Binomial(T, f), so the share lies within 5 standard deviations, sqrt(f(1-f)/T) <= 0.0036,
    of f except with probability 6e-7 per element; a draw skewed by even 2% of the range (or
    truncation, or nearest rounding) fails."""
    steps = 20_000
    fractions = np.array([1, 655, 16384, 32768, 50000, 65535], np.uint32)  # in 2^-16 ulp
    signs = np.array([0, 0x80000000], np.uint32)
    base = np.array([0x3F800000, 0x00400000, 0x4B000000], np.uint32)  # 1, a subnormal, 2^23
    bits = (base[:, None, None] | signs[None, :, None]) + fractions[None, None, :]
    x = bits.ravel().view(np.float32)
    index = np.arange(x.size) * 1_000_003  # spread over the index space
    up = np.zeros(x.size)
    for step in range(steps):
        key = lp.step_key(seed=11, step=step)
        r = random_bits_round(x, key, index)
        up += r != (x.view(np.uint32) >> 16)
    f = np.tile(fractions / 2**16, base.size * signs.size)
    sigma = np.sqrt(f * (1 - f) / steps)
    assert np.all(np.abs(up / steps - f) <= 5 * sigma + 1 / steps)


def random_bits_round(x, key, index):
    """round_stochastic for elements at arbitrary global indices (one call per element)."""
    u = x.view(np.uint32).astype(np.uint64)
    return ((u + lp.random_bits(key, index)) >> np.uint64(16)).astype(np.uint16)


def test_random_bits_wrap_at_2_to_the_32():
    index = np.array([0, 5, 2**31 + 7])
    key = lp.step_key(1, 2)
    assert np.array_equal(lp.random_bits(key, index), lp.random_bits(key, index + 2**32))


def test_random_bits_are_uniform_within_one_step():
    r = lp.random_bits(lp.step_key(3, 9), np.arange(1 << 20))
    assert r.min() >= 0 and r.max() < 2**16
    counts = np.bincount(r >> 8, minlength=256)  # 256 bins of 4096 expected
    assert np.all(np.abs(counts - 4096) < 5 * np.sqrt(4096))


def test_same_seed_same_bits_other_seed_other_bits():
    """Values whose dropped fractions f spread evenly over [0, 3/4): two independent draws
    round one apart with probability 2 f (1 - f), 0.375 on average. Within one step the
    draws of neighbouring elements form a structured (Weyl-like) sequence, so for one pair of
    keys the share apart scatters more than a binomial would (measured: standard deviation
    0.021 over 300 pairs, range 0.22-0.50); over 40 pairs its mean is within 4.5 of its
    standard deviations (0.015) of 0.375, and every pair differs on at least 15%."""
    x = (np.float32(1) + np.arange(1 << 16, dtype=np.float32) * np.float32(2**-24)) * 3
    a = lp.round_stochastic(x, lp.step_key(seed=1, step=5))
    assert np.array_equal(a, lp.round_stochastic(x, lp.step_key(seed=1, step=5)))
    others = [lp.step_key(2, 5), lp.step_key(1, 6), lp.step_key(1, 5, stream=1)]
    others += [lp.step_key(100 + t, t) for t in range(37)]
    apart = np.array([np.mean(a != lp.round_stochastic(x, key)) for key in others])
    assert np.all(apart > 0.15)
    assert abs(apart.mean() - 0.375) < 0.015
    keys = {lp.step_key(i, j, k) for i in range(32) for j in range(32) for k in range(8)}
    assert len(keys) == 32 * 32 * 8
    assert lp.step_key(1, 5) == lp.step_key(1, 5, stream=0) != lp.step_key(1, 5, stream=1)


def test_stochastic_bits_do_not_depend_on_chunking_or_threads():
    x = wide_values(300_001, seed=3)
    key = lp.step_key(seed=5, step=1)
    whole = lp.round_stochastic(x, key)
    cuts = [0, 17, 4096, 99_999, 250_000, x.size]
    chunks = [lp.round_stochastic(x[a:b], key, start=a) for a, b in zip(cuts, cuts[1:])]
    assert np.array_equal(np.concatenate(chunks), whole)
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            out = np.empty(x.size, np.uint16)
            _bf16_stochastic_parallel(x, out, key)
            assert np.array_equal(out, whole), threads
    finally:
        numba.set_num_threads(before)


def test_kahan_codec_is_the_reference():
    rng = np.random.default_rng(4)
    n = 1 << 18
    p = lp.round_nearest(rng.standard_normal(n).astype(np.float32))
    k = lp.round_nearest((rng.standard_normal(n) * 1e-3).astype(np.float32))
    delta = (rng.standard_normal(n) * np.exp(rng.uniform(-20, 0, n))).astype(np.float32)
    delta[:4] = [np.nan, np.inf, -np.inf, 0]
    p_ref, k_ref = lp.kahan_add(p, k, delta)
    p_out, k_out = np.empty(n, np.uint16), np.empty(n, np.uint16)
    _kahan(p, k, delta, p_out, k_out)
    assert np.array_equal(p_out, p_ref) and np.array_equal(k_out, k_ref)
    # the compensation holds what the parameter dropped: p' + k' = p + k + delta up to the
    # rounding of k' to bf16 (half an ulp, 2^-8 relative) and of u and u - (p' - p) to float32
    total = lp.bf16_to_float32(p_ref).astype(np.float64) + lp.bf16_to_float32(k_ref)
    k_old = lp.bf16_to_float32(k).astype(np.float64)
    exact = lp.bf16_to_float32(p) + k_old + delta
    k_new = np.abs(lp.bf16_to_float32(k_ref))
    bound = 2**-8 * k_new + 2**-22 * (np.abs(k_old) + np.abs(delta) + k_new)
    ok = np.isfinite(exact)
    assert np.all(np.abs(total - exact)[ok] <= bound[ok])


def test_small_increments_move_under_stochastic_and_kahan_not_nearest():
    """A parameter at 1.0 gains 0.001 per step, an eighth of a bf16 ulp (2^-7): after 1000
    steps nearest rounding has not moved it, stochastic rounding and Kahan summation have
    carried it to about 2.0."""
    steps, delta = 1000, np.float32(0.001)
    x = np.ones(64, np.float32)  # 64 parameters
    nearest = stochastic = kahan = lp.round_nearest(x)
    comp = np.zeros(64, np.uint16)
    for step in range(steps):
        nearest = lp.round_nearest(lp.bf16_to_float32(nearest) + delta)
        key = lp.step_key(seed=0, step=step)
        stochastic = lp.round_stochastic(lp.bf16_to_float32(stochastic) + delta, key)
        kahan, comp = lp.kahan_add(kahan, comp, np.full(64, delta))
    target = 1 + steps * float(delta)
    assert np.all(lp.bf16_to_float32(nearest) == 1)
    # stochastic: a sum of 1000 rounding errors, each of standard deviation <= half an ulp
    # (<= 2^-7 near 2): 5 standard deviations of the sum is 5 * sqrt(1000) * 2^-8 = 0.62
    assert np.all(np.abs(lp.bf16_to_float32(stochastic) - target) < 0.62)
    assert abs(np.mean(lp.bf16_to_float32(stochastic)) - target) < 0.62 / np.sqrt(64) + 2**-7
    assert np.all(np.abs(lp.bf16_to_float32(kahan) - target) <= 2**-7)


# -- the dynamic map -----------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_layout(signed):
    m = lp.dynamic_map(signed)
    assert m.dtype == np.float32 and m.size == 256
    assert np.all(np.diff(m) > 0) and m[-1] == 1
    assert m[lp.zero_code(signed)] == 0
    if signed:
        assert np.array_equal(m[:127], -m[128:255][::-1])  # symmetric but for +1
        assert m[0] > -1
    # the decades: k = 2^(d+off) values in [10^(d-7), 10^(d-6)) for d = 0 ... 6
    q = lp.magnitudes(signed)
    per_decade = [np.sum((q >= 10.0 ** (d - 7)) & (q < 10.0 ** (d - 6))) for d in range(7)]
    assert per_decade == [2 ** (d + (0 if signed else 1)) for d in range(7)]


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes_formula(signed):
    """bitsandbytes' create_dynamic_map(signed, 7, 8), evaluated in float64: the midpoints of
    linspace(0.1, 1, k + 1) times 10^(d-6), plus 0 and 1 (and the negatives when signed).
    Ours round twice (10^(d-7) to float32, then the product), so they are within 1.5 ulps."""
    values = [0.0, 1.0]
    for d in range(7):
        k = 2**d if signed else 2 ** (d + 1)
        b = np.linspace(0.1, 1, k + 1)
        means = 10.0 ** (d - 6) * (b[:-1] + b[1:]) / 2
        values += list(means) + (list(-means) if signed else [])
    expected = np.sort(values)
    assert np.all(ulps(expected, lp.dynamic_map(signed)) <= 1.5)


@pytest.mark.parametrize("signed", [True, False])
def test_edges_are_midpoints(signed):
    q = lp.magnitudes(signed)
    e = lp.edges(signed)[1:]
    assert np.all((q[:-1] < e) & (e < q[1:]))
    midpoints = (q[:-1].astype(np.float64) + q[1:]) / 2
    assert np.all(ulps(midpoints, e) <= 1)


@pytest.mark.parametrize("signed", [True, False])
def test_reference_encode_is_the_nearest_code(signed):
    """Against a brute-force argmin over the 256 values (float64): equal except within two
    ulps of a midpoint, where the edge (itself within one ulp of it) decides."""
    m = lp.dynamic_map(signed).astype(np.float64)
    y = np.concatenate(
        [
            np.random.default_rng(5).uniform(-1 if signed else 0, 1, 20_000),
            wide_values(20_000, seed=5) / 1e7,
        ]
    ).astype(np.float32)
    y = np.clip(y, -1 if signed else 0, 1)
    brute = np.argmin(np.abs(y.astype(np.float64)[:, None] - m[None, :]), axis=1)
    codes = lp.encode(y, signed)
    midpoints = (m[:-1] + m[1:]) / 2
    near_mid = np.min(np.abs(y[:, None] - midpoints[None, :]), axis=1) <= 2 * np.spacing(y)
    assert np.array_equal(codes[~near_mid], brute[~near_mid])
    assert np.all(np.abs(codes.astype(int) - brute)[near_mid] <= 1)


@pytest.mark.parametrize("signed", [True, False])
def test_codec_encode_is_the_reference_at_every_edge(signed):
    """Every float32 within 200 ulps of every edge (and their negatives), plus zeros, +-1 and
    just past, the smallest normal and subnormal values: the closed form agrees with the table
    search everywhere the estimate could be off by one."""
    e = lp.edges(signed)[1:]
    bits = e.view(np.int32)[:, None] + np.arange(-200, 201, dtype=np.int32)[None, :]
    a = bits.ravel().view(np.float32)
    special = np.array(
        [0, -0.0, 1, -1, 1.0000001, -1.0000001, 1e-45, -1e-45, 1.2e-38, 1e-39, 3e-8],
        np.float32,
    )
    y = np.concatenate([a, -a, special])
    out = np.empty(y.size, np.uint8)
    _encode(y, out, signed)
    assert np.array_equal(out, lp.encode(y, signed))


@pytest.mark.parametrize("signed", [True, False])
def test_codec_encode_is_the_reference_on_a_sweep(signed):
    """Every 997th float32 in [0, 1] (both signs for the signed map)."""
    a = np.arange(0, np.float32(1).view(np.uint32) + 1, 997, dtype=np.uint32).view(np.float32)
    y = np.concatenate([a, -a]) if signed else a
    out = np.empty(y.size, np.uint8)
    _encode(y, out, signed)
    assert np.array_equal(out, lp.encode(y, signed))


# -- blockwise quantization ----------------------------------------------------------------------


def blocks_of_every_kind(signed, n_random=200_001):
    """Random blocks at scales 1e-30 ... 1e30, a ragged last block, an all-zero block, a
    subnormal-only block, blocks holding NaN, +Inf and -Inf, and zeros inside a block."""
    x = wide_values(n_random, seed=6)
    x *= np.repeat(np.exp(np.random.default_rng(6).uniform(-60, 60, lp.n_blocks(x.size))), BLOCK)[
        : x.size
    ].astype(np.float32)
    special = np.zeros(6 * BLOCK, np.float32)
    special[BLOCK : 2 * BLOCK] = np.float32(1e-40)  # subnormal only
    special[2 * BLOCK : 3 * BLOCK] = 1
    special[2 * BLOCK + 5] = np.nan
    special[3 * BLOCK : 4 * BLOCK] = 2
    special[3 * BLOCK + 7] = np.inf
    special[4 * BLOCK : 5 * BLOCK] = -np.inf
    special[5 * BLOCK : 6 * BLOCK : 2] = 3  # every other one zero
    x = np.concatenate([special, x])  # the random part ends in a ragged block
    return np.abs(x) if not signed else x


@pytest.mark.parametrize("signed", [True, False])
def test_codec_quantize_and_dequantize_are_the_reference(signed):
    x = blocks_of_every_kind(signed)
    codes, scales = codec_quantize(x, signed)
    ref_codes, ref_scales = lp.quantize_blockwise(x, signed)
    assert np.array_equal(codes, ref_codes)
    assert np.array_equal(scales.view(np.uint32), ref_scales.view(np.uint32))
    every_code = np.random.default_rng(7).integers(0, 256, x.size, dtype=np.uint8)
    for c in (ref_codes, every_code):
        with np.errstate(invalid="ignore"):
            expected = lp.dequantize_blockwise(c, ref_scales, signed)
        got = codec_dequantize(c, ref_scales, signed)
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("signed", [True, False])
def test_quantization_error_within_half_a_code_gap(signed):
    x = blocks_of_every_kind(signed)[6 * BLOCK :]  # the finite, normal blocks
    codes, scales = lp.quantize_blockwise(x, signed)
    xhat = lp.dequantize_blockwise(codes, scales, signed)
    absmax = np.repeat(scales, BLOCK)[: x.size].astype(np.float64)
    m = lp.dynamic_map(signed).astype(np.float64)
    y = x / absmax
    # the gap of the cell y falls in: between the code and its neighbour on y's side
    c = codes.astype(int)
    above = m[np.minimum(c + 1, 255)] - m[c]  # 0 for the last code
    below = m[c] - m[np.maximum(c - 1, 0)]  # 0 for the first code
    gap = np.where((y >= m[c]) & (above > 0) | (below == 0), above, below)
    # float32 rounding of y = x * (1/absmax), of the edges and of map * scale: 1e-6 relative
    bound = (0.5 * gap + 1e-6) * absmax
    assert np.all(np.abs(xhat - x) <= bound)


@pytest.mark.parametrize("signed", [True, False])
def test_zeros_and_special_blocks_follow_the_rules(signed):
    x = blocks_of_every_kind(signed, n_random=300)
    codes, scales = lp.quantize_blockwise(x, signed)
    with np.errstate(invalid="ignore"):
        xhat = lp.dequantize_blockwise(codes, scales, signed)[: 6 * BLOCK].reshape(6, BLOCK)
    zero = lp.zero_code(signed)
    assert scales[0] == 0 and np.all(xhat[0] == 0) and np.all(codes[:BLOCK] == zero)
    assert scales[1] == 0 and np.all(xhat[1] == 0)  # subnormal-only: flushed to zero
    assert all(np.isnan(scales[b]) and np.all(np.isnan(xhat[b])) for b in (2, 3, 4))
    assert np.all(codes[2 * BLOCK : 5 * BLOCK] == zero)
    assert scales[5] == 3 and np.all(xhat[5, 1::2] == 0) and np.all(xhat[5, ::2] == 3)
    assert np.all(np.isfinite(lp.dequantize_blockwise(codes, scales, signed)[6 * BLOCK :]))


def test_ragged_last_block_and_scale_count():
    x = np.linspace(-1, 1, 3 * BLOCK + 5, dtype=np.float32)
    x[-5:] = [0.5, -0.25, 0.125, 0, 0.01]
    codes, scales = lp.quantize_blockwise(x, True)
    assert codes.size == x.size and scales.size == 4 and scales[-1] == 0.5
    assert lp.dequantize_blockwise(codes, scales, True)[-5:].tolist() == [
        0.5,
        pytest.approx(-0.25, rel=1e-2),
        pytest.approx(0.125, rel=1e-2),
        0,
        pytest.approx(0.01, rel=2e-2),
    ]
    with pytest.raises(ValueError, match="scales"):
        lp.dequantize_blockwise(codes, scales[:3], True)


# -- the loops vectorize -------------------------------------------------------------------------


def test_codec_loops_vectorize():
    """The encode, decode and stochastic-rounding loops hold float vector arithmetic and no
    gathers in their LLVM IR (a per-element table lookup would show as a gather or keep the
    loop scalar)."""
    for fn in (_encode, _dequantize, _bf16_stochastic):
        ir = fn.inspect_llvm(fn.signatures[0])
        assert re.search(r"= (?:fmul|fadd|add|or) <(?:4|8|16) x (?:float|i32|i64)>", ir), fn
        assert "masked.gather" not in ir, fn
