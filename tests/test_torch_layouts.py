"""``fastrms.torch`` steps every parameter ``torch.optim`` steps: any memory order
(channels_last, channels_last_3d, transposed), strided views (stride 2, slices), complex
tensors, and under ``torch.compile``.

Against torch.optim (its for-loop implementation) after every step, to ``conftest.ULPS`` ulps:
parameters and every state tensor, whose strides must be torch's too (``preserve_format``).
And, bit for bit: a parameter in any layout is stepped exactly as a contiguous copy of it.
"""

from __future__ import annotations

import copy
import importlib
import io
import os

import pytest

# torch is a test dependency: in CI a missing torch fails these tests instead of skipping them.
torch = importlib.import_module("torch") if os.environ.get("CI") else pytest.importorskip("torch")

from conftest import assert_close  # noqa: E402
from torch.testing._internal.common_optimizers import optim_db  # noqa: E402

import fastrms.torch as ft  # noqa: E402
from fastrms.torch_layout import CONTIGUOUS, DENSE, STRIDED, layout_of  # noqa: E402

NAMES = ("RMSprop", "Adagrad", "Adam", "AdamW", "SGD", "Adamax", "NAdam", "RAdam", "Adadelta")
#: Options under which each optimizer keeps every state tensor it has.
FULL = {
    "RMSprop": dict(centered=True, momentum=0.9, weight_decay=0.1),
    "Adagrad": dict(lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1),
    "Adam": dict(amsgrad=True, weight_decay=0.1),
    "AdamW": dict(amsgrad=True),
    "SGD": dict(momentum=0.9, dampening=0.5, weight_decay=0.1),
    "Adamax": dict(weight_decay=0.1),
    "NAdam": dict(weight_decay=0.1, momentum_decay=0.006),
    "RAdam": dict(weight_decay=0.1, decoupled_weight_decay=True),
    "Adadelta": dict(rho=0.8, weight_decay=0.1),
}
LR = {"RMSprop": 1e-2, "Adagrad": 1e-1, "Adam": 1e-2, "AdamW": 1e-2, "SGD": 5e-2,
      "Adamax": 1e-2, "NAdam": 1e-2, "RAdam": 1e-2, "Adadelta": 1.0}  # fmt: skip
STEPS = 6


@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _numpy(t: torch.Tensor):
    t = t.detach()
    return (torch.view_as_real(t) if t.is_complex() else t).numpy()


def assert_matches(ours_opt, ours, theirs_opt, theirs, when: str) -> None:
    """Parameters and every state tensor close to torch's, the state in torch's strides."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.stride() == b.stride(), (i, when)
        assert_close(_numpy(a), _numpy(b), f"param {i}, {when}")
        sa, sb = ours_opt.state.get(a, {}), theirs_opt.state.get(b, {})
        assert sa.keys() == sb.keys(), (i, when)
        for k, v in sb.items():
            if k == "step" or v.dim() == 0:  # and NAdam's mu_product: the same float32
                assert sa[k].dtype == v.dtype and sa[k].item() == v.item(), (i, k, when)
                continue
            # preserve_format: the parameter's strides if it is dense, else contiguous (torch's
            # momentum_buffer is a clone of the first gradient, in the gradient's strides)
            like = torch.empty_like(a, memory_format=torch.preserve_format).stride()
            assert sa[k].dtype == v.dtype and sa[k].stride() == like, (i, k, when)
            assert k == "momentum_buffer" or v.stride() == like, (i, k, when)
            assert_close(_numpy(sa[k]), _numpy(v), f"state {k} of param {i}, {when}")


def _grads(params, gen, layout: str = "same") -> list[torch.Tensor]:
    """Random gradients in the parameters' own strides, or contiguous ("contiguous")."""
    grads = []
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if layout == "same" and layout_of(p) != STRIDED:
            g = torch.empty_like(p, memory_format=torch.preserve_format).copy_(g)
        grads.append(g)
    return grads


def _step_both(pairs, grads) -> None:
    for params, opt in pairs:
        for p, g in zip(params, grads):
            p.grad = g.clone(memory_format=torch.preserve_format)
        opt.step()


# -- parameters in odd layouts, against torch.optim ------------------------------------------------


def odd_params(dtype=torch.float32, seed=0) -> list[torch.Tensor]:
    """A transposed weight, a stride-2 view, a slice of rows and columns, a channels_last and a
    channels_last_3d weight, a plain vector: leaf tensors in every layout torch steps."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=dtype)

    params = [
        randn(5, 7).t(),
        randn(10, 5, 2)[..., 0],
        randn(9, 12)[1:7, 2:11],
        randn(4, 3, 3, 3).to(memory_format=torch.channels_last),
        randn(2, 3, 2, 2, 3).to(memory_format=torch.channels_last_3d),
        randn(6),
    ]
    return [torch.nn.Parameter(p) for p in params]


def test_odd_params_have_the_layouts_meant():
    kinds = [layout_of(p) for p in odd_params()]
    assert kinds == [DENSE, STRIDED, STRIDED, DENSE, DENSE, CONTIGUOUS]
    assert odd_params()[3].is_contiguous(memory_format=torch.channels_last)


def _clone(params, device: str = "cpu") -> list[torch.Tensor]:
    """Equal copies in the same layouts (strided views stay views of a new base)."""
    out = []
    for p in params:
        if layout_of(p) == STRIDED:
            size = p.untyped_storage().nbytes() // p.element_size()
            base = torch.zeros(size, dtype=p.dtype, device=device)
            q = base.as_strided(p.shape, p.stride(), p.storage_offset())
            q.copy_(p.detach())
        else:
            q = p.detach().to(device).clone(memory_format=torch.preserve_format)
        assert q.stride() == p.stride()
        out.append(torch.nn.Parameter(q))
    return out


@pytest.mark.parametrize("grad_layout", ["same", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64], ids=["float32", "complex64"])
@pytest.mark.parametrize("name", NAMES)
def test_odd_layouts_match_torch(name, dtype, grad_layout):
    """Every layout, in two param groups, gradients in the parameters' order or contiguous:
    torch.optim's results, state in torch's strides; a strided view's base outside the view
    is untouched."""
    ours = odd_params(dtype)
    theirs = _clone(ours)
    outside = ours[1]._base if ours[1]._base is not None else None

    def build(cls, params, **kind):
        groups = [{"params": params[:3]}, {"params": params[3:], "lr": LR[name] / 2}]
        return cls(groups, lr=LR[name], **FULL[name], **kind)

    opts = build(getattr(ft, name), ours), build(getattr(torch.optim, name), theirs, foreach=False)
    base = ours[1].untyped_storage()
    before = torch.tensor([], dtype=dtype).set_(base).clone()
    gen = torch.Generator().manual_seed(1)
    for t in range(STEPS):
        _step_both([(ours, opts[0]), (theirs, opts[1])], _grads(ours, gen, grad_layout))
        assert_matches(opts[0], ours, opts[1], theirs, f"step {t}")
    after = torch.tensor([], dtype=dtype).set_(base)
    view = torch.zeros_like(after, dtype=torch.bool)
    view.as_strided(ours[1].shape, ours[1].stride(), ours[1].storage_offset()).fill_(True)
    assert torch.equal(after[~view], before[~view])  # only the view's elements moved
    assert not torch.equal(after[view], before[view])
    del outside


@pytest.mark.parametrize("name", [*NAMES, "Lion"])
def test_any_layout_steps_as_its_contiguous_copy_bit_for_bit(name):
    """The layout changes only where the elements lie: each parameter ends bit for bit as a
    contiguous copy stepped with the same gradients (on the full and the short route)."""
    options = FULL.get(name, dict(weight_decay=0.1))
    odd = odd_params(torch.float64)
    plain = [
        torch.nn.Parameter(p.detach().clone(memory_format=torch.contiguous_format)) for p in odd
    ]
    opts = [getattr(ft, name)(ps, lr=0.01, **options) for ps in (odd, plain)]
    gen = torch.Generator().manual_seed(2)
    for t in range(STEPS):
        grads = _grads(odd, gen)
        for ps, opt in zip((odd, plain), opts):
            for p, g in zip(ps, grads):
                p.grad = g if ps is odd else g.contiguous()
            opt.step()
        for a, b in zip(odd, plain):
            assert torch.equal(a.detach(), b.detach()), t
            for k, v in opts[1].state[b].items():
                assert torch.equal(opts[0].state[a][k], v), (t, k)
    assert opts[0]._last is not None  # the last steps took the short route


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", [*NAMES, "Lion"])
def test_cuda_odd_layouts_match_the_cpu(name):
    """On CUDA the same layouts (flat views, gathered buffers, real views through
    ``__cuda_array_interface__``) give the CPU's results, on the full and the short route."""
    options = FULL.get(name, dict(weight_decay=0.1))
    cpu = odd_params(torch.float32) + odd_params(torch.complex64, seed=1)[:4]
    gpu = _clone(cpu, "cuda")
    opts = [getattr(ft, name)(ps, lr=0.01, **options) for ps in (cpu, gpu)]
    gen = torch.Generator().manual_seed(12)
    for t in range(STEPS):
        grads = _grads(cpu, gen)
        for ps, opt in zip((cpu, gpu), opts):
            for p, g in zip(ps, grads):
                p.grad = g.to(p.device).clone(memory_format=torch.preserve_format)
            opt.step()
        for i, (a, b) in enumerate(zip(cpu, gpu)):
            assert a.stride() == b.stride()
            assert_close(_numpy(b.cpu()), _numpy(a), f"param {i}, step {t}")
            for k, v in opts[0].state[a].items():
                assert_close(_numpy(opts[1].state[b][k].cpu()), _numpy(v), f"{k} {i}, {t}")


def test_channels_last_cnn_matches_torch():
    """A CNN in channels_last, trained on channels_last inputs, every optimizer."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.Conv2d(6, 4, 3, stride=2),
        torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 5),
    ).to(memory_format=torch.channels_last)  # fmt: skip
    assert not model[0].weight.is_contiguous()
    inputs = [
        torch.randn(8, 3, 10, 10, generator=gen).to(memory_format=torch.channels_last)
        for _ in range(STEPS)
    ]
    for name in NAMES:
        models = [copy.deepcopy(model) for _ in range(2)]
        opts = [
            getattr(ft, name)(models[0].parameters(), lr=LR[name], **FULL[name]),
            getattr(torch.optim, name)(
                models[1].parameters(), lr=LR[name], **FULL[name], foreach=False
            ),
        ]
        for t, x in enumerate(inputs):
            for m, opt in zip(models, opts):
                opt.zero_grad()
                m(x).square().mean().backward()
                opt.step()
            ours, theirs = (list(m.parameters()) for m in models)
            assert ours[0].grad.stride() == ours[0].stride()  # autograd keeps the layout
            assert_matches(opts[0], ours, opts[1], theirs, f"{name} step {t}")


class _ViewsModule(torch.nn.Module):
    """A module whose parameters are a transposed weight and a stride-2 view (the shapes of
    torch's own optimizer tests), trained through autograd (whose gradients take the
    parameters' layouts where it can)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(5, 10, generator=gen).t())
        self.scale = torch.nn.Parameter(torch.randn(10, 5, 2, generator=gen)[..., 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.weight) * self.scale.sum(0)


def test_module_with_transposed_and_strided_parameters_matches_torch():
    assert layout_of(_ViewsModule(0).weight) == DENSE
    assert layout_of(_ViewsModule(0).scale) == STRIDED
    gen = torch.Generator().manual_seed(13)
    xs = [torch.randn(4, 10, generator=gen) for _ in range(STEPS)]
    for name in NAMES:
        models = [_ViewsModule(14), _ViewsModule(14)]
        opts = [
            getattr(ft, name)(models[0].parameters(), lr=LR[name], **FULL[name]),
            getattr(torch.optim, name)(
                models[1].parameters(), lr=LR[name], **FULL[name], foreach=False
            ),
        ]
        for t, x in enumerate(xs):
            for m, opt in zip(models, opts):
                opt.zero_grad()
                m(x).square().mean().backward()
                opt.step()
            ours, theirs = (list(m.parameters()) for m in models)
            assert_matches(opts[0], ours, opts[1], theirs, f"{name} step {t}")


def test_complex_checkpoints_match_torchs():
    """Complex state stays complex, as torch's: a checkpoint loads either way and both go on
    identically."""
    for name in NAMES:
        ours = odd_params(torch.complex64, seed=4)
        theirs = _clone(ours)
        a = getattr(ft, name)(ours, lr=LR[name], **FULL[name])
        b = getattr(torch.optim, name)(theirs, lr=LR[name], **FULL[name], foreach=False)
        gen = torch.Generator().manual_seed(5)
        for _ in range(3):
            _step_both([(ours, a), (theirs, b)], _grads(ours, gen))
        buf = io.BytesIO()
        torch.save(a.state_dict(), buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
        for st in sd["state"].values():
            # (0-d: step, NAdam's mu_product, real in torch too)
            assert all(v.is_complex() for v in st.values() if v.dim() > 0), name
        ours2, theirs2 = _clone(ours), _clone(theirs)
        a2 = getattr(ft, name)(ours2, lr=1.0)
        b2 = getattr(torch.optim, name)(theirs2, lr=1.0, foreach=False)
        a2.load_state_dict(b.state_dict())
        b2.load_state_dict(sd)
        for _ in range(3):
            _step_both([(ours2, a2), (theirs2, b2)], _grads(ours2, gen))
            assert_matches(a2, ours2, b2, theirs2, name)


def test_state_loaded_in_another_order_is_laid_out_as_the_parameter():
    """A checkpoint whose state is contiguous, for a channels_last parameter: the state is
    copied into the parameter's order once, and the results stay torch's."""
    p = torch.nn.Parameter(torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last))
    q = torch.nn.Parameter(p.detach().clone(memory_format=torch.preserve_format))
    a, b = ft.Adam([p], lr=0.1), torch.optim.Adam([q], lr=0.1, foreach=False)
    gen = torch.Generator().manual_seed(6)
    _step_both([([p], a), ([q], b)], _grads([p], gen))
    sd = a.state_dict()
    sd["state"][0] = {k: v.contiguous() for k, v in sd["state"][0].items()}
    a.load_state_dict(sd)
    assert a.state[p]["exp_avg"].is_contiguous()
    _step_both([([p], a), ([q], b)], _grads([p], gen))
    assert a.state[p]["exp_avg"].stride() == p.stride()
    assert_matches(a, [p], b, [q], "after loading")


# -- torch.compile -------------------------------------------------------------------------------


def _small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


@pytest.mark.parametrize("name", NAMES)
def test_compiled_step_and_compiled_training_step_match_torch(name):
    """``torch.compile(opt.step)`` and a compiled training step that calls ``opt.step()``
    (default backend, CPU) give torch.optim's eager results; so does a model under
    torch.compile with an eager step."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(4, 6, generator=gen) for _ in range(5)]
    models = [_small_model(8) for _ in range(4)]
    opts = [getattr(ft, name)(m.parameters(), lr=LR[name], **FULL[name]) for m in models[:3]]
    ref = getattr(torch.optim, name)(models[3].parameters(), lr=LR[name], **FULL[name],
                                     foreach=False)  # fmt: skip
    compiled_step = torch.compile(opts[0].step)
    compiled_model = torch.compile(models[2])

    @torch.compile
    def train_step(x):
        opts[1].zero_grad()
        models[1](x).square().mean().backward()
        opts[1].step()

    for t, x in enumerate(xs):
        for m, opt in ((models[0], opts[0]), (models[3], ref)):
            opt.zero_grad()
            m(x).square().mean().backward()
        compiled_step()
        ref.step()
        train_step(x)
        opts[2].zero_grad()
        compiled_model(x).square().mean().backward()
        opts[2].step()
        theirs = list(models[3].parameters())
        for i, (m, opt) in enumerate(zip(models[:3], opts)):
            assert_matches(opt, list(m.parameters()), ref, theirs, f"variant {i}, step {t}")


# -- torch's own optimizer test inputs (torch.testing._internal.common_optimizers) -------------


def _optim_db_cases():
    cases = []
    for info in optim_db:
        name = info.optim_cls.__name__
        if name not in NAMES:
            continue
        for sample in info.optim_inputs_func(device="cpu", dtype=torch.float32):
            kwargs = sample.kwargs
            if kwargs.get("capturable") or kwargs.get("differentiable"):
                continue  # refused by fastrms (test_torch_optim: unsupported options)
            cases.append(pytest.param(info, sample, id=f"{name}-{sample.desc}"))
    return cases


@pytest.mark.parametrize(("info", "sample"), _optim_db_cases())
def test_torchs_optim_db_inputs_match_torch(info, sample):
    """Each of torch's CPU sample inputs for these optimizers, on contiguous, transposed,
    strided and (where torch supports it) complex parameters, for 5 steps."""
    name = info.optim_cls.__name__
    kwargs = {k: v for k, v in sample.kwargs.items() if k not in ("foreach", "fused")}
    make = [lambda: torch.randn(3, 4), lambda: torch.randn(4, 3).t(),
            lambda: torch.randn(6, 4)[::2], lambda: torch.randn(2, 3, 2)[..., 1]]  # fmt: skip
    if info.supports_complex:
        make.append(lambda: torch.randn(3, 2, dtype=torch.complex64))
        make.append(lambda: torch.randn(4, 3, dtype=torch.complex64).t())
    torch.manual_seed(9)
    ours = [torch.nn.Parameter(m()) for m in make]
    theirs = _clone(ours)
    a = getattr(ft, name)(ours, **copy.deepcopy(kwargs))
    b = info.optim_cls(theirs, **copy.deepcopy(kwargs), foreach=False)
    gen = torch.Generator().manual_seed(10)
    for t in range(5):
        _step_both([(ours, a), (theirs, b)], _grads(ours, gen))
        assert_matches(a, ours, b, theirs, f"{sample.desc}, step {t}")
