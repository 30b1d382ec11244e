"""`cellsam-triton segment`: image files in, label TIFF + cells CSV (+ overlay PNG) out.

Each input is processed on its own: a bad file prints one line naming it and the problem, the
other files are still processed, and the exit code is non-zero if any file failed. A server
problem (down, not ready) stops the run at once, since no further file could succeed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from cellsam_triton.errors import ServerError, UserError

from .types import Segmentation, SegmentOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="TIFF, PNG or NPY images")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address (default %(default)s)")
    parser.add_argument("--model", default=None, help="pipeline model name (default: the default model)")
    parser.add_argument("--boxes", type=Path, metavar="CSV", help="prompt boxes x0,y0,x1,y1 in input pixels; skips the detector")
    parser.add_argument("--bbox-threshold", type=float, default=None, help="detector score threshold (default 0.4)")
    parser.add_argument("--iou-threshold", type=float, default=None, help="drop masks whose predicted IoU is lower; -1 keeps all (default 0.5)")
    parser.add_argument("--mask-threshold", type=float, default=None, help="sigmoid threshold of mask logits (default: model's)")
    parser.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.png (cell outlines on the image)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default %(default)s)")


def output_paths(out_dir: Path, source: Path) -> dict[str, Path]:
    """Where the outputs of one input go."""
    stem = source.name.split(".")[0] or source.stem
    return {
        "labels": out_dir / f"{stem}_labels.tif",
        "cells": out_dir / f"{stem}_cells.csv",
        "overlay": out_dir / f"{stem}_overlay.png",
    }


def write_outputs(paths: dict[str, Path], image: np.ndarray, result: Segmentation, overlay: bool) -> None:
    """Write the label image, the cells table and optionally the overlay (each atomically)."""
    from .writers import write_cells_csv, write_labels_tiff, write_overlay_png

    write_labels_tiff(paths["labels"], result.labels)
    write_cells_csv(paths["cells"], result.cells)
    if overlay:
        write_overlay_png(paths["overlay"], image, result.labels)


def _options(args: argparse.Namespace) -> SegmentOptions:
    for name in ("bbox_threshold", "mask_threshold"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
    return SegmentOptions(args.bbox_threshold, args.iou_threshold, args.mask_threshold)


def run(args: argparse.Namespace) -> int:
    from .api import Segmenter
    from .images import read_image
    from .writers import read_boxes_csv

    options = _options(args)
    boxes = read_boxes_csv(args.boxes) if args.boxes is not None else None
    sources = [Path(p) for p in args.inputs]
    args.out.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    started = time.perf_counter()
    cells = 0
    with Segmenter(args.url, args.model, timeout_s=args.timeout) as segmenter:
        for source in sources:
            try:
                image = read_image(source)
                result = segmenter.segment(image, boxes=boxes, options=options)
                paths = output_paths(args.out, source)
                write_outputs(paths, image, result, args.overlay)
            except ServerError:
                raise
            except UserError as exc:
                failures.append(str(source))
                print(f"cellsam-triton segment: error: {exc}", file=sys.stderr)
                continue
            cells += result.count
            print(f"{source}: {result.count} cells -> {paths['labels']}, {paths['cells']}")
    elapsed = time.perf_counter() - started
    done = len(sources) - len(failures)
    print(f"segmented {done}/{len(sources)} images, {cells} cells, {elapsed:.1f} s")
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0
