"""The step route of :mod:`fastrms.torch`: parameters as the kernels take them, sorted into
buckets, each bucket planned and run with one grouped call.

A step sorts the parameters that have a gradient into buckets of (param group, device, dtype,
step count) (:class:`Bucket`) and updates each bucket with one grouped call (a cached
:class:`fastrms.grouped.StepPlan`, :func:`plan_bucket`, :func:`run_bucket`): CPU tensors on
the ``cpu`` kernels, reached by address (zero-copy), in parallel on torch's own OpenMP threads
(:func:`fastrms.teams.torch_team`) from :data:`TEAM_THRESHOLD` elements; CUDA tensors on the
``cuda`` kernels, on torch's current stream. A parameter's arrays (:class:`Views`) are cached
across steps.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

from .grouped import StepPlan
from .lowprecision import Quantized, step_keys
from .specs import Setup, Spec
from .teams import torch_team
from .torch_layout import DENSE, STRIDED, flat, layout_of, real
from .torch_precision import SCALES, kernel_view, param_view

#: A CPU bucket of fewer elements runs on one thread. Higher than fastrms's own threshold
#: (``kernels.cpu.PARALLEL_THRESHOLD``, 2^17): right after torch's backward pass, starting
#: Numba's second thread costs more. Measured inside the MLP training loop of
#: ``bench.torch_loop`` (Adam, 2 cores, widths scaled): one thread took 0.76x, 0.80x, 0.86x
#: the two threads' time at 63K, 151K, 399K elements, and 1.22x at 1.19M.
PARALLEL_THRESHOLD = 1 << 19

#: With PyTorch's OpenMP team (:func:`fastrms.teams.torch_team`), a CPU bucket of fewer
#: elements runs on one thread. The team's threads are awake after torch's own ops, so two of
#: them pay off far earlier than Numba's: in the MLP training loop of ``bench.torch_loop``
#: (Adam, 2 cores, widths scaled), the team took 0.72x-0.82x the one-thread time at 104K
#: elements and 0.62x-0.80x at 151K; from 13K to 63K it took 0.77x-1.15x from run to run, no
#: clear gain, so those stay on one thread (which also never has to wake a sleeping team).
TEAM_THRESHOLD = 1 << 16

#: Cached plans per optimizer kept at most (a plan per bucket; buckets change rarely).
MAX_PLANS = 64


class CudaArray:
    """A CUDA tensor's ``__cuda_array_interface__`` (computed once, torch's is slow) that also
    names torch's current stream: torch exports none (version 2), and the kernels launch on
    the stream that the parameter's interface names, else on the default stream."""

    __slots__ = ("__cuda_array_interface__", "device")

    def __init__(self, t: torch.Tensor) -> None:
        self.__cuda_array_interface__ = {**t.__cuda_array_interface__, "version": 3}
        self.device = t.device

    def on(self, stream: int | None) -> CudaArray:
        self.__cuda_array_interface__["stream"] = stream  # None: torch's default stream
        return self


class Views:
    """A parameter's arrays as the kernels take them (NumPy views on the CPU, interface
    wrappers on CUDA), cached across steps; rebuilt when its data or state tensors change.

    The arrays are the tensors' real views, flat for a dense parameter in another order than
    contiguous; a strided parameter's array is its contiguous buffer (``gather``, see
    :mod:`fastrms.torch_layout`). ``order``: the strides a gradient must have to be read as
    it is (None: contiguous)."""

    __slots__ = (
        "arrays", "cuda", "dtype", "f32", "gather", "held", "kdtype", "keys", "kstate", "low",
        "names", "order", "plain", "ptr", "step", "step_view", "tensors",
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
        #: A bfloat16 parameter: its kernel arrays are bfloat16 patterns (computed in float32).
        self.low = p.dtype is torch.bfloat16
        kernel = [kernel_view(real(p.detach())), *map(kernel_view, self.tensors)]
        self.kdtype = kernel[0].dtype
        #: Whether the step computes in float32 (its scalars must fit float32).
        self.f32 = self.kdtype in (torch.float32, torch.uint16)
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
            self.arrays = tuple(CudaArray(t) for t in kernel)
        else:
            self.arrays = (param_view(kernel[0].view(p.dtype)) if self.low else kernel[0].numpy(),
                           *(t.numpy() for t in kernel[1:]))  # fmt: skip
        #: The state arrays as the plan takes them: 8-bit state (codes ``n``, scales
        #: ``n + SCALES``) as Quantized pairs, the others as they are.
        self.kstate = self.arrays[1:]
        if any(n.endswith(SCALES) for n in names):
            by_name = dict(zip(names, self.kstate))
            self.kstate = tuple(
                Quantized(a, by_name[n + SCALES]) if n + SCALES in by_name else a
                for n, a in by_name.items()
                if not n.endswith(SCALES)
            )

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


class Bucket:
    """The parameters of one group, device, dtype and step count, as the kernels take them."""

    __slots__ = (
        "draw", "gathers", "grads", "options", "params", "recs", "state", "step", "steps",
        "streams", "where",
    )  # fmt: skip

    def __init__(
        self, options: dict, step: int, slots: tuple[str, ...], draw: int | None = None
    ) -> None:
        self.options, self.step = options, step
        #: The step count that keys stochastic rounding (bfloat16 parameters), else None.
        self.draw = draw
        self.streams: list[int] = []  # each parameter's position in the optimizer
        self.where: list[tuple] = []  # (group, index, index in group, param) of each
        self.recs: list[Views] = []
        self.params: list = []
        self.grads: list = []
        self.state: dict[str, list] = {s: [] for s in slots}  # fastrms's names
        self.steps: list = []  # (view of state["step"], its new value)
        self.gathers: list = []  # strided parameters: (kernel view, buffer)


def plan_bucket(
    spec: Spec,
    b: Bucket,
    plans: dict,
    name: Callable[..., str],
    use_team: bool = True,
    state_dtype: str | None = None,
    rounding: str | None = None,
    seed: int | None = None,
) -> tuple[StepPlan, Setup]:
    """A bucket's plan and the setup of its step, checked; nothing is written.

    A bucket's :class:`fastrms.grouped.StepPlan` (its arrays checked and laid out once) is
    kept in ``plans`` while the bucket holds the same parameter and state arrays; a step then
    checks only the new gradients. ``name(*b.where[i])`` names the i-th parameter in errors.
    ``use_team``: run parallel CPU steps on torch's OpenMP team where there is one.
    ``state_dtype``: how the state is held (:class:`fastrms.grouped.StepPlan`'s option; the
    bucket's state arrays are then their ``uint16`` patterns, :class:`Views`).
    ``rounding``, ``seed``: how a bucket of bfloat16 parameters is stored back (the plan's
    options; ignored for other buckets). Its random bits are keyed by ``b.draw`` and each
    parameter's position in the optimizer (``b.streams``), as fastrms's NumPy classes key
    them by the step count and the parameter's position.
    """
    setup = spec.setup(b.step, **b.options)
    low = b.recs[0].low
    rounding, seed = (rounding or "stochastic", seed) if low else (None, None)
    key = (setup.rule, setup.flags, rounding, seed, *b.streams, *map(id, b.params))
    plan = plans.get(key)
    if plan is None or not plan.matches(setup, b.state, "auto"):
        if len(plans) >= MAX_PLANS:
            plans.clear()
        names = [name(*w) for w in b.where]
        grad_names = [f"the gradient of {n}" for n in names]
        team = torch_team() if use_team and not b.recs[0].cuda else None
        plan = plans[key] = StepPlan(
            setup,
            b.params,
            b.state,
            names,
            grad_names=grad_names,
            parallel_threshold=PARALLEL_THRESHOLD if team is None else TEAM_THRESHOLD,
            team=team,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
            streams=b.streams,
        )
    return plan, setup


def set_draws(plan: StepPlan, step: int, streams: list[int]) -> None:
    """Key a prepared plan's stochastic rounding for ``step`` (what :meth:`StepPlan.check`
    does for :meth:`StepPlan.run`; :meth:`StepPlan.run_addresses` keeps the last keys)."""
    keys = step_keys(plan.seed, step, streams)
    for group in plan.groups:
        group.set_keys(keys)


def run_bucket(
    plan: StepPlan, setup: Setup, grads: Any, gathers: list, addresses: bool,
    draw: int | None = None, streams: list[int] | None = None,
) -> None:  # fmt: skip
    """The one place that runs fastrms's kernels: one grouped call for a bucket, its strided
    parameters gathered into their buffers before and scattered back after (``gathers``:
    pairs of the parameter's kernel view and its buffer). ``grads``: arrays, or with
    ``addresses`` the host addresses of the gradients. ``draw``: the step count keying
    stochastic rounding (with the parameters' ``streams``), None without it."""
    for p, buf in gathers:
        buf.copy_(p)
    if addresses:
        if draw is not None:
            set_draws(plan, draw, streams)
        plan.run_addresses(grads, setup)
    else:
        plan.run(grads, setup, draw)
    for p, buf in gathers:
        p.copy_(buf)
