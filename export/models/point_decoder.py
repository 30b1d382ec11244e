"""Point-prompted SAM mask decoder for export: one image embedding, N single-point prompts on axis 0.

Numerically SAM's ``prompt_encoder(points=(coords, labels), boxes=None, masks=None)`` followed
by ``mask_decoder(..., multimask_output=False)`` once per prompt: the point gets +0.5 pixel,
and (no box given) a padding point with label -1 is appended, whose positional encoding is
zeroed and replaced by ``not_a_point_embed``. Batched like :class:`BoxDecoder` (``expand``,
so N stays dynamic in ONNX); the mask decoding after the prompt embedding is shared with it.
"""

from __future__ import annotations

import math

import torch

from .box_decoder import BoxDecoder


class PointDecoder(BoxDecoder):
    """(image_embeddings [1,C,e,e], point_coords [N,P,2], point_labels [N,P]) -> (masks [N,1,m,m], iou [N,1])."""

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sparse prompt embedding [N,P+1,C]: the points and SAM's padding point."""
        pe = self.prompt_encoder
        height, width = pe.input_image_size
        n = coords.shape[0]
        coords = torch.cat([coords + 0.5, torch.zeros_like(coords[:, :1])], dim=1)
        labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1).unsqueeze(-1)
        scale = torch.tensor([1.0 / width, 1.0 / height], dtype=coords.dtype)
        xy = (2 * (coords * scale) - 1) @ pe.pe_layer.positional_encoding_gaussian_matrix
        xy = 2 * math.pi * xy
        emb = torch.cat([torch.sin(xy), torch.cos(xy)], dim=-1)
        padding = labels == -1
        emb = torch.where(padding, pe.not_a_point_embed.weight.expand(n, 1, -1), emb)
        emb = emb + torch.where(labels == 0, pe.point_embeddings[0].weight, torch.zeros_like(emb))
        return emb + torch.where(labels == 1, pe.point_embeddings[1].weight, torch.zeros_like(emb))

    def forward(  # type: ignore[override]
        self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decode(image_embeddings, self.embed_points(point_coords, point_labels))
