"""`make bench-accuracy`: accuracy on the DSB2018 validation split, three methods in one run.

1. the served default model with its own detector boxes (and, with ``--tta N``, with N detector
   views a tile: test-time flips),
2. the classical baseline (Otsu + watershed, bench/baseline.py), no server,
3. the same served model prompted with the ground-truth boxes (the detector's ceiling),
4. the same served model in grid mode (``<family>_grid``, no detector), once per ``--grid`` density
   (points per side; default 16, the served one; ``--grid 16,32`` also measures CellSeg1's 32 x 32),
5. with ``--before REPOSITORY``: an earlier export with its detector boxes, on its own server
   (before/after accuracy and s/image of a change, same run, same machine).

Starts an embedded tritonserver on an exported repository (or uses ``--url``), writes
``accuracy.json`` (summaries and per-image rows), ``accuracy.md`` (table) and ``accuracy.png``
(bar plot) into ``--out`` and prints the table.

    python -m bench.accuracy --repository build/repository --data ../shared/data/dsb2018 [--limit N]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from cellsam_triton.client.evaluate import evaluate, select, served_predict, summary
from cellsam_triton.client.grid_rules import GridOptions
from cellsam_triton.client.types import SegmentOptions
from cellsam_triton.errors import UserError

from .report import run_main, write_results

SPLIT = "val"
HERE = Path(__file__).resolve().parent
# (column title, summary key) of the table and the plot
COLUMNS = (
    ("F1@0.5 (per-image mean)", "f1_mean"),
    ("pooled F1", "f1_pooled"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("mean IoU", "mean_iou"),
    ("PQ", "pq_mean"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("build/repository"), help="exported model repository")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/dsb2018"), help="DSB-layout folder")
    parser.add_argument("--url", default=None, help="use this running server instead of starting one")
    parser.add_argument("--model", default=None, help="pipeline model name (default: the default model)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="first N validation images only")
    parser.add_argument("--out", type=Path, default=HERE, metavar="DIR", help="output folder (default bench/)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default %(default)s)")
    parser.add_argument("--before", type=Path, default=None, metavar="REPOSITORY",
                        help="also run this earlier export (detector boxes) on the same images, served after the others "
                             "on its own server: accuracy and s/image before and after a change in one run")
    parser.add_argument("--tta", type=int, choices=(2, 4), action="append", default=[], metavar="N",
                        help="also the served model with N detector views a tile (test-time flips; repeatable)")
    parser.add_argument("--grid", type=grid_sides, default=(16,), metavar="N[,N]",
                        help="grid-mode rows, points per side each (default 16; 'none': no grid row)")
    return parser.parse_args(argv)


def grid_sides(text: str) -> tuple[int, ...]:
    """``--grid``: comma-separated points per side, or 'none'."""
    if text.strip().lower() == "none":
        return ()
    try:
        sides = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N[,N...] or none, got {text!r}") from None
    if not all(1 <= n <= 128 for n in sides):
        raise argparse.ArgumentTypeError(f"points per side must be in [1, 128], got {text!r}")
    return sides


def server_url(args: argparse.Namespace) -> contextlib.AbstractContextManager[str]:
    """The gRPC url of ``--url``, or of an embedded server started on ``--repository``."""
    if args.url:
        return contextlib.nullcontext(args.url)
    if not args.repository.is_dir():
        raise UserError(f"model repository {args.repository} not found; run `make export` first")
    return _embedded(args.repository)


@contextlib.contextmanager
def _embedded(repository: Path):
    from cellsam_triton.server import EmbeddedServer

    with EmbeddedServer(repository) as server:
        yield server.grpc_url


def measure(args: argparse.Namespace) -> dict:
    """Run the methods; summaries (with a label each) and per-image rows."""
    from cellsam_triton.client.api import Segmenter
    from cellsam_triton.datasets import data_checksum

    from .baseline import segment_classical

    records = select(args.data, SPLIT, args.limit)
    runs = {}
    with server_url(args) as url, Segmenter(url, args.model, timeout_s=args.timeout) as segmenter:
        model = args.model or segmenter.family.pipeline_name
        runs[f"{model} (detector boxes)"] = evaluate(args.data, records, served_predict(segmenter, None), model)
        for views in args.tta:
            runs[f"{model} (detector boxes, --tta {views})"] = evaluate(
                args.data, records, served_predict(segmenter, None, options=SegmentOptions(tta=views)), f"{model} tta {views}")
        classical = evaluate(args.data, records, lambda image, labels: segment_classical(image), "classical")
        runs["classical (Otsu + watershed)"] = classical
        runs[f"{model} (ground-truth boxes)"] = evaluate(args.data, records, served_predict(segmenter, "gt"), f"{model} gt")
        for side in args.grid:
            grid = GridOptions(points_per_side=side)
            runs[f"{model} (grid {side}x{side}, no detector)"] = evaluate(
                args.data, records, served_predict(segmenter, None, grid), f"{model} grid {side}")
    if args.before is not None:
        before = argparse.Namespace(**{**vars(args), "repository": args.before, "url": None})
        with server_url(before) as url, Segmenter(url, args.model, timeout_s=args.timeout) as segmenter:
            runs[f"{model} before (detector boxes, {args.before.name})"] = evaluate(
                args.data, records, served_predict(segmenter, None), f"{model} before")
    return {
        "split": SPLIT,
        "images": len(records),
        "data_checksum": data_checksum(args.data, [r.id for r in records]),
        "model": model,
        "methods": {name: summary(scores) for name, scores in runs.items()},
        "per_image": {name: [s.as_dict() for s in scores] for name, scores in runs.items()},
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown_table(result: dict) -> str:
    """One row per method: the COLUMNS, F1 by kind (with image counts) and seconds per image."""
    header = ["method", *(title for title, _ in COLUMNS), "F1 by kind", "s/image"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, s in result["methods"].items():
        kinds = ", ".join(f"{k} {_fmt(v['f1_mean'])} ({v['images']})" for k, v in s["by_kind"].items())
        cells = [name, *(_fmt(s[key]) for _, key in COLUMNS), kinds, f"{s['seconds_per_image']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_plot(result: dict, path: Path) -> None:
    """Grouped bars: one group per metric, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(result["methods"])
    x = np.arange(len(COLUMNS))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, name in enumerate(methods):
        values = [result["methods"][name][key] or 0.0 for _, key in COLUMNS]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, [title for title, _ in COLUMNS], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(f"DSB2018 {result['split']} split, {result['images']} images (IoU 0.5 matching)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(methods), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> tuple[str, list[Path]]:
        result = measure(args)
        table = markdown_table(result)
        heading = f"# Accuracy, DSB2018 {result['split']} split ({result['images']} images)\n\n"
        written = write_results(args.out, "accuracy", result, heading + table)
        bar_plot(result, args.out / "accuracy.png")
        return table, written + [args.out / "accuracy.png"]

    return run_main("bench-accuracy", work)


if __name__ == "__main__":
    sys.exit(main())
