"""The default model end to end on real data: `export` (no arguments) -> real tritonserver ->
`segment` CLI on DSB2018 validation images -> F1 against the ground-truth labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from cellsam_triton.cli import main as cli
from cellsam_triton.client.metrics import score_image
from cellsam_triton.server import EmbeddedServer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018"
IMAGES = 6
MIN_MEAN_F1 = 0.6  # a floor for "finds real cells"; bench-accuracy measures the model properly


def test_default_model_segments_real_nuclei(default_server: EmbeddedServer, tmp_path: Path) -> None:
    from cellsam_triton.datasets import load_manifest, load_sample, split_of

    records = [r for r in load_manifest(DATA) if split_of(r.id) == "val"][:IMAGES]
    truths = {}
    for record in records:
        image, labels = load_sample(DATA, record.id)
        tifffile.imwrite(tmp_path / f"{record.id}.tif", image)
        truths[record.id] = labels
    out = tmp_path / "out"
    code = cli(["segment", *(str(tmp_path / f"{i}.tif") for i in truths), "--out", str(out),
                "--url", default_server.grpc_url, "--overlay"])
    assert code == 0
    f1 = []
    for image_id, truth in truths.items():
        predicted = tifffile.imread(out / f"{image_id}_labels.tif")
        assert predicted.shape == truth.shape
        assert (out / f"{image_id}_overlay.png").is_file()
        f1.append(score_image(truth, predicted).f1)
    assert np.mean(f1) >= MIN_MEAN_F1, f1


SMALL_CELLS = "094afe3675"  # a validation image whose nuclei are ~10 px wide


def test_auto_scale_enlarges_images_of_small_cells_and_helps(default_server: EmbeddedServer) -> None:
    from cellsam_triton.client.api import Segmenter
    from cellsam_triton.client.autoscale import median_cell_size, tile_snapped_factor
    from cellsam_triton.client.types import SegmentOptions
    from cellsam_triton.contracts import LITE
    from cellsam_triton.datasets import load_manifest, load_sample

    (record,) = [r for r in load_manifest(DATA) if r.id.startswith(SMALL_CELLS)]
    image, truth = load_sample(DATA, record.id)
    with Segmenter(default_server.grpc_url) as segmenter:
        native = segmenter.segment(image, options=SegmentOptions(scale=1.0))
        auto = segmenter.segment(image)
        factor = tile_snapped_factor(image.shape[:2], LITE.auto_scale_min_factor, LITE.auto_scale_factor, LITE)
        enlarged = segmenter.segment(image, options=SegmentOptions(scale=factor))
    assert factor == 1.75  # 256x256 -> 448x448, 4 tiles (2x would need 9)
    assert median_cell_size(native.cells) < LITE.auto_scale_below
    assert auto.labels.shape == truth.shape
    assert np.array_equal(auto.labels, enlarged.labels)  # auto chose the tile-snapped enlargement
    # measured 0.734 -> 0.769 with the pixel-branch detector, which finds more of these small nuclei natively
    assert score_image(truth, auto.labels).f1 > score_image(truth, native.labels).f1 + 0.02


def test_bench_accuracy_runs_an_earlier_export_beside_in_one_run(default_server: EmbeddedServer, tmp_path: Path) -> None:
    """`make bench-accuracy --before REPO`: the earlier export gets its own server and row; with the
    same repository on both sides its accuracy is the current model's. ``--grid`` adds grid-mode rows,
    ``--tta`` a row with test-time flips."""
    import json

    from bench.accuracy import main as bench_accuracy

    repository = Path(default_server.repository)
    out = tmp_path / "bench"
    assert bench_accuracy(["--url", default_server.grpc_url, "--data", str(DATA), "--limit", "1", "--out", str(out),
                           "--before", str(repository), "--grid", "4", "--tta", "2"]) == 0
    methods = json.loads((out / "accuracy.json").read_text())["methods"]
    assert len(methods) == 6
    (flips,) = [m for name, m in methods.items() if name.endswith("(detector boxes, --tta 2)")]
    assert 0.0 <= flips["f1_mean"] <= 1.0 and flips["seconds_per_image"] > 0
    (grid,) = [m for name, m in methods.items() if "(grid 4x4, no detector)" in name]
    assert 0.0 <= grid["f1_mean"] <= 1.0 and grid["seconds_per_image"] > 0
    (now,) = [m for name, m in methods.items() if name.endswith("(detector boxes)") and "before" not in name]
    (before,) = [m for name, m in methods.items() if "before" in name]
    assert before["f1_mean"] == now["f1_mean"] and before["seconds_per_image"] > 0
    assert "before" in (out / "accuracy.md").read_text()
