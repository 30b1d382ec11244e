"""Instance-segmentation accuracy: one-to-one matching of predicted and true cells.

Two label images (0 = background, any other value = one object; ids need not be sequential)
are compared through a sparse contingency table of overlapping pixels, so a 2k x 2k image with
~1000 cells costs a few tens of milliseconds. A true and a predicted object match when their
IoU >= ``threshold``, each object at most once. For thresholds above 0.5 such pairs are unique
by construction; otherwise (and for ties at exactly 0.5) the matching is a maximum-cardinality
assignment (Hungarian, `scipy.optimize.linear_sum_assignment`), ties broken by the larger IoU sum.

Definitions (CellSAM's paper metric is the per-image F1 at 0.5, averaged over images):
    F1        = TP / (TP + 0.5 (FP + FN))
    precision = TP / (TP + FP),  recall = TP / (TP + FN)
    PQ        = sum of matched IoU / (TP + 0.5 FP + 0.5 FN)
An image with no true and no predicted object scores 1 on F1, precision, recall and PQ; any
other 0/0 scores 0. Mean matched IoU is undefined (None) without a match.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment

IOU_THRESHOLD = 0.5


@dataclass(frozen=True)
class Matching:
    """Matched pairs between true and predicted objects (original label ids)."""

    true_ids: np.ndarray  # [M] ids of matched true objects
    pred_ids: np.ndarray  # [M] ids of their predicted partners
    ious: np.ndarray  # [M] IoU of each pair
    n_true: int
    n_pred: int

    @property
    def tp(self) -> int:
        return int(len(self.ious))

    @property
    def fp(self) -> int:
        return self.n_pred - self.tp

    @property
    def fn(self) -> int:
        return self.n_true - self.tp


@dataclass(frozen=True)
class ImageScore:
    """Counts of one image; every rate is derived from them."""

    tp: int
    fp: int
    fn: int
    iou_sum: float  # sum of matched IoU
    id: str = ""
    kind: str = ""
    seconds: float = 0.0  # time to produce the prediction (filled by the caller)

    @property
    def f1(self) -> float:
        return _ratio(self.tp, self.tp + 0.5 * (self.fp + self.fn), self._empty)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp, self._empty)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn, self._empty)

    @property
    def pq(self) -> float:
        return _ratio(self.iou_sum, self.tp + 0.5 * (self.fp + self.fn), self._empty)

    @property
    def mean_iou(self) -> float | None:
        return self.iou_sum / self.tp if self.tp else None

    @property
    def _empty(self) -> bool:
        return self.tp + self.fp + self.fn == 0

    def as_dict(self) -> dict:
        """Counts and rates, JSON-ready."""
        rates = {k: getattr(self, k) for k in ("f1", "precision", "recall", "mean_iou", "pq")}
        return {**asdict(self), **rates}


def _ratio(num: float, den: float, both_empty: bool) -> float:
    if den > 0:
        return float(num / den)
    return 1.0 if both_empty else 0.0


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids of the objects, index image with 0 = background and 1..n = position in ids + 1)."""
    flat = np.asarray(labels).ravel()
    if not (np.issubdtype(flat.dtype, np.integer) or flat.dtype == bool):
        raise ValueError(f"label images must hold integers, got {flat.dtype}")
    if flat.size and flat.min() < 0:
        raise ValueError("label images must not hold negative ids")
    top = int(flat.max()) if flat.size else 0
    if top <= 4 * flat.size + 1024:  # lookup table: no sort needed
        present = np.bincount(flat.astype(np.intp, copy=False), minlength=top + 1) > 0
        present[0] = False
        ids = np.flatnonzero(present)
        lut = np.zeros(top + 1, np.intp)
        lut[ids] = np.arange(1, len(ids) + 1)
        return ids, lut[flat]
    ids, index = np.unique(flat, return_inverse=True)
    if ids[0] == 0:
        return ids[1:], index
    return ids, index + 1


def overlaps(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, sparse.csr_matrix, np.ndarray, np.ndarray]:
    """(true ids, pred ids, sparse intersection counts [n_true, n_pred], true areas, pred areas)."""
    if true.shape != pred.shape:
        raise ValueError(f"label images differ in shape: {true.shape} vs {pred.shape}")
    true_ids, t = _compact(true)
    pred_ids, p = _compact(pred)
    nt, npred = len(true_ids), len(pred_ids)
    both = (t > 0) & (p > 0)
    ti, pi = t[both] - 1, p[both] - 1
    counts = sparse.coo_matrix((np.ones(len(ti), np.int64), (ti, pi)), shape=(nt, npred)).tocsr()
    counts.sum_duplicates()
    true_area = np.bincount(t, minlength=nt + 1)[1:]
    pred_area = np.bincount(p, minlength=npred + 1)[1:]
    return true_ids, pred_ids, counts, true_area, pred_area


def iou_pairs(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every overlapping pair: (row index, column index, IoU) plus the true and pred ids."""
    true_ids, pred_ids, counts, true_area, pred_area = overlaps(true, pred)
    coo = counts.tocoo()
    inter = coo.data.astype(np.float64)
    iou = inter / (true_area[coo.row] + pred_area[coo.col] - inter)
    return coo.row, coo.col, iou, true_ids, pred_ids


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense IoU [n_true, n_pred] with the true and pred ids of its rows and columns."""
    rows, cols, iou, true_ids, pred_ids = iou_pairs(true, pred)
    dense = np.zeros((len(true_ids), len(pred_ids)))
    dense[rows, cols] = iou
    return dense, true_ids, pred_ids


def match(true: np.ndarray, pred: np.ndarray, threshold: float = IOU_THRESHOLD) -> Matching:
    """One-to-one matching of objects whose IoU >= ``threshold`` (threshold in (0, 1])."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"IoU threshold must be in (0, 1], got {threshold}")
    rows, cols, iou, true_ids, pred_ids = iou_pairs(true, pred)
    keep = iou >= threshold
    rows, cols, iou = rows[keep], cols[keep], iou[keep]
    unique = len(np.unique(rows)) == len(rows) and len(np.unique(cols)) == len(cols)
    if not unique:
        rows, cols, iou = _assign(rows, cols, iou)
    return Matching(true_ids[rows], pred_ids[cols], iou, len(true_ids), len(pred_ids))


def _assign(rows: np.ndarray, cols: np.ndarray, iou: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Most matches among candidate pairs, then the largest IoU sum (Hungarian on the candidates)."""
    r_ids, r = np.unique(rows, return_inverse=True)
    c_ids, c = np.unique(cols, return_inverse=True)
    # A match is worth 1 plus a bonus below 1/min(n) per pair, so the count always wins.
    dense = np.zeros((len(r_ids), len(c_ids)))
    dense[r, c] = iou
    weight = np.where(dense > 0, 1.0 + dense / (2.0 * min(dense.shape)), 0.0)
    sel_r, sel_c = linear_sum_assignment(weight, maximize=True)
    real = weight[sel_r, sel_c] > 0
    sel_r, sel_c = sel_r[real], sel_c[real]
    return r_ids[sel_r], c_ids[sel_c], dense[sel_r, sel_c]


def score_image(true: np.ndarray, pred: np.ndarray, threshold: float = IOU_THRESHOLD, **info) -> ImageScore:
    """Counts of one image; ``info`` sets id, kind or seconds."""
    m = match(true, pred, threshold)
    return ImageScore(m.tp, m.fp, m.fn, float(m.ious.sum()), **info)


def _summary(scores: list[ImageScore]) -> dict:
    tp = sum(s.tp for s in scores)
    fp = sum(s.fp for s in scores)
    fn = sum(s.fn for s in scores)
    pooled = ImageScore(tp, fp, fn, float(sum(s.iou_sum for s in scores)))
    n = len(scores)
    return {
        "images": n,
        "f1_mean": float(np.mean([s.f1 for s in scores])) if n else None,
        "f1_pooled": pooled.f1 if n else None,
        "precision": pooled.precision if n else None,
        "recall": pooled.recall if n else None,
        "mean_iou": pooled.mean_iou,
        "pq_mean": float(np.mean([s.pq for s in scores])) if n else None,
        "seconds_per_image": float(np.mean([s.seconds for s in scores])) if n else None,
        "cells_true": tp + fn,
        "cells_pred": tp + fp,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def aggregate(per_image: Iterable[ImageScore]) -> dict:
    """Summary over images, plus the same summary per ``kind`` under "by_kind".

    f1_mean and pq_mean average the per-image values (the paper's figure); f1_pooled,
    precision, recall and mean_iou pool the counts of all images (mean_iou = matched IoU per TP).
    """
    scores = list(per_image)
    groups: dict[str, list[ImageScore]] = defaultdict(list)
    for s in scores:
        groups[s.kind or "unknown"].append(s)
    return {**_summary(scores), "by_kind": {k: _summary(v) for k, v in sorted(groups.items())}}
