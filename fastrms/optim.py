"""Optimizer classes: they own the state and run each step as one grouped call.

Parameters come as one array, a list or tuple of arrays, or a dict of name -> array; ``step``
takes the gradients in the same structure. Hyperparameters are plain attributes that may be
changed between steps (``opt.lr = 0.5 * opt.lr``). State starts at zero (AdaGrad: at
``initial_accumulator_value``), on the parameters' device, and is created when first needed.

Each class is declared by its :class:`fastrms.specs.Spec`: the hyperparameters, their defaults
and the constructor's signature come from it. A step reuses a :class:`fastrms.grouped.StepPlan`
made at the first step (and remade only when the options change which state or kernel is
used), so it checks only the gradients and the hyperparameters' values.

The base class is a thin face: the parameter structure, its names and state-dict keys are a
:class:`fastrms.tree.Tree`; the state arrays live in a :class:`fastrms.state.StateStore`
(``opt.state`` is its dict); the parameters are checked by :func:`fastrms.arrays.check_params`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

from . import dispatch, specs
from .arrays import check_params, is_bf16_array
from .grouped import StepPlan
from .lowprecision import BFLOAT16
from .precision import KAHAN_COMP, check_rounding, state_storage
from .state import StateStore, is_step_count, plain
from .tree import Params, Tree

#: Each optimizer class by its spec's name (``"adam"``: :class:`Adam`), filled as they are made.
OPTIMIZERS: dict[str, type[Optimizer]] = {}


def _init_from(spec: specs.Spec):
    """An ``__init__(self, params, <hyperparameters>, backend="auto", *, state_dtype=None)``
    for ``spec``."""
    P = inspect.Parameter
    signature = inspect.Signature(
        [P("self", P.POSITIONAL_OR_KEYWORD), P("params", P.POSITIONAL_OR_KEYWORD)]
        + [P(h, P.POSITIONAL_OR_KEYWORD, default=spec.defaults[h]) for h in spec.hyperparameters]
        + [P("backend", P.POSITIONAL_OR_KEYWORD, default="auto")]
        + [P("state_dtype", P.KEYWORD_ONLY, default=None)]
        + [P("rounding", P.KEYWORD_ONLY, default=None), P("seed", P.KEYWORD_ONLY, default=None)]
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        del values["self"]
        params, backend = values.pop("params"), values.pop("backend")
        state_dtype = values.pop("state_dtype")
        low = {"rounding": values.pop("rounding"), "seed": values.pop("seed")}
        Optimizer.__init__(self, params, backend, state_dtype=state_dtype, **low, **values)

    __init__.__signature__ = signature
    return __init__


class Optimizer:
    """Base class: parameter structure, state, steps, and state dicts.

    A subclass sets ``spec``; its ``__init__`` (``params``, the spec's hyperparameters with
    their defaults, then ``backend`` and the keyword ``state_dtype``) is made from the spec
    unless it defines one.

    ``state_dtype`` says how the state is held, for every optimizer alike: None (default) as
    the parameters are; ``"bfloat16"`` (float32 parameters): ``ml_dtypes.bfloat16``
    arrays (on a CUDA device: ``uint16`` arrays of the patterns), each element loaded into
    float32, updated in float32 and stored rounded to nearest even, so the state takes half
    the memory and a step moves fewer bytes;
    ``"int8"`` (float32 parameters, or bfloat16 host ones): each state array of a parameter
    of at least 4096 elements a :class:`fastrms.lowprecision.Quantized` pair (``uint8`` codes
    and one float32 scale per 256 elements, about a quarter of the memory; device arrays
    beside CUDA parameters), float32 arrays for smaller ones.

    Parameters may be bfloat16 (their gradients too): ``ml_dtypes.bfloat16`` host arrays, or
    CUDA arrays of bfloat16 or of its ``uint16`` patterns. Each step computes
    them in float32, with float32 state (``state_dtype="bfloat16"``: bfloat16 state;
    ``"int8"``: 8-bit state as above), and
    stores them as ``rounding`` says: ``"stochastic"`` (default; random bits keyed by
    ``seed``, the step count and the parameter's position, see
    :func:`fastrms.functional.multi_tensor_step`), ``"nearest"``, or ``"kahan"`` (a bfloat16
    compensation array per parameter, ``state["kahan_comp"]``, on the parameter's side,
    saved in the state dict).
    ``rounding`` and ``seed`` are refused unless a parameter is bfloat16.
    """

    spec: ClassVar[specs.Spec]
    #: Hyperparameter names, in ``__init__`` order; each is an attribute.
    hyperparameters: ClassVar[tuple[str, ...]]
    rule: ClassVar[str]
    #: Set by :meth:`_as_pieces` (the sharded optimizer's shards); None: whole tensors.
    _streams: list[int] | None = None
    _offsets: list[int] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        spec = cls.__dict__.get("spec")
        if spec is None:
            return
        cls.hyperparameters = spec.hyperparameters
        cls.rule = spec.rule
        OPTIMIZERS[spec.name] = cls
        if "__init__" not in cls.__dict__:
            cls.__init__ = _init_from(spec)

    def __init__(
        self,
        params: Params,
        backend: str = "auto",
        *,
        state_dtype: str | None = None,
        rounding: str | None = None,
        seed: int | None = None,
        **hyper: Any,
    ) -> None:
        self._tree = Tree(params, "params")
        self._params = self._tree.arrays
        if not self._params:
            raise ValueError("params is empty")
        self._pnames, self._gnames = self._tree.labels("params"), self._tree.labels("grads")
        infos = check_params(self._params, self._pnames, allow_bf16=True, device_bf16=True)
        if backend not in dispatch.CHOICES:
            raise ValueError(f"backend must be one of {dispatch.CHOICES}, got {backend!r}")
        bf16 = [is_bf16_array(p) for p in self._params]
        storages = _state_storages(state_dtype, infos, self._pnames, bf16)
        low = any(bf16)
        check_rounding(rounding, seed, low)
        self.backend = backend
        #: How the state is held (None: as the parameters are); fixed at construction.
        self.state_dtype = state_dtype
        #: How bfloat16 parameters are stored ("stochastic", "nearest" or "kahan"; None
        #: without any), and the seed of stochastic rounding; fixed at construction.
        self.rounding = (rounding or "stochastic") if low else None
        self.seed = 0 if seed is None else int(seed)
        for name, value in hyper.items():
            setattr(self, name, value)
        self.step_count = 0
        self._store = StateStore(self.spec, self._tree, storages)
        self._plan: StepPlan | None = None
        self._setup(1, self._hyper())  # check the hyperparameters now, not at the first step

    @property
    def state(self) -> dict[str, list]:
        """``{state name: [array or None for each parameter]}``, made as steps need them."""
        return self._store.arrays

    @state.setter
    def state(self, value: dict[str, list]) -> None:
        self._store.arrays = value

    def _setup(self, step: int, hyper: dict[str, Any]) -> specs.Setup:
        """Check the hyperparameters ``hyper`` and compute the scalars of step ``step``."""
        return self.spec.setup(step, **hyper)

    def _hyper(self) -> dict[str, Any]:
        return {h: getattr(self, h) for h in self.hyperparameters}

    # -- stepping ------------------------------------------------------------------------

    def step(self, grads: Params) -> None:
        """Update every parameter in place from ``grads`` (same structure as ``params``).

        Everything is checked first; if anything is wrong, no array is changed.
        """
        self._checked_step(grads)()

    def _checked_step(self, grads: Params) -> Callable[[], None]:
        """Check a step with ``grads`` (raising as :meth:`step` does, writing nothing);
        return the call that takes it. Until that call, :meth:`_forget_created` undoes it."""
        grads = self._tree.match(grads, "grads")
        count = self.step_count
        if (type(count) is not int or count < 0) and not is_step_count(count):
            wrong = isinstance(count, bool) or not isinstance(count, (int, np.integer))
            raise (TypeError if wrong else ValueError)(
                f"step_count must be an int >= 0, got {count!r}"
            )
        setup = self._setup(count + 1, self._hyper())
        plan = self._plan
        if plan is None or not plan.matches(setup, self._store.arrays, self.backend):
            plan = self._new_plan(setup)
        try:
            hypers = plan.check(grads, setup, count + 1)
        except (TypeError, ValueError):
            self._forget_created()
            raise

        def take() -> None:
            plan.launch(hypers, grads)
            self._store.keep()
            self.step_count = count + 1

        return take

    def _new_plan(self, setup: specs.Setup) -> StepPlan:
        self._plan = None
        state = self._store.prepare(self._state_names(setup.state), self._hyper())
        try:
            plan = StepPlan(
                setup, self._params, state, self._pnames, self.backend, self._gnames,
                state_dtype=self.state_dtype, rounding=self.rounding,
                seed=self.seed if self.rounding else None, streams=self._streams,
                offsets=self._offsets, sizes=self._store.sizes,
            )  # fmt: skip
        except (TypeError, ValueError):
            self._forget_created()
            raise
        self._plan = plan
        return plan

    def _as_pieces(self, streams: list[int], offsets: list[int], sizes: list[int]) -> None:
        """Step the parameters as pieces of whole tensors (for :mod:`fastrms.distributed`):
        piece ``i`` is elements ``offsets[i]`` on of a tensor of ``sizes[i]`` elements at
        position ``streams[i]`` of the whole list. Stochastic rounding then draws the whole
        tensor's bits, and ``state_dtype="int8"`` decides 8 bits on the whole size
        (:class:`fastrms.grouped.StepPlan`). Call it before the first step."""
        self._streams, self._offsets = list(streams), list(offsets)
        self._store.sizes = list(sizes)
        self._plan = None

    def _state_names(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """The state arrays a step with state ``names`` uses, the Kahan compensation with them."""
        return (*names, KAHAN_COMP) if self.rounding == "kahan" else names

    def _forget_created(self) -> None:
        """A refused step leaves no trace: the state it made is dropped, and its plan."""
        if self._store.forget():
            self._plan = None

    # -- state dicts -------------------------------------------------------------------------

    def state_dict(self, *, dequantize: bool = False) -> dict[str, Any]:
        """The optimizer's state as plain Python and NumPy values.

        Keys: ``"optimizer"`` (the class name), ``"step"``, ``"hyper.<name>"`` for each
        hyperparameter, and ``"state.<buffer>[.<param key>]"`` for each state array (host
        copies). It round-trips through ``np.savez(f, **sd)`` and ``dict(np.load(f))``.
        State held in 8 bits (``state_dtype="int8"``) gives two entries per array, that key
        with ``":codes"`` and ``":scales"`` appended, which load back bit for bit; with
        ``dequantize=True``, one float32 array instead, which any ``state_dtype`` loads
        (int8 quantizes it again).
        """
        hyper = self._hyper()
        try:  # create the state these options need, so that the dict loads back as it is
            needed = self._state_names(self._setup(self.step_count + 1, hyper).state)
        except (TypeError, ValueError):  # bad hyperparameters: load_state_dict will say so
            needed = ()
        sd: dict[str, Any] = {"optimizer": type(self).__name__, "step": self.step_count}
        for name in self.hyperparameters:
            value = getattr(self, name)
            sd[f"hyper.{name}"] = tuple(value) if isinstance(value, (list, tuple)) else value
        sd.update(self._store.entries(needed, hyper, dequantize))
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`, exactly; hyperparameters included.

        Raises ``ValueError`` (and changes nothing) if it comes from another optimizer class,
        another parameter structure, or arrays of other shapes or dtypes.
        """
        sd = dict(state_dict)
        name = plain(sd.pop("optimizer", None))
        if name != type(self).__name__:
            raise ValueError(f"state_dict is from optimizer {name!r}, not {type(self).__name__!r}")
        step = plain(sd.pop("step", None))
        if not is_step_count(step):
            raise ValueError(f"state_dict has an invalid step {step!r}")
        hyper = {}
        for h in self.hyperparameters:
            if f"hyper.{h}" not in sd:
                raise ValueError(f"state_dict lacks hyperparameter {h!r}")
            hyper[h] = plain(sd.pop(f"hyper.{h}"))
        setup = self._setup(int(step) + 1, hyper)
        arrays = self._store.take_entries(sd, self._state_names(setup.state))
        if sd:
            raise ValueError(f"state_dict has unexpected keys {sorted(sd)}")
        for h, value in hyper.items():
            setattr(self, h, value)
        self.step_count = int(step)
        self._store.load(arrays, hyper)

    def __repr__(self) -> str:
        hyper = ", ".join(f"{h}={getattr(self, h)!r}" for h in self.hyperparameters)
        return f"{type(self).__name__}({len(self._params)} arrays, {hyper})"


def _state_storages(
    state_dtype: str | None, infos: list, names: list[str], bf16: list[bool]
) -> list | None:
    """The storage of each parameter's state under ``state_dtype`` (None: as the parameters
    are; float32 beside bfloat16 parameters, ``bf16`` says which), refused with
    ``ValueError``/``TypeError`` naming the argument where it cannot be."""
    if state_dtype is None and not any(bf16):
        return None
    return [
        state_storage(state_dtype, BFLOAT16 if low else info.dtype, name)
        for info, name, low in zip(infos, names, bf16)
    ]


# -- the optimizers: one class per spec, named spec.title, documented from the spec -------------

_PARAMS_DOC = """params : array, list/tuple of arrays, or dict of str -> array
    float32 or float64, C-contiguous, writeable; NumPy arrays or CUDA arrays."""
_BACKEND_DOC = """backend : {"auto", "cuda", "cpu", "numpy"}
    ``auto`` picks from the array type; see :mod:`fastrms.dispatch`.
state_dtype : {None, "float32", "float64", "bfloat16", "int8"}
    How the state is held (keyword only); see :class:`Optimizer`."""


def declare(spec: specs.Spec, base: type[Optimizer] = Optimizer) -> type[Optimizer]:
    """The optimizer class of ``spec``, named ``spec.title``, documented from the spec; it
    subclasses ``base`` (the class of the spec ``spec.base`` names: AdamW's is Adam's)."""
    doc, options = spec.docs
    doc += f"\n\nParameters\n----------\n{_PARAMS_DOC}\n{options}\n{_BACKEND_DOC}"
    namespace = {"spec": spec, "__doc__": doc, "__module__": __name__, "__qualname__": spec.title}
    return type(spec.title, (base,), namespace)


for _spec in specs.SPECS.values():
    globals()[_spec.title] = declare(_spec, OPTIMIZERS[_spec.base] if _spec.base else Optimizer)
del _spec
RMSProp.graves = classmethod(specs.rmsprop_graves)  # noqa: F821 (made just above)
