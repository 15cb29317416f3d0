"""The short route of :mod:`fastrms.torch`'s step: a step that repeats the last one.

A step that repeats the last one (the same parameters with gradients, the same state and data
tensors, each bucket's step count one further) reuses the last step's buckets and plans
(:func:`record`) after checking only what can change between steps (:func:`repeat`).
Both take the optimizer, a :class:`fastrms.torch_optimizer.FusedOptimizer`, which calls them
(typed as its base class here, so that the two modules do not import each other).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch

from .arrays import extent
from .grouped import _Spans as Spans
from .torch_buckets import Bucket, run_bucket, set_draws
from .torch_checks import check_setup_fits_float32


class Run:
    """One bucket of the last step: its plan, rows in the flat parameter list, views, state
    dicts and step count."""

    __slots__ = (
        "checked", "cuda", "dicts", "draw", "float32", "gathers", "group", "ordered", "plan",
        "plain", "recs", "rows", "step",
    )  # fmt: skip

    def __init__(
        self, group: int, step: int, plan: Any, rows: list[int], recs: list, dicts: list,
        draw: int | None = None,
    ) -> None:  # fmt: skip
        self.group, self.step, self.plan, self.rows, self.recs = group, step, plan, rows, recs
        self.dicts = dicts  # each parameter's dict in the optimizer's state
        # The step count keying stochastic rounding (the rows are the parameters' streams).
        self.draw = draw
        self.cuda, self.float32 = recs[0].cuda, recs[0].f32
        self.checked = None  # the group's setup last checked against float32
        self.gathers = [rec.gather for rec in recs if rec.gather is not None]
        self.plain = all(rec.plain for rec in recs)  # CUDA: the gradients go as they are
        self.ordered = any(rec.order is not None for rec in recs)  # dense, not contiguous


class Repeat:
    """The last step: every parameter (flattened over the groups), which had a gradient, the
    number of groups, the state names of each group that ran, the buckets that ran, and the
    optimizer's state mapping with its keys and values then. With several buckets, also what
    they all write (``spans``) and each gradient's size in bytes, so that the gradients of
    every bucket are checked for overlap before the first bucket runs."""

    __slots__ = (
        "groups", "has_grad", "names", "nbytes", "params", "runs", "spans", "state",
        "state_items",
    )  # fmt: skip

    def __init__(self, params, has_grad, groups: int, names: dict, runs: list[Run], state):
        self.params, self.has_grad, self.groups, self.names = params, has_grad, groups, names
        self.runs, self.state, self.state_items = runs, state, items(state)
        self.spans = self.nbytes = None
        if len(runs) > 1:
            arrays = [a for run in runs for rec in run.recs for a in rec.arrays]
            self.spans = Spans([(None, a, True) for a in arrays])
            sizes = [extent(rec.arrays[0])[1] for run in runs for rec in run.recs]
            self.nbytes = np.array(sizes, np.int64)


def items(state: dict) -> list:
    """A dict's keys then values, to tell by identity that it maps the same objects to the same
    objects (in C: a tensor key would be hashed by a Python method)."""
    return [*state, *state.values()]


def record(opt: torch.optim.Optimizer, buckets: list[Bucket], plans: list) -> Repeat | None:
    """What a next step needs to repeat this one without sorting the parameters again."""
    if not plans:
        return None
    groups = opt.param_groups
    flat = [p for group in groups for p in group["params"]]
    offsets = [0]
    for group in groups:
        offsets.append(offsets[-1] + len(group["params"]))
    runs = []
    for b, plan in zip(buckets, plans):
        gi = b.where[0][1]
        rows = [offsets[w[1]] + w[2] for w in b.where]
        dicts = [opt.state[w[3]] for w in b.where]
        runs.append(Run(gi, b.step, plan, rows, b.recs, dicts, b.draw))
    has_grad = [p.grad is not None for p in flat]
    names = {run.group: opt._setups[run.group][3][2] for run in runs}
    return Repeat(flat, has_grad, len(groups), names, runs, opt.state)


def repeat(opt: torch.optim.Optimizer, last: Repeat) -> bool:
    """Step as last time, if the same parameters have gradients, their state tensors are
    the same and each bucket's step count moved on by one; return whether it did.

    It checks what the full route checks that can change between steps (the gradients'
    dtype, layout and contiguity, the hyperparameters by value, the state tensors and
    step counts); anything else, or anything that it would refuse, goes the full route,
    which explains the problem. It saves sorting the parameters into buckets and checking
    the hyperparameters again; CPU gradients go to the kernels as bare addresses (no NumPy
    view each), and nothing keeps them alive after the step.
    """
    groups = opt.param_groups
    if len(groups) != last.groups:
        return False
    flat = [p for group in groups for p in group["params"]]
    if len(flat) != len(last.params) or not all(map(operator.is_, flat, last.params)):
        return False
    grads = [p.grad for p in flat]
    if [g is not None for g in grads] != last.has_grad:
        return False
    state = opt.state  # the same mapping: then each parameter's dict is the one recorded
    now = items(state)
    if state is not last.state or len(now) != len(last.state_items):
        return False
    if not all(map(operator.is_, now, last.state_items)):
        return False
    setups = {}
    for gi, state_names in last.names.items():
        _, setup, names, stepper = opt._group_setup(gi, groups[gi])
        if names != state_names:
            return False
        setups[gi] = (setup, stepper)
    keeps, counts = opt._keeps_step, opt._counts_steps
    strided, is_ = torch.strided, operator.is_
    work = []
    addresses = [] if last.spans is not None else None  # of every gradient, in order
    for run in last.runs:
        setup, stepper = setups[run.group]
        if run.float32 and setup is not run.checked:  # step 1's scalars are the largest
            check_setup_fits_float32(setup)
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
            if run.draw is not None and float(rec.step_view) != run.draw:
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
        if cuda:  # on torch's current stream, as the full route does
            streams = {}
            for rec in run.recs:
                device = rec.arrays[0].device
                if device not in streams:
                    streams[device] = torch.cuda.current_stream(device).cuda_stream or None
                for a in rec.arrays:
                    a.on(streams[device])
        this_step = stepper(step)
        if this_step.flags != run.plan.key[1]:  # flags that change with the step (RAdam's
            return False  # rectification): the full route plans for the new ones
        work.append((run, step, this_step, taken))
        if addresses is not None and not cuda:
            addresses += taken
    if addresses is not None:  # each plan checks its own bucket's gradients
        if last.spans.first_overlap(np.array(addresses, np.int64), last.nbytes) is not None:
            return False  # the full route says which
    for k, (run, step, setup, taken) in enumerate(work):
        draw = None if run.draw is None else run.draw + 1
        try:
            if run.gathers:
                grads_in = taken if run.cuda else np.array(taken, np.int64)
                run_bucket(run.plan, setup, grads_in, run.gathers, addresses=not run.cuda,
                           draw=draw, streams=run.rows)  # fmt: skip
            elif run.cuda:
                run.plan.run(taken, setup, draw)
            else:
                if draw is not None:
                    set_draws(run.plan, draw, run.rows)
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
        if draw is not None:
            run.draw = draw
            if not keeps:  # SGD keeps a count for its bfloat16 parameters only
                for rec in run.recs:
                    rec.step_view[()] = draw
    return True
