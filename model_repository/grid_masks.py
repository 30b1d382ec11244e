"""Automatic (point-grid) mask generation rules, numpy + scipy only (CellSeg1 / SAM AMG style).

Runs inside Triton's Python backend beside grid_generator.py and raster.py, so it imports nothing from the
project. All masks are low-resolution logits [N,m,m] of one crop; a mask is ``logit > 0``.
  point_grid       n x n points at cell centres of a box (SAM's build_point_grid)
  stability_score  |logit > +offset| / |logit > -offset|
  mask_nms         greedy mask-IoU NMS in score order (only box-overlapping pairs are compared)
  clean_mask       fill holes and drop islands smaller than ``min_area`` pixels
  crop_boxes       the overlapping crops of a crop layer (SAM's ``generate_crop_boxes``)
  crop_input       one crop of the frame, zoomed so its long side fills the encoder input
  crop_to_frame    a crop's low-res logits resampled onto the frame's low-res grid
  near_crop_edge   masks cut by a crop border that is not the image border
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

try:  # a package in the project, loose files beside model.py inside Triton
    from .raster import linear_weights, mask_boxes
except ImportError:
    from raster import linear_weights, mask_boxes

FAR = -1.0e4  # finite stand-in for -inf where logits are resampled


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


# --- crop layers ----------------------------------------------------------------------------------
def crop_boxes(width: int, height: int, n_layers: int, overlap_ratio: float) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) crops of layers 1..n_layers over a width x height image (frame pixels).

    Layer k has 2^k x 2^k crops overlapping by ``overlap_ratio`` of the short side / 2^(k-1)
    (SAM's rule); the whole image (layer 0) is not listed.
    """
    boxes = []
    short = min(width, height)
    for layer in range(1, n_layers + 1):
        n = 2 ** layer
        overlap = int(overlap_ratio * short * (2 / n))
        crop_w = int(np.ceil((overlap * (n - 1) + width) / n))
        crop_h = int(np.ceil((overlap * (n - 1) + height) / n))
        for i in range(n):
            for j in range(n):
                x0, y0 = (crop_w - overlap) * j, (crop_h - overlap) * i
                boxes.append((x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)))
    return boxes


def crop_scale(box: tuple[int, int, int, int], size: int) -> float:
    """Zoom of a crop: its long side becomes the encoder input size."""
    x0, y0, x1, y1 = box
    return size / max(x1 - x0, y1 - y0)


def crop_input(image: np.ndarray, box: tuple[int, int, int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Encoder input [1,3,s,s] of one crop of a frame [1,3,s,s] (bilinear zoom, zero padding) and its (h, w)."""
    size = image.shape[-1]
    x0, y0, x1, y1 = box
    zoom = crop_scale(box, size)
    h, w = min(size, int(round((y1 - y0) * zoom))), min(size, int(round((x1 - x0) * zoom)))
    wy = linear_weights(y0 + (np.arange(h) + 0.5) / zoom - 0.5, size)
    wx = linear_weights(x0 + (np.arange(w) + 0.5) / zoom - 0.5, size)
    out = np.zeros_like(image, dtype=np.float32)
    out[0, :, :h, :w] = np.einsum("yi,cij,xj->cyx", wy, image[0].astype(np.float64), wx)
    return out, (h, w)


def crop_to_frame(logits: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop-frame logits [N,m,m] -> frame low-res logits [N,m,m]; ``FAR`` outside the crop."""
    m = logits.shape[-1]
    x0, y0, x1, y1 = box
    zoom, per_pixel = crop_scale(box, size), m / size
    centres = (np.arange(m) + 0.5) / per_pixel  # frame pixel of each low-res cell centre
    inside_y = (centres >= y0) & (centres < y1)
    inside_x = (centres >= x0) & (centres < x1)
    wy = linear_weights((centres - y0) * zoom * per_pixel - 0.5, m)[inside_y]
    wx = linear_weights((centres - x0) * zoom * per_pixel - 0.5, m)[inside_x]
    out = np.full(logits.shape, FAR, np.float32)
    inner = np.einsum("yi,nij,xj->nyx", wy, np.maximum(logits, FAR).astype(np.float64), wx)
    out[np.ix_(np.arange(len(logits)), np.flatnonzero(inside_y), np.flatnonzero(inside_x))] = inner
    return out


def near_crop_edge(boxes: np.ndarray, crop: tuple[int, int, int, int], frame: tuple[int, int, int, int], tolerance: float) -> np.ndarray:
    """[N] whether a box (xyxy) touches a crop border (within ``tolerance``) that is not a frame border."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    crop_a, frame_a = np.asarray(crop, np.float64), np.asarray(frame, np.float64)
    near_crop = np.isclose(boxes, crop_a[None], atol=tolerance, rtol=0)
    near_frame = np.isclose(boxes, frame_a[None], atol=tolerance, rtol=0)
    return np.any(near_crop & ~near_frame, axis=1)
