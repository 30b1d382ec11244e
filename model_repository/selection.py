"""Detector post-processing: which boxes become prompts (numpy + scikit-learn only).

Runs inside Triton's Python backend beside pipeline.py, so it imports nothing from the project.
  cellfinder       CellSAM's rule: sigmoid, top-k over all (query, class) pairs with k = Q,
                   cxcywh -> xyxy in the input frame, k-means (2 clusters) threshold over the scores.
  cellfinder_lite  score threshold, greedy NMS, at most `max_detections`, sorted by score;
                   with test-time flips (request input ``tta``), each mirrored view's boxes are
                   mirrored back and the views fused (weighted box fusion) before the threshold.
The same mirrors serve the client's point prompts with ``tta`` (client/point_rules.py).
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


# --- test-time flips (cellfinder_lite) -----------------------------------------------------
TTA_CANDIDATE_THRESHOLD = 0.2  # per-view score floor before fusion
TTA_FUSE_IOU = 0.55  # a box joins a fused box it overlaps by more than this
_MIRRORS = ((False, False), (True, False), (False, True), (True, True))  # (left-right, top-bottom) per view


def flip_view(image: np.ndarray, view: int) -> np.ndarray:
    """View ``view`` (0 the image, 1 left-right, 2 top-bottom, 3 both mirrored) of an [..., H, W] array."""
    lr, tb = _MIRRORS[view]
    out = image[..., ::-1] if lr else image
    out = out[..., ::-1, :] if tb else out
    return np.ascontiguousarray(out)


def unflip_boxes(boxes: np.ndarray, view: int, size: int) -> np.ndarray:
    """Boxes (xyxy, inclusive pixel corners) found on view ``view`` of a ``size``-square input, in the
    input's own frame (and, a mirror being its own inverse, boxes of the input on view ``view``)."""
    corners = mirror_points(np.asarray(boxes, np.float32).reshape(-1, 2, 2), view, size)
    return np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)


def mirror_points(coords: np.ndarray, view: int, size: int) -> np.ndarray:
    """Point prompts (xy pixel coordinates [..., 2]) of a ``size``-square input, on view ``view`` of it
    (a mirror is its own inverse: the same call maps them back)."""
    lr, tb = _MIRRORS[view]
    out = np.array(coords, np.float32)
    if lr:
        out[..., 0] = (size - 1) - out[..., 0]
    if tb:
        out[..., 1] = (size - 1) - out[..., 1]
    return out


def fuse_views(views: list[tuple[np.ndarray, np.ndarray]], fuse_iou: float = TTA_FUSE_IOU) -> tuple[np.ndarray, np.ndarray]:
    """Weighted box fusion of the (boxes, scores) of several views of one input: boxes taken by
    decreasing score join the fused box they overlap most (IoU > ``fuse_iou``) or start one; a fused
    box is the score-weighted mean of its members, its score their sum over the number of views (a
    box seen in one view of four at 0.8 scores 0.2)."""
    boxes = np.concatenate([np.asarray(b, np.float32).reshape(-1, 4) for b, _ in views])
    scores = np.concatenate([np.asarray(s, np.float32).reshape(-1) for _, s in views])
    weighted, weights, fused = [], [], np.zeros((0, 4), np.float32)
    for j in np.argsort(-scores, kind="stable"):
        overlap = box_iou(boxes[j], fused) if len(fused) else np.zeros(0)
        if len(overlap) and overlap.max() > fuse_iou:
            k = int(overlap.argmax())
            weighted[k] = weighted[k] + boxes[j] * scores[j]
            weights[k] += float(scores[j])
            fused[k] = weighted[k] / weights[k]
        else:
            weighted.append(boxes[j] * scores[j])
            weights.append(float(scores[j]))
            fused = np.concatenate([fused, boxes[j][None]])
    return fused.astype(np.float32), (np.asarray(weights, np.float32) / max(len(views), 1)).reshape(-1)
