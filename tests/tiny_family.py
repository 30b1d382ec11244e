"""Tiny model families for serving tests: real ONNX models under the contract's tensor names, in milliseconds.

Input 64x64, embeddings 8x4x4 (one grid cell = a 16x16 patch), low-res masks 16x16. Outputs are
simple functions of the input, so tests control them exactly:
  encoder   embeddings = 1x1 projection of 16x16 patch means; channel 0 = mean of image channel 0.
  detector  one query per grid cell; it fires (score ~1) where channel 0 of that patch is bright,
            so an image with k bright patches gives k detections and a dark image gives none.
            "cellfinder": pred_logits [B,16,2] + sigmoid-style cxcywh boxes; "cellfinder_lite":
            pred_scores [B,16] + xyxy boxes in the 64 frame.
  decoder   mask logit = signed distance (input pixels) to the box edge + mean(embedding);
            predicted IoU = box width / 16 clipped to [0, 1] (narrow boxes fall below 0.5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cellsam_triton.contracts import Family

SIZE, GRID, EMBED_DIM, LOW_RES = 64, 4, 8, 16
PATCH = SIZE // GRID


def tiny_family(detector: str = "cellfinder", decoder_chunk: int = 3) -> Family:
    name = "tiny" if detector == "cellfinder" else "tiny_lite"
    return Family(
        name=name, input_size=SIZE, embed_dim=EMBED_DIM, embed_size=GRID, low_res_size=LOW_RES,
        detector=detector, preprocess="cellsam" if detector == "cellfinder" else "litemedsam",
        encoder_batch=4, decoder_chunk=decoder_chunk, extra={"nms_iou": 0.5, "max_detections": 100},
    )


def grid_boxes_xyxy() -> np.ndarray:
    """The box of every grid cell (row-major), xyxy in the 64 frame."""
    rows, cols = np.divmod(np.arange(GRID * GRID), GRID)
    return np.stack([cols * PATCH, rows * PATCH, (cols + 1) * PATCH, (rows + 1) * PATCH], 1).astype(np.float32)


def image_with_cells(cells: list[int], value: float = 1.0) -> np.ndarray:
    """A [1,3,64,64] float32 image whose channel 0 is bright in the listed grid cells (row-major index)."""
    image = np.zeros((1, 3, SIZE, SIZE), np.float32)
    for cell in cells:
        row, col = divmod(cell, GRID)
        image[0, 0, row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH] = value
    image[0, 1] = 0.25
    return image


def _modules():
    import torch
    from torch import nn

    boxes = torch.from_numpy(grid_boxes_xyxy())

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            weight = torch.randn(EMBED_DIM, 3, 1, 1, generator=torch.Generator().manual_seed(0)) * 0.1
            weight[0] = 0.0
            weight[0, 0] = 1.0
            self.register_buffer("weight", weight)

        def forward(self, image):
            pooled = nn.functional.avg_pool2d(image, PATCH)
            return nn.functional.conv2d(pooled, self.weight)

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            cxcywh = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
                                  boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1) / SIZE
            self.register_buffer("boxes", cxcywh)

        def forward(self, image):
            fire = nn.functional.avg_pool2d(image[:, :1], PATCH).flatten(1) * 20.0 - 10.0  # [B,16]
            logits = torch.stack([fire, torch.full_like(fire, -10.0)], -1)
            return logits, self.boxes.expand(image.shape[0], -1, -1)

    class LiteDetector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("boxes", boxes)

        def forward(self, image_embeddings):
            scores = torch.sigmoid(image_embeddings[:, 0].flatten(1) * 20.0 - 10.0)
            return scores, self.boxes.expand(image_embeddings.shape[0], -1, -1)

    class Decoder(nn.Module):
        def forward(self, image_embeddings, boxes):
            centres = (torch.arange(LOW_RES, dtype=torch.float32) + 0.5) * (SIZE / LOW_RES)
            x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
            ys, xs = centres[None, :, None], centres[None, None, :]
            dist = torch.minimum(torch.minimum(xs - x0, x1 - xs), torch.minimum(ys - y0, y1 - ys))
            masks = (dist + image_embeddings.mean())[:, None]
            iou = ((boxes[:, 2] - boxes[:, 0]) / PATCH).clamp(0.0, 1.0)[:, None]
            return masks, iou

    return Encoder(), Detector(), LiteDetector(), Decoder()


def export_onnx(family: Family, repo_dir: Path) -> list[Path]:
    """Write the family's three tiny ONNX models to ``repo_dir/<name>/1/model.onnx``."""
    import torch

    encoder, detector, lite_detector, decoder = _modules()
    image = torch.zeros(1, 3, SIZE, SIZE)
    embeddings = torch.zeros(1, EMBED_DIM, GRID, GRID)
    batch = {0: "batch"}
    if family.detector == "cellfinder":
        det = (detector, (image,), ["image"], ["pred_logits", "pred_boxes"])
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
