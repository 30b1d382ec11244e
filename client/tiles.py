"""Native-resolution tiling for the LiteMedSAM family (numpy only): the one tile grid, core
ownership and tile-to-image mask placement of the whole-image rules, slides, grid mode and the
detector's evaluation.

An image is covered by ``tile`` x ``tile`` windows that overlap by at least ``overlap`` pixels;
images smaller than a tile are zero-padded. Each tile owns a *core* rectangle; the cores
partition the image, and a core edge shared by two tiles lies in the middle of their overlap,
so it is at least ``overlap // 2`` pixels from either tile's border. A cell is kept by the one
tile whose core holds its centre; cells up to ``overlap // 2`` pixels across (centre to the
far edge) are then never cut by that tile's border.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cellsam_triton.contracts import TILE_OVERLAP, Family
from cellsam_triton.errors import UserError

TILE = 256
OVERLAP = TILE_OVERLAP


@dataclass(frozen=True)
class Tile:
    """One window: top-left ``(y0, x0)`` in image pixels, side ``size``, and its core.

    The core is ``[cy0, cy1) x [cx0, cx1)`` in image pixels; the window may extend past the
    image's bottom/right edge (zero padding) only when the image is smaller than a tile.
    """

    y0: int
    x0: int
    size: int
    cy0: int
    cy1: int
    cx0: int
    cx1: int

    @property
    def window(self) -> tuple[slice, slice]:
        """Slices of the image covered by this tile (clipped to the image by numpy)."""
        return slice(self.y0, self.y0 + self.size), slice(self.x0, self.x0 + self.size)

    def owns(self, y: float, x: float) -> bool:
        """Whether the point ``(y, x)`` (image pixels, any float) lies in this tile's core."""
        return self.cy0 <= y < self.cy1 and self.cx0 <= x < self.cx1


def axis_tiles(length: int, tile: int, overlap: int) -> int:
    """How many windows cover ``length`` pixels along one axis."""
    return 1 if length <= tile else math.ceil((length - overlap) / (tile - overlap))


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread window starts along one axis, consecutive windows overlapping >= overlap."""
    if length <= tile:
        return [0]
    count = axis_tiles(length, tile, overlap)
    span = length - tile
    return [round(i * span / (count - 1)) for i in range(count)]


def _cores(starts: list[int], length: int, tile: int) -> list[tuple[int, int]]:
    """Core interval of each window: borders in the middle of each overlap; they partition [0, length)."""
    cuts = [0] + [(a + tile + b) // 2 for a, b in zip(starts, starts[1:])] + [length]
    return list(zip(cuts, cuts[1:]))


def tile_grid(height: int, width: int, tile: int = TILE, overlap: int = OVERLAP) -> list[Tile]:
    """Tiles covering a ``height`` x ``width`` image, row-major."""
    if height < 1 or width < 1:
        raise UserError(f"cannot tile an empty image ({height}x{width})")
    if not 0 <= overlap < tile:
        raise UserError(f"tile overlap must be in [0, {tile}), got {overlap}")
    ys, xs = _starts(height, tile, overlap), _starts(width, tile, overlap)
    ycores, xcores = _cores(ys, height, tile), _cores(xs, width, tile)
    return [
        Tile(y0, x0, tile, cy0, cy1, cx0, cx1)
        for y0, (cy0, cy1) in zip(ys, ycores)
        for x0, (cx0, cx1) in zip(xs, xcores)
    ]


def family_tiles(family: Family, height: int, width: int) -> list[Tile]:
    """The tile grid a tiled family (LITE and its kin) segments a ``height`` x ``width`` image with."""
    return tile_grid(height, width, family.input_size, family.tile_overlap)


def owned(boxes: np.ndarray, tile: Tile) -> np.ndarray:
    """Indices of the boxes (xyxy in the tile's frame) whose centre lies in the tile's core: the
    cells this tile keeps (each cell of the image is kept by exactly one tile)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    cy = tile.y0 + (b[:, 1] + b[:, 3]) / 2
    cx = tile.x0 + (b[:, 0] + b[:, 2]) / 2
    inside = (cy >= tile.cy0) & (cy < tile.cy1) & (cx >= tile.cx0) & (cx < tile.cx1)
    return np.flatnonzero(inside).astype(np.int64)


def core_prompt(tile: Tile) -> np.ndarray:
    """The tile's core in its own frame (x0, y0, x1, y1), one pixel wider on every side: the
    pipeline decodes only detections centred there, a superset of the ones :func:`owned` keeps
    (the margin absorbs float32 rounding), so the cells are the same and no unowned box is decoded."""
    return np.array([tile.cx0 - tile.x0 - 1, tile.cy0 - tile.y0 - 1, tile.cx1 - tile.x0 + 1, tile.cy1 - tile.y0 + 1], np.float32)


def mask_block(logits: np.ndarray, tile: Tile, shape: tuple[int, int], above: float) -> tuple[slice, slice, np.ndarray]:
    """A tile mask's logits as a ``(rows, cols, logits)`` block in the image, cropped to its hot part."""
    h = min(tile.size, shape[0] - tile.y0)
    w = min(tile.size, shape[1] - tile.x0)
    mask = np.asarray(logits[:h, :w], np.float32)
    hot = mask > above
    rows, cols = np.flatnonzero(hot.any(axis=1)), np.flatnonzero(hot.any(axis=0))
    if rows.size == 0:
        return slice(0, 0), slice(0, 0), np.zeros((0, 0), np.float32)
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return slice(tile.y0 + r0, tile.y0 + r1), slice(tile.x0 + c0, tile.x0 + c1), mask[r0:r1, c0:c1]


def lite_normalize(image: np.ndarray) -> np.ndarray:
    """LiteMedSAM input convention: float32 [H,W,3], min-max over the whole image to [0, 1].

    Grey images ([H,W] or [H,W,1]) are replicated to 3 channels; 2 channels get an empty
    third one. Normalising the whole image (not each tile) keeps empty background tiles dark
    instead of stretching their noise; a constant image becomes all zeros.
    """
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] > 3 or array.shape[2] < 1:
        raise UserError(f"expected an image [H,W] or [H,W,C] with C <= 3, got shape {array.shape}")
    array = array.astype(np.float32)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 2:
        array = np.concatenate([array, np.zeros_like(array[:, :, :1])], axis=2)
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros(array.shape, np.float32)
    return ((array - low) / (high - low)).astype(np.float32)


def tile_input(norm_image: np.ndarray, tile: Tile) -> np.ndarray:
    """The encoder input of one tile: float32 [1,3,size,size], zero-padded past the image."""
    crop = norm_image[tile.window]
    out = np.zeros((1, 3, tile.size, tile.size), np.float32)
    out[0, :, : crop.shape[0], : crop.shape[1]] = np.moveaxis(crop, -1, 0)
    return out
