"""SAM parts (ViT image encoder, headless ViT trunk, prompt encoder, mask decoder) built from
state-dict shapes, so that any SAM-structured checkpoint (ViT-B, or a tiny test config) loads.

The layers themselves are ``segment_anything``'s; this module only reads the architecture
from the tensors and assembles them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from segment_anything.modeling.image_encoder import Block, PatchEmbed
from torch import nn

from cellsam_triton.errors import UserError

StateDict = dict[str, torch.Tensor]


def shape_of(state: StateDict, key: str) -> tuple[int, ...]:
    """Shape of ``state[key]``; a missing tensor is a ``UserError`` naming it."""
    if key not in state:
        raise UserError(f"checkpoint has no tensor {key!r}: not the expected model layout")
    return tuple(state[key].shape)


def count_indexed(state: StateDict, prefix: str) -> int:
    """Number of entries ``prefix{i}.`` (i = 0, 1, ...) present in ``state``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indexes = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    return max(indexes) + 1 if indexes else 0


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a SAM ViT image encoder."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    img_size: int = 1024
    patch_size: int = 16
    out_chans: int | None = 256  # None: no neck (CellFinder trunk)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


VIT_B = ViTConfig()


def infer_vit_config(state: StateDict, prefix: str, default_heads: int = 12) -> ViTConfig:
    """Read a SAM ViT architecture from the tensors under ``prefix``.

    Heads come from the relative-position tables (their width is the head dim); a block whose
    table spans the whole grid is global, the others are windowed.
    """
    embed_dim, _, patch, _ = shape_of(state, prefix + "patch_embed.proj.weight")
    grid = shape_of(state, prefix + "pos_embed")[1]
    depth = count_indexed(state, prefix + "blocks.")
    if depth == 0:
        raise UserError(f"checkpoint has no tensors {prefix}blocks.*: not the expected model layout")
    hidden = shape_of(state, prefix + "blocks.0.mlp.lin1.weight")[0]
    head_dim, global_idx, windows = None, [], set()
    for i in range(depth):
        key = f"{prefix}blocks.{i}.attn.rel_pos_h"
        if key not in state:
            continue
        rows, head_dim = shape_of(state, key)
        size = (rows + 1) // 2
        if size == grid:
            global_idx.append(i)
        else:
            windows.add(size)
    if len(windows) > 1:
        raise UserError(f"{prefix}blocks use several window sizes {sorted(windows)}; SAM supports one")
    neck = prefix + "neck.0.weight"
    return ViTConfig(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim if head_dim else default_heads,
        global_attn_indexes=tuple(global_idx),
        window_size=windows.pop() if windows else 0,
        mlp_ratio=hidden / embed_dim,
        img_size=grid * patch,
        patch_size=patch,
        out_chans=shape_of(state, neck)[0] if neck in state else None,
    )


def _vit_kwargs(cfg: ViTConfig) -> dict:
    return dict(
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        global_attn_indexes=cfg.global_attn_indexes,
        window_size=cfg.window_size,
    )


def build_image_encoder(cfg: ViTConfig) -> ImageEncoderViT:
    """SAM image encoder with neck: image [B,3,S,S] -> embeddings [B,out_chans,S/p,S/p]."""
    if cfg.out_chans is None:
        raise ValueError("an image encoder needs out_chans (a neck)")
    return ImageEncoderViT(out_chans=cfg.out_chans, **_vit_kwargs(cfg))


class ViTTrunk(nn.Module):
    """SAM ViT without its neck: image [B,3,S,S] -> last block's features [B,C,S/p,S/p]."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        g = cfg.grid
        self.patch_embed = PatchEmbed(
            kernel_size=(cfg.patch_size, cfg.patch_size),
            stride=(cfg.patch_size, cfg.patch_size),
            embed_dim=cfg.embed_dim,
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, cfg.embed_dim))
        kw = _vit_kwargs(cfg)
        self.blocks = nn.ModuleList(
            Block(
                dim=cfg.embed_dim,
                num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=True,
                norm_layer=kw["norm_layer"],
                use_rel_pos=True,
                window_size=0 if i in cfg.global_attn_indexes else cfg.window_size,
                input_size=(g, g),
            )
            for i in range(cfg.depth)
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(image) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x.permute(0, 3, 1, 2)


@dataclass(frozen=True)
class PromptDecoderConfig:
    """Architecture of SAM's prompt encoder + mask decoder."""

    dim: int = 256
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    embed_size: int = 64  # image embedding grid side
    input_size: int = 1024  # frame the boxes are given in


SAM_DECODER = PromptDecoderConfig()


def infer_prompt_decoder_config(
    state: StateDict, prefix: str, embed_size: int, input_size: int, default_heads: int = 8
) -> PromptDecoderConfig:
    """Read SAM's prompt encoder + mask decoder architecture from ``prefix{prompt_encoder,mask_decoder}.*``."""
    md = prefix + "mask_decoder."
    dim = shape_of(state, md + "iou_token.weight")[1]
    internal = shape_of(state, md + "transformer.layers.0.cross_attn_token_to_image.q_proj.weight")[0]
    return PromptDecoderConfig(
        dim=dim,
        depth=count_indexed(state, md + "transformer.layers."),
        num_heads=default_heads,
        mlp_dim=shape_of(state, md + "transformer.layers.0.mlp.lin1.weight")[0],
        attention_downsample_rate=max(1, dim // internal),
        num_multimask_outputs=shape_of(state, md + "mask_tokens.weight")[0] - 1,
        iou_head_depth=count_indexed(state, md + "iou_prediction_head.layers."),
        iou_head_hidden_dim=shape_of(state, md + "iou_prediction_head.layers.0.weight")[0],
        mask_in_chans=shape_of(state, prefix + "prompt_encoder.mask_downscaling.3.weight")[0],
        embed_size=embed_size,
        input_size=input_size,
    )


def build_prompt_decoder(cfg: PromptDecoderConfig) -> tuple[PromptEncoder, MaskDecoder]:
    """SAM's prompt encoder and mask decoder for ``cfg``."""
    prompt_encoder = PromptEncoder(
        embed_dim=cfg.dim,
        image_embedding_size=(cfg.embed_size, cfg.embed_size),
        input_image_size=(cfg.input_size, cfg.input_size),
        mask_in_chans=cfg.mask_in_chans,
    )
    transformer = TwoWayTransformer(
        depth=cfg.depth,
        embedding_dim=cfg.dim,
        num_heads=cfg.num_heads,
        mlp_dim=cfg.mlp_dim,
        attention_downsample_rate=cfg.attention_downsample_rate,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=cfg.dim,
        transformer=transformer,
        num_multimask_outputs=cfg.num_multimask_outputs,
        iou_head_depth=cfg.iou_head_depth,
        iou_head_hidden_dim=cfg.iou_head_hidden_dim,
    )
    return prompt_encoder, mask_decoder
