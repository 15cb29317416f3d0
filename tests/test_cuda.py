"""The CUDA backend against the NumPy reference.

CI has no GPU: ``.ci/run`` runs this file in its own pytest process under Numba's CUDA
simulator (``NUMBA_ENABLE_CUDASIM=1``, set before numba is imported). Without the simulator or
a CUDA device every test here is skipped. Tests marked ``gpu`` need a real device.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import ALGOS, option_cases

import fastrms
from fastrms import functional

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
CUDA = fastrms.backends()["cuda"]
pytestmark = [
    pytest.mark.cudasim,
    pytest.mark.skipif(not CUDA.available, reason=f"no CUDA target: {CUDA.detail}"),
]
gpu = pytest.mark.skipif(SIMULATOR or not CUDA.available, reason="needs a real CUDA device")

if CUDA.available:
    from numba import cuda


# The simulator runs the rules in Python on NumPy scalars: bit-exact with the CPU. A GPU
# compiler may contract a*b + c into one fused multiply-add (one rounding instead of two), so
# on hardware we allow a few units in the last place per step.
ULPS = 0 if SIMULATOR else 16


def _close(actual, expected):
    if ULPS == 0:
        np.testing.assert_array_equal(actual, expected)
    else:
        rtol = ULPS * np.finfo(expected.dtype).eps
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def _data(shape, dtype, steps, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(shape).astype(dtype)
    grads = [rng.standard_normal(shape).astype(dtype) for _ in range(steps)]
    return p, grads


def _run_both(name, options, shape, dtype, steps=3):
    cls = ALGOS[name].cls
    p, grads = _data(shape, dtype, steps)
    on_device = cls(cuda.to_device(p), **options)
    reference = cls(p.copy(), backend="numpy", **options)
    for g in grads:
        on_device.step(cuda.to_device(g))
        reference.step(g)
    return on_device, reference


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("name", "options"), option_cases())
def test_every_option_matches_reference(name, options, dtype):
    on_device, reference = _run_both(name, options, (97,), dtype)
    _close(on_device._params[0].copy_to_host(), reference._params[0])
    assert on_device.state.keys() == reference.state.keys()
    for key in reference.state:
        _close(on_device.state[key][0].copy_to_host(), reference.state[key][0])


@pytest.mark.parametrize("shape", [(), (1,), (3, 5), (4096,)])
def test_shapes_and_grid_stride(shape):
    # 4096 elements exceed one wave of the simulator's grid (8 blocks x 256 threads), so the
    # grid-stride loop must cover the rest.
    on_device, reference = _run_both("adam", {"amsgrad": True}, shape, np.float32, steps=2)
    out = on_device._params[0].copy_to_host()
    assert out.shape == shape
    _close(out, reference._params[0])


def test_state_lives_on_device_and_state_dict_is_host_numpy():
    on_device, reference = _run_both("rmsprop", {"centered": True, "momentum": 0.9}, (50,),
                                     np.float32)  # fmt: skip
    for arrays in on_device.state.values():
        assert fastrms.arrays.is_device_array(arrays[0])
    sd = on_device.state_dict()
    for key, value in sd.items():
        if key.startswith("state."):
            assert type(value) is np.ndarray
    p, grads = _data((50,), np.float32, 1, seed=1)
    restored = fastrms.RMSProp(cuda.to_device(on_device._params[0].copy_to_host()))
    restored.load_state_dict(sd)
    g = cuda.to_device(grads[0])
    restored.step(g)
    on_device.step(g)
    _close(restored._params[0].copy_to_host(), on_device._params[0].copy_to_host())


def test_functional_on_device_arrays():
    p, (g,) = _data((33,), np.float64, 1)
    d = [cuda.to_device(a) for a in (p, g, np.zeros_like(p))]
    functional.rmsprop(*d, lr=0.1, eps_in_sqrt=True)
    expected = p.copy()
    functional.rmsprop(expected, g, np.zeros_like(p), lr=0.1, eps_in_sqrt=True, backend="numpy")
    _close(d[0].copy_to_host(), expected)


def test_auto_picks_cuda_for_device_arrays():
    p, (g,) = _data((8,), np.float32, 1)
    plan = functional.plan(functional.sgd_setup(step=1), cuda.to_device(p), cuda.to_device(g), {})
    assert plan.backend.name == "cuda"


def _assert_unchanged(arrays, before):
    for a, b in zip(arrays, before):
        host = a.copy_to_host() if hasattr(a, "copy_to_host") else a
        np.testing.assert_array_equal(host, b)


def test_params_on_device_with_grads_on_host_is_refused():
    p, (g,) = _data((8,), np.float32, 1)
    dp = cuda.to_device(p)
    opt = fastrms.Adam(dp)
    with pytest.raises(TypeError, match="grads is in host memory"):
        opt.step(g)
    _assert_unchanged([dp, g], [p, g.copy()])
    assert opt.step_count == 0


def test_params_on_host_with_grads_on_device_is_refused():
    p, (g,) = _data((8,), np.float32, 1)
    opt = fastrms.Adam(p.copy())
    with pytest.raises(TypeError, match="grads is on a CUDA device"):
        opt.step(cuda.to_device(g))
    _assert_unchanged([opt._params[0]], [p])


def test_cuda_backend_with_numpy_arrays_says_how_to_move_them():
    p, (g,) = _data((8,), np.float32, 1)
    with pytest.raises(TypeError, match=r"numba\.cuda\.to_device"):
        functional.sgd(p, g, step=1, backend="cuda")
    with pytest.raises(TypeError, match="backend='cuda'"):
        functional.sgd(cuda.to_device(p), cuda.to_device(g), step=1, backend="cpu")


def test_device_state_overlapping_param_is_refused():
    p, (g,) = _data((8,), np.float32, 1)
    dp = cuda.to_device(p)
    with pytest.raises(ValueError, match="overlaps"):
        functional.rmsprop(dp, cuda.to_device(g), dp)
    _assert_unchanged([dp], [p])


@gpu
def test_arrays_on_two_devices_are_refused():
    if len(cuda.gpus) < 2:
        pytest.skip("needs two CUDA devices")
    p, (g,) = _data((8,), np.float32, 1)
    with cuda.gpus[0]:
        dp = cuda.to_device(p)
    with cuda.gpus[1]:
        dg = cuda.to_device(g)
    with pytest.raises(ValueError, match="device"):
        functional.sgd(dp, dg, step=1)


@gpu
@pytest.mark.gpu
def test_cupy_arrays():
    cp = pytest.importorskip("cupy")
    on_host, grads = _data((1000, 3), np.float32, 3)
    p = cp.asarray(on_host)
    opt, ref = fastrms.Adam(p, amsgrad=True), fastrms.Adam(on_host.copy(), amsgrad=True,
                                                           backend="numpy")  # fmt: skip
    for g in grads:
        opt.step(cp.asarray(g))
        ref.step(g)
    cp.cuda.get_current_stream().synchronize()
    _close(cp.asnumpy(p), ref._params[0])


@gpu
@pytest.mark.gpu
def test_torch_cuda_tensors_on_a_side_stream():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    on_host, grads = _data((777,), np.float32, 3)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        p = torch.as_tensor(on_host, device="cuda")
        opt = fastrms.RMSProp(p, centered=True, momentum=0.9)
        for g in grads:
            opt.step(torch.as_tensor(g, device="cuda"))
    stream.synchronize()
    ref = fastrms.RMSProp(on_host.copy(), centered=True, momentum=0.9, backend="numpy")
    for g in grads:
        ref.step(g)
    _close(p.cpu().numpy(), ref._params[0])
