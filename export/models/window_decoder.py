"""Box decoding on a window of the image embedding (ROI decoding) for export.

SAM's mask decoder attends over every image token: for a 12 px nucleus it pays for the whole
64x64 embedding. :class:`WindowDecoder` runs the same prompt encoder and mask decoder on a
``w`` x ``w`` window of the embedding around each box, with the dense positional encoding of
the window's own tokens (their absolute position in the tile, exactly as SAM computes it for
the full grid), the box prompt in absolute tile coordinates, and returns the window's
low-resolution logits ``[N,1,4w,4w]``. With the whole grid as the window it is
:class:`BoxDecoder` exactly; on smaller windows the token-to-image attention sees only the
window, which is why the default decoder is fine-tuned on windows (``train-decoder --context roi``).
The window side ``w`` is a dynamic axis of the ONNX model, so one model serves every bucket.
"""

from __future__ import annotations

import math

import torch

from .box_decoder import BoxDecoder


class WindowDecoder(BoxDecoder):
    """(windows [N,C,w,w], origins [N,2] (x, y) in embedding cells, boxes [N,4] xyxy tile frame)
    -> (low_res_masks [N,1,4w,4w], iou_predictions [N,1])."""

    def window_pe(self, origins: torch.Tensor, side: torch.Tensor | int) -> torch.Tensor:
        """Dense positional encoding [N,C,w,w] of the windows' tokens (SAM's grid rule: cell
        centres over the embedding side, here offset by each window's origin)."""
        pe = self.prompt_encoder
        grid_h, grid_w = pe.image_embedding_size
        steps = torch.arange(side, dtype=origins.dtype, device=origins.device) + 0.5  # [w]
        xs = (origins[:, 0:1] + steps) / grid_w  # [N,w]
        ys = (origins[:, 1:2] + steps) / grid_h
        n, w = xs.shape
        coords = torch.stack([xs[:, None, :].expand(n, w, w), ys[:, :, None].expand(n, w, w)], dim=-1)
        coords = (2 * coords - 1) @ pe.pe_layer.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1).permute(0, 3, 1, 2)

    def forward(  # type: ignore[override]
        self, windows: torch.Tensor, origins: torch.Tensor, boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        src = windows + self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return self.decode_dense(src, self.window_pe(origins, windows.shape[-1]), self.embed_boxes(boxes))
