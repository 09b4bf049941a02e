"""bench/: the inference benchmark at a tiny size, and run_all's table from given measurements (the
heavy benchmarks themselves do not run here)."""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))  # the bench scripts import one another by name
import inference  # noqa: E402
import pretrain_throughput  # noqa: E402
import run_all  # noqa: E402

NUMBERS = ["size", "width", "params", "flops", "seconds", "flop_s", "matmul_flop_s",
           "floor_seconds", "time_over_floor", "fp32_seconds", "speedup_over_fp32"]


@pytest.fixture(scope="module")
def tiny_inference() -> dict:
    return inference.main(["--size", "32", "--width", "4", "--repeats", "2"])


def test_inference_reports_positive_figures(tiny_inference):
    result = tiny_inference
    assert set(result) == {"precision", *NUMBERS}
    assert result["precision"] in ("bf16", "fp32")
    assert all(result[name] > 0 for name in NUMBERS)
    assert (result["size"], result["width"]) == (32, 4)
    assert result["floor_seconds"] == pytest.approx(result["flops"] / result["matmul_flop_s"])
    assert result["time_over_floor"] == pytest.approx(result["seconds"] / result["floor_seconds"])


def test_table_has_a_row_per_figure(tiny_inference):
    small, large = pretrain_throughput.CASES
    case = {"images_per_s": 10.0, "flop_s": 50e9, "bare_flop_s": 100e9}
    measurements = {
        "shard": {"cores": 2, "shard_img_s_per_core": 20.0, "shard_img_s_all_cores": 36.0,
                  "load_img_s_per_worker": 200.0, "load_aug_img_s_per_worker": 60.0},
        "pretrain": {"matmul_flop_s": {"bf16": 500e9, "fp32": 100e9},
                     pretrain_throughput.key(small, "bf16", 1): case,
                     pretrain_throughput.key(small, "bf16", 2): {
                         "images_per_s": 18.0, "flop_s": 90e9, "bare_flop_s": 100e9},
                     pretrain_throughput.key(large, "bf16", 1): case},
        "inference": {**tiny_inference, "seconds": 2.0, "floor_seconds": 0.5,
                      "fp32_seconds": 4.0},
    }
    rows = run_all.figures(measurements)
    assert [round(r.ratio, 3) for r in rows] == [1.0, 1.8, 3.333, 0.5, 0.1, 0.9, 0.18, 0.5, 0.1,
                                                 1.8, 4.0, 2.0]
    lines = run_all.table(rows).splitlines()
    assert lines[0] == "| figure | measured | reference | ratio |"
    assert len(lines) == 2 + len(rows)
    for row, line in zip(rows, lines[2:]):
        assert line.startswith(f"| {row.name} |") and line.count("|") == 5
    assert lines[2].endswith("| 20.0 img/s | 20.0 img/s | 1.00 |")
    assert "w16 128², 1 rank: CM-UNet / bare UNet | 50.0 GFLOP/s | 100 GFLOP/s | 0.500 |" in lines[5]
    assert "w32 256², 1 rank: CM-UNet / bf16 matmul" in lines[10]
    assert "32² w4" in lines[13]


def test_number_has_three_significant_digits():
    assert [run_all.number(v) for v in (1234.4, 36.0, 2.0, 0.1, 0.000155)] == [
        "1234", "36.0", "2.00", "0.100", "0.000155"]


@pytest.mark.slow
def test_scale_bench_prints_its_table_at_a_tiny_size(capsys):
    """bench/scale.py end to end at 2000 samples (both formats, each rank in its own process)."""
    import scale

    result = scale.main(["--sizes", "2000", "--before", "2000"])
    assert [what for _, what, _, _ in result["rows"]][0] == "index.npz (this version)"
    assert len(result["rows"]) == 3 and all(m["load_s"] > 0 for *_, m in result["rows"])
    assert "| 2e+03 | index.npz (this version) |" in capsys.readouterr().out
