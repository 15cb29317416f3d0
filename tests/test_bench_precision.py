"""``fastrms bench --precision``: its rows, its bounds and its arguments, on one small array."""

from __future__ import annotations

import argparse

import pytest

from fastrms.tools.bench import command
from fastrms.tools.bench import precision as P
from fastrms.tools.bench import precision_bounds as B

pytest.importorskip("torch", reason="the baseline is torch's fused Adam")

NAMES = (P.BASELINE, "fastrms-f32", "fastrms-f32-bf16state", "fastrms-f32-int8state")


@pytest.fixture(scope="module")
def result(monkeypatch_module):
    monkeypatch_module.setattr(B, "COMPUTE_REPS", 3)
    monkeypatch_module.setattr(B, "IN_CACHE", 8192)  # int8 state needs >= 4096 elements
    return P.measure_precision("8192", NAMES, repeat=2)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_rows_and_bounds(result):
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == set(NAMES) and result["size"] == 8192 and result["tensors"] == 1
    assert "bound_by" not in rows[P.BASELINE]  # torch's row has no fastrms kernel to bound
    for name in NAMES[1:]:
        r = rows[name]
        assert r["first_step_error"] <= 1
        assert r["compute_floor_s"] > 0 and r["memory_floor_s"] > 0
        floor = max(r["compute_floor_s"], r["memory_floor_s"])
        assert r["bound_by"] == ("compute" if r["compute_floor_s"] >= r["memory_floor_s"]
                                 else "memory")  # fmt: skip
        torch_median = rows[P.BASELINE]["median_s"]
        assert r["bound_x_torch_fused_f32"] == pytest.approx(torch_median / floor)
    # Bytes per parameter: float32 Adam moves 28; bf16 state 20; int8 state about 16.06.
    assert rows["fastrms-f32"]["bytes_per_param"] == pytest.approx(28, abs=0.01)
    assert rows["fastrms-f32-bf16state"]["bytes_per_param"] == pytest.approx(20, abs=0.01)
    assert rows["fastrms-f32-int8state"]["bytes_per_param"] == pytest.approx(16.06, abs=0.02)
    # The memory floors scale with the bytes: the same ceiling, measured once.
    f32, bf16 = rows["fastrms-f32"], rows["fastrms-f32-bf16state"]
    assert bf16["memory_floor_s"] / f32["memory_floor_s"] == pytest.approx(
        bf16["bytes_per_param"] / f32["bytes_per_param"]
    )
    assert result["ceiling"]["gb_per_s"] > 0


def test_report_shows_bounds(result):
    text = P.format_precision(result)
    assert "at best" in text and "bound by" in text and "flat ceiling" in text
    assert "compute" in text or "memory" in text


def test_precision_argument_takes_models_and_sizes():
    assert command._precision_shapes("gpt2-tiny") == "gpt2-tiny"
    assert command._precision_shapes("1e7") == "10000000"
    assert P.shapes_of("1e3") == {"array": (1000,)}
    for bad in ("0", "2.5", "no-such-model"):
        with pytest.raises(argparse.ArgumentTypeError):
            command._precision_shapes(bad)
