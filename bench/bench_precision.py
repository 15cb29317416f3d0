"""Adam at each precision over a model's tensors (``fastrms bench --precision``'s table):
fastrms with float32, bf16 and int8 state and bf16 parameters, torch fused Adam on float32 and
bf16 parameters, and torchao, optimi and bitsandbytes where installed.

``gpt2-tiny`` always; GPT-2 small with ``--bench-large``. A variant this install cannot run is
skipped with its reason (an anchor library not installed, or a fastrms option not there yet).
"""

from __future__ import annotations

import functools

import pytest

from fastrms.tools.bench import models as M
from fastrms.tools.bench import precision as P


@functools.lru_cache(maxsize=1)
def _values(model: str):
    return P.values_for(M.MODELS[model]())


def test_precision(benchmark, record, precision_case):
    model, name = precision_case
    variant = P.PRECISION_VARIANTS[name]
    why = variant.why_not()
    if why:
        pytest.skip(why)
    shapes = M.MODELS[model]()
    values = _values(model)
    runner = variant.build(shapes, values)
    runner.step()
    error = P.first_step_error(variant, values, runner.result())
    assert error <= 1, f"{variant.label}: first step {error:.3g} tolerances from Adam's"
    size = M.model_size(shapes)
    record(f"precision-{model}", name, 0, size=size, state_bytes=P.state_bytes(runner.keep))
    benchmark(runner.step)
