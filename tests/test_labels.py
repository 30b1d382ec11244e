"""Label painting, hole filling / small-object removal, and the cells table."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.ndimage import binary_fill_holes

from cellsam_triton.client.labels import (
    cells_table,
    fill_holes_and_remove_small,
    logit_threshold,
    paint_cells,
    paint_labels,
    paint_seeded,
    writer_dtype,
)

FULL = (slice(0, 6), slice(0, 7))


def test_logit_threshold_is_sigmoid_threshold():
    x = np.linspace(-8, 8, 4001)
    for t in (0.1, 0.4, 0.5, 0.9):
        assert np.array_equal(1 / (1 + np.exp(-x)) > t, x > logit_threshold(t))
    assert logit_threshold(0.0) == -math.inf and logit_threshold(1.0) == math.inf


def test_paint_later_masks_win_and_blocks_place_masks():
    a = np.zeros((6, 7), np.float32) - 1
    a[1:4, 1:4] = 2
    b = np.full((2, 3), 5.0, np.float32)
    labels = paint_labels([FULL + (a,), (slice(2, 4), slice(3, 6), b), (slice(0, 0), slice(0, 0), np.zeros((0, 0)))], (6, 7), 0.0)
    assert labels.dtype == np.uint32
    expected = np.zeros((6, 7), np.uint32)
    expected[1:4, 1:4] = 1
    expected[2:4, 3:6] = 2
    np.testing.assert_array_equal(labels, expected)


def test_point_masks_share_contested_pixels_by_logit_and_keep_the_part_around_their_points():
    """Mask 0 (a click on the left nucleus) spills over the right one; mask 1 (a later click on the
    right nucleus) is surer there. Painting in order would let mask 1 win everything it covers;
    by logit each keeps its own nucleus, and mask 0's stray pixels beyond mask 1 (a second,
    unclicked part) are dropped rather than left as a fragment."""
    left = np.full((6, 12), -3.0, np.float32)
    left[1:5, 0:5] = 4.0  # its own nucleus
    left[1:5, 5:12] = 1.0  # spill over the right one and beyond, weaker
    right = np.full((6, 12), -3.0, np.float32)
    right[0:6, 5:10] = 3.0
    right[1:5, 0:5] = 0.5  # spill over the left nucleus, weaker than mask 0 there
    blocks = [(slice(0, 6), slice(0, 12), left), (slice(0, 6), slice(0, 12), right)]
    seeds = [np.array([[2, 2]]), np.array([[3, 7]])]
    labels = paint_seeded(blocks, seeds, (6, 12), 0.0)
    expected = np.zeros((6, 12), np.uint32)
    expected[1:5, 0:5] = 1
    expected[0:6, 5:10] = 2  # columns 10-11 were mask 0's but cut off from its click: dropped
    np.testing.assert_array_equal(labels, expected)
    ordered = paint_labels(iter(blocks), (6, 12), 0.0)
    assert (ordered == 1).sum() == 2 * 4  # painting in order: the later mask takes the left nucleus
    cells, origin = paint_cells(iter(blocks), (6, 12), 0.0, 1, seeds)
    np.testing.assert_array_equal(cells, expected)
    np.testing.assert_array_equal(origin, [0, 1])


def test_a_point_mask_off_its_point_keeps_its_largest_part():
    mask = np.full((5, 9), -1.0, np.float32)
    mask[0:2, 0:2] = 2.0
    mask[2:5, 4:9] = 2.0
    labels = paint_seeded([(slice(0, 5), slice(0, 9), mask)], [np.array([[4, 0], [-1, 40]])], (5, 9), 0.0)
    np.testing.assert_array_equal(labels, np.where(mask[None] > 0, 1, 0)[0] * (np.arange(9) >= 4))


def test_no_masks_give_an_empty_image():
    labels = paint_labels([], (5, 4), 0.0)
    out, origin = fill_holes_and_remove_small(labels, 25)
    assert out.shape == (5, 4) and not out.any() and origin.size == 0
    assert cells_table(out, np.zeros(0)) == []


def test_fill_holes_remove_small_and_relabel():
    labels = np.zeros((20, 20), np.uint32)
    labels[1:3, 1:3] = 1  # 4 px: removed
    labels[5:12, 5:12] = 2  # ring with a hole holding label 3
    labels[7:10, 7:10] = 3
    labels[14:19, 14:19] = 4
    labels[16, 16] = 0  # a hole
    out, origin = fill_holes_and_remove_small(labels.copy(), min_size=5)
    # label 2 -> 1 with its hole (and label 3 inside it) filled; label 3 vanished; 4 -> 2, filled
    assert set(np.unique(out)) == {0, 1, 2}
    assert (out[5:12, 5:12] == 1).all() and (out[14:19, 14:19] == 2).all() and not out[1:3, 1:3].any()
    np.testing.assert_array_equal(origin, [2, 4])


@settings(max_examples=80, deadline=None)
@given(hnp.arrays(np.uint32, st.tuples(st.integers(3, 24), st.integers(3, 24)), elements=st.integers(0, 6)), st.sampled_from([0, 3, 10]))
def test_fill_properties(labels, min_size):
    out, origin = fill_holes_and_remove_small(labels.copy(), min_size)
    counts = np.bincount(labels.ravel(), minlength=8)
    assert set(np.unique(out)) <= set(range(len(origin) + 1))
    assert (np.diff(origin) > 0).all()  # new labels follow the input order
    assert all(counts[old] >= max(min_size, 1) for old in origin)  # only big enough labels are kept
    removed = [v for v in range(1, 8) if counts[v] and v not in origin]
    assert np.isin(labels[out == 0], [0] + removed).all()  # background is old background or removed


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.bool_, st.tuples(st.integers(3, 16), st.integers(3, 16))), st.sampled_from([0, 5, 20]))
def test_single_label_is_filled_within_its_box(mask, min_size):
    out, origin = fill_holes_and_remove_small(mask.astype(np.uint32) * 4, min_size)
    if mask.sum() < max(min_size, 1):
        assert not out.any() and origin.size == 0
        return
    ys, xs = np.nonzero(mask)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    expected = np.zeros(mask.shape, np.uint32)
    expected[box] = binary_fill_holes(mask[box])
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(origin, [4])


def test_cells_table_extents_scores_and_area():
    labels = np.zeros((10, 12), np.uint32)
    labels[2:5, 3:9] = 1
    labels[7, 0] = 3  # label 2 absent
    rows = cells_table(labels, np.array([0.5, 0.6, 0.7]))
    assert rows == [
        dict(label=1, x0=3, y0=2, x1=9, y1=5, score=0.5, area=18),
        dict(label=3, x0=0, y0=7, x1=1, y1=8, score=0.7, area=1),
    ]


@pytest.mark.parametrize("top,dtype", [(0, np.uint16), (65535, np.uint16), (65536, np.uint32)])
def test_writer_dtype(top, dtype):
    assert writer_dtype(np.array([[0, top]], np.uint32)) == dtype
