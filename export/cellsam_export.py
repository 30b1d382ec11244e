"""Export CellSAM's networks to ONNX in a Triton repository layout, parity-checked.

``DIR/cellsam_encoder/1/model.onnx``   image [B,3,S,S] -> image_embeddings [B,C,g,g]
``DIR/cellsam_detector/1/model.onnx``  image [B,3,S,S] -> pred_logits [B,Q,2], pred_boxes [B,Q,4]
``DIR/cellsam_decoder/1/model.onnx``   image_embeddings [1,C,g,g], boxes [N,4] -> low_res_masks
                                       [N,1,m,m], iou_predictions [N,1]
``DIR/cellsam_point_decoder/1/...``    the same SAM prompt encoder + mask decoder with point prompts
                                       [N,P,2] / [N,P] (export/point_export.py; `cellsam_grid`, `--points`)
Tensor and model names come from ``cellsam_triton.contracts.CELLSAM``; sizes from the modules
(a small test checkpoint gives smaller embeddings). config.pbtxt files are written elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cellsam_triton.contracts import CELLSAM, ModelSpec

from .models.cellsam import CellSAMModules, build_cellsam, load_checkpoint
from .onnx_export import ExportReport, export_onnx


def model_path(repository_dir: str | os.PathLike, spec: ModelSpec) -> Path:
    """Where Triton looks for version 1 of ``spec``'s ONNX model."""
    return Path(repository_dir) / spec.name / "1" / "model.onnx"


def _names(spec: ModelSpec) -> tuple[list[str], list[str]]:
    return [t.name for t in spec.inputs], [t.name for t in spec.outputs]


def random_boxes(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` valid xyxy boxes inside a ``size`` frame."""
    xy = torch.rand(n, 2, generator=generator) * size * 0.8
    wh = torch.rand(n, 2, generator=generator) * size * 0.2 + 2
    return torch.cat((xy, xy + wh), dim=1)


def export_encoder(modules: CellSAMModules, repository_dir: str | os.PathLike, tolerance: float) -> ExportReport:
    """Segmenter image encoder, batch axis dynamic."""
    spec = CELLSAM.encoder()
    (image,), (embeddings,) = _names(spec)
    s = modules.image_size
    example = {image: torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(0))}
    axes = {image: {0: "batch"}, embeddings: {0: "batch"}}
    return export_onnx(modules.encoder, example, [embeddings], axes, model_path(repository_dir, spec), tolerance)


def export_detector(modules: CellSAMModules, repository_dir: str | os.PathLike, tolerance: float) -> ExportReport:
    """CellFinder, batch axis dynamic; the input is the detector's [0,1] image."""
    spec = CELLSAM.detector_model()
    (image,), outputs = _names(spec)
    s = modules.image_size
    example = {image: torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(1))}
    axes = {name: {0: "batch"} for name in (image, *outputs)}
    return export_onnx(modules.cellfinder, example, outputs, axes, model_path(repository_dir, spec), tolerance)


def export_decoder(modules: CellSAMModules, repository_dir: str | os.PathLike, tolerance: float) -> ExportReport:
    """Batched box decoder, number of boxes dynamic; checked at three box counts."""
    spec = CELLSAM.decoder()
    (embeddings, boxes), outputs = _names(spec)
    g = torch.Generator().manual_seed(2)
    pe = modules.decoder.prompt_encoder
    emb = torch.randn(1, pe.embed_dim, *pe.image_embedding_size, generator=g)
    size = pe.input_image_size[0]
    sets = [{embeddings: emb, boxes: random_boxes(n, size, g)} for n in (4, 1, 11)]
    axes = {name: {0: "num_boxes"} for name in (boxes, *outputs)}
    return export_onnx(modules.decoder, sets[0], outputs, axes, model_path(repository_dir, spec), tolerance, sets[1:])


def export_cellsam(checkpoint_path: str | os.PathLike, repository_dir: str | os.PathLike, tolerance: float = 1e-3) -> list[ExportReport]:
    """Load an official CellSAM checkpoint and write its four ONNX models under ``repository_dir``."""
    from .point_export import export_point_decoder

    modules = build_cellsam(load_checkpoint(checkpoint_path))
    reports = [export(modules, repository_dir, tolerance) for export in (export_encoder, export_detector, export_decoder)]
    return reports + [export_point_decoder(CELLSAM, modules.decoder, repository_dir, tolerance)]
