"""Whole-slide path: lazy reading, windows stitched exactly like the whole image, bounded memory."""

from __future__ import annotations

import dataclasses
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from cellsam_triton.client import lite_rules
from cellsam_triton.client.slides import Slide, group_tiles, segment_slide, window_for_memory
from cellsam_triton.client.tiles import tile_grid
from cellsam_triton.client.types import PipelineResult, SegmentOptions
from cellsam_triton.contracts import LITE

FAMILY = dataclasses.replace(LITE, min_cell_area=5)
TILE = LITE.input_size


def blob_run(requests):
    """A content-driven stand-in pipeline: every bright blob of a tile is a cell (mask = blob)."""
    results = []
    for request in requests:
        bright = request["image"][0, 0] > 0.5
        components, n = ndimage.label(bright)
        boxes, masks, scores = [], [], []
        for k, box in enumerate(ndimage.find_objects(components), 1):
            ys, xs = box
            boxes.append([xs.start, ys.start, xs.stop - 1, ys.stop - 1])
            masks.append(np.where(components == k, 8.0, -8.0))
            scores.append(0.5 + 0.4 * ((ys.start * 7 + xs.start * 3) % 11) / 11)
        results.append(PipelineResult(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32),
                                      np.ones(n, np.float32), np.array(masks, np.float16).reshape(n, TILE, TILE),
                                      np.arange(n, dtype=np.int32)))
    return results


def disc_slide(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint16 image with non-touching discs (radius <= overlap / 2) all over, window borders included."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 50, (height, width)).astype(np.uint16)
    taken = np.zeros((height, width), bool)
    for _ in range(height * width // 3000):
        cy, cx, r = rng.integers(0, height), rng.integers(0, width), int(rng.integers(4, 30))
        y0, x0 = max(0, cy - r - 3), max(0, cx - r - 3)
        yy, xx = np.ogrid[y0 : cy + r + 4, x0 : cx + r + 4]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        near = taken[y0 : y0 + disc.shape[0], x0 : x0 + disc.shape[1]]
        disc = disc[: near.shape[0], : near.shape[1]]
        if not ndimage.binary_dilation(disc, iterations=3)[near].any():
            near |= disc
    image[taken] = 1000
    return image


def same_cells(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to the label numbering: every cell of a is exactly one cell of b and vice versa."""
    assert (a > 0).sum() == (b > 0).sum() and ((a > 0) == (b > 0)).all()
    pairs = np.unique(np.stack([a[a > 0], b[a > 0]]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
def test_windows_stitch_exactly_like_the_whole_image(tmp_path: Path, suffix: str) -> None:
    image = disc_slide(1100, 1300)
    tifffile.imwrite(tmp_path / "slide.tif", image, tile=(256, 256))
    whole = lite_rules.segment(image, blob_run, FAMILY, None, SegmentOptions())
    slide = Slide.open(tmp_path / "slide.tif")
    assert slide.shape == image.shape
    np.testing.assert_array_equal(slide.read(10, 20, 30, 50), image[10:20, 30:50])
    report = segment_slide(slide, blob_run, FAMILY, tmp_path / f"labels{suffix}", window=400, in_flight=3, progress=False)
    assert report.windows > 4, "the slide must span several windows for the test to mean anything"
    labels = Slide.open(report.path).read(0, image.shape[0], 0, image.shape[1])
    assert whole.count > 100 and report.cells == whole.count
    same_cells(labels.astype(np.int64), whole.labels.astype(np.int64))
    if suffix == ".tif":
        with tifffile.TiffFile(report.path) as tif:
            assert tif.is_bigtiff and tif.pages[0].is_tiled
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_cells_on_window_borders_are_whole_and_once(tmp_path: Path) -> None:
    image = np.zeros((900, 900), np.uint16)
    tiles = tile_grid(*image.shape)
    groups = group_tiles(tiles, 400)
    border = min(t.cy0 for t in groups[-1])  # a core edge between two windows
    yy, xx = np.ogrid[:900, :900]
    centres = [(border, 450), (border - 0.5, 300), (450, border), (border, border)]
    for cy, cx in centres:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25**2] = 900
    report = segment_slide(Slide(image, "mem"), blob_run, FAMILY, tmp_path / "l.zarr", window=400, progress=False)
    labels = Slide.open(report.path).read(0, 900, 0, 900)
    assert report.cells == len(centres)
    for cy, cx in centres:
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 25**2
        assert len(np.unique(labels[disc])) == 1 and labels[disc][0] > 0
        assert (labels == labels[disc][0]).sum() == disc.sum()


def test_memory_is_bounded_by_the_window_not_the_slide(tmp_path: Path) -> None:
    image = disc_slide(2400, 2400, seed=1)
    np.save(tmp_path / "s.npy", image)
    slide = Slide.open(tmp_path / "s.npy")  # memory-mapped: not counted
    del image
    tracemalloc.start()
    segment_slide(slide, blob_run, FAMILY, tmp_path / "l.tif", window=256, in_flight=1, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    whole_float = 2400 * 2400 * 3 * 4  # one float32 RGB copy of the slide: the whole-image path holds several
    assert peak < whole_float / 2, f"peak {peak / 2**20:.0f} MiB"
    assert window_for_memory(1024) > window_for_memory(256) >= 256


def test_label_store_breaks_score_ties_by_rank_whatever_the_merge_order(tmp_path: Path) -> None:
    from cellsam_triton.client.slides import LabelStore

    a = np.zeros((6, 6), np.int64)
    a[0:4, 0:4] = 1
    b = np.zeros((6, 6), np.int64)
    b[2:6, 2:6] = 1
    results = []
    for k, order in enumerate(((0, 1), (1, 0))):
        store = LabelStore(tmp_path / f"s{k}.zarr", (6, 6))
        windows = [(a, 7), (b, 3)]  # equal scores, ranks 7 and 3: rank 7 wins the shared pixels
        for w in order:
            store.merge(0, 0, windows[w][0], np.array([0.5]), np.array([windows[w][1]]))
        label_of = {rank: label for label, rank in enumerate(store.ranks) if label}
        results.append(np.asarray(store.array[:]) == label_of[7])
    assert (results[0] == results[1]).all() and results[0][2:4, 2:4].all() and results[0].sum() == 16
