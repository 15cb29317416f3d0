"""The storage model reaches the kernels: a storage with a codec runs through the generated
grouped kernels with the rules and loops unchanged (issue 17).

The test registers a bf16 codec of its own (uint16 held, float32 compute, round to nearest
even on store) and steps Adam with bf16 moments through the grouped kernels (serial, parallel
and the team's C function), against NumPy doing the same float32 operations and the same
rounding. Only the kernels are tested: the frontends' array checks accept the float storages
alone until the next issue adds bf16 as a storage of its own.
"""

from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, register_jitable

from fastrms import precision, schedule, threads
from fastrms.kernels import columns, elementwise, rules
from fastrms.specs import SPECS


@intrinsic
def _float_of_bits(typingctx, u):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _bits_of_float(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@register_jitable(inline="always")
def bf16_load(a, i):
    return _float_of_bits(np.uint32(a[i]) << np.uint32(16))


@register_jitable(inline="always")
def bf16_store(a, i, x):
    u = _bits_of_float(x)
    if x != x:
        a[i] = np.uint16(0x7FC0)
    else:
        a[i] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> 16)


def numpy_load(u):
    return (u.astype(np.uint32) << 16).view(np.float32)


def numpy_store(x):
    u = x.view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


BF16 = precision.Storage("bf16-test", "uint16", "float32", codec="bf16-test")
F32 = precision.STORAGES["float32"]


@pytest.fixture
def bf16(monkeypatch):
    monkeypatch.setitem(columns.CODECS, "bf16-test", (bf16_load, bf16_store))


def _numpy_adam(p, g, m, v, h):
    """Adam (no amsgrad) in float32 with bf16 moments, in the rule's order of operations."""
    step_size, inv_bc2, b1, omb1, b2, omb2, eps, wd, decay, sign = h
    p32 = decay * p
    grad = sign * g
    if wd != 0:
        grad = grad + wd * p32
    m1 = b1 * numpy_load(m) + omb1 * grad
    v1 = b2 * numpy_load(v) + omb2 * grad * grad
    m[...], v[...] = numpy_store(m1), numpy_store(v1)
    p[...] = p32 - step_size * m1 / (np.sqrt(v1) * inv_bc2 + eps)


def _case(sizes, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        p, g = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
        m = numpy_store(rng.standard_normal(n).astype(np.float32) * 0.1)
        v = numpy_store(rng.random(n).astype(np.float32) * 0.01)
        rows.append([p, g, m, v])
    return rows


def _table(rows):
    # The unused amsgrad slot holds the parameter's address, as the grouped step lays it out.
    return np.array([[r[0].size, *(a.ctypes.data for a in r), r[0].ctypes.data] for r in rows],
                    np.int64)  # fmt: skip


@pytest.mark.parametrize("route", ["serial", "parallel", "team"])
def test_adam_with_bf16_moments_through_the_grouped_kernels(bf16, route):
    sig = precision.signature("adam", np.dtype(np.float32), (BF16, BF16, BF16))
    assert sig.columns == ("float32", "float32", "uint16", "uint16", "uint16")
    setup = SPECS["adam"].setup(3, weight_decay=0.01)
    hyper = precision.cast_array("adam", setup.scalars, np.dtype(np.float32))
    rows = _case([0, 5, 1000, 70_000])
    want = [[a.copy() for a in r] for r in rows]
    table = _table(rows)
    part_ptr, items = schedule.schedule(table[:, 0], 1 if route == "serial" else 6)
    for _ in range(2):
        if route == "team":
            body = elementwise.team_body(rules.adam, setup.flags, sig)
            scalars = np.array(hyper)
            block = schedule.team_block(table, part_ptr, items, scalars)
            ctypes.CFUNCTYPE(None, ctypes.c_int64)(body.address)(block.ctypes.data)
        else:
            parallel, serial = elementwise.grouped_loops(rules.adam, setup.flags, sig)
            # guard: fastrms chooses Numba's threading layer before a parallel kernel starts it
            kernel = serial if route == "serial" else threads.guard(parallel)
            kernel(table, part_ptr, items, hyper)
        for r in want:
            _numpy_adam(*r, hyper)
    for got, expected in zip(rows, want):
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)


def test_a_codec_column_loop_stays_float32_and_vectorized(bf16):
    sig = precision.signature("adam", np.dtype(np.float32), (BF16, BF16, F32))
    serial = elementwise.grouped_loops(rules.adam, (False,), sig)[1]
    fresh = njit(cache=False, error_model="numpy")(serial.py_func)
    table = types.Array(types.int64, 2, "C")
    signature = (table, types.Array(types.int64, 1, "C"), table, types.Array(types.float32, 1, "C"))
    fresh.compile(signature)
    llvm = fresh.inspect_llvm(signature)
    assert re.search(r"<\d+ x float>", llvm), "the loop over bf16 columns was not vectorized"
    assert re.search(r"<\d+ x i16>", llvm), "the bf16 columns were not loaded as vectors"
    assert not re.search(r"\bfpext\b|llvm\.sqrt\.f64", llvm)


def test_an_unknown_codec_is_refused():
    nowhere = precision.Storage("nowhere", "uint16", "float32", codec="nowhere")
    sig = precision.signature("adam", np.dtype(np.float32), (nowhere, F32, F32))
    with pytest.raises(ValueError, match="no codec 'nowhere' is registered"):
        elementwise.grouped_loops(rules.adam, (False,), sig)
