"""The float32 CUDA kernels compute in float32: no float64 instruction in their PTX (nor in
the grouped kernels of bfloat16 state and parameters).

Compiling to PTX needs numba-cuda and NVVM/NVRTC (the ``test`` extra installs them from PyPI),
not a GPU, so this runs in CI. It cannot run under the simulator, which has no compiler.
"""

import itertools
import os
import re

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("the CUDA simulator compiles no PTX", allow_module_level=True)

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
from numba import types  # noqa: E402

from fastrms import functional, precision  # noqa: E402
from fastrms.kernels import cuda as cuda_kernels  # noqa: E402
from fastrms.kernels import elementwise, rules  # noqa: E402
from fastrms.lowprecision import BFLOAT16  # noqa: E402
from fastrms.specs import LAYOUTS  # noqa: E402

#: Every rule (from fastrms.specs, so a new one is checked too): its flags and scalars.
N_FLAGS = {name: len(layout.flags) for name, layout in LAYOUTS.items()}
N_HYPER = {name: len(layout.scalars) for name, layout in LAYOUTS.items()}
#: The rules that divide and take square roots (Lion only moves by lr * sign).
DIVIDES = ("rmsprop", "adagrad", "adam", "adadelta", "nadam")  # (RAdam only where it rectifies)
F64 = re.compile(r"^\s*[a-z]+(\.[a-z0-9]+)*\.f64\b", re.M)  # any instruction typed .f64


class _Sm90:
    compute_capability = (9, 0)


@pytest.fixture(autouse=True)
def _no_driver_needed(monkeypatch):
    # numba-cuda asks the driver for the compute capability when it compiles a rule as a
    # device function; CI has no driver, so name the Hopper target the PTX is built for.
    import numba.cuda.dispatcher

    monkeypatch.setattr(numba.cuda.dispatcher, "get_current_device", _Sm90)


def _ptx(rule, flags, dtype):
    kernel = cuda_kernels.grid_stride(rules.RULES[rule], flags)
    arrays = types.UniTuple(types.Array(dtype, 1, "C"), 2 + len(functional.SLOTS[rule]))
    sig = (types.int64, arrays, types.UniTuple(dtype, N_HYPER[rule]))
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
    return ptx


CASES = [
    (rule, flags)
    for rule, n in N_FLAGS.items()
    for flags in itertools.product([False, True], repeat=n)
    if not (rule == "sgd" and flags == (False, True))  # nesterov needs momentum
]


@pytest.mark.parametrize(("rule", "flags"), CASES, ids=str)
def test_float32_kernel_has_no_float64_arithmetic(rule, flags):
    try:
        ptx = _ptx(rule, flags, types.float32)
    except Exception as exc:  # noqa: BLE001 - name what is missing instead of a traceback
        pytest.fail(f"cannot compile PTX here ({type(exc).__name__}: {exc}); "
                    "install the test extra, which brings NVRTC and NVVM")  # fmt: skip
    assert not F64.findall(ptx), "float64 instruction in a float32 kernel"
    assert re.search(r"\b(mul|fma\.rn)\.f32\b", ptx), "no float32 arithmetic found at all"
    if rule in DIVIDES or (rule == "radam" and flags[0]):  # precise (not fastmath) float32
        # division and square root
        assert re.search(r"\bdiv\.rn\.f32\b", ptx)
        assert re.search(r"\bsqrt\.rn\.f32\b", ptx)


def test_every_rule_is_checked():
    assert {rule for rule, _ in CASES} == set(rules.RULES) == {"rmsprop", "adagrad", "adam",
                                                               "sgd", "lion", "adamax",
                                                               "adadelta", "radam",
                                                               "nadam"}  # fmt: skip


def test_float64_kernel_is_float64():
    # The check above would pass vacuously if the pattern never matched: it does match here.
    assert F64.search(_ptx("rmsprop", (True, True, False), types.float64))


# -- the grouped kernels of bfloat16 state and parameters (codec columns) ----------------------

_B = precision.STORAGES["bfloat16"]
CODEC_SIGNATURES = {
    "bf16-state": precision.signature("adam", np.dtype(np.float32), (_B, _B, _B)),
    "bf16-params-stochastic": precision.signature("adam", BFLOAT16, rounding="stochastic"),
    "bf16-params-kahan-bf16-state": precision.signature(
        "adam", BFLOAT16, (_B, _B, _B), rounding="kahan"
    ),
}


@pytest.mark.parametrize("case", list(CODEC_SIGNATURES))
def test_codec_grouped_kernels_are_float32_and_keep_their_locals_in_registers(case):
    """Adam (every slot in use) over bfloat16 state, bfloat16 parameters rounded
    stochastically, and bfloat16 parameters with a Kahan compensation and bfloat16 state: the
    kernels generated per signature compute in float32, load and store the 16-bit patterns,
    and stage each element in registers, not local memory."""
    sig = CODEC_SIGNATURES[case]
    flags = (True,) * N_FLAGS["adam"]
    kernel = cuda_kernels.grouped_kernel(rules.adam, flags, sig.table_width - 1, sig)
    scalars = types.UniTuple(types.float32, N_HYPER["adam"])
    args = (types.int64[::1], types.int64, types.int64, types.int64, scalars)
    if elementwise.cuda_keyed_columns(sig):  # stochastic rounding's key words
        args += (types.int64[::1],)
    try:
        ptx, _ = cuda.compile_ptx(kernel.py_func, args, cc=(9, 0))
    except Exception as exc:  # noqa: BLE001 - name what is missing instead of a traceback
        pytest.fail(f"cannot compile PTX here ({type(exc).__name__}: {exc}); "
                    "install the test extra, which brings NVRTC and NVVM")  # fmt: skip
    assert not F64.findall(ptx), "float64 instruction in a float32 kernel"
    assert re.search(r"\bdiv\.rn\.f32\b", ptx) and re.search(r"\bsqrt\.rn\.f32\b", ptx)
    assert re.search(r"\bld\.global\.u16\b", ptx) and re.search(r"\bst\.global\.u16\b", ptx)
    assert not re.search(r"\b(ld|st)\.local\b", ptx), "an element's locals spilled to memory"


def test_float_grouped_kernel_is_float32_with_no_local_memory():
    """The grouped kernel of float32 arrays (the chunk loop it shares with the codec kernels
    above, :data:`fastrms.kernels.elementwise._CUDA_GROUPED_SOURCE`): Adam with every slot."""
    sig = precision.signature("adam", np.dtype(np.float32))
    kernel = cuda_kernels.grouped_kernel(rules.adam, (True,) * N_FLAGS["adam"], 5, sig)
    scalars = types.UniTuple(types.float32, N_HYPER["adam"])
    args = (types.int64[::1], types.int64, types.int64, types.int64, scalars)
    ptx, _ = cuda.compile_ptx(kernel.py_func, args, cc=(9, 0))
    assert not F64.findall(ptx), "float64 instruction in a float32 kernel"
    assert re.search(r"\bdiv\.rn\.f32\b", ptx) and re.search(r"\bsqrt\.rn\.f32\b", ptx)
    assert re.search(r"\bld\.global\.f32\b", ptx) and re.search(r"\bst\.global\.f32\b", ptx)
    assert not re.search(r"\b(ld|st)\.local\b", ptx)


# -- the int8 blockwise kernel (kernels/cuda_blockwise.py) ---------------------------------------


def _blockwise_ptx(name, options, rounding=None):
    from fastrms.kernels import cuda_blockwise
    from fastrms.lowprecision import MIN_8BIT_SIZE
    from fastrms.specs import SPECS

    setup = SPECS[name].setup(1, **options)
    storages = precision.slot_storages(setup.rule, precision.STORAGES["int8"], MIN_8BIT_SIZE)
    param = np.dtype(np.float32) if rounding is None else BFLOAT16
    sig = precision.signature(setup.rule, param, storages, rounding=rounding)
    used = tuple(s in setup.state for s in LAYOUTS[setup.rule].slots)
    kernel = cuda_blockwise.block_kernel(rules.RULES[setup.rule], setup.flags, sig, used)
    hyper = types.UniTuple(types.float32, N_HYPER[setup.rule])
    args = (types.int64[::1], types.int64, types.int64, hyper)
    if rounding == "stochastic":  # the key words
        args += (types.int64[::1],)
    ptx, _ = cuda.compile_ptx(kernel.py_func, args, cc=(9, 0))
    return ptx


@pytest.mark.parametrize(
    ("name", "options", "rounding"),
    [
        ("adam", {}, None),
        ("rmsprop", {"momentum": 0.9}, None),
        ("adam", {}, "stochastic"),
        ("adam", {}, "kahan"),
    ],
    ids=["adam", "rmsprop-momentum", "adam-bf16-stochastic", "adam-bf16-kahan"],
)
def test_int8_blockwise_kernel_compiles_to_float32_ptx(name, options, rounding):
    try:
        ptx = _blockwise_ptx(name, options, rounding)
    except Exception as exc:  # noqa: BLE001 - name what is missing instead of a traceback
        pytest.fail(f"cannot compile PTX here ({type(exc).__name__}: {exc}); "
                    "install the test extra, which brings NVRTC and NVVM")  # fmt: skip
    assert not F64.findall(ptx), "float64 instruction in the int8 blockwise kernel"
    assert re.search(r"\bdiv\.rn\.f32\b", ptx) and re.search(r"\bsqrt\.rn\.f32\b", ptx)
    assert re.search(r"\batom\.shared\.max\.u32\b", ptx), "the absmax is no shared atomic max"
    assert re.search(r"\b(bar|barrier)\.sync\b", ptx), "no barrier"
    assert re.search(r"\bst(\.global)?\.u8\b", ptx), "no codes stored"
    assert re.search(r"\bst\.shared\.f32\b", ptx), "no shared scratch"
    if rounding is not None:  # a bfloat16 parameter: loaded and stored as 16-bit patterns
        assert re.search(r"\bld(\.global)?\.u16\b", ptx), "no 16-bit load"
        assert re.search(r"\bst(\.global)?\.u16\b", ptx), "no 16-bit store"
    assert not re.search(r"\b(ld|st)\.local\b", ptx), "local memory in the blockwise kernel"
