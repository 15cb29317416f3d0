"""A refused ``fastrms.torch`` step changes nothing, also after good steps, on both routes.

Two good steps first, so that the next one would take the short route (or, with the short
route turned off, the full one); then the last bucket is made bad in one way: a bad
hyperparameter, a scalar that overflows float32, a corrupt step count or state tensor, a
gradient that overlaps a tensor the step writes, a gradient or parameter of another dtype.
The parameters sit in two groups and three buckets (group 0 float32; group 1 float64 then
float32, the bad one last). Every parameter, state tensor and step count must be bit for bit
what it was, and the error must say what is wrong.
"""

from __future__ import annotations

import importlib
import os

import pytest

# torch is a test dependency: in CI a missing torch fails these tests instead of skipping them.
torch = importlib.import_module("torch") if os.environ.get("CI") else pytest.importorskip("torch")

import fastrms.torch as ft  # noqa: E402

OPTIONS = {
    "RMSprop": dict(centered=True, momentum=0.9, weight_decay=0.1),
    "Adagrad": dict(lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1),
    "Adam": dict(amsgrad=True, weight_decay=0.1),
    "AdamW": dict(amsgrad=True),
    "SGD": dict(momentum=0.9, dampening=0.5, weight_decay=0.1),
    "Lion": dict(weight_decay=0.1),
}
#: (shape, dtype) of each parameter; group 0 holds the first two, group 1 the others.
PARAMS = (((5, 4), torch.float32), ((7,), torch.float32), ((3, 2), torch.float64),
          ((5, 4), torch.float32))  # fmt: skip


def _state_key(opt, p) -> str:
    return next(k for k in opt.state[p] if k != "step")


def _fault_hyperparameter(opt, params):
    opt.param_groups[1]["lr"] = -1.0
    return ValueError, "lr", None


def _fault_float32_overflow(opt, params):
    group = opt.param_groups[1]
    if "eps" in group:
        group["eps"] = 1e-50  # fits float64; 0 in float32 (the float64 bucket is fine)
    else:
        group["lr"] = 1e39
    return ValueError, "float32", None


def _fault_step_replaced(opt, params):
    opt.state[params[-1]]["step"] = torch.tensor(-5.0)  # as a damaged checkpoint gives
    return ValueError, r"step.*param_groups\[1\]\['params'\]\[1\]", "step"


def _fault_step_in_place(opt, params):
    opt.state[params[-1]]["step"].fill_(2.5)
    return ValueError, r"step.*param_groups\[1\]\['params'\]\[1\]", "step"


def _fault_step_of_two_elements(opt, params):
    opt.state[params[-1]]["step"] = torch.tensor([2.0, 2.0])
    return ValueError, r"step.*1-element tensor", "step"


def _fault_state_tensor(opt, params):
    st, key = opt.state[params[-1]], _state_key(opt, params[-1])
    st[key] = torch.zeros(3)
    return ValueError, r"does not match.*param_groups\[1\]\['params'\]\[1\]", key


def _fault_gradient_is_own_state(opt, params):
    p = params[-1]
    p.grad = opt.state[p][_state_key(opt, p)]
    return ValueError, "overlaps", None


def _fault_gradient_is_state_of_first_bucket(opt, params):
    params[-1].grad = opt.state[params[0]][_state_key(opt, params[0])]
    return ValueError, "overlaps", None


def _fault_gradient_dtype(opt, params):
    p = params[-1]
    p.grad_dtype = None  # torch then takes a gradient of another dtype
    p.grad = p.grad.double()
    return TypeError, r"dtype torch.float64", None


def _fault_float16_parameter(opt, params):
    p = params[-1]
    p.data = p.data.half()
    p.grad = torch.ones_like(p)
    return TypeError, r"float32 and float64.*param_groups\[1\]\['params'\]\[1\]", "param"


FAULTS = {f.__name__.removeprefix("_fault_"): f for f in (
    _fault_hyperparameter, _fault_float32_overflow, _fault_step_replaced, _fault_step_in_place,
    _fault_step_of_two_elements,
    _fault_state_tensor, _fault_gradient_is_own_state, _fault_gradient_is_state_of_first_bucket,
    _fault_gradient_dtype, _fault_float16_parameter,
)}  # fmt: skip


def _snapshot(opt, params) -> list:
    return [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]


def _assert_unchanged(opt, params, snapshot, faulty: str | None = None) -> None:
    """Every parameter and state tensor as in ``snapshot``, but the last parameter's
    ``faulty`` one ("param" or a state key), which the fault itself changed."""
    assert len(opt.state) == len(params)
    for i, (p, (value, state)) in enumerate(zip(params, snapshot)):
        last = i == len(params) - 1
        if not (last and faulty == "param"):
            assert torch.equal(p.detach(), value), f"param {i} was written"
        assert opt.state[p].keys() == state.keys(), i
        for k, v in state.items():
            if not (last and faulty == k):
                assert torch.equal(opt.state[p][k], v), f"state {k} of param {i} was written"


def _cases() -> list:
    """Every optimizer with every fault (the step-count ones where the update depends on
    ``state["step"]``: not RMSprop, which only counts on, nor SGD and Lion, which keep none)."""
    return [
        pytest.param(name, fault, id=f"{name}-{fault}")
        for name in OPTIONS
        for fault in FAULTS
        if "step" not in fault
        or (getattr(ft, name)._keeps_step and getattr(ft, name)._counts_steps)
    ]


@pytest.mark.parametrize("route", ["short", "full"])
@pytest.mark.parametrize(("name", "fault"), _cases())
def test_refused_step_after_good_steps_changes_nothing(name, fault, route, monkeypatch):
    cls = getattr(ft, name)
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen, dtype=d).requires_grad_() for s, d in PARAMS]
    opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": 0.005}], lr=0.01,
              **OPTIONS[name])  # fmt: skip
    if route == "full":
        monkeypatch.setattr(opt, "_repeat", lambda last: False)
    for _ in range(3):  # the third has fresh gradients, and the fault
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if _ == 2:
            break
        opt.step()
    assert opt._last is not None and len(opt._last.runs) == 3  # three buckets
    snapshot = _snapshot(opt, params)
    error, message, faulty = FAULTS[fault](opt, params)
    with pytest.raises(error, match=message):
        opt.step()
    _assert_unchanged(opt, params, snapshot, faulty)


@pytest.mark.parametrize("name", ["Adam", "RMSprop"])
def test_a_later_group_refused_on_its_first_step_leaves_no_state(name):
    """A new group whose hyperparameter is bad: the first group's parameters are untouched
    and the new group's parameters get no state."""
    gen = torch.Generator().manual_seed(2)
    old = [torch.randn(4, 3, generator=gen).requires_grad_() for _ in range(2)]
    new = [torch.randn(6, generator=gen).requires_grad_()]
    opt = getattr(ft, name)(old, lr=0.01)
    for p in old:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    opt.add_param_group({"params": new})
    opt.param_groups[1]["eps"] = 1e-50
    for p in (*old, *new):
        p.grad = torch.randn(p.shape, generator=gen)
    snapshot = _snapshot(opt, old)
    with pytest.raises(ValueError, match="float32"):
        opt.step()
    _assert_unchanged(opt, old, snapshot)
    assert new[0] not in opt.state
