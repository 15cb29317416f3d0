"""The low-precision codecs (fastrms.kernels.codecs) called from CUDA kernels, against the NumPy
reference (fastrms.lowprecision), bit for bit.

CI runs this file under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, see ``.ci/run``),
where the codecs run as Python on NumPy scalars; without the simulator or a device every test
is skipped. The codecs stay bit-exact on hardware too, where the compiler may fuse a multiply
and an add: each multiply-add in them has an exact product (a power-of-two scale, or ``9 * m``
with ``m`` of few bits) or only feeds an estimate that one exact comparison corrects.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastrms
from fastrms import lowprecision as lp
from fastrms.kernels import codecs

CUDA = fastrms.backends()["cuda"]
pytestmark = [
    pytest.mark.cudasim,
    pytest.mark.skipif(not CUDA.available, reason=f"no CUDA target: {CUDA.detail}"),
]

if CUDA.available:
    from numba import cuda

    @cuda.jit
    def _bf16_kernel(x, key, nearest, stochastic, p, k, delta, p_out, k_out):
        i = cuda.grid(1)
        if i < x.size:
            nearest[i] = codecs.bf16_nearest(x[i])
            stochastic[i] = codecs.bf16_stochastic(x[i], key, i)
            p_out[i], k_out[i] = codecs.kahan_add(p[i], k[i], delta[i])

    @cuda.jit
    def _int8_kernel(x, codes, scales, decoded, signed):
        b = cuda.grid(1)  # one block of 256 per thread
        if b < scales.size:
            start = b * codecs.BLOCK
            stop = min(start + codecs.BLOCK, x.size)
            xb = x[start:stop]
            cb = codes[start:stop]
            if signed:
                scales[b] = codecs.quantize_block_signed(xb, cb)
            else:
                scales[b] = codecs.quantize_block_unsigned(xb, cb)
            for i in range(cb.size):
                if signed:
                    decoded[start + i] = codecs.decode_signed(cb[i], scales[b])
                else:
                    decoded[start + i] = codecs.decode_unsigned(cb[i], scales[b])


def _launch(kernel, n, *args):
    with warnings.catch_warnings():  # the simulator's NumPy scalars warn when uint32 wraps
        warnings.simplefilter("ignore", RuntimeWarning)
        kernel[(n + 63) // 64, 64](*args)


def test_bf16_codecs_on_cuda():
    rng = np.random.default_rng(0)
    n = 1024
    x = rng.integers(0, 2**32, n, dtype=np.uint32).view(np.float32)
    x[:4] = [np.nan, np.inf, -np.inf, 0]
    p = lp.round_nearest(rng.standard_normal(n).astype(np.float32))
    k = lp.round_nearest((rng.standard_normal(n) * 1e-3).astype(np.float32))
    delta = (rng.standard_normal(n) * 1e-4).astype(np.float32)
    key = np.uint32(lp.step_key(seed=3, step=7))
    out = [np.zeros(n, np.uint16) for _ in range(4)]
    _launch(_bf16_kernel, n, x, key, out[0], out[1], p, k, delta, out[2], out[3])
    assert np.array_equal(out[0], lp.round_nearest(x))
    assert np.array_equal(out[1], lp.round_stochastic(x, key))
    p_ref, k_ref = lp.kahan_add(p, k, delta)
    assert np.array_equal(out[2], p_ref) and np.array_equal(out[3], k_ref)


@pytest.mark.parametrize("signed", [True, False])
def test_int8_codecs_on_cuda(signed):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(5 * lp.BLOCK + 77) * np.exp(rng.uniform(-30, 5))).astype(np.float32)
    x[lp.BLOCK : 2 * lp.BLOCK] = 0  # a zero block
    x[3 * lp.BLOCK + 9] = np.nan  # a NaN block
    x = x if signed else np.abs(x)
    codes = np.zeros(x.size, np.uint8)
    scales = np.zeros(lp.n_blocks(x.size), np.float32)
    decoded = np.zeros(x.size, np.float32)
    _launch(_int8_kernel, scales.size, x, codes, scales, decoded, signed)
    ref_codes, ref_scales = lp.quantize_blockwise(x, signed)
    assert np.array_equal(codes, ref_codes)
    assert np.array_equal(scales.view(np.uint32), ref_scales.view(np.uint32))
    with np.errstate(invalid="ignore"):
        expected = lp.dequantize_blockwise(ref_codes, ref_scales, signed)
    assert np.array_equal(decoded.view(np.uint32), expected.view(np.uint32))
