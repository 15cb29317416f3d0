"""One step over many arrays: a checked, reusable plan that runs each group as one call.

A training loop steps the same parameters with gradients of the same shapes every time.
:class:`StepPlan` checks the parameters and their state once (kinds, dtypes, shapes,
contiguity, writeability, and that nothing written overlaps anything else), groups them by
backend and kernel signature (:func:`fastrms.precision.signature`: the dtypes the arrays are
held in and computed in), and lays out each group for its kernel
(:mod:`fastrms.launch_groups`):

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
import operator
from typing import Any

import numpy as np

from . import dispatch, teams
from .arrays import (
    DEVICE,
    HOST,
    LOW_PRECISION_DTYPES,
    Held,
    check_arrays,
    check_no_overlap,
    describe,
    extent,
    host_addresses,
    is_bf16_array,
)
from .blockwise_groups import BLOCKWISE_GROUPS, refuse_pairs, split_state
from .launch_groups import GROUPS, CpuGroup, Team
from .lowprecision import BFLOAT16, step_keys
from .plan_storages import bf16_storages, state_storages
from .precision import (
    KAHAN_COMP,
    SLOTS,
    check_rounding,
    check_state_dtype,
    signature,
)
from .specs import Setup

__all__ = ["StepPlan", "Team"]


class StepPlan:
    """A checked step of one rule over many arrays, grouped by backend and kernel signature.

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
    state_dtype : {None, "float32", "float64", "bfloat16", "int8"}, optional
        How the state arrays are held (:func:`fastrms.precision.state_storage`). None: as
        each parameter is. ``"bfloat16"`` (float32 parameters): ``ml_dtypes.bfloat16`` arrays
        or their ``uint16`` patterns, computed in float32 and stored rounded to nearest even;
        every backend (CUDA arrays as ``uint16`` patterns). ``"int8"`` (float32 or bfloat16
        parameters, every backend):
        :class:`fastrms.lowprecision.Quantized` pairs (NumPy or CUDA arrays) for parameters of
        at least 4096 elements, float32 arrays for smaller ones (:mod:`fastrms.blockwise_groups`).
    rounding : {None, "stochastic", "nearest", "kahan"}, optional
        How ``ml_dtypes.bfloat16`` parameters are stored after their float32 update (None:
        ``"stochastic"``; see :data:`fastrms.precision.PARAM_STORAGES`). Their gradients are
        bfloat16 too (or ``uint16`` patterns), their state float32 unless ``state_dtype``
        says ``"bfloat16"`` or ``"int8"``; every backend. On ``cuda`` a ``uint16`` device array
        (the patterns: CUDA's array interface has no bfloat16) is a bfloat16 parameter.
        ``"kahan"`` takes one bfloat16 compensation array per bfloat16 parameter,
        ``state["kahan_comp"]`` (None beside other parameters). Refused (``ValueError``) if no
        parameter is bfloat16.
    seed : int, optional
        The seed of stochastic rounding (None: 0). Element ``j`` of parameter ``i`` at step
        ``t`` draws ``lowprecision.random_bits(step_key(seed, t, streams[i]), offsets[i] + j)``.
    streams : list of int, optional
        Each parameter's stream of random bits (default: its position, ``0, 1, ...``).
        Stochastic rounding needs the step: pass ``step=`` to :meth:`run` / :meth:`check`.
    offsets : list of int, optional
        Where the parameters are pieces of whole tensors (the sharded optimizer's shards):
        the index of each piece's first element in its tensor (default: 0), so that element
        ``j`` of the piece draws the random bits of element ``offsets[i] + j`` (mod 2^32) of
        its tensor, and a tensor stepped in pieces (with its stream) rounds as stepped whole.
        A group's table carries it beside the key (:func:`key_words`).
    sizes : list of int, optional
        Likewise, each piece's whole tensor's element count (default: the piece's own):
        ``state_dtype="int8"`` holds a piece's state in 8 bits iff its tensor has at least
        :data:`fastrms.lowprecision.MIN_8BIT_SIZE` elements (pieces must then start on
        multiples of 256 of their tensor, so that their blocks are the tensor's).
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
        state_dtype: str | None = None,
        rounding: str | None = None,
        seed: int | None = None,
        streams: list[int] | None = None,
        offsets: list[int] | None = None,
        sizes: list[int] | None = None,
    ) -> None:
        check_state_dtype(state_dtype)
        low = frozenset(i for i, p in enumerate(params) if is_bf16_array(p))
        check_rounding(rounding, seed, bool(low))
        self.rounding = (rounding or "stochastic") if low else None
        self.seed = 0 if seed is None else int(seed)
        self._streams = np.arange(len(params), dtype=np.int64)
        if streams is not None:
            if len(streams) != len(params):
                raise ValueError(f"streams has {len(streams)} entries but params {len(params)}")
            self._streams = np.asarray(streams, np.int64)
        self._offsets = _per_param(offsets, "offsets", params, 0)
        sizes = _per_param(sizes, "sizes", params, None)
        comps = self._comps(state, params, names, low)
        if team == "auto":
            team = teams.default_team()
            if team is not None and parallel_threshold is None:
                parallel_threshold = teams.TEAM_THRESHOLD
        self.key = (setup.rule, setup.flags, setup.state, backend)
        self._params = params
        self._names = names
        self._grad_names = grad_names or [n.replace("params", "grads", 1) for n in names]
        self._state_arrays = {s: list(state[s]) for s in setup.state}
        if comps is not None:
            self._state_arrays[KAHAN_COMP] = list(state[KAHAN_COMP])
        written = []
        groups: dict[tuple, list[int]] = {}
        infos = []
        for i, p in enumerate(params):
            named = {names[i]: p} | {f"{s} of {names[i]}": state[s][i] for s in setup.state}
            labels = tuple(named)[1:]
            scales: dict = {}
            whole = None if sizes is None else int(sizes[i])
            if i in low:
                slots, held = bf16_storages(setup, p, names[i], labels, state_dtype,
                                                  comps and comps[i], whole)  # fmt: skip
                if slots[0].blockwise:  # int8: (codes, scales) pairs
                    named, scales = split_state(named, labels, _shape_of(p), held[0].option)
                elif state_dtype == "int8":
                    refuse_pairs(named, labels, _size_of(p), f"state_dtype={state_dtype!r}")
                if comps is not None:
                    named[f"{KAHAN_COMP} of {names[i]}"] = comps[i]
            else:
                slots, held = state_storages(setup, p, names[i], labels, state_dtype, whole)
                if slots is not None and slots[0].blockwise:  # int8: (codes, scales) pairs
                    named, scales = split_state(named, labels, held.shape, held.option)
                    held = Held(held.names, held.dtypes, held.option)
                elif state_dtype == "int8":
                    refuse_pairs(named, labels, _size_of(p), f"state_dtype={state_dtype!r}")
            info = check_arrays(named, tuple(named), held)
            infos.append(info)
            try:
                chosen, auto = dispatch.resolve(backend, info.kind)
            except TypeError as exc:
                raise TypeError(f"{names[i]}: {exc}") from None
            rounding_i = self.rounding if i in low else None
            dtype = BFLOAT16 if i in low else info.dtype  # a CUDA one may be uint16 patterns
            key = (chosen.name, auto, signature(setup.rule, dtype, slots, rounding=rounding_i))
            groups.setdefault(key, []).append(i)
            written += [(label, a, True) for label, a in (named | scales).items()]
        check_no_overlap(written)
        kinds = {info.kind for info in infos}
        self._spans = {k: _Spans([w for w in written if _kind(w[1]) == k]) for k in kinds}
        self._kinds = np.array([info.kind for info in infos])
        self._all_host = all(info.kind == HOST for info in infos)
        self._shapes = [info.shape for info in infos]
        # The dtypes of NumPy's own float types are singletons, so `is` finds them.
        self._dtypes = [
            BFLOAT16 if i in low else np.dtype(info.dtype.str) for i, info in enumerate(infos)
        ]
        self._low = low
        self._nbytes = np.array([extent(p)[1] for p in params], np.int64)
        self._addresses = np.zeros(len(params), np.int64)
        slots = SLOTS[setup.rule]
        self.groups = []
        for (name, auto, sig), rows in groups.items():
            arrays = [
                [params[i], None, *[state[s][i] if s in setup.state else params[i] for s in slots]]
                + ([comps[i]] if sig.storages[0].codec == "bf16_kahan" else [])
                for i in rows
            ]
            kinds = BLOCKWISE_GROUPS if sig.storages[-1].blockwise else GROUPS
            group = kinds[name](setup, dispatch.get(name), auto, sig, rows, arrays)
            group.serial_below = parallel_threshold
            group.team = team
            self.groups.append(group)
        self._grads: list | None = None
        self._ready = False

    def _comps(self, state: dict, params: list, names: list[str], low: frozenset) -> list | None:
        """The Kahan compensation arrays of ``rounding="kahan"`` (else None), one per
        parameter, checked to be there for each bfloat16 one."""
        if self.rounding != "kahan":
            return None
        comps = state.get(KAHAN_COMP)
        if comps is None or len(comps) != len(params):
            raise ValueError(
                f"rounding='kahan' needs state[{KAHAN_COMP!r}]: one bfloat16 array per parameter"
            )
        for i in sorted(low):
            if comps[i] is None:
                raise ValueError(f"{KAHAN_COMP} of {names[i]} is required by rounding='kahan'")
        return list(comps)

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

    def run(self, grads: list, setup: Setup, step: int | None = None) -> None:
        """Check ``grads`` (and the scalars against the dtypes), then step every group.
        ``step`` (the step being taken) keys stochastic rounding, which needs it."""
        self.launch(self.check(grads, setup, step), grads)

    def check(self, grads: list, setup: Setup, step: int | None = None) -> list:
        """Everything :meth:`run` checks, writing nothing: ``grads``, the options, and
        ``setup``'s scalars against every group's dtype; compile the kernels. Returns each
        group's scalars, for :meth:`launch` (and sets stochastic rounding's keys for
        ``step``)."""
        if (setup.rule, setup.flags, setup.state) != self.key[:3]:
            raise ValueError("this plan was made for other options; make a new one")
        if len(grads) != len(self._params):
            raise ValueError(f"grads has {len(grads)} arrays but params has {len(self._params)}")
        if self.rounding == "stochastic":
            if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
                raise TypeError(
                    "stochastic rounding of bfloat16 parameters needs step= (an int >= 0, "
                    f"the step being taken, which keys the random bits), got {step!r}"
                )
        last = self._grads
        if last is None or not all(map(operator.is_, grads, last)):
            self._check_grads(grads, last)
        if not self._ready:
            self._prepare()
        if self.rounding == "stochastic":
            keys = key_words(step_keys(self.seed, int(step), self._streams), self._offsets)
            for group in self.groups:
                group.set_keys(keys)
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
                    held = None
                    if i in self._low:  # a bfloat16 parameter's gradient is bfloat16
                        held = Held(frozenset([self._grad_names[i]]), LOW_PRECISION_DTYPES,
                                    f"{self._names[i]} (bfloat16)")  # fmt: skip
                    # The general check explains what is wrong (or accepts a CUDA array).
                    check_arrays({self._names[i]: self._params[i], self._grad_names[i]: g},
                                 (self._names[i],), held)  # fmt: skip
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
        self._compiled = all(isinstance(g, CpuGroup) for g in self.groups)
        self._ready = True


def key_words(keys: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The keyed codec's table word of each parameter (int64): its step key (32 bits,
    :func:`fastrms.lowprecision.step_keys`) in the low half, its offset mod 2^32 (the index
    of its first element in its whole tensor) in the high half. A kernel's keyed column
    reads element ``j``'s index as ``j + (word >> 32)``, a logical shift
    (:func:`fastrms.kernels.pointers.arrays_at`); the numpy group splits it the same way."""
    high = (np.asarray(offsets, np.int64) & 0xFFFFFFFF).astype(np.uint64) << np.uint64(32)
    return (np.asarray(keys, np.int64).astype(np.uint64) | high).view(np.int64)


def _per_param(values, name: str, params: list, default) -> np.ndarray | None:
    """``values`` (one int >= 0 per parameter) as an int64 array; None: ``default`` for
    each (None: no array). Raises ``ValueError`` naming ``name``."""
    if values is None:
        return None if default is None else np.full(len(params), default, np.int64)
    out = np.asarray(values)
    if out.shape != (len(params),) or out.dtype.kind not in "iu" or (out < 0).any():
        raise ValueError(f"{name} must hold one int >= 0 per parameter ({len(params)})")
    return out.astype(np.int64)


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


def _size_of(p: Any) -> int:
    return int(np.prod(_shape_of(p), dtype=np.int64))


def _shape_of(p: Any) -> tuple:
    return describe(p, "param").shape


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
