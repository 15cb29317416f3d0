"""The optimizers, declared: one :class:`~fastrms.spec_types.Layout` and one
:class:`~fastrms.spec_types.Spec` each, with the host function of its step's scalars.

A :class:`Layout` names what an optimizer's per-element rule takes (state arrays, scalars and
flags, in the order the rule indexes them); a :class:`Spec` is the optimizer as users see it
(options, defaults, checks, class names, docs, torch's face). The layouts are in
:mod:`fastrms.spec_layouts`, the specs in :mod:`fastrms.specs_adam` (Adam and its
descendants) and :mod:`fastrms.specs_sgd` (SGD, Lion, RMSProp, AdaGrad, Adadelta), the
machinery in :mod:`fastrms.spec_types`; this module collects them in :data:`SPECS` and
re-exports the names the rest of fastrms imports.

Adding an optimizer means writing its rule (kernels/rules.py), its reference
(fastrms/reference.py), a :class:`Layout` and a :class:`Spec`, its documentation and its
tests; nothing else lists optimizers by hand.

Nothing here imports numba.
"""

from __future__ import annotations

from .spec_layouts import LAYOUTS
from .spec_types import (  # noqa: F401  (re-exported: the names the rest of fastrms imports)
    F32_MAX,
    F32_TINY,
    Layout,
    Option,
    Setup,
    Slot,
    Spec,
    TorchFace,
    check_fits_float32,
)
from .specs_adam import ADAM, ADAMAX, ADAMW, NADAM, RADAM, nadam_mu_product  # noqa: F401
from .specs_sgd import ADADELTA, ADAGRAD, LION, RMSPROP, SGD, rmsprop_graves  # noqa: F401

SPECS = {
    s.name: s for s in (RMSPROP, ADAGRAD, ADAM, ADAMW, SGD, LION, ADAMAX, ADADELTA, RADAM, NADAM)
}

#: The most scalars and state slots of any rule, derived from the layouts (nothing is sized by
#: hand: each kernel takes its own rule's counts).
MAX_SCALARS = max(len(layout.scalars) for layout in LAYOUTS.values())
MAX_SLOTS = max(len(layout.slots) for layout in LAYOUTS.values())
