"""Plain ``segment`` inputs too large for the whole-image path take the slide path by themselves.

An image of ``--slide-above`` pixels or more (default 4096 x 4096) would need several GB of
client memory segmented whole (a 4096^2 mosaic took 5 GB and an hour with no progress shown).
For a tiled model (the default) such an input is segmented like ``--slide``: read lazily where
the format allows (TIFF, NPY; PNG/JPEG are decoded once), window by window with a tile progress
bar, client memory bounded by ``--max-memory`` and ``--windows``; the cells are those of the
whole-image path at native resolution (same tile grid, same ownership, same paint order), so
auto-scale does not apply (``--scale 1`` or ``auto`` only). The outputs are the plain path's:
``<stem>_labels.tif`` with labels 1..n, ``<stem>_cells.csv``, the overlay when asked for; only
the label image itself is held in memory at the end (4 bytes a pixel).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

from cellsam_triton.contracts import Family
from cellsam_triton.errors import ServerError, UserError

from .batch import BatchReport, Job, is_done, output_paths, requested_formats, write_outputs, written_paths
from .labels import cells_table
from .types import Segmentation, SegmentOptions

LARGE_IMAGE_PIXELS = 4096 * 4096
LAZY_SUFFIXES = (".tif", ".tiff", ".npy")


def image_pixels(path: Path) -> int | None:
    """Height x width from the file's header, without reading its pixels (the two largest axes;
    None when the header cannot be read: the whole-image reader then says why)."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tuple(tif.series[0].shape)
        elif suffix == ".npy":
            shape = tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
        else:
            from PIL import Image

            with Image.open(path) as image:
                shape = (image.height, image.width)
    except Exception:
        return None
    if len(shape) < 2:
        return None
    a, b = sorted(shape)[-2:]
    return int(a) * int(b)


def takes_slide_path(path: Path, family: Family, threshold: int) -> bool:
    """Whether ``path`` is large enough (>= ``threshold`` pixels, 0: never) for a tiled ``family``."""
    if threshold <= 0 or family.preprocess != "litemedsam":
        return False
    pixels = image_pixels(path)
    return pixels is not None and pixels >= threshold


def sequential_labels(store: np.ndarray, scores: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Slide labels (gaps where a cell lost every pixel to a better one) as labels 1..n in label
    order, and each new label's score."""
    present = np.unique(store)
    present = present[present > 0]
    lut = np.zeros(int(present[-1]) + 1 if present.size else 1, np.uint32)
    lut[present] = np.arange(1, present.size + 1, dtype=np.uint32)
    return lut[store], np.asarray(scores, np.float64)[present]


def segment_large(source: Path, out_dir: Path, pool, options: SegmentOptions, args: argparse.Namespace) -> tuple[int, dict[str, Path]]:
    """Segment one large plain input through the slide path; its plain-path outputs."""
    import zarr

    from .images import read_image
    from .slides import Slide, segment_slide, window_for_memory

    if options.scale not in (None, 1.0):
        raise UserError(f"{source}: --scale {options.scale:g} is not available above {args.slide_above} pixels "
                        "(segmented window by window at native resolution); use --scale 1 or auto")
    whole = None
    if source.suffix.lower() in LAZY_SUFFIXES:
        slide = Slide.open(source)
    else:
        whole = read_image(source)
        slide = Slide(whole, str(source))
    with tempfile.TemporaryDirectory(prefix=".large-", dir=out_dir) as work:
        report = segment_slide(
            slide, pool.run, pool.family, Path(work) / "labels.zarr", dataclasses.replace(options, scale=1.0),
            window=window_for_memory(args.max_memory, args.windows), in_flight=args.windows, progress=args.progress,
            skip_background=args.skip_background, background_tolerance=args.background_tolerance,
        )
        store = np.asarray(zarr.open(str(Path(work) / "labels.zarr"), mode="r")[:])
    labels, scores = sequential_labels(store, report.scores)
    del store
    if args.overlay and whole is None:
        height, width = slide.shape
        whole = slide.read(0, height, 0, width)
    paths = output_paths(out_dir, source)
    result = Segmentation(labels, cells_table(labels, scores))
    # ome-zarr reads a lazily opened input region by region, as the windows did
    write_outputs(paths, whole if whole is not None else slide, result, args.overlay, requested_formats(args))
    return result.count, paths


def segment_large_jobs(jobs: list[Job], out_dir: Path, pool, options: SegmentOptions, args: argparse.Namespace,
                       report: BatchReport) -> None:
    """Every large job, one after the other (each already spreads its tiles over the servers);
    counted into ``report`` like the batch's own images."""
    import time

    started = time.perf_counter()
    report.total += len(jobs)
    for job in jobs:
        paths = output_paths(out_dir, job.source)
        if job.resumable and not args.overwrite and is_done(job.source, paths, args.overlay, requested_formats(args)):
            report.skipped += 1
            continue
        try:
            count, paths = segment_large(job.source, out_dir, pool, options, args)
        except ServerError:
            raise
        except UserError as exc:
            report.failed.append((job.source, str(exc)))
            print(f"cellsam-triton segment: error: {exc}", file=sys.stderr)
            continue
        report.segmented += 1
        report.cells += count
        written = ", ".join(str(p) for p in written_paths(paths, requested_formats(args)))
        print(f"{job.source}: {count} cells -> {written} (large image: segmented window by window)")
    report.elapsed_s += time.perf_counter() - started
