"""The GPU check of issue 21 (bench/gpu_check.sh, fastrms.tools.bench.gpu), without a GPU.

Its options are parsed and refused clearly; the torch CUDA variants say why they cannot run on a
machine whose torch has no CUDA; the device-to-device copy ceiling moves the bytes it claims;
the launch counter counts the launches made; and the whole script's smoke run completes under
Numba's CUDA simulator, writing valid JSON with the keys the summary reads. The simulator parts
run in subprocesses (NUMBA_ENABLE_CUDASIM must be set before numba.cuda is imported).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastrms.cli import build_parser
from fastrms.tools.bench import cases, ceilings, command, gpu, variants
from fastrms.tools.bench import gpu_summary as summary_
from fastrms.tools.bench import gpu_workloads as workloads

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _torch_has_cuda() -> bool:
    torch = variants.import_torch()
    return torch is not None and torch.cuda.is_available()


# -- options -----------------------------------------------------------------------------------


def test_bench_takes_the_cuda_torch_variants_on_request_only():
    args = build_parser().parse_args(["bench"])
    assert args.backends == variants.DEFAULT_VARIANTS
    assert not {"torch-cuda-foreach", "torch-cuda-fused"} & set(args.backends)
    assert "cuda" in args.backends  # as before: the fastrms CUDA variant is a default
    args = build_parser().parse_args(["bench", "--backends", "cuda,torch-cuda-fused"])
    assert args.backends == ("cuda", "torch-cuda-fused") and not args.allow_simulator


def test_bench_refuses_an_unknown_backend(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", "--backends", "torch-cuda-fast"])
    assert exc.value.code == 2
    assert "unknown backend 'torch-cuda-fast'" in capsys.readouterr().err


def test_allow_simulator_is_refused_outside_the_simulator(capsys, monkeypatch):
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    args = build_parser().parse_args(["bench", "--allow-simulator", "--sizes", "10"])
    assert command.run(args) == 1
    assert "--allow-simulator: the CUDA simulator is not enabled" in capsys.readouterr().err
    assert variants._SIMULATOR_ALLOWED is False


@pytest.mark.parametrize(
    "argv, message",
    [
        (["warp"], "invalid choice: 'warp'"),
        (["models"], "the following arguments are required: --out"),
        (["models", "--out", ".", "--repeat", "0"], "must be a positive integer, got '0'"),
        (["models", "--out", ".", "--repeat", "two"], "must be a positive integer, got 'two'"),
    ],
)
def test_gpu_phase_options_are_refused_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_smoke_needs_the_simulator_and_out_a_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    assert gpu.main(["versions", "--out", str(tmp_path), "--smoke"]) == 2
    assert "set NUMBA_ENABLE_CUDASIM=1" in capsys.readouterr().err
    assert gpu.main(["versions", "--out", str(tmp_path / "absent")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_script_refuses_unknown_options_and_bad_budgets():
    done = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown option --fast" in done.stderr
    env = dict(os.environ, TOTAL_S="7m")
    done = subprocess.run(["bash", str(SCRIPT), "--smoke"], env=env, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 2 and "TOTAL_S must be seconds, got 7m" in done.stderr


# -- torch on CUDA, where torch has none -------------------------------------------------------


@pytest.mark.skipif(_torch_has_cuda(), reason="torch sees a CUDA device here")
def test_torch_cuda_variants_say_why_not_without_cuda():
    torch = pytest.importorskip("torch")
    algo = cases.ALGOS["adam"]
    for name in variants.TORCH_CUDA_VARIANTS:
        why = variants.VARIANTS[name].unavailable(algo)
        assert why is not None and "sees no CUDA device" in why and torch.__version__ in why
    chosen, skipped = workloads._model_variants(algo)
    assert not set(chosen) & set(workloads.TORCH_CUDA_MODES)
    assert set(workloads.TORCH_CUDA_MODES) <= set(skipped)
    assert all("sees no CUDA device" in skipped[k] for k in workloads.TORCH_CUDA_MODES)


@pytest.mark.skipif(_torch_has_cuda(), reason="torch sees a CUDA device here")
def test_torch_loop_refuses_cuda_without_it():
    pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT))
    try:
        from bench import torch_loop
    finally:
        sys.path.remove(str(ROOT))
    with pytest.raises(ValueError, match="device 'cuda': torch .* sees no CUDA device"):
        torch_loop.step_times("mlp:8-4-2", ["fastrms-adam"], repeats=1, steps=1, device="cuda")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'tpu'"):
        torch_loop.check_device("tpu")
    assert torch_loop.check_device("cpu", ["floor-adam"]) == "cpu"


def test_precision_variants_on_cuda_cover_what_cuda_supports():
    names = set(workloads.CUDA_PRECISION_VARIANTS)
    assert {"fastrms-f32-bf16state", "fastrms-f32-int8state", "fastrms-bf16-bf16state"} <= names
    assert set(workloads.PRECISION_BASELINES.values()) <= names


# -- the copy ceiling's bytes ------------------------------------------------------------------


@pytest.mark.parametrize("algo", list(cases.ALGOS))
def test_copy_ceiling_moves_the_steps_bytes(algo):
    """A step of n elements moves bytes_per_element * n bytes (read + written); the copy that
    bounds it copies half of them: each copied byte is read once and written once."""
    a = cases.ALGOS[algo]
    n = 1000
    moved = a.bytes_per_element() * n
    assert ceilings.copy_bytes(moved) * 2 == moved
    assert ceilings.copy_bytes(moved) == 4 * n * (a.reads + a.writes) // 2


@pytest.mark.parametrize("moved", [0, 1, 7])
def test_copy_bytes_refuses_odd_or_empty(moved):
    with pytest.raises(ValueError, match="even number of bytes"):
        ceilings.copy_bytes(moved)


# -- in the simulator --------------------------------------------------------------------------


def _simulate(code: str, timeout: int = 300) -> str:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.cudasim
def test_launch_counter_and_copy_ceiling_in_the_simulator():
    """The counter counts the probe's launches, one per grouped step of three tensors, one per
    per-array functional call, and nothing once the block is left; the copy ceiling copies
    its source, of half the bytes it is said to move."""
    pytest.importorskip("numba.cuda")
    out = _simulate(
        """
        import numpy as np
        from numba import cuda
        import fastrms
        from fastrms import functional
        from fastrms.tools.bench import ceilings, gpu_device as gpu
        probe = gpu.probe_launches(5)
        assert probe == dict(probe, launched=5, counted=5, ran=True, ok=True), probe
        rng = np.random.default_rng(0)
        params = [cuda.to_device(rng.standard_normal(n, dtype=np.float32)) for n in (5, 70, 3)]
        grads = [cuda.to_device(rng.standard_normal(n, dtype=np.float32)) for n in (5, 70, 3)]
        opt = fastrms.Adam(params, backend="cuda")
        with gpu.counting_launches() as grouped:
            opt.step(grads)
        with gpu.counting_launches() as per_array:
            for p, g in zip(params[:2], grads[:2]):
                functional.sgd(p, g, lr=0.1, step=1, backend="cuda")
        opt.step(grads)  # outside: not counted
        runner = ceilings.cuda_copy_ceiling(2 * 1000)
        src, dst = runner.keep
        runner.step()
        assert src.nbytes == dst.nbytes == 1000
        assert (runner.result()["copy"] == src.copy_to_host()).all()
        print(grouped[0], per_array[0])
        """
    )
    assert out.split() == ["1", "2"]


def _smoke(tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # the script sets it for --smoke
    done = subprocess.run(["bash", str(SCRIPT), "--smoke"], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    return done, out


@pytest.mark.slow  # 75-200 s on 2 busy cores: in the main run, not on the simulator line
@pytest.mark.cudasim
def test_smoke_run_writes_every_phase(tmp_path):
    pytest.importorskip("numba.cuda")
    done, out = _smoke(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["versions.json", "tests.xml", "sweep.json", "models.json",
                            "precision.json", "torch_loop.json", "summary.json",
                            "gpu_check.log"])  # fmt: skip
    assert len(files) <= 8  # the device tool sends back at most 8 files
    docs = {f: json.loads((out / f).read_text()) for f in files if f.endswith(".json")}
    for name in ("versions", "models", "precision", "torch_loop"):
        doc = docs[name + ".json"]
        assert doc["cuda_timing"] == "simulator" and doc["smoke"] and doc["complete"], name
    assert docs["versions.json"]["result"]["launch_counter"]["ok"] is True
    assert docs["sweep.json"]["cuda_timing"] == "simulator"
    algos = sorted(s["algos"][0] for s in docs["sweep.json"]["settings"])
    assert algos == ["adagrad", "adam", "rmsprop"]  # one fastrms bench each
    assert all(s["cuda_timing"] == "simulator" for s in docs["sweep.json"]["settings"])
    sweep = {(c["algo"], c["variant"]) for c in docs["sweep.json"]["cells"]}
    for algo in ("rmsprop", "adam", "adagrad"):
        assert {(algo, "cuda"), (algo, "cuda-ceiling"), (algo, ceilings.COPY)} <= sweep
    runs = docs["models.json"]["result"]["runs"]
    assert [r["algo"] for r in runs] == ["adam", "rmsprop"]
    for r in runs:
        assert r["launches"] == {"per_step": 1, "groups": 1, "per_group": 1.0}
        assert r["checks"]["cuda"]["within_tolerance"]
    rows = {r["variant"] for r in docs["precision.json"]["result"]["rows"]}
    assert {"fastrms-f32", "fastrms-f32-bf16state", "fastrms-f32-int8state"} <= rows
    summary = docs["summary.json"]
    assert summary["simulator"] is True
    assert [p["phase"] for p in summary["phases"]] == [
        "versions", "tests", "sweep", "models", "precision", "torch-loop"
    ]  # fmt: skip
    assert all(p["status"] == "ok" for p in summary["phases"]), summary["phases"]
    assert "launches/group 1" in summary["figures"]["models"]
    # The summary is the last thing printed (the device tool's reply carries the end).
    assert "GPU check summary (SIMULATOR: no figure is a timing)" in done.stdout


# -- the summary -------------------------------------------------------------------------------


def _cell(algo: str, n: int, variant: str, median_s: float, best_s: float) -> dict:
    return {"algo": algo, "n": n, "variant": variant, "median_s": median_s, "best_s": best_s,
            "gbps": 20 * n / (best_s if "ceiling" in variant else median_s) / 1e9}  # fmt: skip


def test_summary_reads_the_sweep_at_its_largest_size():
    cells = [
        _cell("rmsprop", 10**6, "cuda", 1.0, 0.5),  # a smaller size: not the one reported
        _cell("rmsprop", 10**8, "cuda", 2.0, 1.5),
        _cell("rmsprop", 10**8, ceilings.COPY, 2.5, 1.8),
        _cell("rmsprop", 10**8, "torch-cuda-foreach", 7.0, 6.0),
    ]
    (row,) = summary_.sweep_rows({"cells": cells})
    assert row["n"] == 10**8
    assert row["pct_copy"] == pytest.approx(1.8 / 2.0)  # the copy's best over our median
    assert row["x_torch-cuda-foreach"] == pytest.approx(3.5)
    assert row["x_torch-cuda-fused"] is None  # not measured: no figure
    assert row["cuda_gbps"] == pytest.approx(20 * 10**8 / 2.0 / 1e9)


def test_summary_reads_the_scripts_phase_log(tmp_path):
    status = tmp_path / "status.tsv"
    status.write_text("versions\t0\t12\t40\ntests\t124\t110\t110\nsweep\tskip\t0\t140\n")
    rows = summary_._statuses(status)
    assert [(r["phase"], r["status"]) for r in rows] == [
        ("versions", "ok"), ("tests", "timed out"), ("sweep", "skipped")
    ]  # fmt: skip
    result = summary_.summary(tmp_path, status)
    assert result["simulator"] is False and result["figures"]["tests"] == "no junit report"
    assert "tests       timed out" in summary_.format_summary(result)


def test_sweep_parts_merge_into_one_document(tmp_path):
    for algo in ("adam", "rmsprop"):
        part = {"schema": 3, "machine": {"cores": 16}, "settings": {"algos": [algo],
                "cuda_timing": "device"}, "cells": [_cell(algo, 10, "cuda", 1.0, 1.0)],
                "skipped": {"torch-cuda-fused": {"no fused RMSprop": [algo]}},
                "targets": [{"algo": algo}]}  # fmt: skip
        (tmp_path / f"sweep-{algo}.json").write_text(json.dumps(part))
    (tmp_path / "sweep-adagrad.json").write_text('{"cells": [')  # cut short by a timeout
    merged = summary_.merge_sweeps(sorted(tmp_path.glob("sweep-*.json")))
    assert [c["algo"] for c in merged["cells"]] == ["adam", "rmsprop"]
    assert merged["skipped"] == {"torch-cuda-fused": {"no fused RMSprop": ["adam", "rmsprop"]}}
    assert merged["unreadable"] == ["sweep-adagrad.json"]
    assert merged["cuda_timing"] == "device" and merged["machine"] == {"cores": 16}
    assert len(merged["settings"]) == len(merged["targets"]) == 2
