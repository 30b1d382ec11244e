"""Test-time rescaling for small cells: measuring, resizing, label resampling, option checks."""

from __future__ import annotations

import numpy as np
import pytest

from cellsam_triton.client.autoscale import (
    auto_factor,
    capped,
    check_scale,
    labels_to_shape,
    median_cell_size,
    resize_image,
    segment_rescaled,
)
from cellsam_triton.client.labels import cells_table
from cellsam_triton.client.types import Segmentation, SegmentOptions
from cellsam_triton.contracts import LITE
from cellsam_triton.errors import UserError


def _cells(sizes: list[int]) -> list[dict]:
    return [{"x0": 0, "y0": 0, "x1": s, "y1": s} for s in sizes]


def test_median_size_and_factor_follow_the_family_settings() -> None:
    assert median_cell_size([]) == 0.0
    assert median_cell_size(_cells([8, 10, 30])) == 10.0
    below = LITE.auto_scale_below
    # small cells: the largest factor in [1.5, 2] with the fewest tiles (448x448: 4 tiles, 512x512: 9)
    assert auto_factor(_cells([int(below) - 4] * 5), LITE, (256, 256)) == 1.75
    assert auto_factor(_cells([int(below) + 4] * 5), LITE, (256, 256)) == 1.0
    assert auto_factor([], LITE, (256, 256)) == 1.0  # nothing found: nothing to measure


def test_tile_snapped_factor_takes_the_largest_factor_of_the_fewest_tiles() -> None:
    from cellsam_triton.client.autoscale import tile_snapped_factor
    from cellsam_triton.client.tiles import tile_grid

    for shape in ((256, 256), (260, 347), (520, 696), (603, 1272), (100, 900)):
        factor = tile_snapped_factor(shape, 1.5, 2.0, LITE)
        count = lambda f: len(tile_grid(round(shape[0] * f), round(shape[1] * f)))  # noqa: E731
        counts = {round(1.5 + k / 100, 2): count(1.5 + k / 100) for k in range(51)}
        assert 1.5 <= factor <= 2.0 and counts[factor] == min(counts.values())
        assert all(f <= factor for f, c in counts.items() if c == counts[factor])
    assert tile_snapped_factor((256, 256), 2.0, 2.0, LITE) == 2.0
    # the README's examples: 256x256 -> 1.75x (4 tiles, 9 at 2x); 520x696 -> 1.6x (24 tiles, 42 at 2x)
    for shape, factor, tiles, at_2x in (((256, 256), 1.75, 4, 9), ((520, 696), 1.6, 24, 42)):
        assert tile_snapped_factor(shape, 1.5, 2.0, LITE) == factor
        assert len(tile_grid(round(shape[0] * factor), round(shape[1] * factor))) == tiles
        assert len(tile_grid(shape[0] * 2, shape[1] * 2)) == at_2x


def test_factor_is_capped_by_the_pixel_budget() -> None:
    assert capped(2.0, (1000, 1000), LITE) == 2.0
    assert capped(2.0, (6000, 6000), LITE) == pytest.approx(np.sqrt(64e6 / 36e6))
    assert capped(2.0, (20000, 20000), LITE) == 1.0  # never shrinks to obey the budget
    assert capped(0.5, (20000, 20000), LITE) == 0.5  # an explicit shrink stays


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), 9.0])
def test_bad_scale_is_a_user_error(bad: float) -> None:
    with pytest.raises(UserError, match="scale"):
        check_scale(bad)
    check_scale(None)
    check_scale(2.0)


def test_resize_keeps_dtype_and_values_and_labels_come_back_exactly() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 65535, (37, 53, 3), dtype=np.uint16)
    big = resize_image(image, 2.0)
    assert big.shape == (74, 106, 3) and big.dtype == np.uint16
    assert big.min() >= image.min() and big.max() <= image.max()
    labels = rng.integers(0, 5, (37, 53)).astype(np.uint32)
    up = labels_to_shape(labels, (74, 106))
    assert np.array_equal(up[::2, ::2], labels) and np.array_equal(labels_to_shape(up, (37, 53)), labels)
    odd = labels_to_shape(labels, (50, 70))  # non-integer factors stay in range
    assert odd.shape == (50, 70) and set(np.unique(odd)) <= set(np.unique(labels))


def test_segment_rescaled_maps_boxes_labels_and_scores_back() -> None:
    image = np.zeros((40, 60), np.uint8)
    image[10:20, 30:44] = 200
    seen = {}

    def fake(img: np.ndarray, boxes, options: SegmentOptions) -> Segmentation:
        seen.update(shape=img.shape, boxes=boxes, options=options)
        labels = np.zeros(img.shape[:2], np.uint32)
        labels[img > 100] = 7  # one cell with a label that is not 1
        labels[0:2, 0:2] = 3  # a speck that is small once scaled back
        table = cells_table(labels, np.array([0.0, 0.0, 0.25, 0, 0, 0, 0.9]))
        return Segmentation(labels, table)

    out = segment_rescaled(fake, image, 2.0, np.array([[30, 10, 44, 20]], np.float32), SegmentOptions(0.5, 0.5, 0.12, 2))
    assert seen["shape"] == (80, 120)
    assert np.array_equal(seen["boxes"], [[60, 20, 88, 40]])
    assert seen["options"].min_cell_area == 0 and seen["options"].scale == 1.0
    assert out.labels.shape == (40, 60)
    assert np.array_equal(out.labels > 0, image > 100)  # the speck (1 px here) is removed
    assert [(c["label"], c["score"], c["area"]) for c in out.cells] == [(1, 0.9, 140)]


def test_cli_scale_flag_parses_auto_and_factors() -> None:
    from cellsam_triton.client.command import _scale

    assert _scale("auto") is None and _scale("1") == 1.0 and _scale("2.5") == 2.5
    for bad in ("big", "0", "-2", "nan", "100"):
        with pytest.raises(UserError, match="--scale|scale must"):
            _scale(bad)
