"""Tiny model families for serving tests: real ONNX models under the contract's tensor names, in milliseconds.

Input 64x64, embeddings 8x4x4 (one grid cell = a 16x16 patch), low-res masks 16x16
(`full_size_family`: production tensor sizes, same maths). Outputs are
simple functions of the input, so tests control them exactly:
  encoder   embeddings = 1x1 projection of 16x16 patch means; channel 0 = mean of image channel 0.
  detector  one query per grid cell; it fires (score ~1) where channel 0 of that patch is bright,
            so an image with k bright patches gives k detections and a dark image gives none.
            "cellfinder": pred_logits [B,16,2] + sigmoid-style cxcywh boxes; "cellfinder_lite":
            pred_scores [B,16] + xyxy boxes in the 64 frame; with ``detector_reads_image`` (a pixel
            branch) it also fires where channel 2 of the tile it is sent is bright.
  decoder   mask logit = signed distance (input pixels) to the box edge + mean(embedding);
            predicted IoU = box width / patch side, clipped to [0, 1] (narrow boxes fall below 0.5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cellsam_triton.contracts import Family

SIZE, GRID, EMBED_DIM, LOW_RES = 64, 4, 8, 16
PATCH = SIZE // GRID


def tiny_family(detector: str = "cellfinder", decoder_chunk: int = 3, reads_image: bool = False) -> Family:
    name = "tiny" if detector == "cellfinder" else "tiny_pixels" if reads_image else "tiny_lite"
    return Family(
        name=name, input_size=SIZE, embed_dim=EMBED_DIM, embed_size=GRID, low_res_size=LOW_RES,
        detector=detector, preprocess="cellsam" if detector == "cellfinder" else "litemedsam",
        encoder_batch=4, decoder_chunk=decoder_chunk, nms_iou=0.5, max_detections=100, detector_reads_image=reads_image,
    )


def full_size_family() -> Family:
    """Production tensor sizes (1024 input, 4096 queries, 256x256 masks) with the same tiny maths."""
    return Family(name="tiny_full", input_size=1024, embed_dim=EMBED_DIM, embed_size=64, low_res_size=256,
                  detector="cellfinder", encoder_batch=2, decoder_chunk=16)


def _patch(family: Family | None) -> tuple[int, int, int]:
    family = family or tiny_family()
    return family.input_size, family.embed_size, family.input_size // family.embed_size


def grid_boxes_xyxy(family: Family | None = None) -> np.ndarray:
    """The box of every grid cell (row-major), xyxy in the input frame."""
    _, grid, patch = _patch(family)
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    return np.stack([cols * patch, rows * patch, (cols + 1) * patch, (rows + 1) * patch], 1).astype(np.float32)


def image_with_cells(cells: list[int], value: float = 1.0, family: Family | None = None) -> np.ndarray:
    """A [1,3,S,S] float32 image whose channel 0 is bright in the listed grid cells (row-major index)."""
    size, grid, patch = _patch(family)
    image = np.zeros((1, 3, size, size), np.float32)
    for cell in cells:
        row, col = divmod(cell, grid)
        image[0, 0, row * patch:(row + 1) * patch, col * patch:(col + 1) * patch] = value
    image[0, 1] = 0.25
    return image


def _modules(family: Family):
    import torch
    from torch import nn

    size, _, patch = _patch(family)
    low_res = family.low_res_size
    boxes = torch.from_numpy(grid_boxes_xyxy(family))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            weight = torch.randn(family.embed_dim, 3, 1, 1, generator=torch.Generator().manual_seed(0)) * 0.1
            weight[0] = 0.0
            weight[0, 0] = 1.0
            self.register_buffer("weight", weight)

        def forward(self, image):
            pooled = nn.functional.avg_pool2d(image, patch)
            return nn.functional.conv2d(pooled, self.weight)

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            cxcywh = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
                                  boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1) / size
            self.register_buffer("boxes", cxcywh)

        def forward(self, image):
            fire = nn.functional.avg_pool2d(image[:, :1], patch).flatten(1) * 20.0 - 10.0  # [B,Q]
            logits = torch.stack([fire, torch.full_like(fire, -10.0)], -1)
            return logits, self.boxes.expand(image.shape[0], -1, -1)

    class LiteDetector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("boxes", boxes)

        def forward(self, image_embeddings, image=None):
            signal = image_embeddings[:, 0].flatten(1)
            if image is not None:  # the pixel branch: channel 2's patch means
                signal = signal + torch.nn.functional.avg_pool2d(image[:, 2:3], patch).flatten(1)
            return torch.sigmoid(signal * 20.0 - 10.0), self.boxes.expand(image_embeddings.shape[0], -1, -1)

    class Decoder(nn.Module):
        def forward(self, image_embeddings, boxes):
            centres = (torch.arange(low_res, dtype=torch.float32) + 0.5) * (size / low_res)
            x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
            ys, xs = centres[None, :, None], centres[None, None, :]
            dist = torch.minimum(torch.minimum(xs - x0, x1 - xs), torch.minimum(ys - y0, y1 - ys))
            masks = (dist + image_embeddings.mean())[:, None]
            iou = ((boxes[:, 2] - boxes[:, 0]) / patch).clamp(0.0, 1.0)[:, None]
            return masks, iou

    return Encoder(), Detector(), LiteDetector(), Decoder()


def export_onnx(family: Family, repo_dir: Path) -> list[Path]:
    """Write the family's three tiny ONNX models to ``repo_dir/<name>/1/model.onnx``."""
    import torch

    encoder, detector, lite_detector, decoder = _modules(family)
    image = torch.zeros(1, 3, family.input_size, family.input_size)
    embeddings = torch.zeros(1, family.embed_dim, family.embed_size, family.embed_size)
    batch = {0: "batch"}
    if family.detector == "cellfinder":
        det = (detector, (image,), ["image"], ["pred_logits", "pred_boxes"])
    elif family.detector_reads_image:
        det = (lite_detector, (embeddings, image), ["image_embeddings", "image"], ["pred_scores", "pred_boxes"])
    else:
        det = (lite_detector, (embeddings,), ["image_embeddings"], ["pred_scores", "pred_boxes"])
    jobs = {
        family.encoder_name: (encoder, (image,), ["image"], ["image_embeddings"]),
        family.detector_name: det,
        family.decoder_name: (decoder, (embeddings, torch.zeros(2, 4)), ["image_embeddings", "boxes"],
                              ["low_res_masks", "iou_predictions"]),
    }
    written = []
    for name, (module, args, inputs, outputs) in jobs.items():
        path = repo_dir / name / "1" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == family.decoder_name:
            axes = {"boxes": {0: "n"}, "low_res_masks": {0: "n"}, "iou_predictions": {0: "n"}}
        else:
            axes = {n: batch for n in inputs + outputs}
        torch.onnx.export(module.eval(), args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=17, dynamo=False)
        written.append(path)
    return written


def write_tiny_repository(repo_dir: Path, families: list[Family], target: str = "cpu") -> Path:
    """A complete model repository (configs, glue, ONNX) for the given tiny families."""
    from cellsam_triton.export.repository import write_family

    for family in families:
        write_family(repo_dir, family, target, threads=1)
        export_onnx(family, repo_dir)
    return repo_dir
