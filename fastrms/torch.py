"""``torch.optim`` drop-ins backed by fastrms's fused kernels.

::

    import fastrms.torch
    opt = fastrms.torch.Adam(model.parameters(), lr=1e-3)   # was torch.optim.Adam(...)

Each class is a :class:`torch.optim.Optimizer` with torch's signature, defaults, parameter
groups and state (torch's buffer names, ``state["step"]`` a float32 0-d tensor), so that
``state_dict()`` has torch's format: a checkpoint of ``torch.optim.Adam`` loads into
``fastrms.torch.Adam`` and back. Schedulers, ``torch.amp.GradScaler``, optimizer hooks and
``torch.distributed.optim.ZeroRedundancyOptimizer`` work as with torch's own classes.

A step sorts the parameters that have a gradient into buckets of (param group, device, dtype,
step count) and updates each bucket with one grouped call (a cached
:class:`fastrms.grouped.StepPlan`): CPU tensors on the ``cpu`` kernels, reached by address
(zero-copy), in parallel on torch's own OpenMP threads (:class:`_OpenMPTeam`) from
:data:`TEAM_THRESHOLD` elements; CUDA tensors on the ``cuda`` kernels, on torch's current
stream. Parameters whose ``.grad`` is None are skipped. A step that repeats the last one (the
same parameters with gradients, the same state and data tensors, each bucket's step count one
further) reuses the last step's buckets and plans after checking only what can change between
steps (``_FusedOptimizer._repeat``).

Differences from ``torch.optim``:

- float32/float64 tensors in any layout, and complex64/complex128 ones stepped as their real
  views (:mod:`fastrms.torch_layout`: dense parameters in another order than contiguous are
  stepped over their memory, strided views through a contiguous buffer). A sparse gradient,
  another dtype or a tensor whose elements share memory is refused with an error naming the
  parameter, before anything is written.
- ``eps`` must be > 0 and RMSprop's ``alpha`` at most 1; ``capturable=True`` and
  ``differentiable=True`` are refused. ``foreach`` and ``fused`` are accepted and ignored:
  every step is fused.
- ``eps_in_sqrt`` (RMSprop, Adagrad) and :meth:`RMSprop.graves` are fastrms's own options;
  :class:`Lion` has no torch counterpart.
- Adagrad starts a parameter's ``sum`` at its own group's ``initial_accumulator_value``
  (torch uses the value given to the constructor for every group).

Importing this module imports torch; ``import fastrms`` does not.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import numpy as np
import torch

from . import hyper
from .arrays import check_no_overlap, extent
from .grouped import StepPlan, _Spans
from .specs import LAYOUTS, SPECS, Setup, check_fits_float32
from .torch_layout import (
    DENSE,
    KERNEL_DTYPE,
    OVERLAPPING,
    STRIDED,
    fits,
    flat,
    layout_of,
    real,
    state_like,
)  # fmt: skip

__all__ = ["SGD", "Adagrad", "Adam", "AdamW", "Lion", "RMSprop"]


Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]]


#: A CPU bucket of fewer elements runs on one thread. Higher than fastrms's own threshold
#: (``kernels.cpu.PARALLEL_THRESHOLD``, 2^17): right after torch's backward pass, starting
#: Numba's second thread costs more. Measured inside the MLP training loop of
#: ``bench.torch_loop`` (Adam, 2 cores, widths scaled): one thread took 0.76x, 0.80x, 0.86x
#: the two threads' time at 63K, 151K, 399K elements, and 1.22x at 1.19M.
PARALLEL_THRESHOLD = 1 << 19

#: With PyTorch's OpenMP team (:func:`_torch_team`), a CPU bucket of fewer elements runs on
#: one thread. The team's threads are awake after torch's own ops, so two of them pay off
#: far earlier than Numba's: in the MLP training loop of ``bench.torch_loop`` (Adam, 2 cores,
#: widths scaled), the team took 0.72x-0.82x the one-thread time at 104K elements and
#: 0.62x-0.80x at 151K; from 13K to 63K it took 0.77x-1.15x from run to run, no clear gain,
#: so those stay on one thread (which also never has to wake a sleeping team).
TEAM_THRESHOLD = 1 << 16

#: Cached plans per optimizer kept at most (a plan per bucket; buckets change rarely).
_MAX_PLANS = 64


def _plan(
    rule: str, b: _Bucket, plans: dict, name: Callable[..., str], use_team: bool = True
) -> tuple[StepPlan, Setup]:
    """A bucket's plan and the setup of its step, checked; nothing is written.

    A bucket's :class:`fastrms.grouped.StepPlan` (its arrays checked and laid out once) is
    kept in ``plans`` while the bucket holds the same parameter and state arrays; a step then
    checks only the new gradients. ``name(*b.where[i])`` names the i-th parameter in errors.
    ``use_team``: run parallel CPU steps on torch's OpenMP team where there is one.
    """
    setup = SPECS[rule].setup(b.step, **b.options)
    key = (setup.rule, setup.flags, *map(id, b.params))
    plan = plans.get(key)
    if plan is None or not plan.matches(setup, b.state, "auto"):
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        names = [name(*w) for w in b.where]
        grad_names = [f"the gradient of {n}" for n in names]
        team = _torch_team() if use_team and not b.recs[0].cuda else None
        plan = plans[key] = StepPlan(
            setup,
            b.params,
            b.state,
            names,
            grad_names=grad_names,
            parallel_threshold=PARALLEL_THRESHOLD if team is None else TEAM_THRESHOLD,
            team=team,
        )
    return plan, setup


#: ``torch.compiler.is_dynamo_compiling``, looked up once (the step calls it every time).
_dynamo_compiling = torch.compiler.is_dynamo_compiling


@torch.compiler.disable
def _step_eagerly(opt: _FusedOptimizer, closure: Callable[[], Any] | None) -> Any:
    """``opt``'s step, called where Dynamo traced ``opt.step``: it runs eagerly. (Not the
    whole step disabled: ``torch.compiler.disable``'s wrapper costs about 1 us per call,
    ``is_dynamo_compiling`` 0.04 us.)"""
    return _FusedOptimizer.step(opt, closure)


def _run(plan: StepPlan, setup: Setup, grads: Any, gathers: list, addresses: bool) -> None:
    """The one place that runs fastrms's kernels: one grouped call for a bucket, its strided
    parameters gathered into their buffers before and scattered back after (``gathers``:
    pairs of the parameter's kernel view and its buffer). ``grads``: arrays, or with
    ``addresses`` the host addresses of the gradients."""
    for p, buf in gathers:
        buf.copy_(p)
    if addresses:
        plan.run_addresses(grads, setup)
    else:
        plan.run(grads, setup)
    for p, buf in gathers:
        p.copy_(buf)


# PyTorch's OpenMP team (teams.OpenMPTeam) lives in fastrms.teams, beside the other teams.
from .teams import torch_team as _torch_team  # noqa: E402


class _CudaArray:
    """A CUDA tensor's ``__cuda_array_interface__`` (computed once, torch's is slow) that also
    names torch's current stream: torch exports none (version 2), and the kernels launch on
    the stream that the parameter's interface names, else on the default stream."""

    __slots__ = ("__cuda_array_interface__", "device")

    def __init__(self, t: torch.Tensor) -> None:
        self.__cuda_array_interface__ = {**t.__cuda_array_interface__, "version": 3}
        self.device = t.device

    def on(self, stream: int | None) -> _CudaArray:
        self.__cuda_array_interface__["stream"] = stream  # None: torch's default stream
        return self


class _Views:
    """A parameter's arrays as the kernels take them (NumPy views on the CPU, interface
    wrappers on CUDA), cached across steps; rebuilt when its data or state tensors change.

    The arrays are the tensors' real views, flat for a dense parameter in another order than
    contiguous; a strided parameter's array is its contiguous buffer (``gather``, see
    :mod:`fastrms.torch_layout`). ``order``: the strides a gradient must have to be read as
    it is (None: contiguous)."""

    __slots__ = (
        "arrays", "cuda", "dtype", "gather", "held", "kdtype", "keys", "names", "order", "plain",
        "ptr", "step", "step_view", "tensors",
    )  # fmt: skip

    def __init__(self, p: torch.Tensor, state: dict, names: tuple[str, ...]) -> None:
        self.ptr = p.data_ptr()
        self.dtype = p.dtype
        self.names = names
        self.cuda = p.is_cuda
        self.tensors = tuple(state[n] for n in names)
        self.step = state.get("step")
        self.step_view = None if self.step is None else self.step.numpy()
        # The state tensors by key, "step" included (None where there is none).
        self.keys, self.held = (*names, "step"), (*self.tensors, self.step)
        kernel = [real(t) for t in (p.detach(), *self.tensors)]
        self.kdtype = kernel[0].dtype
        layout = layout_of(kernel[0])
        self.order = p.stride() if layout == DENSE else None
        self.gather = None
        if layout == DENSE:
            kernel = [flat(t) for t in kernel]
        elif layout == STRIDED:
            self.gather = (kernel[0], torch.empty(kernel[0].shape, dtype=self.kdtype,
                                                  device=p.device))  # fmt: skip
            kernel[0] = self.gather[1]
        # A gradient of a plain parameter goes to the kernels as it is.
        self.plain = layout != DENSE and not p.is_complex()
        if self.cuda:
            self.arrays = tuple(_CudaArray(t) for t in kernel)
        else:
            self.arrays = tuple(t.numpy() for t in kernel)

    def grad(self, g: torch.Tensor) -> torch.Tensor:
        """Gradient ``g`` (of this parameter's dtype and shape) as the kernels read it: in the
        parameter's order (copied there if it is in another), as a real tensor."""
        if g.requires_grad:  # backward(create_graph=True)
            g = g.detach()
        if self.order is None:
            if not g.is_contiguous():  # read only: a contiguous copy is enough
                g = g.contiguous()
            return g if self.plain else real(g)
        if g.stride() != self.order:
            g = torch.empty_strided(g.shape, self.order, dtype=g.dtype, device=g.device).copy_(g)
        return flat(real(g))

    def current(self, p: torch.Tensor, state: dict, names: tuple[str, ...]) -> bool:
        """Whether these views still serve ``p`` with its state dict ``state`` (the short
        route inlines the same test)."""
        return (
            names == self.names
            and p.data_ptr() == self.ptr
            and all(map(operator.is_, map(state.get, self.keys), self.held))
        )


class _Bucket:
    """The parameters of one group, device, dtype and step count, as the kernels take them."""

    __slots__ = (
        "gathers", "grads", "options", "params", "recs", "state", "step", "steps", "where"
    )  # fmt: skip

    def __init__(self, options: dict, step: int, slots: tuple[str, ...]) -> None:
        self.options, self.step = options, step
        self.where: list[tuple] = []  # (group, index, index in group, param) of each
        self.recs: list[_Views] = []
        self.params: list = []
        self.grads: list = []
        self.state: dict[str, list] = {s: [] for s in slots}  # fastrms's names
        self.steps: list = []  # (view of state["step"], its new value)
        self.gathers: list = []  # strided parameters: (kernel view, buffer)


class _Run:
    """One bucket of the last step: its plan, rows in the flat parameter list, views, state
    dicts and step count."""

    __slots__ = (
        "checked", "cuda", "dicts", "float32", "gathers", "group", "ordered", "plan", "plain",
        "recs", "rows", "step",
    )  # fmt: skip

    def __init__(
        self, group: int, step: int, plan: Any, rows: list[int], recs: list, dicts: list
    ) -> None:
        self.group, self.step, self.plan, self.rows, self.recs = group, step, plan, rows, recs
        self.dicts = dicts  # each parameter's dict in the optimizer's state
        self.cuda, self.float32 = recs[0].cuda, recs[0].kdtype is torch.float32
        self.checked = None  # the group's setup last checked against float32
        self.gathers = [rec.gather for rec in recs if rec.gather is not None]
        self.plain = all(rec.plain for rec in recs)  # CUDA: the gradients go as they are
        self.ordered = any(rec.order is not None for rec in recs)  # dense, not contiguous


class _Repeat:
    """The last step: every parameter (flattened over the groups), which had a gradient, the
    number of groups, the state names of each group that ran, the buckets that ran, and the
    optimizer's state mapping with its keys and values then. With several buckets, also what
    they all write (``spans``) and each gradient's size in bytes, so that the gradients of
    every bucket are checked for overlap before the first bucket runs."""

    __slots__ = (
        "groups", "has_grad", "names", "nbytes", "params", "runs", "spans", "state",
        "state_items",
    )  # fmt: skip

    def __init__(self, params, has_grad, groups: int, names: dict, runs: list[_Run], state):
        self.params, self.has_grad, self.groups, self.names = params, has_grad, groups, names
        self.runs, self.state, self.state_items = runs, state, _items(state)
        self.spans = self.nbytes = None
        if len(runs) > 1:
            arrays = [a for run in runs for rec in run.recs for a in rec.arrays]
            self.spans = _Spans([(None, a, True) for a in arrays])
            sizes = [extent(rec.arrays[0])[1] for run in runs for rec in run.recs]
            self.nbytes = np.array(sizes, np.int64)


def _items(state: dict) -> list:
    """A dict's keys then values, to tell by identity that it maps the same objects to the same
    objects (in C: a tensor key would be hashed by a Python method)."""
    return [*state, *state.values()]


class _FusedOptimizer(torch.optim.Optimizer):
    """What the five optimizers share: checks, state, buckets and the step."""

    #: The fastrms rule (a key of :data:`fastrms.specs.SPECS`) that the step runs.
    _rule: ClassVar[str]
    #: Every param-group key with its default, for checkpoints that lack some (torch's own
    #: ``__setstate__`` does the same).
    _group_defaults: ClassVar[dict[str, Any]]
    #: fastrms state names that torch spells differently.
    _torch_names: ClassVar[dict[str, str]] = {}
    #: Whether ``state["step"]`` is kept (not by SGD, as in torch).
    _keeps_step: ClassVar[bool] = True
    #: Whether the update depends on the step count (bias corrections, lr decay).
    _counts_steps: ClassVar[bool] = True
    #: Whether parallel CPU steps run on torch's OpenMP team (:class:`_OpenMPTeam`) where there
    #: is one, rather than on Numba's threads (the benchmarks compare the two).
    _torch_team: ClassVar[bool] = True

    def __init__(self, params: Params, defaults: dict[str, Any]) -> None:
        self._views: dict[torch.Tensor, _Views] = {}
        self._setups: dict[int, tuple] = {}
        self._plans: dict[tuple, Any] = {}
        self._last: _Repeat | None = None
        super().__init__(params, defaults)

    # -- what each optimizer defines ---------------------------------------------------------

    #: The param-group keys that are fastrms hyperparameters of the rule.
    _hyper_keys: ClassVar[tuple[str, ...]]

    def _options(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group's hyperparameters as fastrms keywords (Python numbers, not tensors)."""
        return {k: _scalar(k, group[k]) for k in self._hyper_keys}

    def _new_state(self, group: dict[str, Any], p: torch.Tensor, name: str) -> torch.Tensor:
        return _zeros_like(p, name)

    # -- groups and checkpoints ---------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; the group's hyperparameters are
        checked now (``ValueError``/``TypeError`` naming them, and the group is not added)."""
        super().add_param_group(param_group)
        self._last = None
        group = self.param_groups[-1]
        try:
            for flag in ("capturable", "differentiable"):
                if group.get(flag):
                    raise ValueError(
                        f"fastrms.torch.{type(self).__name__}: {flag}=True is not "
                        "supported (use torch.optim for it)"
                    )
            SPECS[self._rule].setup(1, **self._options(group))
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._views = {}  # load_state_dict and copies bring new state tensors
        self._setups = {}
        self._plans = {}
        self._last = None
        for group in self.param_groups:
            for key, value in self._group_defaults.items():
                group.setdefault(key, value)
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st and not torch.is_tensor(st["step"]):
                    st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)

    # -- the step -----------------------------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a gradient, in place; return ``closure()``'s loss.

        Every gradient, state tensor, step count and hyperparameter of every bucket is checked
        before the first bucket is written: a bad one raises ``TypeError``/``ValueError``
        naming the parameter, and nothing changes.

        Under ``torch.compile`` the step runs as it is, outside the graph (a graph break):
        Dynamo does not trace into the kernels.
        """
        if _dynamo_compiling():  # True only while Dynamo traces this
            return _step_eagerly(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        last, self._last = self._last, None
        if last is not None and self._repeat(last):
            self._last = last
            return loss
        buckets, created = self._buckets()
        try:
            ready = [_plan(self._rule, b, self._plans, self._name, self._torch_team)
                     for b in buckets]  # fmt: skip
            if len(buckets) > 1:  # each plan checks its own bucket's gradients
                self._check_gradients_apart(buckets)
        except Exception:  # refused before anything was written: leave no new state either
            self._forget(created)
            raise
        for b, (plan, setup) in zip(buckets, ready):
            _run(plan, setup, b.grads, b.gathers, addresses=False)
            for view, t in b.steps:
                view[()] = t
        self._last = self._record(buckets, [plan for plan, _ in ready])
        return loss

    def _check_gradients_apart(self, buckets: list[_Bucket]) -> None:
        """Raise ``ValueError`` if a gradient overlaps an array that any bucket writes."""
        arrays = []
        for b in buckets:
            for i, (where, rec) in enumerate(zip(b.where, b.recs)):
                label = _Label(self._name, where)
                arrays.append((label.of("the gradient of "), b.grads[i], False))
                arrays.append((label, rec.arrays[0], True))
                arrays += [
                    (label.of(f"{n} of "), a, True) for n, a in zip(rec.names, rec.arrays[1:])
                ]
        check_no_overlap(arrays)

    # -- the step again: the same parameters with gradients as last time ---------------------

    def _record(self, buckets: list[_Bucket], plans: list) -> _Repeat | None:
        """What a next step needs to repeat this one without sorting the parameters again."""
        if not plans:
            return None
        groups = self.param_groups
        flat = [p for group in groups for p in group["params"]]
        offsets = [0]
        for group in groups:
            offsets.append(offsets[-1] + len(group["params"]))
        runs = []
        for b, plan in zip(buckets, plans):
            gi = b.where[0][1]
            rows = [offsets[w[1]] + w[2] for w in b.where]
            dicts = [self.state[w[3]] for w in b.where]
            runs.append(_Run(gi, b.step, plan, rows, b.recs, dicts))
        has_grad = [p.grad is not None for p in flat]
        names = {run.group: self._setups[run.group][3][2] for run in runs}
        return _Repeat(flat, has_grad, len(groups), names, runs, self.state)

    def _repeat(self, last: _Repeat) -> bool:
        """Step as last time, if the same parameters have gradients, their state tensors are
        the same and each bucket's step count moved on by one; return whether it did.

        It checks what the full route checks that can change between steps (the gradients'
        dtype, layout and contiguity, the hyperparameters by value, the state tensors and
        step counts); anything else, or anything that it would refuse, goes the full route,
        which explains the problem. It saves sorting the parameters into buckets and checking
        the hyperparameters again; CPU gradients go to the kernels as bare addresses (no NumPy
        view each), and nothing keeps them alive after the step.
        """
        groups = self.param_groups
        if len(groups) != last.groups:
            return False
        flat = [p for group in groups for p in group["params"]]
        if len(flat) != len(last.params) or not all(map(operator.is_, flat, last.params)):
            return False
        grads = [p.grad for p in flat]
        if [g is not None for g in grads] != last.has_grad:
            return False
        state = self.state  # the same mapping: then each parameter's dict is the one recorded
        items = _items(state)
        if state is not last.state or len(items) != len(last.state_items):
            return False
        if not all(map(operator.is_, items, last.state_items)):
            return False
        setups = {}
        for gi, state_names in last.names.items():
            _, setup, names, stepper = self._group_setup(gi, groups[gi])
            if names != state_names:
                return False
            setups[gi] = (setup, stepper)
        keeps, counts = self._keeps_step, self._counts_steps
        strided, is_ = torch.strided, operator.is_
        work = []
        addresses = [] if last.spans is not None else None  # of every gradient, in order
        for run in last.runs:
            setup, stepper = setups[run.group]
            if run.float32 and setup is not run.checked:  # step 1's scalars are the largest
                _check_fits_float32(setup)
                run.checked = setup
            # SGD's momentum buffers take the gradient itself at step 1 only, then step is 2.
            step = run.step + 1 if keeps and counts else (2 if counts else 1)
            cuda, ordered = run.cuda, run.ordered
            taken = []  # CPU: the gradients' addresses; CUDA: the gradients
            for i, rec, st in zip(run.rows, run.recs, run.dicts):
                p, g = flat[i], grads[i]
                if p.data_ptr() != rec.ptr or not all(map(is_, map(st.get, rec.keys), rec.held)):
                    return False
                if keeps and counts and float(rec.step_view) != run.step:
                    return False
                if g.layout is not strided or g.dtype is not rec.dtype or not g.is_contiguous():
                    # Only a dense parameter in another order takes a gradient that is not
                    # contiguous as it is: one with its own strides.
                    if not (ordered and g.layout is strided and g.dtype is rec.dtype
                            and g.stride() == rec.order):  # fmt: skip
                        return False
                elif ordered and rec.order is not None:  # the full route puts it in order
                    return False
                if cuda:
                    if g.requires_grad:  # torch gives no CUDA interface for these
                        return False
                    taken.append(g if rec.plain else rec.grad(g))
                    if addresses is not None:
                        addresses.append(g.data_ptr())
                else:
                    taken.append(g.data_ptr())
            if cuda:  # on torch's current stream, as _sort does
                streams = {}
                for rec in run.recs:
                    device = rec.arrays[0].device
                    if device not in streams:
                        streams[device] = torch.cuda.current_stream(device).cuda_stream or None
                    for a in rec.arrays:
                        a.on(streams[device])
            work.append((run, step, stepper(step), taken))
            if addresses is not None and not cuda:
                addresses += taken
        if addresses is not None:  # each plan checks its own bucket's gradients
            if last.spans.first_overlap(np.array(addresses, np.int64), last.nbytes) is not None:
                return False  # the full route says which
        for k, (run, step, setup, taken) in enumerate(work):
            try:
                if run.gathers:
                    _run(run.plan, setup, taken if run.cuda else np.array(taken, np.int64),
                         run.gathers, addresses=not run.cuda)  # fmt: skip
                elif run.cuda:
                    run.plan.run(taken, setup)
                else:
                    run.plan.run_addresses(np.array(taken, np.int64), setup)
            except (TypeError, ValueError):
                if k == 0:  # nothing written: the full route says what is wrong
                    return False
                raise
            run.step = step
            if keeps:
                for rec in run.recs:
                    view = rec.step_view
                    view[()] = step if counts else float(view) + 1
        return True

    def _buckets(self) -> tuple[list[_Bucket], list[torch.Tensor]]:
        """Check everything, create missing state, and sort the work into buckets; return
        them and the parameters whose state was created."""
        todo = []  # (gi, group, options, setup, torch state names, [(pi, p, grad, views)])
        for gi, group in enumerate(self.param_groups):
            items = []
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if not items:
                    options, setup, names, _ = self._group_setup(gi, group)
                rec = self._views.get(p)
                st = self.state.get(p)
                if rec is None or st is None or not rec.current(p, st, names):
                    self._check_param(group, gi, pi, p, st, names)
                    rec = None
                if g.layout is not torch.strided or g.dtype is not p.dtype:
                    self._check_grad(group, gi, pi, p, g)
                items.append((pi, p, g, rec))
            if items:
                todo.append((gi, group, options, setup, names, items))
        created: list[torch.Tensor] = []
        try:
            return self._sort(todo, created), created
        except Exception:
            self._forget(created)
            raise

    def _forget(self, created: list[torch.Tensor]) -> None:
        """Drop the state of a refused step's new parameters, as if it had not been tried."""
        for p in created:
            self.state.pop(p, None)
            self._views.pop(p, None)

    def _group_setup(self, gi: int, group: dict) -> tuple[dict, Setup, tuple, Callable]:
        """The group's options, their checked step-1 setup, the torch names of the state they
        use, and the setup of any step (:meth:`fastrms.specs.Spec.stepper`); kept while the
        group's values stay equal Python numbers of the same types (a tensor can change in
        place, so a setup computed from one is not reused)."""
        raw = _hyper_values(self._hyper_keys)(group)
        types = tuple(map(type, raw))
        last = self._setups.get(gi)
        if last is not None and last[0] and last[1] == types:
            try:
                if last[2] == raw:  # a tensor in betas compares by value
                    return last[3]
            except RuntimeError:  # a tensor of several values: _options says what is wrong
                pass
        options = self._options(group)
        stepper = SPECS[self._rule].stepper(**options)
        setup = stepper(1)
        names = tuple(self._torch_names.get(s, s) for s in setup.state)
        self._setups[gi] = (_plain(raw), types, raw, (options, setup, names, stepper))
        return options, setup, names, stepper

    def _sort(self, todo: list, created: list) -> list[_Bucket]:
        """Sort the checked work into buckets of (group, device, dtype, step), creating the
        state that is missing (the parameters whose state was empty go to ``created``)."""
        buckets: dict[tuple, _Bucket] = {}
        streams: dict[torch.device, int | None] = {}
        for gi, group, options, setup, names, items in todo:
            slots = setup.state
            for pi, p, g, rec in items:
                fresh = False
                if rec is None:
                    rec, fresh = self._views_of(group, p, names, created)
                if self._keeps_step:
                    t = self._next_step(rec, group, gi, pi, p)
                else:  # SGD: a new momentum buffer is set to the gradient itself (step 1)
                    t = 1 if fresh else 2
                key = (gi, rec.cuda, rec.kdtype, t if self._counts_steps else 1)
                b = buckets.get(key)
                if b is None:
                    b = buckets[key] = _Bucket(options, key[3], slots)
                    if rec.kdtype is torch.float32:  # the scalars are largest on step 1
                        _check_fits_float32(setup)
                if rec.step_view is not None:
                    b.steps.append((rec.step_view, float(t)))
                if rec.gather is not None:
                    b.gathers.append(rec.gather)
                g = rec.grad(g)
                arrays = rec.arrays
                if rec.cuda:
                    if p.device not in streams:  # 0, torch's default stream, is named None
                        streams[p.device] = torch.cuda.current_stream(p.device).cuda_stream or None
                    stream = streams[p.device]
                    arrays = [a.on(stream) for a in arrays]
                    b.grads.append(g)
                else:
                    b.grads.append(g.numpy())
                b.params.append(arrays[0])
                b.where.append((group, gi, pi, p))
                b.recs.append(rec)
                for s, a in zip(slots, arrays[1:]):
                    b.state[s].append(a)
        return list(buckets.values())

    def _next_step(self, rec: _Views, group: dict, gi: int, pi: int, p: torch.Tensor) -> float:
        """The step count this step takes the parameter to. Where the update depends on it, a
        corrupt count (negative, not whole: a damaged checkpoint) is refused naming the
        parameter; elsewhere (RMSprop) it is only counted on, as torch does."""
        count = float(rec.step_view)
        if not self._counts_steps:
            return count + 1
        if not (count >= 0 and count.is_integer()):
            raise ValueError(
                f"state['step'] of {self._name(group, gi, pi, p)} is {count!r}: a step count "
                "must be a whole number >= 0"
            )
        return int(count) + 1

    def _views_of(self, group: dict, p: torch.Tensor, names: tuple, created: list):
        """The parameter's views, and whether a state buffer was created for them (state
        that is missing is created here, as torch does on a parameter's first step)."""
        st = self.state[p]
        if not st:
            created.append(p)
        fresh = False
        if self._keeps_step:
            step = st.get("step")
            if step is None:
                st["step"] = torch.zeros((), dtype=torch.float32)
            elif step.device.type != "cpu":  # e.g. from a fused or capturable checkpoint
                st["step"] = step.to("cpu", torch.float32)
        layout = layout_of(p)
        for n in names:
            if n not in st:
                st[n] = self._new_state(group, p, n)
                fresh = True
            elif not fits(st[n], p, layout):  # e.g. loaded from a checkpoint in another order
                st[n] = _zeros_like(p, n).copy_(st[n])
        rec = self._views[p] = _Views(p, st, names)
        return rec, fresh

    # -- checks ----------------------------------------------------------------------------

    def _name(self, group: dict, gi: int, pi: int, p: torch.Tensor) -> str:
        where = f"param_groups[{gi}]['params'][{pi}]"
        names = group.get("param_names")
        if names is not None and pi < len(names):
            where = f"{names[pi]!r} ({where})"
        return f"parameter {where} (shape {tuple(p.shape)}, {p.dtype}, {p.device})"

    def _check_param(self, group, gi, pi, p, st, names) -> None:
        what = self._name(group, gi, pi, p)
        cls = f"fastrms.torch.{type(self).__name__}"
        if p.layout is not torch.strided:
            raise TypeError(f"{cls} does not support sparse parameters: {what}")
        if p.dtype not in KERNEL_DTYPE:
            raise TypeError(
                f"{cls} supports float32 and float64 tensors (and complex64 and complex128, "
                f"stepped as their real views) only: {what}"
            )
        if p.device.type not in ("cpu", "cuda"):
            raise TypeError(f"{cls} runs on CPU and CUDA tensors only: {what}")
        if layout_of(p) == OVERLAPPING:
            raise ValueError(
                f"{cls} cannot update in place a parameter whose elements may share memory "
                f"(an expanded tensor, a stride of 0): {what}"
            )
        step = st.get("step") if st else None
        if step is not None and not (torch.is_tensor(step) and step.numel() == 1):
            desc = f"shape {tuple(step.shape)}" if torch.is_tensor(step) else type(step).__name__
            raise ValueError(f"state['step'] ({desc}) of {what} must be a 1-element tensor")
        for n in names if st else ():
            t = st.get(n)
            if t is None:
                continue
            if not (
                torch.is_tensor(t)
                and t.dtype is p.dtype
                and t.shape == p.shape
                and t.device == p.device
            ):
                desc = (
                    f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"
                    if torch.is_tensor(t)
                    else type(t).__name__
                )
                raise ValueError(f"state[{n!r}] ({desc}) does not match {what}")

    def _check_grad(self, group, gi, pi, p, g) -> None:
        what = self._name(group, gi, pi, p)
        cls = f"fastrms.torch.{type(self).__name__}"
        if g.layout is not torch.strided:
            raise TypeError(f"{cls} does not support sparse gradients: the gradient of {what}")
        if g.dtype is not p.dtype:
            raise TypeError(f"the gradient of {what} has dtype {g.dtype}")


@functools.lru_cache(maxsize=256)
def _check_fits_float32(setup: Setup) -> None:
    """Scalars valid in float64 can overflow float32 or (eps) underflow to 0; found here, before
    any bucket is written, rather than by the launch of a later bucket."""
    check_fits_float32(LAYOUTS[setup.rule], setup.scalars)


#: Where each state buffer goes relative to its parameter, in KiB modulo 4 KiB (see below).
_STAGGER = {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 3, "square_avg": 1,
            "momentum_buffer": 2, "grad_avg": 3, "sum": 1}  # fmt: skip


def _zeros_like(p: torch.Tensor, name: str) -> torch.Tensor:
    """A zero state buffer like ``p``, in the layout of ``torch.zeros_like(p,
    memory_format=torch.preserve_format)`` (``p``'s strides if ``p`` is dense, else
    contiguous). On the CPU it is placed a few KiB away from ``p`` modulo 4 KiB, as fastrms's
    own state is (fastrms.dispatch._staggered_zeros_like): torch's allocator tends to put
    same-sized tensors at the same offset modulo 4 KiB, and a loop that loads and stores
    arrays at (nearly) the same offset stalls on "4K aliasing" (the MLP's Adam step ran 2x
    slower so)."""
    if p.device.type != "cpu":
        return torch.zeros_like(p, memory_format=torch.preserve_format)
    from .dispatch import _staggered_zeros_like

    if p.is_contiguous() and not p.is_complex():
        return torch.from_numpy(_staggered_zeros_like(p.detach().numpy(), _STAGGER.get(name, 1)))
    k = real(p.detach())
    like = np.empty(k.numel(), torch.empty((), dtype=k.dtype).numpy().dtype)
    zeros = _staggered_zeros_like(like, _STAGGER.get(name, 1))  # placed from a fresh array
    return state_like(p, torch.from_numpy(zeros))


class _Label:
    """A parameter's name in an overlap error, made only if the error is raised."""

    __slots__ = ("name", "prefix", "where")

    def __init__(self, name: Callable[..., str], where: tuple, prefix: str = "") -> None:
        self.name, self.where, self.prefix = name, where, prefix

    def of(self, prefix: str) -> _Label:
        return _Label(self.name, self.where, prefix)

    def __str__(self) -> str:
        return self.prefix + self.name(*self.where)


def _scalar(name: str, x: Any) -> Any:
    """A hyperparameter as a Python number (torch accepts 1-element tensors, and betas as a
    pair of them)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} as a tensor must have one element, got shape {x.shape}")
        return x.item()
    if isinstance(x, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in x):
        return tuple(_scalar(f"{name}[{i}]", v) for i, v in enumerate(x))
    return x


@functools.cache
def _hyper_values(keys: tuple[str, ...]) -> Callable[[dict], tuple]:
    """A function of a param group giving the values of ``keys``, as a tuple (in C)."""
    if len(keys) == 1:
        return lambda group: (group[keys[0]],)
    return operator.itemgetter(*keys)


_PLAIN = (float, int, bool, type(None))


def _plain(values: tuple) -> bool:
    """Whether ``values`` are Python numbers (or pairs of them): a tensor can change in place,
    so a setup computed from one cannot be kept."""
    for v in values:
        if type(v) not in _PLAIN and not (type(v) is tuple and all(type(x) in _PLAIN for x in v)):
            return False
    return True


def _arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """A constructor's ``locals()`` as torch's ``defaults``: every argument but ``params``."""
    return {k: v for k, v in arguments.items() if k not in ("self", "params", "__class__")}


def _refuse(name: str, **flags: bool) -> None:
    for flag, value in flags.items():
        if value:
            raise ValueError(
                f"fastrms.torch.{name}: {flag}=True is not supported (use torch.optim for it)"
            )


# -- the optimizers ----------------------------------------------------------------------------


class RMSprop(_FusedOptimizer):
    """RMSprop with ``torch.optim.RMSprop``'s signature, defaults, state and semantics.

    ::

        g = grad (or -grad if maximize) + weight_decay * p
        v = alpha * v + (1 - alpha) * g**2                                   (square_avg)
        centered:  m = alpha * m + (1 - alpha) * g;  v_hat = v - m**2        (grad_avg)
        d = sqrt(v_hat) + eps         (torch)   or   sqrt(v_hat + eps)   (eps_in_sqrt=True)
        momentum > 0:  b = momentum * b + g / d;  p = p - lr * b             (momentum_buffer)
        else:          p = p - lr * g / d

    Parameters
    ----------
    params : iterable of tensors, of (name, tensor) pairs, or of param-group dicts
    lr, alpha, eps, weight_decay, momentum, centered, maximize
        As ``torch.optim.RMSprop``; ``lr`` may be a 1-element tensor.
    eps_in_sqrt : bool
        Put eps inside the square root (TF/Keras, Optax); not in torch (pytorch issue 23796).
    capturable, foreach, differentiable
        torch's; ``foreach`` is ignored, ``capturable``/``differentiable`` must be False.
    """

    _rule = "rmsprop"
    _hyper_keys = (
        "lr", "alpha", "eps", "weight_decay", "momentum", "centered", "eps_in_sqrt", "maximize"
    )  # fmt: skip
    _counts_steps = False
    _group_defaults = dict(
        momentum=0,
        centered=False,
        foreach=None,
        maximize=False,
        differentiable=False,
        capturable=False,
        eps_in_sqrt=False,
    )

    def __init__(
        self,
        params: Params,
        lr: float | torch.Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        eps_in_sqrt: bool = False,
    ) -> None:
        _refuse("RMSprop", capturable=capturable, differentiable=differentiable)
        super().__init__(params, _arguments(locals()))

    @classmethod
    def graves(
        cls,
        params: Params,
        lr: float = 1e-4,
        alpha: float = 0.95,
        momentum: float = 0.9,
        eps: float = 1e-4,
        **options: Any,
    ) -> RMSprop:
        """Chainer's ``RMSpropGraves`` (Graves 2013, eq. 38-41), with its defaults: centered
        RMSprop with momentum and eps inside the sqrt (see :meth:`fastrms.RMSProp.graves`)."""
        return cls(
            params,
            lr=lr,
            alpha=alpha,
            eps=eps,
            momentum=momentum,
            centered=True,
            eps_in_sqrt=True,
            **options,
        )


class Adagrad(_FusedOptimizer):
    """Adagrad with ``torch.optim.Adagrad``'s signature, defaults, state and semantics.

    ::

        g = grad (or -grad if maximize) + weight_decay * p
        clr = lr / (1 + (step - 1) * lr_decay)
        s = s + g**2                                (sum, starts at initial_accumulator_value)
        p = p - clr * g / (sqrt(s) + eps)    or, with eps_in_sqrt:  p - clr * g / sqrt(s + eps)

    Parameters
    ----------
    params : iterable of tensors, of (name, tensor) pairs, or of param-group dicts
    lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize
        As ``torch.optim.Adagrad``; ``lr`` may be a 1-element tensor.
    eps_in_sqrt : bool
        Put eps inside the square root (Keras, Optax: with ``initial_accumulator_value=0.1``).
    foreach, differentiable, fused
        torch's; ``foreach``/``fused`` are ignored, ``differentiable`` must be False.
    """

    _rule = "adagrad"
    _hyper_keys = ("lr", "lr_decay", "weight_decay", "eps", "eps_in_sqrt", "maximize")
    _torch_names = {"state_sum": "sum"}
    _group_defaults = dict(
        foreach=None, maximize=False, differentiable=False, fused=None, eps_in_sqrt=False
    )

    def __init__(
        self,
        params: Params,
        lr: float | torch.Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        eps_in_sqrt: bool = False,
    ) -> None:
        _refuse("Adagrad", differentiable=differentiable)
        super().__init__(params, _arguments(locals()))
        for group in self.param_groups:  # torch creates Adagrad's state at once
            for p in group["params"]:
                st = self.state[p]
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["sum"] = self._new_state(group, p, "sum")

    def _new_state(self, group, p, name):
        value = float(_scalar("initial_accumulator_value", group["initial_accumulator_value"]))
        if p.is_complex():  # both halves of the real view start there, as in torch
            return _zeros_like(p, name).fill_(complex(value, value))
        return _zeros_like(p, name).fill_(value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        value = self.param_groups[-1]["initial_accumulator_value"]
        try:
            hyper.nonneg("initial_accumulator_value", _scalar("initial_accumulator_value", value))
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise


class Adam(_FusedOptimizer):
    """Adam / AMSGrad with ``torch.optim.Adam``'s signature, defaults, state and semantics.

    ::

        decoupled_weight_decay (AdamW):  p = (1 - lr * weight_decay) * p
        g = grad (or -grad if maximize) + weight_decay * p        (L2 decay: Adam only)
        m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g**2
        amsgrad:  v_max = max(v_max, v), used in place of v             (max_exp_avg_sq)
        p = p - lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)

    Parameters
    ----------
    params : iterable of tensors, of (name, tensor) pairs, or of param-group dicts
    lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay
        As ``torch.optim.Adam``; ``lr`` and ``betas`` may be 1-element tensors.
    foreach, capturable, differentiable, fused
        torch's; ``foreach``/``fused`` are ignored, the others must be False.
    """

    _rule = "adam"
    _hyper_keys = (
        "lr", "betas", "eps", "weight_decay", "amsgrad", "decoupled_weight_decay", "maximize"
    )  # fmt: skip
    _group_defaults = dict(
        amsgrad=False,
        maximize=False,
        foreach=None,
        capturable=False,
        differentiable=False,
        decoupled_weight_decay=False,
        fused=None,
    )

    def __init__(
        self,
        params: Params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
    ) -> None:
        _refuse(type(self).__name__, capturable=capturable, differentiable=differentiable)
        super().__init__(params, _arguments(locals()))


class AdamW(Adam):
    """AdamW: :class:`Adam` with decoupled weight decay, default 1e-2 (``torch.optim.AdamW``).

    ::

        p = (1 - lr * weight_decay) * p, then the Adam update with g = grad (no L2 term)
    """

    def __init__(
        self,
        params: Params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


class SGD(_FusedOptimizer):
    """SGD with ``torch.optim.SGD``'s signature, defaults, state and semantics.

    ::

        g = grad (or -grad if maximize) + weight_decay * p
        momentum > 0:  b = momentum * b + (1 - dampening) * g     (first step: b = g)
                       g = g + momentum * b  (nesterov)   or   g = b
        p = p - lr * g

    As in torch, there is no ``state["step"]``; a parameter's ``momentum_buffer`` is created
    on its first step with momentum, and that step sets it to the gradient.

    Parameters
    ----------
    params : iterable of tensors, of (name, tensor) pairs, or of param-group dicts
    lr, momentum, dampening, weight_decay, nesterov, maximize
        As ``torch.optim.SGD``; ``lr`` and ``weight_decay`` may be 1-element tensors.
    foreach, differentiable, fused
        torch's; ``foreach``/``fused`` are ignored, ``differentiable`` must be False.
    """

    _rule = "sgd"
    _hyper_keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
    _keeps_step = False
    _group_defaults = dict(
        nesterov=False, maximize=False, foreach=None, differentiable=False, fused=None
    )

    def __init__(
        self,
        params: Params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | torch.Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        _refuse("SGD", differentiable=differentiable)
        super().__init__(params, _arguments(locals()))


class Lion(_FusedOptimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), with the
    signature and state of the ``lion-pytorch`` package; decoupled weight decay.

    ::

        g = grad (or -grad if maximize)
        c = beta1 * m + (1 - beta1) * g
        p = (1 - lr * weight_decay) * p - lr * sign(c)
        m = beta2 * m + (1 - beta2) * g                                  (exp_avg)

    torch has no Lion. Every element moves by exactly ``lr`` (plus decay): use a learning rate
    3-10x smaller than AdamW's and a weight decay 3-10x larger, as the paper advises. Needs a
    fastrms with the Lion rule (:func:`fastrms.functional.lion`).

    Parameters
    ----------
    params : iterable of tensors, of (name, tensor) pairs, or of param-group dicts
    lr : float or 1-element tensor
        Default 1e-4.
    betas : (float, float)
        Default ``(0.9, 0.99)``.
    weight_decay : float
        Default 0.
    maximize : bool
    """

    _rule = "lion"
    _keeps_step = False
    _counts_steps = False
    _hyper_keys = ("lr", "betas", "weight_decay", "maximize")
    _group_defaults = dict(maximize=False)

    def __init__(
        self,
        params: Params,
        lr: float | torch.Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
    ) -> None:
        if SPECS is None or "lion" not in SPECS:
            raise RuntimeError("fastrms.torch.Lion needs a fastrms with the Lion rule")
        super().__init__(params, _arguments(locals()))
