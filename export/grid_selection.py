"""`cellsam-triton select-grid`: choose the default grid's thresholds on training images.

Grid mode (``<family>_grid``, no detector) keeps a point's mask when its predicted IoU and its
stability pass two thresholds. CellSeg1's 0.8 / 0.6 were tuned for SAM ViT-H's IoU head; a
decoder trained here with mixed prompts (``train-decoder --point-fraction``) has its own. This
command runs the served grid rules in process (export/grid_calibration.py's ``InProcessGrid``:
the same model_repository/grid_generator.py code, the client's tiling) on ``--images`` seeded
training images (never validation ones) with every pair of :data:`IOU_CANDIDATES` x
:data:`STABILITY_CANDIDATES`, and records the pair with the best mean per-image F1@0.5 as
``grid_selection`` in the weights' provenance JSON, with the F1 of that pair without the
auto-scale pass (``--scale 1``) beside it. ``export`` serves it for the weights it
loads as the point decoder (``lite_export.grid_selection``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from cellsam_triton.errors import UserError

IOU_CANDIDATES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # 0.5 won at the bottom of (0.5..0.8) once: the range goes lower
STABILITY_CANDIDATES = (0.6, 0.8)
RULE = ("predicted-IoU x stability threshold pair with the best mean per-image F1@0.5 of grid segmentation "
        "on seeded training images (ties: the higher thresholds); validation images are never used")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, required=True, help="decoder weights from train-decoder (its .json is updated)")
    parser.add_argument("--data", type=Path, required=True, help="DSB-layout folder (manifest.csv, images/)")
    parser.add_argument("--images", type=int, default=24, help="training images to choose on (default %(default)s)")
    parser.add_argument("--points-per-side", type=int, default=None, help="grid density (default: the default family's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")


def training_ids(data: Path, count: int, seed: int) -> list[str]:
    """``count`` train-split image ids drawn with ``seed`` (sorted, so the choice is reproducible)."""
    from cellsam_triton.client.evaluate import select

    ids = sorted(r.id for r in select(data, "train"))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(ids, size=min(count, len(ids)), replace=False).tolist())


def choose(infer, family, samples: list[tuple[np.ndarray, np.ndarray]], side: int) -> dict:
    """Mean F1 per (IoU, stability) pair over ``samples`` and the chosen pair (see :data:`RULE`)."""
    from cellsam_triton.client.grid_rules import GridOptions, segment_grid
    from cellsam_triton.client.metrics import score_image
    from cellsam_triton.client.types import SegmentOptions

    pairs = [(t, s) for t in IOU_CANDIDATES for s in STABILITY_CANDIDATES]
    f1: dict[tuple[float, float], list[float]] = {pair: [] for pair in pairs}
    for image, labels in samples:
        for t, s in pairs:  # the decoder's answers are cached: each image costs one grid pass
            grid = GridOptions(points_per_side=side, pred_iou_threshold=t, stability_threshold=s)
            f1[(t, s)].append(score_image(labels, segment_grid(image, infer, family, SegmentOptions(), grid).labels).f1)
    means = {pair: float(np.mean(v)) for pair, v in f1.items()}
    best = max(pairs, key=lambda p: (round(means[p], 4), p))
    # the same pair without the auto-scale pass (its native pass is cached): what auto-scale adds
    grid = GridOptions(points_per_side=side, pred_iou_threshold=best[0], stability_threshold=best[1])
    native = [score_image(labels, segment_grid(image, infer, family, SegmentOptions(scale=1.0), grid).labels).f1
              for image, labels in samples]
    return {"pred_iou_threshold": best[0], "stability_threshold": best[1], "points_per_side": side,
            "train_f1_by_threshold": {f"{t:g}/{s:g}": round(v, 4) for (t, s), v in means.items()},
            "train_f1_native_scale": round(float(np.mean(native)), 4)}


def run(args: argparse.Namespace) -> int:
    import torch

    from cellsam_triton.contracts import LITE
    from cellsam_triton.datasets import load_sample

    from .grid_calibration import InProcessGrid
    from .cellseg1_export import lite_base_modules
    from .training import command_line, sha256_file

    if args.images < 1:
        raise UserError("--images must be at least 1")
    side = args.points_per_side or LITE.grid.points_per_side
    if not 1 <= side <= 128:
        raise UserError(f"--points-per-side must be in [1, 128], got {side}")
    provenance_path = args.weights.with_suffix(".json")
    if not provenance_path.is_file():
        raise UserError(f"{provenance_path} not found: select-grid records its choice beside weights from train-decoder")
    torch.set_num_threads(max(1, args.threads))
    lite, point = lite_base_modules(args.weights)
    ids = training_ids(args.data, args.images, args.seed)
    started = time.perf_counter()
    record = choose(InProcessGrid(lite.encoder, point, LITE), LITE, [load_sample(args.data, i) for i in ids], side)
    record.update({"rule": RULE, "images": len(ids), "seed": args.seed, "split": "train", "encoder": "fp32 (PyTorch)",
                   "grid_window": LITE.grid.window,
                   "weights_sha256": sha256_file(args.weights), "command": command_line("select-grid"),
                   "seconds": round(time.perf_counter() - started, 1)})
    provenance = json.loads(provenance_path.read_text())
    provenance["grid_selection"] = record
    provenance_path.write_text(json.dumps(provenance, indent=2) + "\n")
    table = ", ".join(f"{k}: {v:.3f}" for k, v in record["train_f1_by_threshold"].items())
    print(f"grid {side}x{side} on {len(ids)} train images, mean F1 by IoU/stability threshold: {table}", file=sys.stderr)
    print(f"chose predicted IoU >= {record['pred_iou_threshold']:g}, stability >= {record['stability_threshold']:g} "
          f"(train F1 {max(record['train_f1_by_threshold'].values()):.3f}; {record['train_f1_native_scale']:.3f} without auto-scale); "
          f"wrote {provenance_path}")
    return 0
