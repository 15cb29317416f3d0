"""The benchmark cases: one table that ``fastrms bench`` and the ``bench/`` suite both use.

- :data:`ALGOS`: the algorithms, with the hyperparameters, state arrays and bytes per element
  of each, and how naive NumPy and ``torch.optim`` spell the same step.
- :data:`VARIANTS`: the implementations compared (fastrms ``cpu`` on all threads and on one,
  fastrms ``numpy``, naive textbook NumPy, ``torch.optim`` foreach and fused, fastrms
  ``cuda``). ``variant.build(algo, arrays)`` binds one to a set of arrays as a :class:`Runner`.
- :func:`ceiling`: the memory ceiling, a Numba loop with the algorithm's read/write pattern.
- :func:`check`: every variant's result after one step must match the NumPy reference.
- :mod:`fastrms.models` holds the model-shaped workloads (steps over a model's tensors).
- :data:`TARGETS`: what the report checks at n = 10**7.

Every variant steps from the same state: random parameters, gradients and moments (second
moments positive), at step :data:`STEP`, so bias corrections and SGD's momentum path are
exercised rather than the special first step.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import dispatch, functional, reference

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


# -- algorithms --------------------------------------------------------------------------------


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


# -- runners and variants ----------------------------------------------------------------------


@dataclass
class Runner:
    """A variant bound to its arrays: ``step()`` runs one optimizer step, in place.

    ``threads`` is the Numba thread count to run under (None: leave it as set). ``timer``,
    where given, returns the seconds ``k`` steps take by the variant's own clock (CUDA events);
    otherwise :meth:`time` uses ``time.perf_counter``.
    """

    step: Callable[[], None]
    result: Callable[[], Arrays]
    threads: int | None = None
    timer: Callable[[int], float] | None = None
    keep: Any = None  # objects the step needs alive (torch optimizer and tensors)

    def context(self):
        """A context that sets the thread count this runner is measured with."""
        return numba_threads(self.threads) if self.threads else nullcontext()

    def time(self, k: int = 1) -> float:
        """Seconds taken by ``k`` consecutive steps (call inside :meth:`context`)."""
        if self.timer is not None:
            return self.timer(k)
        from time import perf_counter

        step = self.step
        t0 = perf_counter()
        for _ in range(k):
            step()
        return perf_counter() - t0


@contextmanager
def numba_threads(n: int) -> Iterator[None]:
    """Run Numba's parallel loops on ``n`` threads, restoring the previous count after."""
    import numba

    from .threads import configure

    configure()  # before Numba starts a layer by itself (get_num_threads would)
    before = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(before)


@contextmanager
def thread_count(n: int) -> Iterator[None]:
    """Give Numba and (when imported) torch ``n`` threads, restoring both after.

    torch gets the same count as fastrms's ``cpu`` variant, so neither has more cores.
    """
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch else n
    if before != n:  # only when it changes: setting it resizes torch's thread pool
        torch.set_num_threads(n)
    try:
        with numba_threads(n):
            yield
    finally:
        if before != n:
            torch.set_num_threads(before)


@dataclass(frozen=True)
class Variant:
    """One implementation to compare.

    ``build(algo, arrays, threads)`` returns a :class:`Runner` stepping ``arrays`` in place
    (the CUDA variant copies them to the device). ``exact``: its result must equal the NumPy
    reference bit for bit, not only within :data:`RTOL`.
    """

    name: str
    label: str
    build: Callable[[Algo, Arrays, int], Runner]
    exact: bool = False
    device: str = "host"  # which ceiling it is measured against
    why_not: Callable[[Algo], str | None] = field(default=lambda algo: None)

    def title(self, threads: int | None = None) -> str:
        """The label, with the thread count where it has one ("all threads" if None)."""
        count = "all threads" if threads is None else f"{threads} thread" + "s" * (threads > 1)
        return self.label.format(threads=count)

    def unavailable(self, algo: Algo) -> str | None:
        """Why this variant cannot run ``algo`` here, or None if it can."""
        return self.why_not(algo)


def _host_result(arrays: Arrays) -> Callable[[], Arrays]:
    return lambda: arrays


def _fastrms_build(backend: str, one_thread: bool = False):
    """fastrms as users step it: an optimizer class (its plan checked once, then reused),
    holding ``arrays``' state at step :data:`STEP`."""

    def build(algo: Algo, arrays: Arrays, threads: int) -> Runner:
        from .optim import OPTIMIZERS

        opt = OPTIMIZERS[algo.rule](arrays["param"], backend=backend, **algo.options)
        opt.state = {s: [arrays[s]] for s in algo.state}
        opt.step_count = STEP - 1
        step = functools.partial(opt.step, arrays["grad"])
        return Runner(step, _host_result(arrays), 1 if one_thread else None, keep=opt)

    return build


@functools.cache
def _backend_problem(name: str) -> str | None:
    """Why a fastrms backend cannot run here (on one line), or None; probed once."""
    info = dispatch.backends()[name]
    return None if info.available else " ".join(info.detail.split())


def cpu_why_not(algo: Algo) -> str | None:
    return _backend_problem("cpu")


def _naive_build(algo: Algo, arrays: Arrays, threads: int) -> Runner:
    return Runner(functools.partial(algo.naive, arrays, algo.options), _host_result(arrays))


def import_torch():
    """torch, or None if it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def torch_why_not(mode: str) -> Callable[[Algo], str | None]:
    def why_not(algo: Algo) -> str | None:
        torch = import_torch()
        if torch is None:
            return "torch is not installed"
        cls = getattr(torch.optim, algo.torch_class)
        if mode not in inspect.signature(cls).parameters:
            return f"torch {torch.__version__} has no {mode} {algo.torch_class}"
        return None

    return why_not


#: fastrms state names that torch.optim calls otherwise.
TORCH_STATE = {"state_sum": "sum"}


def _torch_build(mode: str):
    def build(algo: Algo, arrays: Arrays, threads: int) -> Runner:
        torch = import_torch()
        p = torch.from_numpy(arrays["param"])  # shares memory: the step updates ``arrays``
        p.grad = torch.from_numpy(arrays["grad"])
        opt = getattr(torch.optim, algo.torch_class)([p], **algo.options, **{mode: True})
        state = {TORCH_STATE.get(s, s): torch.from_numpy(arrays[s]) for s in algo.state}
        if algo.torch_class != "SGD":
            # torch counts the steps taken; it adds one before using the count.
            state["step"] = torch.tensor(float(STEP - 1), dtype=torch.float32)
        opt.state[p] = state
        return Runner(opt.step, _host_result(arrays), keep=(opt, p))

    return build


def _cuda_why_not(algo: Algo) -> str | None:
    if dispatch._is_simulator():
        return "the CUDA simulator is not benchmarked (NUMBA_ENABLE_CUDASIM=1)"
    return _backend_problem("cuda")


def _cuda_build(algo: Algo, arrays: Arrays, threads: int) -> Runner:
    from numba import cuda

    device = {k: cuda.to_device(a) for k, a in arrays.items()}
    launch = algo.fastrms_step(device, "cuda")

    def step() -> None:
        launch()
        cuda.synchronize()

    return Runner(
        step,
        lambda: {k: d.copy_to_host() for k, d in device.items()},
        timer=functools.partial(_cuda_time, launch),
        keep=device,
    )


def _cuda_time(launch: Callable[[], None], k: int) -> float:
    """Seconds for ``k`` launches by CUDA events (the host does not wait between them)."""
    from numba import cuda

    start, end = cuda.event(), cuda.event()
    start.record()
    for _ in range(k):
        launch()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def fastmath() -> bool:
    from .kernels._options import FASTMATH

    return FASTMATH


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("cpu", "fastrms cpu, {threads}", _fastrms_build("cpu"), True, why_not=cpu_why_not),
        Variant(
            "cpu-1t",
            "fastrms cpu, 1 thread",
            _fastrms_build("cpu", True),
            True,
            why_not=cpu_why_not,
        ),
        Variant("numpy", "fastrms numpy", _fastrms_build("numpy"), True),
        Variant("naive", "naive NumPy", _naive_build),
        Variant(
            "torch-foreach",
            "torch foreach",
            _torch_build("foreach"),
            why_not=torch_why_not("foreach"),
        ),
        Variant(
            "torch-fused", "torch fused", _torch_build("fused"), why_not=torch_why_not("fused")
        ),
        Variant("cuda", "fastrms cuda", _cuda_build, device="cuda", why_not=_cuda_why_not),
    )
}

TORCH_VARIANTS = ("torch-foreach", "torch-fused")


def is_exact(variant: Variant) -> bool:
    """Whether ``variant`` must match the reference bit for bit here (not under fastmath)."""
    return variant.exact and not (variant.name.startswith("cpu") and fastmath())


def check(result: Arrays, expected: Arrays, exact: bool) -> str | None:
    """Compare a variant's arrays after one step with the reference's.

    Returns None when they agree (bit for bit if ``exact``, else within
    :data:`RTOL`/:data:`ATOL`), else a description of where they differ.
    """
    for name, want in expected.items():
        got = result[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"{name}: got shape {got.shape} {got.dtype}, expected {want.shape} {want.dtype}"
        rtol, atol = (0.0, 0.0) if exact else (RTOL, ATOL)
        bad = ~np.isclose(got, want, rtol, atol, equal_nan=True)
        if bad.any():
            i = int(np.argmax(bad))
            how = "exactly" if exact else f"within rtol={RTOL}, atol={ATOL}"
            return (
                f"{name} differs from the reference {how} at {int(bad.sum())} of {want.size} "
                f"elements (e.g. [{i}]: {got.flat[i]!r} vs {want.flat[i]!r})"
            )
    return None


def build_checked(
    variant: Variant, algo: Algo, arrays: Arrays, expected: Arrays, threads: int
) -> Runner:
    """Build ``variant`` on ``arrays``, take one step and check it against ``expected``.

    Raises :class:`WrongResult` if it disagrees. The returned runner has taken that step.
    """
    runner = variant.build(algo, arrays, threads)
    with runner.context():
        runner.step()
    problem = check(runner.result(), expected, is_exact(variant))
    if problem:
        n = arrays["param"].size
        where = f"{variant.title(threads)} ({variant.name}), {algo.title}, n={n}"
        raise WrongResult(f"{where}: {problem}")
    return runner


class WrongResult(AssertionError):
    """A benchmarked variant's result disagrees with the NumPy reference."""


# -- the same-pattern ceiling -----------------------------------------------------------------


def _pattern_lines(reads: int, writes: int, indent: str) -> str:
    """Loop body: load ``reads`` arrays, store into the first ``writes`` of them.

    Every load feeds a store, so no load can be dropped; ``c`` is a run-time zero, so the
    stores write back what was read and values stay bounded however often it runs.
    """
    lines = [f"x{j} = a{j}[i]" for j in range(reads)]
    lines.append("s = " + " + ".join(f"x{j}" for j in range(reads)))
    lines += [f"a{j}[i] = x{j} + c * s" for j in range(writes)]
    return "".join(f"{indent}{line}\n" for line in lines)


def _compile_pattern(
    reads: int, writes: int, header: str, decorate, namespace: dict, footer: str = ""
):
    args = ", ".join(f"a{j}" for j in range(reads))
    body = _pattern_lines(reads, writes, " " * 8)
    source = f"def pattern(n, c, {args}):\n{header}{body}{footer}"
    # Generated source, so that one definition serves every read/write count.
    exec(compile(source, f"<ceiling {reads}r/{writes}w>", "exec"), namespace)
    return decorate(namespace["pattern"])


@functools.cache
def ceiling_loops(reads: int, writes: int) -> tuple[Callable, Callable]:
    """``(parallel, serial)`` Numba loops ``loop(n, c, a0, ..., a{reads-1})`` of the pattern,
    compiled with the kernels' own options (``kernels._options.KERNEL_OPTIONS``), so that they
    vectorize as the kernels do (tests/test_report.py checks their LLVM IR)."""
    from numba import njit, prange

    from . import threads
    from .kernels._options import KERNEL_OPTIONS

    par = _compile_pattern(
        reads, writes, "    for i in prange(n):\n", njit(parallel=True, **KERNEL_OPTIONS),
        {"prange": prange},
    )  # fmt: skip
    ser = _compile_pattern(reads, writes, "    for i in range(n):\n", njit(**KERNEL_OPTIONS), {})
    return threads.guard(par), ser


#: Calls of each loop when :func:`ceiling` picks the faster one (the first only warms it).
CEILING_TRIALS = 4


def ceiling(algo: Algo, arrays: Arrays) -> Runner:
    """The host ceiling for ``algo``: a Numba loop with its read/write pattern on ``arrays``.

    It reads parameter, gradient and state and writes parameter and state, as the fused step
    does, and writes back what it reads. It runs the faster of the parallel and the serial
    loop on these arrays (a few calls of each, best against best), whichever size the kernels
    switch at: a ceiling must bound the step whatever its thread count. The report times it
    with the variants and takes its best repetition (:func:`fastrms.report.summarize`).
    """
    loops = ceiling_loops(algo.reads, algo.writes)
    # 1-D views: the loop indexes flat, as the kernels do.
    order = tuple(arrays[k].reshape(-1) for k in ("param", *algo.state, "grad"))
    n = order[0].size
    c = order[0].dtype.type(0)  # typed as the arrays are: a Python float would be float64
    calls = [functools.partial(loop, n, c, *order) for loop in loops]
    best = min(calls, key=_best_time)
    return Runner(best, _host_result(arrays))


def _best_time(call: Callable[[], None]) -> float:
    times = []
    for _ in range(CEILING_TRIALS):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def cuda_ceiling(algo: Algo, arrays: Arrays) -> Runner:
    """The device ceiling: the same pattern as a grid-stride CUDA kernel, timed by events."""
    from numba import cuda

    from .kernels import cuda as kernels

    kernel = _cuda_pattern(algo.reads, algo.writes)
    device = [cuda.to_device(arrays[k].reshape(-1)) for k in ("param", *algo.state, "grad")]
    n = device[0].size
    blocks = min(math.ceil(n / kernels.THREADS_PER_BLOCK), kernels.max_blocks())
    c = DTYPE.type(0)

    def launch() -> None:
        kernel[blocks, kernels.THREADS_PER_BLOCK](n, c, *device)

    def step() -> None:
        launch()
        cuda.synchronize()

    return Runner(step, lambda: arrays, timer=functools.partial(_cuda_time, launch), keep=device)


@functools.cache
def _cuda_pattern(reads: int, writes: int):
    from numba import cuda

    header = "    i = cuda.grid(1)\n    while i < n:\n"
    footer = "        i += cuda.gridsize(1)\n"
    return _compile_pattern(reads, writes, header, cuda.jit, {"cuda": cuda}, footer)


def ceiling_for(variant: Variant, algo: Algo, arrays: Arrays) -> Runner:
    """The ceiling ``variant`` is measured against: host or device."""
    return cuda_ceiling(algo, arrays) if variant.device == "cuda" else ceiling(algo, arrays)


# -- targets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A stated goal: ``variant``'s ``metric`` for ``algo`` at size ``n`` is at least ``bound``.

    ``metric`` is ``"speedup"`` (the time of ``versus`` over the variant's; both from the same
    run) or ``"ceiling"`` (the variant's bandwidth as a fraction of the same-pattern ceiling).
    ``algo=None`` applies to every algorithm measured.
    """

    text: str
    algo: str | None
    n: int
    metric: str
    bound: float
    variant: str = "cpu"
    versus: str | None = None


TARGETS: tuple[Target, ...] = (
    Target(">= 10x naive NumPy", None, 10**7, "speedup", 10.0, versus="naive"),
    Target(">= 85% of the same-pattern ceiling", None, 10**7, "ceiling", 0.85),
    Target(
        ">= 4x torch RMSprop(foreach=True)",
        "rmsprop",
        10**7,
        "speedup",
        4.0,
        versus="torch-foreach",
    ),
    Target(">= 0.95x torch Adam(fused=True)", "adam", 10**7, "speedup", 0.95, versus="torch-fused"),
    Target(
        ">= 0.95x torch Adagrad(fused=True)",
        "adagrad",
        10**7,
        "speedup",
        0.95,
        versus="torch-fused",
    ),  # fmt: skip
    Target(
        ">= 2.2x torch Adam(fused=True), per-call overhead",
        "adam",
        10**5,
        "speedup",
        2.2,
        versus="torch-fused",
    ),  # fmt: skip
)
