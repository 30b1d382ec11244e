"""Training views of ONE annotated image for `cellsam-triton finetune` (numpy + scipy).

The image is first brought to the scale it is served at: a family that auto-scales
(client/autoscale.py) enlarges images whose median cell is small, so the one image is enlarged by
the factor the served model would pick from its labelled cells (:func:`at_served_scale`; the
default model's point decoder was trained at those scales too). It is normalised exactly as the
served LiteMedSAM tiles are (``client.tiles.lite_normalize`` of the whole image), then every
training step sees a new augmented view: random zoom (0.75-1.33), random 256x256 window (zero-padded when smaller), flips, 90-degree turns and a random gamma /
contrast change. Prompts follow CellSeg1: one point drawn uniformly from each sampled instance,
its full mask as the target; optionally some background points whose target is empty (predicted
IoU target 0), so grid points off the cells learn to score low.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from cellsam_triton.errors import UserError

MIN_INSTANCE_AREA = 8  # pixels of an instance inside a view for it to be prompted
ZOOM_RANGE = (0.75, 4 / 3)
GAMMA_RANGE = (0.7, 1.4)


@dataclass
class View:
    """One augmented training view: normalised image [3,s,s] and instance labels [s,s]."""

    image: np.ndarray
    labels: np.ndarray


@dataclass
class Prompts:
    """Point prompts of one view: xy [N,2] (frame pixels), targets [N,s,s] bool, foreground [N] bool."""

    points: np.ndarray
    targets: np.ndarray
    foreground: np.ndarray


def read_pair(image_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image [H,W] or [H,W,C], labels [H,W] int) from files; one-line errors for bad input."""
    from cellsam_triton.client.images import read_image
    from cellsam_triton.client.lite_rules import channels_last

    image = channels_last(read_image(image_path))
    labels = read_image(labels_path)
    return image, check_labels(labels, image.shape[:2], str(labels_path))


def at_served_scale(image: np.ndarray, labels: np.ndarray, family) -> tuple[np.ndarray, np.ndarray, float]:
    """(image, labels, factor): enlarged by the auto-scale factor ``family`` picks for these cells
    (their boxes' median size, client/autoscale.py); factor 1.0 and the inputs when none."""
    from cellsam_triton.client.autoscale import auto_factor, labels_to_shape, resize_image
    from cellsam_triton.client.labels import cells_table

    factor = auto_factor(cells_table(labels, np.empty(0)), family, labels.shape)
    if factor == 1.0:
        return image, labels, 1.0
    big = resize_image(image, factor)
    return big, labels_to_shape(labels, big.shape[:2]), factor


def check_labels(labels: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """Integer instance labels [H,W] (0 = background) matching ``shape``, with at least one instance."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise UserError(f"{name}: labels must be a 2-D instance label image, got shape {labels.shape}")
    if tuple(labels.shape) != tuple(shape):
        raise UserError(f"{name}: labels are {labels.shape[0]}x{labels.shape[1]}, the image {shape[0]}x{shape[1]}")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise UserError(f"{name}: labels must be integers (instance ids)")
    if labels.min() < 0:
        raise UserError(f"{name}: labels must not be negative")
    labels = labels.astype(np.int64)
    if labels.max() == 0:
        raise UserError(f"{name}: no labelled instance (all pixels are 0)")
    return labels


def normalise(image: np.ndarray) -> np.ndarray:
    """[H,W,3] float32 in [0, 1], exactly the served tiles' normalisation."""
    from cellsam_triton.client.tiles import lite_normalize

    return lite_normalize(image)


def random_view(norm: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator) -> View:
    """One augmented ``size`` x ``size`` view of a normalised image [H,W,3] and its labels."""
    zoom = float(np.exp(rng.uniform(*np.log(ZOOM_RANGE))))
    image = ndimage.zoom(norm, (zoom, zoom, 1), order=1, grid_mode=True, mode="nearest")
    lab = ndimage.zoom(labels, zoom, order=0, grid_mode=True, mode="nearest")
    height, width = lab.shape
    y0 = int(rng.integers(0, max(1, height - size + 1)))
    x0 = int(rng.integers(0, max(1, width - size + 1)))
    image, lab = image[y0:y0 + size, x0:x0 + size], lab[y0:y0 + size, x0:x0 + size]
    out_image = np.zeros((size, size, 3), np.float32)
    out_labels = np.zeros((size, size), np.int64)
    out_image[: image.shape[0], : image.shape[1]] = image
    out_labels[: lab.shape[0], : lab.shape[1]] = lab
    if rng.random() < 0.5:
        out_image, out_labels = out_image[:, ::-1], out_labels[:, ::-1]
    if rng.random() < 0.5:
        out_image, out_labels = out_image[::-1], out_labels[::-1]
    turns = int(rng.integers(0, 4))
    out_image, out_labels = np.rot90(out_image, turns), np.rot90(out_labels, turns)
    gamma = rng.uniform(*GAMMA_RANGE)
    contrast = rng.uniform(0.8, 1.0)
    out_image = np.clip(out_image, 0, 1) ** gamma * contrast
    return View(np.ascontiguousarray(np.moveaxis(out_image, -1, 0), dtype=np.float32), np.ascontiguousarray(out_labels))


def sample_prompts(view: View, count: int, background: int, rng: np.random.Generator) -> Prompts:
    """Up to ``count`` instance points (one per instance, uniform inside it) and ``background`` points."""
    labels = view.labels
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    ids = ids[areas >= MIN_INSTANCE_AREA]
    chosen = rng.permutation(ids)[:count]
    points, targets = [], []
    for label in chosen:
        mask = labels == label
        ys, xs = np.nonzero(mask)
        k = int(rng.integers(0, len(ys)))
        points.append((xs[k], ys[k]))
        targets.append(mask)
    fg = len(points)
    ys, xs = np.nonzero(ndimage.binary_erosion(labels == 0, iterations=2))
    for k in rng.integers(0, len(ys), size=background if len(ys) else 0):
        points.append((xs[k], ys[k]))
        targets.append(np.zeros_like(labels, dtype=bool))
    size = labels.shape[0]
    return Prompts(
        np.asarray(points, np.float32).reshape(-1, 2),
        np.asarray(targets, bool).reshape(-1, size, size),
        np.arange(len(points)) < fg,
    )
