"""The optimizer behind :mod:`fastrms.torch`'s classes: param groups, checkpoints, state and
the full route of a step.

:class:`FusedOptimizer` is a :class:`torch.optim.Optimizer` over one optimizer of
:data:`fastrms.specs.SPECS`. What the spec declares, it takes from the spec: the
hyperparameters of a step (:attr:`fastrms.specs.Spec.step_options`), whether the step count
changes them, the checks of every option, the state arrays and their initial values. A
subclass in :mod:`fastrms.torch` adds only what is torch's: its signature, defaults and
docstring, its state names and whether it keeps ``state["step"]``.

A step that repeats the last one goes the short route (:mod:`fastrms.torch_repeat`); any
other goes the full route here, which checks everything, creates missing state and sorts
the parameters into buckets (:mod:`fastrms.torch_buckets`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch

from .arrays import check_no_overlap
from .precision import KAHAN_COMP
from .specs import SPECS, Setup, Spec
from .torch_buckets import Bucket, Views, plan_bucket, run_bucket
from .torch_checks import (
    Label,
    check_grad,
    check_setup_fits_float32,
    hyper_values,
    param_name,
    plain,
    refuse_flags,
    scalar,
)
from .torch_held import HeldState
from .torch_layout import fits, layout_of, zeros_like
from .torch_precision import (
    SCALES,
    check_options,
    param_view,
)
from .torch_repeat import Repeat, record, repeat

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]]

#: ``torch.compiler.is_dynamo_compiling``, looked up once (the step calls it every time).
_dynamo_compiling = torch.compiler.is_dynamo_compiling


@torch.compiler.disable
def _step_eagerly(opt: FusedOptimizer, closure: Callable[[], Any] | None) -> Any:
    """``opt``'s step, called where Dynamo traced ``opt.step``: it runs eagerly. (Not the
    whole step disabled: ``torch.compiler.disable``'s wrapper costs about 1 us per call,
    ``is_dynamo_compiling`` 0.04 us.)"""
    return FusedOptimizer.step(opt, closure)


def arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """A constructor's ``locals()`` as torch's ``defaults``: every argument but ``params``."""
    return {k: v for k, v in arguments.items() if k not in ("self", "params", "__class__")}


class FusedOptimizer(HeldState):
    """What the optimizers of :mod:`fastrms.torch` share: checks, state, buckets and the step.

    A subclass names its spec (``_spec_name``) and gives what is torch's; the rest is derived
    from the spec when the subclass is made (:meth:`__init_subclass__`).
    """

    # -- what each optimizer gives ----------------------------------------------------------

    #: The optimizer's key in :data:`fastrms.specs.SPECS`.
    _spec_name: ClassVar[str]
    #: Every param-group key with its default, for checkpoints that lack some (torch's own
    #: ``__setstate__`` does the same).
    _group_defaults: ClassVar[dict[str, Any]]
    #: fastrms state names that torch spells differently.
    _torch_names: ClassVar[dict[str, str]] = {}
    #: Whether ``state["step"]`` is kept (not by SGD, as in torch).
    _keeps_step: ClassVar[bool] = True
    #: 0-d float32 state that torch keeps per parameter beside ``step``, written after each
    #: step from the step options and count (NAdam's ``mu_product``):
    #: :attr:`fastrms.specs.TorchFace.scalar_state`.
    _scalar_state: ClassVar[Mapping[str, Callable[..., float]]] = {}
    #: Whether parallel CPU steps run on torch's OpenMP team (:func:`fastrms.teams.torch_team`)
    #: where there is one, rather than on Numba's threads (the benchmarks compare the two).
    _torch_team: ClassVar[bool] = True

    # -- what is derived from the spec --------------------------------------------------------

    _spec: ClassVar[Spec]
    #: The param-group keys that are the options of a step (:attr:`Spec.step_options`).
    _hyper_keys: ClassVar[tuple[str, ...]]
    #: Whether the update depends on the step count (bias corrections, lr decay).
    _counts_steps: ClassVar[bool]
    #: Each state array by torch's name: its fastrms name and place among the rule's (from 1).
    _slots: ClassVar[dict[str, tuple[str, int]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_spec_name" not in vars(cls):
            return
        spec = cls._spec = SPECS[cls._spec_name]
        cls._hyper_keys = spec.step_options
        cls._counts_steps = spec.counts_steps
        slots = spec.layout.slots
        cls._slots = {cls._torch_names.get(s, s): (s, i + 1) for i, s in enumerate(slots)}

    #: The options of how state and bfloat16 parameters are stored: per optimizer,
    #: not per param group, so that torch's checkpoints and groups stay torch's.
    _PRECISION = ("state_dtype", "rounding", "seed")

    def __init__(self, params: Params, defaults: dict[str, Any]) -> None:
        defaults = dict(defaults)
        options = {k: defaults.pop(k, None) for k in self._PRECISION}
        check_options(**options)
        #: How the state is held (:mod:`fastrms.torch_precision`): None as each parameter is.
        self.state_dtype: str | None = options["state_dtype"]
        self.rounding: str | None = options["rounding"]
        self.seed: int | None = options["seed"]
        self._views: dict[torch.Tensor, Views] = {}
        self._setups: dict[int, tuple] = {}
        self._plans: dict[tuple, Any] = {}
        self._last: Repeat | None = None
        super().__init__(params, defaults)

    def _options(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group's hyperparameters as fastrms keywords (Python numbers, not tensors)."""
        return {k: scalar(k, group[k]) for k in self._hyper_keys}

    # -- groups and checkpoints ---------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; the group's hyperparameters are
        checked now (``ValueError``/``TypeError`` naming them, and the group is not added)."""
        super().add_param_group(param_group)
        self._last = None
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        try:
            refuse_flags(f"fastrms.torch.{type(self).__name__}", group)
            self._spec.setup(1, **{k: scalar(k, group[k]) for k in self._spec.defaults})
            for pi, p in enumerate(group["params"]):  # state_dtype, rounding, seed fit it
                self._storage(p, self._name(group, gi, pi, p))
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        return {**state, **{k: getattr(self, k, None) for k in self._PRECISION}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for k in self._PRECISION:  # a pickle of an older fastrms has none
            if not hasattr(self, k):
                setattr(self, k, None)
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
                if st:
                    self._hold(p, st)

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
            if self._scalar_state:
                self._write_scalar_state(last)
            return loss
        buckets, created = self._buckets()
        try:
            ready = [plan_bucket(self._spec, b, self._plans, self._name, self._torch_team,
                                 self.state_dtype, self.rounding, self.seed)
                     for b in buckets]  # fmt: skip
            if len(buckets) > 1:  # each plan checks its own bucket's gradients
                self._check_gradients_apart(buckets)
        except Exception:  # refused before anything was written: leave no new state either
            self._forget(created)
            raise
        for b, (plan, setup) in zip(buckets, ready):
            run_bucket(plan, setup, b.grads, b.gathers, addresses=False, draw=b.draw)
            for view, t in b.steps:
                view[()] = t
        self._last = self._record(buckets, [plan for plan, _ in ready])
        if self._scalar_state and self._last is not None:
            self._write_scalar_state(self._last)
        return loss

    def _write_scalar_state(self, last: Repeat) -> None:
        """Write each stepped parameter's scalar state (:attr:`_scalar_state`) for the step
        count it has reached, as torch keeps it (a 0-d float32 tensor)."""
        for run in last.runs:
            options = self._setups[run.group][3][0]
            values = {n: f(run.step, **options) for n, f in self._scalar_state.items()}
            for st in run.dicts:
                for n, value in values.items():
                    t = st.get(n)
                    if torch.is_tensor(t) and t.numel() == 1:
                        t.fill_(value)
                    else:
                        st[n] = torch.tensor(value, dtype=torch.float32)

    def _check_gradients_apart(self, buckets: list[Bucket]) -> None:
        """Raise ``ValueError`` if a gradient overlaps an array that any bucket writes."""
        arrays = []
        for b in buckets:
            for i, (where, rec) in enumerate(zip(b.where, b.recs)):
                label = Label(self._name, where)
                arrays.append((label.of("the gradient of "), b.grads[i], False))
                arrays.append((label, rec.arrays[0], True))
                arrays += [
                    (label.of(f"{n} of "), a, True) for n, a in zip(rec.names, rec.arrays[1:])
                ]
        check_no_overlap(arrays)

    def _buckets(self) -> tuple[list[Bucket], list[torch.Tensor]]:
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
                if rec is None or st is None or not rec.current(p, st, self._names_of(p, names)):
                    self._check_param(group, gi, pi, p, st, self._names_of(p, names))
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
        raw = hyper_values(self._hyper_keys)(group)
        types = tuple(map(type, raw))
        last = self._setups.get(gi)
        if last is not None and last[0] and last[1] == types:
            try:
                if last[2] == raw:  # a tensor in betas compares by value
                    return last[3]
            except RuntimeError:  # a tensor of several values: _options says what is wrong
                pass
        options = self._options(group)
        stepper = self._spec.stepper(**options)
        setup = stepper(1)
        names = tuple(self._torch_names.get(s, s) for s in setup.state)
        self._setups[gi] = (plain(raw), types, raw, (options, setup, names, stepper))
        return options, setup, names, stepper

    def _sort(self, todo: list, created: list) -> list[Bucket]:
        """Sort the checked work into buckets of (group, device, dtype, step), creating the
        state that is missing (the parameters whose state was empty go to ``created``).

        A bfloat16 parameter under stochastic rounding also goes by its own step count (its
        ``draw``, which keys the random bits, :func:`fastrms.torch_buckets.plan_bucket`)."""
        buckets: dict[tuple, Bucket] = {}
        streams: dict[torch.device, int | None] = {}
        offsets = [0]  # each group's first parameter's position in the optimizer
        for group in self.param_groups:
            offsets.append(offsets[-1] + len(group["params"]))
        for gi, group, options, setup, names, items in todo:
            slots = setup.state
            for pi, p, g, rec in items:
                fresh = False
                if rec is None:
                    rec, fresh = self._views_of(group, p, self._names_of(p, names), created)
                draws = rec.low and (self.rounding or "stochastic") == "stochastic"
                count = None
                if rec.step_view is not None:
                    count = self._next_step(rec, group, gi, pi, p, whole=draws)
                if self._keeps_step:
                    t = count
                else:  # SGD: a new momentum buffer is set to the gradient itself (step 1)
                    t = 1 if fresh else 2
                draw = int(count) if draws else None
                key = (gi, rec.cuda, rec.kdtype, t if self._counts_steps else 1, draw)
                b = buckets.get(key)
                if b is None:
                    kahan = (KAHAN_COMP,) if KAHAN_COMP in rec.names else ()
                    b = buckets[key] = Bucket(options, key[3], slots + kahan, draw)
                    if rec.f32:  # the scalars are largest on step 1
                        check_setup_fits_float32(setup)
                if count is not None:
                    b.steps.append((rec.step_view, float(count)))
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
                    b.grads.append(param_view(g))
                b.params.append(arrays[0])
                b.where.append((group, gi, pi, p))
                b.streams.append(offsets[gi] + pi)
                b.recs.append(rec)
                for s, a in zip(slots, rec.kstate):
                    b.state[s].append(a)
                if KAHAN_COMP in b.state:
                    b.state[KAHAN_COMP].append(rec.kstate[-1])
        return list(buckets.values())

    def _next_step(
        self, rec: Views, group: dict, gi: int, pi: int, p: torch.Tensor, whole: bool = False
    ) -> float:
        """The step count this step takes the parameter to. Where the update depends on it (or
        ``whole``: it keys stochastic rounding), a corrupt count (negative, not whole: a
        damaged checkpoint) is refused naming the parameter; elsewhere (RMSprop) it is only
        counted on, as torch does."""
        count = float(rec.step_view)
        if not (self._counts_steps or whole):
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
        # A bfloat16 parameter under stochastic rounding counts its steps (they key the
        # random bits) even in an optimizer that keeps no count (SGD).
        draws = p.dtype is torch.bfloat16 and (self.rounding or "stochastic") == "stochastic"
        if self._keeps_step or draws:
            step = st.get("step")
            if step is None:
                st["step"] = torch.zeros((), dtype=torch.float32)
            elif step.device.type != "cpu":  # e.g. from a fused or capturable checkpoint
                st["step"] = step.to("cpu", torch.float32)
        layout = layout_of(p)
        for n in names:
            place = self._slots[n][1] if n in self._slots else len(self._slots) + 1
            if n.endswith(SCALES):  # made with their codes, checked to be there with them
                continue
            if n not in st:
                if n == KAHAN_COMP:  # not a slot of the rule: it starts at zero
                    st[n] = zeros_like(p, place, torch.bfloat16)
                else:
                    self._fill_state(group, p, n, st)
                    fresh = True
            elif st[n].dtype is torch.uint8:  # 8-bit codes are blocked in their own order
                pass
            elif not fits(st[n], p, layout):  # e.g. loaded from a checkpoint in another order
                st[n] = zeros_like(p, place, st[n].dtype).copy_(st[n])
        rec = self._views[p] = Views(p, st, names)
        return rec, fresh

    # -- the step again: the short route (fastrms.torch_repeat) ----------------------------

    _record = record  # what a next step needs to repeat this one
    _repeat = repeat  # step as last time, if nothing that the full route checks changed

    # -- checks ------------------------------------------------------------------------------

    _name = staticmethod(param_name)

    def _check_grad(self, group, gi, pi, p, g) -> None:
        check_grad(f"fastrms.torch.{type(self).__name__}", self._name(group, gi, pi, p), p, g)
