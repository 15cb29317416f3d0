"""Low precision in the NumPy classes: a bad step after good ones is refused and writes nothing.

Each optimizer is stepped twice with good gradients, so that its plan is built and its state
(bfloat16 arrays, int8 codes and scales, Kahan buffers) is live; then a step with one bad
array in the *last* parameter must raise, leave every array bit for bit as it was and keep
the step count; and the next good step must give the bits of a twin that never saw the bad
calls (so no hidden state, such as stochastic rounding's step key, moved either).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_same_bits, randn

import fastrms
from fastrms.lowprecision import BFLOAT16, Quantized

#: A tensor under 4096 elements (float32 state under int8), one with a ragged last block, a 2-D one.
SIZES = (7, 5000, (80, 70))

CASES = {
    "bf16 params, stochastic": (BFLOAT16, {"rounding": "stochastic", "seed": 3}),
    "bf16 params, kahan": (BFLOAT16, {"rounding": "kahan"}),
    "bf16 params and state, nearest": (BFLOAT16, {"rounding": "nearest",
                                                  "state_dtype": "bfloat16"}),
    "bf16 state": (np.dtype(np.float32), {"state_dtype": "bfloat16"}),
    "int8 state": (np.dtype(np.float32), {"state_dtype": "int8"}),
}  # fmt: skip


def _arrays(opt) -> dict[str, np.ndarray]:
    """Every array the optimizer holds: parameters, state arrays, codes and scales."""
    out = {f"param{i}": p for i, p in enumerate(opt._params)}
    for name, per_param in opt.state.items():
        for i, a in enumerate(per_param):
            if isinstance(a, Quantized):
                out[f"{name}{i}.codes"], out[f"{name}{i}.scales"] = a.codes, a.scales
            elif a is not None:
                out[f"{name}{i}"] = a
    return out


def _bits(arrays: dict) -> dict:
    return {k: np.array(a, copy=True) for k, a in arrays.items()}


def _pair(dtype, options, seed=5):
    rng = np.random.default_rng(seed)
    params = [randn(rng, s, np.float32).astype(dtype) for s in SIZES]
    grads = [[(randn(rng, s, np.float32) * 0.1).astype(dtype) for s in SIZES] for _ in range(3)]
    opts = [fastrms.Adam([p.copy() for p in params], lr=1e-2, backend="cpu", **options)
            for _ in range(2)]  # fmt: skip
    return opts, grads


def _bad_grads(grads, dtype):
    """Bad last gradients: another dtype, another shape; and the error each raises."""
    last = grads[-1]
    other = np.float64 if dtype == BFLOAT16 else BFLOAT16
    yield "dtype", TypeError, [*grads[:-1], last.astype(other)]
    yield "shape", ValueError, [*grads[:-1], last.reshape(-1)[:-1].copy()]


def _bad_state(opt, options):
    """Bad last-parameter state, as ``(slot, replacement, error)``: float32 where bf16 or a
    Kahan buffer is held, scales of the wrong size where int8 is."""
    if options.get("rounding") == "kahan":
        yield "kahan_comp", np.zeros(SIZES[-1], np.float32), (TypeError, ValueError)
    held = opt.state["exp_avg"][-1]
    if isinstance(held, Quantized):
        yield "exp_avg", Quantized(held.codes, held.scales[:-1].copy()), ValueError
    elif held.dtype == BFLOAT16:
        yield "exp_avg", np.zeros(SIZES[-1], np.float32), (TypeError, ValueError)


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_step_after_good_ones_writes_nothing(case):
    dtype, options = CASES[case]
    (opt, twin), grads = _pair(dtype, options)
    for g in grads[:2]:
        opt.step(g)
        twin.step(g)
    before = _bits(_arrays(opt))
    count = opt.step_count
    refusals = 0
    for _what, error, bad in _bad_grads(grads[2], dtype):
        with pytest.raises(error):
            opt.step(bad)
        refusals += 1
    for slot, replacement, error in _bad_state(opt, options):
        kept = opt.state[slot][-1]
        opt.state[slot][-1] = replacement
        with pytest.raises(error):
            opt.step(grads[2])
        opt.state[slot][-1] = kept
        refusals += 1
    assert refusals >= 2 + ("kahan" in case or "state" in case)
    after = _arrays(opt)
    assert after.keys() == before.keys()
    for k, a in after.items():
        assert_same_bits(a, before[k], k)
    assert opt.step_count == count
    opt.step(grads[2])
    twin.step(grads[2])
    want = _arrays(twin)
    for k, a in _arrays(opt).items():
        assert_same_bits(a, want[k], k)
