"""The optimizer specs: one declaration per optimizer that the rest is derived from, and Lion.

- Each kernel rule indexes its tuples in its layout's order (read from the rule's source),
  so the names in fastrms.specs are the rule's own.
- The classes' signatures, defaults and attributes come from the specs.
- Lion, the optimizer added through a spec, matches its formula written out in float64.
"""

from __future__ import annotations

import ast
import inspect

import numpy as np
import pytest
from conftest import ALGOS, option_cases, randn

import fastrms
from fastrms import reference
from fastrms.kernels import rules
from fastrms.optim import OPTIMIZERS
from fastrms.specs import LAYOUTS, SPECS


def _indexed_names(fn) -> dict[str, list[str]]:
    """``{"arrays": [...], "hyper": [...], "flags": [...]}``: the local names a rule binds
    to ``arrays[k]``, ``hyper[k]``, ``flags[k]``, in index order."""
    found: dict[str, dict[int, str]] = {"arrays": {}, "hyper": {}, "flags": {}}
    for node in ast.walk(ast.parse(inspect.getsource(fn))):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Subscript)
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id in found
            and isinstance(node.value.slice, ast.Constant)
        ):
            found[node.value.value.id][node.value.slice.value] = node.targets[0].id
    return {k: [v[i] for i in sorted(v)] for k, v in found.items()}


@pytest.mark.parametrize("rule", LAYOUTS)
def test_rule_reads_its_arguments_in_the_layouts_order(rule):
    layout = LAYOUTS[rule]
    names = _indexed_names(rules.RULES[rule])
    assert names["arrays"] == list(layout.arrays)
    assert names["hyper"] == list(layout.scalars)
    assert names["flags"] == list(layout.flags)


@pytest.mark.parametrize("rule", LAYOUTS)
def test_every_rule_has_a_reference(rule):
    assert rule in rules.RULES and rule in reference.RULES


@pytest.mark.parametrize("name", SPECS)
def test_class_is_derived_from_its_spec(name):
    spec, cls = SPECS[name], OPTIMIZERS[name]
    assert cls.spec is spec and cls.hyperparameters == spec.hyperparameters
    params = inspect.signature(cls).parameters
    keyword = ["state_dtype", "rounding", "seed"]
    assert list(params) == ["params", *spec.hyperparameters, "backend", *keyword]
    for k in keyword:
        assert params[k].kind is inspect.Parameter.KEYWORD_ONLY and params[k].default is None
    for h in spec.hyperparameters:
        assert params[h].default == spec.defaults[h], h
    opt = cls(np.ones(3), backend="numpy")
    assert {h: getattr(opt, h) for h in opt.hyperparameters} == {
        h: spec.defaults[h] for h in spec.hyperparameters
    }
    positional = cls(np.ones(3), *[spec.defaults[h] for h in spec.hyperparameters])
    assert positional.backend == "auto"
    with pytest.raises(TypeError, match="unexpected keyword argument 'nonsense'"):
        cls(np.ones(3), nonsense=1)


def test_functional_forms_take_the_spec_options():
    for name, spec in SPECS.items():
        fn = getattr(fastrms.functional, name)
        assert "Parameters" in inspect.getdoc(fn)
        p = np.ones(3)
        state = {s: np.zeros(3) for s in spec.layout.slots}
        step = {"step": 1} if spec.counts_steps else {}
        init = [o.name for o in spec.options if o.kind == "init"]
        for option in init:  # state-only options belong to the classes
            with pytest.raises(TypeError, match=option):
                fn(p, np.ones(3), *state.values(), **step, **{option: 0.1})


def test_adamw_is_adam_with_other_defaults():
    adam, adamw = SPECS["adam"], SPECS["adamw"]
    assert adamw.layout is adam.layout and adamw.prepare is adam.prepare
    assert adamw.defaults == {**adam.defaults, "weight_decay": 1e-2, "decoupled_weight_decay": True}
    assert adamw.hyperparameters == adam.hyperparameters


# -- Lion ------------------------------------------------------------------------------------------


def _lion_formula(p, m, grads, lr, betas, weight_decay, maximize):
    """Chen et al. (2023), Algorithm 2, in float64 from scratch."""
    p, m = p.astype(np.float64), m.astype(np.float64)
    b1, b2 = betas
    for g in grads:
        g = -g.astype(np.float64) if maximize else g.astype(np.float64)
        update = np.sign(b1 * m + (1 - b1) * g)
        p = p * (1 - lr * weight_decay) - lr * update
        m = b2 * m + (1 - b2) * g
    return p, m


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize(("algo", "options"), [c for c in option_cases() if c.values[0] == "lion"])
def test_lion_matches_its_formula(algo, options, backend):
    rng = np.random.default_rng(7)
    for dtype in (np.float32, np.float64):
        p0 = randn(rng, 500, dtype)
        grads = [randn(rng, 500, dtype) for _ in range(10)]
        hyper = dict(lr=1e-2, betas=(0.9, 0.99), **options)
        opt = fastrms.Lion(p := p0.copy(), backend=backend, **hyper)
        for g in grads:
            opt.step(g)
        want_p, want_m = _lion_formula(p0, np.zeros_like(p0), grads, **{
            "weight_decay": 0.0, "maximize": False, **hyper
        })  # fmt: skip
        # Each step moves p by exactly lr*sign (+ decay): only rounding of the decay and of
        # m differ from float64, a few ulps of p's scale per step.
        tol = 64 * np.finfo(dtype).eps * np.max(np.abs(want_p))
        np.testing.assert_allclose(p, want_p, rtol=0, atol=tol)
        np.testing.assert_allclose(opt.state["exp_avg"][0], want_m, rtol=1e-5 if dtype ==
                                   np.float32 else 1e-12, atol=1e-6 if dtype == np.float32
                                   else 1e-14)  # fmt: skip


def test_lion_moves_every_element_by_lr():
    p = np.zeros(6, np.float32)
    fastrms.Lion(p, lr=0.5).step(np.array([1, -2, 3, 0, -1e-30, 1e30], np.float32))
    np.testing.assert_array_equal(p, [-0.5, 0.5, -0.5, 0.0, 0.5, -0.5])


def test_lion_is_in_the_test_tables():
    assert "lion" in ALGOS and ALGOS["lion"].cls is fastrms.Lion


@pytest.mark.parametrize(("algo", "options"), option_cases())
def test_stepper_gives_each_steps_setup(algo, options):
    """``Spec.stepper`` checks the options once, then gives what ``Spec.setup`` gives for
    every step (SGD's step 1 differs from the rest; Adam's and AdaGrad's scalars move)."""
    spec = SPECS[algo]
    options = {k: v for k, v in options.items() if k in spec.step_options}
    setup_at = spec.stepper(lr=ALGOS[algo].lr, **options)
    for step in (1, 2, 3, 10, 1000):
        assert setup_at(step) == spec.setup(step, lr=ALGOS[algo].lr, **options), step


def test_stepper_checks_the_options_at_once():
    with pytest.raises(ValueError, match="lr"):
        SPECS["adam"].stepper(lr=-1.0)
    with pytest.raises(TypeError, match="momentum"):
        SPECS["adam"].stepper(momentum=0.9)
