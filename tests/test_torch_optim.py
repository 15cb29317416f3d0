"""``fastrms.torch``: the ``torch.optim`` drop-ins match torch, interoperate with its tools, and
refuse what the kernels cannot do before writing anything.

Parity runs every option torch's own tests use for these optimizers (weight decay, maximize,
momentum, centered, amsgrad, nesterov, dampening, lr_decay, initial accumulator, tensor lr) on
three parameters of different shapes in two param groups, float32 and float64, for STEPS
steps, against torch's for-loop implementation; parameters and every state tensor (``step``
included) are compared after every step, to ``conftest.ULPS`` ulps (see there).
"""

from __future__ import annotations

import importlib
import io
import itertools
import os
import socket
import sys

import numpy as np
import pytest

# torch is a test dependency: in CI a missing torch fails these tests instead of skipping them.
torch = importlib.import_module("torch") if os.environ.get("CI") else pytest.importorskip("torch")

from conftest import assert_close  # noqa: E402

import fastrms  # noqa: E402
import fastrms.torch as ft  # noqa: E402

STEPS = 12
SHAPES = ((5, 4), (7,), (3, 2, 2))
DTYPES = (torch.float32, torch.float64)
DTYPE_IDS = ("float32", "float64")
NAMES = ("RMSprop", "Adagrad", "Adam", "AdamW", "SGD")
LR = {"RMSprop": 1e-2, "Adagrad": 1e-1, "Adam": 1e-2, "AdamW": 1e-2, "SGD": 5e-2}


@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread():
    """torch on one thread: its thread team costs milliseconds per step on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _grid(**axes) -> list[dict]:
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


_FLAG = (False, True)
_SGD_KINDS = (
    {},
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.5),
    dict(momentum=0.9, nesterov=True),
)
#: torch's own test options for each optimizer (torch/testing/_internal/common_optimizers.py),
#: every combination. ``tensor_lr`` passes lr as a 0-d tensor.
GRIDS = {
    "RMSprop": _grid(
        centered=_FLAG, momentum=(0, 0.9), weight_decay=(0, 0.1), maximize=_FLAG, tensor_lr=_FLAG
    ),
    "Adagrad": _grid(
        lr_decay=(0, 0.01), weight_decay=(0, 0.1), initial_accumulator_value=(0, 0.1),
        maximize=_FLAG, tensor_lr=_FLAG,
    ),
    "Adam": _grid(amsgrad=_FLAG, weight_decay=(0, 0.1), maximize=_FLAG, tensor_lr=_FLAG),
    "AdamW": _grid(amsgrad=_FLAG, weight_decay=(0, 0.1), maximize=_FLAG, tensor_lr=_FLAG),
    "SGD": [
        {**k, **o} for k in _SGD_KINDS for o in _grid(weight_decay=(0, 0.1), maximize=_FLAG,
                                                        tensor_lr=_FLAG)
    ],
}  # fmt: skip
#: Options under which each optimizer keeps every state tensor it has.
FULL = {
    "RMSprop": dict(centered=True, momentum=0.9, weight_decay=0.1),
    "Adagrad": dict(lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1),
    "Adam": dict(amsgrad=True, weight_decay=0.1),
    "AdamW": dict(amsgrad=True),
    "SGD": dict(momentum=0.9, dampening=0.5, weight_decay=0.1),
}


def _id(options: dict) -> str:
    parts = [k if v is True else f"{k}={v:g}" for k, v in options.items() if v not in (0, False)]
    return "-".join(parts) or "plain"


def _cases():
    return [
        pytest.param(name, options, id=f"{name}-{_id(options)}")
        for name, grid in GRIDS.items()
        for options in grid
    ]


def make_params(dtype, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in SHAPES]


def clone(params) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def grads_for(params, gen) -> list[torch.Tensor]:
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def pair(name: str, dtype, options: dict, seed=0):
    """fastrms.torch.X and torch.optim.X on equal copies of the same parameters, in two param
    groups (the second with its own lr)."""
    options = dict(options)
    tensor_lr = options.pop("tensor_lr", False)
    lr = LR[name]

    def build(cls, params, **kind):
        lr0 = torch.tensor(lr, dtype=torch.float64) if tensor_lr else lr
        groups = [{"params": params[:2]}, {"params": params[2:], "lr": lr / 2}]
        return cls(groups, lr=lr0, **options, **kind)

    ours = make_params(dtype, seed)
    theirs = clone(ours)
    return (
        ours,
        build(getattr(ft, name), ours),
        theirs,
        build(getattr(torch.optim, name), theirs, foreach=False),
    )


def assert_state_matches(ours_opt, ours, theirs_opt, theirs, when: str) -> None:
    """Every parameter and every state tensor close to torch's; the same state keys."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a.detach().numpy(), b.detach().numpy(), f"param {i}, {when}")
        sa, sb = ours_opt.state.get(a, {}), theirs_opt.state.get(b, {})
        assert sa.keys() == sb.keys(), (i, when)
        for k in sb:
            if k == "step":
                assert sa[k].dtype == sb[k].dtype and sa[k].item() == sb[k].item(), (i, when)
            else:
                assert_close(sa[k].numpy(), sb[k].numpy(), f"state {k} of param {i}, {when}")


def step_both(ours, opt_a, theirs, opt_b, grads, skip=()) -> None:
    for i, (a, b, g) in enumerate(zip(ours, theirs, grads)):
        a.grad = None if i in skip else g.clone()
        b.grad = None if i in skip else g.clone()
    opt_a.step()
    opt_b.step()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("name", "options"), _cases())
def test_matches_torch(name, options, dtype):
    ours, opt_a, theirs, opt_b = pair(name, dtype, options)
    start = [p.detach().clone() for p in ours]
    gen = torch.Generator().manual_seed(1)
    for t in range(1, STEPS + 1):
        # parameter 1 has no gradient on steps 4 and 5: skipped, its step count lags
        step_both(
            ours, opt_a, theirs, opt_b, grads_for(ours, gen), skip=(1,) if t in (4, 5) else ()
        )
        assert_state_matches(opt_a, ours, opt_b, theirs, f"step {t}")
    for p, p0 in zip(ours, start):
        assert (p.detach() - p0).abs().max() > LR[name] / 2  # moved by more than a plain step


# -- checkpoints ---------------------------------------------------------------------------------


def _roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("direction", ["torch-to-fastrms", "fastrms-to-torch"])
@pytest.mark.parametrize("name", NAMES)
def test_checkpoints_interchange_with_torch(name, direction):
    """A state_dict saved by one loads into the other, and both then go on identically."""
    dtype = torch.float32
    src_cls, dst_cls = getattr(torch.optim, name), getattr(ft, name)
    if direction == "fastrms-to-torch":
        src_cls, dst_cls = dst_cls, src_cls
    gen = torch.Generator().manual_seed(2)
    src_params = make_params(dtype)
    src = src_cls(src_params, lr=LR[name], **FULL[name])
    for _ in range(4):
        for p, g in zip(src_params, grads_for(src_params, gen)):
            p.grad = g
        src.step()
    sd = _roundtrip(src.state_dict())
    dst_params = clone(src_params)
    dst = dst_cls(dst_params, lr=1.0)  # the loaded groups bring their hyperparameters
    dst.load_state_dict(sd)
    assert dst.param_groups[0]["lr"] == LR[name]
    assert dst.state_dict()["state"].keys() == sd["state"].keys()
    for i in sd["state"]:
        assert dst.state_dict()["state"][i].keys() == sd["state"][i].keys()
    for t in range(4):
        grads = grads_for(src_params, gen)
        step_both(src_params, src, dst_params, dst, grads)
        assert_state_matches(src, src_params, dst, dst_params, f"step {t} after loading")


def test_state_dict_has_torchs_format():
    ours, opt_a, theirs, opt_b = pair("Adam", torch.float32, dict(amsgrad=True))
    step_both(ours, opt_a, theirs, opt_b, grads_for(ours, torch.Generator().manual_seed(0)))
    a, b = opt_a.state_dict(), opt_b.state_dict()
    assert a.keys() == b.keys() == {"state", "param_groups"}
    assert a["state"].keys() == b["state"].keys() == {0, 1, 2}
    assert a["state"][0]["step"].dtype == torch.float32 and a["state"][0]["step"].ndim == 0
    for ga, gb in zip(a["param_groups"], b["param_groups"]):
        assert ga.keys() == gb.keys()
        assert ga["params"] == gb["params"]


def test_loaded_state_of_wrong_shape_is_refused():
    params = make_params(torch.float32)
    opt = ft.Adam(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = torch.zeros(3)
    opt.load_state_dict(sd)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"exp_avg.*param_groups\[0\]\['params'\]\[0\]"):
        opt.step()
    for p, p0 in zip(params, before):
        assert torch.equal(p.detach(), p0)


# -- torch's tools -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheduler",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=STEPS),
    ],
    ids=["StepLR", "OneCycleLR"],
)
@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
def test_schedulers_act_as_on_torch(name, scheduler):
    """OneCycleLR also cycles Adam's beta1 and SGD's/RMSprop's momentum."""
    options = {"SGD": dict(momentum=0.9), "RMSprop": dict(momentum=0.5), "Adam": {}}[name]
    ours, opt_a, theirs, opt_b = pair(name, torch.float64, options)
    sched_a, sched_b = scheduler(opt_a), scheduler(opt_b)
    gen = torch.Generator().manual_seed(3)
    lrs = set()
    for t in range(STEPS):
        step_both(ours, opt_a, theirs, opt_b, grads_for(ours, gen))
        sched_a.step()
        sched_b.step()
        lrs.add(opt_a.param_groups[0]["lr"])
        assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"]
        assert_state_matches(opt_a, ours, opt_b, theirs, f"step {t}")
    assert len(lrs) > 2


def test_closure_is_called_once_and_its_loss_returned():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = ft.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    w0 = model.weight.detach().clone()
    with torch.no_grad():  # the closure still computes gradients
        loss = opt.step(closure)
    assert len(calls) == 1 and torch.is_tensor(loss)
    expected = w0 - 0.1 * model.weight.grad
    assert torch.allclose(model.weight.detach(), expected, rtol=1e-6, atol=1e-7)
    assert opt.step() is None


def test_hooks_run():
    params = make_params(torch.float32)
    opt = ft.Adam(params)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", o.state.get(params[0]))))
    opt.register_step_post_hook(lambda o, a, k: seen.append(("post", o.state[params[0]]["step"])))
    opt.register_state_dict_post_hook(lambda o, sd: sd.setdefault("extra", 1) and sd)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert seen[0] == ("pre", None) and seen[1][0] == "post" and seen[1][1].item() == 1
    assert opt.state_dict()["extra"] == 1


def test_grad_scaler_unscales_and_skips_on_inf():
    """torch.amp.GradScaler("cpu"): the step sees unscaled gradients (so it equals torch's
    Adam under the same scaler), and a step with an inf gradient is skipped."""
    ours, opt_a, theirs, opt_b = pair("Adam", torch.float32, {})
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    gen = torch.Generator().manual_seed(4)
    for t in range(6):
        grads = grads_for(ours, gen)
        if t == 3:
            grads[1][0] = float("inf")
        before = [p.detach().clone() for p in ours]
        for params, opt, scaler in ((ours, opt_a, scalers[0]), (theirs, opt_b, scalers[1])):
            loss = sum((p * g).sum() for p, g in zip(params, grads))
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        assert_state_matches(opt_a, ours, opt_b, theirs, f"step {t}")
        if t == 3:
            assert all(torch.equal(p.detach(), b) for p, b in zip(ours, before))
            assert opt_a.state[ours[0]]["step"].item() == 3
    assert scalers[0].get_scale() == scalers[1].get_scale() < 2.0**10


def test_add_param_group_and_zero_grad():
    params = make_params(torch.float32)
    opt = ft.Adagrad(params[:2], lr=0.1)
    opt.add_param_group({"params": params[2:], "lr": 0.01, "initial_accumulator_value": 0.5})
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[params[2]]["sum"].unique().tolist() == [1.5]  # 0.5 + 1**2
    assert opt.state[params[0]]["sum"].unique().tolist() == [1.0]
    assert all(opt.state[p]["step"].item() == 1 for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": -1.0})
    with pytest.raises(ValueError, match="initial_accumulator_value"):
        opt.add_param_group(
            {"params": [torch.zeros(2, requires_grad=True)], "initial_accumulator_value": -1}
        )
    assert len(opt.param_groups) == 2


def test_none_grads_are_skipped():
    params = make_params(torch.float32)
    opt = ft.Adam(params, lr=0.1)
    params[0].grad = torch.ones_like(params[0])
    before = [p.detach().clone() for p in params]
    opt.step()
    assert not torch.equal(params[0].detach(), before[0])
    for p, b in zip(params[1:], before[1:]):
        assert torch.equal(p.detach(), b) and p not in opt.state


def test_named_parameters():
    model = torch.nn.Linear(3, 2)
    opt = ft.AdamW(model.named_parameters())
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    model.weight.grad = torch.ones(2, 3).to_sparse()
    with pytest.raises(TypeError, match=r"sparse gradients.*'weight'"):
        opt.step()


# -- refusals ---------------------------------------------------------------------------------


def _bad(kind: str) -> tuple[torch.Tensor, str]:
    """A parameter the kernels cannot update, with its gradient, and the message expected."""
    if kind == "sparse":
        p = torch.zeros(4, requires_grad=True)
        p.grad = torch.ones(4).to_sparse()
        return p, "sparse gradients"
    if kind == "int":
        p = torch.zeros(4, dtype=torch.int64)
        p.grad = torch.ones(4, dtype=torch.int64)
        return p, "float32 and float64"
    if kind == "float16":
        p = torch.zeros(4, dtype=torch.float16, requires_grad=True)
        p.grad = torch.ones(4, dtype=torch.float16)
        return p, "float32 and float64"
    p = torch.zeros(1, 3).expand(4, 3).requires_grad_()  # kind == "expanded": stride 0
    p.grad = torch.ones(4, 3)
    return p, "may share memory"


@pytest.mark.parametrize("kind", ["sparse", "int", "float16", "expanded"])
@pytest.mark.parametrize("name", NAMES)
def test_unsupported_tensors_are_refused_naming_them(name, kind):
    """The refusal names the parameter and comes before anything is written: the good
    parameters before it keep their values, their state and their step counts."""
    good = make_params(torch.float32)
    bad, message = _bad(kind)
    opt = getattr(ft, name)([{"params": good}, {"params": [bad]}], lr=0.1, **FULL[name])
    gen = torch.Generator().manual_seed(5)
    bad_grad = bad.grad
    bad.grad = None
    for g, p in zip(grads_for(good, gen), good):
        p.grad = g
    opt.step()
    bad.grad = bad_grad
    snapshot = [p.detach().clone() for p in (*good, bad)]
    state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(good)}
    bad_state = dict(opt.state.get(bad, {}))  # Adagrad creates its state at once, as torch
    where = r"param_groups\[1\]\['params'\]\[0\]"
    error = ValueError if kind == "expanded" else TypeError
    with pytest.raises(error, match=f"(?s){message}.*{where}|{where}.*{message}"):
        opt.step()
    assert torch.equal(bad.detach(), snapshot[-1])
    for i, p in enumerate(good):
        assert torch.equal(p.detach(), snapshot[i])
        assert opt.state[p].keys() == state[i].keys()
        for k, v in state[i].items():
            assert torch.equal(opt.state[p][k], v), (i, k)
    assert opt.state.get(bad, {}) == bad_state


def test_bad_hyperparameter_set_between_steps_changes_nothing():
    """Before the first step and after two (test_torch_refusals covers every fault): the
    refusal leaves every parameter, state tensor and step count as it was."""
    params = make_params(torch.float32)
    opt = ft.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    start = [p.detach().clone() for p in params]
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert not opt.state  # not even the first group's state was created
    assert all(torch.equal(p.detach(), s) for p, s in zip(params, start))
    opt.param_groups[1]["lr"] = 0.1
    for _ in range(2):
        opt.step()
    assert all(opt.state[p]["step"].item() == 2 for p in params)
    snapshot = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
                for p in params]  # fmt: skip
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    for p, (value, state) in zip(params, snapshot):
        assert torch.equal(p.detach(), value)
        for k, v in state.items():
            assert torch.equal(opt.state[p][k], v), k


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (ft.Adam, dict(capturable=True), "capturable=True is not supported"),
        (ft.AdamW, dict(differentiable=True), "differentiable=True is not supported"),
        (ft.RMSprop, dict(capturable=True), "capturable=True is not supported"),
        (ft.SGD, dict(differentiable=True), "differentiable=True is not supported"),
        (ft.Adagrad, dict(differentiable=True), "differentiable=True is not supported"),
        (ft.RMSprop, dict(alpha=1.5), "alpha"),
        (ft.Adam, dict(eps=0.0), "eps"),
        (ft.SGD, dict(nesterov=True), "nesterov"),
        (ft.Adam, dict(lr=torch.tensor([1e-3, 1e-3])), "lr as a tensor must have one element"),
    ],
)
def test_unsupported_options_are_refused(cls, kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        cls(make_params(torch.float32), **kwargs)


@pytest.mark.parametrize(
    ("name", "flag"),
    [("Adam", "fused"), ("AdamW", "fused"), ("SGD", "fused"), ("Adagrad", "fused"),
     ("RMSprop", "foreach"), ("Adam", "foreach")],
)  # fmt: skip
def test_foreach_and_fused_are_accepted(name, flag):
    """Kept in the param groups (and checkpoints) as torch keeps them, and ignored: the
    steps are bit for bit those without the flag."""
    options = FULL[name]
    flagged, plain = make_params(torch.float32), make_params(torch.float32)
    opt = getattr(ft, name)(flagged, lr=LR[name], **options, **{flag: True})
    ref = getattr(ft, name)(plain, lr=LR[name], **options)
    assert opt.param_groups[0][flag] is True and opt.state_dict()["param_groups"][0][flag]
    gen = torch.Generator().manual_seed(11)
    for _ in range(3):
        grads = grads_for(flagged, gen)
        for ps, o in ((flagged, opt), (plain, ref)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            o.step()
    for a, b, start in zip(flagged, plain, make_params(torch.float32)):
        assert torch.equal(a, b)
        assert not torch.equal(a, start)  # both moved


def test_signatures_and_defaults_are_torchs():
    import inspect

    for name in NAMES:
        ours = inspect.signature(getattr(ft, name)).parameters
        theirs = inspect.signature(getattr(torch.optim, name)).parameters
        assert list(theirs) == [n for n in ours if n in theirs], name
        for n, p in theirs.items():
            assert ours[n].default == p.default and ours[n].kind == p.kind, (name, n)


# -- fastrms's own options -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("RMSprop", dict(eps_in_sqrt=True, centered=True, momentum=0.9)),
        ("Adagrad", dict(eps_in_sqrt=True, initial_accumulator_value=0.1)),
    ],
)
def test_eps_in_sqrt_is_fastrms_exactly(name, options):
    """The torch class and fastrms's own class run the same kernels: equal bit for bit."""
    params = make_params(torch.float32)
    arrays = [p.detach().numpy().copy() for p in params]
    ours = getattr(ft, name)(params, lr=0.01, **options)
    ref = {"RMSprop": fastrms.RMSProp, "Adagrad": fastrms.AdaGrad}[name](
        arrays, lr=0.01, backend="cpu", **options
    )
    gen = torch.Generator().manual_seed(6)
    for _ in range(5):
        grads = grads_for(params, gen)
        for p, g in zip(params, grads):
            p.grad = g
        ours.step()
        ref.step([g.numpy() for g in grads])
    for p, a in zip(params, arrays):
        np.testing.assert_array_equal(p.detach().numpy(), a, strict=True)


def test_graves_preset():
    params = make_params(torch.float32)
    opt = ft.RMSprop.graves(params)
    g = opt.param_groups[0]
    assert (g["lr"], g["alpha"], g["momentum"], g["eps"]) == (1e-4, 0.95, 0.9, 1e-4)
    assert g["centered"] and g["eps_in_sqrt"]


def test_import_fastrms_does_not_import_torch():
    import subprocess

    code = "import sys, fastrms; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- ZeroRedundancyOptimizer (gloo, 2 processes) -------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _zero_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for label, cls in (("fastrms", ft.Adam), ("torch", torch.optim.Adam)):
            params = make_params(torch.float32, seed=7)
            opt = ZeroRedundancyOptimizer(params, optimizer_class=cls, lr=0.05, amsgrad=True)
            gen = torch.Generator().manual_seed(8)  # the same gradients on both ranks
            for _ in range(4):
                for p, g in zip(params, grads_for(params, gen)):
                    p.grad = g
                opt.step()
            opt.consolidate_state_dict(to=0)
            sd = opt.state_dict() if rank == 0 else None
            results[label] = ([p.detach() for p in params], sd)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two fresh processes import torch and fastrms: 10-30 s on 2 busy cores
def test_zero_redundancy_optimizer(tmp_path):
    """Each of 2 gloo ranks steps its shard with fastrms.torch.Adam; the broadcast parameters
    and the consolidated state equal those of torch.optim.Adam under the same ZeRO."""
    out = str(tmp_path / "zero.pt")
    torch.multiprocessing.spawn(_zero_worker, args=(2, _free_port(), out), nprocs=2)
    results = torch.load(out, weights_only=False)
    (ours, sd_a), (theirs, sd_b) = results["fastrms"], results["torch"]
    for a, b in zip(ours, theirs):
        assert_close(a.numpy(), b.numpy(), "param")
    assert sd_a["state"].keys() == sd_b["state"].keys() == {0, 1, 2}
    for i in sd_b["state"]:
        for k, v in sd_b["state"][i].items():
            assert_close(sd_a["state"][i][k].numpy(), v.numpy(), f"state {k} of {i}")


# -- CUDA ----------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(name):
    """On CUDA tensors, on a non-default torch stream, the step matches the CPU one."""
    cpu = make_params(torch.float32)
    gpu = [p.detach().cuda().requires_grad_() for p in cpu]
    opt_c, opt_g = getattr(ft, name)(cpu, **FULL[name]), getattr(ft, name)(gpu, **FULL[name])
    gen = torch.Generator().manual_seed(9)
    stream = torch.cuda.Stream()
    for _ in range(5):
        grads = grads_for(cpu, gen)
        for p, q, g in zip(cpu, gpu, grads):
            p.grad = g
            q.grad = g.cuda()
        opt_c.step()
        with torch.cuda.stream(stream):
            stream.wait_stream(torch.cuda.default_stream())
            opt_g.step()
        torch.cuda.default_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for p, q in zip(cpu, gpu):
        np.testing.assert_allclose(q.detach().cpu().numpy(), p.detach().numpy(), rtol=1e-5)
        for k, v in opt_c.state[p].items():
            w = opt_g.state[q][k]
            np.testing.assert_allclose(w.cpu().numpy(), v.numpy(), rtol=1e-5, atol=1e-7)


def test_overlapping_parameters_are_refused_leaving_no_state():
    """Two parameters that share memory (views of one tensor) would corrupt each other."""
    base = torch.zeros(10)
    params = [base[:6].requires_grad_(), base[4:].requires_grad_()]
    opt = ft.Adam(params)
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="overlaps"):
        opt.step()
    assert not opt.state and torch.equal(base, torch.zeros(10))


def test_noncontiguous_and_graph_gradients_are_read():
    """A transposed gradient is read through a contiguous copy, and one from
    backward(create_graph=True) through a detached view; both give torch's step."""
    ours, opt_a, theirs, opt_b = pair("Adam", torch.float64, {})
    gen = torch.Generator().manual_seed(10)
    grads = grads_for(ours, gen)
    grads[0] = grads[0].t().contiguous().t()  # same values, transposed layout
    grads[1] = grads[1].clone().requires_grad_()
    step_both(ours, opt_a, theirs, opt_b, grads)
    assert_state_matches(opt_a, ours, opt_b, theirs, "step 1")


# -- Lion (where fastrms has the rule) -----------------------------------------------------------

has_lion = pytest.mark.skipif(
    ft.SPECS is None or "lion" not in ft.SPECS, reason="this fastrms has no Lion rule"
)


@has_lion
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "options", [{}, dict(weight_decay=0.1), dict(maximize=True), dict(tensor_lr=True)], ids=_id
)
def test_lion_matches_its_formula(options, dtype):
    """Against Lion written out in torch ops (lion-pytorch's update), two param groups, a
    skipped gradient; the state is lion-pytorch's (``exp_avg`` only)."""
    options = dict(options)
    tensor_lr = options.pop("tensor_lr", False)
    lr, (b1, b2), wd = 1e-2, (0.9, 0.99), options.get("weight_decay", 0.0)
    sign = -1.0 if options.get("maximize") else 1.0
    params = make_params(dtype)
    lr0 = torch.tensor(lr, dtype=torch.float64) if tensor_lr else lr
    opt = ft.Lion([{"params": params[:2]}, {"params": params[2:], "lr": lr / 2}], lr=lr0, **options)
    ref = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in ref]
    gen = torch.Generator().manual_seed(11)
    for t in range(STEPS):
        grads = grads_for(params, gen)
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if (i == 1 and t == 3) else g
            if p.grad is None:
                continue
            rate = lr if i < 2 else lr / 2
            g = sign * g
            c = b1 * m[i] + (1 - b1) * g
            ref[i] = (1 - rate * wd) * ref[i] - rate * torch.sign(c)
            m[i] = b2 * m[i] + (1 - b2) * g
        opt.step()
        for i, p in enumerate(params):
            assert_close(p.detach().numpy(), ref[i].numpy(), f"param {i}, step {t}")
            assert opt.state[p].keys() == {"exp_avg"}
            assert_close(opt.state[p]["exp_avg"].numpy(), m[i].numpy(), f"exp_avg {i}, {t}")


@has_lion
def test_lion_checkpoint_round_trip():
    params = make_params(torch.float32)
    opt = ft.Lion(params, lr=1e-3, weight_decay=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    copy = clone(params)
    other = ft.Lion(copy)
    other.load_state_dict(_roundtrip(opt.state_dict()))
    assert other.param_groups[0]["lr"] == 1e-3
    step_both(params, opt, copy, other, grads_for(params, torch.Generator().manual_seed(12)))
    for a, b in zip(params, copy):
        assert torch.equal(a.detach(), b.detach())


# -- repeated steps: the short route (fastrms.torch_repeat) ------------------------------------

#: What happens before each step of test_repeated_steps_equal_the_full_route: each changes
#: something the short route must notice (or may ignore, where it changes nothing it uses).
_EVENTS = {
    3: "lr",  # a scheduler's change of a group's lr
    5: "no grad",  # one parameter without a gradient
    6: "grad back",
    7: "step count",  # a step count set in place
    8: "new data",  # p.data replaced by another tensor
    9: "reload",  # load_state_dict(state_dict()): new state tensors
    10: "same grads",  # zero_grad(set_to_none=False): the same gradient tensors again
    11: "new state dict",  # opt.state[p] replaced: a new dict holding a copy of one tensor
}


def _event(opt, params, grads, event):
    if event == "lr":
        opt.param_groups[0]["lr"] *= 0.5
    elif event == "no grad":
        grads[1] = None
    elif event == "step count" and "step" in opt.state[params[0]]:
        opt.state[params[0]]["step"].fill_(1.0)
    elif event == "new data":
        params[2].data = params[2].data.clone()
    elif event == "reload":
        opt.load_state_dict(opt.state_dict())
    elif event == "new state dict":
        st = opt.state[params[2]]
        name = next(k for k in st if k != "step")
        opt.state[params[2]] = {**st, name: st[name].clone()}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", [*NAMES, "Lion"])
def test_repeated_steps_equal_the_full_route(name, dtype, monkeypatch):
    """Steps that repeat the last one's buckets take the short route; they give, bit for bit,
    what the full route gives, also when something changes between steps."""
    cls = getattr(ft, name)
    options = FULL.get(name, dict(weight_decay=0.1))
    short, full = make_params(dtype), make_params(dtype)
    opts = [cls([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05}], lr=0.1, **options)
            for ps in (short, full)]  # fmt: skip
    monkeypatch.setattr(opts[1], "_repeat", lambda last: False)
    taken = []
    repeat = opts[0]._repeat
    monkeypatch.setattr(opts[0], "_repeat", lambda last: taken.append(repeat(last)) or taken[-1])
    gen = torch.Generator().manual_seed(3)
    for t in range(1, 13):
        grads = grads_for(short, gen)
        same = _EVENTS.get(t) == "same grads"
        for opt, ps in zip(opts, (short, full)):
            gs = list(grads)
            _event(opt, ps, gs, _EVENTS.get(t))
            for p, g in zip(ps, gs):
                if same and p.grad is not None and g is not None:
                    p.grad.copy_(g)
                else:
                    p.grad = None if g is None else g.clone()
            opt.step()
        for a, b in zip(short, full):
            assert torch.equal(a, b), t
            assert opts[0].state[a].keys() == opts[1].state[b].keys()
            for k, v in opts[0].state[a].items():
                assert torch.equal(v, opts[1].state[b][k]), (t, k)
    # Short: steps 2, 3 (lr), 4, 10 (same grads) and 12, and 7 where no step count is kept
    # and used. Steps 1 and 9 (reload) have no last step to repeat.
    short_steps = {2, 3, 4, 10, 12}
    if not (opts[0]._counts_steps and opts[0]._keeps_step):
        short_steps.add(7)
    assert taken == [t in short_steps for t in range(2, 13) if t != 9]


def test_bad_gradient_on_a_repeated_step_changes_nothing():
    """A gradient that the short route cannot take sends the step down the full route, which
    refuses it naming the parameter, before anything is written."""
    params = make_params(torch.float32)
    opt = ft.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=0.1)
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        for p, g in zip(params, grads_for(params, gen)):
            p.grad = g
        opt.step()
    assert opt._last is not None  # the next step would take the short route
    params[2].grad = params[2].grad.to_sparse()
    snapshot = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    where = r"param_groups\[1\]\['params'\]\[0\]"
    with pytest.raises(TypeError, match=f"sparse gradients.*{where}"):
        opt.step()
    for p, s, st in zip(params, snapshot, state):
        assert torch.equal(p.detach(), s)
        for k, v in st.items():
            assert torch.equal(opt.state[p][k], v), k


def test_overlapping_gradient_on_a_repeated_step_changes_nothing():
    """The plan's own check (a gradient that is another parameter) also holds on the short
    route."""
    params = make_params(torch.float32)
    opt = ft.RMSprop(params, lr=0.1)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    params[0].grad = torch.ones_like(params[0])
    params[1].grad = params[1].detach()  # the gradient is the parameter itself
    snapshot = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="overlaps"):
        opt.step()
    for p, s in zip(params, snapshot):
        assert torch.equal(p.detach(), s)


# -- parallel steps on torch's own OpenMP team (fastrms.teams.OpenMPTeam) ----------------------

#: Shapes whose bucket is above TEAM_THRESHOLD, so that a step runs in parallel.
BIG_SHAPES = ((300, 200), (9001,), (3,))


def _team_or_skip():
    team = ft._torch_team()
    if team is None:
        pytest.skip("torch's CPU ops do not run on an OpenMP team here")
    assert sum(torch.Size(s).numel() for s in BIG_SHAPES) >= ft.TEAM_THRESHOLD
    return team


@pytest.fixture
def two_torch_threads():
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", [*NAMES, "Lion"])
def test_parallel_steps_on_torchs_team_equal_one_thread(
    name, dtype, monkeypatch, two_torch_threads
):
    """A bucket above TEAM_THRESHOLD runs on torch's OpenMP team, bit for bit as without it
    (on one thread: the bucket is below PARALLEL_THRESHOLD), over steps that take the full
    and the short route."""
    team = _team_or_skip()
    cls, options = getattr(ft, name), FULL.get(name, dict(weight_decay=0.1))
    gen = torch.Generator().manual_seed(13)
    start = [torch.randn(s, generator=gen, dtype=dtype) for s in BIG_SHAPES]
    ours, numbas = ([p.clone().requires_grad_() for p in start] for _ in range(2))
    opts = [cls(ps, lr=1e-2, **options) for ps in (ours, numbas)]
    for t in range(4):
        grads = grads_for(ours, gen)
        for opt, ps in zip(opts, (ours, numbas)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            with monkeypatch.context() as m:
                if opt is opts[1]:
                    m.setattr(opt, "_torch_team", False)  # Numba's threads
                opt.step()
        for a, b in zip(ours, numbas):
            assert torch.equal(a, b), t
            for k, v in opts[0].state[a].items():
                assert torch.equal(v, opts[1].state[b][k]), (t, k)
    (mine,), (theirs,) = opts[0]._plans.values(), opts[1]._plans.values()
    assert mine.groups[0].team is team and mine.groups[0]._threads == 2
    assert theirs.groups[0].team is None and theirs.groups[0]._threads == 1


def _step(opt, params, grads) -> tuple[list[bytes], int]:
    """One step; the parameters' bytes and the number of threads it ran on."""
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    (plan,) = opt._plans.values()
    return [p.detach().numpy().tobytes() for p in params], plan.groups[0]._threads


def _step_in_child(opt, params, grads, conn) -> None:
    conn.send(_step(opt, params, grads))


def test_a_forked_child_steps_on_one_thread(two_torch_threads):
    """A child forked after the parent's team ran steps on one thread (its copy of the team
    may not survive the fork), and gets the parent's bits."""
    import multiprocessing

    _team_or_skip()
    gen = torch.Generator().manual_seed(14)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in BIG_SHAPES]
    opt = ft.Adam(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    grads = grads_for(params, gen)
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    child = ctx.Process(target=_step_in_child, args=(opt, params, grads, child_end))
    child.start()
    assert parent_end.poll(120), "the forked child did not step"
    got, threads = parent_end.recv()  # before join: the child waits until its result is read
    child.join(60)
    assert child.exitcode == 0
    want, parent_threads = _step(opt, params, grads)  # the same step here, on the team
    assert (threads, parent_threads) == (1, 2)
    assert got == want
