"""Training views of DSB images for the LiteMedSAM trainers: each one a deterministic function of its key.

A view key is ``<id>`` (the image itself) or ``<id>@<kind><n>``; the cache stores one embedding
file per key, so a view must be reproducible from its key alone (its random draws are seeded by
the key):

- ``@d<k>`` (k = 1..7): dihedral view ``k`` (quarter turns, then a left-right flip for k >= 4);
  rotations of the image, not of the embedding (which is not equivariant).
- ``@c<k>`` (k = 1..): stain/colour view for stained (H&E-like) tissue: the stain densities in
  HED space (Ruifrok-Johnston, ``skimage.color.rgb2hed``) scaled by ``1 +- HED_SCALE`` and shifted
  by ``+- HED_SHIFT`` per stain (Tellez et al. 2018), then hue turned by ``+- HUE_SHIFT``,
  saturation scaled by ``1 +- SATURATION`` and a gamma in ``[1/GAMMA, GAMMA]``; dihedral view
  ``k % 8`` on top.
- ``@s`` : the view the client sends for small cells (``client/autoscale.py``): enlarged by the
  tile-snapped factor of the default family (bilinear image, nearest labels), for train images
  whose median ground-truth cell size is below the family's ``auto_scale_below``.
- ``@i<k>``: inverted intensities (brightfield-like: dark nuclei on a bright background) and
  dihedral view ``k`` (0..7).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from cellsam_triton.client.autoscale import auto_factor, resize_image
from cellsam_triton.client.labels import cells_table
from cellsam_triton.contracts import LITE
from cellsam_triton.datasets import load_sample

DIHEDRAL_VIEWS = 8
COLOR_VERSION = 1  # bump when the colour draws change: cached views are keyed by their name
HED_SCALE, HED_SHIFT = 0.25, 0.02
HUE_SHIFT, SATURATION, GAMMA = 0.04, 0.3, 1.25


def dihedral(array: np.ndarray, k: int) -> np.ndarray:
    """View ``k`` of 8 of the first two axes: ``k % 4`` quarter turns, then a left-right flip if k >= 4."""
    out = np.rot90(array, k % 4, axes=(0, 1))
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


def view_id(sample_id: str, k: int) -> str:
    """Key of dihedral view ``k`` of an image (view 0 is the image itself)."""
    return sample_id if k == 0 else f"{sample_id}@d{k}"


def color_view_id(sample_id: str, k: int) -> str:
    """Key of stain/colour view ``k`` (>= 1) of an image."""
    return f"{sample_id}@c{COLOR_VERSION}.{k}"


def scale_view_id(sample_id: str) -> str:
    """Key of the auto-scale view of an image."""
    return f"{sample_id}@s"


def invert_view_id(sample_id: str, k: int) -> str:
    """Key of the inverted-intensity view of an image, in dihedral view ``k``."""
    return f"{sample_id}@i{k}"


def _rng(key: str) -> np.random.Generator:
    return np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:16], 16))


def stain_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 [H,W,3] with its HED stain densities, hue, saturation and gamma perturbed."""
    from skimage.color import hed2rgb, hsv2rgb, rgb2hed, rgb2hsv

    hed = rgb2hed(image)
    scale = rng.uniform(1 - HED_SCALE, 1 + HED_SCALE, 3)
    shift = rng.uniform(-HED_SHIFT, HED_SHIFT, 3)
    rgb = np.clip(hed2rgb(hed * scale + shift), 0, 1)
    hsv = rgb2hsv(rgb)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-HUE_SHIFT, HUE_SHIFT)) % 1.0
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1 - SATURATION, 1 + SATURATION), 0, 1)
    rgb = np.clip(hsv2rgb(hsv), 0, 1) ** np.exp(rng.uniform(-np.log(GAMMA), np.log(GAMMA)))
    return np.rint(rgb * 255).astype(np.uint8)


def auto_scale_factor(labels: np.ndarray) -> float:
    """The client's enlargement (``autoscale.auto_factor``) for an image with these cells as found
    cells (1.0: sent at native scale)."""
    cells = cells_table(labels.astype(np.int32, copy=False), np.ones(int(labels.max()), np.float64))
    return auto_factor(cells, LITE, labels.shape)


def resize_labels(labels: np.ndarray, factor: float) -> np.ndarray:
    """Labels enlarged by ``factor`` (nearest, at pixel centres), to the shape ``resize_image`` gives."""
    height, width = labels.shape
    out_h, out_w = max(1, round(height * factor)), max(1, round(width * factor))
    rows = np.minimum(((np.arange(out_h) + 0.5) * height / out_h).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * width / out_w).astype(np.int64), width - 1)
    return labels[rows[:, None], cols[None, :]]


def load_view(root: str | Path, view: str) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H,W,3], labels [H,W]) of a view key (see the module docstring)."""
    sample_id, _, suffix = view.partition("@")
    image, labels = load_sample(root, sample_id)
    if not suffix:
        return image, labels
    kind, arg = suffix[0], suffix[1:]
    if kind == "d":
        k = int(arg)
        return dihedral(image, k), dihedral(labels, k)
    if kind == "c":
        k = int(arg.partition(".")[2])
        return dihedral(stain_jitter(image, _rng(view)), k % DIHEDRAL_VIEWS), dihedral(labels, k % DIHEDRAL_VIEWS)
    if kind == "s":
        factor = auto_scale_factor(labels)
        return resize_image(image, factor), resize_labels(labels, factor)
    if kind == "i":
        k = int(arg)
        return dihedral(255 - image, k), dihedral(labels, k)
    raise ValueError(f"unknown view key {view!r}")


def parse_kinds(text: str) -> set[str]:
    """Comma-separated image kinds ('' for none)."""
    return {k.strip() for k in text.split(",") if k.strip()}


def augmented_views(
    root: str | Path, train_ids: list[str], kinds: dict[str, str], dihedral_kinds: set[str], color_kinds: set[str],
    color_views: int, scale_kinds: set[str], invert_kinds: set[str],
) -> list[str]:
    """Keys of every extra training view the options ask for (train images only), in a fixed order."""
    views = []
    for i in train_ids:
        kind = kinds[i]
        if kind in dihedral_kinds:
            views += [view_id(i, k) for k in range(1, DIHEDRAL_VIEWS)]
        if kind in color_kinds:
            views += [color_view_id(i, k) for k in range(1, color_views + 1)]
        if kind in invert_kinds:
            views += [invert_view_id(i, k) for k in (0, 5)]
    for i in train_ids:
        if kinds[i] in scale_kinds and auto_scale_factor(load_sample(root, i)[1]) > 1.0:
            views.append(scale_view_id(i))
    return views
