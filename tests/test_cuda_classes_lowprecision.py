"""The NumPy optimizer classes on CUDA arrays at low precision (issue 18): bfloat16 state,
int8 state beside float32 parameters, and bfloat16 parameters (``uint16`` device arrays of the
patterns) with stochastic or Kahan rounding, their state float32 or int8, bit for bit against
the same class on host arrays
(NumPy, ``ml_dtypes.bfloat16``) stepping the same data on the ``numpy`` backend.

Every test here runs kernels: ``.ci/run`` runs this file under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, ``-m cudasim``), where the results must agree bit for bit; without
the simulator or a device it is skipped. The simulator runs a Python thread per CUDA thread,
so the sizes are small: one parameter of ``MIN_8BIT_SIZE + 44`` elements (8-bit state, its
last block ragged) beside one of 100 (float32 state under int8) and one of 1.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
from conftest import (
    ALGOS,
    FULL_STATE,
    assert_same_bits,
    from_device,
    patterns,
    quiet,
    randn,
    to_device,
)

import fastrms
from fastrms import lowprecision
from fastrms.arrays import is_device_array
from fastrms.lowprecision import MIN_8BIT_SIZE, Quantized
from fastrms.precision import KAHAN_COMP

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
CUDA = fastrms.backends()["cuda"]
pytestmark = [
    pytest.mark.cudasim,
    pytest.mark.skipif(not CUDA.available, reason=f"no CUDA target: {CUDA.detail}"),
]

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
SIZES = (MIN_8BIT_SIZE + 44, 100, 1)
#: bfloat16 parameters: smaller, nothing here depends on 8-bit sizes.
BF16_SIZES = (200, 33, 1)
OPTIONS = {"adam": FULL_STATE["adam"], "rmsprop": {"momentum": 0.9}}
#: name -> (parameter dtype, the class's low-precision options)
VARIANTS = {
    "bf16-state": (F32, {"state_dtype": "bfloat16"}),
    "int8-state": (F32, {"state_dtype": "int8"}),
    "bf16-params-stochastic": (BF16, {"rounding": "stochastic", "seed": 7}),
    "bf16-params-kahan": (BF16, {"rounding": "kahan"}),
    "bf16-params-int8-stochastic": (BF16, {"state_dtype": "int8", "seed": 7}),
    "bf16-params-int8-kahan": (BF16, {"state_dtype": "int8", "rounding": "kahan"}),
}
CASES = [
    pytest.param(name, variant, id=f"{name}-{variant}") for name in OPTIONS for variant in VARIANTS
]


def _make(name: str, variant: str, params: list):
    dtype, low = VARIANTS[variant]
    cls = ALGOS[name].cls
    return cls(params, lr=ALGOS[name].lr, **OPTIONS[name], **low)


def _pair(name: str, variant: str, seed: int = 0):
    """The same problem twice: a host optimizer (numpy backend) and a CUDA one, with the host
    parameters, the device parameters and a function that makes the next step's gradients."""
    dtype, _ = VARIANTS[variant]
    rng = np.random.default_rng(seed + sum(map(ord, name + variant)))
    sizes = BF16_SIZES if dtype == BF16 and "int8" not in variant else SIZES
    params = [randn(rng, n, F32).astype(dtype) for n in sizes]
    device = [to_device(p) for p in params]
    host_opt = _make(name, variant, params)
    host_opt.backend = "numpy"
    device_opt = _make(name, variant, device)

    def grads() -> list[np.ndarray]:
        return [randn(rng, n, F32).astype(dtype) for n in sizes]

    return host_opt, device_opt, params, device, grads


def _step_both(host_opt, device_opt, grads: list[np.ndarray]) -> None:
    quiet(host_opt.step, grads)
    quiet(device_opt.step, [to_device(g) for g in grads])


def _assert_same_dicts(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            assert isinstance(got[key], np.ndarray), key
            assert_same_bits(patterns(got[key]), patterns(value), key)
        else:
            assert got[key] == value, key


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_device_class_matches_the_host_class(name, variant):
    host_opt, device_opt, params, device, grads = _pair(name, variant)
    start = [p.copy() for p in params]
    for _ in range(2):
        _step_both(host_opt, device_opt, grads())
    for i, (d, p) in enumerate(zip(device, params)):
        assert_same_bits(patterns(from_device(d, p)), patterns(p), f"params[{i}]")
    # The state stays on the device, held as the variant says ...
    big = device_opt.state[next(iter(device_opt.state))][0]
    if "int8" in variant:
        assert isinstance(big, Quantized) and is_device_array(big.codes)
        assert is_device_array(big.scales) and big.scales.dtype == F32
        small = device_opt.state[next(iter(device_opt.state))][1]
        assert is_device_array(small) and small.dtype == F32  # under MIN_8BIT_SIZE
    else:
        held = np.uint16 if variant == "bf16-state" else F32
        assert is_device_array(big) and big.dtype == held
    if variant.endswith("kahan"):
        comp = device_opt.state[KAHAN_COMP][0]
        assert is_device_array(comp) and comp.dtype == np.uint16
    # ... and equals the host's, bit for bit (host copies: bfloat16 as ml_dtypes.bfloat16).
    _assert_same_dicts(device_opt.state_dict(), host_opt.state_dict())
    _assert_same_dicts(device_opt.state_dict(dequantize=True), host_opt.state_dict(dequantize=True))
    assert device_opt.state_dict(dequantize=True)["step"] == 2
    # The test means something only if the steps moved the parameters.
    assert not np.array_equal(patterns(params[0]), patterns(start[0]))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_round_trips_bit_for_bit_on_the_device(variant, tmp_path):
    host_opt, device_opt, params, device, grads = _pair("adam", variant, seed=1)
    _step_both(host_opt, device_opt, grads())
    sd = device_opt.state_dict()
    if "int8" in variant:
        assert sd["state.exp_avg.0:codes"].dtype == np.uint8
        assert device_opt.state_dict(dequantize=True)["state.exp_avg.0"].dtype == F32
    np.savez(tmp_path / "sd.npz", **sd)
    loaded = dict(np.load(tmp_path / "sd.npz"))
    # A fresh device optimizer on copies of the device parameters takes the state back ...
    copies = [to_device(from_device(d, p)) for d, p in zip(device, params)]
    again = _make("adam", variant, copies)
    again.load_state_dict(loaded)
    _assert_same_dicts(again.state_dict(), sd)
    for arrays in again.state.values():
        for a in arrays:
            assert is_device_array(a.codes if isinstance(a, Quantized) else a)
    # ... and steps on from it as the host optimizer does.
    g = grads()
    _step_both(host_opt, again, g)
    for i, (d, p) in enumerate(zip(copies, params)):
        assert_same_bits(patterns(from_device(d, p)), patterns(p), f"params[{i}]")
    _assert_same_dicts(again.state_dict(), host_opt.state_dict())
    # A float32 (dequantized) host state dict loads too: int8 quantizes it on load, on the
    # device as on the host.
    wide = host_opt.state_dict(dequantize=True)
    host_opt.load_state_dict(wide)
    again.load_state_dict(wide)
    _assert_same_dicts(again.state_dict(), host_opt.state_dict())


# -- refusals: nothing written -------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["bf16-state", "int8-state", "bf16-params-kahan"])
def test_a_host_state_array_beside_a_device_param_is_refused(variant):
    _, device_opt, params, device, grads = _pair("adam", variant, seed=3)
    g = [to_device(x) for x in grads()]
    quiet(device_opt.step, g)
    before = device_opt.state_dict()
    stepped = [from_device(d, p) for d, p in zip(device, params)]
    name = KAHAN_COMP if variant == "bf16-params-kahan" else "exp_avg"
    for i in (0, -1):  # the first parameter's (an int8 pair), then the last's, checked last
        held = device_opt.state[name][i]
        if isinstance(held, Quantized):
            codes, scales = held.codes.copy_to_host(), held.scales.copy_to_host()
            device_opt.state[name][i] = Quantized(codes, scales)
        else:
            device_opt.state[name][i] = held.copy_to_host()
        with pytest.raises(TypeError, match="in host memory"):
            quiet(device_opt.step, g)
        device_opt.state[name][i] = held
    _assert_same_dicts(device_opt.state_dict(), before)
    for i, (d, p) in enumerate(zip(device, stepped)):
        assert_same_bits(patterns(from_device(d, p)), patterns(p), f"params[{i}]")


def test_a_bad_state_dict_is_refused_and_nothing_is_written():
    _, device_opt, _, _, grads = _pair("adam", "bf16-state", seed=4)
    quiet(device_opt.step, [to_device(x) for x in grads()])
    before = device_opt.state_dict()
    bad = dict(before)
    bad["state.exp_avg.1"] = np.zeros(3, BF16)
    with pytest.raises(ValueError, match=r"state_dict\['state.exp_avg.1'\] has shape"):
        device_opt.load_state_dict(bad)
    _assert_same_dicts(device_opt.state_dict(), before)
    assert lowprecision.BFLOAT16 == before["state.exp_avg.0"].dtype
