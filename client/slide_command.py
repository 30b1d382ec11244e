"""`cellsam-triton segment --slide`: whole-slide images segmented window by window (see `slides`).

    cellsam-triton segment --slide big.ome.tif --out results/ --max-memory 1024

Each INPUT ((OME-)TIFF, Zarr, NPY) is read lazily; ``OUT/<stem>_labels.tif`` is a tiled,
compressed BigTIFF (``--slide-format zarr``: ``<stem>_labels.zarr``). ``--format`` adds or picks
other outputs: ``csv`` (cells table), ``geojson`` (cell polygons), ``ome-zarr`` (the slide and its
labels as OME-Zarr pyramids), all written band by band or chunk by chunk. ``--max-memory`` bounds
the client's working memory: it sets the window side from the windows in flight
(`slides.window_for_memory`), whatever the slide size. Tiles of a window go to the servers
concurrently (``ServerPool``); uniform background tiles are not sent unless
``--no-skip-background``. A bad slide is one line naming it; the others are still done.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from cellsam_triton.errors import ServerError, UserError

from .batch import requested_formats
from .large_images import LARGE_IMAGE_PIXELS

DEFAULT_MAX_MEMORY_MB = 1024.0  # windows' working memory; the interpreter and libraries (~150 MB) come on top


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("whole-slide images (--slide)")
    group.add_argument("--slide", action="store_true",
                       help="each INPUT is a large image ((OME-)TIFF, Zarr, NPY) read lazily and segmented window by window")
    group.add_argument("--slide-format", choices=("tif", "zarr"), default="tif",
                       help="label output: tiled BigTIFF or Zarr (default %(default)s)")
    group.add_argument("--max-memory", type=float, default=DEFAULT_MAX_MEMORY_MB, metavar="MB",
                       help="client working memory for the windows in flight; sets the window size (default %(default).0f)")
    group.add_argument("--windows", type=int, default=2, metavar="N", help="windows in flight at once (default %(default)s)")
    group.add_argument("--skip-background", action=argparse.BooleanOptionalAction, default=True,
                       help="do not send tiles whose pixels are uniform (default on)")
    group.add_argument("--slide-above", type=int, default=LARGE_IMAGE_PIXELS, metavar="PIXELS",
                       help="plain inputs of at least this many pixels are segmented like --slide: bounded memory, "
                            "tile progress (default %(default)s = 4096 x 4096; 0: never)")
    group.add_argument("--background-tolerance", type=float, default=0.0, metavar="F",
                       help="a tile is background when max - min <= F x the slide's value range (default 0: exactly uniform)")


def check(args: argparse.Namespace) -> None:
    """One-line errors for impossible settings."""
    if not args.max_memory > 0:
        raise UserError(f"--max-memory must be positive, got {args.max_memory}")
    if args.windows < 1:
        raise UserError(f"--windows must be at least 1, got {args.windows}")
    if getattr(args, "slide_above", 0) < 0:
        raise UserError(f"--slide-above must be 0 (never) or a pixel count, got {args.slide_above}")
    if not 0.0 <= args.background_tolerance < 1.0:
        raise UserError(f"--background-tolerance must be in [0, 1), got {args.background_tolerance}")
    if args.boxes is not None:
        raise UserError("--boxes is not supported with --slide")


def output_path(out_dir: Path, source: Path, fmt: str) -> Path:
    """``OUT/<stem>_labels.tif`` (or ``.zarr``); the stem stops at the first dot (``x.ome.tif`` -> ``x``)."""
    stem = source.name.split(".")[0] or source.stem
    return out_dir / f"{stem}_labels.{fmt}"


def output_paths(out_dir: Path, source: Path, formats: tuple[str, ...], slide_format: str = "tif") -> list[Path]:
    """Every output of one slide: ``tif`` is the label image (``.tif`` or ``.zarr`` by
    ``--slide-format``), the other formats are named as for plain images (`writers.format_paths`)."""
    from .writers import format_paths

    stem = source.name.split(".")[0] or source.stem
    named = format_paths(out_dir, stem, formats)
    return [output_path(out_dir, source, slide_format) if name == "tif" else named[name] for name in formats]


def run(args: argparse.Namespace, open_pool: Callable[[], object], options) -> int:
    """Segment every ``--slide`` input through ``open_pool()`` (a ServerPool context manager)."""
    from .slides import Slide, segment_slide, window_for_memory

    check(args)
    formats = requested_formats(args, ("tif",))
    args.out.mkdir(parents=True, exist_ok=True)
    window = window_for_memory(args.max_memory, args.windows)
    failed: list[tuple[Path, str]] = []
    slides = []
    for source in map(Path, args.inputs):  # every input checked before any server is contacted
        try:
            slides.append((source, Slide.open(source)))
        except UserError as exc:
            failed.append((source, str(exc)))
            print(f"cellsam-triton segment: error: {exc}", file=sys.stderr)
    if slides:
        with open_pool() as pool:
            for source, slide in slides:
                try:
                    report = segment_slide(
                        slide, pool.run, pool.family, output_paths(args.out, source, formats, args.slide_format), options,
                        window=window, in_flight=args.windows, progress=args.progress,
                        skip_background=args.skip_background, background_tolerance=args.background_tolerance,
                    )
                except ServerError:
                    raise
                except UserError as exc:
                    failed.append((source, str(exc)))
                    print(f"cellsam-triton segment: error: {exc}", file=sys.stderr)
                    continue
                print(f"{source}: {report.summary()}")
    if failed:
        print(f"failed ({len(failed)}): {', '.join(str(s) for s, _ in failed)}", file=sys.stderr)
        return 1
    return 0
