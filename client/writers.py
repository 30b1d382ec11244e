"""Output files (label TIFF, cells CSV, overlay PNG) written atomically, and the --boxes CSV reader.

Each writer writes a temporary file in the destination folder and renames it over the target,
so a reader never sees a half-written file and an interrupted run leaves no partial output.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from cellsam_triton.errors import UserError

from .labels import writer_dtype
from .types import CELL_COLUMNS

BOX_COLUMNS = ("x0", "y0", "x1", "y1")
OUTLINE_RGB = (255, 255, 0)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed onto it when the block succeeds, removed if not."""
    path = Path(path)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temp)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_labels_tiff(path: str | Path, labels: np.ndarray) -> None:
    """Label image as a zlib-compressed TIFF: uint16 when the largest label fits, else uint32."""
    import tifffile

    array = np.asarray(labels)
    with atomic_path(path) as temp:
        tifffile.imwrite(temp, array.astype(writer_dtype(array), copy=False), compression="zlib")


def write_cells_csv(path: str | Path, rows: Sequence[dict]) -> None:
    """Cells table with header label,x0,y0,x1,y1,score,area (scores to 6 significant digits)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CELL_COLUMNS)
    for row in rows:
        writer.writerow([f"{row[c]:.6g}" if c == "score" else row[c] for c in CELL_COLUMNS])
    with atomic_path(path) as temp:
        temp.write_text(text.getvalue())


def display_rgb(image: np.ndarray) -> np.ndarray:
    """Any 2-D or 3-D (1-3 channels, either end) image -> uint8 [H,W,3] for viewing.

    Each channel is stretched between its 0.5th and 99.5th percentiles; grey images are
    repeated into all three channels, blank channel slots stay black.
    """
    from .images import to_channels_last3

    array = np.asarray(image)
    grey = array.ndim == 2 or min(array.shape) == 1
    hw3 = to_channels_last3(array)
    if grey:
        hw3 = np.repeat(hw3[:, :, 2:], 3, axis=2)
    low = np.percentile(hw3, 0.5, axis=(0, 1))
    high = np.percentile(hw3, 99.5, axis=(0, 1))
    span = np.where(high > low, high - low, 1.0)
    return (np.clip((hw3 - low) / span, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def outlines(labels: np.ndarray) -> np.ndarray:
    """Boolean [H,W]: labelled pixels with a 4-neighbour of another value (or the image edge)."""
    padded = np.pad(labels, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    edge = np.zeros(labels.shape, bool)
    for shifted in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
        edge |= shifted != centre
    return edge & (labels != 0)


def write_overlay_png(path: str | Path, image: np.ndarray, labels: np.ndarray) -> None:
    """The image, contrast-stretched to 8 bits, with each cell's outline drawn in yellow."""
    from PIL import Image

    rgb = display_rgb(image)
    if rgb.shape[:2] != labels.shape:
        raise UserError(f"overlay: image {rgb.shape[:2]} and labels {labels.shape} differ in size")
    rgb[outlines(labels)] = OUTLINE_RGB
    with atomic_path(path) as temp:
        Image.fromarray(rgb).save(temp, format="PNG")


def read_boxes_csv(path: str | Path) -> np.ndarray:
    """Prompt boxes from a CSV with header x0,y0,x1,y1 (input pixels) -> float32 [N,4].

    A file with only the header (or empty) gives no boxes. Raises `UserError` naming the file
    and line for a wrong header, a non-number, NaN/inf, or a box with x1 <= x0 or y1 <= y0.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"{path}: cannot read boxes ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: boxes file is not text") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        return np.zeros((0, 4), np.float32)
    header = tuple(cell.strip().lower() for cell in lines[0][1].split(","))
    if header != BOX_COLUMNS:
        raise UserError(f"{path}: boxes header must be {','.join(BOX_COLUMNS)}, got {lines[0][1].strip()!r}")
    boxes = []
    for number, line in lines[1:]:
        cells = line.split(",")
        if len(cells) != 4:
            raise UserError(f"{path}:{number}: expected 4 values, got {len(cells)}")
        try:
            box = [float(cell) for cell in cells]
        except ValueError:
            raise UserError(f"{path}:{number}: not a number in {line.strip()!r}") from None
        if not all(np.isfinite(box)):
            raise UserError(f"{path}:{number}: NaN or infinite value in {line.strip()!r}")
        if box[2] <= box[0] or box[3] <= box[1]:
            raise UserError(f"{path}:{number}: box needs x1 > x0 and y1 > y0, got {line.strip()!r}")
        boxes.append(box)
    return np.asarray(boxes, np.float32).reshape(-1, 4)
