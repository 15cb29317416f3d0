"""pytest-benchmark suite: fastrms's fused steps against naive NumPy, torch.optim and a ceiling.

The cases come from :mod:`fastrms.tools.bench`, the table ``fastrms bench`` also uses. Every
benchmarked variant first takes one step and is checked against the NumPy reference, so a fast
but wrong variant fails its test.

Timings::

    pytest bench --benchmark-enable --benchmark-only [--bench-large]

In an ordinary test run (``--benchmark-disable``), each case runs once: a smoke test.
Results are grouped per (algorithm, n); the summary adds GB/s and % of the same-pattern
ceiling per group. ``--bench-large`` adds n = 5e7 (about 1.5 GB), ResNet-50 and GPT-2 small
(about 6 GB).
"""

from __future__ import annotations

import functools
from collections import defaultdict

import pytest

from fastrms.tools.bench import models as M
from fastrms.tools.bench.cases import ALGOS, LARGE_SIZES, SIZES, make_arrays, reference_result
from fastrms.tools.bench.variants import VARIANTS, thread_count

#: (group, variant) -> (median seconds, bytes moved per step); filled when timings are taken.
MEDIANS: dict[tuple[str, str], tuple[float, int]] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("fastrms bench").addoption(
        "--bench-large",
        action="store_true",
        help="also benchmark n = 5e7 and GPT-2 small (several GB of memory)",
    )


def sizes(config: pytest.Config) -> tuple[int, ...]:
    return SIZES + (LARGE_SIZES if config.getoption("--bench-large") else ())


def models(config: pytest.Config) -> tuple[str, ...]:
    return tuple(M.MODELS) if config.getoption("--bench-large") else M.SMALL_MODELS


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``step_case`` (algo, n, variant) and ``model_case`` (model, algo, variant).

    Steps are ordered algorithm, then size, then variant, so each problem is built once.
    """
    config = metafunc.config
    if "step_case" in metafunc.fixturenames:
        cases = [(a, n, v) for a in ALGOS for n in sizes(config) for v in (*VARIANTS, "ceiling")]
        ids = [f"{a}-{n:.0e}-{v}" for a, n, v in cases]
        metafunc.parametrize("step_case", cases, ids=ids)
    if "model_case" in metafunc.fixturenames:
        cases = [
            (m, a, v)
            for m in models(config)
            for a in M.MODEL_ALGOS
            for v in (*M.MODEL_VARIANTS, *M.CEILINGS)
        ]
        metafunc.parametrize("model_case", cases, ids=[f"{m}-{a}-{v}" for m, a, v in cases])
    if "precision_case" in metafunc.fixturenames:
        from fastrms.tools.bench.precision import PRECISION_VARIANTS

        chosen = ("gpt2-tiny", "gpt2") if config.getoption("--bench-large") else ("gpt2-tiny",)
        cases = [(m, v) for m in chosen for v in PRECISION_VARIANTS]
        metafunc.parametrize("precision_case", cases, ids=[f"{m}-{v}" for m, v in cases])


@pytest.fixture(scope="session")
def threads() -> int:
    """All Numba threads, for fastrms cpu and torch alike, for the whole session."""
    import numba

    return numba.config.NUMBA_NUM_THREADS


@pytest.fixture(scope="session", autouse=True)
def _thread_count(threads: int):
    with thread_count(threads):
        yield


@functools.lru_cache(maxsize=1)
def _problem(algo: str, n: int):
    """The starting arrays and the reference result; cached for one (algo, n) at a time."""
    start = make_arrays(ALGOS[algo], n)
    return start, reference_result(ALGOS[algo], start)


@pytest.fixture
def problem():
    """``problem(algo, n) -> (start, expected)``; ``start`` must not be modified."""
    return _problem


@pytest.fixture
def record(benchmark):
    """``record(group, variant, bytes_per_step, **info)``: label the benchmark with its case.

    After the test, its median (when timings were taken) is kept for the summary.
    """
    labels: list[tuple[str, str, int]] = []

    def label(group: str, variant: str, bytes_per_step: int, **info) -> None:
        benchmark.group = group
        benchmark.extra_info.update(variant=variant, bytes_per_step=bytes_per_step, **info)
        labels.append((group, variant, bytes_per_step))

    yield label
    if benchmark.stats is not None and labels:
        group, variant, nbytes = labels[-1]
        MEDIANS[group, variant] = (benchmark.stats.stats.median, nbytes)


def _summary() -> dict[str, dict[str, tuple[float, float | None]]]:
    """Per group, per variant: GB/s and the fraction of the group's ceiling."""
    groups: dict[str, dict[str, tuple[float, int]]] = defaultdict(dict)
    for (group, variant), value in MEDIANS.items():
        groups[group][variant] = value
    out = {}
    for group, cells in groups.items():
        ceiling = cells.get("ceiling")
        out[group] = {
            v: (nbytes / t / 1e9, ceiling[0] / t if ceiling else None)
            for v, (t, nbytes) in cells.items()
        }
    return out


def pytest_benchmark_update_json(config, benchmarks, output_json) -> None:
    summary = _summary()
    for b in output_json["benchmarks"]:
        cell = summary.get(b["group"], {}).get(b["extra_info"].get("variant"))
        if cell:
            b["extra_info"]["gbps"], b["extra_info"]["fraction_of_ceiling"] = cell


def pytest_terminal_summary(terminalreporter) -> None:
    summary = _summary()
    if not summary:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fastrms: GB/s and % of the same-pattern ceiling (medians)")
    for group, cells in summary.items():
        parts = [
            f"{v} {gbps:.1f} GB/s" + ("" if frac is None else f" ({frac * 100:.0f}%)")
            for v, (gbps, frac) in cells.items()
        ]
        write(f"{group}: " + ", ".join(parts))
