"""``<family>_point_decoder`` from any SAM-structured decoder (prompt encoder + mask decoder), parity-checked.

image_embeddings [1,C,e,e], point_coords [N,P,2], point_labels [N,P] -> low_res_masks [N,1,m,m],
iou_predictions [N,1]. N prompts (cells) on axis 0, P points each; prompts shorter than P are
padded with label -1 (SAM's "not a point"). Both axes are dynamic and proven so: the ONNX file is
checked against PyTorch on one-point prompts (what the grid sends) and on padded multi-point
prompts with negative points. Every SAM-family exporter calls :func:`export_point_decoder`.
"""

from __future__ import annotations

import os

import torch

from cellsam_triton.contracts import Family

from .cellsam_export import model_path
from .onnx_export import ExportReport, export_onnx

# (prompts, points per prompt) of the traced example and of the extra parity checks
POINT_SHAPES = ((5, 2), (1, 1), (9, 3))


def random_embeddings(decoder: torch.nn.Module, generator: torch.Generator) -> torch.Tensor:
    """A random [1,C,e,e] image embedding of the size ``decoder``'s prompt encoder expects."""
    pe = decoder.prompt_encoder
    return torch.randn(1, pe.embed_dim, *pe.image_embedding_size, generator=generator)


def random_points(n: int, p: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` prompts of ``p`` points in a ``size`` frame: the first point positive, the others
    positive or negative, and (p > 1) the last point of every other prompt padding (label -1)."""
    coords = torch.rand(n, p, 2, generator=generator) * size
    labels = (torch.rand(n, p, generator=generator) > 0.4).float()
    labels[:, 0] = 1.0
    if p > 1:
        labels[::2, -1] = -1.0
        coords[::2, -1] = 0.0
    return coords, labels


def export_point_decoder(family: Family, decoder: torch.nn.Module, repository_dir: str | os.PathLike,
                         tolerance: float = 1e-3) -> ExportReport:
    """Write ``<family>_point_decoder`` from ``decoder`` (its prompt encoder + mask decoder) under ``repository_dir``."""
    from .models.point_decoder import PointDecoder

    spec = family.point_decoder()
    names = [t.name for t in spec.inputs]
    outputs = [t.name for t in spec.outputs]
    point = PointDecoder(decoder.prompt_encoder, decoder.mask_decoder).eval()
    size = point.prompt_encoder.input_image_size[0]
    generator = torch.Generator().manual_seed(3)
    embeddings = random_embeddings(point, generator)
    sets = [dict(zip(names, (embeddings, *random_points(n, p, size, generator)))) for n, p in POINT_SHAPES]
    axes = {names[1]: {0: "prompts", 1: "points"}, names[2]: {0: "prompts", 1: "points"}}
    axes.update({name: {0: "prompts"} for name in outputs})
    return export_onnx(point, sets[0], outputs, axes, model_path(repository_dir, spec), tolerance, sets[1:])


def export_window_point_decoder(family: Family, decoder: torch.nn.Module, repository_dir: str | os.PathLike,
                                tolerance: float = 1e-3) -> ExportReport:
    """Write ``<family>_roi_point_decoder`` (grid points on embedding windows, the window side a
    dynamic axis) from ``decoder``, checked on the family's window side and on a smaller one."""
    from .models.window_point_decoder import WindowPointDecoder

    spec = family.roi_point_decoder()
    names = [t.name for t in spec.inputs]
    outputs = [t.name for t in spec.outputs]
    window = WindowPointDecoder(decoder.prompt_encoder, decoder.mask_decoder).eval()
    size = window.prompt_encoder.input_image_size[0]
    e = family.embed_size
    generator = torch.Generator().manual_seed(4)

    def example(n: int, side: int) -> dict:
        origins = torch.randint(0, e - side + 1, (n, 2), generator=generator).float()
        points = (origins + torch.rand(n, 2, generator=generator) * side) * (size / e)
        windows = random_embeddings(window, generator).expand(n, -1, -1, -1)[:, :, :side, :side].contiguous()
        return dict(zip(names, (windows, origins, points[:, None, :], torch.ones(n, 1))))

    side = family.grid.window
    axes = {names[0]: {0: "prompts", 2: "side", 3: "side"}, names[1]: {0: "prompts"}, names[2]: {0: "prompts"},
            names[3]: {0: "prompts"}, outputs[0]: {0: "prompts", 2: "mask_side", 3: "mask_side"}, outputs[1]: {0: "prompts"}}
    return export_onnx(window, example(3, side), outputs, axes, model_path(repository_dir, spec), tolerance,
                       [example(1, side), example(5, max(1, side // 2))])
