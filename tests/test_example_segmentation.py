"""End-to-end smoke test of examples/segmentation_25d.py: two tiny training steps, metrics, PNG.

Skipped when the ``examples`` extra (MONAI, matplotlib, tqdm) is not installed.
"""
import importlib.util
import math
import os

import pytest

pytest.importorskip("monai")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "segmentation_25d.py")

TINY = ["--steps", "2", "--volumes", "1", "--val-volumes", "1", "--size", "32", "--depth", "8",
        "--channels", "8", "8", "--hidden", "8", "--batch-size", "4", "--kernel-size", "3",
        "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("segmentation_25d", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("design,strategy", [("salstm", "volume"), ("lstmsa", "unet"), ("lstm_then_sa", "volume")])
def test_trains_evaluates_and_plots(example, tmp_path, capsys, design, strategy):
    result = example.main(TINY + ["--design", design, "--strategy", strategy, "--backend", "reference", "--out", str(tmp_path)])
    assert len(result["losses"]) == 2
    assert all(math.isfinite(v) for v in result["losses"])
    rows = result["metrics"]["per_class"]
    assert [r["class"] for r in rows] == [1, 2]
    assert all(0.0 <= r["dice"] <= 1.0 for r in rows if not math.isnan(r["dice"]))
    out = capsys.readouterr().out
    assert "Dice" in out and "HD95" in out and "mean" in out
    png = result["png"]
    assert os.path.isfile(png) and os.path.getsize(png) > 1000
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(os.path.join(str(tmp_path), f"result_{design}_{strategy}.json"))


def test_compare_backends_skips_or_agrees(example, tmp_path, capsys):
    result = example.main(TINY + ["--compare-backends", "--compare-steps", "2", "--out", str(tmp_path)])["compare"]
    out = capsys.readouterr().out
    if result["skipped"]:
        assert "No fused backend is available" in out
    else:
        assert result["agree"], out
        assert len(result["losses"]["reference"]) == len(result["losses"][result["fused"]]) == 2
