"""Tiling geometry, LiteMedSAM input convention and the lite rule set's stitching (no server)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellsam_triton.client import lite_rules
from cellsam_triton.client.tiles import OVERLAP, TILE, lite_normalize, tile_grid, tile_input
from cellsam_triton.client.types import PipelineResult, SegmentOptions
from cellsam_triton.contracts import LITE
from cellsam_triton.errors import UserError

sizes = st.integers(min_value=1, max_value=1500)
overlaps = st.sampled_from([0, 16, 64, 96])


@settings(max_examples=60, deadline=None)
@given(height=sizes, width=sizes, overlap=overlaps)
def test_tiles_cover_the_image_and_cores_partition_it(height: int, width: int, overlap: int) -> None:
    tiles = tile_grid(height, width, TILE, overlap)
    covered = np.zeros((height, width), np.int32)
    cores = np.zeros((height, width), np.int32)
    for t in tiles:
        assert t.size == TILE and t.y0 >= 0 and t.x0 >= 0
        # a window leaves the image only where the image is smaller than a tile
        assert t.y0 + TILE <= max(height, TILE) and t.x0 + TILE <= max(width, TILE)
        assert t.y0 <= t.cy0 < t.cy1 <= t.y0 + TILE and t.x0 <= t.cx0 < t.cx1 <= t.x0 + TILE
        covered[t.window] += 1
        cores[t.cy0 : t.cy1, t.cx0 : t.cx1] += 1
    assert covered.min() >= 1
    assert (cores == 1).all()


@settings(max_examples=60, deadline=None)
@given(
    height=sizes,
    width=sizes,
    fy=st.floats(0, 1, exclude_max=True),
    fx=st.floats(0, 1, exclude_max=True),
    radius=st.integers(0, OVERLAP // 2),
)
def test_each_cell_is_owned_by_one_tile_that_holds_it_whole(height: int, width: int, fy: float, fx: float, radius: int) -> None:
    tiles = tile_grid(height, width)
    cy, cx = fy * height, fx * width
    owners = [t for t in tiles if t.owns(cy, cx)]
    assert len(owners) == 1
    t = owners[0]
    # the cell's extent (centre +- radius, clipped to the image) lies inside the owner's window
    assert t.y0 <= max(0, cy - radius) and min(height, cy + radius) <= t.y0 + t.size
    assert t.x0 <= max(0, cx - radius) and min(width, cx + radius) <= t.x0 + t.size


def test_windows_overlap_by_at_least_the_requested_amount() -> None:
    for length in (257, 300, 520, 696, 1024, 1388):
        starts = sorted({t.x0 for t in tile_grid(10, length)})
        assert all(TILE - (b - a) >= OVERLAP for a, b in zip(starts, starts[1:]))
        assert starts[0] == 0 and starts[-1] == length - TILE


def test_bad_geometry_is_a_user_error() -> None:
    with pytest.raises(UserError):
        tile_grid(0, 10)
    with pytest.raises(UserError):
        tile_grid(10, 10, 256, 256)


def test_tile_input_shape_dtype_content_and_padding() -> None:
    rng = np.random.default_rng(0)
    norm = lite_normalize(rng.integers(0, 255, (300, 100, 3), dtype=np.uint8))
    tiles = tile_grid(300, 100)
    assert len(tiles) == 2
    for t in tiles:
        x = tile_input(norm, t)
        assert x.shape == (1, 3, TILE, TILE) and x.dtype == np.float32
        np.testing.assert_array_equal(x[0, :, : min(TILE, 300 - t.y0), :100], np.moveaxis(norm[t.window], -1, 0))
        assert not x[0, :, :, 100:].any()


def test_lite_normalize_convention() -> None:
    grey = np.arange(12, dtype=np.uint16).reshape(3, 4) * 100 + 50
    out = lite_normalize(grey)
    assert out.shape == (3, 4, 3) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert not lite_normalize(np.full((5, 5, 3), 7, np.uint8)).any()
    two = lite_normalize(np.stack([grey, grey * 2], -1))
    assert two.shape == (3, 4, 3) and not two[..., 2].any()
    with pytest.raises(UserError):
        lite_normalize(np.zeros((4, 4, 5)))


def test_user_boxes_go_to_exactly_one_tile_that_holds_them() -> None:
    tiles = tile_grid(520, 696)
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, [680, 500], (200, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(2, 30, (200, 2))], 1)
    boxes[:, 2:] = np.minimum(boxes[:, 2:], [696, 520])
    per_tile = lite_rules.assign_boxes(boxes, tiles)
    assert sorted(i for idx in per_tile for i in idx) == list(range(200))
    for k, idx in enumerate(per_tile):
        for i in idx:
            assert lite_rules._margin(tiles[k], boxes[i]) >= 0


def _disc_run(cells: list[tuple[float, float, float]], tiles, height: int, width: int):
    """A pipeline stand-in that 'detects' the given discs (cy, cx, r) in every tile that sees them."""
    yy, xx = np.mgrid[0:TILE, 0:TILE]
    calls = []

    def run(requests):
        calls.append(len(requests))
        results = []
        for req, t in zip(requests, tiles):
            assert req["image"].shape == (1, 3, TILE, TILE)
            boxes, masks = [], []
            for cy, cx, r in cells:
                ty, tx = cy - t.y0, cx - t.x0
                if -r < ty < TILE + r and -r < tx < TILE + r:
                    boxes.append([max(tx - r, 0), max(ty - r, 0), min(tx + r, TILE - 1), min(ty + r, TILE - 1)])
                    masks.append(np.where((yy - ty) ** 2 + (xx - tx) ** 2 <= r * r, 8.0, -8.0))
            n = len(boxes)
            results.append(
                PipelineResult(
                    np.array(boxes, np.float32).reshape(-1, 4),
                    np.linspace(0.9, 0.5, n).astype(np.float32),
                    np.ones(n, np.float32),
                    np.array(masks, np.float16).reshape(n, TILE, TILE),
                    np.arange(n, dtype=np.int32),
                )
            )
        return results

    return run, calls


def test_segment_stitches_each_cell_once_at_native_resolution() -> None:
    height, width = 520, 696
    tiles = tile_grid(height, width)
    # cells straddling tile overlaps, near borders and in the middle; radius <= overlap / 2
    cells = [(100.0, 190.0, 12.0), (260.0, 350.0, 20.0), (10.0, 10.0, 6.0), (510.0, 690.0, 8.0), (300.0, 147.0, 30.0)]
    run, calls = _disc_run(cells, tiles, height, width)
    image = np.zeros((height, width), np.uint8)
    image[::7, ::5] = 200
    seg = lite_rules.segment(image, run, dataclasses.replace(LITE, min_cell_area=5), None, SegmentOptions())
    assert calls == [len(tiles)]
    assert seg.labels.shape == (height, width) and seg.count == len(cells)
    yy, xx = np.mgrid[0:height, 0:width]
    for cy, cx, r in cells:
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        values = np.unique(seg.labels[disc])
        assert len(values) == 1 and values[0] > 0  # whole, one label, not cut at a tile border
        assert (seg.labels == values[0]).sum() == disc.sum()


def test_segment_with_user_boxes_sends_only_tiles_with_prompts() -> None:
    height, width = 520, 696
    sent = []

    def run(requests):
        sent.extend(requests)
        results = []
        for req in requests:
            n = len(req["boxes"])
            masks = np.full((n, TILE, TILE), -5.0, np.float16)
            for i, (x0, y0, x1, y1) in enumerate(req["boxes"].astype(int)):
                masks[i, y0 : y1 + 1, x0 : x1 + 1] = 5.0
            results.append(PipelineResult(req["boxes"], np.ones(n, np.float32), np.ones(n, np.float32), masks, np.arange(n, dtype=np.int32)))
        return results

    boxes = np.array([[10, 10, 40, 30], [600, 400, 650, 450]], np.float32)  # x1/y1 exclusive
    seg = lite_rules.segment(np.ones((height, width), np.float32), run, LITE, boxes, SegmentOptions())
    assert len(sent) == 2 and all("boxes" in r for r in sent)
    assert seg.count == 2
    assert [(c["x0"], c["y0"], c["x1"], c["y1"]) for c in seg.cells] == [(10, 10, 40, 30), (600, 400, 650, 450)]
