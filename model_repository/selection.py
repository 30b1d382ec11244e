"""Detector post-processing: which boxes become prompts (numpy + scikit-learn only).

Runs inside Triton's Python backend beside pipeline.py, so it imports nothing from the project.
  cellfinder       CellSAM's rule: sigmoid, top-k over all (query, class) pairs with k = Q,
                   cxcywh -> xyxy in the input frame, k-means (2 clusters) threshold over the scores.
  cellfinder_lite  score threshold, greedy NMS, at most `max_detections`, sorted by score.
"""

from __future__ import annotations

import numpy as np

KMEANS_SEED = 42
BBOX_WEIGHT, CLUSTER_WEIGHT = 0.66, 0.33


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    cx, cy, w, h = np.moveaxis(np.asarray(boxes, dtype=np.float32), -1, 0)
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def top_pairs(pred_logits: np.ndarray, pred_boxes: np.ndarray, input_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-Q (query, class) pairs of one image by sigmoid score, best first: (boxes xyxy [Q,4], scores [Q])."""
    probs = sigmoid(pred_logits).astype(np.float32)  # [Q, C]
    queries, classes = probs.shape
    flat = probs.reshape(-1)
    order = np.argsort(-flat, kind="stable")[:queries]
    boxes = cxcywh_to_xyxy(pred_boxes)[order // classes] * np.float32(input_size)
    return boxes.astype(np.float32), flat[order]


def kmeans_threshold(scores: np.ndarray, bbox_threshold: float) -> float:
    """CellSAM's dynamic threshold: 0.66 * bbox_threshold + 0.33 * mean of 2 k-means centres.

    With fewer than 2 scores (or fewer than 2 distinct values) the plain bbox_threshold is used.
    """
    scores = np.asarray(scores, dtype=np.float32).reshape(-1, 1)
    if len(scores) < 2 or len(np.unique(scores)) < 2:
        return float(bbox_threshold)
    from sklearn.cluster import KMeans

    centres = KMeans(n_clusters=2, random_state=KMEANS_SEED, n_init="auto").fit(scores).cluster_centers_
    return float(BBOX_WEIGHT * bbox_threshold + CLUSTER_WEIGHT * float(np.mean(centres)))


def select_cellfinder(
    pred_logits: np.ndarray, pred_boxes: np.ndarray, input_size: int, bbox_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Kept (boxes [N,4], scores [N]) of one image, in top-k order (score descending)."""
    boxes, scores = top_pairs(pred_logits, pred_boxes, input_size)
    threshold = kmeans_threshold(scores, bbox_threshold)
    if threshold <= 0.0:  # CellSAM keeps every box when the threshold is not positive
        return boxes, scores
    keep = scores > threshold
    return boxes[keep], scores[keep]


def box_area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[..., 2] - boxes[..., 0], 0, None) * np.clip(boxes[..., 3] - boxes[..., 1], 0, None)


def box_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box against [N,4] boxes (0 where the union is empty)."""
    x0 = np.maximum(box[0], others[:, 0])
    y0 = np.maximum(box[1], others[:, 1])
    x1 = np.minimum(box[2], others[:, 2])
    y1 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = box_area(box) + box_area(others) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_keep: int | None = None) -> np.ndarray:
    """Greedy NMS: indices of kept boxes, highest score first; a box is dropped at IoU > threshold."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    boxes = np.asarray(boxes, dtype=np.float64)
    kept: list[int] = []
    while order.size and (max_keep is None or len(kept) < max_keep):
        best, order = order[0], order[1:]
        kept.append(int(best))
        if order.size:
            order = order[box_iou(boxes[best], boxes[order]) <= iou_threshold]
    return np.asarray(kept, dtype=np.int64)


def select_lite(
    pred_scores: np.ndarray, pred_boxes: np.ndarray, bbox_threshold: float, nms_iou: float, max_detections: int
) -> tuple[np.ndarray, np.ndarray]:
    """Kept (boxes [N,4], scores [N]) of one image: score > threshold, NMS, capped, score descending."""
    scores = np.asarray(pred_scores, dtype=np.float32).reshape(-1)
    boxes = np.asarray(pred_boxes, dtype=np.float32).reshape(-1, 4)
    candidates = np.flatnonzero(scores > bbox_threshold)
    kept = candidates[nms(boxes[candidates], scores[candidates], nms_iou, max_detections)]
    return boxes[kept], scores[kept]
