"""One step over many arrays: a checked, reusable plan that runs each group as one call.

A training loop steps the same parameters with gradients of the same shapes every time.
:class:`StepPlan` checks the parameters and their state once (kinds, dtypes, shapes,
contiguity, writeability, and that nothing written overlaps anything else), groups them by
(backend, dtype), and lays out each group for its kernel:

- ``cpu``: one table of element counts and addresses per group (an int64 row per array:
  ``size, param, grad, state...``) and a schedule that cuts the concatenated elements into
  equal parts, one or a few per thread, each a list of (array, start, stop) pieces. One
  parallel region then runs the whole group, small and large arrays sharing the threads,
  with no thread-team start per array. The user's arrays stay where they are: nothing is
  copied into a flat buffer.
- ``cuda``: the same table of device addresses, one launch (or a few) per group.
- ``numpy``: the reference, array by array (it is the oracle, not a fast path).

Each step then checks only what can change, cheaply: the gradients (the same objects as last
time need no check; new ones are checked for kind, dtype, shape, contiguity and overlap with
anything written), and the hyperparameters (checked by value, cached). All of it happens
before the first write, and so does compiling each group's kernel: a bad gradient in the
100th of 150 arrays, or a kernel that fails to compile for one group, changes nothing.
"""

from __future__ import annotations

import ctypes
import functools
import operator
from typing import Any, Protocol

import numpy as np

from . import dispatch, teams
from .arrays import (
    DEVICE,
    HOST,
    check_arrays,
    check_no_overlap,
    describe,
    extent,
    host_addresses,
)
from .errors import BackendUnavailableError
from .precision import SLOTS, cast, cast_array, signature
from .schedule import PARTS_PER_THREAD, schedule, team_block
from .specs import Setup


class Team(Protocol):
    """A team of threads that another library owns and starts, such as PyTorch's OpenMP
    team: ``run(function, args, threads)`` calls the C function ``void function(int64
    args)`` (by address) on ``threads`` threads at once, the caller's among them, and returns
    when all have returned."""

    def threads(self) -> int:
        """How many threads a parallel step should use now."""
        ...

    def run(self, function: int, args: int, threads: int) -> None: ...


class StepPlan:
    """A checked step of one rule over many arrays, grouped by backend and dtype.

    Parameters
    ----------
    setup : Setup
        The rule, flags and used state (from :meth:`fastrms.specs.Spec.setup`); later steps
        may pass other scalars but must keep the rule, flags and state.
    params : list of arrays
    state : dict of str -> list of arrays
        One array per parameter for each name in ``setup.state``.
    names : list of str
        How errors name each parameter (``"params[3]"``).
    backend : {"auto", "cuda", "cpu", "numpy"}
    grad_names : list of str, optional
        How errors name each gradient (default: ``names`` with ``params`` -> ``grads``).
    parallel_threshold : int, optional
        A ``cpu`` group of fewer elements in all runs on one thread (default: the backend's,
        ``kernels.cpu.PARALLEL_THRESHOLD``).
    team : Team, None or "auto", optional
        Threads of another library to run the parallel ``cpu`` steps on (``fastrms.torch``
        passes PyTorch's OpenMP team); None: Numba's threading layer. ``"auto"`` (default):
        :func:`fastrms.teams.default_team`, i.e. PyTorch's OpenMP team if this process has
        imported torch, with :data:`fastrms.teams.TEAM_THRESHOLD` as the default threshold.
    """

    def __init__(
        self,
        setup: Setup,
        params: list,
        state: dict[str, list],
        names: list[str],
        backend: str = "auto",
        grad_names: list[str] | None = None,
        parallel_threshold: int | None = None,
        team: Team | None | str = "auto",
    ) -> None:
        if team == "auto":
            team = teams.default_team()
            if team is not None and parallel_threshold is None:
                parallel_threshold = teams.TEAM_THRESHOLD
        self.key = (setup.rule, setup.flags, setup.state, backend)
        self._params = params
        self._names = names
        self._grad_names = grad_names or [n.replace("params", "grads", 1) for n in names]
        self._state_arrays = {s: list(state[s]) for s in setup.state}
        written = []
        groups: dict[tuple, list[int]] = {}
        infos = []
        for i, p in enumerate(params):
            named = {names[i]: p} | {f"{s} of {names[i]}": state[s][i] for s in setup.state}
            info = check_arrays(named, tuple(named))
            infos.append(info)
            try:
                chosen, auto = dispatch.resolve(backend, info.kind)
            except TypeError as exc:
                raise TypeError(f"{names[i]}: {exc}") from None
            key = (chosen.name, auto, signature(setup.rule, info.dtype))
            groups.setdefault(key, []).append(i)
            written += [(label, a, True) for label, a in named.items()]
        check_no_overlap(written)
        kinds = {info.kind for info in infos}
        self._spans = {k: _Spans([w for w in written if _kind(w[1]) == k]) for k in kinds}
        self._kinds = np.array([info.kind for info in infos])
        self._all_host = all(info.kind == HOST for info in infos)
        self._shapes = [info.shape for info in infos]
        # The dtypes of NumPy's own float types are singletons, so `is` finds them.
        self._dtypes = [np.dtype(info.dtype.str) for info in infos]
        self._nbytes = np.array([extent(p)[1] for p in params], np.int64)
        self._addresses = np.zeros(len(params), np.int64)
        slots = SLOTS[setup.rule]
        self.groups = []
        for (name, auto, sig), rows in groups.items():
            arrays = [
                [params[i], None, *[state[s][i] if s in setup.state else params[i] for s in slots]]
                for i in rows
            ]
            group = _GROUPS[name](setup, dispatch.get(name), auto, sig, rows, arrays)
            group.serial_below = parallel_threshold
            group.team = team
            self.groups.append(group)
        self._grads: list | None = None
        self._ready = False

    def matches(self, setup: Setup, state: dict[str, list], backend: str) -> bool:
        """Whether this plan still serves ``setup`` over the same state arrays."""
        if (setup.rule, setup.flags, setup.state, backend) != self.key:
            return False
        for name, arrays in self._state_arrays.items():
            current = state.get(name)
            if current is None or len(current) != len(arrays):
                return False
            if not all(map(operator.is_, current, arrays)):
                return False
        return True

    def run(self, grads: list, setup: Setup) -> None:
        """Check ``grads`` (and the scalars against the dtypes), then step every group."""
        self.launch(self.check(grads, setup), grads)

    def check(self, grads: list, setup: Setup) -> list:
        """Everything :meth:`run` checks, writing nothing: ``grads``, the options, and
        ``setup``'s scalars against every group's dtype; compile the kernels. Returns each
        group's scalars, for :meth:`launch`."""
        if (setup.rule, setup.flags, setup.state) != self.key[:3]:
            raise ValueError("this plan was made for other options; make a new one")
        if len(grads) != len(self._params):
            raise ValueError(f"grads has {len(grads)} arrays but params has {len(self._params)}")
        last = self._grads
        if last is None or not all(map(operator.is_, grads, last)):
            self._check_grads(grads, last)
        if not self._ready:
            self._prepare()
        return [g.cast(setup) for g in self.groups]

    def launch(self, hypers: list, grads: list) -> None:
        """Step every group with the scalars and gradients that :meth:`check` accepted."""
        for group, hyper in zip(self.groups, hypers):
            group.launch(hyper, grads)

    def run_addresses(self, addresses: np.ndarray, setup: Setup) -> None:
        """Step a plan of host arrays with gradients given by their data addresses (int64).

        For callers that hold the gradients in another array library (``fastrms.torch``) and
        have checked them: each must be C-contiguous, of its parameter's dtype and size, and
        alive during the call. This checks only that none overlaps an array the step writes;
        it keeps no reference to the gradients, so they may be freed after the call.
        """
        if (setup.rule, setup.flags, setup.state) != self.key[:3]:
            raise ValueError("this plan was made for other options; make a new one")
        if not self._all_host or len(addresses) != len(self._params):
            raise ValueError("run_addresses needs a plan of host arrays and one address each")
        hit = self._spans[HOST].first_overlap(addresses, self._nbytes)
        if hit is not None:
            self._refuse_overlap(hit[0], hit[1])
        if not self._ready:
            self._prepare()
        self._grads = None  # the next run() checks its gradients in full
        grads = None if self._compiled else _AddressViews(addresses, self._shapes, self._dtypes)
        hypers = [group.cast(setup) for group in self.groups]  # every group's, before any runs
        for group, hyper in zip(self.groups, hypers):
            group.set_grads(addresses)
            group.launch(hyper, grads)

    def _check_grads(self, grads: list, last: list | None) -> None:
        n = len(grads)
        if last is None:
            changed = range(n)
        else:
            changed = [i for i, (g, h) in enumerate(zip(grads, last)) if g is not h]
        dtypes, shapes = self._dtypes, self._shapes
        quick = self._all_host and all(
            type(g := grads[i]) is np.ndarray
            and g.dtype is dtypes[i]
            and g.shape == shapes[i]
            and g.flags.c_contiguous
            for i in changed
        )
        if quick and len(changed) == n:
            addresses = host_addresses(grads)
        else:
            addresses = self._addresses.copy()
            if quick:
                addresses[changed] = host_addresses([grads[i] for i in changed])
            else:
                for i in changed:
                    g = grads[i]
                    # The general check explains what is wrong (or accepts a CUDA array).
                    check_arrays({self._names[i]: self._params[i], self._grad_names[i]: g},
                                 (self._names[i],))  # fmt: skip
                    addresses[i] = extent(g)[0]
        rows = np.asarray(changed, np.int64)
        for kind, spans in self._spans.items():
            mine = rows if self._all_host else rows[self._kinds[rows] == kind]
            hit = spans.first_overlap(addresses[mine], self._nbytes[mine])
            if hit is not None:
                self._refuse_overlap(mine[hit[0]], hit[1])
        for group in self.groups:
            group.set_grads(addresses)
        self._addresses = addresses
        self._grads = list(grads)

    def _refuse_overlap(self, i: int, label: str) -> None:
        raise ValueError(f"{self._grad_names[i]} overlaps {label} in memory; pass separate arrays")

    def kernel_calls(self, setup: Setup) -> list:
        """For benchmarks: each group's bare kernel call for ``setup``'s scalars, as a
        callable; a step's time less theirs is the Python-side cost of the step."""
        return [g.kernel_call(g.cast(setup)) for g in self.groups]

    def _prepare(self) -> None:
        """Load and compile every group's kernel before any group writes."""
        for k, group in enumerate(self.groups):
            self.groups[k] = group.prepare()
        # Compiled groups take gradients by address; the numpy group needs arrays.
        self._compiled = all(isinstance(g, _CpuGroup) for g in self.groups)
        self._ready = True


class _AddressViews:
    """NumPy arrays over host addresses, made when indexed (only the numpy backend needs
    them; the compiled kernels take the addresses themselves)."""

    def __init__(self, addresses: np.ndarray, shapes: list, dtypes: list) -> None:
        self.addresses, self.shapes, self.dtypes = addresses, shapes, dtypes

    def __getitem__(self, i: int) -> np.ndarray:
        shape, dtype = self.shapes[i], self.dtypes[i]
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        memory = (ctypes.c_char * size).from_address(int(self.addresses[i]))
        return np.frombuffer(memory, dtype).reshape(shape)


def _kind(a: Any) -> str:
    return HOST if isinstance(a, np.ndarray) else DEVICE


class _Spans:
    """The sorted, disjoint byte ranges of the arrays a step writes, for overlap queries."""

    def __init__(self, written: list[tuple[str, Any, bool]]) -> None:
        spans = sorted((s, s + n, label) for label, a, _ in written for s, n in [extent(a)] if n)
        self.starts = np.array([s[0] for s in spans], np.int64)
        self.ends = np.array([s[1] for s in spans], np.int64)
        self.labels = [s[2] for s in spans]

    def first_overlap(self, starts: np.ndarray, nbytes: np.ndarray) -> tuple[int, str] | None:
        """``(index, label)`` of the first range that overlaps a written one, else None."""
        if not len(starts) or not len(self.starts):
            return None
        compiled = _compiled_overlap()
        if compiled is not None:  # one compiled call: NumPy's small-array calls cost more
            try:
                j, k = compiled(self.starts, self.ends, starts, nbytes)
            except Exception:  # it cannot compile here: NumPy does it from now on
                global _overlap
                _overlap = False
            else:
                return None if j < 0 else (int(j), self.labels[int(k)])
        ends = starts + nbytes
        # The written ranges are disjoint and sorted, so only the last one starting before a
        # range's end can overlap it.
        k = np.searchsorted(self.starts, ends, "left") - 1
        bad = (k >= 0) & (nbytes > 0) & (self.ends[np.maximum(k, 0)] > starts)
        if not bad.any():
            return None
        j = int(np.argmax(bad))
        return j, self.labels[int(k[j])]


def _compiled_overlap():
    """kernels.pointers.first_overlap, where numba loads (else None: NumPy does it)."""
    global _overlap
    if _overlap is None:
        try:
            from .kernels.pointers import first_overlap
        except ImportError:
            first_overlap = False
        _overlap = first_overlap
    return _overlap or None


_overlap = None


# -- the groups ---------------------------------------------------------------------------------


class _Group:
    """The arrays of one (backend, kernel signature) and how they run."""

    def __init__(self, setup, backend, auto, signature, rows, arrays):
        self.setup, self.backend, self.auto = setup, backend, auto
        self.signature = signature  # the precision policy's key (fastrms.precision)
        self.dtype = np.dtype(signature.compute)  # the scalars' dtype
        self.rows = rows  # indices of the step's parameters
        # A slice where the rows run in order (a view, not a copy, of the step's addresses).
        consecutive = rows == list(range(rows[0], rows[0] + len(rows))) if rows else False
        self._rows = slice(rows[0], rows[0] + len(rows)) if consecutive else np.asarray(rows)
        self.arrays = arrays  # per parameter: [param, grad (set per step), state...]
        #: cpu: a group of fewer elements runs on one thread (None: the backend's threshold).
        self.serial_below: int | None = None
        #: cpu: the threads that run parallel steps, if not Numba's own (see :class:`Team`).
        self.team: Team | None = None

    def set_grads(self, addresses: np.ndarray) -> None:
        pass

    def cast(self, setup: Setup):
        """The step's scalars as this group's kernel takes them (a tuple of the dtype)."""
        return cast(setup.rule, setup.scalars, self.dtype)

    def _table(self) -> np.ndarray:
        """One int64 row per array: element count, then the addresses of param, grad (filled
        per step) and state; columns the rule does not use repeat the param's address."""
        table = np.zeros((len(self.rows), self.signature.table_width), np.int64)
        for r, arrays in enumerate(self.arrays):
            p = arrays[0]
            table[r, 0] = _size(p)
            table[r, 1:] = extent(p)[0]
            for c, a in enumerate(arrays[2:], start=3):
                table[r, c] = extent(a)[0]
        return table

    def prepare(self) -> _Group:
        """Make the kernel ready (compile it); return the group that will run."""
        return self

    def launch(self, hyper: tuple, grads: list) -> None:
        raise NotImplementedError

    def kernel_call(self, hyper: tuple):
        return lambda: None


class _NumpyGroup(_Group):
    """The reference backend, array by array."""

    def launch(self, hyper, grads):
        view = self.backend.view
        rule, flags = self.setup.rule, self.setup.flags
        for i, arrays in zip(self.rows, self.arrays):
            p = view(arrays[0])
            views = [p, view(grads[i])] + [p if a is arrays[0] else view(a) for a in arrays[2:]]
            self.backend.launch(rule, flags, tuple(views), hyper)


class _CpuGroup(_Group):
    """The Numba CPU kernels, one parallel region (or one serial loop) for the group."""

    def __init__(self, *args):
        super().__init__(*args)
        self.table = self._table()
        self.total = int(self.table[:, 0].sum())
        self._threads = None
        self._cast_of = None  # the scalars that self._hyper holds

    def set_grads(self, addresses):
        self.table[:, 2] = addresses[self._rows]

    def cast(self, setup):
        # The last step's array while the scalars stay (RMSprop's do); a new one when they
        # change (Adam's bias corrections, every step), kept out of cast_array's shared cache.
        if setup.scalars != self._cast_of:
            self._hyper = cast_array.__wrapped__(setup.rule, setup.scalars, self.dtype)
            self._cast_of = setup.scalars
        return self._hyper

    def prepare(self):
        try:
            kernels = self.backend.grouped_kernels(
                self.setup.rule, self.setup.flags, self.signature
            )
            self._parallel, self._serial = kernels
            empty = np.zeros(1, np.int64)
            hyper = self.cast(self.setup)
            if self.serial_below is None:
                self.serial_below = self.backend.parallel_threshold
            # A call over no parts compiles the kernel for these types and writes nothing.
            kernel = self._serial if self.total < self.serial_below else self._parallel
            kernel(self.table, empty, np.zeros((0, 3), np.int64), hyper)
        except BackendUnavailableError:
            if not self.auto:
                raise
            return self._fall_back()
        except Exception as exc:
            from numba.core.errors import NumbaError

            if not isinstance(exc, NumbaError):
                raise
            self.backend.compile_error(exc)
            if not self.auto:
                raise BackendUnavailableError(
                    f"the cpu backend is unavailable: {self.backend._reason}"
                ) from exc
            return self._fall_back()
        if self.team is not None:
            self._prepare_team()
        return self

    def _prepare_team(self) -> None:
        from numba.core.errors import NumbaError

        try:
            body = self.backend.grouped_team_body(self.setup.rule, self.setup.flags, self.signature)
        except NumbaError:  # Numba's own threads run the parallel steps instead
            self.team = None
            return
        # The argument block of kernels.cpu.grouped_team_body, and the scalars it points to.
        self._scalars = np.zeros(self.signature.scalars, self.dtype)
        self._team_args = np.zeros(6, np.int64)
        self._team_call = (body, self._team_args.ctypes.data)

    def _run_team(self, threads: int) -> None:
        self._team_args[5] = 0  # the counter the team's threads claim parts with
        body, args = self._team_call
        self.team.run(body, args, threads)

    def _fall_back(self):
        numpy = dispatch.fall_back(self.backend._reason)
        return _NumpyGroup(self.setup, numpy, False, self.signature, self.rows, self.arrays)

    def kernel_call(self, hyper):
        self.launch(hyper, None)  # sets the schedule and the team's scalars
        if self._threads == 1:
            return functools.partial(self._serial, self.table, *self._schedule, hyper)
        if self.team is None:
            return functools.partial(self._parallel, self.table, *self._schedule, hyper)
        return functools.partial(self._run_team, self._threads)

    def launch(self, hyper, grads):
        if self.total < self.serial_below:
            threads = 1
        else:
            threads = (self.team or self.backend).threads()
        if threads != self._threads:
            self._schedule = schedule(self.table[:, 0], PARTS_PER_THREAD * threads)
            self._threads = threads
            if self.team is not None:
                self._team_args[:] = team_block(self.table, *self._schedule, self._scalars)
        if threads == 1:
            self._serial(self.table, *self._schedule, hyper)
        elif self.team is not None:
            self._scalars[:] = hyper
            self._run_team(threads)
        else:
            self._parallel(self.table, *self._schedule, hyper)


class _CudaGroup(_Group):
    """The CUDA kernels: one launch (or a few) for the group, on the parameters' stream.

    The table holds device addresses; numba-cuda's grouped kernel turns them back into arrays
    (:func:`fastrms.kernels.cuda.launch_grouped`). The stream is read from the first
    parameter at every step (a PyTorch tensor names torch's current stream)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.table = self._table()

    def set_grads(self, addresses):
        self.table[:, 2] = addresses[self._rows]

    def prepare(self):
        self._launch = self.backend.grouped_launcher()
        return self

    def launch(self, hyper, grads):
        stream = self.backend.stream_of(self.arrays[0][0])
        self._launch(self.setup.rule, self.setup.flags, self.table, hyper, stream)


def _size(a: Any) -> int:
    if isinstance(a, np.ndarray):
        return a.size
    return int(np.prod(describe(a, "array").shape, dtype=np.int64))


_GROUPS = {"numpy": _NumpyGroup, "cpu": _CpuGroup, "cuda": _CudaGroup}
