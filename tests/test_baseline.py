"""Classical baseline (bench/baseline.py) and the accuracy report writers (bench/accuracy.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.accuracy import COLUMNS, bar_plot, markdown_table
from bench.baseline import segment_classical
from cellsam_triton.client.evaluate import summary
from cellsam_triton.client.metrics import ImageScore, score_image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "dsb2018"


def disks(centres, radii, shape=(128, 128)) -> np.ndarray:
    """Label image of disks (later disks on top of earlier ones)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.uint16)
    for k, ((cy, cx), r) in enumerate(zip(centres, radii), start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    return labels


def render(labels: np.ndarray, dark: bool = False, colour: bool = False, seed: int = 0) -> np.ndarray:
    """uint8 HxWx3 image of the labels: bright nuclei on dark, or dark nuclei on bright."""
    rng = np.random.default_rng(seed)
    value = np.where(labels > 0, 200.0, 30.0) + rng.normal(0, 8, labels.shape)
    if dark:
        value = 255.0 - value
    image = np.repeat(value[..., None], 3, axis=2)
    if colour:
        image[..., 1] *= 0.7  # a purple-ish stain: channels differ
    return np.clip(image, 0, 255).astype(np.uint8)


def grid_disks():
    centres = [(20 + 28 * i, 20 + 28 * j) for i in range(4) for j in range(4)]
    radii = [7 + (i % 3) for i in range(len(centres))]
    return disks(centres, radii)


@pytest.mark.parametrize("dark,colour", [(False, False), (True, False), (True, True)])
def test_finds_separate_blobs_of_either_polarity(dark, colour):
    truth = grid_disks()
    labels = segment_classical(render(truth, dark, colour))
    assert labels.dtype == np.uint32 and labels.shape == truth.shape
    assert np.array_equal(np.unique(labels), np.arange(labels.max() + 1))  # sequential
    s = score_image(truth, labels)
    assert (s.tp, s.fp, s.fn) == (16, 0, 0)
    assert s.mean_iou > 0.8


def test_splits_touching_nuclei():
    truth = disks([(40, 40), (40, 62), (90, 90)], [12, 12, 10])  # first two overlap a little
    labels = segment_classical(render(truth))
    s = score_image(truth, labels)
    assert labels.max() == 3 and s.tp == 3


def test_blank_and_grey_inputs():
    assert segment_classical(np.full((64, 64, 3), 80, np.uint8)).max() == 0
    truth = grid_disks()
    grey2d = render(truth)[..., 0]
    assert score_image(truth, segment_classical(grey2d)).tp == 16


@pytest.mark.parametrize("kind", ["fluorescence", "stained"])
def test_finds_cells_on_real_images(kind):
    if not (DATA / "manifest.csv").is_file():
        pytest.skip(f"DSB2018 data not found at {DATA.resolve()}")
    from cellsam_triton.datasets import load_manifest, load_sample

    record = next(
        r for r in load_manifest(DATA) if r.kind == kind and r.split == "train" and r.height * r.width <= 360 * 360
    )
    image, truth = load_sample(DATA, record.id)
    labels = segment_classical(image)
    s = score_image(truth, labels)
    assert 0.5 * record.objects <= labels.max() <= 1.5 * record.objects
    assert s.f1 > 0.5, f"{kind} image {record.id}: F1 {s.f1:.3f}"


def test_accuracy_report_table_and_plot(tmp_path):
    scores = {
        "model (detector boxes)": [ImageScore(9, 1, 1, 8.0, kind="fluorescence", seconds=0.5), ImageScore(3, 1, 2, 2.0, kind="stained", seconds=0.7)],
        "classical (Otsu + watershed)": [ImageScore(5, 5, 5, 3.0, kind="fluorescence", seconds=0.1), ImageScore(0, 2, 5, 0.0, kind="stained", seconds=0.1)],
    }
    result = {"split": "val", "images": 2, "methods": {k: summary(v) for k, v in scores.items()}}
    table = markdown_table(result).splitlines()
    assert len(table) == 2 + len(scores)
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[1 : 1 + len(COLUMNS)] == [title for title, _ in COLUMNS]
    row = [c.strip() for c in table[3].strip("|").split("|")]
    assert row[0] == "classical (Otsu + watershed)"
    assert float(row[1]) == pytest.approx(np.mean([5 / 10, 0.0]), abs=1e-3)
    assert "stained 0.000 (1)" in row[len(COLUMNS) + 1] and row[-1] == "0.10"
    png = tmp_path / "accuracy.png"
    bar_plot(result, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_accuracy_grid_option_parses_densities() -> None:
    import argparse

    from bench.accuracy import grid_sides

    assert grid_sides("16") == (16,) and grid_sides("16,32") == (16, 32) and grid_sides("none") == ()
    for bad in ("0", "x", "16,,32", "200"):
        with pytest.raises(argparse.ArgumentTypeError):
            grid_sides(bad)
