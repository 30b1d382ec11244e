"""`cellsam-triton eval`: accuracy of the served pipeline on a DSB-layout data set.

Each image of the chosen split goes through the served pipeline (`Segmenter`), with detector
boxes or, with ``--boxes gt``, the ground-truth boxes as prompts (the ceiling a perfect detector
would give), or with ``--prompts grid`` a point grid (detector-free CellSeg1 models). Prints one JSON object: per-image mean F1@0.5 (the paper's metric), pooled F1,
precision, recall, mean matched IoU, panoptic quality, the same per image kind, seconds per
image (client wall time of the segment call) and the counts. ``--out`` also keeps per-image rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from cellsam_triton.errors import UserError

from .metrics import IOU_THRESHOLD, ImageScore, aggregate, score_image

SPLITS = ("val", "train", "all")
# predict(image, true_labels) -> predicted label image; true labels only feed GT-box prompts.
Predict = Callable[[np.ndarray, np.ndarray], np.ndarray]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .grid_rules import add_grid_arguments

    parser.add_argument("--data", required=True, type=Path, metavar="DIR", help="DSB-layout folder (manifest.csv, images/)")
    parser.add_argument("--split", choices=SPLITS, default="val", help="images to use (default %(default)s)")
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address (default %(default)s)")
    parser.add_argument("--model", default=None, help="pipeline model name (default: the default model)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="first N images of the split only")
    parser.add_argument("--boxes", choices=("gt",), default=None, help="gt: prompt with ground-truth boxes (no detector)")
    parser.add_argument("--prompts", choices=("detector", "grid"), default="detector", help="grid: point-grid prompts (default %(default)s)")
    add_grid_arguments(parser)
    parser.add_argument("--tta", type=int, choices=(1, 2, 4), default=1, metavar="N",
                        help="detector views a tile, as `segment --tta` (default model, detector boxes; default %(default)s)")
    parser.add_argument("--out", type=Path, default=None, metavar="JSON", help="also write the result with per-image rows")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default %(default)s)")


def select(data: Path, split: str, limit: int | None = None) -> list:
    """Manifest records of ``split`` ("all" for every image), the first ``limit`` of them."""
    from cellsam_triton.datasets import load_manifest, split_of

    if not Path(data).is_dir():
        raise UserError(f"data folder {data} not found")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    records = [r for r in load_manifest(data) if split == "all" or split_of(r.id) == split]
    if not records:
        raise UserError(f"no images of split {split!r} in {data}")
    return records[:limit]


def gt_boxes(labels: np.ndarray) -> np.ndarray:
    """[N,4] float32 boxes x0,y0,x1,y1 of the labelled objects (pixel extent, x1/y1 exclusive)."""
    from cellsam_triton.model_repository.raster import label_boxes

    return label_boxes(labels)


def evaluate(data: Path, records: list, predict: Predict, desc: str = "eval",
             on_score: Callable[[ImageScore], None] | None = None) -> list[ImageScore]:
    """Score ``predict`` on each record; the time of each predict call is kept per image.
    ``on_score`` sees each score as soon as it exists (a caller's checkpoint)."""
    from tqdm import tqdm

    from cellsam_triton.datasets import load_sample

    scores = []
    for record in tqdm(records, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True):
        image, labels = load_sample(data, record.id)
        started = time.perf_counter()
        predicted = predict(image, labels)
        seconds = time.perf_counter() - started
        scores.append(score_image(labels, predicted, IOU_THRESHOLD, id=record.id, kind=record.kind, seconds=seconds))
        if on_score is not None:
            on_score(scores[-1])
    return scores


def served_predict(segmenter, boxes: str | None, grid=None, options=None) -> Predict:
    """A Predict through a `Segmenter`: detector boxes, ground-truth boxes when boxes == "gt", or
    grid prompts when ``grid`` (a `GridOptions`) is given; ``options`` a `SegmentOptions` or None."""
    if grid is not None:
        return lambda image, labels: segmenter.segment(image, prompts="grid", grid=grid, options=options).labels
    if boxes == "gt":
        return lambda image, labels: segmenter.segment(image, boxes=gt_boxes(labels), options=options).labels
    return lambda image, labels: segmenter.segment(image, options=options).labels


def summary(scores: list[ImageScore], **info) -> dict:
    """``info`` (model, split, ...) followed by the aggregate metrics."""
    return {**info, "iou_threshold": IOU_THRESHOLD, **aggregate(scores)}


def run(args: argparse.Namespace) -> int:
    from .api import Segmenter
    from .types import SegmentOptions, check_tta_prompts

    given = {"--boxes gt": args.boxes is not None, "--prompts grid": args.prompts == "grid"}
    check_tta_prompts(args.tta, given)  # before any server is contacted
    grid = None
    if args.prompts == "grid":
        from .grid_rules import grid_options

        if args.boxes is not None:
            raise UserError("--boxes gt and --prompts grid exclude each other")
        grid = grid_options(args)
    records = select(args.data, args.split, args.limit)
    with Segmenter(args.url, args.model, timeout_s=args.timeout) as segmenter:
        model = args.model or segmenter.family.pipeline_name
        predict = served_predict(segmenter, args.boxes, grid, SegmentOptions(tta=args.tta))
        scores = evaluate(args.data, records, predict, desc=f"eval {model}")
    prompts = "grid" if grid is not None else args.boxes or "detector"
    result = summary(scores, model=model, split=args.split, boxes=prompts, tta=args.tta)
    print(json.dumps(result))
    if args.out is not None:
        write_json(args.out, {**result, "per_image": [s.as_dict() for s in scores]})
    return 0


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON, creating the parent folder."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None
