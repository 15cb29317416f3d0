"""Every frontend derives its public names from :data:`fastrms.specs.SPECS`: a spec without a
hand-written class or function gets one generated in ``fastrms``, ``fastrms.functional`` and
``fastrms.torch`` (from its :class:`fastrms.specs.TorchFace`).

These tests declare a spec that no frontend has ever seen (Lion under another name, with a
torch face) and check that each frontend makes from it what the hand-written ones are: the
signature, the docstring, and the same steps bit for bit.
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import replace

import numpy as np
import pytest
from conftest import assert_same_bits, randn

import fastrms
from fastrms import functional, optim
from fastrms.optim import OPTIMIZERS
from fastrms.specs import LION, SPECS, TorchFace

TWIN = replace(
    LION,
    name="twin",
    title="Twin",
    doc="""Lion under another name.

    ::

        c = beta1 * m + (1 - beta1) * g;  p = (1 - lr * weight_decay) * p - lr * sign(c)
    """,
    option_doc="""
    lr, betas, weight_decay, maximize
        As :class:`fastrms.Lion`.
    """,
    torch=TorchFace("Twin", ("lr", "betas", "weight_decay"), ("maximize",), keeps_step=False),
)


def test_public_names_come_from_the_specs():
    for name, spec in SPECS.items():
        cls = OPTIMIZERS[name]
        assert cls.spec is spec and cls.__name__ == spec.title, name
        assert getattr(fastrms, spec.title) is cls and spec.title in fastrms.__all__
        assert name in functional.__all__ and callable(getattr(functional, name))
    assert set(OPTIMIZERS) == set(SPECS)
    names = {"optimizer : {" + ", ".join(f'"{n}"' for n in SPECS) + "}"}
    assert names <= {line.strip() for line in functional.multi_tensor_step.__doc__.splitlines()}


def test_a_new_spec_makes_a_numpy_class_that_steps_as_its_rule():
    cls = optim.declare(TWIN)
    try:
        assert cls.__name__ == "Twin" and cls.__module__ == "fastrms.optim"
        params = inspect.signature(cls).parameters
        assert list(params) == [
            "params", "lr", "betas", "weight_decay", "maximize", "backend", "state_dtype",
            "rounding", "seed",
        ]  # fmt: skip
        assert params["state_dtype"].kind is inspect.Parameter.KEYWORD_ONLY
        assert params["rounding"].kind is params["seed"].kind is inspect.Parameter.KEYWORD_ONLY
        doc = inspect.getdoc(cls)
        assert doc.startswith("Lion under another name.") and "Parameters\n----------" in doc
        assert "backend : " in doc and "As :class:`fastrms.Lion`." in doc
        rng = np.random.default_rng(0)
        p0, grads = randn(rng, 40, np.float32), [randn(rng, 40, np.float32) for _ in range(3)]
        a = cls(p := p0.copy(), lr=0.1, weight_decay=0.1, backend="numpy")
        b = fastrms.Lion(q := p0.copy(), lr=0.1, weight_decay=0.1, backend="numpy")
        for g in grads:
            a.step(g)
            b.step(g)
        assert_same_bits(p, q)
        assert repr(a).startswith("Twin(1 arrays")
    finally:
        OPTIMIZERS.pop("twin", None)  # the class registered itself


@pytest.fixture
def twin_in_specs():
    """TWIN among the specs while a test runs (the steps find their spec by name)."""
    SPECS["twin"] = TWIN
    yield
    del SPECS["twin"]


def test_a_new_spec_makes_a_functional_step(twin_in_specs):
    fn = functional.declare(TWIN)
    assert fn.__name__ == "twin" and fn.__module__ == "fastrms.functional"
    params = inspect.signature(fn).parameters
    assert list(params) == ["param", "grad", "exp_avg", "backend", "options"]
    assert params["backend"].kind is inspect.Parameter.KEYWORD_ONLY
    doc = inspect.getdoc(fn)
    assert "in place" in doc.splitlines()[0] and "::" in doc and "Parameters" in doc
    with pytest.raises(TypeError, match="takes 3 positional arguments but 4 were given"):
        fn(np.ones(3), np.ones(3), np.zeros(3), 0.1)
    with pytest.raises(TypeError, match="twin got unexpected keyword arguments"):
        fn(np.ones(3), np.ones(3), np.zeros(3), momentum=0.1)
    rng = np.random.default_rng(1)
    p0, g = randn(rng, 30, np.float64), randn(rng, 30, np.float64)
    m, n = np.zeros(30), np.zeros(30)
    fn(p := p0.copy(), g, m, lr=0.1, backend="numpy")
    functional.lion(q := p0.copy(), g, n, lr=0.1, backend="numpy")
    assert_same_bits(p, q)
    assert_same_bits(m, n)


def test_a_new_spec_with_a_torch_face_makes_a_torch_class(twin_in_specs):
    torch = (
        importlib.import_module("torch") if os.environ.get("CI") else pytest.importorskip("torch")
    )
    import fastrms.torch as ft

    cls = ft.declare(TWIN)
    assert cls.__name__ == "Twin" and cls.__module__ == "fastrms.torch"
    params = inspect.signature(cls).parameters
    storage = ["state_dtype", "rounding", "seed"]  # every fastrms.torch class's, keyword-only
    assert list(params) == ["params", "lr", "betas", "weight_decay", "maximize", *storage]
    for name in ("maximize", *storage):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(TypeError, match="too many positional arguments"):
        cls([torch.zeros(2)], 0.1, (0.9, 0.99), 0.0, True)
    assert cls._hyper_keys == TWIN.step_options and cls._counts_steps is False
    doc = inspect.getdoc(cls)
    assert doc.startswith("Twin with ``torch.optim.Twin``'s signature") and "::" in doc
    a, b = torch.randn(20, dtype=torch.float64), None
    b = a.clone()
    opts = [cls([a], lr=0.1, weight_decay=0.1), ft.Lion([b], lr=0.1, weight_decay=0.1)]
    for _ in range(3):
        g = torch.randn(20, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        for opt in opts:
            opt.step()
    assert torch.equal(a, b)
    assert opts[0].state_dict()["state"][0].keys() == {"exp_avg"}


def test_a_face_must_name_every_option():
    with pytest.raises(TypeError, match="not the spec's"):
        import fastrms.torch as ft

        ft.declare(replace(TWIN, torch=TorchFace("Twin", ("lr", "betas"))))
