"""Shared helpers for the core tests: the optimizers, their option grids, random data, and
bit-for-bit snapshots. Test modules import them with ``from conftest import ...``."""

from __future__ import annotations

import importlib
import io
import itertools
import os
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NoReturn

import numpy as np
import pytest

import fastrms
from fastrms import functional, lowprecision
from fastrms.optim import OPTIMIZERS
from fastrms.specs import SPECS

DTYPES = (np.float32, np.float64)


@dataclass(frozen=True)
class Algo:
    """One optimizer: its class, its one-step function, and a learning rate for the tests."""

    name: str
    cls: type
    step_fn: Any  # fastrms.functional.<name>
    lr: float  # large enough that the parameters move visibly in a few steps
    counts_steps: bool  # whether the functional form takes ``step=``


#: Learning rates large enough that the parameters move visibly in a few steps (an optimizer
#: not listed gets ten times its default).
_TEST_LR = {"rmsprop": 1e-2, "adagrad": 1e-1, "adam": 1e-2, "adamw": 1e-2, "sgd": 5e-2}

#: Every optimizer, from its spec (fastrms.specs): adding one to fastrms adds it here.
ALGOS = {
    name: Algo(
        name,
        OPTIMIZERS[name],
        getattr(functional, name),
        _TEST_LR.get(name, 10 * spec.defaults["lr"]),
        spec.counts_steps,
    )
    for name, spec in SPECS.items()
}


def _grid(**axes) -> list[dict]:
    """Every combination of the given option values, as keyword dicts."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def _option_grid(spec) -> list[dict]:
    """Every valid combination of a spec's boolean options and of its numeric options off (0)
    or on (their ``example`` value)."""
    axes = {}
    for o in spec.options:
        if o.kind == "fixed":
            continue
        if isinstance(o.default, bool):
            axes[o.name] = (False, True)
        elif o.example is not None:
            axes[o.name] = (0.0, o.example)
    grid = []
    for case in _grid(**axes):
        try:
            spec.setup(1, **case)
        except ValueError as exc:  # only Nesterov without momentum, or with dampening
            if not str(exc).startswith("nesterov=True needs momentum > 0"):
                raise
            continue
        grid.append(case)
    return grid


#: Every option combination of each optimizer. ``eps_in_sqrt`` has no PyTorch equivalent;
#: the parity tests leave it out (``option_cases(torch_only=True)``), the others use it all.
OPTION_GRIDS = {name: _option_grid(spec) for name, spec in SPECS.items()}
#: How many combinations each grid has: 2^(flags + numeric options), less SGD's Nesterov
#: without momentum or with dampening (12 of 32). A grid that shrank (an option lost, a
#: combination refused) would quietly test less: change these with the options.
GRID_SIZES = {"rmsprop": 32, "adagrad": 32, "adam": 8, "adamw": 8, "sgd": 20, "lion": 4,
              "adamax": 4, "adadelta": 4, "radam": 8, "nadam": 16}  # fmt: skip
assert {k: len(v) for k, v in OPTION_GRIDS.items()} == GRID_SIZES, OPTION_GRIDS
assert sum(GRID_SIZES.values()) == 136


def _full_state(name: str) -> dict:
    """Options under which an optimizer keeps every state array it has, with as many other
    options on as possible, leaving out eps_in_sqrt (not in PyTorch) and maximize."""
    spec = SPECS[name]
    cases = [c for c in OPTION_GRIDS[name] if not c.get("eps_in_sqrt") and not c.get("maximize")]

    def rank(case):  # most state, then most numeric options on, then most flags
        numeric = sum(1 for v in case.values() if type(v) is float and v != 0)
        flags = sum(1 for v in case.values() if v is True)
        return len(spec.setup(1, **case).state), numeric, flags

    return {k: v for k, v in max(cases, key=rank).items() if v not in (0, False)}


#: For each optimizer, options under which it keeps every state array it has (and that
#: PyTorch has too): the shape, NaN, validation and state-dict tests use these.
FULL_STATE = {name: _full_state(name) for name in SPECS}


def options_id(options: dict) -> str:
    """A short test id: the options that are switched on, e.g. ``centered-momentum=0.9``."""
    parts = [k if v is True else f"{k}={v:g}" for k, v in options.items() if v not in (0, False)]
    return "-".join(parts) or "plain"


#: The optimizers torch.optim has too (fastrms.Lion has no torch.optim counterpart).
IN_TORCH = ("rmsprop", "adagrad", "adam", "adamw", "sgd")


def option_cases(torch_only: bool = False) -> list:
    """``pytest.param(algo_name, options)`` for every optimizer and option combination
    (``torch_only``: of the optimizers PyTorch has, without the options it lacks)."""
    cases = []
    for name, grid in OPTION_GRIDS.items():
        if torch_only and name not in IN_TORCH:
            continue
        for options in grid:
            if torch_only:  # PyTorch knows no eps_in_sqrt: keep the cases without it
                if options.get("eps_in_sqrt"):
                    continue
                options = {k: v for k, v in options.items() if k != "eps_in_sqrt"}
            cases.append(pytest.param(name, options, id=f"{name}-{options_id(options)}"))
    return cases


def randn(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    """Standard normal data in ``dtype``. Never all zeros: a zero gradient or parameter would
    hide most of an update rule, so the tests always step on random values."""
    a = np.asarray(rng.standard_normal(shape, dtype=dtype))
    a[a == 0] = 1
    return a


def all_arrays(opt: fastrms.Optimizer) -> dict[str, np.ndarray]:
    """Every array an optimizer owns or updates: its parameters and each state array."""
    arrays = {f"param{i}": p for i, p in enumerate(opt._params)}
    for name, per_param in opt.state.items():
        for i, a in enumerate(per_param):
            if a is not None:
                arrays[f"{name}{i}"] = a
    return arrays


def assert_same_bits(actual: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    """Equal shape, dtype and bytes (stricter than ``assert_array_equal``: tells -0.0 from
    0.0 and compares NaN payloads)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if actual.tobytes() != expected.tobytes():
        np.testing.assert_array_equal(actual, expected, err_msg=what, strict=True)
        raise AssertionError(f"{what}: equal values but different bits (signed zero or NaN)")


class Snapshot:
    """Copies of arrays, to check later that not one bit of them changed."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays
        self.copies = {k: np.array(a, copy=True) for k, a in arrays.items()}

    def assert_unchanged(self) -> None:
        for k, a in self.arrays.items():
            assert_same_bits(a, self.copies[k], k)


def patterns(a: np.ndarray) -> np.ndarray:
    """A bfloat16 array as its ``uint16`` patterns (for bit comparisons and CUDA arrays, whose
    interface has no bfloat16); any other array as it is."""
    return a.view(np.uint16) if a.dtype == lowprecision.BFLOAT16 else a


def to_device(a: np.ndarray):
    """A Numba device copy of host array ``a`` (bfloat16 as its patterns)."""
    from numba import cuda

    return cuda.to_device(patterns(a))


def from_device(d, like: np.ndarray) -> np.ndarray:
    """Device array ``d`` copied to the host, as bfloat16 where ``like`` is."""
    h = d.copy_to_host()
    return h.view(lowprecision.BFLOAT16) if like.dtype == lowprecision.BFLOAT16 else h


def quiet(call, *args, **kwargs):
    """``call(*args, **kwargs)`` without NumPy's overflow warnings: the CUDA simulator computes
    the codecs on NumPy scalars, which warn when uint32 products wrap (the stochastic-rounding
    hash wraps on purpose)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return call(*args, **kwargs)


def npz_round_trip(state_dict: dict) -> dict:
    """A NumPy optimizer's state dict saved with ``np.savez`` and loaded back (bfloat16 arrays
    come back as 2-byte void, which the optimizers read as their patterns)."""
    f = io.BytesIO()
    np.savez(f, **state_dict)
    f.seek(0)
    return dict(np.load(f))


def torch_round_trip(state_dict: dict) -> dict:
    """A torch optimizer's state dict saved with ``torch.save`` and loaded back."""
    import torch

    f = io.BytesIO()
    torch.save(state_dict, f)
    f.seek(0)
    return torch.load(f)


class FullRouteCounter:
    """Counts a ``fastrms.torch`` optimizer's full-route steps (its ``_buckets`` is called by
    the full route only): ``FullRouteCounter(opt).calls``."""

    def __init__(self, opt) -> None:
        self.calls, self._buckets = 0, opt._buckets
        opt._buckets = self

    def __call__(self):
        self.calls += 1
        return self._buckets()


#: Tolerance of the comparisons with other implementations (PyTorch, the formulas written out
#: in the tests), in units of the dtype's machine epsilon: 16 ulps is rtol 1.9e-6 in float32,
#: 3.6e-15 in float64. PyTorch evaluates some expressions in another order (``lerp`` for the
#: running means, ``addcmul``/``addcdiv`` fold the scalar differently), which costs an ulp or
#: two per step; the running averages forget old errors, so they do not pile up. Measured as
#: |ours - torch| / (max|torch| + |torch|): at most 2.2 ulps over the parity tests (float32,
#: centered RMSprop's grad_avg), and 7.2 ulps in a harsher trial (60 steps, 3000 elements,
#: 3 seeds). 16 leaves room for another CPU's vector code (FMA), while every semantic slip
#: we tried is off by more than 1e11 ulps (test_torch_parity.py::test_tolerance_rejects_...).
ULPS = 16


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    """Equal to within ``ULPS`` ulps of ``expected``'s largest magnitude (atol) or of each
    element (rtol). The absolute part is needed: where a running average nears zero through
    cancellation (grad_avg, momentum buffers), an error of one ulp of its scale is a large
    relative error of that element."""
    tol = ULPS * np.finfo(expected.dtype).eps
    finite = expected[np.isfinite(expected)]  # NaN and Inf must match exactly (see NaN tests)
    scale = float(np.max(np.abs(finite), initial=0.0)) or 1.0
    assert actual.dtype == expected.dtype, what
    with np.errstate(invalid="ignore"):  # inf - inf: such elements are compared below
        within = np.abs(actual - expected) <= tol * (scale + np.abs(expected))
    if not within.all():  # also where NaN or Inf are: let NumPy compare and explain
        np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


# -- safety nets that must not be skipped quietly -------------------------------------------------


def in_ci() -> bool:
    """Whether the tests run under CI (the ``CI`` environment variable, set by CI services)."""
    return bool(os.environ.get("CI"))


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test, or under CI fail it: a check that CI skips protects nothing.

    ``reason`` says what is missing and what to install or set.
    """
    if in_ci():
        pytest.fail(f"{reason} [CI is set, so this is a failure, not a skip]", pytrace=False)
    pytest.skip(reason)


def require(module: str, install: str) -> ModuleType:
    """``import module``, or :func:`skip_or_fail` saying what to install (``install``)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        skip_or_fail(f"{module} is not importable ({exc}); {install}")
