"""Plain `segment` of a 4096 x 4096 image (no --slide): it takes the slide path by itself, with a
tile progress bar and bounded client memory (peak RSS of the client process), and gives the cells
of the whole-image path at native resolution. Real DSB2018 images on the default model."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
from test_slide_default import (
    BLOCK,
    STRIDE,
    check,
    compare,
    dsb_images,
    make_block,
    run_measured,
    skip_blank,
)

from cellsam_triton.client import lite_rules
from cellsam_triton.client.large_images import LARGE_IMAGE_PIXELS, image_pixels, sequential_labels, takes_slide_path
from cellsam_triton.client.pool import ServerPool
from cellsam_triton.client.slides import window_for_memory
from cellsam_triton.client.types import SegmentOptions
from cellsam_triton.contracts import CELLSAM, LITE

SIDE = 4096
LABEL_IMAGE_MB = SIDE * SIDE * 4 / 2**20  # uint32 labels: the one whole-image array the client holds
PEAK_LIMIT_MB = 2048 + LABEL_IMAGE_MB


def test_which_inputs_take_the_slide_path(tmp_path: Path) -> None:
    small, large = tmp_path / "small.tif", tmp_path / "large.npy"
    tifffile.imwrite(small, np.zeros((300, 200, 3), np.uint8))
    np.lib.format.open_memmap(large, "w+", np.uint8, (SIDE, SIDE)).flush()  # a header and zeros, never read
    assert image_pixels(small) == 60_000 and image_pixels(large) == SIDE * SIDE
    assert image_pixels(tmp_path / "missing.png") is None
    assert takes_slide_path(large, LITE, LARGE_IMAGE_PIXELS) and not takes_slide_path(small, LITE, LARGE_IMAGE_PIXELS)
    assert not takes_slide_path(large, LITE, 0)  # never
    assert not takes_slide_path(large, CELLSAM, LARGE_IMAGE_PIXELS)  # resizes to 1024 anyway
    assert takes_slide_path(small, LITE, 60_000)


def test_slide_labels_become_one_to_n_with_their_scores() -> None:
    store = np.array([[0, 5, 5], [2, 0, 9]], np.uint32)
    labels, scores = sequential_labels(store, [np.inf, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert labels.tolist() == [[0, 2, 2], [1, 0, 3]] and scores.tolist() == [0.2, 0.5, 0.9]
    empty, none = sequential_labels(np.zeros((2, 2), np.uint32), [np.inf])
    assert not empty.any() and none.size == 0


def test_bad_slide_above_is_one_line(tmp_path: Path, capsys) -> None:
    from cellsam_triton.cli import main

    tifffile.imwrite(tmp_path / "a.tif", np.zeros((8, 8), np.uint8))
    assert main(["segment", str(tmp_path / "a.tif"), "--out", str(tmp_path), "--slide-above", "-1"]) != 0
    assert "--slide-above must be 0 (never) or a pixel count" in capsys.readouterr().err


@pytest.mark.data
def test_4096_plain_image_takes_the_slide_path_with_bounded_memory(default_server, tmp_path: Path) -> None:
    images = dsb_images(8)
    blocks = [make_block(images[:4]), make_block(images[4:])]
    window = window_for_memory(1024, 2)  # the CLI's default --max-memory and --windows
    first = -(-(window + 32) // STRIDE) - 2  # tiles first..first+2 straddle the first window border
    origins = [(first * STRIDE, first * STRIDE), (SIDE - BLOCK, SIDE - BLOCK)]  # a window corner; the image corner
    assert all(y % STRIDE == 0 and x % STRIDE == 0 for y, x in origins)
    image = np.zeros((SIDE, SIDE), np.uint8)
    for block, (y, x) in zip(blocks, origins):
        image[y:y + BLOCK, x:x + BLOCK] = block
    path = tmp_path / "mosaic.tif"
    tifffile.imwrite(path, image, compression="zlib")  # a plain (striped) TIFF, not a tiled slide
    del image
    code, out, err, peak = run_measured(["segment", str(path), "--out", str(tmp_path / "out"), "--url",
                                         default_server.grpc_url, "--progress"], tmp_path, 600)
    assert code == 0, err
    assert "large image: segmented window by window" in out, out
    assert "tile/s" in err or "s/tile" in err, f"no tile progress bar: {err[-500:]}"
    print(f"\n4096 plain image: client peak RSS {peak:.0f} MiB; {out.strip()}")
    assert peak < PEAK_LIMIT_MB, f"client peak RSS {peak:.0f} MiB"
    labels = tifffile.imread(tmp_path / "out" / "mosaic_labels.tif")
    count = int(labels.max())
    assert labels.shape == (SIDE, SIDE) and set(np.unique(labels).tolist()) == set(range(count + 1))  # labels 1..n
    with open(tmp_path / "out" / "mosaic_cells.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["label"]) for r in rows] == list(range(1, count + 1))
    with ServerPool([default_server.grpc_url]) as pool:
        wholes = [lite_rules.segment(b, skip_blank(pool.run), pool.family, None, SegmentOptions(scale=1.0)) for b in blocks]
    total = {"whole": 0, "slide": 0, "matched": 0, "split": 0, "crossing": 0, "crossing_matched": 0}
    for (y, x), whole in zip(origins, wholes):
        stats = compare(labels[y:y + BLOCK, x:x + BLOCK], whole.labels, list(range(STRIDE + 32, BLOCK, STRIDE)))
        for key in total:
            total[key] += stats[key]
        total["median_iou"] = min(total.get("median_iou", 1.0), stats["median_iou"])
    assert total["slide"] == count, "cells outside the content blocks"
    check(total, min_crossing=6)

