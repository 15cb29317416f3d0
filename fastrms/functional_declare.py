"""The one-step function of an optimizer spec that has no hand-written one in
:mod:`fastrms.functional`: a real signature generated from the spec's slots, documented from
the spec."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import specs

_TEMPLATE = """from __future__ import annotations
def {name}({arrays}, *, {step}backend: str = "auto", **options) -> None:
    _step({name!r}, param, grad, {{{state}}}, backend, {step_value}, options)
"""


def declare(spec: specs.Spec, step: Callable, module: str) -> Callable[..., None]:
    """The one-step function of ``spec``, named ``spec.name``, documented from the spec.

    Its signature is that of the hand-written ones: ``param, grad``, then the state arrays
    (those that the default options use first; the others default to None), then keyword-only
    ``step`` (where the step count changes the scalars), ``backend`` and the options. It
    calls ``step(name, param, grad, state, backend, step, options)`` (the functional
    module's ``_step``) and reports ``module`` as its own.
    """
    used = spec.setup(1).state  # the state the default options use is always required
    slots = spec.layout.slots
    required = [s for s in slots if s in used]
    optional = [s for s in slots if s not in used]
    arrays = ["param: Array", "grad: Array", *(f"{s}: Array" for s in required)]
    arrays += [f"{s}: Array | None = None" for s in optional]
    source = _TEMPLATE.format(
        name=spec.name,
        arrays=", ".join(arrays),
        step="step: int, " if spec.counts_steps else "",
        state=", ".join(f"{s!r}: {s}" for s in slots),
        step_value="step" if spec.counts_steps else "1",
    )
    namespace: dict[str, Any] = {"Array": Any, "_step": step}
    exec(source, namespace)  # a real signature: Python's own messages for a wrong call
    fn = namespace[spec.name]
    fn.__module__ = module
    start = "starts at zero" if not spec.initial else "starts at zero unless an option says"
    step_doc = (
        "step : int\n    The step being taken, counting from 1.\n" if spec.counts_steps else ""
    )
    doc, options = spec.docs
    fn.__doc__ = (
        f"One {spec.title} step, in place (:class:`fastrms.{spec.title}` steps many).\n\n"
        f"{doc}\n\nParameters\n----------\n"
        f"{', '.join(('param', 'grad', *slots))} : array\n"
        "    Same shape and dtype (float32 or float64), C-contiguous; ``param`` and the state\n"
        f"    are updated in place. The state {start}.\n{step_doc}{options}\n"
        'backend : {"auto", "cuda", "cpu", "numpy"}\n    See :mod:`fastrms.dispatch`.'
    )
    return fn
