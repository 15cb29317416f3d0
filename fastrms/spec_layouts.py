"""The layouts: what each kernel rule takes (its state slots, its scalars and its flags, by
name, in the order the rule indexes them), one :class:`~fastrms.spec_types.Layout` per rule.

:mod:`fastrms.specs` re-exports :data:`LAYOUTS`.
"""

from __future__ import annotations

from .spec_types import Layout, Slot

LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout(
            "rmsprop",
            (Slot("square_avg", sign="unsigned"), "momentum_buffer", "grad_avg"),
            {"lr": "lr", "alpha": "alpha", "one_minus_alpha": "1 - alpha", "eps": "eps",
             "weight_decay": "weight_decay", "sign": "sign", "momentum": "momentum"},
            ("centered", "use_momentum", "eps_in_sqrt"),
        ),
        Layout(
            "adagrad",
            (Slot("state_sum", sign="unsigned"),),
            {"clr": "lr / (1 + (step - 1) * lr_decay)", "eps": "eps",
             "weight_decay": "weight_decay", "sign": "sign"},
            ("eps_in_sqrt",),
        ),
        Layout(
            "adam",
            ("exp_avg", Slot("exp_avg_sq", sign="unsigned"),
             Slot("max_exp_avg_sq", sign="unsigned")),
            {"step_size": "lr / (1 - beta1**step)",
             "inv_bias_correction2_sqrt": "1 / sqrt(1 - beta2**step)",
             "beta1": "beta1", "one_minus_beta1": "1 - beta1", "beta2": "beta2",
             "one_minus_beta2": "1 - beta2", "eps": "eps", "weight_decay": "weight_decay",
             "decay": "1 - lr * weight_decay", "sign": "sign"},
            ("amsgrad",),
        ),
        Layout(
            "sgd",
            ("momentum_buffer",),
            {"lr": "lr", "weight_decay": "weight_decay", "sign": "sign",
             "momentum": "momentum (0 on step 1)", "grad_scale": "1 - dampening (1 on step 1)",
             "nesterov_momentum": "momentum"},
            ("use_momentum", "nesterov"),
        ),
        Layout(
            "lion",
            ("exp_avg",),
            {"lr": "lr", "beta1": "beta1", "one_minus_beta1": "1 - beta1", "beta2": "beta2",
             "one_minus_beta2": "1 - beta2", "decay": "1 - lr * weight_decay", "sign": "sign"},
            (),
        ),
        Layout(
            "adamax",
            ("exp_avg", Slot("exp_inf", sign="unsigned")),
            {"clr": "lr / (1 - beta1**step)", "beta1": "beta1", "one_minus_beta1": "1 - beta1",
             "beta2": "beta2", "eps": "eps", "weight_decay": "weight_decay", "sign": "sign"},
            (),
        ),
        Layout(
            "adadelta",
            (Slot("square_avg", sign="unsigned"), Slot("acc_delta", sign="unsigned")),
            {"lr": "lr", "rho": "rho", "one_minus_rho": "1 - rho", "eps": "eps",
             "weight_decay": "weight_decay", "sign": "sign"},
            (),
        ),
        Layout(
            "radam",
            ("exp_avg", Slot("exp_avg_sq", sign="unsigned")),
            {"step_size": "lr * rect / (1 - beta1**step) (rect = 1 unless rectified)",
             "bias_correction2_sqrt": "sqrt(1 - beta2**step)",
             "beta1": "beta1", "one_minus_beta1": "1 - beta1", "beta2": "beta2",
             "one_minus_beta2": "1 - beta2", "eps": "eps", "weight_decay": "weight_decay",
             "decay": "1 - lr * weight_decay", "sign": "sign"},
            ("rectify",),
        ),
        Layout(
            "nadam",
            ("exp_avg", Slot("exp_avg_sq", sign="unsigned")),
            {"grad_step": "lr * (1 - mu_t) / (1 - mu_product_t)",
             "exp_avg_step": "lr * mu_(t+1) / (1 - mu_product_t * mu_(t+1))",
             "bias_correction2": "1 - beta2**step", "beta1": "beta1",
             "one_minus_beta1": "1 - beta1", "beta2": "beta2", "one_minus_beta2": "1 - beta2",
             "eps": "eps", "weight_decay": "weight_decay", "decay": "1 - lr * weight_decay"},
            ("maximize",),
        ),
    )
}  # fmt: skip
