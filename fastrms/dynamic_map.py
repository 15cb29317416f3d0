"""Dettmers et al.'s dynamic map (2021) of 8-bit blockwise state, the NumPy reference: its 256
code values (:func:`dynamic_map`), the cell edges between them (:func:`edges`) and the nearest
code by a table search (:func:`encode`).

fastrms's kernels use an 8-bit float-like map instead (:class:`fastrms.lowprecision.Float8Map`),
whose encoder is a few integer operations; this one stays as reference code for
``fastrms.lowprecision.quantize_blockwise(x, signed, map="dynamic")`` and for the closed-form
codec of :mod:`fastrms.kernels.codecs`, which it checks. :mod:`fastrms.lowprecision` re-exports
its names.
"""

from __future__ import annotations

import numpy as np

#: 10^(d-7) as float32, the lower end of decade d = 0 ... 6 of the dynamic map.
DECADES = tuple(np.float32(s) for s in ("1e-7", "1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"))


def _layout(signed: bool) -> tuple[int, int]:
    """``(off, qmax)``: decade ``d`` holds the magnitude indices ``q`` with ``q + off`` in
    ``[2^(d+off), 2^(d+1+off))``, and ``qmax`` is the index of the code 1.0."""
    return (0, 128) if signed else (1, 255)


def _point(f: np.ndarray, off: int) -> np.ndarray:
    """The map's formula at position ``f`` (float32 >= 1): with ``f = 2^e * m``, ``m`` in
    ``[1, 2)`` and decade ``d = e - off``, it is ``r * 10^(d-7)`` in float32, where ``r = 9*m - 8``
    or, where ``f`` is a power of two (the first index of a decade, ``m = 1``),
    ``r = 1 + 1.8 / f``. At the positions used (``f = q + off`` or ``q + off + 1/2``) ``9*m - 8``
    is exact, so those points are rounded once; the power-of-two ones (edges between decades)
    a few times, and still lie within one ulp of the midpoints they stand for (tested)."""
    bits = f.view(np.uint32)
    decade = (bits >> np.uint32(23)).astype(np.int64) - 127 - off
    mant = bits & np.uint32(0x7FFFFF)
    m = (mant | np.uint32(0x3F800000)).view(np.float32)
    r = np.where(mant == 0, np.float32(1) + np.float32(1.8) / f, m * np.float32(9) - np.float32(8))
    return r * np.asarray(DECADES, np.float32)[decade]


def magnitudes(signed: bool) -> np.ndarray:
    """The non-negative half of the dynamic map, ``Q[0] = 0 < Q[1] < ... < Q[qmax] = 1``
    (float32; ``qmax`` is 128 for the signed map, 255 for the unsigned one).

    Decade ``d = 0 ... 6`` holds ``k = 2^(d+off)`` values (``off`` = 0 signed, 1 unsigned), the
    midpoints of ``k`` equal cells of ``[10^(d-7), 10^(d-6)]``::

        Q[q] = 10^(d-7) * (1 + 9 * (j + 1/2) / k),    j = q + off - k  in [0, k)

    which is the formula of :func:`_point` at ``f = q + off + 1/2`` (never a power of two).
    These are the values of bitsandbytes'
    ``create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``,
    ``10^(d-6) * (b_j + b_{j+1}) / 2`` with ``b = linspace(0.1, 1, k + 1)``, rounded
    differently (the two agree within 2 float32 ulps; bitsandbytes computes them in float32
    torch operations).
    """
    off, qmax = _layout(signed)
    q = np.arange(1, qmax, dtype=np.float32)
    out = np.empty(qmax + 1, np.float32)
    out[0], out[qmax] = 0, 1
    out[1:qmax] = _point(q + np.float32(off) + np.float32(0.5), off)
    return out


def dynamic_map(signed: bool) -> np.ndarray:
    """The 256 code values, ascending (float32): ``value = dynamic_map(signed)[code]``.

    - unsigned (second moments): ``magnitudes(False)``, 0 (code 0) to 1 (code 255);
    - signed (first moments): ``-Q[127], ..., -Q[1], 0, Q[1], ..., Q[128] = 1`` with
      ``Q = magnitudes(True)``: code 127 is zero, code ``127 + q`` is ``Q[q]``, code
      ``127 - q`` is ``-Q[q]``; there is no -1 (bitsandbytes' layout).
    """
    q = magnitudes(signed)
    return np.concatenate([-q[127:0:-1], q]) if signed else q


def zero_code(signed: bool) -> int:
    """The code of 0: 127 in the signed map, 0 in the unsigned one."""
    return 127 if signed else 0


def edges(signed: bool) -> np.ndarray:
    """The cell edges of the magnitudes: ``E[q]`` for ``q = 1 ... qmax`` (``E[0]`` is unused
    and set to 0); a magnitude ``a`` gets index ``q`` iff ``E[q] <= a < E[q+1]``.

    Each edge is the midpoint of ``Q[q-1]`` and ``Q[q]`` (so the index is the nearest one,
    ties going up), computed by a formula the codec evaluates in closed form:

    - inside a decade, the shared end of two cells, ``10^(d-7) * (1 + 9 * j / k)``:
      :func:`_point` at ``f = q + off``;
    - at the first index of decade ``d >= 1`` (``f = q + off = k = 2^(d+off)``), between the
      last value of decade ``d-1`` and the first of ``d``: :func:`_point` gives
      ``10^(d-7) * (1 + 1.8 / k)``, the midpoint of the two formula values;
    - ``E[1] = Q[1] / 2`` and ``E[qmax] = (Q[qmax-1] + 1) / 2``, in float32.

    These are the midpoints of the formula's exact values, rounded to float32, not the
    midpoints of the rounded values: a test bounds the difference by two float32 ulps.
    """
    off, qmax = _layout(signed)
    q = magnitudes(signed)
    f = np.arange(2 + off, qmax + off, dtype=np.float32)
    out = np.zeros(qmax + 1, np.float32)
    out[1] = q[1] * np.float32(0.5)
    out[2:qmax] = _point(f, off)
    out[qmax] = (q[qmax - 1] + np.float32(1)) * np.float32(0.5)
    return out


def encode(y: np.ndarray, signed: bool) -> np.ndarray:
    """The codes nearest to finite float32 values ``y`` (``uint8``): for the signed map
    ``127 + q`` where ``y >= 0`` and ``127 - min(q, 127)`` where ``y < 0``, for the unsigned map
    ``q`` of ``max(y, 0)``, with ``q`` the number of :func:`edges` ``<= |y|`` (a table search).
    """
    y = np.asarray(y, np.float32)
    e = edges(signed)[1:]
    if signed:
        q = np.searchsorted(e, np.abs(y), side="right")
        return np.where(y < 0, 127 - np.minimum(q, 127), 127 + q).astype(np.uint8)
    return np.searchsorted(e, np.maximum(y, 0), side="right").astype(np.uint8)
