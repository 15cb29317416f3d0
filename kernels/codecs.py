"""Scalar codecs of the low-precision storages, for the kernels' loops to inline.

Each function here is a ``numba.extending.register_jitable`` function of scalars (the block
helpers take one block's slices), which LLVM inlines into the loop that calls it, so the loop
still vectorizes (the tests check the IR); the CUDA kernels can compile the same functions as
device functions. They are not ``inline="always"`` as the rules in
:mod:`fastrms.kernels.rules` are: they index no tuple of arrays, and Numba's own inlining of
their nested calls cost 4x the compile time (13 s against 3.3 s for a quantize loop) for the
same machine code. The NumPy reference, :mod:`fastrms.lowprecision`, defines what each one
computes; these give the same bits (the tests run both on large random inputs and on every
edge case).

- bfloat16, held as ``uint16`` patterns: :func:`bf16_load`, :func:`bf16_nearest`,
  :func:`bf16_stochastic` (random bits from :func:`random_bits`), :func:`kahan_add`.
- blockwise 8-bit: :func:`encode_signed` / :func:`encode_unsigned` (float -> code, closed form),
  :func:`decode_signed` / :func:`decode_unsigned` (code -> float), and
  :func:`quantize_block_signed` / :func:`quantize_block_unsigned`, which take a block of values
  already computed (at most :data:`BLOCK`), find its absmax and write its codes.

The 8-bit encoder finds the nearest code without a table search (an 8-step binary search per
element kept a prototype compute-bound, at 0.05x of the float32 step): the magnitude's decade
comes from six comparisons that select that decade's constants (``select``, vectorizable), a
linear formula gives the index or the one below it, and one comparison with the edge between
the two, computed in closed form, settles it. Table lookups are avoided on purpose: LLVM turns
them into scalar loads here, which kept a prototype at 3-6 ns per element.

Cost, one thread of the 2-core CI-class AMD EPYC (Zen 4, AVX-512), loops over 2^16 elements in
cache: ``encode_signed`` 0.65-0.77 ns per element (about 70 instructions per 16 elements, 18
of them the decade's selects), ``decode_signed`` 0.31-0.35, ``bf16_nearest`` 0.10-0.11,
``bf16_stochastic`` 0.12. The 8-bit codes are compute-bound (a float32 Adam step moves its 28
bytes in about 0.6 ns per element per core), see ``bench/lowprecision_adam_proto.py``.
"""

import numpy as np
from numba.extending import register_jitable

#: Elements per block of 8-bit state (fastrms.lowprecision.BLOCK).
BLOCK = 256
#: The multiplier of the stochastic-rounding hash (fastrms.lowprecision.HASH_MULTIPLIER).
HASH_MULTIPLIER = 0x9E3779B9
#: 10^(d-7) as float32, d = 0 ... 6 (fastrms.lowprecision.DECADES).
DECADES = tuple(np.float32(s) for s in ("1e-7", "1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"))

_U16 = np.uint32(16)
_ABS = np.uint32(0x7FFFFFFF)
_INF_BITS = np.uint32(0x7F800000)
_NORMAL_BITS = np.uint32(0x00800000)
_MANTISSA = np.uint32(0x7FFFFF)
_ONE_BITS = np.uint32(0x3F800000)


# -- bfloat16 ------------------------------------------------------------------------------------


@register_jitable
def bf16_load(b):
    """bfloat16 pattern (``uint16``) -> float32, exactly: ``bits = b << 16``."""
    return np.uint32(np.uint32(b) << _U16).view(np.float32)


@register_jitable
def _nan16(u):
    # A NaN's bfloat16: quiet NaN 0x7FC0 with the sign of u (float32 bits).
    return np.uint16(((u >> _U16) & np.uint32(0x8000)) | np.uint32(0x7FC0))


@register_jitable
def bf16_nearest(x):
    """float32 -> bfloat16 pattern, nearest with ties to even:
    ``(u + 0x7FFF + ((u >> 16) & 1)) >> 16``; NaN -> ``0x7FC0`` with its sign."""
    u = np.float32(x).view(np.uint32)
    r = np.uint16((u + np.uint32(0x7FFF) + ((u >> _U16) & np.uint32(1))) >> _U16)
    return _nan16(u) if (u & _ABS) > _INF_BITS else r


@register_jitable
def random_bits(key, i):
    """16 random bits (``uint32`` in ``[0, 2^16)``) for global element index ``i`` (int64)
    under the step key ``key`` (uint32): ``(((i mod 2^32) ^ key) * 0x9E3779B9 mod 2^32) >> 16``.
    """
    # Every step truncated to 32 bits, so that LLVM keeps 32-bit lanes (Numba widens
    # unsigned 32-bit arithmetic to 64 bits, which halved the vector width).
    h = np.uint32(np.uint32(i) ^ np.uint32(key))
    h = np.uint32(h * np.uint32(HASH_MULTIPLIER))
    return np.uint32(h >> _U16)


@register_jitable
def bf16_stochastic(x, key, i):
    """float32 -> bfloat16 pattern, rounded stochastically with the draw of element ``i``:
    ``(u + random_bits(key, i)) >> 16``; NaN -> ``0x7FC0`` with its sign."""
    u = np.float32(x).view(np.uint32)
    # u + r < 2^32 for every non-NaN u (-Inf is 0xFF800000), so 32 bits suffice
    r = np.uint16(np.uint32(u + random_bits(key, i)) >> _U16)
    return _nan16(u) if (u & _ABS) > _INF_BITS else r


@register_jitable
def kahan_add(p, k, delta):
    """Add float32 ``delta`` to bfloat16 parameter ``p`` with bfloat16 compensation ``k``
    (patterns); return the new ``(p, k)``: ``u = k + delta``, ``p' = nearest(p + u)``,
    ``k' = nearest(u - (p' - p))``, in float32."""
    pf = bf16_load(p)
    u = bf16_load(k) + delta
    p_new = bf16_nearest(pf + u)
    return p_new, bf16_nearest(u - (bf16_load(p_new) - pf))


# -- blockwise 8-bit: the dynamic map in closed form ---------------------------------------------


def _closed_form(signed):
    """Build the encoder and decoder of one map (signed or unsigned) around its constants.

    Decade ``d`` (values in ``[10^(d-7), 10^(d-6))``) holds the magnitude indices ``q`` with
    ``q + off`` in ``[2^(d+off), 2^(d+1+off))``; its edges sit at positions ``f = q + off``
    of the formula ``(9*m - 8) * 10^(d-7)`` (``f = 2^e * m``), so inverting it gives
    ``q ~ (a / 10^(d-7) + 8) * 2^(d+off) / 9 - off``. The encoder takes the floor of a slightly
    compressed version of that, which is the index or the one below it, and compares ``a`` with
    the edge above.
    """
    off, qmax = (0, 128) if signed else (1, 255)
    # The estimate floor(a * slope[d] + shift[d]) is floor(alpha * u + beta) plus the decade's
    # first index, u = (a / 10^(d-7) - 1) * k / 9 the position in its k cells (edges at the
    # integers, except the first, at 0.2), alpha = 1 - 1/(2k), beta = -1/2 - 1/(4k). For u in
    # [j, j+1) that is j - 1 or j, for u < 0.2 it is -1 (the previous decade's last index),
    # and it never reaches the decade's last index (whose upper edge is the next decade's):
    # the index or the one below it, with a margin of at least 1/(4k) >= 1/512 cell at every
    # bound, far more than the float32 rounding of u (~1e-5).
    slope, shift = [], []
    for d in range(7):
        k = 2.0 ** (d + off)
        alpha, beta = 1.0 - 0.5 / k, -0.5 - 0.25 / k
        slope.append(np.float32(alpha * k / (9.0 * float(DECADES[d]))))
        shift.append(np.float32(k - off - alpha * k / 9.0 + beta))
    slope, shift = tuple(slope), tuple(shift)
    # f >= starts[k] where decade k begins (f = q + off + 1/2 of a value)
    starts = tuple(np.float32(2 ** (k + off)) for k in range(7))
    # The first and the last value (indices 1 and qmax - 1), as `magnitude` computes them.
    first = np.float32(9) * np.float32(1 + off + 0.5) / np.float32(2**off) - np.float32(8)
    last = np.float32(9) * np.float32(qmax - 1 + off + 0.5) / np.float32(2 ** (6 + off))
    last = (last - np.float32(8)) * DECADES[6]
    edge_one = first * DECADES[0] * np.float32(0.5)  # between 0 and index 1
    edge_top = (last + np.float32(1)) * np.float32(0.5)  # between index qmax - 1 and 1
    f_off = np.float32(1 + off)
    f_qmax = np.float32(qmax)

    # Both work in float32 only: integer indices would be int64 in Numba, and 64-bit lanes
    # halve the vector width (an earlier version spent 117 instructions per 16 elements).

    @register_jitable
    def magnitude_index(a):
        """The index ``q`` in ``[0, qmax]`` (as a float32) of the magnitude nearest to ``a``
        (float32, finite, >= 0): the number of edges ``<= a``."""
        # The decade's constants, by compares and selects (a loop over the tuples would index
        # them with a variable: slower to compile and harder for LLVM).
        s, b, p = slope[0], shift[0], DECADES[0]
        s, b, p = (slope[1], shift[1], DECADES[1]) if a >= DECADES[1] else (s, b, p)
        s, b, p = (slope[2], shift[2], DECADES[2]) if a >= DECADES[2] else (s, b, p)
        s, b, p = (slope[3], shift[3], DECADES[3]) if a >= DECADES[3] else (s, b, p)
        s, b, p = (slope[4], shift[4], DECADES[4]) if a >= DECADES[4] else (s, b, p)
        s, b, p = (slope[5], shift[5], DECADES[5]) if a >= DECADES[5] else (s, b, p)
        s, b, p = (slope[6], shift[6], DECADES[6]) if a >= DECADES[6] else (s, b, p)
        q = np.floor(a * s + b)
        f = np.float32(q + f_off)
        bits = f.view(np.uint32)
        mant = bits & _MANTISSA
        m = np.uint32(mant | _ONE_BITS).view(np.float32)
        # 1 / f, exact where f is a power of two (the only case it is used)
        inv_f = np.uint32(np.uint32(0x7F000000) - bits).view(np.float32)
        r = (
            (np.float32(1) + np.float32(1.8) * inv_f)
            if mant == 0
            else m * np.float32(9) - np.float32(8)
        )
        edge = edge_one if q == 0 else r * p
        q = q + np.float32(1) if a >= edge else q
        return q + np.float32(1) if a >= edge_top else q

    @register_jitable
    def magnitude(q):
        """The magnitude of index ``q`` (float32, integral, in ``[0, qmax]``):
        ``(9*m - 8) * 10^(d-7)`` at ``f = q + off + 1/2``, 0 for ``q = 0``, 1 for ``qmax``."""
        f = np.float32(q + np.float32(off + 0.5))
        m = np.uint32((f.view(np.uint32) & _MANTISSA) | _ONE_BITS).view(np.float32)
        p = DECADES[0]
        p = DECADES[1] if f >= starts[1] else p
        p = DECADES[2] if f >= starts[2] else p
        p = DECADES[3] if f >= starts[3] else p
        p = DECADES[4] if f >= starts[4] else p
        p = DECADES[5] if f >= starts[5] else p
        p = DECADES[6] if f >= starts[6] else p
        v = (m * np.float32(9) - np.float32(8)) * p
        v = np.float32(0) if q == 0 else v
        return np.float32(1) if q == f_qmax else v

    return magnitude_index, magnitude


_index_signed, _magnitude_signed = _closed_form(True)
_index_unsigned, _magnitude_unsigned = _closed_form(False)


@register_jitable
def encode_signed(y):
    """Code of the signed map nearest to ``y`` (float32, finite): ``127 + q`` for ``y >= 0``,
    ``127 - min(q, 127)`` for ``y < 0``, ``q`` the magnitude index of ``|y|``."""
    q = _index_signed(abs(y))
    return np.uint8(np.float32(127) - min(q, np.float32(127)) if y < 0 else np.float32(127) + q)


@register_jitable
def encode_unsigned(y):
    """Code of the unsigned map nearest to ``y`` (float32, finite; negatives give code 0)."""
    return np.uint8(_index_unsigned(max(y, np.float32(0))))


@register_jitable
def decode_signed(c, scale):
    """Value of signed code ``c`` (``uint8``) in a block of absmax ``scale``:
    ``map[c] * scale``."""
    q = np.float32(c) - np.float32(127)
    v = _magnitude_signed(abs(q))
    return (-v if q < 0 else v) * scale


@register_jitable
def decode_unsigned(c, scale):
    """Value of unsigned code ``c`` (``uint8``) in a block of absmax ``scale``:
    ``map[c] * scale``."""
    return _magnitude_unsigned(np.float32(c)) * scale


@register_jitable
def absmax(values):
    """``max |values|`` of a 1-D float32 array (NaN if any is NaN), as a max over the bit
    patterns with the sign cleared, which is an integer reduction LLVM vectorizes."""
    m = np.uint32(0)
    for i in range(values.size):
        m = max(m, np.uint32(np.float32(values[i]).view(np.uint32) & _ABS))
    return np.uint32(m).view(np.float32)


@register_jitable
def _block_scale(values, codes, zero):
    # (scale, 1/scale) of a block, or (0, 0) / (NaN, 0) with its codes set to zero already.
    m = absmax(values)
    bits = np.float32(m).view(np.uint32)
    if bits >= _NORMAL_BITS and bits < _INF_BITS:
        return m, np.float32(1) / m
    for i in range(codes.size):
        codes[i] = zero
    return (np.float32(0) if bits < _NORMAL_BITS else np.float32(np.nan)), np.float32(0)


@register_jitable
def quantize_block_signed(values, codes):
    """Quantize one block (float32 ``values``, at most :data:`BLOCK`) into ``codes``
    (``uint8``, same length) with the signed map; return its scale.

    The scale is the absmax; a block of zeros or subnormals gets scale 0, one holding NaN or
    Inf scale NaN, both with zero codes (fastrms.lowprecision.quantize_blockwise).
    """
    scale, inv = _block_scale(values, codes, np.uint8(127))
    if inv != 0:
        for i in range(values.size):
            codes[i] = encode_signed(values[i] * inv)
    return scale


@register_jitable
def quantize_block_unsigned(values, codes):
    """As :func:`quantize_block_signed`, with the unsigned map (zero code 0)."""
    scale, inv = _block_scale(values, codes, np.uint8(0))
    if inv != 0:
        for i in range(values.size):
            codes[i] = encode_unsigned(values[i] * inv)
    return scale
