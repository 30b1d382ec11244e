"""Output files written atomically (label TIFF, cells CSV, cells GeoJSON, OME-Zarr, overlay PNG),
and the --boxes CSV reader (client/points.py reads --points).

Each writer writes a temporary file (or folder) in the destination folder and renames it over the
target, so a reader never sees a half-written output and an interrupted run leaves no partial one.
`write_formats` writes any of `FORMATS` from a label image, its cells table and the image.

Coordinates are input pixels with pixel edges on integers: pixel (row r, column c) covers
x in [c, c+1], y in [r, r+1] (QuPath's convention; y grows downwards).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from cellsam_triton.errors import UserError

from .labels import writer_dtype
from .types import CELL_COLUMNS

BOX_COLUMNS = ("x0", "y0", "x1", "y1")
OUTLINE_RGB = (255, 255, 0)
FORMATS = ("tif", "csv", "geojson", "ome-zarr")
DEFAULT_FORMATS = ("tif", "csv")
FORMAT_SUFFIXES = {"tif": "_labels.tif", "csv": "_cells.csv", "geojson": "_cells.geojson", "ome-zarr": ".ome.zarr"}
LABELS_NAME = "cells"  # the OME-Zarr label image: <stem>.ome.zarr/labels/cells
PYRAMID_TOP = 64  # OME-Zarr pyramids halve until the longer side would drop below this
ZARR_CHUNK = 512


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


def prompt_csv_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """The non-blank lines of a prompt CSV (``what``: "boxes", "points") with their 1-based
    numbers; a `UserError` naming the file when it cannot be read or is not text."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: {what} file is not text") from None
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_boxes_csv(path: str | Path) -> np.ndarray:
    """Prompt boxes from a CSV with header x0,y0,x1,y1 (input pixels) -> float32 [N,4].

    A file with only the header (or empty) gives no boxes. Raises `UserError` naming the file
    and line for a wrong header, a non-number, NaN/inf, or a box with x1 <= x0 or y1 <= y0.
    """
    path = Path(path)
    lines = prompt_csv_lines(path, "boxes")
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


# --- output formats: --format tif,csv,geojson,ome-zarr ---------------------------------------


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"tif,csv,geojson,ome-zarr"`` (any subset, any order; ``tiff`` is ``tif``) -> the names in
    order, each once. Raises `UserError` naming an unknown format."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for item in items:
        name = item.strip().lower()
        if not name:
            continue
        name = {"tiff": "tif", "ome_zarr": "ome-zarr", "omezarr": "ome-zarr"}.get(name, name)
        if name not in FORMATS:
            raise UserError(f"--format: unknown format {item.strip()!r}; choose from {','.join(FORMATS)}")
        if name not in names:
            names.append(name)
    if not names:
        raise UserError(f"--format: name at least one of {','.join(FORMATS)}")
    return tuple(names)


def format_paths(out_dir: str | Path, stem: str, formats: Sequence[str] = FORMATS) -> dict[str, Path]:
    """Where each format of one input goes: ``<stem>_labels.tif``, ``<stem>_cells.csv``,
    ``<stem>_cells.geojson``, ``<stem>.ome.zarr``."""
    return {name: Path(out_dir) / f"{stem}{FORMAT_SUFFIXES[name]}" for name in formats}


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``path``; put in its place (replacing an older output) when the
    block succeeds, removed if not."""
    path = Path(path)
    temp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield temp
        old = None
        if path.exists() or path.is_symlink():
            old = temp.with_name(temp.name[: -len(".tmp")] + ".old")
            os.replace(path, old)
        os.replace(temp, path)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def mask_geometry(mask: np.ndarray, x0: int = 0, y0: int = 0) -> Any:
    """The exact outline of a boolean mask's pixels as a shapely geometry in input pixels.

    ``(x0, y0)`` is where the mask's top-left pixel lies. The outline follows pixel edges (pixel
    (r, c) covers x in [c, c+1], y in [r, r+1]): it is the union of the mask's row runs, one box
    each, so its area is the pixel count. A Polygon (holes kept as interior rings) when the pixels
    are 4-connected, else a MultiPolygon of the pieces; valid (shapely ``is_valid``), collinear
    vertices dropped, exterior rings counter-clockwise as RFC 7946 asks.
    """
    import shapely

    mask = np.asarray(mask, bool)
    steps = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, cols = np.nonzero(steps)  # row-major: in each row a run's start comes before its end
    start = steps[rows, cols] > 0
    boxes = shapely.box(x0 + cols[start], y0 + rows[start], x0 + cols[~start], y0 + rows[start] + 1)
    geometry = shapely.simplify(shapely.union_all(boxes), 0.0)  # tolerance 0: collinear points only
    if not geometry.is_valid:
        geometry = shapely.make_valid(geometry)
    return shapely.orient_polygons(geometry)


def _geojson_geometry(geometry: Any) -> dict:
    """A shapely (Multi)Polygon as a GeoJSON geometry with integer pixel-edge coordinates."""
    import shapely

    def ring(line: Any) -> list:
        return np.asarray(line.coords).round().astype(np.int64).tolist()

    polygons = [[ring(p.exterior), *(ring(r) for r in p.interiors)]
                for p in shapely.get_parts(geometry) if p.geom_type == "Polygon" and not p.is_empty]
    if len(polygons) == 1:
        return {"type": "Polygon", "coordinates": polygons[0]}
    return {"type": "MultiPolygon", "coordinates": polygons}


def cell_feature(row: dict, geometry: Any) -> dict:
    """One cell as a GeoJSON Feature that QuPath imports as a detection: ``objectType``, ``name``
    and numeric ``measurements`` (label, area in pixels, detector score), plus ``label``."""
    label = int(row["label"])
    measurements: dict[str, float | int] = {"label": label, "area": int(row["area"])}
    score = float(row.get("score", math.nan))
    if math.isfinite(score):
        measurements["score"] = float(f"{score:.6g}")
    return {
        "type": "Feature",
        "id": label,
        "geometry": _geojson_geometry(geometry),
        "properties": {"objectType": "detection", "name": f"cell {label}", "label": label, "measurements": measurements},
    }


def iter_cell_features(labels: Any, rows: Sequence[dict], band: int | None = None) -> Iterator[dict]:
    """One GeoJSON Feature per row of the cells table, outlining that label's pixels in ``labels``.

    ``labels`` is a [H,W] array (NumPy, or lazy: a Zarr array); with ``band`` it is read ``band``
    rows at a time (plus the tallest cell starting in them), so a slide's labels are never read
    whole. Features come in table order (by band, then table order, when banded).
    """
    band = int(band) if band else max(1, int(labels.shape[0]))
    groups: dict[int, list[dict]] = {}
    for row in rows:
        groups.setdefault(int(row["y0"]) // band, []).append(row)
    for key in sorted(groups):
        group = groups[key]
        ry0, ry1 = min(int(r["y0"]) for r in group), max(int(r["y1"]) for r in group)
        rx0, rx1 = min(int(r["x0"]) for r in group), max(int(r["x1"]) for r in group)
        region = np.asarray(labels[ry0:ry1, rx0:rx1])
        for row in group:
            x0, y0 = int(row["x0"]), int(row["y0"])
            crop = region[y0 - ry0 : int(row["y1"]) - ry0, x0 - rx0 : int(row["x1"]) - rx0] == int(row["label"])
            if crop.any():
                yield cell_feature(row, mask_geometry(crop, x0, y0))


def write_cells_geojson(path: str | Path, labels: Any, rows: Sequence[dict], band: int | None = None) -> int:
    """A GeoJSON FeatureCollection with one polygon per cell (`iter_cell_features`), streamed to
    the file feature by feature. Returns the number of features."""
    count = 0
    with atomic_path(path) as temp:
        with open(temp, "w") as handle:
            handle.write('{"type":"FeatureCollection","features":[')
            for feature in iter_cell_features(labels, rows, band):
                handle.write(("," if count else "") + "\n" + json.dumps(feature, separators=(",", ":"), allow_nan=False))
                count += 1
            handle.write("\n]}\n")
    return count


def pyramid_levels(height: int, width: int, top: int = PYRAMID_TOP) -> int:
    """Resolution levels of an OME-Zarr pyramid: full size, then halved while the longer side stays
    at least ``top`` pixels (and the shorter one at least 1)."""
    levels = 1
    while max(height, width) >> levels >= top and min(height, width) >> levels >= 1:
        levels += 1
    return levels


class _ChannelsFirst:
    """A lazily read image (``shape`` (H, W), ``read(y0, y1, x0, x1)`` -> pixels, channels last),
    e.g. a `slides.Slide`, as a [C,H,W] (or [H,W]) array that dask reads region by region."""

    def __init__(self, image: Any) -> None:
        self._image = image
        sample = np.asarray(image.read(0, 1, 0, 1))
        self.dtype = sample.dtype
        height, width = (int(n) for n in image.shape[:2])
        self.shape = (height, width) if sample.ndim == 2 else (int(sample.shape[2]), height, width)
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = (key if isinstance(key, tuple) else (key,)) + (slice(None),) * self.ndim
        y0, y1, _ = key[self.ndim - 2].indices(self.shape[-2])
        x0, x1, _ = key[self.ndim - 1].indices(self.shape[-1])
        block = np.asarray(self._image.read(y0, y1, x0, x1))
        return block if self.ndim == 2 else np.moveaxis(block, -1, 0)[key[0]]


def _image_source(image: Any) -> Any:
    """The image as a [H,W] or [C,H,W] array-like: NumPy images get their channel axis (the
    smallest, at either end) moved first; lazy images are wrapped in `_ChannelsFirst`."""
    if hasattr(image, "read") and not isinstance(image, np.ndarray):
        return _ChannelsFirst(image)
    array = np.asarray(image)
    if array.ndim == 3:
        return np.moveaxis(array, int(np.argmin(array.shape)), 0)
    if array.ndim != 2:
        raise UserError(f"ome-zarr: expected a 2-D image (with channels), got shape {array.shape}")
    return array


def write_ome_zarr(path: str | Path, image: Any, labels: Any, *, label_dtype: Any = None, levels: int | None = None,
                   chunk: int = ZARR_CHUNK, name: str | None = None) -> int:
    """An OME-Zarr image (NGFF 0.4, Zarr v2 format) with its label image, written by ome-zarr-py.

    ``path`` holds the image as read (axes ``y,x``, or ``c,y,x`` with channels) in ``levels``
    resolutions (each 2x2-mean-downsampled from full size, shapes rounded down), and
    ``labels/cells`` the label image (axes ``y,x``, uint16 when every label fits, else uint32) in
    the same shapes, downsampled by nearest sampling (every 2^k-th pixel, from the middle of each
    block) so labels stay labels. Pixel sizes per level are the shape ratios, as ome-zarr-py writes
    them. ``image`` may be lazy (a `slides.Slide`) and ``labels`` a Zarr array: both are read and
    written chunk by chunk through dask, never whole. Returns the number of levels.
    """
    import dask
    import dask.array as da
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscale, write_multiscale_labels

    source = _image_source(image)
    height, width = (int(n) for n in labels.shape)
    if tuple(source.shape[-2:]) != (height, width):
        raise UserError(f"ome-zarr: image {tuple(source.shape[-2:])} and labels {(height, width)} differ in size")
    levels = int(levels or pyramid_levels(height, width))
    if levels < 1 or min(height, width) >> (levels - 1) < 1:
        raise UserError(f"ome-zarr: {levels} levels do not fit a {height}x{width} image")
    if label_dtype is None:
        label_dtype = writer_dtype(labels) if isinstance(labels, np.ndarray) else labels.dtype
    channels = source.ndim == 3
    spatial = (chunk, chunk)
    pixels = da.from_array(source, chunks=(source.shape[0], *spatial) if channels else spatial,
                           meta=np.empty((0,) * source.ndim, source.dtype))
    image_levels = [pixels]
    label_levels = [da.from_array(labels, chunks=spatial, meta=np.empty((0, 0), labels.dtype)).astype(label_dtype)]
    for level in range(1, levels):
        factor = 2**level
        axes = {source.ndim - 2: factor, source.ndim - 1: factor}
        mean = da.coarsen(np.mean, pixels, axes, trim_excess=True)
        image_levels.append((mean.round() if source.dtype.kind in "iu" else mean).astype(source.dtype))
        sampled = label_levels[0][factor // 2 :: factor, factor // 2 :: factor]
        label_levels.append(sampled[: height // factor, : width // factor])
    fmt = FormatV04()
    with atomic_folder(path) as temp, dask.config.set(scheduler="threads"):
        root = zarr.open_group(str(temp), mode="w", zarr_format=2)
        write_multiscale(image_levels, root, fmt=fmt, axes=["c", "y", "x"] if channels else ["y", "x"],
                         storage_options={"chunks": (1, *spatial) if channels else spatial},
                         name=name or Path(path).name.split(".")[0])
        write_multiscale_labels(label_levels, root, LABELS_NAME, fmt=fmt, axes=["y", "x"],
                                storage_options={"chunks": spatial}, label_metadata={"source": {"image": "../../"}})
    return levels


def write_format(name: str, path: str | Path, labels: Any, cells: Sequence[dict], image: Any = None) -> Path:
    """Write one format (a name from `FORMATS`) of a segmentation to ``path``: ``tif`` the label
    image, ``csv`` the cells table, ``geojson`` one polygon per cell, ``ome-zarr`` the image and
    its labels (needs ``image``, the input as read)."""
    if name == "tif":
        write_labels_tiff(path, labels)
    elif name == "csv":
        write_cells_csv(path, cells)
    elif name == "geojson":
        write_cells_geojson(path, labels, cells)
    elif name == "ome-zarr":
        if image is None:
            raise UserError("ome-zarr output needs the image as well as its labels")
        write_ome_zarr(path, image, labels)
    else:
        raise UserError(f"--format: unknown format {name!r}; choose from {','.join(FORMATS)}")
    return Path(path)


def write_formats(out_dir: str | Path, stem: str, labels: np.ndarray, cells: Sequence[dict], image: Any = None,
                  formats: Sequence[str] = DEFAULT_FORMATS) -> dict[str, Path]:
    """Write ``formats`` of one segmentation (label image, its cells table, the image as read) to
    ``out_dir/<stem>...`` (see `format_paths`); returns ``{format: path}``.

        write_formats("out", "cells", result.labels, result.cells, image, ("geojson", "ome-zarr"))
    """
    paths = format_paths(out_dir, stem, parse_formats(formats))
    for name, path in paths.items():
        write_format(name, path, labels, cells, image)
    return paths
