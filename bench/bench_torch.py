"""``opt.step()`` of ``fastrms.torch`` against ``torch.optim`` inside a torch training loop.

The 8-tensor MLP (:mod:`bench.torch_loop`) with Adam and RMSprop, and GPT-2-tiny's shapes with
RMSprop (GPT-2 small with ``--bench-large``); with each, its floor (torch's step wrapper
around the bare kernel call, :class:`bench.torch_loop.Floor`). Only the step is timed:
``benchmark.pedantic`` runs the forward and backward pass as its untimed setup. Each fastrms
variant first takes one step that is checked against ``torch.optim``'s for-loop
implementation on the same model.

For a quick interleaved comparison in one process use ``python -m bench.torch_loop``.
"""

from __future__ import annotations

import pytest
import torch

from bench import torch_loop as TL
from fastrms.tools.bench.cases import ALGOS

#: (variant, the torch.optim for-loop optimizer it must match, or None for one not checked:
#: torch's own, and the floors, which are bare kernel calls, not optimizers)
VARIANTS = {
    "fastrms-adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=False),
    "fastrms-adam-numba-threads": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=False),
    "torch-adam-fused": None,
    "floor-adam": None,
    "fastrms-rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, foreach=False),
    "torch-rmsprop-foreach": None,
    "floor-rmsprop": None,
}


def _cases(config: pytest.Config) -> list:
    gpt2 = ("gpt2-tiny", "gpt2") if config.getoption("--bench-large") else ("gpt2-tiny",)
    cases = [("mlp", v) for v in VARIANTS]
    cases += [(m, v) for m in gpt2 for v in VARIANTS if "rmsprop" in v]
    return cases


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "torch_case" in metafunc.fixturenames:
        cases = _cases(metafunc.config)
        metafunc.parametrize("torch_case", cases, ids=[f"{m}-{v}" for m, v in cases])


def _check_first_step(model: str, variant: str) -> None:
    loop, twin = TL.make_loop(model, variant), TL.make_loop(model, VARIANTS[variant])
    for lp in (loop, twin):
        lp.prepare()
        lp.opt.step()
    for a, b in zip(loop.params, twin.params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-6, atol=1e-7)


def test_torch_step(benchmark, record, threads, torch_case):
    model, variant = torch_case
    if VARIANTS[variant] is not None:
        _check_first_step(model, variant)
    loop = TL.make_loop(model, variant)
    tensors, size = TL.model_size(model)
    algo = ALGOS["adam" if "adam" in variant else "rmsprop"]
    record(f"torch loop {model}", variant, algo.bytes_per_element() * size, size=size,
           tensors=tensors)  # fmt: skip
    benchmark.pedantic(loop.opt.step, setup=loop.prepare, rounds=50, warmup_rounds=3)
