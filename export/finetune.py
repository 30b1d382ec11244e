"""`cellsam-triton finetune`: CellSeg1's one-image LoRA fine-tuning, on the LiteMedSAM base.

    cellsam-triton finetune --image cells.tif --labels cells_labels.tif --out lora.pth
    cellsam-triton export --model cellseg1 --lora lora.pth --repository DIR   # served with grid prompts

Base: LiteMedSAM's TinyViT encoder with the default model's point decoder (`train-decoder
--point-fraction`, export/weights/lite_decoder_points.pt: it already answers point prompts, which
LiteMedSAM's own box-trained decoder does not); ``--base-decoder litemedsam`` starts from LiteMedSAM's
own decoder as CellSeg1 would. The adapter file names its base decoder by sha256, so export merges
into the same one.

Recipe (CellSeg1, arXiv 2412.01410, adapted to a CPU): rank-r LoRA on ``q_proj``/``v_proj`` of
every attention of the mask decoder's two-way transformer and, with ``--encoder-lora`` (CellSeg1's
full recipe, ~4x slower a step here), on the q and v projections of every image-encoder attention
(TinyViT); the prompt encoder and the mask decoder's tensors outside the transformer are trained
in full (CellSeg1 saves them in the adapter file). Each epoch is one optimiser step on an
augmented view of the one image (export/finetune_data.py; with a frozen encoder ``--views``
views are embedded once and reused): point
prompts drawn from up to ``--prompts`` instances, loss = BCE + Dice of the mask logits against
the instance + MSE of the IoU head against the real IoU of its mask. ``--background`` adds that
many points off the cells with an empty target (IoU target 0), an addition to CellSeg1's recipe
so that grid points on the background score low. After training, the grid's predicted-IoU
threshold is swept on the training image itself (export/grid_calibration.py): the point decoder's
thresholds chosen on train are kept; from LiteMedSAM's own decoder the best there is served
(CellSeg1's 0.8 suits SAM ViT-H's IoU head, not a fine-tuned LiteMedSAM's). Views are drawn at
the scale the image is served at (auto-scale), and the learning rates follow the base (BASE_RATES).
Writes the adapter file (CellSeg1 layout) and ``<out>.json`` (provenance: inputs' sha256, seed,
settings, loss curve, time, grid calibration, adapter sha256).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cellsam_triton.errors import UserError

from .training import sha256_file


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run (all recorded in the provenance file)."""

    epochs: int = 30  # chosen on train images among 30, 45, 60 (bench/cellseg1_steps.py): 30 for both kinds
    prompts: int = 8  # instance points per step
    background: int = 4  # background points per step (0: CellSeg1's recipe exactly)
    rank: int = 4
    lr: float | None = None  # LoRA adapters (None: the base's, BASE_RATES)
    full_lr: float | None = None  # prompt encoder and mask-decoder tensors trained in full (IoU head included)
    weight_decay: float = 1e-4
    iou_weight: float = 1.0
    seed: int = 0
    encoder_lora: bool = False  # CellSeg1 adapts the encoder too: --encoder-lora (about 4x slower a step on a CPU)
    views: int = 8  # frozen encoder only: augmented views embedded once and reused
    size: int = 256
    calibrate: bool = True  # sweep the grid's predicted-IoU threshold on the training image (see grid_calibration)
    calibration_points: int = 0  # grid points per side for that (0: the served model's)
    base_decoder: str = "points"  # "points" (the default model's point decoder), "litemedsam" or a weights file
    served_scale: bool = True  # train at the scale the served model auto-scales this image to
    extra: dict = field(default_factory=dict)


# (lr, full_lr) by base decoder: LiteMedSAM's own decoder must learn point prompts from scratch
# (CellSeg1's rates); a decoder already trained for them (the default: "points", or a weights file)
# is adapted gently: at LiteMedSAM's rates (native-scale views) 60 steps on one image took the
# default point decoder from grid F1 0.667 to 0.566 on that very image.
BASE_RATES = {"litemedsam": (2e-3, 1e-3)}
POINT_BASE_RATES = (2e-4, 1e-4)


def with_base_rates(config: FinetuneConfig) -> FinetuneConfig:
    """``config`` with the learning rates it leaves open set for its base decoder."""
    from dataclasses import replace

    lr, full_lr = BASE_RATES.get(config.base_decoder, POINT_BASE_RATES)
    return replace(config, lr=lr if config.lr is None else config.lr, full_lr=full_lr if config.full_lr is None else config.full_lr)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = FinetuneConfig()
    parser.add_argument("--image", required=True, type=Path, metavar="IMG", help="the one training image (TIFF, PNG, NPY)")
    parser.add_argument("--labels", required=True, type=Path, metavar="LBL", help="its instance labels (0 = background), same height and width")
    parser.add_argument("--out", type=Path, default=None, metavar="LORA.pth", help="adapter file to write (default: <image stem>_lora.pth here)")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="optimiser steps, one augmented view each (default %(default)s)")
    parser.add_argument("--prompts", type=int, default=d.prompts, help="instance point prompts per step (default %(default)s)")
    parser.add_argument("--background", type=int, default=d.background, help="background point prompts per step, empty target (default %(default)s; 0 = CellSeg1 exactly)")
    parser.add_argument("--rank", type=int, default=d.rank, help="LoRA rank (default %(default)s)")
    parser.add_argument("--lr", type=float, default=d.lr,
                        help=f"learning rate of the adapters (default: {POINT_BASE_RATES[0]:g} from a point decoder, "
                             f"{BASE_RATES['litemedsam'][0]:g} from LiteMedSAM's own; the tensors trained in full get half)")
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed (default %(default)s)")
    parser.add_argument("--encoder-lora", action=argparse.BooleanOptionalAction, default=d.encoder_lora,
                        help="LoRA on the image encoder's q/v too, as CellSeg1 (a new view and an encoder backward pass every step: "
                             "about 4x slower on a CPU); without it the augmented --views are embedded once (default: off)")
    parser.add_argument("--views", type=int, default=d.views, help="frozen encoder: augmented views embedded once and reused (default %(default)s)")
    parser.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=d.calibrate,
                        help="after training, sweep the grid's predicted-IoU threshold on the training image: a base decoder with "
                             "thresholds chosen on train (select-grid) keeps them, otherwise the best there is served (default on)")
    parser.add_argument("--calibration-points", type=int, default=d.calibration_points, metavar="N",
                        help="grid points per side for the calibration (default: the served model's)")
    parser.add_argument("--base-decoder", default=d.base_decoder, metavar="BASE",
                        help="decoder the adapters start from: points (the default model's point decoder), litemedsam "
                             "(LiteMedSAM's own, CellSeg1 exactly) or a `train-decoder` weights file (default %(default)s)")
    parser.add_argument("--served-scale", action=argparse.BooleanOptionalAction, default=d.served_scale,
                        help="train at the scale the served model auto-scales this image to (its cells' median size; default on)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar on stderr (default on)")


def _check(config: FinetuneConfig) -> None:
    for name in ("epochs", "prompts", "rank"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(config, name)}")
    if config.background < 0:
        raise UserError(f"--background must not be negative, got {config.background}")
    if not 0 <= config.calibration_points <= 128:
        raise UserError(f"--calibration-points must be in [0, 128], got {config.calibration_points}")
    if config.lr is not None and not (np.isfinite(config.lr) and config.lr > 0):
        raise UserError(f"--lr must be a positive number, got {config.lr}")
    from .cellseg1_export import base_decoder_weights

    base_decoder_weights(config.base_decoder)  # a name it knows or an existing file


def finetune_arrays(image: np.ndarray, labels: np.ndarray, config: FinetuneConfig, progress: bool = True) -> tuple[dict, dict]:
    """Train adapters on one image [H,W(,C)] with labels [H,W]; (adapter state dict, training record)."""
    import torch

    from cellsam_triton.contracts import CELLSEG1_LITE

    from .finetune_data import at_served_scale, check_labels, normalise
    from .finetune_train import Trainer

    _check(config)
    labels = check_labels(labels, image.shape[:2], "labels")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    trainer = Trainer(config)
    started = time.perf_counter()
    scaled, scaled_labels, factor = at_served_scale(image, labels, CELLSEG1_LITE) if config.served_scale else (image, labels, 1.0)
    history = trainer.fit(normalise(scaled), scaled_labels, rng, progress)
    seconds = time.perf_counter() - started
    record = {
        "seconds": round(seconds, 1),
        "instances": int(len(np.unique(labels[labels > 0]))),
        "image_shape": list(image.shape),
        "served_scale": factor,  # the training views' scale: the enlargement the served model applies
        "loss_first": history[0],
        "loss_last": history[-1],
        "loss_every_10": history[::10],
        "base": trainer.base,
        "trainable_parameters": trainer.trainable,
    }
    from .grid_calibration import calibrate, kept_thresholds
    from .lite_export import grid_selection_record

    keep = grid_selection_record(trainer.base_weights) or None  # the base's select-grid record
    if config.calibrate:  # on the unmerged modules just trained (segment_grid auto-scales itself)
        record["grid"] = calibrate(trainer.encoder, trainer.decoder, CELLSEG1_LITE, image, labels,
                                   config.calibration_points or None, keep=keep)
    elif keep is not None:
        record["grid"] = kept_thresholds(keep)
    record["config"] = asdict(trainer.config)  # with the learning rates resolved
    return trainer.adapters(), record


def run(args: argparse.Namespace) -> int:
    import torch

    from .finetune_data import read_pair

    config = FinetuneConfig(
        epochs=args.epochs, prompts=args.prompts, background=args.background, rank=args.rank,
        lr=args.lr, seed=args.seed, encoder_lora=args.encoder_lora, views=args.views,
        calibrate=args.calibrate, calibration_points=args.calibration_points, base_decoder=str(args.base_decoder),
        served_scale=args.served_scale,
    )
    _check(config)
    image, labels = read_pair(args.image, args.labels)
    out = args.out or Path(f"{args.image.stem}_lora.pth")
    out.parent.mkdir(parents=True, exist_ok=True)
    adapters, record = finetune_arrays(image, labels, config, progress=args.progress)
    torch.save(adapters, out)
    provenance = {
        "command": "cellsam-triton " + " ".join(sys.argv[1:]),
        "image": str(args.image), "image_sha256": sha256_file(args.image),
        "labels": str(args.labels), "labels_sha256": sha256_file(args.labels),
        **write_provenance_fields(config, record, out),
    }
    provenance_path(out).write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"wrote {out} ({len(adapters)} tensors) and {provenance_path(out).name}: {record['instances']} instances, "
          f"{config.epochs} epochs in {record['seconds']:.0f} s, loss {record['loss_first']:.3f} -> {record['loss_last']:.3f}")
    if "grid" in record:
        grid = record["grid"]
        threshold = grid["pred_iou_threshold"]
        how = "kept from the base decoder (chosen on train)" if "stability_threshold" in grid else "calibrated on the training image"
        f1 = grid.get("training_f1_by_threshold", {}).get(f"{threshold:g}")
        print(f"grid threshold {how}: predicted IoU >= {threshold:g}" + ("" if f1 is None else f" (F1 on the training image {f1:.3f})"))
    print(f"serve it: cellsam-triton export --model cellseg1 --lora {out} --repository DIR")
    return 0


def provenance_path(adapter: Path) -> Path:
    """``lora.pth`` -> ``lora.json`` beside it."""
    return Path(adapter).with_suffix(".json")


def read_provenance(adapter: Path) -> dict:
    """The provenance recorded beside an adapter file ({} when there is none)."""
    path = provenance_path(adapter)
    return json.loads(path.read_text()) if path.is_file() else {}


def write_provenance_fields(config: FinetuneConfig, record: dict, adapter: Path) -> dict:
    """The provenance entries common to the CLI and the benchmark (settings, record, versions, sha256)."""
    import torch

    return {
        "recipe": f"CellSeg1 (arXiv 2412.01410) LoRA q/v {'encoder + ' if config.encoder_lora else ''}decoder, "
                  f"BCE+Dice+IoU-MSE; LiteMedSAM base, decoder: {record['base']['decoder']}",
        "config": asdict(config),
        **record,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "adapter": str(adapter),
        "adapter_sha256": sha256_file(adapter),
    }
