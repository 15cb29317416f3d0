"""One step over a model's parameter tensors: fastrms's grouped step against its per-array
calls, torch.optim fused and foreach, and the per-tensor and flat same-pattern ceilings.

The MLP and ``gpt2-tiny`` always; ResNet-50 and GPT-2 small with ``--bench-large``.
"""

from __future__ import annotations

import functools

import pytest

from fastrms.tools.bench import cases
from fastrms.tools.bench import models as M


@functools.lru_cache(maxsize=1)
def _model(model: str, algo: str):
    tensors = M.model_arrays(M.MODELS[model]())
    return tensors, M.model_reference(cases.ALGOS[algo], tensors)


def test_model(benchmark, record, threads, model_case):
    model, algo_name, variant = model_case
    algo = cases.ALGOS[algo_name]
    tensors, expected = _model(model, algo_name)
    fresh = M.fresh_copies(tensors)
    if variant in M.CEILINGS:
        runner = M.model_ceiling(algo, fresh, flat=variant == "ceiling-flat")
    else:
        v = M.MODEL_VARIANTS[variant]
        why = v.why_not(algo)
        if why:
            pytest.skip(why)
        runner = v.build(algo, fresh, threads)
        runner.step()
        problem = M.model_check(v, runner.result(), expected)
        assert problem is None, f"{v.label}, {model}: {problem}"
    size = M.model_size(M.MODELS[model]())
    group = f"{model}-{algo_name}"
    record(group, variant, algo.bytes_per_element() * size, tensors=len(tensors), size=size)
    benchmark(runner.step)
