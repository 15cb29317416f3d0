"""The benchmarked algorithms: one table that ``fastrms bench`` and the ``bench/`` suite both use.

:data:`ALGOS` holds the algorithms, with the hyperparameters, state arrays and bytes per element
of each, and how naive NumPy and ``torch.optim`` spell the same step; :func:`make_arrays` makes
the state every variant steps from: random parameters, gradients and moments (second moments
positive), at step :data:`STEP`, so bias corrections and SGD's momentum path are exercised
rather than the special first step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ... import functional, reference

#: The step every variant takes (counting from 1): past the first, whose SGD rule is special.
STEP = 5
DTYPE = np.dtype(np.float32)
#: Sizes of the sweep; :data:`LARGE_SIZES` only on request (about 1 GB per array set).
SIZES = (10**4, 10**5, 10**6, 10**7)
LARGE_SIZES = (5 * 10**7,)
#: Tolerance for variants that compute in another order than the reference. float32 rounds at
#: 6e-8 relative per operation; a step is about ten operations, so differing orders stay
#: within 1e-6 relative, and 1e-6 absolute covers parameters that cross zero.
RTOL, ATOL = 1e-5, 1e-6

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Algo:
    """One benchmarked algorithm: a fastrms rule with fixed options."""

    name: str
    title: str
    rule: str  # the fastrms.functional function
    options: dict  # its hyperparameters; torch.optim uses the same names
    state: tuple[str, ...]  # fastrms state arrays, as keyword names
    naive: Callable[[Arrays, dict], None]  # the textbook NumPy version, from reference.naive_*
    torch_class: str  # the torch.optim class of the same step

    @property
    def reads(self) -> int:
        """Arrays read per element: parameter, gradient and state."""
        return 2 + len(self.state)

    @property
    def writes(self) -> int:
        """Arrays written per element: parameter and state (each also read)."""
        return 1 + len(self.state)

    def bytes_per_element(self, dtype: np.dtype = DTYPE) -> int:
        return np.dtype(dtype).itemsize * (self.reads + self.writes)

    def fastrms_step(self, arrays: Arrays, backend: str) -> Callable[[], None]:
        """The fastrms functional call of one step on ``arrays``, ready to call."""
        kwargs = dict(self.options, backend=backend, **{s: arrays[s] for s in self.state})
        if self.rule != "rmsprop":
            kwargs["step"] = STEP
        return functools.partial(
            getattr(functional, self.rule), arrays["param"], arrays["grad"], **kwargs
        )


def _naive_rmsprop(a: Arrays, o: dict) -> None:
    if o.get("centered"):
        reference.naive_rmsprop_centered_momentum(
            a["param"], a["grad"], a["square_avg"], a["grad_avg"], a["momentum_buffer"],
            lr=o["lr"], alpha=o["alpha"], eps=o["eps"], mu=o["momentum"],
        )  # fmt: skip
    else:
        reference.naive_rmsprop(
            a["param"], a["grad"], a["square_avg"], lr=o["lr"], alpha=o["alpha"], eps=o["eps"]
        )


def _naive_adagrad(a: Arrays, o: dict) -> None:
    reference.naive_adagrad(a["param"], a["grad"], a["state_sum"], lr=o["lr"], eps=o["eps"])


def _naive_adam(a: Arrays, o: dict) -> None:
    args = (a["param"], a["grad"], a["exp_avg"], a["exp_avg_sq"])
    hyper = {"step": STEP, "lr": o["lr"], "betas": o["betas"], "eps": o["eps"]}
    if o.get("amsgrad"):
        reference.naive_amsgrad(*args, a["max_exp_avg_sq"], **hyper)
    else:
        reference.naive_adam(*args, **hyper)


def _naive_sgd(a: Arrays, o: dict) -> None:
    reference.naive_sgd_momentum(
        a["param"], a["grad"], a["momentum_buffer"], lr=o["lr"], mu=o["momentum"]
    )


_RMS = {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8}
_ADAM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}

ALGOS: dict[str, Algo] = {
    a.name: a
    for a in (
        Algo("rmsprop", "RMSProp", "rmsprop", _RMS, ("square_avg",), _naive_rmsprop, "RMSprop"),
        Algo(
            "rmsprop-cm",
            "RMSProp centered+momentum",
            "rmsprop",
            {**_RMS, "centered": True, "momentum": 0.9},
            ("square_avg", "momentum_buffer", "grad_avg"),
            _naive_rmsprop,
            "RMSprop",
        ),
        Algo(
            "adagrad",
            "AdaGrad",
            "adagrad",
            {"lr": 1e-2, "eps": 1e-10},
            ("state_sum",),
            _naive_adagrad,
            "Adagrad",
        ),
        Algo("adam", "Adam", "adam", _ADAM, ("exp_avg", "exp_avg_sq"), _naive_adam, "Adam"),
        Algo(
            "amsgrad",
            "AMSGrad",
            "adam",
            {**_ADAM, "amsgrad": True},
            ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
            _naive_adam,
            "Adam",
        ),
        Algo(
            "sgd-momentum",
            "SGD momentum",
            "sgd",
            {"lr": 1e-3, "momentum": 0.9},
            ("momentum_buffer",),
            _naive_sgd,
            "SGD",
        ),
    )
}

#: The algorithms of the default ``fastrms bench`` sweep (the three the targets name).
DEFAULT_ALGOS = ("rmsprop", "adam", "adagrad")

_POSITIVE = {"square_avg", "state_sum", "exp_avg_sq", "max_exp_avg_sq"}


def make_arrays(algo: Algo, n: int, seed: int = 0) -> Arrays:
    """The starting arrays of a step: ``param``, ``grad`` and the algorithm's state.

    Parameters and gradients are standard normal; first moments and momentum are normal with
    scale 0.1; second moments are in [0.5, 1.5), so centered RMSProp's ``v - m**2`` stays
    positive, and AMSGrad's running maximum is at least the second moment.
    """
    rng = np.random.default_rng(seed)
    arrays = {
        "param": rng.standard_normal(n, dtype=DTYPE),
        "grad": rng.standard_normal(n, dtype=DTYPE),
    }
    for s in algo.state:
        if s in _POSITIVE:
            arrays[s] = rng.random(n, dtype=DTYPE) + DTYPE.type(0.5)
        else:
            arrays[s] = rng.standard_normal(n, dtype=DTYPE) * DTYPE.type(0.1)
    if "max_exp_avg_sq" in arrays:
        np.maximum(arrays["max_exp_avg_sq"], arrays["exp_avg_sq"], out=arrays["max_exp_avg_sq"])
    return arrays


def copy_arrays(arrays: Arrays) -> Arrays:
    return {k: a.copy() for k, a in arrays.items()}


def reference_result(algo: Algo, arrays: Arrays) -> Arrays:
    """The arrays after one step of fastrms's NumPy reference backend (inputs untouched)."""
    out = copy_arrays(arrays)
    algo.fastrms_step(out, "numpy")()
    return out
