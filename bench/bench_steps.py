"""One optimizer step on one float32 vector, per algorithm, size and variant (and the ceiling).

Parametrized by ``step_case`` in ``conftest.py``; grouped per (algorithm, n).
"""

from __future__ import annotations

import pytest

from fastrms.tools.bench import cases, ceilings, variants


def test_step(benchmark, record, problem, threads, step_case):
    algo, n, variant = step_case
    a = cases.ALGOS[algo]
    start, expected = problem(algo, n)
    if variant == "ceiling":
        runner = ceilings.ceiling(a, cases.copy_arrays(start))
    else:
        v = variants.VARIANTS[variant]
        why = v.unavailable(a)
        if why:
            pytest.skip(why)
        runner = variants.build_checked(v, a, cases.copy_arrays(start), expected, threads)
    record(f"{algo} n={n:.0e}", variant, a.bytes_per_element() * n, algo=algo, n=n)
    with runner.context():
        benchmark(runner.step)
