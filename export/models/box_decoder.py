"""Box-prompted SAM mask decoder for export: one image embedding, N boxes on axis 0.

Works with any SAM-structured ``PromptEncoder`` / ``MaskDecoder`` pair (segment_anything's,
LiteMedSAM's). Numerically the same as calling SAM's prompt encoder and mask decoder once per
box with ``multimask_output=False`` and no mask prompt, but batched, and written with
``expand`` instead of ``repeat_interleave`` so ONNX keeps N dynamic.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class BoxDecoder(nn.Module):
    """(image_embeddings [1,C,e,e], boxes [N,4] xyxy encoder frame) -> (low_res_masks [N,1,m,m], iou [N,1])."""

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Sparse prompt embedding [N,2,C] of box corners (SAM's box rule: +0.5 pixel shift)."""
        pe = self.prompt_encoder
        height, width = pe.input_image_size
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        # x / width, y / height as SAM divides; scalars only, so any device (and CUDA graphs) works
        coords = 2 * torch.cat([corners[..., :1] / width, corners[..., 1:] / height], dim=-1) - 1
        coords = coords @ pe.pe_layer.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        emb = torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)
        corner_tokens = torch.stack([pe.point_embeddings[2].weight[0], pe.point_embeddings[3].weight[0]])
        return emb + corner_tokens.unsqueeze(0)

    def forward(self, image_embeddings: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decode(image_embeddings, self.embed_boxes(boxes))

    def decode(self, image_embeddings: torch.Tensor, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks [N,1,m,m] and IoU predictions [N,1] for sparse prompt embeddings [N,T,C].

        SAM's mask decoder with ``multimask_output=False`` and no mask prompt, the single image
        embedding expanded (not copied) per prompt.
        """
        pe = self.prompt_encoder
        n = sparse.shape[0]
        _, c, h, w = image_embeddings.shape
        src = (image_embeddings + pe.no_mask_embed.weight.reshape(1, -1, 1, 1)).expand(n, c, h, w)
        return self.decode_dense(src, pe.get_dense_pe().expand(n, c, h, w), sparse)

    def decode_dense(self, src: torch.Tensor, pos_src: torch.Tensor, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks [N,1,4h,4w] and IoU [N,1] from per-prompt image tokens ``src`` [N,C,h,w] (dense
        prompt added), their positional encoding ``pos_src`` and sparse prompts [N,T,C]."""
        md = self.mask_decoder
        n, c, h, w = src.shape
        output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(n, -1, -1), sparse), dim=1)

        hs, src = md.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_token_out = hs[:, 1, :]  # first mask token: multimask_output=False

        src = src.transpose(1, 2).reshape(n, c, h, w)
        upscaled = md.output_upscaling(src)
        hyper = md.output_hypernetworks_mlps[0](mask_token_out).unsqueeze(1)  # [N,1,c']
        _, c2, h2, w2 = upscaled.shape
        masks = (hyper @ upscaled.reshape(n, c2, h2 * w2)).reshape(n, 1, h2, w2)
        iou = md.iou_prediction_head(iou_token_out)[:, :1]
        return masks, iou
