"""`make bench-clicks` (bench/clicks.py): one short real run on the default export (a real tritonserver),
and its click rule and argument checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.clicks import click_points, main, point_ious
from cellsam_triton.contracts import LITE

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018"


def test_clicks_fall_on_the_most_interior_pixel_of_nuclei_off_the_border() -> None:
    labels = np.zeros((40, 60), np.uint16)
    labels[10:19, 10:19] = 1  # 9 x 9: clicked at its centre
    labels[0:10, 40:50] = 2  # touches the border: skipped
    labels[25:28, 30:33] = 3  # 9 px: too small
    labels[22:36, 40:52] = 4
    clicks = click_points(labels)
    assert [c[0] for c in clicks] == [1, 4] and clicks[0] == (1, 14, 14)
    cells = labels.copy()
    cells[cells == 4] = 0
    cells[22:30, 40:52] = 7  # the top part of nucleus 4: IoU 8 * 12 / (14 * 12)
    assert point_ious(cells, labels, clicks) == [1.0, pytest.approx(8 / 14)]
    cells[14, 14] = 0
    assert point_ious(cells, labels, clicks)[0] == 0.0  # no cell under the click


@pytest.mark.parametrize("tta", ["3", "", "1,x"])
def test_bad_views_are_usage_errors(tta: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--repository", str(tmp_path), "--tta", tta])
    assert info.value.code == 2


def test_short_run_on_the_default_export(default_repository: Path, tmp_path: Path) -> None:
    """One image of each kind, with and without flips: the table adds up and the flips cost one more
    point-decoder call a view (the encoder takes a tile's views in one request)."""
    if not (DATA / "manifest.csv").is_file():
        pytest.skip(f"DSB2018 data not found at {DATA}")
    assert main(["--repository", str(default_repository), "--data", str(DATA), "--tta", "1,2", "--images-per-kind", "1",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "clicks.json").read_text())
    assert [(r["tta"], r["kind"]) for r in result["rows"]] == [(1, "fluorescence"), (1, "stained"), (2, "fluorescence"), (2, "stained")]
    for row in result["rows"]:
        (image,) = row["per_image"]
        assert row["points"] == len(image["ious"]) == 10 and 0 <= row["matched"] <= 10
        assert row["matched"] == sum(v >= 0.5 for v in image["ious"]) and row["ten_cells"] == int(image["cells"] == 10)
    plain, flipped = result["triton"]["1"], result["triton"]["2"]
    assert flipped[LITE.point_decoder_name]["requests"] == 2 * plain[LITE.point_decoder_name]["requests"] > 0
    assert flipped[LITE.encoder_name]["requests"] == plain[LITE.encoder_name]["requests"] > 0
    assert "| 2 | stained | 1 |" in (tmp_path / "clicks.md").read_text()
