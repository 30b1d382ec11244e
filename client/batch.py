"""Batch jobs: many image files segmented concurrently, resumable, with a progress bar.

Resume rule: an input found by scanning a folder is *done* when the outputs of its formats
(default: label TIFF and cells CSV; see `writers.FORMATS`) and the overlay when asked for exist and
none is older than the input; done inputs are
skipped unless ``overwrite``. Files named one by one are always segmented. Outputs are written
atomically, so an interrupted job leaves only complete outputs and the next run picks up the
rest. A bad file is a failure listed at the end; a server problem that outlasts the client's
retries stops the job (no other file could succeed).
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cellsam_triton.errors import ServerError, UserError

from .images import SUFFIXES
from .types import Segmentation
from .writers import DEFAULT_FORMATS, format_paths

SegmentImage = Callable[[np.ndarray], Segmentation]


@dataclass(frozen=True)
class Job:
    """One input file; ``resumable`` inputs are skipped when their outputs are up to date."""

    source: Path
    resumable: bool = False


@dataclass
class BatchReport:
    """What a batch job did."""

    total: int = 0
    segmented: int = 0
    skipped: int = 0
    cells: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    elapsed_s: float = 0.0
    by_worker: dict[str, int] = field(default_factory=dict)  # images segmented per Dask worker

    def summary(self) -> str:
        rate = self.segmented / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return (f"segmented {self.segmented}/{self.total} images ({self.skipped} already done, "
                f"{len(self.failed)} failed), {self.cells} cells, {self.elapsed_s:.1f} s ({rate:.2f} images/s)")


# output_paths keys of the --format names
FORMAT_KEYS = {"tif": "labels", "csv": "cells", "geojson": "geojson", "ome-zarr": "ome-zarr"}


def output_paths(out_dir: Path, source: Path) -> dict[str, Path]:
    """Where the outputs of one input go (every format's, whichever are written)."""
    stem = source.name.split(".")[0] or source.stem
    paths = {FORMAT_KEYS[name]: path for name, path in format_paths(out_dir, stem).items()}
    paths["overlay"] = out_dir / f"{stem}_overlay.png"
    return paths


def requested_formats(args: object, default: Sequence[str] = DEFAULT_FORMATS) -> tuple[str, ...]:
    """The outputs a `segment` command line asks for (``args.formats``, set from --format), else ``default``."""
    return tuple(getattr(args, "formats", None) or default)


def written_paths(paths: dict[str, Path], formats: Sequence[str] = DEFAULT_FORMATS, overlay: bool = False) -> list[Path]:
    """The outputs that ``formats`` (and ``overlay``) produce, in format order."""
    return [paths[FORMAT_KEYS[name]] for name in formats] + ([paths["overlay"]] if overlay else [])


def expand_inputs(inputs: Sequence[str | Path]) -> list[Job]:
    """Files as given; folders become their image files (sorted, not recursive, resumable)."""
    jobs: list[Job] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not found:
                raise UserError(f"{item}: no {', '.join(SUFFIXES)} files in this folder")
            jobs += [Job(p, resumable=True) for p in found]
        else:
            jobs.append(Job(item))
    return jobs


def is_done(source: Path, paths: dict[str, Path], overlay: bool, formats: Sequence[str] = DEFAULT_FORMATS) -> bool:
    """Whether every output of ``source`` exists and is at least as new as it."""
    wanted = written_paths(paths, formats, overlay)
    try:
        newest_input = source.stat().st_mtime
        return all(p.stat().st_mtime >= newest_input for p in wanted)
    except OSError:
        return False


def write_outputs(paths: dict[str, Path], image: np.ndarray, result: Segmentation, overlay: bool,
                  formats: Sequence[str] = DEFAULT_FORMATS) -> None:
    """Write each of ``formats`` (default: the label image and the cells table) and optionally the
    overlay, each atomically. ``image`` may be lazy (a `slides.Slide`) unless ``overlay``."""
    from .writers import write_format, write_overlay_png

    for name in formats:
        write_format(name, paths[FORMAT_KEYS[name]], result.labels, result.cells, image)
    if overlay:
        write_overlay_png(paths["overlay"], image, result.labels)


def _process(job: Job, out_dir: Path, segment: SegmentImage, overlay: bool,
             formats: Sequence[str] = DEFAULT_FORMATS) -> tuple[int, dict[str, Path]]:
    from .images import read_image

    image = read_image(job.source)
    result = segment(image)
    paths = output_paths(out_dir, job.source)
    write_outputs(paths, image, result, overlay, formats)
    return result.count, paths


def run_batch(
    jobs: Sequence[Job],
    out_dir: Path,
    segment: SegmentImage,
    overlay: bool = False,
    overwrite: bool = False,
    workers: int = 2,
    progress: bool | None = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
) -> BatchReport:
    """Segment every job (``workers`` at a time) into ``out_dir``; prints one line per image.

    ``progress``: tqdm bar on stderr (None: only when stderr is a terminal). ``formats``: the
    outputs of each image (`writers.FORMATS`).
    """
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    report = BatchReport(total=len(jobs))
    started = time.perf_counter()
    todo = []
    for job in jobs:
        if job.resumable and not overwrite and is_done(job.source, output_paths(out_dir, job.source), overlay, formats):
            report.skipped += 1
        else:
            todo.append(job)
    bar = tqdm(total=len(todo), unit="image", file=sys.stderr, disable=None if progress is None else not progress)
    executor = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="batch")
    try:
        running: dict[Future, Job] = {}
        queue = iter(todo)
        while True:
            for job in queue:  # keep at most 2 x workers images read or in flight
                running[executor.submit(_process, job, out_dir, segment, overlay, formats)] = job
                if len(running) >= 2 * max(1, workers):
                    break
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                bar.update(1)
                try:
                    count, paths = future.result()
                except ServerError:
                    raise
                except UserError as exc:
                    report.failed.append((job.source, str(exc)))
                    bar.write(f"cellsam-triton segment: error: {exc}", file=sys.stderr)
                    continue
                report.segmented += 1
                report.cells += count
                written = ", ".join(str(p) for p in written_paths(paths, formats))
                bar.write(f"{job.source}: {count} cells -> {written}", file=sys.stdout)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        bar.close()
        report.elapsed_s = time.perf_counter() - started
    return report
