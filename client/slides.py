"""Whole-slide images: lazy reading, windows segmented concurrently, labels to a tiled BigTIFF or Zarr.

Built on the LiteMedSAM rule set (``lite_rules`` / ``tiles``): the slide gets the very tile grid
the whole image would get (``tile_grid``), min-max normalised with the whole slide's range, and
each tile keeps the cells whose centre lies in its core. Tiles are grouped into *windows* by
where their core starts (``window`` x ``window`` pixels); a window reads just the slide region
its tiles cover, sends its tiles (through ``run``: concurrently) and paints its cells whole, so
no cell is cut at a window border and none is kept twice (cores partition the slide). Where
cells of two windows overlap, the lower-scored one wins, as in the whole-image rule.

Background skip (on by default, ``skip_background=False`` turns it off): a tile whose raw pixels
are uniform (max - min <= ``background_tolerance`` times the slide's value range; 0: exactly
uniform) holds no edge, hence no cell, and is not sent; a window made only of such tiles is not
even normalised. On a slide that is mostly empty glass only the tiles touching tissue reach the
server. Tiles of a window go to ``run`` ``TILE_BATCH`` at a time and each result is reduced to
its kept cells' cropped logits at once, so memory does not grow with the cells of a window.

Labels go to an on-disk Zarr array (chunked, written window by window under a lock), then, for a
``.tif`` output, into a tiled, zlib-compressed BigTIFF band by band; ``.ome.zarr`` (slide and labels
pyramids), ``_cells.csv`` and ``_cells.geojson`` outputs are also made band by band or chunk by
chunk from that array (see `write_slide_outputs`). Client memory is bounded by
``window`` and ``in_flight``, not by the slide: about ``in_flight * (window + 256)^2 * 80`` bytes
(float32 copies, tile inputs, label canvases) plus one band of output tiles.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.ndimage import find_objects

from cellsam_triton.contracts import Family
from cellsam_triton.errors import UserError

from .labels import logit_threshold, paint_cells
from .lite_rules import build_requests
from .tiles import Tile, family_tiles, lite_normalize, mask_block, owned
from .types import CELL_COLUMNS, RunRequests, SegmentOptions
from .writers import atomic_path, write_cells_csv, write_cells_geojson, write_ome_zarr

WINDOW = 2048
IN_FLIGHT = 2
BYTES_PER_WINDOW_PIXEL = 80
OUT_TILE = 512
TILE_BATCH = 16
LABEL_DTYPE = np.uint32


class Slide:
    """A lazily read 2-D image, [H,W] or with up to 3 channels on any axis; size-1 axes ignored."""

    def __init__(self, array: Any, name: str) -> None:
        self.name = name
        self._array = array
        index = [0 if n == 1 else slice(None) for n in array.shape]
        kept = [n for n in array.shape if n != 1]
        if len(kept) not in (2, 3):
            raise UserError(f"{name}: expected a 2-D image (with channels), got shape {tuple(array.shape)}")
        self._index = index
        self._channel = None if len(kept) == 2 else int(np.argmin(kept))
        if self._channel is not None and kept[self._channel] > 3:
            raise UserError(f"{name}: {kept[self._channel]} channels; at most 3 are supported")
        self.shape = tuple(n for i, n in enumerate(kept) if i != self._channel)
        self.dtype = np.dtype(array.dtype)
        if self.dtype.kind not in "uif":
            raise UserError(f"{name}: pixel type {self.dtype} is not a real number type")
        if min(self.shape) < 1:
            raise UserError(f"{name}: empty image, shape {tuple(array.shape)}")

    @classmethod
    def open(cls, path: str | Path) -> "Slide":
        """(OME-)TIFF and Zarr are read lazily (tifffile's Zarr store), NPY memory-mapped."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"{path}: no such file")
        try:
            if path.suffix.lower() == ".npy":
                return cls(np.load(path, mmap_mode="r", allow_pickle=False), str(path))
            import zarr

            if path.suffix.lower() in (".tif", ".tiff"):
                import tifffile

                source = zarr.open(tifffile.imread(path, aszarr=True), mode="r")
            else:
                source = zarr.open(str(path), mode="r")
            if isinstance(source, zarr.Group):  # a pyramid: level 0 is full resolution
                keys = sorted(source.array_keys())
                if not keys:
                    raise UserError(f"{path}: Zarr group holds no image array")
                source = source[keys[0]]
            return cls(source, str(path))
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"{path}: cannot open slide ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from None

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1], channels last."""
        index, plane = list(self._index), iter([slice(y0, y1), slice(x0, x1)])
        spatial = [i for i, item in enumerate(index) if item != 0]
        for rank, axis in enumerate(spatial):
            if rank != self._channel:
                index[axis] = next(plane)
        try:
            block = np.asarray(self._array[tuple(index)])
        except Exception as exc:  # truncated or corrupt data found only when read
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{self.name}: cannot read pixels [{y0}:{y1}, {x0}:{x1}] ({detail})") from None
        return block if self._channel is None else np.moveaxis(block, self._channel, -1)

    def value_range(self, band: int = WINDOW) -> tuple[float, float]:
        """Minimum and maximum over the whole slide, read ``band`` rows at a time."""
        low, high = math.inf, -math.inf
        for y in range(0, self.shape[0], max(1, band)):
            block = self.read(y, min(y + band, self.shape[0]), 0, self.shape[1])
            low, high = min(low, float(block.min())), max(high, float(block.max()))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise UserError(f"{self.name}: contains NaN or Inf pixels")
        return low, high


@dataclass
class SlideReport:
    """What `segment_slide` did: cells found, windows, tiles in the grid, tiles sent to the server."""

    cells: int
    windows: int
    tiles: int
    elapsed_s: float
    path: Path
    tiles_sent: int = 0
    scores: list[float] = dataclasses.field(default_factory=list, repr=False)  # scores[label]; [0] background
    paths: list[Path] = dataclasses.field(default_factory=list)  # every output; ``path`` is the first

    def summary(self) -> str:
        skipped = self.tiles - self.tiles_sent
        return (f"{self.cells} cells, {self.tiles} tiles ({self.tiles_sent} sent, {skipped} background skipped), "
                f"{self.windows} windows, {self.elapsed_s:.1f} s -> {', '.join(map(str, self.paths or [self.path]))}")


def window_for_memory(memory_mb: float, in_flight: int = IN_FLIGHT, tile: int = 256) -> int:
    """The largest window side whose ``in_flight`` windows fit in ``memory_mb`` (at least one tile)."""
    side = math.sqrt(memory_mb * 2**20 / (max(1, in_flight) * BYTES_PER_WINDOW_PIXEL)) - tile
    return max(tile, int(side) // tile * tile)


def group_tiles(tiles: list[Tile], window: int) -> list[list[Tile]]:
    """Tiles grouped by the window holding their core's top-left corner (row-major windows)."""
    groups: dict[tuple[int, int], list[Tile]] = {}
    for t in tiles:
        groups.setdefault((t.cy0 // window, t.cx0 // window), []).append(t)
    return [groups[key] for key in sorted(groups)]


def _shift(tile: Tile, dy: int, dx: int) -> Tile:
    return dataclasses.replace(tile, y0=tile.y0 - dy, x0=tile.x0 - dx, cy0=tile.cy0 - dy, cy1=tile.cy1 - dy,
                               cx0=tile.cx0 - dx, cx1=tile.cx1 - dx)


def _normalize(region: np.ndarray, low: float, high: float) -> np.ndarray:
    """`lite_normalize` with the whole slide's range instead of the region's."""
    norm = lite_normalize(region)
    channels = 1 if region.ndim == 2 else region.shape[2]
    used = norm[:, :, : 3 if channels != 2 else 2]
    local_low, local_high = float(region.min()), float(region.max())
    if high > low:
        used *= (local_high - local_low) / (high - low)
        used += (local_low - low) / (high - low)
    return norm


def _compact(block: tuple[slice, slice, np.ndarray]) -> tuple[slice, slice, np.ndarray]:
    """The block with its logits copied, so the tile's full 256x256 float mask can be freed."""
    rows, cols, logits = block
    return rows, cols, logits.copy()


def _is_background(region: np.ndarray, tile: Tile, flat: float) -> bool:
    """Whether a tile's raw pixels (``tile`` in ``region`` coordinates) vary by ``flat`` or less."""
    if flat < 0:
        return False
    block = region[max(0, tile.y0) : tile.y0 + tile.size, max(0, tile.x0) : tile.x0 + tile.size]
    return block.size == 0 or float(block.max()) - float(block.min()) <= flat


class LabelStore:
    """The slide's labels on disk (Zarr); windows are merged in under a lock.

    Each cell carries its score and its rank (position of its tile in the slide's tile grid, then
    of its mask in the tile): where cells of two windows overlap, the lower score wins and equal
    scores go to the higher rank, the order the whole-image path paints in, whatever order the
    concurrent windows finish in.
    """

    def __init__(self, folder: Path, shape: tuple[int, int], chunk: int = OUT_TILE) -> None:
        import zarr

        self.array = zarr.create_array(store=str(folder), shape=shape, chunks=(chunk, chunk), dtype=LABEL_DTYPE, fill_value=0)
        self.scores: list[float] = [math.inf]  # scores[label]; background never wins
        self.ranks: list[int] = [-1]
        self._lock = threading.Lock()

    def merge(self, y0: int, x0: int, labels: np.ndarray, scores: np.ndarray, ranks: np.ndarray) -> int:
        """Add a window's cells (labels 1..n with ``scores[k-1]`` and ``ranks[k-1]``)."""
        if not labels.any():
            return 0
        rows, cols = np.flatnonzero(labels.any(axis=1)), np.flatnonzero(labels.any(axis=0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        labels = labels[r0:r1, c0:c1]
        region = (slice(y0 + r0, y0 + r1), slice(x0 + c0, x0 + c1))
        with self._lock:
            base = len(self.scores) - 1
            self.scores.extend(float(s) for s in scores)
            self.ranks.extend(int(r) for r in ranks)
            score, rank = np.asarray(self.scores), np.asarray(self.ranks)
            existing = self.array[region]
            new = np.where(labels > 0, labels.astype(LABEL_DTYPE) + base, 0)
            lower = score[new] < score[existing]
            tie = (score[new] == score[existing]) & (rank[new] > rank[existing])
            wins = (new > 0) & (lower | tie)
            existing[wins] = new[wins]
            self.array[region] = existing
        return int(len(scores))

    def bands(self, rows: int = OUT_TILE):
        for y in range(0, self.array.shape[0], rows):
            yield self.array[y : y + rows]


def write_tiled_tiff(path: Path, store: LabelStore, tile: int = OUT_TILE) -> None:
    """The store as a tiled, zlib-compressed BigTIFF, one band of tiles in memory at a time."""
    import tifffile

    height, width = store.array.shape
    dtype = np.uint16 if len(store.scores) - 1 <= np.iinfo(np.uint16).max else np.uint32

    def tiles():
        for band in store.bands(tile):
            padded = np.zeros((tile, math.ceil(width / tile) * tile), dtype)
            padded[: band.shape[0], :width] = band
            for x in range(0, width, tile):
                yield padded[:, x : x + tile]

    with atomic_path(path) as temp:
        tifffile.imwrite(temp, tiles(), shape=(height, width), dtype=dtype, tile=(tile, tile),
                         bigtiff=True, compression="zlib")


def label_table(array: Any, scores: Sequence[float], band: int = OUT_TILE) -> list[dict]:
    """The cells table (`labels.cells_table` columns) of a label array read ``band`` rows at a time:
    one row per label present, in label order; ``scores[label]`` is its score. Labels need not be
    sequential (a slide's cell that lost every pixel to a better one leaves a gap)."""
    height, width = array.shape
    count = len(scores)
    x0, y0 = np.full(count, width, np.int64), np.full(count, height, np.int64)
    x1, y1, area = np.zeros(count, np.int64), np.zeros(count, np.int64), np.zeros(count, np.int64)
    for top in range(0, height, band):
        block = np.asarray(array[top : top + band])
        counts = np.bincount(block.ravel(), minlength=count)[:count]
        area += counts
        objects = find_objects(block)
        for k in np.flatnonzero(counts[1:]) + 1:
            rows, cols = objects[k - 1]
            y0[k], y1[k] = min(y0[k], top + rows.start), max(y1[k], top + rows.stop)
            x0[k], x1[k] = min(x0[k], cols.start), max(x1[k], cols.stop)
    present = np.flatnonzero(area[1:]) + 1
    values = {"label": present, "x0": x0[present], "y0": y0[present], "x1": x1[present], "y1": y1[present], "area": area[present]}
    return [{c: float(scores[int(k)]) if c == "score" else int(values[c][i]) for c in CELL_COLUMNS}
            for i, k in enumerate(present)]


def slide_output_kind(path: Path) -> str:
    """What an output path of `segment_slide` holds, from its name."""
    name = path.name.lower()
    for suffix, kind in ((".ome.zarr", "ome-zarr"), (".zarr", "zarr"), (".csv", "csv"), (".geojson", "geojson")):
        if name.endswith(suffix):
            return kind
    return "tif"


def write_slide_outputs(paths: Sequence[Path], slide: Slide, store: "LabelStore", work: Path) -> None:
    """Every output from the finished label store: label BigTIFF, OME-Zarr (the slide read chunk
    by chunk, and the labels), cells CSV and GeoJSON (read in bands); a plain ``.zarr`` output is
    the store itself, moved last."""
    dtype = np.uint16 if len(store.scores) - 1 <= np.iinfo(np.uint16).max else np.uint32
    rows = None
    for path in sorted(paths, key=lambda p: slide_output_kind(p) == "zarr"):
        kind = slide_output_kind(path)
        if kind in ("csv", "geojson") and rows is None:
            rows = label_table(store.array, store.scores)
        if kind == "ome-zarr":
            write_ome_zarr(path, slide, store.array, label_dtype=dtype)
        elif kind == "csv":
            write_cells_csv(path, rows)
        elif kind == "geojson":
            write_cells_geojson(path, store.array, rows, band=OUT_TILE)
        elif kind == "zarr":
            shutil.rmtree(path, ignore_errors=True)
            (work / "labels.zarr").rename(path)
        else:
            write_tiled_tiff(path, store)


def segment_slide(
    slide: Slide,
    run: RunRequests,
    family: Family,
    out_path: str | Path | Sequence[str | Path],
    options: SegmentOptions | None = None,
    window: int = WINDOW,
    in_flight: int = IN_FLIGHT,
    progress: bool | None = None,
    skip_background: bool = True,
    background_tolerance: float = 0.0,
) -> SlideReport:
    """Segment a slide into a label image at ``out_path`` (``.tif``: tiled BigTIFF; ``.zarr``: Zarr),
    or into several outputs (a list of paths; also ``.ome.zarr``, ``_cells.csv``, ``_cells.geojson``:
    see `write_slide_outputs`)."""
    from tqdm import tqdm

    if family.preprocess != "litemedsam":
        raise UserError(f"model {family.name} resizes whole images; slides need a tiled model such as the default")
    options = (options or SegmentOptions()).resolved(family)
    if options.scale not in (None, 1.0):
        raise UserError("--scale is not supported with --slide: slides are segmented at native resolution")
    options.check_tta(family, detector_boxes=True)
    bbox = options.bbox_threshold
    iou = options.iou_threshold
    cut = logit_threshold(options.mask_threshold)
    min_area = options.min_cell_area
    out_paths = [Path(out_path)] if isinstance(out_path, (str, Path)) else [Path(p) for p in out_path]
    if not out_paths:
        raise UserError("segment_slide: no output path")
    out_path = out_paths[0]
    started = time.perf_counter()
    height, width = slide.shape
    low, high = slide.value_range(band=max(1, int(window) ** 2 // max(1, width)))
    flat = float(background_tolerance) * (high - low) if skip_background else -1.0
    tiles = family_tiles(family, height, width)
    groups = group_tiles(tiles, max(int(window), family.input_size))
    work = Path(tempfile.mkdtemp(prefix=".slide-", dir=out_path.parent))
    try:
        store = LabelStore(work / "labels.zarr", (height, width))
        sent = [0]
        sent_lock = threading.Lock()

        grid_index = {(t.y0, t.x0): k for k, t in enumerate(tiles)}
        masks_per_tile = 1 << 20  # rank = tile index * this + mask index

        def one(group: list[Tile]) -> int:
            y0, x0 = min(t.y0 for t in group), min(t.x0 for t in group)
            y1 = min(height, max(t.y0 + t.size for t in group))
            x1 = min(width, max(t.x0 + t.size for t in group))
            region = slide.read(y0, y1, x0, x1)
            local = [t for t in (_shift(t, y0, x0) for t in group) if not _is_background(region, t, flat)]
            if not local:
                return 0
            norm = _normalize(region, low, high)
            del region
            kept = []  # (score, rank, cropped logits block): results are dropped batch by batch
            for start in range(0, len(local), TILE_BATCH):
                batch = local[start : start + TILE_BATCH]
                requests, _ = build_requests(norm, batch, None, bbox, iou, options.tta)
                for t, r in zip(batch, run(requests)):
                    rank = grid_index[(t.y0 + y0, t.x0 + x0)] * masks_per_tile
                    kept += [(float(r.scores[i]), rank + int(i), _compact(mask_block(r.masks[i], t, norm.shape[:2], cut)))
                             for i in owned(r.boxes, t)]
                with sent_lock:
                    sent[0] += len(batch)
            kept.sort(key=lambda item: (-item[0], item[1]))  # paint order of the whole-image path
            labels, index = paint_cells((b for _, _, b in kept), norm.shape[:2], cut, min_area)
            chosen = [kept[i] for i in index]
            return store.merge(y0, x0, labels, np.array([c[0] for c in chosen], np.float64), np.array([c[1] for c in chosen], np.int64))

        bar = tqdm(total=len(tiles), unit="tile", file=sys.stderr, disable=None if progress is None else not progress)
        with ThreadPoolExecutor(max_workers=max(1, in_flight), thread_name_prefix="slide") as executor:
            for group, _ in zip(groups, executor.map(one, groups)):  # a window reads its region only when it runs
                bar.update(len(group))
                bar.set_postfix(sent=sent[0], refresh=False)
        bar.close()
        write_slide_outputs(out_paths, slide, store, work)
        cells = len(store.scores) - 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return SlideReport(cells, len(groups), len(tiles), time.perf_counter() - started, out_path, sent[0], store.scores, out_paths)
