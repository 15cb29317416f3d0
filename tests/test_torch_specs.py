"""``fastrms.torch`` takes from :data:`fastrms.specs.SPECS` what the specs declare, and is split
into modules that import torch alone and import each other without a cycle.

The classes write only what is torch's (signatures, defaults, state names); these tests fail
if a class and its spec drift apart: a default, an option or a state array in one and not the
other.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

# torch is a test dependency: in CI a missing torch fails these tests instead of skipping them.
torch = importlib.import_module("torch") if os.environ.get("CI") else pytest.importorskip("torch")

import fastrms.torch as ft  # noqa: E402
from fastrms.specs import SPECS  # noqa: E402

#: Constructor arguments that are torch's alone (accepted and ignored, or refused when True).
TORCH_ONLY = {"params", "foreach", "fused", "capturable", "differentiable"}
#: Constructor arguments of how state (and bfloat16 parameters) are stored, not the spec's.
STORAGE = {"state_dtype", "rounding", "seed"}

PACKAGE = Path(ft.__file__).parent
TORCH_MODULES = sorted(p.stem for p in PACKAGE.glob("torch*.py"))


@pytest.mark.parametrize("name", ft.__all__)
def test_signature_is_the_specs_options_with_their_defaults(name):
    cls = getattr(ft, name)
    spec = SPECS[cls._spec_name]
    params = inspect.signature(cls).parameters
    for option in spec.options:
        if option.kind == "fixed" and option.name not in params:
            continue  # AdamW fixes decoupled_weight_decay
        assert option.name in params, (name, option.name)
        assert params[option.name].default == option.default, (name, option.name)
    assert set(params) - set(spec.defaults) <= TORCH_ONLY | STORAGE, name
    assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in STORAGE), name


@pytest.mark.parametrize("name", ft.__all__)
def test_step_options_and_step_counting_are_the_specs(name):
    cls = getattr(ft, name)
    spec = SPECS[cls._spec_name]
    assert cls._hyper_keys == spec.step_options
    assert cls._counts_steps is spec.counts_steps
    torch_names = [cls._torch_names.get(s, s) for s in spec.layout.slots]
    assert list(cls._slots) == torch_names
    assert [place for _, place in cls._slots.values()] == list(range(1, len(torch_names) + 1))


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("RMSprop", dict(centered=True, momentum=0.9)),
        ("Adam", dict(amsgrad=True)),
        ("Adagrad", {}),
        ("SGD", dict(momentum=0.9)),
        ("Lion", {}),
    ],
)
def test_new_state_lies_its_slots_place_in_kib_from_the_parameter(name, options):
    """A CPU state tensor starts ``place`` KiB after its parameter modulo 4 KiB (its place
    among its rule's state arrays, as fastrms's own classes place theirs): loads and stores of
    one loop never sit at the same offset modulo 4 KiB ("4K aliasing")."""
    p = torch.zeros(1 << 15, requires_grad=True)  # 128 KiB: large enough to be placed
    opt = getattr(ft, name)([p], lr=1e-3, **options)
    p.grad = torch.ones_like(p)
    opt.step()
    places = {n: place for n, (_, place) in type(opt)._slots.items()}
    held = [n for n in opt.state[p] if n != "step"]
    assert held and set(held) <= set(places)
    for n in held:
        offset = (opt.state[p][n].data_ptr() - p.data_ptr()) % 4096
        assert offset == 1024 * places[n], n


def test_initial_value_comes_from_the_option_the_spec_names():
    """Adagrad's ``sum`` starts at its group's ``initial_accumulator_value``
    (:attr:`fastrms.specs.Spec.initial`), which the spec's check refuses below 0."""
    assert SPECS["adagrad"].initial == {"state_sum": "initial_accumulator_value"}
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, 2, dtype=torch.complex64)
    opt = ft.Adagrad([{"params": [a]}, {"params": [b], "initial_accumulator_value": 0.25}])
    assert torch.equal(opt.state[a]["sum"], torch.zeros(3))
    assert torch.equal(opt.state[b]["sum"], torch.full((2, 2), 0.25 + 0.25j))
    with pytest.raises(ValueError, match="initial_accumulator_value"):
        opt.add_param_group({"params": [torch.zeros(1)], "initial_accumulator_value": -1.0})
    assert len(opt.param_groups) == 2


def _imports(module: str) -> set[str]:
    """The fastrms modules that ``module`` imports when it is imported (not those imported
    for type checking only)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.ImportFrom) and sub.level == 1:
                found |= {sub.module} if sub.module else {a.name for a in sub.names}
    return found


def test_torch_modules_import_each_other_without_a_cycle():
    graph = {m: _imports(m) & set(TORCH_MODULES) for m in TORCH_MODULES}
    done: set[str] = set()

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert m not in path, f"import cycle: {' -> '.join((*path, m))}"
        if m not in done:
            for n in graph[m]:
                visit(n, (*path, m))
            done.add(m)

    for m in TORCH_MODULES:
        visit(m, ())


def test_torch_modules_are_short():
    for m in TORCH_MODULES:
        lines = len((PACKAGE / f"{m}.py").read_text().splitlines())
        assert lines <= 500, (m, lines)


def test_import_fastrms_does_not_import_torch():
    code = (
        "import sys, fastrms, fastrms.functional, fastrms.grouped, fastrms.optim, "
        "fastrms.teams; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
