"""Automatic (point-grid) mask generation rules, numpy + scipy only (CellSeg1 / SAM AMG style).

Runs inside Triton's Python backend beside grid_pipeline.py, so it imports nothing from the
project. All masks are low-resolution logits [N,m,m] of one crop; a mask is ``logit > 0``.
  point_grid       n x n points at cell centres of a box (SAM's build_point_grid)
  stability_score  |logit > +offset| / |logit > -offset|
  mask_nms         greedy mask-IoU NMS in score order (only box-overlapping pairs are compared)
  clean_mask       fill holes and drop islands smaller than ``min_area`` pixels
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

def point_grid(n: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """[n*n, 2] xy points at the centres of an n x n grid over ``box`` (x0, y0, x1, y1), row-major."""
    x0, y0, x1, y1 = box
    offsets = (np.arange(n) + 0.5) / n
    xs, ys = x0 + offsets * (x1 - x0), y0 + offsets * (y1 - y0)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float32)


def stability_score(logits: np.ndarray, offset: float, threshold: float = 0.0) -> np.ndarray:
    """[N] IoU between the masks at ``threshold + offset`` and ``threshold - offset``."""
    flat = logits.reshape(len(logits), int(np.prod(logits.shape[1:])))
    inner = (flat > threshold + offset).sum(1, dtype=np.int64)
    outer = (flat > threshold - offset).sum(1, dtype=np.int64)
    return np.where(outer > 0, inner / np.maximum(outer, 1), 0.0)


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """[N,4] xyxy extent (x1/y1 exclusive) of boolean masks [N,H,W]; zeros for empty masks."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if rows.size:
            boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def mask_nms(masks: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices of kept boolean masks [N,H,W], best score first; dropped at mask IoU > threshold."""
    boxes = mask_boxes(masks).astype(np.int64)
    areas = masks.reshape(len(masks), int(np.prod(masks.shape[1:]))).sum(1)
    kept: list[int] = []
    for i in np.argsort(-np.asarray(scores), kind="stable"):
        x0, y0, x1, y1 = boxes[i]
        duplicate = False
        for k in kept:
            kx0, ky0, kx1, ky1 = boxes[k]
            ix0, iy0, ix1, iy1 = max(x0, kx0), max(y0, ky0), min(x1, kx1), min(y1, ky1)
            if ix0 >= ix1 or iy0 >= iy1:
                continue
            inter = int(np.logical_and(masks[i, iy0:iy1, ix0:ix1], masks[k, iy0:iy1, ix0:ix1]).sum())
            union = int(areas[i] + areas[k] - inter)
            if union > 0 and inter / union > iou_threshold:
                duplicate = True
                break
        if not duplicate:
            kept.append(int(i))
    return np.asarray(kept, np.int64)


def clean_mask(mask: np.ndarray, min_area: int) -> np.ndarray:
    """A boolean mask with holes and islands smaller than ``min_area`` pixels removed."""
    if min_area <= 0:
        return mask
    holes, count = ndimage.label(~mask)
    if count:
        sizes = ndimage.sum_labels(np.ones_like(mask), holes, np.arange(1, count + 1))
        mask = mask | np.isin(holes, 1 + np.flatnonzero(sizes < min_area))
    islands, count = ndimage.label(mask)
    if count:
        sizes = ndimage.sum_labels(np.ones_like(mask), islands, np.arange(1, count + 1))
        keep = sizes >= min_area
        if not keep.any():  # SAM keeps the largest island when every island is small
            keep[int(np.argmax(sizes))] = True
        mask = np.isin(islands, 1 + np.flatnonzero(keep))
    return mask
