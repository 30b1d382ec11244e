"""Frames the tiny CellFinder family segments differently: shared by the stream, batch and pool tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from tiny_family import image_with_cells

KINDS = 15  # distinct frames


def frame(k: int) -> np.ndarray:
    """A 64x64x3 frame whose bright grid cells (a subset of 4 diagonal ones) encode ``k % 15``."""
    cells = [c for bit, c in enumerate((0, 5, 10, 15)) if (k % KINDS + 1) >> bit & 1]
    grey = image_with_cells(cells)[0, 0] * 1000.0 + 10.0
    return np.repeat(grey[:, :, None], 3, axis=2)  # the tiny detector looks at channel 0


def write_frames(folder: Path, count: int) -> list[Path]:
    """``count`` TIFF files frame_000.tif ... holding ``frame(k)``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"frame_{k:03d}.tif" for k in range(count)]
    for k, path in enumerate(paths):
        tifffile.imwrite(path, frame(k).astype(np.float32))
    return paths
