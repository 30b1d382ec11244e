"""`cellsam-triton export`: checkpoint -> ONNX models (parity-checked) -> Triton model repository.

The models are exported into a staging folder beside the repository and moved into place only
after every parity check passed, so a failed export never leaves a half-written model behind.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from cellsam_triton.contracts import CELLSAM, CELLSEG1, CELLSEG1_LITE, DECODER_CONTEXTS, ENCODER_PRECISIONS, LITE, Family
from cellsam_triton.errors import UserError

# Literal copies of export.repository's choices would drift; that module is light (no torch).
from .grid_repository import served_roles, write_served
from .labels_repository import labels_roles, write_labels
from .repository import DEFAULT_TRT_CACHE, PRECISIONS

# --model value -> family; the default model needs no checkpoint (weights ship with the project).
MODEL_CHOICES: dict[str, Family] = {
    "default": LITE,
    LITE.name: LITE,
    "litemedsam": LITE,
    CELLSAM.name: CELLSAM,
    CELLSEG1.name: CELLSEG1,
    CELLSEG1_LITE.name: CELLSEG1_LITE,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", choices=sorted(MODEL_CHOICES), help="model to export (default: LiteMedSAM + CellFinder-lite)")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint file (required for --model cellsam)")
    parser.add_argument("--sam-checkpoint", type=Path, help="official segment_anything ViT-B/L/H .pth (--model cellseg1; without it the base is LiteMedSAM: cellseg1_lite)")
    parser.add_argument("--lora", type=Path, help="CellSeg1 LoRA adapter file, merged before export (--model cellseg1; `cellsam-triton finetune` writes one)")
    parser.add_argument("--grid-iou-threshold", type=float, default=None, metavar="T",
                        help="--model cellseg1: grid masks kept at predicted IoU >= T by default (default: the threshold `finetune` "
                             "calibrated, in the adapter's .json, else CellSeg1's 0.8)")
    parser.add_argument("--detector-weights", type=Path, help="CellFinder-lite weights (default: the committed ones)")
    parser.add_argument("--decoder-weights", metavar="PATH|none", help="fine-tuned LiteMedSAM mask decoder (default: the committed one for the decoder context; none: LiteMedSAM's own)")
    parser.add_argument("--point-decoder-weights", metavar="PATH|none",
                        help="default model: decoder weights of <model>_point_decoder (point prompts, grid mode) (default: the "
                             "committed full-context decoder, lite_export.DEFAULT_POINT_DECODER_WEIGHTS; none: LiteMedSAM's own)")
    parser.add_argument("--decoder-context", choices=DECODER_CONTEXTS, default=None,
                        help=f"default model: roi decodes each box on an embedding window (fast), full on the whole embedding "
                             f"(the decoder served before ROI decoding, exactly) (default {LITE.decoder_context})")
    parser.add_argument("--encoder-precision", choices=ENCODER_PRECISIONS, default=None,
                        help=f"default model, cpu target: int8 quantises the encoder's weight MatMuls (faster on CPU, "
                             f"checked against PyTorch) (default {LITE.encoder_precision}; the gpu target serves fp32/fp16)")
    parser.add_argument("--repository", type=Path, required=True, metavar="DIR", help="Triton model repository to write")
    parser.add_argument("--target", choices=("cpu", "gpu"), default="cpu", help="cpu: embedded server (Python-backend ONNX Runtime); gpu: native onnxruntime_onnx, KIND_GPU")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads per model on cpu (default: all cores)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="gpu: TensorRT precision; fp16 keeps LayerNorm in FP32 (default %(default)s)")
    parser.add_argument("--trt-cache", default=DEFAULT_TRT_CACHE, metavar="DIR", help="gpu: TensorRT engine and timing cache folder inside the server (default %(default)s)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max abs error ONNX vs PyTorch (default %(default)s)")


def export_family(family: Family, staging: Path, args: argparse.Namespace) -> list:
    """Write the family's ONNX models under ``staging``; returns the parity reports."""
    if family is CELLSAM:
        if args.checkpoint is None:
            raise UserError("--model cellsam needs --checkpoint PATH (the official CellSAM .pt file)")
        from .cellsam_export import export_cellsam

        return export_cellsam(args.checkpoint, staging, tolerance=args.tolerance)
    if family is CELLSEG1_LITE:
        from .cellseg1_export import export_cellseg1_lite

        return export_cellseg1_lite(args.lora, staging, tolerance=args.tolerance)
    if family is CELLSEG1:
        if args.sam_checkpoint is None:
            raise UserError("--model cellseg1 needs --sam-checkpoint PATH (an official SAM ViT-B/L/H .pth)")
        from .cellseg1_export import export_cellseg1

        return export_cellseg1(args.sam_checkpoint, args.lora, staging, tolerance=args.tolerance)
    from .lite_export import export_lite

    kwargs = {"tolerance": args.tolerance, "decoder_weights": decoder_weights(args), "decoder_context": decoder_context(args),
              "encoder_precision": encoder_precision(args), "point_decoder_weights": point_decoder_weights(args)}
    if args.detector_weights is not None:
        kwargs["detector_weights"] = args.detector_weights
    return export_lite(staging, **kwargs)


def decoder_context(args: argparse.Namespace) -> str:
    """The LITE decoder context ``--decoder-context`` names (default: the family's)."""
    return getattr(args, "decoder_context", None) or LITE.decoder_context


def encoder_precision(args: argparse.Namespace) -> str:
    """The LITE encoder precision: ``--encoder-precision``, else the family's on cpu, fp32 on gpu."""
    given = getattr(args, "encoder_precision", None)
    if getattr(args, "target", "cpu") == "gpu":
        if given == "int8":
            raise UserError("--encoder-precision int8 is for --target cpu (on a GPU use --precision fp16)")
        return "fp32"
    return given or LITE.encoder_precision


def decoder_weights(args: argparse.Namespace) -> Path | None:
    """The LITE decoder weights ``--decoder-weights`` names (None: LiteMedSAM's own decoder;
    not given: the committed weights for the decoder context)."""
    from .lite_export import DEFAULT_DECODER_WEIGHTS

    given = getattr(args, "decoder_weights", None)
    if given is None:
        return DEFAULT_DECODER_WEIGHTS[decoder_context(args)]
    return None if given.lower() == "none" else Path(given)


def point_decoder_weights(args: argparse.Namespace) -> Path | None:
    """The LITE point decoder weights ``--point-decoder-weights`` names (None: LiteMedSAM's own
    decoder; not given: ``lite_export.DEFAULT_POINT_DECODER_WEIGHTS``)."""
    from .lite_export import DEFAULT_POINT_DECODER_WEIGHTS

    given = getattr(args, "point_decoder_weights", None)
    if given is None:
        return DEFAULT_POINT_DECODER_WEIGHTS
    return None if given.lower() == "none" else Path(given)


def served_grid_family(family: Family, args: argparse.Namespace) -> tuple[Family, str]:
    """A CellSeg1 family with its served predicted-IoU threshold: ``--grid-iou-threshold``, else
    the one `finetune` chose (``grid`` in the adapter's provenance file: calibrated on the training
    image, or the base decoder's kept with its stability threshold), else CellSeg1's.
    ``cellseg1_lite`` starts from its base decoder's grid thresholds chosen on train (`select-grid`;
    the default model's point decoder without adapters or when the adapter file names it)."""
    import dataclasses
    import json

    from .finetune import provenance_path

    threshold, source = args.grid_iou_threshold, "--grid-iou-threshold"
    if family is CELLSEG1_LITE:  # the select-grid thresholds of the base decoder, where it has them
        from .cellseg1_export import lite_base_decoder
        from .lite_export import grid_selection

        chosen = grid_selection(lite_base_decoder(args.lora))
        if chosen:
            family = dataclasses.replace(family, grid=dataclasses.replace(family.grid, **chosen))
            if threshold is None and (args.lora is None or not provenance_path(args.lora).is_file()):
                return family, "chosen on train for the base decoder (select-grid)"
    if threshold is None and args.lora is not None and provenance_path(args.lora).is_file():
        try:
            grid = json.loads(provenance_path(args.lora).read_text()).get("grid") or {}
        except (json.JSONDecodeError, AttributeError):
            raise UserError(f"{provenance_path(args.lora)}: not a `finetune` provenance file (bad JSON)") from None
        threshold = grid.get("pred_iou_threshold")
        kept = "stability_threshold" in grid  # the base decoder's thresholds, kept by `finetune`
        source = f"{'kept from the base decoder' if kept else 'calibrated on the training image'} ({provenance_path(args.lora).name})"
        if kept:
            stability = _grid_fraction(grid["stability_threshold"], "stability", source)
            family = dataclasses.replace(family, grid=dataclasses.replace(family.grid, stability_threshold=stability))
    if threshold is None:
        return family, f"CellSeg1's {family.grid.pred_iou_threshold:g}"
    threshold = _grid_fraction(threshold, "predicted-IoU", source)
    return dataclasses.replace(family, grid=dataclasses.replace(family.grid, pred_iou_threshold=threshold)), source


def _grid_fraction(value, what: str, source: str) -> float:
    """A served grid threshold as a float in [0, 1]; a UserError naming where it came from otherwise."""
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise UserError(f"grid {what} threshold must be in [0, 1], got {value!r} ({source})")
    return float(value)


def install(staging: Path, repository: Path, family: Family) -> list[Path]:
    """Move the staged model folders into the repository, replacing older versions."""
    repository.mkdir(parents=True, exist_ok=True)
    installed = []
    for _, spec in served_roles(family) + labels_roles(family):
        src, dst = staging / spec.name, repository / spec.name
        if not src.exists():
            continue
        if dst.exists():
            shutil.rmtree(dst)
        shutil.move(str(src), str(dst))
        installed.append(dst)
    return installed


def run(args: argparse.Namespace) -> int:
    from .repository import GpuOptions

    family = MODEL_CHOICES[args.model]
    if family is CELLSEG1 and args.sam_checkpoint is None:
        family = CELLSEG1_LITE  # CellSeg1 on the LiteMedSAM base (adapters from `finetune`)
    lite_only = (args.detector_weights, args.decoder_weights, args.point_decoder_weights, args.decoder_context, args.encoder_precision)
    if family is not LITE and any(option is not None for option in lite_only):
        raise UserError("--detector-weights/--decoder-weights/--point-decoder-weights/--decoder-context/--encoder-precision are "
                        "for the default model (LiteMedSAM + CellFinder-lite)")
    for given in (args.checkpoint, args.sam_checkpoint, args.lora):
        if given is not None and not given.is_file():
            raise UserError(f"file not found: {given}")
    served, grid_note = family, ""
    if family is CELLSEG1 or family is CELLSEG1_LITE:
        served, source = served_grid_family(family, args)
        grid_note = f"; grid masks kept at predicted IoU >= {served.grid.pred_iou_threshold:g} ({source})"
    elif args.grid_iou_threshold is not None:
        raise UserError("--grid-iou-threshold is for --model cellseg1 (detector-free grid segmentation)")
    started = time.perf_counter()
    args.repository.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=args.repository.parent) as tmp:
        staging = Path(tmp)
        reports = export_family(family, staging, args)
        if family is LITE:  # its mask threshold depends on the decoder weights
            from .lite_export import DEFAULT_DETECTOR_WEIGHTS, served_family

            family = served_family(decoder_weights(args), decoder_context(args), encoder_precision(args),
                                   args.detector_weights or DEFAULT_DETECTOR_WEIGHTS, point_decoder_weights(args))
        else:
            family = served  # CellSeg1: with its grid threshold
        gpu = GpuOptions(precision=args.precision, trt_cache=args.trt_cache)
        # every family with its point decoder and grid pipeline (a detector-free one without a detector)
        write_served(staging, family, args.target, threads=args.threads, gpu=gpu)
        write_labels(staging, family, args.target, threads=args.threads, gpu=gpu)  # `<family>_labels`, any family
        installed = install(staging, args.repository, family)
    for report in reports:
        print(report)
    names = ", ".join(p.name for p in installed)
    target = f"gpu, {args.precision}" if args.target == "gpu" else args.target
    print(f"exported {family.name} ({target}) to {args.repository}: {names} in {time.perf_counter() - started:.0f} s{grid_note}")
    return 0
