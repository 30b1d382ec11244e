"""`make bench-clicks`: ten clicks on ten nuclei, served, with and without test-time flips.

On the validation split, the first ``--images-per-kind`` fluorescence and stained images that have
ten nuclei of at least 60 px off the image border (``click_points``: the first ten by label, each
clicked at its most interior pixel) are segmented with those ten points as prompts
(``Segmenter.segment(points=...)``, default options: every mask kept, a click its point mask misses
decoded again from boxes) once per ``--tta`` value. A point *matches*
when the cell under it overlaps its nucleus at IoU >= 0.5. Per value and kind: points matched,
images that gave ten cells, images whose ten points all matched, mean IoU, seconds an image (client
wall time) and, from Triton's statistics API, requests and mean ms per request of the encoder, the
point decoder and the box decoder (the fallback). Writes ``clicks.json`` and ``clicks.md``.

    python -m bench.clicks --repository build/repository --data ../shared/data/dsb2018 [--tta 1,2,4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from cellsam_triton.errors import UserError

from .report import positive, run_bench

HERE = Path(__file__).resolve().parent
KINDS = ("fluorescence", "stained")
CLICKS = 10
MIN_AREA = 60  # pixels: a nucleus smaller than this is not clicked
MATCH_IOU = 0.5


def click_points(labels: np.ndarray, count: int = CLICKS) -> list[tuple[int, int, int]]:
    """(label, x, y) of the first ``count`` nuclei (label order) of at least MIN_AREA px that keep off
    the image border, each with its most interior pixel (largest distance to the nucleus' outline)."""
    from scipy import ndimage

    picked = []
    height, width = labels.shape
    for value, window in enumerate(ndimage.find_objects(labels), start=1):
        if window is None:
            continue
        (y0, y1), (x0, x1) = ((w.start, w.stop) for w in window)
        if y0 < 2 or x0 < 2 or y1 > height - 2 or x1 > width - 2:
            continue
        own = np.pad(labels[y0:y1, x0:x1] == value, 1)
        if own.sum() < MIN_AREA:
            continue
        depth = ndimage.distance_transform_edt(own)
        y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
        picked.append((value, int(x0 + x - 1), int(y0 + y - 1)))
        if len(picked) == count:
            break
    return picked


def point_ious(cells: np.ndarray, labels: np.ndarray, clicks: list[tuple[int, int, int]]) -> list[float]:
    """IoU of the cell under each click with the clicked nucleus (0 where no cell lies under it)."""
    out = []
    for value, x, y in clicks:
        cell, truth = cells == cells[y, x], labels == value
        out.append(float((cell & truth).sum() / (cell | truth).sum()) if cells[y, x] else 0.0)
    return out


def clicked_images(data: Path, per_kind: int) -> list[tuple[str, str, np.ndarray, np.ndarray, list[tuple[int, int, int]]]]:
    """(kind, id, image, labels, clicks) of the first ``per_kind`` validation images of each kind with
    CLICKS clickable nuclei (``click_points``)."""
    from cellsam_triton.client.evaluate import select
    from cellsam_triton.datasets import load_sample

    chosen, counts = [], dict.fromkeys(KINDS, 0)
    for record in select(data, "val"):
        if counts.get(record.kind, per_kind) >= per_kind:
            continue
        image, labels = load_sample(data, record.id)
        clicks = click_points(labels)
        if len(clicks) == CLICKS:
            chosen.append((record.kind, record.id, image, labels, clicks))
            counts[record.kind] += 1
    return chosen


def measure(args: argparse.Namespace) -> dict:
    """Every image clicked once per ``--tta`` value on one embedded tritonserver."""
    import tritonclient.grpc as grpcclient

    from cellsam_triton.client.api import Segmenter
    from cellsam_triton.client.types import SegmentOptions
    from cellsam_triton.server import EmbeddedServer

    from .measure import statistics_delta, triton_statistics

    images = clicked_images(args.data, args.images_per_kind)
    if not images:
        raise UserError(f"no validation image in {args.data} has {CLICKS} clickable nuclei")
    rows, triton = [], {}
    with EmbeddedServer(args.repository) as server, Segmenter(server.grpc_url, timeout_s=600) as seg, \
            grpcclient.InferenceServerClient(server.grpc_url) as client:
        models = [seg.family.encoder_name, seg.family.point_decoder_name, seg.family.decoder_name]
        seg.segment(images[0][2], points=[[x, y] for _, x, y in images[0][4]])  # warm-up, not timed
        for tta in args.tta:
            options = SegmentOptions(tta=tta)  # the defaults: every click's mask kept
            before, per_image = triton_statistics(client, models), []
            for kind, sample_id, image, labels, clicks in images:
                started = time.perf_counter()
                result = seg.segment(image, points=[[x, y] for _, x, y in clicks], options=options)
                seconds = time.perf_counter() - started
                found = point_ious(result.labels, labels, clicks)
                per_image.append({"kind": kind, "id": sample_id, "cells": result.count, "ious": [round(v, 4) for v in found],
                                  "seconds": round(seconds, 3)})
            stats = statistics_delta(before, triton_statistics(client, models))
            triton[str(tta)] = {name: {"requests": s["requests"], "request_ms": round(s["request_ms"], 2)} for name, s in stats.items()}
            for kind in KINDS:
                mine = [r for r in per_image if r["kind"] == kind]
                if not mine:
                    continue
                flat = [v for r in mine for v in r["ious"]]
                rows.append({
                    "tta": tta, "kind": kind, "images": len(mine), "points": len(flat),
                    "matched": sum(v >= MATCH_IOU for v in flat),
                    "ten_cells": sum(r["cells"] == CLICKS for r in mine),
                    "all_matched": sum(all(v >= MATCH_IOU for v in r["ious"]) for r in mine),
                    "mean_iou": round(float(np.mean(flat)), 4),
                    "seconds_per_image": round(float(np.mean([r["seconds"] for r in mine])), 3),
                    "per_image": mine,
                })
    return {"rule": f"first {args.images_per_kind} val images per kind with {CLICKS} nuclei >= {MIN_AREA} px off the border; "
                    f"click: most interior pixel; match: IoU >= {MATCH_IOU}", "repository": str(args.repository), "rows": rows,
            "triton": triton}


def markdown(result: dict) -> str:
    """The table of a run, with each row's time as a ratio of the same kind's first ``--tta`` row."""
    lines = [f"Ten clicks on ten nuclei ({result['rule']}).", "",
             "| tta | kind | images | points matched | images with ten cells | images all matched | mean IoU | s / image | time ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    first = {}
    for row in result["rows"]:
        base = first.setdefault(row["kind"], row["seconds_per_image"])
        lines.append(f"| {row['tta']} | {row['kind']} | {row['images']} | {row['matched']} of {row['points']} | {row['ten_cells']} | "
                     f"{row['all_matched']} | {row['mean_iou']:.3f} | {row['seconds_per_image']:.2f} | {row['seconds_per_image'] / base:.2f} |")
    lines += ["", "Triton's statistics, all images of a `--tta` value (requests, mean ms a request):", ""]
    lines += [f"- tta {tta}: " + ", ".join(f"{name} {s['requests']} x {s['request_ms']:.1f} ms" for name, s in stats.items())
              for tta, stats in result["triton"].items()]
    return "\n".join(lines) + "\n"


def _views(text: str) -> list[int]:
    from cellsam_triton.contracts import TTA_VIEWS

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated view counts, got {text!r}") from None
    if not values or any(v not in TTA_VIEWS for v in values):
        raise argparse.ArgumentTypeError(f"each value must be one of {', '.join(map(str, TTA_VIEWS))}, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, required=True, help="exported model repository (any model with a point decoder)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/dsb2018"), help="DSB-layout folder")
    parser.add_argument("--tta", type=_views, default=[1, 2, 4], help="comma-separated test-time views (default 1,2,4)")
    parser.add_argument("--images-per-kind", type=positive, default=10, metavar="N", help="val images of each kind (default %(default)s)")
    parser.add_argument("--out", type=Path, default=HERE, metavar="DIR", help="output folder (default bench/)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench("bench.clicks", args.out, "clicks", lambda: measure(args), markdown)


if __name__ == "__main__":
    sys.exit(main())
