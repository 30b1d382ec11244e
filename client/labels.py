"""Model-independent post-processing: masks -> label image -> cleaned labels -> cell table.

The rules are CellSAM's: mask i paints label i+1 and the label image is the maximum over masks
(later masks win where they overlap); then each label's holes are filled and labels smaller
than ``min_size`` pixels are removed, relabelling 1..N in label order.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from scipy.ndimage import binary_fill_holes, find_objects
from scipy.ndimage import label as connected_parts

LABEL_DTYPE = np.uint32


def logit_threshold(probability: float) -> float:
    """The logit t with sigmoid(x) > probability <=> x > t (-inf at 0, +inf at 1)."""
    if probability <= 0.0:
        return -math.inf
    if probability >= 1.0:
        return math.inf
    return math.log(probability / (1.0 - probability))


def paint_labels(
    blocks: Iterable[tuple[slice, slice, np.ndarray]], shape: tuple[int, int], above: float
) -> np.ndarray:
    """Paint mask i (a ``(rows, cols, logits)`` block) as label i+1 where its logit > ``above``.

    Masks are painted in order, so a later mask wins where masks overlap: the reference's
    maximum over ``mask_i * (i + 1)``. A block covers part of the image; pixels outside it
    belong to no mask. Returns uint32 [H,W].
    """
    labels = np.zeros(shape, LABEL_DTYPE)
    for index, (rows, cols, logits) in enumerate(blocks):
        if logits.size:
            labels[rows, cols][logits > above] = index + 1
    return labels


def paint_cells(
    blocks: Iterable[tuple[slice, slice, np.ndarray]], shape: tuple[int, int], above: float, min_size: int,
    seeds: Sequence[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`paint_labels` (later blocks on top; with point ``seeds``, :func:`paint_seeded`) then
    :func:`fill_holes_and_remove_small`: the label image and, for each label 1..n, the index of
    the block it was painted from."""
    painted = paint_labels(blocks, shape, above) if seeds is None else paint_seeded(blocks, seeds, shape, above)
    labels, origin = fill_holes_and_remove_small(painted, min_size)
    return labels, origin - 1


def paint_seeded(
    blocks: Iterable[tuple[slice, slice, np.ndarray]], seeds: Sequence[np.ndarray], shape: tuple[int, int], above: float
) -> np.ndarray:
    """Paint the masks of point prompts: mask i (a ``(rows, cols, logits)`` block) becomes label
    i+1 where its logit > ``above`` and is the highest of all masks there (the decoder's most
    confident cell takes a contested pixel; ties go to the earlier mask), then each label keeps only
    its connected parts that hold one of its own points ``seeds[i]`` ([n,2] pixel row, col), or its
    largest part if it holds none. So a click's cell is the region around the click, and a
    neighbour's mask spilling over a cell neither erases it nor leaves fragments. uint32 [H,W]."""
    labels = np.zeros(shape, LABEL_DTYPE)
    best = np.full(shape, -np.inf, np.float32)
    for index, (rows, cols, logits) in enumerate(blocks):
        if logits.size:
            wins = (logits > above) & (logits > best[rows, cols])
            labels[rows, cols][wins] = index + 1
            best[rows, cols][wins] = logits[wins]
    for index, box in enumerate(find_objects(labels)):
        if box is None:
            continue
        mine = labels[box] == index + 1
        parts, count = connected_parts(mine)
        if count < 2:
            continue
        local = np.asarray(seeds[index], np.int64).reshape(-1, 2) - (box[0].start, box[1].start)
        inside = (local >= 0).all(1) & (local[:, 0] < mine.shape[0]) & (local[:, 1] < mine.shape[1])
        held = parts[local[inside, 0], local[inside, 1]]
        keep = np.unique(held[held > 0])
        if keep.size == 0:
            keep = np.array([1 + int(np.argmax(np.bincount(parts.ravel())[1:]))])
        labels[box][mine & ~np.isin(parts, keep)] = 0
    return labels


def fill_holes_and_remove_small(labels: np.ndarray, min_size: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Fill holes in each label and drop labels of fewer than ``min_size`` pixels; relabel in order.

    Follows the reference (Cellpose's fill_holes_and_remove_small_masks) step for step, side
    effects included: labels are visited in increasing order over the bounding boxes found
    before any change; a removed label is cleared inside its box; a kept one has the holes of
    its box-cropped mask filled (overwriting whatever lies in them, even other labels) and is
    written back with the next free label. Works in place on ``labels`` (any integer dtype,
    2-D) and returns it with ``origin``: ``origin[k-1]`` is the input label that became label k.
    A label painted over by a later label's hole filling disappears, so labels may then skip
    a number, exactly as in the reference.
    """
    origin: list[int] = []
    for index, box in enumerate(find_objects(labels)):
        if box is None:
            continue
        window = labels[box]
        mine = window == index + 1
        count = int(mine.sum())
        if min_size > 0 and count < min_size:
            window[mine] = 0
        elif count > 0:
            window[binary_fill_holes(mine)] = len(origin) + 1
            origin.append(index + 1)
    return labels, np.asarray(origin, np.int64)


def cells_table(labels: np.ndarray, scores: np.ndarray) -> list[dict]:
    """One row per label present: label, x0, y0, x1, y1 (pixel extent, x1/y1 exclusive), score, area.

    ``scores[k-1]`` is label k's score (the detector score of the mask it came from).
    """
    areas = np.bincount(labels.ravel())
    rows = []
    for index, box in enumerate(find_objects(labels)):
        if box is None:
            continue
        ys, xs = box
        rows.append(
            {
                "label": index + 1,
                "x0": xs.start,
                "y0": ys.start,
                "x1": xs.stop,
                "y1": ys.stop,
                "score": float(scores[index]) if index < len(scores) else float("nan"),
                "area": int(areas[index + 1]),
            }
        )
    return rows


def writer_dtype(labels: np.ndarray) -> type:
    """uint16 when every label fits (max <= 65535), else uint32."""
    return np.uint16 if labels.size == 0 or int(labels.max()) <= np.iinfo(np.uint16).max else np.uint32
