"""Low-precision storage, the NumPy reference: bfloat16 rounding and blockwise 8-bit state.

This module is the oracle for the Numba codecs in :mod:`fastrms.kernels.codecs`, which must give
the same bits. It imports no Numba and works on whole arrays with plain NumPy operations.

bfloat16 values are handled as their 16-bit patterns (``uint16`` arrays): Numba has no bfloat16
type, and ``ml_dtypes.bfloat16`` arrays view as ``uint16`` at no cost (:func:`bf16_bits`).

- **Rounding float32 to bfloat16.** :func:`round_nearest` (to nearest, ties to even, as
  ``ml_dtypes`` and PyTorch do) and :func:`round_stochastic` (rounds the magnitude up with
  probability equal to the fraction of a bfloat16 ulp it drops, so the expected result is the
  input). The random bits come from :func:`random_bits`, a hash of a per-step key
  (:func:`step_key`, from the seed and step) and the element's global index, so the bits do
  not depend on threads, chunking or backend.
- **Kahan compensation** (:func:`kahan_add`): a bfloat16 parameter with a bfloat16 buffer
  holding what rounding dropped, as optimi does.
- **Blockwise 8-bit state** (:func:`quantize_blockwise`, :func:`dequantize_blockwise`): blocks
  of :data:`BLOCK` elements, one float32 absmax scale per block, codes into an 8-bit float-like
  map (:class:`Float8Map`, what the kernels use) or Dettmers et al.'s dynamic map (2021;
  reference code in :mod:`fastrms.dynamic_map`, re-exported here). Tensors under
  :data:`MIN_8BIT_SIZE` elements keep float32 state (:func:`uses_8bit`).

Special values (NaN, Inf, zero, subnormals) follow the rules given in each function.
"""

from __future__ import annotations

from typing import NamedTuple

import ml_dtypes
import numpy as np

# Dettmers' dynamic map, kept as reference code beside the float8 map the kernels use.
from .dynamic_map import DECADES, dynamic_map, edges, encode, magnitudes, zero_code  # noqa: F401

#: The NumPy dtype of bfloat16 arrays.
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

#: Elements per block of 8-bit state, each block with one float32 absmax scale.
BLOCK = 256

#: Tensors with fewer elements than this keep float32 state even when 8-bit state is asked
#: for: their state is small, and the per-block scale and the codec's work cost more than they
#: save. A policy, not a limit of the codec; bitsandbytes' ``min_8bit_size`` has this value.
MIN_8BIT_SIZE = 4096

#: The bfloat16 pattern of a NaN (quiet, positive); a NaN keeps its sign bit.
BF16_NAN = 0x7FC0

#: The multiplier of :func:`random_bits` (2^32 / golden ratio, odd).
HASH_MULTIPLIER = 0x9E3779B9

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1


# -- bfloat16 ------------------------------------------------------------------------------------


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """The bit patterns of a bfloat16 array, as a ``uint16`` view (no copy).

    Accepts an ``ml_dtypes.bfloat16`` array or a ``uint16`` array of patterns (returned as is).
    """
    a = np.asarray(a)
    if a.dtype == BFLOAT16:
        return a.view(np.uint16)
    if a.dtype == np.uint16:
        return a
    raise TypeError(f"a must be a bfloat16 or uint16 array, got {a.dtype}")


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 patterns to float32, exactly: ``bits(f32) = bits(bf16) << 16``."""
    return (bf16_bits(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _is_nan(u: np.ndarray) -> np.ndarray:
    return (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)


def _nan_pattern(u: np.ndarray) -> np.ndarray:
    return ((u >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(BF16_NAN)


def round_nearest(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16, to nearest with ties to even; return the ``uint16`` patterns.

    With ``u`` the float32 bits: ``(u + 0x7FFF + ((u >> 16) & 1)) >> 16``. Finite values past
    the largest bfloat16 round to +-Inf, +-Inf stay +-Inf, and a NaN becomes the quiet NaN
    ``0x7FC0`` with its sign (its payload is dropped), as ``ml_dtypes`` does.
    """
    u = np.asarray(x, np.float32).view(np.uint32)
    r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.where(_is_nan(u), _nan_pattern(u), r).astype(np.uint16)


def step_key(seed: int, step: int, stream: int = 0) -> int:
    """The 32-bit key of one step's random bits: SplitMix64 of ``(seed, step, stream)``.

    ``z = seed + 0x9E3779B97F4A7C15 * (step + 1) + 0xD1B54A32D192ED03 * stream`` (mod 2^64),
    then SplitMix64's finalizer ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27;
    z *= 0x94D049BB133111EB; z ^= z >> 31``, and the key is ``(z ^ (z >> 32)) & 0xFFFFFFFF``.
    Computed once per step on the host, so its cost does not matter; it spreads nearby seeds
    and steps over all keys. ``stream`` separates tensors that share a seed (e.g. a tensor's
    position in its optimizer), so that two tensors of one shape do not round alike. All three
    are taken modulo 2^64.
    """
    z = int(seed) + 0x9E3779B97F4A7C15 * (int(step) + 1) + 0xD1B54A32D192ED03 * int(stream)
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z ^ (z >> 32)) & _MASK32


def step_keys(seed: int, step: int, streams: np.ndarray) -> np.ndarray:
    """:func:`step_key` of ``(seed, step, stream)`` for each of ``streams`` (int64), as an
    int64 array: one NumPy pass, for a step over many tensors (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        s = np.asarray(streams, np.int64).astype(np.uint64)
        base = np.uint64((int(seed) + 0x9E3779B97F4A7C15 * (int(step) + 1)) & _MASK64)
        z = base + s * np.uint64(0xD1B54A32D192ED03)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
        return ((z ^ (z >> np.uint64(32))) & np.uint64(_MASK32)).astype(np.int64)


def random_bits(key: int, index: np.ndarray) -> np.ndarray:
    """16 random bits per element (``uint32`` in ``[0, 2^16)``) from the step key and the
    elements' global indices.

    ``h = ((index mod 2^32) ^ key) * 0x9E3779B9 mod 2^32``; the draw is ``h >> 16``, the
    best-mixed bits of a multiplicative hash. One multiply per element keeps the kernels
    memory-bound (a three-round finalizer cost 10% of a bf16 step; folding in the index's high
    word as well cost 20% of an all-bf16 Adam step in cache): elements 2^32 apart in one
    tensor draw alike, which biases nothing.

    For a fixed element, ``index ^ key`` runs over uniformly spread values as the key changes
    from step to step, so the draws of successive steps are uniform on ``[0, 2^16)``; within
    one step the draws of neighbouring elements form a Weyl-like sequence (evenly spread, not
    independent), which is all stochastic rounding needs to be unbiased. ``index`` is the
    element's position in its whole tensor, never in a chunk, so that the bits do not depend
    on how the work is split.
    """
    lo = (np.asarray(index, np.int64).astype(np.uint64) & np.uint64(_MASK32)).astype(np.uint32)
    return ((lo ^ np.uint32(key)) * np.uint32(HASH_MULTIPLIER)) >> np.uint32(16)  # wraps


def round_stochastic(x: np.ndarray, key: int, start: int = 0) -> np.ndarray:
    """Round float32 to bfloat16 stochastically; return the ``uint16`` patterns.

    Element ``i`` of ``x`` has global index ``start + i`` and draws ``r = random_bits(key,
    start + i)``; with ``u`` its float32 bits the result is ``(u + r) >> 16``. The magnitude
    rounds up with probability (dropped low 16 bits) / 2^16, so the expected value is ``x``
    (torchao and llm.c round the same way). A value within one bfloat16 ulp of overflow rounds
    up to +-Inf with the same probability; +-Inf stay +-Inf; a NaN becomes ``0x7FC0`` with its
    sign, as in :func:`round_nearest`.
    """
    u = np.asarray(x, np.float32).view(np.uint32)
    r = random_bits(key, np.arange(start, start + u.size, dtype=np.int64)).reshape(u.shape)
    v = (u.astype(np.uint64) + r) >> np.uint64(16)
    return np.where(_is_nan(u), _nan_pattern(u), v.astype(np.uint32)).astype(np.uint16)


def kahan_add(
    param: np.ndarray, comp: np.ndarray, delta: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Add ``delta`` (float32) to a bfloat16 parameter with a bfloat16 Kahan compensation.

    In float32, with ``p`` and ``k`` the widened parameter and compensation::

        u = k + delta
        p_new = round_nearest(p + u)
        k_new = round_nearest(u - (p_new - p))

    ``k_new`` holds what rounding ``p + u`` dropped (``p_new - p`` is exact in float32), and is
    added back on the next step, so increments smaller than half a bfloat16 ulp accumulate.
    This is optimi's update (``kahan_comp += update; p += kahan_comp; kahan_comp += p_old -
    p``) fused: optimi rounds each intermediate to bfloat16, here only the two stored values
    are rounded. NaN and Inf propagate through the arithmetic.

    Returns the new ``(param, comp)`` patterns (``uint16``).
    """
    p = bf16_to_float32(param)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and Inf propagate, by design
        u = bf16_to_float32(comp) + np.asarray(delta, np.float32)
        p_new = round_nearest(p + u)
        comp_new = round_nearest(u - (bf16_to_float32(p_new) - p))
    return p_new, comp_new


# -- blockwise 8-bit quantization ----------------------------------------------------------------


def uses_8bit(n: int) -> bool:
    """Whether a tensor of ``n`` elements gets 8-bit state (``n >= MIN_8BIT_SIZE``)."""
    return n >= MIN_8BIT_SIZE


def n_blocks(n: int) -> int:
    """The number of blocks (and scales) of ``n`` elements: ``ceil(n / BLOCK)``."""
    return -(-n // BLOCK)


def block_absmax(x: np.ndarray) -> np.ndarray:
    """``max |x|`` over each block (float32, one per block; the last block may be short).

    A NaN anywhere in a block makes its absmax NaN.
    """
    x = np.asarray(x, np.float32).ravel()
    pad = np.zeros(n_blocks(x.size) * BLOCK, np.float32)
    pad[: x.size] = x
    return np.max(np.abs(pad.reshape(-1, BLOCK)), axis=1)


#: Below this absmax (the smallest normal float32) a block is stored as zeros.
_TINY = np.finfo(np.float32).tiny


def quantize_blockwise(
    x: np.ndarray, signed: bool, map: str = "dynamic"
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize float32 ``x`` (any shape, read flat) to ``(codes, scales)``.

    For each block of :data:`BLOCK` elements (the last one may be short):
    ``absmax = max |x|``, ``inv = 1 / absmax`` and ``y = x * inv`` in float32, and each code is
    the map's nearest to ``y``: :func:`encode` for ``map="dynamic"`` (Dettmers' map),
    :func:`float8_encode` for ``map="float8"`` (the map of ``state_dtype="int8"``). The scale
    stored is ``absmax``. Rules:

    - an all-zero block, or one whose absmax is below the smallest normal float32 (1.2e-38),
      stores scale 0 and zero codes: it dequantizes to exact zeros (subnormal-only blocks are
      flushed to zero, since ``1 / absmax`` would overflow);
    - a block holding a NaN or +-Inf stores scale NaN and zero codes: it dequantizes to NaN
      everywhere, so a non-finite value poisons its block's state visibly rather than being
      dropped (bitsandbytes instead zeroes that element and skips its update).

    Returns ``codes`` (``uint8``, ``x.size`` of them) and ``scales`` (float32, one per block).
    """
    x = np.asarray(x, np.float32).ravel()
    absmax = block_absmax(x)
    finite = np.isfinite(absmax)
    normal = finite & (absmax >= _TINY)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(normal, np.float32(1) / np.where(normal, absmax, 1), 0).astype(np.float32)
    with np.errstate(invalid="ignore"):
        y = x * np.repeat(inv, BLOCK)[: x.size]
    ok = np.repeat(normal, BLOCK)[: x.size]
    if map == "float8":
        codes = float8_encode(np.where(ok, y, 0), signed)
        codes[~ok] = 0
    else:
        codes = encode(np.where(ok, y, 0), signed)
        codes[~ok] = zero_code(signed)
    scales = np.where(finite, np.where(normal, absmax, 0), np.nan).astype(np.float32)
    return codes, scales


def dequantize_blockwise(
    codes: np.ndarray, scales: np.ndarray, signed: bool, map: str = "dynamic"
) -> np.ndarray:
    """``table[code] * scale`` of the code's block, in float32 (flat); ``table`` is
    ``dynamic_map(signed)`` or, for ``map="float8"``, ``float8_table(signed)``."""
    codes = np.asarray(codes, np.uint8).ravel()
    scales = np.asarray(scales, np.float32)
    if scales.size != n_blocks(codes.size):
        raise ValueError(
            f"scales has {scales.size} entries; {codes.size} codes need {n_blocks(codes.size)}"
        )
    table = float8_table(signed) if map == "float8" else dynamic_map(signed)
    return table[codes] * np.repeat(scales, BLOCK)[: codes.size]


# -- the 8-bit float map of optimizer state ------------------------------------------------------
#
# The int8 optimizer state (``state_dtype="int8"``) is held in a float-like map rather than the
# dynamic map above: its nearest code is the float32 pattern rounded by integer arithmetic, a
# dozen branch-free vector instructions, where the dynamic map's closed form costs about 70
# per 16 elements and kept a fused Adam step compute-bound (README, "int8 state").


class Float8Map(NamedTuple):
    """One 8-bit float-like map: 0, then the magnitudes ``2^(e - bias) * (1 + j/8)``
    (3 mantissa bits, no subnormals), up to exactly 1.

    Magnitude index ``q = 1 ... qmax`` (``qmax = 8 * bias + 1``) has the float32 pattern
    ``(q + shift) << 20`` (``shift = 8 * (127 - bias) - 1``): ``Q[1] = 2^-bias`` and
    ``Q[qmax] = 1``. Index 0 is 0; magnitudes below ``threshold = 2^(-bias - 1)``, the
    midpoint of 0 and ``Q[1]``, round to it.
    """

    signed: bool
    bias: int

    @property
    def qmax(self) -> int:
        return 8 * self.bias + 1

    @property
    def shift(self) -> int:
        return 8 * (127 - self.bias) - 1

    @property
    def threshold(self) -> np.float32:
        return np.float32(2.0 ** (-self.bias - 1))


#: First moments (any sign): a sign bit and 7 bits of magnitude, E4M3-like (bias 15): 0 and
#: 8 values a binade from 2^-15 (3.1e-5) to 1, 243 codes used.
SIGNED_FLOAT8 = Float8Map(True, 15)
#: Second moments (never negative): 8 bits of magnitude, E5M3-like (bias 31): 0 and 8 values
#: a binade from 2^-31 (4.7e-10) to 1, 250 codes used. Its smallest value is the square of
#: the signed map's, so a second moment flushes to 0 where its first moment does.
UNSIGNED_FLOAT8 = Float8Map(False, 31)


def float8_map(signed: bool) -> Float8Map:
    """The map of signed (first-moment) or unsigned (second-moment) int8 state."""
    return SIGNED_FLOAT8 if signed else UNSIGNED_FLOAT8


def float8_magnitudes(signed: bool) -> np.ndarray:
    """The magnitudes ``Q[0] = 0 < Q[1] < ... < Q[qmax] = 1`` of the map (float32), by their
    formula: ``Q[q] = 2^(((q - 1) >> 3) - bias) * (1 + ((q - 1) & 7) / 8)`` for ``q >= 1``."""
    fmap = float8_map(signed)
    q = np.arange(1, fmap.qmax + 1)
    values = np.ldexp(1 + ((q - 1) & 7) / 8, ((q - 1) >> 3) - fmap.bias)
    return np.concatenate([[0.0], values]).astype(np.float32)


def float8_table(signed: bool) -> np.ndarray:
    """The value of each of the 256 codes (float32): ``value = float8_table(signed)[code]``.

    Unsigned: code ``q <= qmax`` is ``Q[q]``. Signed: bit 7 is the sign and bits 0-6 the
    magnitude index, so code ``q`` is ``Q[q]`` and ``0x80 | q`` is ``-Q[q]`` (``0x80`` is
    -0.0). Indices above ``qmax`` are never written; they read as the pattern formula gives
    (values above 1).
    """
    fmap = float8_map(signed)
    q = np.arange(256, dtype=np.uint32) & np.uint32(0x7F if signed else 0xFF)
    pattern = ((q + np.uint32(fmap.shift)) << np.uint32(20)) * (q != 0)
    sign = (np.arange(256, dtype=np.uint32) & np.uint32(0x80)) << np.uint32(24)
    return (pattern.astype(np.uint32) | (sign if signed else np.uint32(0))).view(np.float32)


def float8_encode(y: np.ndarray, signed: bool) -> np.ndarray:
    """The code nearest to each finite float32 ``y`` (``|y| <= 1``, as ``x / absmax`` is)
    (``uint8``).

    With ``u`` the pattern of ``a = |y|``: ``r = (u + 0x80000) >> 20`` (the pattern rounded
    to 3 mantissa bits, to nearest with ties away from zero, a carry moving to the exponent;
    one add, where ties to even took three instructions more),
    ``q = max(r, shift + 1) - shift`` where ``a >= threshold``, else 0, then ``min(q, qmax)``.
    Signed: the code is ``q`` with bit 7 set where ``y``'s sign bit is
    (``-0.0`` gives ``0x80``). Unsigned: a negative ``y`` gives code 0.
    """
    fmap = float8_map(signed)
    y = np.asarray(y, np.float32)
    u = y.view(np.uint32)
    bits = u & np.uint32(0x7FFFFFFF)
    r = (bits + np.uint32(0x80000)) >> np.uint32(20)
    q = np.maximum(r, np.uint32(fmap.shift + 1)) - np.uint32(fmap.shift)
    q = np.where(bits.view(np.float32) >= fmap.threshold, q, 0)
    q = np.minimum(q, fmap.qmax).astype(np.uint8)
    negative = (u >> np.uint32(31)).astype(bool)
    if signed:
        return q | np.where(negative, 0x80, 0).astype(np.uint8)
    return np.where(negative, 0, q).astype(np.uint8)


def float8_decode(codes: np.ndarray, signed: bool) -> np.ndarray:
    """The values of ``codes`` (float32): :func:`float8_table`'s."""
    return float8_table(signed)[np.asarray(codes, np.uint8)]


class Quantized(NamedTuple):
    """One state array held blockwise in 8 bits (``state_dtype="int8"``): ``codes``
    (``uint8``, the shape of the parameter) and ``scales`` (float32, one per block of
    :data:`BLOCK` elements, ``n_blocks(codes.size)``). Its :attr:`nbytes` is the memory the
    state takes."""

    codes: np.ndarray
    scales: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    @property
    def shape(self) -> tuple:
        return self.codes.shape

    @classmethod
    def of(cls, x: np.ndarray, signed: bool) -> Quantized:
        """``x`` (float) quantized with the float8 map (:func:`quantize_blockwise`), codes
        shaped as ``x``."""
        x = np.asarray(x)
        codes, scales = quantize_blockwise(x.astype(np.float32), signed, map="float8")
        return cls(codes.reshape(x.shape), scales)

    def dequantize(self, signed: bool) -> np.ndarray:
        """The float32 values (shaped as the codes)."""
        flat = dequantize_blockwise(self.codes, self.scales, signed, map="float8")
        return flat.reshape(self.codes.shape)
