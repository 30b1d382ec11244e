"""CellFinder: CellSAM's cell detector, an Anchor DETR with row-column decoupled attention (RCDA)
on a SAM ViT trunk.

image [B,3,S,S] -> ViT trunk [B,C,g,g] -> 1x1 conv + GroupNorm -> RCDA encoder -> decoder over
learned anchor points -> (pred_logits [B,Q,classes], pred_boxes [B,Q,4] sigmoid cx,cy,w,h).

Written for inference on unpadded input: the published model's padding mask is then all False,
so it changes nothing and is left out; positions depend only on the feature grid's size, and
the graph reads nothing but ``image``. Only the last decoder layer's heads are evaluated (the
published model returns the others as auxiliary outputs, unused at inference).
Module and parameter names follow the official checkpoint below ``cellfinder.decode_head.``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .sam_vit import StateDict, ViTConfig, ViTTrunk, count_indexed, infer_vit_config, shape_of


@dataclass(frozen=True)
class CellFinderConfig:
    """Architecture of CellFinder (defaults: the published CellSAM model)."""

    vit: ViTConfig = ViTConfig(out_chans=None)
    d_model: int = 256
    num_heads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    ffn_dim: int = 1024
    num_queries: int = 3500
    num_patterns: int = 1
    num_classes: int = 2
    norm_groups: int = 32
    box_mlp_layers: int = 3


CELLFINDER_VIT_B = CellFinderConfig()


def sine_embed(pos: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine/cosine embedding [..., dim] of positions in [0,1] (sin on even, cos on odd features)."""
    freq = torch.arange(dim, dtype=torch.float32, device=pos.device)
    freq = temperature ** (2 * torch.div(freq, 2, rounding_mode="floor") / dim)
    x = (pos * (2 * math.pi))[..., None] / freq
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_embed_2d(points: torch.Tensor, dim: int) -> torch.Tensor:
    """Embedding [..., dim] of (x, y) points: y's half first, then x's."""
    return torch.cat((sine_embed(points[..., 1], dim // 2), sine_embed(points[..., 0], dim // 2)), dim=-1)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, ..., D] -> [B, heads, ..., D/heads]."""
    x = x.unflatten(-1, (heads, -1))
    n = x.dim()
    return x.permute(0, n - 2, *range(1, n - 2), n - 1)  # positive axes: ONNX Transpose needs them


class SelfAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter layout, batch first."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        h = self.heads
        q = _split_heads(F.linear(query, wq, bq), h)
        k = _split_heads(F.linear(key, wk, bk), h)
        v = _split_heads(F.linear(value, wv, bv), h)
        q = q * (q.shape[-1] ** -0.5)
        out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v  # [B,h,L,d]
        return self.out_proj(out.transpose(1, 2).flatten(2))


class RowColumnAttention(nn.Module):
    """Row-column decoupled attention (Anchor DETR).

    Each query attends separately to the W columns (keys averaged over rows) and to the H rows
    (keys averaged over columns); the value at (h, w) is weighted by the product of the two.
    Parameters: ``in_proj_weight`` stacks the q_row, q_col, k_row, k_col, v projections.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(5 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(5 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(
        self,
        query_row: torch.Tensor,  # [B,L,D]
        query_col: torch.Tensor,  # [B,L,D]
        key_row: torch.Tensor,  # [B,H,W,D]
        key_col: torch.Tensor,  # [B,H,W,D]
        value: torch.Tensor,  # [B,H,W,D]
    ) -> torch.Tensor:
        w = self.in_proj_weight.chunk(5)
        b = self.in_proj_bias.chunk(5)
        h = self.heads
        batch, height, width, dim = value.shape
        # The key projections are affine, so averaging before projecting is the same (and cheaper).
        q_row = _split_heads(F.linear(query_row, w[0], b[0]), h)  # [B,h,L,d]
        q_col = _split_heads(F.linear(query_col, w[1], b[1]), h)
        k_row = _split_heads(F.linear(key_row.mean(1), w[2], b[2]), h)  # [B,h,W,d]
        k_col = _split_heads(F.linear(key_col.mean(2), w[3], b[3]), h)  # [B,h,H,d]
        v = _split_heads(F.linear(value, w[4], b[4]), h)  # [B,h,H,W,d]
        scale = q_row.shape[-1] ** -0.5
        attn_row = torch.softmax((q_row * scale) @ k_row.transpose(-1, -2), dim=-1)  # [B,h,L,W]
        attn_col = torch.softmax((q_col * scale) @ k_col.transpose(-1, -2), dim=-1)  # [B,h,L,H]
        head_dim = v.shape[-1]
        per_col = attn_col @ v.reshape(batch, h, height, width * head_dim)  # sum over rows: [B,h,L,W*d]
        per_col = per_col.reshape(batch, h, -1, width, head_dim)
        out = (attn_row.unsqueeze(-2) @ per_col).squeeze(-2)  # sum over columns: [B,h,L,d]
        return self.out_proj(out.transpose(1, 2).flatten(2))


class FFN(nn.Module):
    """Residual feed-forward block with post-norm."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    """RCDA self-attention over the feature map (channels last) + FFN."""

    def __init__(self, dim: int, heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = RowColumnAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn_dim)

    def forward(self, src: torch.Tensor, pos_row: torch.Tensor, pos_col: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = src.shape
        with_row, with_col = src + pos_row, src + pos_col
        attn = self.self_attn(
            with_row.reshape(batch, height * width, dim),
            with_col.reshape(batch, height * width, dim),
            with_row,
            with_col,
            src,
        )
        return self.ffn(self.norm1(src + attn.reshape(batch, height, width, dim)))


class DecoderLayer(nn.Module):
    """Query self-attention, RCDA cross-attention to the memory, FFN (all post-norm)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.cross_attn = RowColumnAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn_dim)

    def forward(
        self,
        tgt: torch.Tensor,  # [B,Q,D]
        memory: torch.Tensor,  # [B,H,W,D]
        memory_row: torch.Tensor,  # memory + row positions
        memory_col: torch.Tensor,  # memory + column positions
        query_pos: torch.Tensor,  # [Q,D]
        query_pos_x: torch.Tensor,
        query_pos_y: torch.Tensor,
    ) -> torch.Tensor:
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.self_attn(q, q, tgt))
        attn = self.cross_attn(tgt + query_pos_x, tgt + query_pos_y, memory_row, memory_col, memory)
        return self.ffn(self.norm1(tgt + attn))


class BoxMLP(nn.Module):
    """MLP with ReLU between its layers (box regression head)."""

    def __init__(self, dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [dim] * num_layers + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


def _position_mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))


class AnchorTransformer(nn.Module):
    """RCDA encoder + anchor-point decoder + per-layer class/box heads."""

    def __init__(self, cfg: CellFinderConfig) -> None:
        super().__init__()
        d, h, f = cfg.d_model, cfg.num_heads, cfg.ffn_dim
        self.encoder_layers = nn.ModuleList(EncoderLayer(d, h, f) for _ in range(cfg.enc_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(d, h, f) for _ in range(cfg.dec_layers))
        self.pattern = nn.Embedding(cfg.num_patterns, d)
        self.position = nn.Embedding(cfg.num_queries, 2)
        self.adapt_pos2d = _position_mlp(d)
        self.adapt_pos1d = _position_mlp(d)
        self.class_embed = nn.ModuleList(nn.Linear(d, cfg.num_classes) for _ in range(cfg.dec_layers))
        self.bbox_embed = nn.ModuleList(BoxMLP(d, 4, cfg.box_mlp_layers) for _ in range(cfg.dec_layers))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Detection-friendly start: anchors in (0,1), 1% class prior, boxes ~ 0.12 wide."""
        nn.init.uniform_(self.position.weight, 0, 1)
        prior = -math.log((1 - 0.01) / 0.01)
        for head in self.class_embed:
            nn.init.constant_(head.bias, prior)
        for head in self.bbox_embed:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.constant_(head.layers[-1].bias, 0)
            nn.init.constant_(head.layers[-1].bias[2:], -2.0)

    def forward(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src [B,H,W,D] (channels last) -> (logits [B,P*Q,classes], boxes [B,P*Q,4])."""
        batch, height, width, dim = src.shape
        # Pixel-centre positions in (0,1): x along a row (W), y along a column (H).
        pos_x = (torch.arange(width, dtype=torch.float32, device=src.device) + 0.5) / width
        pos_y = (torch.arange(height, dtype=torch.float32, device=src.device) + 0.5) / height
        row = self.adapt_pos1d(sine_embed(pos_x, dim))  # [W,D]
        col = self.adapt_pos1d(sine_embed(pos_y, dim)).unsqueeze(1)  # [H,1,D]

        memory = src
        for layer in self.encoder_layers:
            memory = layer(memory, row, col)

        patterns = self.pattern.weight.shape[0]
        anchors = self.position.weight.repeat(patterns, 1)  # [P*Q,2], pattern-major
        tgt = self.pattern.weight.repeat_interleave(self.position.weight.shape[0], dim=0)
        tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
        query_pos = self.adapt_pos2d(sine_embed_2d(anchors, dim))
        query_pos_x = self.adapt_pos1d(sine_embed(anchors[:, 0], dim))
        query_pos_y = self.adapt_pos1d(sine_embed(anchors[:, 1], dim))
        memory_row, memory_col = memory + row, memory + col
        for layer in self.decoder_layers:
            tgt = layer(tgt, memory, memory_row, memory_col, query_pos, query_pos_x, query_pos_y)

        logits = self.class_embed[-1](tgt)
        delta = self.bbox_embed[-1](tgt)
        centre = delta[..., :2] + inverse_sigmoid(anchors)
        boxes = torch.cat((centre, delta[..., 2:]), dim=-1).sigmoid()
        return logits, boxes


class CellFinder(nn.Module):
    """image [B,3,S,S] -> (pred_logits [B,Q,classes], pred_boxes [B,Q,4] sigmoid cx,cy,w,h)."""

    def __init__(self, cfg: CellFinderConfig = CELLFINDER_VIT_B) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = ViTTrunk(cfg.vit)
        self.input_proj = nn.Sequential(
            nn.Conv2d(cfg.vit.embed_dim, cfg.d_model, kernel_size=1),
            nn.GroupNorm(cfg.norm_groups, cfg.d_model),
        )
        self.transformer = AnchorTransformer(cfg)
        nn.init.xavier_uniform_(self.input_proj[0].weight)
        nn.init.zeros_(self.input_proj[0].bias)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.input_proj(self.backbone(image))  # [B,D,g,g]
        return self.transformer(features.permute(0, 2, 3, 1))


# Official checkpoint prefix -> this module's state-dict prefix.
CELLFINDER_KEYS = {
    "cellfinder.decode_head.backbone.body.": "backbone.",
    "cellfinder.decode_head.input_proj.0.": "input_proj.",
    "cellfinder.decode_head.transformer.": "transformer.",
}


def infer_cellfinder_config(state: StateDict, default_heads: int = 8, default_vit_heads: int = 12) -> CellFinderConfig:
    """Read CellFinder's architecture from official ``cellfinder.*`` tensors."""
    t = "cellfinder.decode_head.transformer."
    num_patterns, d_model = shape_of(state, t + "pattern.weight")
    return CellFinderConfig(
        vit=infer_vit_config(state, "cellfinder.decode_head.backbone.body.", default_vit_heads),
        d_model=d_model,
        num_heads=default_heads,
        enc_layers=count_indexed(state, t + "encoder_layers."),
        dec_layers=count_indexed(state, t + "decoder_layers."),
        ffn_dim=shape_of(state, t + "decoder_layers.0.ffn.linear1.weight")[0],
        num_queries=shape_of(state, t + "position.weight")[0],
        num_patterns=num_patterns,
        num_classes=shape_of(state, t + "class_embed.0.weight")[0],
        box_mlp_layers=count_indexed(state, t + "bbox_embed.0.layers."),
    )
