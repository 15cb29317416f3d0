"""The implementations ``fastrms bench`` compares, and the check of their results.

:data:`VARIANTS`: fastrms ``cpu`` on all threads and on one, fastrms ``numpy``, naive textbook
NumPy, ``torch.optim`` foreach and fused, fastrms ``cuda``. ``variant.build(algo, arrays)``
binds one to a set of arrays as a :class:`Runner`. :func:`check`: every variant's result after
one step must match the NumPy reference.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ... import dispatch
from .cases import ATOL, RTOL, STEP, Algo, Arrays


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

    from ...threads import configure

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
    default: bool = True  # timed by ``fastrms bench`` when no --backends is given

    def title(self, threads: int | None = None) -> str:
        """The label, with the thread count where it has one ("all threads" if None)."""
        count = "all threads" if threads is None else f"{threads} thread" + "s" * (threads > 1)
        return self.label.format(threads=count)

    def unavailable(self, algo: Algo) -> str | None:
        """Why this variant cannot run ``algo`` here, or None if it can."""
        return self.why_not(algo)


def host_result(arrays: Arrays) -> Callable[[], Arrays]:
    return lambda: arrays


def _fastrms_build(backend: str, one_thread: bool = False):
    """fastrms as users step it: an optimizer class (its plan checked once, then reused),
    holding ``arrays``' state at step :data:`STEP`."""

    def build(algo: Algo, arrays: Arrays, threads: int) -> Runner:
        from ...optim import OPTIMIZERS

        opt = OPTIMIZERS[algo.rule](arrays["param"], backend=backend, **algo.options)
        opt.state = {s: [arrays[s]] for s in algo.state}
        opt.step_count = STEP - 1
        step = functools.partial(opt.step, arrays["grad"])
        return Runner(step, host_result(arrays), 1 if one_thread else None, keep=opt)

    return build


@functools.cache
def _backend_problem(name: str) -> str | None:
    """Why a fastrms backend cannot run here (on one line), or None; probed once."""
    info = dispatch.backends()[name]
    return None if info.available else " ".join(info.detail.split())


def cpu_why_not(algo: Algo) -> str | None:
    return _backend_problem("cpu")


def _naive_build(algo: Algo, arrays: Arrays, threads: int) -> Runner:
    return Runner(functools.partial(algo.naive, arrays, algo.options), host_result(arrays))


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
        return Runner(opt.step, host_result(arrays), keep=(opt, p))

    return build


#: Whether the CUDA variants may run under Numba's simulator (``fastrms bench
#: --allow-simulator``, the GPU check's smoke run): only to exercise the plumbing, as the
#: simulator's times are not timings of anything. Set it with :func:`allow_simulator`.
_SIMULATOR_ALLOWED = False


def allow_simulator(allowed: bool = True) -> None:
    """Let (or stop letting) the CUDA variants run under Numba's CUDA simulator."""
    global _SIMULATOR_ALLOWED
    _SIMULATOR_ALLOWED = allowed


def simulated() -> bool:
    """Whether CUDA variants here run under the simulator (their figures are no timings)."""
    return dispatch._is_simulator()


def _cuda_why_not(algo: Algo) -> str | None:
    if simulated() and not _SIMULATOR_ALLOWED:
        return "the CUDA simulator is not benchmarked (NUMBA_ENABLE_CUDASIM=1)"
    return _backend_problem("cuda")


def torch_cuda_problem() -> str | None:
    """Why torch cannot run on a CUDA device here (on one line), or None if it can."""
    torch = import_torch()
    if torch is None:
        return "torch is not installed"
    if not torch.cuda.is_available():
        built = torch.version.cuda
        how = f"built for CUDA {built}" if built else "built without CUDA"
        return f"torch {torch.__version__} ({how}) sees no CUDA device"
    return None


def torch_cuda_why_not(mode: str) -> Callable[[Algo], str | None]:
    """As :func:`torch_why_not`, for torch.optim on CUDA tensors: also one step of the
    optimizer on a small CUDA tensor, since torch refuses some modes there (fused Adagrad is
    CPU-only in some versions), and the reason is better reported than raised mid-sweep."""
    on_host = torch_why_not(mode)

    def why_not(algo: Algo) -> str | None:
        return torch_cuda_problem() or on_host(algo) or _torch_cuda_probe(mode, algo)

    return why_not


_probed: dict[tuple[str, str], str | None] = {}


def _torch_cuda_probe(mode: str, algo: Algo) -> str | None:
    key = (mode, algo.name)
    if key not in _probed:
        _probed[key] = _probe_torch_cuda(mode, algo)
    return _probed[key]


def _probe_torch_cuda(mode: str, algo: Algo) -> str | None:
    torch = import_torch()
    try:
        p = torch.ones(64, device="cuda")
        p.grad = torch.full_like(p, 0.5)
        getattr(torch.optim, algo.torch_class)([p], **algo.options, **{mode: True}).step()
        torch.cuda.synchronize()
    except Exception as error:  # whatever torch raises, the sweep goes on without it
        first = " ".join(str(error).split())[:200]
        return f"torch {torch.__version__} {mode} {algo.torch_class} on CUDA: {first}"
    return None


def torch_cuda_time(step: Callable[[], None], k: int) -> float:
    """Seconds for ``k`` calls of ``step`` by torch's CUDA events on its current stream."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    return events_time(start, end, step, k)


def events_time(start, end, step: Callable[[], None], k: int) -> float:
    """Seconds for ``k`` calls of ``step`` between the CUDA events ``start`` and ``end``
    (numba-cuda's or torch's: both record, synchronize and give the elapsed milliseconds)."""
    start.record()
    for _ in range(k):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _torch_cuda_build(mode: str):
    """torch.optim on CUDA copies of ``arrays`` (timed by CUDA events)."""

    def build(algo: Algo, arrays: Arrays, threads: int) -> Runner:
        torch = import_torch()
        device = {k: torch.from_numpy(a).to("cuda") for k, a in arrays.items()}
        p = device["param"]
        p.grad = device["grad"]
        opt = getattr(torch.optim, algo.torch_class)([p], **algo.options, **{mode: True})
        state = {TORCH_STATE.get(s, s): device[s] for s in algo.state}
        if algo.torch_class != "SGD":
            # fused steps keep the count on the parameter's device; foreach on the host.
            where = p.device if mode == "fused" else "cpu"
            state["step"] = torch.tensor(float(STEP - 1), dtype=torch.float32, device=where)
        opt.state[p] = state

        def step() -> None:
            opt.step()
            torch.cuda.synchronize()

        def result() -> Arrays:
            return {k: t.cpu().numpy() for k, t in device.items()}

        timer = functools.partial(torch_cuda_time, opt.step)
        return Runner(step, result, timer=timer, keep=(opt, device))

    return build


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
        timer=functools.partial(cuda_time, launch),
        keep=device,
    )


def cuda_time(launch: Callable[[], None], k: int) -> float:
    """Seconds for ``k`` launches by CUDA events (the host does not wait between them).

    Under the simulator (where events measure nothing) by the host clock: the launches run
    there before they return."""
    from numba import cuda

    if simulated():
        from time import perf_counter

        t0 = perf_counter()
        for _ in range(k):
            launch()
        return perf_counter() - t0
    return events_time(cuda.event(), cuda.event(), launch, k)


def fastmath() -> bool:
    from ...kernels._options import FASTMATH

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
        Variant(
            "torch-cuda-foreach",
            "torch foreach, CUDA",
            _torch_cuda_build("foreach"),
            device="cuda",
            why_not=torch_cuda_why_not("foreach"),
            default=False,
        ),
        Variant(
            "torch-cuda-fused",
            "torch fused, CUDA",
            _torch_cuda_build("fused"),
            device="cuda",
            why_not=torch_cuda_why_not("fused"),
            default=False,
        ),
    )
}
#: The variants ``fastrms bench`` times when no --backends is given (the CUDA torch ones
#: only on request: the GPU check names them).
DEFAULT_VARIANTS = tuple(name for name, v in VARIANTS.items() if v.default)

#: The torch variants a cell's "x torch" compares with, by the device the cell ran on.
TORCH_VARIANTS = ("torch-foreach", "torch-fused")
TORCH_CUDA_VARIANTS = ("torch-cuda-foreach", "torch-cuda-fused")


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
