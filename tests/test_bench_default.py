"""bench.speed_default end to end on a tiny DSB-layout set: served and raw rows, Triton stage
statistics, ratios and the written report (a real tritonserver on the default export)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.speed_default import main
from tiny_dsb import split_ids, write_dataset


@pytest.mark.slow
def test_speed_default_measures_served_and_raw_rows(tmp_path: Path, default_repository: Path) -> None:
    data = tmp_path / "dsb"
    write_dataset(data, split_ids(2, "val"), size=(200, 240))
    out = tmp_path / "out"
    argv = ["--roi", str(default_repository), "--full", str(default_repository), "--data", str(data),
            "--out", str(out), "--skip", "full,raw_full"]
    assert main(argv) == 0
    result = json.loads((out / "speed_default.json").read_text())
    assert set(result["methods"]) == {"roi", "raw_roi", "classical"} and result["images"] == 2
    served, raw = result["methods"]["roi"], result["methods"]["raw_roi"]
    for method in (served, raw):
        assert method["images"] == 2 and 0.0 <= method["f1_mean"] <= 1.0 and method["seconds_per_image"] > 0
        assert method["stages"]["encoder"]["calls"] >= 2  # at least one tile per image
    assert served["f1_mean"] == pytest.approx(raw["f1_mean"], abs=1e-9)  # same steps, same ONNX files
    assert 0.0 <= served["stages"]["pipeline"]["bls_overhead"] < 1.0
    assert result["ratios"]["encoder_served_over_raw_roi"] > 0 and "full_over_roi_per_image" not in result["ratios"]
    assert result["machine"]["git_commit"] and "| served, decoder context roi (default) |" in (out / "speed_default.md").read_text()


def test_unknown_skip_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    assert main(["--roi", "a", "--full", "b", "--data", str(tmp_path), "--skip", "nope"]) != 0
    assert "--skip: unknown methods ['nope']" in capsys.readouterr().err
