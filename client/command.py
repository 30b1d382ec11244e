"""`cellsam-triton segment`: image files or folders in, label TIFF + cells CSV (+ overlay PNG) out;
``--format`` picks other outputs (cells GeoJSON, OME-Zarr image + labels; see `writers`).

Each input is processed on its own: a bad file prints one line naming it and the problem, the
other files are still processed, the failures are listed at the end and the exit code is
non-zero if any file failed. Folders are batch jobs: their image files are segmented
concurrently with a progress bar and files already done are skipped (see `batch`). Several
``--url``s spread the requests over those servers; a server that goes down is skipped and
tried again later. A server problem that outlasts ``--retry-for`` stops the run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cellsam_triton.errors import UserError

from .autoscale import check_scale
from .types import SegmentOptions, check_tta_prompts

if TYPE_CHECKING:
    from .points import PointPrompts

DEFAULT_URL = "127.0.0.1:8001"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .grid_rules import add_grid_arguments

    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="TIFF, PNG or NPY images, or folders of them")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    parser.add_argument("--url", action="append", default=None, help=f"Triton gRPC address; repeat for several servers (default {DEFAULT_URL})")
    parser.add_argument("--model", default=None, help="pipeline model name (default: the default model)")
    parser.add_argument("--boxes", type=Path, metavar="CSV", help="prompt boxes x0,y0,x1,y1 in input pixels; skips the detector")
    parser.add_argument("--points", type=Path, metavar="CSV",
                        help="point prompts x,y[,label][,cell] in input pixels (label 1 positive, 0 negative; rows sharing a cell "
                             "value are one cell, else one cell a point) through <model>_point_decoder; skips the detector")
    parser.add_argument("--prompts", choices=("detector", "grid"), default="detector",
                        help="detector boxes, or grid: a point grid through the model's <model>_grid, no detector (default %(default)s)")
    add_grid_arguments(parser)
    parser.add_argument("--bbox-threshold", type=float, default=None, help="detector score threshold (default 0.4)")
    parser.add_argument("--iou-threshold", type=float, default=None, help="drop masks whose predicted IoU is lower; -1 keeps all (default 0.5; with --points every mask is kept)")
    parser.add_argument("--mask-threshold", type=float, default=None, help="sigmoid threshold of mask logits (default: model's)")
    parser.add_argument("--scale", default="auto", metavar="auto|FACTOR",
                        help="tiled models: resize by FACTOR before segmenting (labels come back at input size); "
                             "auto = native, then 2x when cells are small (default %(default)s)")
    parser.add_argument("--tta", type=int, choices=(1, 2, 4), default=1, metavar="N",
                        help="test-time flips: detect on N views of each tile (default model; 1 off, 2 with its "
                             "left-right mirror, 4 with every flip), boxes fused; with --points (any model) decode "
                             "the points on N views, masks averaged; N encoder passes a tile (default %(default)s)")
    parser.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.png (cell outlines on the image)")
    parser.add_argument("--format", default=None, metavar="LIST",
                        help="outputs, comma-separated: tif (<stem>_labels.tif), csv (<stem>_cells.csv), "
                             "geojson (<stem>_cells.geojson: one polygon per cell, QuPath detections), "
                             "ome-zarr (<stem>.ome.zarr: image + labels pyramid, NGFF 0.4) "
                             "(default tif,csv; with --slide: tif)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="images in flight at once (default: 2 per server)")
    parser.add_argument("--overwrite", action="store_true", help="segment files of an input folder again even when their outputs are up to date")
    parser.add_argument("--retry-for", type=float, default=60.0, metavar="S",
                        help="keep retrying a request for S seconds while no server answers (default %(default)s)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: when stderr is a terminal)")
    parser.add_argument("--tls-ca", type=Path, metavar="PEM", help="gRPC over TLS, trusting this CA certificate")
    parser.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate for mutual TLS (with --tls-key)")
    parser.add_argument("--tls-key", type=Path, metavar="PEM", help="client private key for mutual TLS")
    parser.add_argument("--shared-memory", action="store_true",
                        help="send request inputs through system shared memory (server on this host)")
    parser.add_argument("--dask", metavar="ADDRESS", default=None,
                        help="run the images as tasks on a Dask cluster (scheduler address, or local:N for N local workers)")
    from .slide_command import add_arguments as add_slide_arguments

    add_slide_arguments(parser)


def tls_options(args: argparse.Namespace) -> dict:
    """TritonTransport keyword arguments for the --tls-* flags (file paths, checked here)."""
    given = {"root_certificates": args.tls_ca, "certificate_chain": args.tls_cert, "private_key": args.tls_key}
    if not any(given.values()):
        return {}
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UserError("--tls-cert and --tls-key go together (mutual TLS)")
    for path in given.values():
        if path is not None and not path.is_file():
            raise UserError(f"TLS file not found: {path}")
    return {"ssl": True, **{k: str(v) for k, v in given.items() if v is not None}}


def _options(args: argparse.Namespace) -> SegmentOptions:
    for name in ("bbox_threshold", "mask_threshold"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
    given = {"--boxes": args.boxes is not None, "--prompts grid": args.prompts == "grid"}
    check_tta_prompts(args.tta, given)  # before any server is contacted
    return SegmentOptions(args.bbox_threshold, args.iou_threshold, args.mask_threshold, None, _scale(args.scale), args.tta)


def _scale(text: str) -> float | None:
    """``--scale``: None for auto, else a factor in (0, 8]."""
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--scale must be 'auto' or a number, got {text!r}") from None
    check_scale(value)
    return value


def _grid(args: argparse.Namespace) -> object:
    """GridOptions of --prompts grid (checked before any server is contacted), else None."""
    if args.prompts != "grid":
        if args.points_per_side is not None or args.crop_layers is not None or args.grid_iou_threshold is not None:
            raise UserError("--points-per-side, --crop-layers and --grid-iou-threshold need --prompts grid")
        return None
    from .grid_rules import grid_options

    if args.boxes is not None or args.points is not None:
        raise UserError(f"--{'boxes' if args.boxes is not None else 'points'} and --prompts grid exclude each other")
    if getattr(args, "slide", None) or getattr(args, "dask", None):
        raise UserError("--prompts grid works on image files and folders (not with --slide or --dask)")
    return grid_options(args)


def _points(args: argparse.Namespace) -> "PointPrompts | None":
    """The --points prompts (read and checked before any server is contacted), else None."""
    if args.points is None:
        return None
    if args.boxes is not None:
        raise UserError("--boxes and --points exclude each other")
    if getattr(args, "slide", None) or getattr(args, "dask", None):
        raise UserError("--points works on image files and folders (not with --slide or --dask)")
    from .points import read_points_csv

    return read_points_csv(args.points)


def formats(args: argparse.Namespace) -> tuple[str, ...] | None:
    """The --format names (checked), or None when --format is not given."""
    from .writers import parse_formats

    text = getattr(args, "format", None)
    return None if text is None else parse_formats(text)


def run(args: argparse.Namespace) -> int:
    from .batch import expand_inputs, requested_formats, run_batch
    from .pool import ServerPool
    from .writers import read_boxes_csv

    args.formats = formats(args)
    options = _options(args)
    grid = _grid(args)
    points = _points(args)
    urls = args.url or [DEFAULT_URL]
    connection = dict(timeout_s=args.timeout, patience_s=args.retry_for, shared_memory=args.shared_memory, **tls_options(args))
    if args.slide:
        from .slide_command import run as run_slides

        return run_slides(args, lambda: ServerPool(urls, args.model, **connection), options)
    boxes = read_boxes_csv(args.boxes) if args.boxes is not None else None
    jobs = expand_inputs(args.inputs)
    if args.dask:
        from .dask_batch import run_cli as run_dask

        return run_dask(args, jobs, urls, connection, options, boxes)
    workers = args.workers or 2 * len(urls)
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    from .large_images import segment_large_jobs, takes_slide_path
    from .slide_command import check as check_slide_options

    if boxes is None and points is None:  # the options of the slide path that large inputs take
        check_slide_options(args)
    with ServerPool(urls, args.model, **connection) as pool:
        prompted = boxes is not None or grid is not None or points is not None  # whole images, never the slide path
        large = [] if prompted else [job for job in jobs if takes_slide_path(job.source, pool.family, args.slide_above)]
        report = run_batch(
            [job for job in jobs if job not in large], args.out,
            lambda image: pool.segment(image, boxes=boxes, options=options, prompts=args.prompts, grid=grid, points=points),
            overlay=args.overlay, overwrite=args.overwrite, workers=workers, progress=args.progress,
            formats=requested_formats(args),
        )
        segment_large_jobs(large, args.out, pool, options, args, report)
    print(report.summary())
    if report.failed:
        print(f"failed ({len(report.failed)}): {', '.join(str(source) for source, _ in report.failed)}", file=sys.stderr)
        return 1
    return 0
