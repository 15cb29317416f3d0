"""The groups of a grouped step: the arrays of one (backend, kernel signature), laid out for
their backend's kernel, and how each backend runs them.

- :class:`CpuGroup`: a table of element counts and addresses (one int64 row per array, one
  column per array of the rule's :class:`fastrms.precision.Signature`), cut into equal parts
  by :func:`fastrms.schedule.schedule`, run by one parallel kernel call, a serial one, or
  another library's thread team (:class:`Team`).
- :class:`CudaGroup`: the same table of device addresses, one launch (or a few).
- :class:`NumpyGroup`: the reference, array by array.

:class:`fastrms.grouped.StepPlan` checks the arrays and builds these; :data:`GROUPS` maps a
backend's name to its group class.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import numpy as np

from . import dispatch, lowprecision
from .arrays import describe, extent
from .errors import BackendUnavailableError
from .precision import cast, cast_array
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


class Group:
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
        #: Each row's key of this step's random bits (see :meth:`set_keys`).
        self.keys = np.zeros(len(rows), np.int64)

    def set_grads(self, addresses: np.ndarray) -> None:
        pass

    def set_keys(self, keys: np.ndarray) -> None:
        """This step's keys of stochastic rounding, one per parameter of the step (int64,
        :func:`fastrms.lowprecision.step_keys`); this group takes its rows'."""
        self.keys = keys[self._rows]

    def cast(self, setup: Setup):
        """The step's scalars as this group's kernel takes them (a tuple of the dtype)."""
        return cast(setup.rule, setup.scalars, self.dtype)

    def _table(self) -> np.ndarray:
        """One int64 row per array: element count, then the addresses of param, grad (filled
        per step) and state; columns the rule does not use repeat the param's address. Then
        the param storage's extra word, if any: the Kahan compensation's address (the last of
        ``arrays``), or stochastic rounding's key (filled per step)."""
        signature = self.signature
        n_state = len(signature.storages) - 2
        kahan = signature.storages[0].codec == "bf16_kahan"
        table = np.zeros((len(self.rows), signature.table_width), np.int64)
        for r, arrays in enumerate(self.arrays):
            p = arrays[0]
            table[r, 0] = _size(p)
            table[r, 1:] = extent(p)[0]
            for c, a in enumerate(arrays[2 : 2 + n_state], start=3):
                table[r, c] = extent(a)[0]
            if kahan:
                table[r, signature.extra_word(0)] = extent(arrays[-1])[0]
        return table

    def prepare(self) -> Group:
        """Make the kernel ready (compile it); return the group that will run."""
        return self

    def launch(self, hyper: tuple, grads: list) -> None:
        raise NotImplementedError

    def kernel_call(self, hyper: tuple):
        return lambda: None


#: The NumPy reference of each codec: ``(load, store)``, ``load(held)`` a new array of the
#: compute dtype, ``store(values)`` the held patterns (fastrms.lowprecision).
NUMPY_CODECS = {"bf16": (lowprecision.bf16_to_float32, lowprecision.round_nearest)}


class NumpyGroup(Group):
    """The reference backend, array by array. An array held through a codec (bfloat16 state)
    is loaded whole into its compute dtype, stepped by the reference, and stored back through
    the codec's NumPy reference (:data:`NUMPY_CODECS`). A bfloat16 parameter and its
    gradient are widened to float32 the same way, and the parameter is stored back as its
    storage rounds (:meth:`_store_param`)."""

    def launch(self, hyper, grads):
        view = self.backend.view
        rule, flags = self.setup.rule, self.setup.flags
        storages = self.signature.storages
        coded_param = storages[0].codec is not None
        n_state = len(storages) - 2
        for r, (i, arrays) in enumerate(zip(self.rows, self.arrays)):
            p = view(arrays[0])
            g = view(grads[i])
            if coded_param:
                p_bits = lowprecision.bf16_bits(p)
                p, g = lowprecision.bf16_to_float32(p_bits), lowprecision.bf16_to_float32(g)
                before = p.copy()
            state = arrays[2 : 2 + n_state]
            views = [p, g] + [p if a is arrays[0] else view(a) for a in state]
            coded = [k for k in range(2, len(views)) if storages[k].codec and views[k] is not p]
            held = {k: lowprecision.bf16_bits(views[k]) for k in coded}
            for k in coded:
                views[k] = NUMPY_CODECS[storages[k].codec][0](held[k])
            self.backend.launch(rule, flags, tuple(views), hyper)
            for k in coded:
                held[k][...] = NUMPY_CODECS[storages[k].codec][1](views[k])
            if coded_param:
                self._store_param(p_bits, p, before, arrays[2 + n_state :], int(self.keys[r]))

    def _store_param(self, bits, new, before, extra, key) -> None:
        """Store a bfloat16 parameter's float32 result ``new`` into its patterns ``bits``
        (its value was ``before``): rounded to nearest, stochastically with ``key`` (the
        table word: the step key in the low 32 bits, the index of the array's first element
        in its whole tensor in the high 32, :func:`fastrms.grouped.key_words`), or with the
        Kahan compensation ``extra[0]`` and the increment ``new - before``."""
        codec = self.signature.storages[0].codec
        if codec == "bf16":
            bits[...] = lowprecision.round_nearest(new)
        elif codec == "bf16_stochastic":
            word = key & 0xFFFFFFFFFFFFFFFF  # the int64 word's bits, unsigned
            bits[...] = lowprecision.round_stochastic(new, word & 0xFFFFFFFF, word >> 32)
        else:
            comp = lowprecision.bf16_bits(self.backend.view(extra[0]))
            with np.errstate(invalid="ignore", over="ignore"):  # NaN and Inf propagate
                delta = new - before
            bits[...], comp[...] = lowprecision.kahan_add(bits, comp, delta)


class CpuGroup(Group):
    """The Numba CPU kernels, one parallel region (or one serial loop) for the group."""

    def __init__(self, *args):
        super().__init__(*args)
        self.table = self._table()
        self.total = int(self.table[:, 0].sum())
        self._threads = None
        self._cast_of = None  # the scalars that self._hyper holds

    def set_grads(self, addresses):
        self.table[:, 2] = addresses[self._rows]

    def set_keys(self, keys):
        super().set_keys(keys)
        if self.signature.storages[0].codec == "bf16_stochastic":
            self.table[:, self.signature.extra_word(0)] = self.keys

    def cast(self, setup):
        # The last step's array while the scalars stay (RMSprop's do); a new one when they
        # change (Adam's bias corrections, every step), kept out of cast_array's shared cache.
        if setup.scalars != self._cast_of:
            self._hyper = cast_array.__wrapped__(setup.rule, setup.scalars, self.dtype)
            self._cast_of = setup.scalars
        return self._hyper

    def prepare(self):
        try:
            self._parallel, self._serial = self._kernels()
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

    def _kernels(self):
        """``(parallel, serial)``: the grouped kernels of this group's signature."""
        return self.backend.grouped_kernels(self.setup.rule, self.setup.flags, self.signature)

    def _cut(self, sizes: np.ndarray, parts: int):
        """The schedule of the table's arrays in ``parts`` parts (fastrms.schedule)."""
        return schedule(sizes, parts)

    def _prepare_team(self) -> None:
        from numba.core.errors import NumbaError

        try:
            body = self.backend.grouped_team_body(self.setup.rule, self.setup.flags, self.signature)
        except NumbaError:  # Numba's own threads run the parallel steps instead
            self.team = None
            return
        # The argument block of kernels.elementwise.team_body, and the scalars it points to.
        self._scalars = np.zeros(self.signature.scalars, self.dtype)
        self._team_args = np.zeros(6, np.int64)
        self._team_call = (body, self._team_args.ctypes.data)

    def _run_team(self, threads: int) -> None:
        self._team_args[5] = 0  # the counter the team's threads claim parts with
        body, args = self._team_call
        self.team.run(body, args, threads)

    def _fall_back(self):
        numpy = dispatch.fall_back(self.backend._reason)
        return NumpyGroup(self.setup, numpy, False, self.signature, self.rows, self.arrays)

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
            self._schedule = self._cut(self.table[:, 0], PARTS_PER_THREAD * threads)
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


class CudaGroup(Group):
    """The CUDA kernels: one launch (or a few) for the group, on the parameters' stream.

    The table holds device addresses; numba-cuda's grouped kernel turns them back into arrays
    (:func:`fastrms.kernels.cuda.launch_grouped`). The stream is read from the first
    parameter at every step (a PyTorch tensor names torch's current stream). A group of
    bfloat16 parameters or state runs the kernel generated for its signature, whose rows
    carry the storages' extra words as the CPU table's do, but for stochastic rounding's key
    words: they change every step, so they go to the launch apart (:meth:`set_keys`), and the
    table, cached on the device by its bytes, stays the same."""

    def __init__(self, *args):
        super().__init__(*args)
        self.table = self._table()
        self._words = None

    def set_grads(self, addresses):
        self.table[:, 2] = addresses[self._rows]

    def set_keys(self, keys):
        super().set_keys(keys)  # self.keys: the words kernels.cuda.launch_grouped takes
        self._words = self.keys if self.signature.storages[0].codec == "bf16_stochastic" else None

    def prepare(self):
        self._launch = self.backend.grouped_launcher()
        return self

    def launch(self, hyper, grads):
        stream = self.backend.stream_of(self.arrays[0][0])
        rule, flags = self.setup.rule, self.setup.flags
        self._launch(rule, flags, self.table, hyper, stream, self.signature, self._words)


def _size(a: Any) -> int:
    if isinstance(a, np.ndarray):
        return a.size
    return int(np.prod(describe(a, "array").shape, dtype=np.int64))


GROUPS = {"numpy": NumpyGroup, "cpu": CpuGroup, "cuda": CudaGroup}
