"""Adam over a model's parameter tensors: GPT-2's shapes, per-tensor fastrms against torch.

``gpt2-tiny`` (the same structure, scaled down) always; GPT-2 small with ``--bench-large``.
"""

from __future__ import annotations

import functools
import math

import pytest

from fastrms import benchmarks as B


@functools.lru_cache(maxsize=1)
def _model(model: str):
    tensors = B.model_arrays(B.gpt2_shapes(**B.MODELS[model]))
    return tensors, B.model_reference(tensors)


def test_model(benchmark, record, threads, model_case):
    model, variant = model_case
    tensors, expected = _model(model)
    fresh = {k: {"param": t["param"].copy(), "grad": t["grad"]} for k, t in tensors.items()}
    if variant == "ceiling":
        runner = B.model_ceiling(fresh)
    else:
        v = B.MODEL_VARIANTS[variant]
        why = v.why_not()
        if why:
            pytest.skip(why)
        runner = v.build(fresh, threads)
        runner.step()
        problem = B.model_check(v, runner.result(), expected)
        assert problem is None, f"{v.label}, {model}: {problem}"
    size = sum(math.prod(t["param"].shape) for t in tensors.values())
    record(model, variant, B.MODEL_BYTES_PER_ELEMENT * size, tensors=len(tensors), size=size)
    benchmark(runner.step)
