"""Instance metrics (client/metrics.py) and the eval helpers (client/evaluate.py); no server."""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellsam_triton.client import evaluate, metrics
from cellsam_triton.client.metrics import ImageScore, aggregate, match, score_image
from cellsam_triton.errors import UserError

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "dsb2018"


def boxes_image(shape, rects, ids=None, dtype=np.uint16) -> np.ndarray:
    """Label image with rectangles (y0, x0, y1, x1) painted in order (later ones on top)."""
    labels = np.zeros(shape, dtype)
    for k, (y0, x0, y1, x1) in enumerate(rects):
        labels[y0:y1, x0:x1] = ids[k] if ids is not None else k + 1
    return labels


def brute_iou(true: np.ndarray, pred: np.ndarray) -> dict[tuple[int, int], float]:
    """IoU of every (true id, pred id) pair, straight from boolean masks."""
    out = {}
    for a in np.unique(true[true > 0]):
        for b in np.unique(pred[pred > 0]):
            t, p = true == a, pred == b
            out[(int(a), int(b))] = (t & p).sum() / (t | p).sum()
    return out


def brute_max_matches(true, pred, threshold) -> int:
    """Largest one-to-one matching among pairs with IoU >= threshold, by exhaustive search."""
    ious = brute_iou(true, pred)
    t_ids = [int(a) for a in np.unique(true[true > 0])]
    p_ids = [int(b) for b in np.unique(pred[pred > 0])]
    best = 0
    for k in range(min(len(t_ids), len(p_ids)), 0, -1):
        for ts in itertools.combinations(t_ids, k):
            for ps in itertools.permutations(p_ids, k):
                if all(ious[(a, b)] >= threshold for a, b in zip(ts, ps)):
                    return k
    return best


# --- constructed cases with answers worked out here ----------------------------------------
def test_perfect_match_with_other_ids():
    rects = [(2, 2, 12, 12), (20, 5, 30, 25), (40, 40, 55, 50)]
    true = boxes_image((64, 64), rects)
    pred = boxes_image((64, 64), rects, ids=[9, 3, 7])
    s = score_image(true, pred)
    assert (s.tp, s.fp, s.fn) == (3, 0, 0)
    assert s.f1 == s.precision == s.recall == s.pq == s.mean_iou == 1.0
    m = match(true, pred)
    assert dict(zip(m.true_ids.tolist(), m.pred_ids.tolist())) == {1: 9, 2: 3, 3: 7}


@pytest.mark.parametrize("shift", [0, 2, 3, 4, 5, 7])
def test_shifted_squares(shift):
    side, n = 10, 4
    rects = [(5, 5 + 20 * k, 5 + side, 5 + 20 * k + side) for k in range(n)]
    true = boxes_image((20, 90), rects)
    pred = np.roll(true, shift, axis=1)
    inter = side * (side - shift)
    iou = inter / (2 * side * side - inter)
    s = score_image(true, pred)
    expected_tp = n if iou >= 0.5 else 0
    assert (s.tp, s.fp, s.fn) == (expected_tp, n - expected_tp, n - expected_tp)
    assert s.f1 == pytest.approx(expected_tp / (expected_tp + 0.5 * 2 * (n - expected_tp)))
    assert s.pq == pytest.approx(expected_tp * iou / (expected_tp + (n - expected_tp)))
    if expected_tp:
        assert s.mean_iou == pytest.approx(iou)
    else:
        assert s.mean_iou is None


def test_split_cell_matches_the_larger_part():
    true = boxes_image((20, 40), [(0, 0, 10, 30)])
    pred = boxes_image((20, 40), [(0, 0, 10, 10), (0, 10, 10, 30)])  # IoU 1/3 and 2/3
    s = score_image(true, pred)
    assert (s.tp, s.fp, s.fn) == (1, 1, 0)
    assert s.mean_iou == pytest.approx(2 / 3)
    assert s.f1 == pytest.approx(1 / 1.5)


def test_merged_cells_tie_at_exactly_half_is_matched_once():
    true = boxes_image((20, 40), [(0, 0, 10, 10), (0, 10, 10, 20)])
    pred = boxes_image((20, 40), [(0, 0, 10, 20)])  # IoU exactly 0.5 with each true cell
    s = score_image(true, pred)
    assert (s.tp, s.fp, s.fn) == (1, 0, 1)
    assert s.mean_iou == pytest.approx(0.5)
    assert score_image(true, pred, threshold=0.51).tp == 0


def test_general_threshold_maximises_the_number_of_matches():
    # true 1 = [0,10), true 2 = [10,13); pred 2 = [0,2), pred 1 = [2,13) on one row.
    # IoU(t1,p1) = 8/13 is the largest, but taking it leaves one match; at 0.15 the best
    # assignment is (t1,p2) = 2/10 and (t2,p1) = 3/11: two matches.
    true = np.zeros((1, 13), np.uint8)
    pred = np.zeros((1, 13), np.uint8)
    true[0, 0:10], true[0, 10:13] = 1, 2
    pred[0, 0:2], pred[0, 2:13] = 2, 1
    m = match(true, pred, threshold=0.15)
    assert m.tp == 2 == brute_max_matches(true, pred, 0.15)
    assert sorted(zip(m.true_ids.tolist(), m.pred_ids.tolist())) == [(1, 2), (2, 1)]
    assert sorted(m.ious.tolist()) == pytest.approx([2 / 10, 3 / 11])
    single = match(true, pred, threshold=0.5)  # only (t1,p1) reaches 0.5
    assert single.tp == 1 and single.ious[0] == pytest.approx(8 / 13)


@pytest.mark.parametrize(
    "n_true,n_pred,f1,precision,recall,pq",
    [(0, 0, 1.0, 1.0, 1.0, 1.0), (2, 0, 0.0, 0.0, 0.0, 0.0), (0, 3, 0.0, 0.0, 0.0, 0.0)],
)
def test_empty_images(n_true, n_pred, f1, precision, recall, pq):
    true = boxes_image((32, 32), [(0, 4 * k, 3, 4 * k + 3) for k in range(n_true)])
    pred = boxes_image((32, 32), [(10, 4 * k, 13, 4 * k + 3) for k in range(n_pred)])
    s = score_image(true, pred)
    assert (s.tp, s.fp, s.fn) == (0, n_pred, n_true)
    assert (s.f1, s.precision, s.recall, s.pq) == (f1, precision, recall, pq)
    assert s.mean_iou is None


@pytest.mark.parametrize("dtype,ids", [(np.uint16, [7, 1000, 65535]), (np.uint32, [5, 2**31, 4_000_000_000]), (np.int64, [3, 2, 2**40])])
def test_non_sequential_and_huge_ids(dtype, ids):
    rects = [(0, 0, 8, 8), (10, 10, 20, 14), (0, 20, 5, 30)]
    true = boxes_image((32, 32), rects)
    pred = boxes_image((32, 32), [(1, 0, 9, 8), (10, 10, 20, 14), (0, 22, 5, 30)], ids=ids, dtype=dtype)
    m = match(true, pred)
    ious = brute_iou(true, pred)
    expected = {(a, b): v for (a, b), v in ious.items() if v >= 0.5}
    got = {(int(a), int(b)): v for a, b, v in zip(m.true_ids, m.pred_ids, m.ious)}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value)
    dense, t_ids, p_ids = metrics.iou_matrix(true, pred)
    for (a, b), v in ious.items():
        assert dense[list(t_ids).index(a), list(p_ids).index(b)] == pytest.approx(v)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        match(np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="integers"):
        match(np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="threshold"):
        match(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8), threshold=0.0)


def test_large_image_is_fast():
    from skimage.segmentation import expand_labels

    rng = np.random.default_rng(0)
    side, n = 2048, 1000
    seeds = np.zeros((side, side), np.uint32)
    seeds[rng.integers(0, side, n), rng.integers(0, side, n)] = np.arange(1, n + 1)
    true = expand_labels(seeds, 20)
    pred = np.roll(true, 2, axis=0) * 3
    started = time.perf_counter()
    s = score_image(true, pred)
    elapsed = time.perf_counter() - started
    n_true = len(np.unique(true)) - 1
    assert s.tp + s.fn == n_true and s.tp > 0.9 * n_true
    assert elapsed < 3.0, f"2k x 2k image with {n_true} cells took {elapsed:.2f} s"


# --- properties -----------------------------------------------------------------------------
@st.composite
def label_images(draw, side=12, max_objects=4):
    rects = draw(
        st.lists(
            st.tuples(*[st.integers(0, side)] * 4).map(lambda r: (min(r[0], r[2]), min(r[1], r[3]), max(r[0], r[2]) + 1, max(r[1], r[3]) + 1)),
            max_size=max_objects,
        )
    )
    return boxes_image((side, side), rects)


@settings(max_examples=60, deadline=None)
@given(label_images(), label_images(), st.sampled_from([0.1, 0.3, 0.5, 0.7]))
def test_properties(true, pred, threshold):
    s = score_image(true, pred, threshold)
    for value in (s.f1, s.precision, s.recall, s.pq):
        assert 0.0 <= value <= 1.0
    assert s.pq <= s.f1 + 1e-12
    assert s.tp + s.fn == len(np.unique(true[true > 0]))
    assert s.tp + s.fp == len(np.unique(pred[pred > 0]))
    assert s.tp == score_image(pred, true, threshold).tp  # symmetric
    assert s.tp == brute_max_matches(true, pred, threshold)


@settings(max_examples=40, deadline=None)
@given(label_images(), label_images(), st.randoms(use_true_random=False))
def test_permuting_ids_changes_nothing(true, pred, rnd):
    ids = list(range(1, 200))
    rnd.shuffle(ids)
    lut = np.array([0, *ids], np.uint16)
    a, b = score_image(true, pred), score_image(lut[true], lut[pred])
    assert (a.tp, a.fp, a.fn) == (b.tp, b.fp, b.fn)
    assert a.iou_sum == pytest.approx(b.iou_sum)


# --- aggregation ----------------------------------------------------------------------------
def test_aggregate_means_pools_and_kinds():
    scores = [
        ImageScore(8, 2, 0, 6.4, id="a", kind="fluorescence", seconds=1.0),
        ImageScore(1, 0, 3, 0.9, id="b", kind="fluorescence", seconds=3.0),
        ImageScore(5, 5, 5, 3.5, id="c", kind="stained", seconds=2.0),
        ImageScore(0, 0, 0, 0.0, id="d", kind="stained", seconds=2.0),
    ]
    f1 = [8 / 9, 1 / 2.5, 5 / 10, 1.0]
    out = aggregate(scores)
    assert out["images"] == 4
    assert out["f1_mean"] == pytest.approx(np.mean(f1))
    assert out["f1_pooled"] == pytest.approx(14 / (14 + 0.5 * (7 + 8)))
    assert out["precision"] == pytest.approx(14 / 21) and out["recall"] == pytest.approx(14 / 22)
    assert out["mean_iou"] == pytest.approx(10.8 / 14)
    assert out["pq_mean"] == pytest.approx(np.mean([6.4 / 9, 0.9 / 2.5, 3.5 / 10, 1.0]))
    assert out["seconds_per_image"] == pytest.approx(2.0)
    assert (out["cells_true"], out["cells_pred"]) == (22, 21)
    fl, st_ = out["by_kind"]["fluorescence"], out["by_kind"]["stained"]
    assert fl["images"] == st_["images"] == 2
    assert fl["f1_mean"] == pytest.approx(np.mean(f1[:2])) and st_["f1_mean"] == pytest.approx(np.mean(f1[2:]))
    assert fl["tp"] + st_["tp"] == out["tp"]
    assert aggregate([])["f1_mean"] is None


# --- eval helpers ---------------------------------------------------------------------------
def test_gt_boxes_are_pixel_extents():
    labels = boxes_image((30, 40), [(2, 3, 10, 12), (20, 30, 25, 40)], ids=[4, 9])
    boxes = evaluate.gt_boxes(labels)
    assert boxes.dtype == np.float32
    assert boxes.tolist() == [[3, 2, 12, 10], [30, 20, 40, 25]]
    assert evaluate.gt_boxes(np.zeros((5, 5), np.uint16)).shape == (0, 4)


def test_eval_reports_missing_data_folder(tmp_path):
    args = argparse.Namespace(data=tmp_path / "nowhere", split="val", limit=None, url="127.0.0.1:1", model=None, boxes=None, out=None, timeout=1.0, prompts="detector", points_per_side=None, crop_layers=None, tta=1)
    with pytest.raises(UserError, match="not found"):
        evaluate.run(args)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="manifest"):
        evaluate.select(tmp_path / "empty", "val")


def test_evaluate_scores_each_image_on_real_data():
    if not (DATA / "manifest.csv").is_file():
        pytest.skip(f"DSB2018 data not found at {DATA.resolve()}")
    records = evaluate.select(DATA, "val", limit=2)
    perfect = evaluate.evaluate(DATA, records, lambda image, labels: labels, desc="test")
    assert [s.id for s in perfect] == [r.id for r in records]
    assert all(s.f1 == 1.0 and s.fp == s.fn == 0 and s.tp == r.objects for s, r in zip(perfect, records))
    nothing = evaluate.evaluate(DATA, records, lambda image, labels: np.zeros_like(labels), desc="test")
    assert all(s.f1 == 0.0 and s.fn == r.objects for s, r in zip(nothing, records))
    result = evaluate.summary(perfect, model="fake", split="val")
    assert result["model"] == "fake" and result["images"] == 2 and result["f1_mean"] == 1.0
