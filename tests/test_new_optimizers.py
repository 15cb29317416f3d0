"""The optimizers added through a spec alone (issue 17): Adamax, NAdam, RAdam and Adadelta.

Each is its rule (kernels/rules.py), its spec (fastrms/specs_*.py), its reference
(fastrms/reference.py), its docs and its tests; the frontends generate the rest. Here:

- ``fastrms.torch.<Name>`` matches ``torch.optim.<Name>`` over torch's own configurations
  (``optim_db``'s ``optim_inputs_func``), float32 and float64, 12 steps, two param groups
  (the second with half the learning rate) and a parameter without a gradient on some steps;
  every parameter and every state tensor, ``step`` included, after every step;
- checkpoints interchange with ``torch.optim`` both ways, and training goes on identically;
- ``fastrms.<Name>`` and ``fastrms.functional.<name>`` step alike. The NumPy classes are
  compared with the reference bit for bit by the tests parametrized over every spec
  (test_reference.py, test_grouped.py, test_properties.py, test_cuda.py under the
  simulator), bad options by test_validation.py's table, and ``fastrms.distributed`` by
  tests/mpi_worker.py's cases.

Tolerances: ``conftest.assert_close``, 16 ulps of the larger of an element and the array's
largest magnitude (rtol 1.9e-6 in float32). torch evaluates a few expressions in another
order (``lerp`` for the running means, the scalar folded into ``addcdiv``/``addcmul``), an ulp
or two per step that the running averages forget; see conftest.ULPS.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os

import numpy as np
import pytest
from conftest import assert_close, assert_same_bits, randn

import fastrms
from fastrms import functional
from fastrms.specs import SPECS

torch = importlib.import_module("torch") if os.environ.get("CI") else pytest.importorskip("torch")

from torch.testing._internal.common_optimizers import optim_db  # noqa: E402

import fastrms.torch as ft  # noqa: E402

#: The new optimizers: spec name -> torch's class name.
NEW = {"adamax": "Adamax", "adadelta": "Adadelta", "radam": "RAdam", "nadam": "NAdam"}
STEPS = 12
SHAPES = ((5, 4), (7,), (3, 2))
#: Steps on which the second parameter has no gradient (None): it skips them, and its step
#: count falls behind the others'.
NO_GRAD = (1, 6)
DTYPES = (torch.float32, torch.float64)


@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread():
    """torch on one thread: its thread team costs more than these small steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _torch_configs() -> list:
    """Every configuration torch tests each optimizer with. The CUDA list has them all (the
    CPU list leaves out the capturable ones); those fastrms refuses are skipped, saying why."""
    cases = []
    for name, torch_name in NEW.items():
        info = next(i for i in optim_db if i.optim_cls.__name__ == torch_name)
        for case in info.optim_inputs_func(device="cuda", dtype=torch.float32):
            kwargs = dict(case.kwargs)
            marks = ()
            if kwargs.get("capturable") or kwargs.get("differentiable"):
                reason = "capturable/differentiable=True (CUDA graphs, autograd through the "
                reason += "step) are refused by fastrms.torch: test_refuses_torch_only_flags"
                marks = pytest.mark.skip(reason=reason)
            elif torch.is_tensor(kwargs.get("lr")):
                kwargs["lr"] = kwargs["lr"].clone()  # a CPU tensor lr is taken by value
            ident = f"{name}-{case.desc.replace(' ', '_').replace(',', '')}"
            cases.append(pytest.param(name, kwargs, id=ident, marks=marks))
    return cases


def _params(dtype, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, dtype=dtype, generator=gen) for s in SHAPES]


def _grads(dtype, steps: int, seed: int = 1) -> list[list]:
    gen = torch.Generator().manual_seed(seed)
    return [
        [None if (t in NO_GRAD and i == 1) else torch.randn(s, dtype=dtype, generator=gen)
         for i, s in enumerate(SHAPES)]
        for t in range(1, steps + 1)
    ]  # fmt: skip


def _step(opt, params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    opt.step()


def _assert_same_state(ours, theirs, ps, qs, when: str) -> None:
    """Parameters and every state tensor close; ``step`` and 0-d scalar state exactly."""
    for i, (p, q) in enumerate(zip(ps, qs)):
        assert_close(p.detach().numpy(), q.detach().numpy(), f"param {i}, {when}")
        mine, want = ours.state.get(p, {}), theirs.state.get(q, {})
        assert mine.keys() == want.keys(), (i, when, mine.keys(), want.keys())
        for k, t in want.items():
            a, b = mine[k].numpy(), t.numpy()
            if t.dim() == 0:  # step, NAdam's mu_product: the same float32 values
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (i, k, a, b, when)
            else:
                assert_close(a, b, f"{k} of param {i}, {when}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "kwargs"), _torch_configs())
def test_matches_torch_optim(name, kwargs, dtype):
    torch_cls, our_cls = getattr(torch.optim, NEW[name]), getattr(ft, NEW[name])
    lr = kwargs.get("lr", inspect.signature(torch_cls).parameters["lr"].default)
    ps, qs = _params(dtype), _params(dtype)
    half = {"lr": float(lr) / 2}  # the second group's
    ours = our_cls([{"params": ps[:2]}, {"params": ps[2:], **half}], **kwargs)
    theirs = torch_cls([{"params": qs[:2]}, {"params": qs[2:], **half}], **kwargs)
    for t, grads in enumerate(_grads(dtype, STEPS), 1):
        _step(ours, ps, grads)
        _step(theirs, qs, grads)
        _assert_same_state(ours, theirs, ps, qs, f"step {t}")
    # Not a vacuous comparison: the parameters moved by far more than the tolerance (Adadelta
    # with lr=0.01 moves the least, about 3e-4).
    moved = max(float((p - q0).abs().max()) for p, q0 in zip(ps, _params(dtype)))
    assert moved > 100 * torch.finfo(dtype).eps * max(float(p.abs().max()) for p in qs)


#: Options with every feature of each optimizer on, for the checkpoint tests.
CHECKPOINT_OPTIONS = {
    "adamax": dict(lr=0.05, weight_decay=0.1, maximize=True),
    "adadelta": dict(lr=0.5, rho=0.8, weight_decay=0.1, maximize=True),
    "radam": dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
    "nadam": dict(
        lr=0.01, weight_decay=0.1, momentum_decay=0.006, decoupled_weight_decay=True, maximize=True
    ),
}


@pytest.mark.parametrize("direction", ["torch-to-fastrms", "fastrms-to-torch"])
@pytest.mark.parametrize("name", NEW)
def test_checkpoints_interchange_with_torch_optim(name, direction):
    """Train 4 steps with one, load its state_dict into the other, train on with both: the
    same state dict keys, and the same steps after the load as before."""
    torch_cls, our_cls = getattr(torch.optim, NEW[name]), getattr(ft, NEW[name])
    first, second = (
        (torch_cls, our_cls) if direction == "torch-to-fastrms" else (our_cls, torch_cls)
    )
    options = CHECKPOINT_OPTIONS[name]
    grads = _grads(torch.float32, 8)
    ps, qs = _params(torch.float32), _params(torch.float32)
    a = first([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02}], **options)
    twin = second([{"params": qs[:2]}, {"params": qs[2:], "lr": 0.02}], **options)
    for g in grads[:4]:
        _step(a, ps, g)
    sd = copy.deepcopy(a.state_dict())  # as saved: loading shares the tensors otherwise
    with torch.no_grad():
        for p, q in zip(ps, qs):
            q.copy_(p)
    twin.load_state_dict(sd)
    assert twin.state_dict()["state"].keys() == sd["state"].keys()
    for i in sd["state"]:
        assert twin.state_dict()["state"][i].keys() == sd["state"][i].keys()
    assert twin.state_dict()["param_groups"] == sd["param_groups"]
    for t, g in enumerate(grads[4:], 5):
        _step(a, ps, g)
        _step(twin, qs, g)
        ours, theirs = (twin, a) if direction == "torch-to-fastrms" else (a, twin)
        mine, want = (qs, ps) if direction == "torch-to-fastrms" else (ps, qs)
        _assert_same_state(ours, theirs, mine, want, f"step {t}")


@pytest.mark.parametrize("flag", ["capturable", "differentiable"])
@pytest.mark.parametrize("name", NEW)
def test_refuses_torch_only_flags(name, flag):
    with pytest.raises(ValueError, match=f"{flag}=True is not supported"):
        getattr(ft, NEW[name])([torch.zeros(3)], **{flag: True})


@pytest.mark.parametrize("name", NEW)
def test_signature_and_defaults_are_torchs(name):
    theirs = inspect.signature(getattr(torch.optim, NEW[name])).parameters
    ours = inspect.signature(getattr(ft, NEW[name])).parameters
    storage = ["state_dtype", "rounding", "seed"]  # fastrms's own, keyword-only, at the end
    assert list(ours) == [*theirs, *storage]
    for k in storage:
        assert ours[k].kind is inspect.Parameter.KEYWORD_ONLY and ours[k].default is None, k
    for k, p in theirs.items():
        assert ours[k].kind == p.kind, k
        assert ours[k].default == p.default, k
    opt = getattr(ft, NEW[name])([torch.zeros(2)])
    assert opt.defaults == getattr(torch.optim, NEW[name])([torch.zeros(2)]).defaults


@pytest.mark.parametrize("name", NEW)
def test_every_frontend_has_it(name):
    spec = SPECS[name]
    cls = getattr(fastrms, spec.title)
    assert cls.spec is spec and spec.title in fastrms.__all__
    assert name in functional.__all__ and NEW[name] in ft.__all__
    for obj in (cls, getattr(functional, name), getattr(ft, NEW[name])):
        doc = inspect.getdoc(obj)
        assert "::" in doc and "Parameters\n----------" in doc, obj


@pytest.mark.parametrize("name", NEW)
def test_numpy_class_and_functional_step_alike(name):
    """The class (grouped plan) and the functional form (one array) agree to the bit."""
    spec = SPECS[name]
    rng = np.random.default_rng(4)
    p0 = randn(rng, 33, np.float32)
    grads = [randn(rng, 33, np.float32) for _ in range(8)]  # RAdam rectifies from step 6
    opt = getattr(fastrms, spec.title)([p := p0.copy()], lr=0.01, backend="cpu")
    q = p0.copy()
    state = {s: np.zeros_like(q) for s in spec.layout.slots}
    for t, g in enumerate(grads, 1):
        opt.step([g])
        step = {"step": t} if spec.counts_steps else {}
        getattr(functional, name)(q, g, **state, **step, lr=0.01, backend="cpu")
    np.testing.assert_array_equal(p, q)
    for s, arrays in opt.state.items():
        np.testing.assert_array_equal(arrays[0], state[s])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", NEW)
def test_kernels_equal_the_reference_over_many_steps(name, dtype):
    """8 steps (the grid tests take 3; RAdam rectifies from step 6), every feature on, in
    the serial and the parallel loop: cpu and numpy backends equal bit for bit."""
    spec = SPECS[name]
    options = {**CHECKPOINT_OPTIONS[name], "lr": 10 * spec.defaults["lr"]}
    rng = np.random.default_rng(6)
    for n in (100, 200_000):
        p0 = randn(rng, n, dtype)
        grads = [randn(rng, n, dtype) for _ in range(8)]
        opts = [getattr(fastrms, spec.title)(p0.copy(), backend=b, **options)
                for b in ("cpu", "numpy")]  # fmt: skip
        for g in grads:
            for opt in opts:
                opt.step(g)
        assert_same_bits(opts[0]._params[0], opts[1]._params[0], f"{name} n={n}")
        for s in opts[1].state:
            assert_same_bits(opts[0].state[s][0], opts[1].state[s][0], f"{s} n={n}")
