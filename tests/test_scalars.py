"""An independent oracle for the host-side scalars of every step (fastrms.specs).

The kernels and the NumPy reference both take their per-step scalars (Adam's bias
corrections, AdaGrad's decayed learning rate, SGD's first step, ``1 - beta``...) from
:mod:`fastrms.specs`, so comparing them with each other cannot find a slip there. Here each
optimizer's scalars, flags and state are written out again from the published formulas
(PyTorch's ``torch.optim`` docs; Chen et al. 2023 for Lion; see /work/shared/NOTES.md), in
float64, and compared with the spec's for steps 1 to 6, every option combination of the test
grid, and hyperparameters away from their defaults (so that, e.g., ``beta1`` and ``beta2`` or
``lr`` and ``eps`` cannot be swapped unseen). No PyTorch needed.

Tolerance: 4 ulps relative (the spec and this file may evaluate a formula in another order,
e.g. ``lr / c`` against ``lr * (1 / c)``, which costs at most an ulp or two); every slip of a
formula we tried moves a scalar by far more (an Adam bias correction of ``beta1**(t - 1)``
instead of ``beta1**t`` is off by 10% at step 2).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import OPTION_GRIDS, options_id

from fastrms.specs import SPECS

STEPS = range(1, 9)  # RAdam rectifies from step 6 (betas (0.9, 0.999)) or 7 (AWAY)
#: Hyperparameters away from their defaults, each a distinct value (none 0 or 1).
AWAY = {
    "lr": 0.03,
    "alpha": 0.9,
    "eps": 1e-6,
    "betas": (0.8, 0.95),
    "lr_decay": 0.25,
    "dampening": 0.3,
    "rho": 0.85,
    "momentum_decay": 0.02,
}
REL_TOL = 4 * 2.0**-52


def _sign(o: dict) -> float:
    return -1.0 if o["maximize"] else 1.0


def rmsprop(t: int, o: dict) -> tuple[dict, dict, tuple]:
    """torch.optim.RMSprop: v = a v + (1 - a) g^2; centered m; momentum buffer."""
    scalars = {
        "lr": o["lr"], "alpha": o["alpha"], "one_minus_alpha": 1.0 - o["alpha"], "eps": o["eps"],
        "weight_decay": o["weight_decay"], "sign": _sign(o), "momentum": o["momentum"],
    }  # fmt: skip
    flags = {"centered": o["centered"], "use_momentum": o["momentum"] > 0,
             "eps_in_sqrt": o["eps_in_sqrt"]}  # fmt: skip
    state = ["square_avg"]
    if o["momentum"] > 0:
        state.append("momentum_buffer")
    if o["centered"]:
        state.append("grad_avg")
    return scalars, flags, tuple(state)


def adagrad(t: int, o: dict) -> tuple[dict, dict, tuple]:
    """torch.optim.Adagrad: clr = lr / (1 + (t - 1) lr_decay)."""
    clr = o["lr"] / (1.0 + (t - 1) * o["lr_decay"])
    scalars = {"clr": clr, "eps": o["eps"], "weight_decay": o["weight_decay"], "sign": _sign(o)}
    return scalars, {"eps_in_sqrt": o["eps_in_sqrt"]}, ("state_sum",)


def adam(t: int, o: dict, decoupled: bool = False) -> tuple[dict, dict, tuple]:
    """torch.optim.Adam / AdamW: p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps);
    AdamW decays p by 1 - lr wd first and adds no L2 term to the gradient."""
    b1, b2 = o["betas"]
    bias_correction1 = 1.0 - b1**t
    bias_correction2 = 1.0 - b2**t
    scalars = {
        "step_size": o["lr"] / bias_correction1,
        "inv_bias_correction2_sqrt": 1.0 / math.sqrt(bias_correction2),
        "beta1": b1, "one_minus_beta1": 1.0 - b1, "beta2": b2, "one_minus_beta2": 1.0 - b2,
        "eps": o["eps"],
        "weight_decay": 0.0 if decoupled else o["weight_decay"],
        "decay": 1.0 - o["lr"] * o["weight_decay"] if decoupled else 1.0,
        "sign": _sign(o),
    }  # fmt: skip
    state = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if o["amsgrad"] else ())
    return scalars, {"amsgrad": o["amsgrad"]}, state


def adamw(t: int, o: dict) -> tuple[dict, dict, tuple]:
    return adam(t, o, decoupled=True)


def sgd(t: int, o: dict) -> tuple[dict, dict, tuple]:
    """torch.optim.SGD: the buffer starts as the gradient itself (b = g at t = 1), then
    b = mu b + (1 - dampening) g; Nesterov adds mu b to the gradient."""
    first = t == 1
    scalars = {
        "lr": o["lr"], "weight_decay": o["weight_decay"], "sign": _sign(o),
        "momentum": 0.0 if first else o["momentum"],
        "grad_scale": 1.0 if first else 1.0 - o["dampening"],
        "nesterov_momentum": o["momentum"],
    }  # fmt: skip
    flags = {"use_momentum": o["momentum"] > 0, "nesterov": o["nesterov"]}
    return scalars, flags, ("momentum_buffer",) if o["momentum"] > 0 else ()


def lion(t: int, o: dict) -> tuple[dict, dict, tuple]:
    """Chen et al. 2023, Algorithm 2: c = b1 m + (1 - b1) g; p = (1 - lr wd) p - lr sign(c);
    m = b2 m + (1 - b2) g."""
    b1, b2 = o["betas"]
    scalars = {
        "lr": o["lr"], "beta1": b1, "one_minus_beta1": 1.0 - b1, "beta2": b2,
        "one_minus_beta2": 1.0 - b2, "decay": 1.0 - o["lr"] * o["weight_decay"],
        "sign": _sign(o),
    }  # fmt: skip
    return scalars, {}, ("exp_avg",)


def adamax(t: int, o: dict) -> tuple[dict, dict, tuple]:
    """torch.optim.Adamax: clr = lr / (1 - b1^t); m = b1 m + (1 - b1) g;
    u = max(b2 u, |g| + eps); p -= clr m / u."""
    b1, b2 = o["betas"]
    scalars = {
        "clr": o["lr"] / (1.0 - b1**t), "beta1": b1, "one_minus_beta1": 1.0 - b1, "beta2": b2,
        "eps": o["eps"], "weight_decay": o["weight_decay"], "sign": _sign(o),
    }  # fmt: skip
    return scalars, {}, ("exp_avg", "exp_inf")


def adadelta(t: int, o: dict) -> tuple[dict, dict, tuple]:
    """torch.optim.Adadelta: v = rho v + (1 - rho) g^2; delta = sqrt(u + eps)/sqrt(v + eps) g;
    u = rho u + (1 - rho) delta^2; p -= lr delta (no step dependence)."""
    scalars = {
        "lr": o["lr"], "rho": o["rho"], "one_minus_rho": 1.0 - o["rho"], "eps": o["eps"],
        "weight_decay": o["weight_decay"], "sign": _sign(o),
    }  # fmt: skip
    return scalars, {}, ("square_avg", "acc_delta")


def radam(t: int, o: dict) -> tuple[dict, dict, tuple]:
    """torch.optim.RAdam: rho_inf = 2/(1 - b2) - 1, rho_t = rho_inf - 2 t b2^t/(1 - b2^t);
    for rho_t > 5 the step is lr r/(1 - b1^t) m sqrt(1 - b2^t)/(sqrt(v) + eps) with
    r = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t)), else
    lr/(1 - b1^t) m."""
    b1, b2 = o["betas"]
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    rho_t = rho_inf - 2.0 * t * b2**t / (1.0 - b2**t)
    rectify = rho_t > 5.0
    r = 1.0
    if rectify:
        r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
    decoupled = o["decoupled_weight_decay"]
    scalars = {
        "step_size": o["lr"] * r / (1.0 - b1**t), "bias_correction2_sqrt": math.sqrt(1.0 - b2**t),
        "beta1": b1, "one_minus_beta1": 1.0 - b1, "beta2": b2, "one_minus_beta2": 1.0 - b2,
        "eps": o["eps"], "weight_decay": 0.0 if decoupled else o["weight_decay"],
        "decay": 1.0 - o["lr"] * o["weight_decay"] if decoupled else 1.0, "sign": _sign(o),
    }  # fmt: skip
    return scalars, {"rectify": rectify}, ("exp_avg", "exp_avg_sq")


def nadam(t: int, o: dict) -> tuple[dict, dict, tuple]:
    """torch.optim.NAdam: mu_k = b1 (1 - 0.5 * 0.96^(k psi)); P_t = mu_1 ... mu_t, a float32
    running product in torch (so rounded to float32 after each multiplication here too);
    p -= lr (1 - mu_t)/(1 - P_t) g/d + lr mu_{t+1}/(1 - P_t mu_{t+1}) m/d,
    d = sqrt(v/(1 - b2^t)) + eps."""
    b1, b2 = o["betas"]

    def mu(k):
        return b1 * (1.0 - 0.5 * 0.96 ** (k * o["momentum_decay"]))

    product = np.float32(1.0)
    for k in range(1, t + 1):
        product = np.float32(product * np.float32(mu(k)))
    product = float(product)
    decoupled = o["decoupled_weight_decay"]
    scalars = {
        "grad_step": o["lr"] * (1.0 - mu(t)) / (1.0 - product),
        "exp_avg_step": o["lr"] * mu(t + 1) / (1.0 - product * mu(t + 1)),
        "bias_correction2": 1.0 - b2**t, "beta1": b1, "one_minus_beta1": 1.0 - b1,
        "beta2": b2, "one_minus_beta2": 1.0 - b2, "eps": o["eps"],
        "weight_decay": 0.0 if decoupled else o["weight_decay"],
        "decay": 1.0 - o["lr"] * o["weight_decay"] if decoupled else 1.0,
    }  # fmt: skip
    return scalars, {"maximize": o["maximize"]}, ("exp_avg", "exp_avg_sq")


ORACLE = {"rmsprop": rmsprop, "adagrad": adagrad, "adam": adam, "adamw": adamw, "sgd": sgd,
          "lion": lion, "adamax": adamax, "adadelta": adadelta, "radam": radam,
          "nadam": nadam}  # fmt: skip

#: The defaults each optimizer documents (PyTorch's; Lion: the paper's code and Optax's).
DEFAULTS = {
    "rmsprop": dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                    centered=False, eps_in_sqrt=False, maximize=False),
    "adagrad": dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                    eps=1e-10, eps_in_sqrt=False, maximize=False),
    "adam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 maximize=False, decoupled_weight_decay=False),
    "adamw": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                  maximize=False, decoupled_weight_decay=True),
    "sgd": dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                maximize=False),
    "lion": dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False),
    "adamax": dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False),
    "adadelta": dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False),
    "radam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                  decoupled_weight_decay=False, maximize=False),
    "nadam": dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                  momentum_decay=4e-3, decoupled_weight_decay=False, maximize=False),
}  # fmt: skip


def test_the_oracle_covers_every_spec():
    assert ORACLE.keys() == SPECS.keys() == DEFAULTS.keys()


@pytest.mark.parametrize("name", SPECS)
def test_defaults_are_the_documented_ones(name):
    assert SPECS[name].defaults == DEFAULTS[name]


def _cases() -> list:
    cases = []
    for name, grid in OPTION_GRIDS.items():
        for options in grid:
            for away in (False, True):
                o = dict(options)
                if away:
                    o |= {k: v for k, v in AWAY.items() if k in SPECS[name].defaults}
                    if o.get("nesterov"):
                        o["dampening"] = 0.0  # Nesterov needs it
                ident = f"{name}-{options_id(options)}{'-away' if away else ''}"
                cases.append(pytest.param(name, o, id=ident))
    return cases


def _assert_scalars(got: tuple, want: dict, names: tuple, what: str) -> None:
    assert len(got) == len(names) == len(want), what
    for name, x in zip(names, got):
        assert type(x) is float, (what, name, type(x))
        assert math.isclose(x, want[name], rel_tol=REL_TOL, abs_tol=0.0), (
            what,
            name,
            x,
            want[name],
        )


@pytest.mark.parametrize(("name", "options"), _cases())
def test_each_steps_scalars_match_the_formulas(name, options):
    spec = SPECS[name]
    layout = spec.layout
    full = {**spec.defaults, **options}
    step_options = {k: v for k, v in options.items() if k in spec.step_options}
    stepper = spec.stepper(**options)
    for t in STEPS:
        want_scalars, want_flags, want_state = ORACLE[name](t, full)
        for how, setup in [("setup", spec.setup(t, **options)), ("stepper", stepper(t)),
                           ("step options", spec.setup(t, **step_options))]:  # fmt: skip
            what = f"{name} {options} step {t} via {how}"
            assert setup.rule == layout.name, what
            _assert_scalars(setup.scalars, want_scalars, tuple(layout.scalars), what)
            assert setup.flags == tuple(want_flags[f] for f in layout.flags), what
            assert all(type(f) is bool for f in setup.flags), what
            assert setup.state == want_state, what


def test_the_oracle_tells_a_slipped_bias_correction():
    """The tolerance is far tighter than a slip: beta1**(t - 1) for beta1**t at step 2."""
    o = {**DEFAULTS["adam"], "lr": 0.03}
    right = adam(2, o)[0]["step_size"]
    slipped = o["lr"] / (1 - o["betas"][0] ** 1)
    assert not math.isclose(right, slipped, rel_tol=1e-3)
