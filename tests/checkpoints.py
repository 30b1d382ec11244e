"""Test helpers: small random CellSAM checkpoints in the official layout, and SAM's reference
one-box-at-a-time decoding to compare batched decoders with."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

CELLFINDER = "cellfinder.decode_head."


@lru_cache(maxsize=2)
def _small_state(seed: int) -> dict:
    from cellsam_triton.export.models.cellsam import make_random_checkpoint

    return make_random_checkpoint(None, "small", seed=seed)


def small_state(seed: int = 0) -> dict:
    """A fresh dict (shared tensors: replace, don't modify in place) of the small random checkpoint."""
    return dict(_small_state(seed))


def sam_loop_decode(decoder, embeddings: torch.Tensor, boxes: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The published way: SAM's prompt encoder + mask decoder once per box, multimask_output=False."""
    pe, md = decoder.prompt_encoder, decoder.mask_decoder
    masks, ious = [], []
    with torch.no_grad():
        for box in boxes:
            sparse, dense = pe(points=None, boxes=box.reshape(1, 1, 4), masks=None)
            mask, iou = md(
                image_embeddings=embeddings,
                image_pe=pe.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            masks.append(mask[0].numpy())
            ious.append(iou[0].numpy())
    return np.stack(masks), np.stack(ious)
