"""Detector post-processing (model_repository/selection.py) against independent computations."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model_repository"))
import selection  # noqa: E402


def best_two_means_split(values: np.ndarray) -> tuple[float, float]:
    """Exact 1-D 2-means optimum by trying every split of the sorted values."""
    v = np.sort(values.astype(np.float64))
    best = None
    for i in range(1, len(v)):
        lo, hi = v[:i], v[i:]
        sse = ((lo - lo.mean()) ** 2).sum() + ((hi - hi.mean()) ** 2).sum()
        if best is None or sse < best[0]:
            best = (sse, lo.mean(), hi.mean())
    return best[1], best[2]


def test_kmeans_threshold_matches_exact_two_means() -> None:
    rng = np.random.default_rng(3)
    scores = np.concatenate([rng.uniform(0.0, 0.1, 300), rng.uniform(0.7, 1.0, 25)]).astype(np.float32)
    lo, hi = best_two_means_split(scores)
    expected = 0.66 * 0.4 + 0.33 * (lo + hi) / 2
    assert selection.kmeans_threshold(scores, 0.4) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("scores", [np.array([0.9], np.float32), np.zeros(0, np.float32), np.full(5, 0.3, np.float32)])
def test_kmeans_threshold_falls_back_to_bbox_threshold(scores: np.ndarray) -> None:
    assert selection.kmeans_threshold(scores, 0.4) == pytest.approx(0.4)


def test_select_cellfinder_matches_a_plain_loop() -> None:
    rng = np.random.default_rng(0)
    queries, size = 50, 128
    logits = rng.normal(-3, 2, (queries, 2)).astype(np.float32)
    logits[:6, 0] = 4.0 + np.arange(6)  # a few confident queries
    boxes = rng.uniform(0.1, 0.9, (queries, 4)).astype(np.float32)

    pairs = sorted(((1 / (1 + np.exp(-float(logits[q, c]))), q) for q in range(queries) for c in range(2)), key=lambda p: -p[0])
    top = pairs[:queries]
    scores = np.array([s for s, _ in top])
    lo, hi = best_two_means_split(scores)
    threshold = 0.66 * 0.4 + 0.33 * (lo + hi) / 2
    expected = []
    for score, q in top:
        if score > threshold:
            cx, cy, w, h = boxes[q]
            expected.append([(cx - w / 2) * size, (cy - h / 2) * size, (cx + w / 2) * size, (cy + h / 2) * size, score])

    got_boxes, got_scores = selection.select_cellfinder(logits, boxes, size, 0.4)
    assert len(expected) == len(got_scores) >= 6
    np.testing.assert_allclose(got_boxes, np.array(expected)[:, :4], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got_scores, np.array(expected)[:, 4], rtol=1e-5)
    assert np.all(np.diff(got_scores) <= 0)


def test_nms_hand_case() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 5]], np.float32)
    scores = np.array([0.9, 0.95, 0.7, 0.8], np.float32)
    # box 1 wins; box 0 overlaps it at IoU 81/119 > 0.5; box 3 overlaps box 1 at 36/109 (kept)
    assert selection.nms(boxes, scores, 0.5).tolist() == [1, 3, 2]
    assert selection.nms(boxes, scores, 0.5, max_keep=2).tolist() == [1, 3]


boxes_strategy = st.lists(
    st.tuples(st.floats(0, 50), st.floats(0, 50), st.floats(1, 30), st.floats(1, 30), st.floats(0, 1)),
    min_size=0, max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(boxes_strategy, st.floats(0.1, 0.9))
def test_nms_invariants(rows: list, iou: float) -> None:
    data = np.array([[x, y, x + w, y + h] for x, y, w, h, _ in rows], np.float32).reshape(-1, 4)
    scores = np.array([s for *_, s in rows], np.float32)
    kept = selection.nms(data, scores, iou)
    kept_set = set(kept.tolist())
    assert np.all(np.diff(scores[kept]) <= 0)
    for a in kept:  # kept boxes never overlap each other above the threshold
        others = [b for b in kept if b != a]
        assert np.all(selection.box_iou(data[a], data[others]) <= iou + 1e-6) if others else True
    for d in set(range(len(data))) - kept_set:  # every dropped box is covered by a kept, not lower-scored one
        cover = [k for k in kept if scores[k] >= scores[d] and selection.box_iou(data[k], data[d:d + 1])[0] > iou]
        assert cover


def test_select_lite_threshold_cap_and_order() -> None:
    scores = np.array([0.2, 0.9, 0.5, 0.95, 0.6], np.float32)
    boxes = np.array([[i * 20, 0, i * 20 + 10, 10] for i in range(5)], np.float32)  # disjoint
    got_boxes, got_scores = selection.select_lite(scores, boxes, 0.4, 0.5, 3)
    assert got_scores.tolist() == pytest.approx([0.95, 0.9, 0.6])
    np.testing.assert_array_equal(got_boxes, boxes[[3, 1, 4]])
    empty_boxes, empty_scores = selection.select_lite(scores, boxes, 0.99, 0.5, 3)
    assert empty_boxes.shape == (0, 4) and empty_scores.shape == (0,)
