"""Tests of ``fastrms bench`` (fastrms.tools.bench) and its table of cases.

They run the report on tiny sizes with two repetitions: they check its structure and its
arithmetic, not the speed of anything.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

from fastrms.tools.bench import cases, ceilings, command, measure, render, targets, variants
from fastrms.tools.bench import models as M

TORCH = variants.import_torch() is not None
HOST_VARIANTS = "cpu,cpu-1t,numpy,naive" + (",torch-foreach,torch-fused" if TORCH else "")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastrms")
    command.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def bench(*argv: str) -> int:
    """Run ``fastrms bench``; the model workloads only where ``argv`` asks for them."""
    if "--model" not in argv:
        argv = (*argv, "--model", "none")
    args = parse(*argv)
    return args.func(args)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> tuple[dict, str]:
    """One small sweep shared by several tests: (JSON report, text report)."""
    path = tmp_path_factory.mktemp("bench") / "small.json"
    args = parse(
        "--algo", "rmsprop,adam", "--sizes", "1000,70000", "--repeat", "3",
        "--backends", HOST_VARIANTS, "--json", str(path), "--model", "none",
    )  # fmt: skip
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    return json.loads(path.read_text()), out.getvalue()


# -- the command line ---------------------------------------------------------------------------


def test_defaults_are_the_documented_sweep():
    args = parse()
    assert args.algo == ("rmsprop", "adam", "adagrad")
    assert args.sizes == (10**4, 10**5, 10**6, 10**7)
    assert args.backends == variants.DEFAULT_VARIANTS
    assert args.repeat == command.DEFAULT_REPEAT and args.threads is None
    assert args.json is None and args.plot is None and not args.markdown
    assert args.model == ("mlp", "gpt2-tiny") and args.model_algo == ("adam", "rmsprop", "adagrad")


def test_options_parse():
    args = parse("--algo", "all", "--sizes", "5e7,1e4,10000", "--threads", "1", "--model", "all")
    assert args.algo == tuple(cases.ALGOS)
    assert args.sizes == (10**4, 5 * 10**7)
    assert args.threads == 1 and args.model == tuple(M.MODELS)
    assert parse("--model", "none").model == ()
    assert parse("--model", "resnet50", "--model-algo", "adam").model_algo == ("adam",)
    assert parse("--algo", "none").algo == ()
    assert parse("--backends", "cpu, naive").backends == ("cpu", "naive")


@pytest.mark.parametrize(
    "argv",
    [
        ("--algo", "rmsprop,lion"),
        ("--sizes", "1e4,abc"),
        ("--sizes", "0"),
        ("--sizes", "1.5"),
        ("--backends", "cpu,jax"),
        ("--threads", "0"),
        ("--repeat", "-1"),
        ("--model", "gpt3"),
        ("--model-algo", "adamax"),
    ],
)
def test_bad_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert f"argument {argv[0]}" in capsys.readouterr().err


# -- the JSON report -----------------------------------------------------------------------------


def test_json_has_machine_info(small_run):
    data, _ = small_run
    assert data["schema"] == render.SCHEMA
    m = data["machine"]
    assert isinstance(m["cpu_model"], str) and m["cpu_model"]
    assert m["cores"] >= 1 and m["threads"] == numba.config.NUMBA_NUM_THREADS
    assert m["numpy"] == np.__version__ and m["numba"] == numba.__version__
    assert m["python"].count(".") == 2 and m["timestamp"].startswith("20")
    assert set(m["backends"]) == {"cuda", "cpu", "numpy"}
    assert data["settings"]["sizes"] == [1000, 70000] and data["settings"]["repeat"] == 3


def test_json_cells_are_consistent(small_run):
    data, _ = small_run
    cells = data["cells"]
    expected_variants = {*HOST_VARIANTS.split(","), "ceiling"}
    for algo in ("rmsprop", "adam"):
        for n in (1000, 70000):
            got = {c["variant"] for c in cells if c["algo"] == algo and c["n"] == n}
            if algo == "rmsprop":  # torch has no fused RMSprop
                assert got == expected_variants - {"torch-fused"}
            else:
                assert got == expected_variants
    for c in cells:
        assert c["bytes_per_element"] == cases.ALGOS[c["algo"]].bytes_per_element()
        assert len(c["times_s"]) == 3 and all(t > 0 for t in c["times_s"])
        assert c["inner"] >= 1
        assert c["median_s"] == pytest.approx(np.median(c["times_s"]))
        assert c["best_s"] == pytest.approx(min(c["times_s"]))
        # A ceiling's figure is its best repetition; a variant's, its median.
        figure = c["best_s"] if c["variant"] == "ceiling" else c["median_s"]
        assert c["gbps"] == pytest.approx(c["bytes_per_element"] * c["n"] / figure / 1e9)
        assert c["check"] == ("n/a" if c["variant"] == "ceiling" else "passed")


def test_json_ratios_are_ratios_of_medians(small_run):
    data, _ = small_run
    group = {c["variant"]: c for c in data["cells"] if c["algo"] == "adam" and c["n"] == 70000}
    cpu, ceiling, naive = group["cpu"], group["ceiling"], group["naive"]
    assert cpu["pct_ceiling"] == pytest.approx(ceiling["best_s"] / cpu["median_s"])
    assert cpu["speedup_naive"] == pytest.approx(naive["median_s"] / cpu["median_s"])
    assert ceiling["pct_ceiling"] is None
    if TORCH:
        torch = min((group[t] for t in variants.TORCH_VARIANTS), key=lambda c: c["median_s"])
        assert cpu["torch_variant"] == torch["variant"]
        assert cpu["speedup_torch"] == pytest.approx(torch["median_s"] / cpu["median_s"])


def test_text_report(small_run):
    _, text = small_run
    assert "RMSProp, n = 1,000 (20 B/element)" in text
    assert "Adam, n = 70,000 (28 B/element)" in text
    assert "same-pattern ceiling" in text
    assert "Targets" in text
    # The per-call target (n = 1e5) is not in this sweep: reported as not measured.
    assert "not measured" in text


# -- Markdown and plot ---------------------------------------------------------------------------


def test_markdown_tables(capsys):
    assert bench("--algo", "adagrad", "--sizes", "500,2000", "--repeat", "2",
                 "--backends", "cpu,naive", "--markdown") == 0  # fmt: skip
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("|")]
    table = rows[: rows.index(next(r for r in rows if r.startswith("| case")))]
    header, align, *body = table
    columns = header.count("|")
    assert all(r.count("|") == columns for r in table)
    assert header.split("|")[1].strip() == "n" and "GB/s" in header and "% ceiling" in header
    assert set(align.replace("|", "").replace(":", "")) == {"-"}
    assert len(body) == 2 * 3  # two sizes x (cpu, naive, ceiling)
    assert {r.split("|")[1].strip() for r in body} == {"500", "2,000"}
    assert "**AdaGrad** (20 B/element)" in out


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    assert bench("--algo", "rmsprop,sgd-momentum", "--sizes", "500,5000", "--repeat", "2",
                 "--backends", "cpu,naive", "--plot", str(path)) == 0  # fmt: skip
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
    assert width > 400 and height > 200


def test_plot_without_matplotlib_says_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    path = tmp_path / "bench.png"
    assert bench("--sizes", "100", "--plot", str(path)) == 1
    err = capsys.readouterr().err
    assert "pip install 'fastrms[plot]'" in err
    assert not path.exists()


# -- correctness checks ----------------------------------------------------------------------------


def _wrong_build(algo, arrays, threads):
    """fastrms cpu with a learning rate 1% too high: fast, and wrong."""
    wrong = dataclasses.replace(algo, options={**algo.options, "lr": algo.options["lr"] * 1.01})
    return variants.Runner(wrong.fastrms_step(arrays, "cpu"), lambda: arrays)


def test_a_wrong_variant_is_caught(monkeypatch, capsys):
    wrong = dataclasses.replace(variants.VARIANTS["cpu"], build=_wrong_build)
    monkeypatch.setitem(variants.VARIANTS, "cpu", wrong)
    assert bench("--algo", "adam", "--sizes", "1000", "--backends", "cpu,naive") == 1
    err = capsys.readouterr().err
    assert "wrong result" in err and "fastrms cpu" in err and "param differs" in err


@pytest.mark.parametrize("exact", [True, False])
def test_check_rejects_a_small_error(exact):
    algo = cases.ALGOS["rmsprop"]
    start = cases.make_arrays(algo, 5000)
    expected = cases.reference_result(algo, start)
    assert variants.check(cases.copy_arrays(expected), expected, exact) is None
    nudged = cases.copy_arrays(expected)
    nudged["square_avg"][1234] *= np.float32(1 + (1e-7 if exact else 1e-4))
    problem = variants.check(nudged, expected, exact)
    assert problem and "square_avg" in problem and "[1234]" in problem


@pytest.mark.parametrize("algo", list(cases.ALGOS))
def test_every_variant_passes_its_check(algo):
    a = cases.ALGOS[algo]
    start = cases.make_arrays(a, 3000)
    expected = cases.reference_result(a, start)
    for v in variants.VARIANTS.values():
        if v.unavailable(a) is None:
            variants.build_checked(v, a, cases.copy_arrays(start), expected, threads=1)
    assert start.keys() == {"param", "grad", *a.state}


def test_one_thread_variant_runs_on_one_thread():
    a = cases.ALGOS["sgd-momentum"]
    runner = variants.VARIANTS["cpu-1t"].build(a, cases.make_arrays(a, 100), 2)
    before = numba.get_num_threads()
    with runner.context():
        assert numba.get_num_threads() == 1
    assert numba.get_num_threads() == before


# -- the ceiling and the cases ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [100, 1 << 17])
def test_ceiling_reads_and_writes_back_every_array(n):
    a = cases.ALGOS["amsgrad"]
    arrays = cases.make_arrays(a, n)
    before = cases.copy_arrays(arrays)
    runner = ceilings.ceiling(a, arrays)
    runner.step()
    for k in arrays:
        np.testing.assert_array_equal(arrays[k], before[k])
    source = ceilings._pattern_lines(a.reads, a.writes, "")
    assert all(f"x{j} = a{j}[i]" in source for j in range(a.reads))
    assert source.count("] = ") == a.writes


@pytest.mark.parametrize("algo", ["rmsprop", "adam", "amsgrad"])
def test_ceiling_loops_take_the_kernels_options_and_vectorize(algo):
    """A ceiling bounds the kernels only if it is compiled as they are: the same options, and
    its float32 loop vectorized (as tests/test_kernels.py checks for the kernels)."""
    from numba import njit, types

    from fastrms.kernels._options import KERNEL_OPTIONS

    a = cases.ALGOS[algo]
    parallel, serial = ceilings.ceiling_loops(a.reads, a.writes)
    for loop in (serial, parallel):
        if hasattr(loop, "targetoptions"):
            for option, value in KERNEL_OPTIONS.items():
                assert loop.targetoptions.get(option, False) == value, (option, loop)
    fresh = njit(**KERNEL_OPTIONS)(serial.py_func)
    array = types.Array(types.float32, 1, "C")
    sig = (types.int64, types.float32, *[array] * a.reads)
    fresh.compile(sig)
    ir = fresh.inspect_llvm(sig)
    assert re.search(r"<\d+ x float>", ir), "the ceiling loop was not vectorized"
    assert "double" not in "\n".join(
        line for line in ir.splitlines() if re.search(r"\b(fadd|fmul)\b", line)
    ), "the float32 ceiling does float64 arithmetic"


def test_a_variant_faster_than_its_ceiling_is_said_in_words():
    cells = measure.summarize(
        [
            _cell("adam", 10**7, "cpu", 1.0),
            measure.Cell("adam", 10**7, "ceiling", "same-pattern ceiling", 28, 1, [1.4, 1.2, 1.3]),
            _cell("adam", 10**7, "naive", 10.0),
        ]
    )
    by = {c.variant: c for c in cells}
    assert by["ceiling"].best_s == 1.2 and by["cpu"].pct_ceiling == pytest.approx(1.2)
    row = render._row(by["cpu"])
    assert "above it" in row and not any(cell.endswith("%") and "120" in cell for cell in row)
    assert render._row(by["ceiling"])[1] == "1200 best"
    [target] = [t for t in targets.evaluate_targets(cells) if t["metric"] == "ceiling"]
    [line] = render._target_lines([target], markdown=False)
    assert "faster than the ceiling (1.20x its best): not bounded" in line and "120%" not in line
    assert render.pct_text(0.87) == "87% of its ceiling"


def test_model_ceilings_are_named_for_what_they_bound():
    assert "per tensor" in M.CEILINGS["ceiling"] and "all tensors" in M.CEILINGS["ceiling-flat"]


def test_bytes_per_element_match_the_notes():
    bpe = {name: a.bytes_per_element() for name, a in cases.ALGOS.items()}
    assert bpe == {
        "rmsprop": 20, "rmsprop-cm": 36, "adagrad": 20, "adam": 28, "amsgrad": 36,
        "sgd-momentum": 20,
    }  # fmt: skip


def test_model_shapes():
    gpt2 = M.gpt2_shapes()
    assert len(gpt2) == 148 and M.model_size(gpt2) == 124_439_808
    assert gpt2["wte"] == (50257, 768) and gpt2["h.11.mlp.c_proj.weight"] == (3072, 768)
    resnet = M.resnet50_shapes()  # torchvision's resnet50: 161 tensors, 25,557,032 parameters
    assert len(resnet) == 161 and M.model_size(resnet) == 25_557_032
    assert resnet["layer4.2.conv3.weight"] == (2048, 512, 1, 1) and resnet["fc.bias"] == (1000,)
    mlp = M.mlp_shapes()
    assert len(mlp) == 8 and M.model_size(mlp) == 150_602
    assert len(M.MODELS["gpt2-tiny"]()) == 28


@pytest.mark.parametrize("algo", ["adam", "rmsprop"])
def test_model_workload(tmp_path, capsys, algo):
    path = tmp_path / "model.json"
    backends = "cpu,torch-fused,torch-foreach" if TORCH else "cpu"
    assert bench("--algo", "none", "--model", "gpt2-tiny", "--model-algo", algo, "--repeat", "2",
                 "--backends", backends, "--json", str(path)) == 0  # fmt: skip
    data = json.loads(path.read_text())
    (model,) = data["models"]
    shapes = M.MODELS["gpt2-tiny"]()
    assert model["tensors"] == len(shapes) == 28 and model["algo"] == algo
    assert model["parameters"] == M.model_size(shapes)
    cells = {c["variant"]: c for c in model["cells"]}
    expected = {"cpu", "cpu-per-array", "ceiling", "ceiling-flat"}
    if TORCH:
        expected |= {"torch-foreach"} | ({"torch-fused"} if algo == "adam" else set())
    assert set(cells) == expected
    assert all(c["median_s"] > 0 and c["check"] in ("passed", "n/a") for c in cells.values())
    ratio = cells["ceiling-flat"]["best_s"] / cells["cpu"]["median_s"]
    assert model["pct_flat_ceiling"] == pytest.approx(ratio)
    assert cells["cpu"]["pct_ceiling"] == pytest.approx(ratio)
    if TORCH:
        ratio = cells["torch-foreach"]["median_s"] / cells["cpu"]["median_s"]
        assert model["vs_torch_foreach"] == pytest.approx(ratio)
        assert "torch foreach" in capsys.readouterr().out
    if algo == "rmsprop":
        assert model["vs_torch_fused"] is None and "torch-fused" in model["skipped"]
    overhead = data["overhead"]
    counts = [r["tensors"] for r in overhead["rows"]]
    assert counts[: len(M.OVERHEAD_COUNTS)] == list(M.OVERHEAD_COUNTS)
    assert all(r["step_s"] > 0 and r["kernels_s"] > 0 for r in overhead["rows"])
    assert set(overhead["fit_us"]) == {"base", "per_tensor"}


# -- targets ---------------------------------------------------------------------------------------


def _cell(algo, n, variant, median):
    return measure.Cell(
        algo, n, variant, variant, cases.ALGOS[algo].bytes_per_element(), 1, [median]
    )


def test_targets_met_and_missed():
    big = 10**7
    cells = measure.summarize(
        [
            _cell("rmsprop", big, "cpu", 1.0),
            _cell("rmsprop", big, "naive", 12.0),  # 12x: met
            _cell("rmsprop", big, "torch-foreach", 3.0),  # 3x < 4x: missed
            _cell("rmsprop", big, "ceiling", 0.8),  # 80% < 85%: missed
        ]
    )
    results = {t["target"]: t for t in targets.evaluate_targets(cells)}
    assert results[">= 10x naive NumPy"]["met"] is True
    assert results[">= 10x naive NumPy"]["value"] == pytest.approx(12.0)
    assert results[">= 4x torch RMSprop(foreach=True)"]["met"] is False
    assert results[">= 85% of the same-pattern ceiling"]["value"] == pytest.approx(0.8)
    assert results[">= 85% of the same-pattern ceiling"]["met"] is False
    # Targets for algorithms that were not measured are not listed.
    assert all(t["algo"] == "rmsprop" for t in results.values())


# -- the CUDA variant, in the simulator ------------------------------------------------------------


@pytest.mark.cudasim
def test_cuda_variant_in_the_simulator():
    """The CUDA variant and ceiling are correct (the simulator cannot time them)."""
    pytest.importorskip("numba.cuda")
    code = textwrap.dedent(
        """
        from fastrms.tools.bench import cases, ceilings, variants
        assert variants.VARIANTS["cuda"].unavailable(cases.ALGOS["adam"])  # never benchmarked
        for name in ("rmsprop", "amsgrad"):
            a = cases.ALGOS[name]
            start = cases.make_arrays(a, 64)
            expected = cases.reference_result(a, start)
            cuda = variants.VARIANTS["cuda"]
            variants.build_checked(cuda, a, cases.copy_arrays(start), expected, 1)
            ceilings.cuda_ceiling(a, start).step()
        print("ok")
        """
    )
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
