"""CellSeg1's LoRA on the LiteMedSAM base: adapters on TinyViT's attentions and SAM's mask decoder.

The adapter file keeps CellSeg1's layout (export/models/cellseg1.py): encoder ``w_a_{i:03d}`` /
``w_b_{i:03d}`` with i = 2j (q) and 2j+1 (v) of the j-th TinyViT attention (module order), the
decoder's ``sa``/``cti``/``cit``/``fati`` adapters on ``q_proj``/``v_proj``, and full
``prompt_encoder.*`` / ``mask_decoder.*`` tensors outside the two-way transformer. TinyViT's fused
``qkv`` lays its output out per head as [q (key_dim) | k (key_dim) | v (d)] x heads, so q's
adapter B is [heads*key_dim, r] and v's [heads*d, r], added to those interleaved rows.
Merge: W' = W + B @ A (no scaling), exactly what :class:`TinyQKVWithLoRA` computes unmerged.
Adapters fine-tuned from other decoder weights than LiteMedSAM's own (`finetune --base-decoder`)
name them by sha256 in :data:`BASE_KEY` (uint8 hex digits), so export merges them into that base.
"""

from __future__ import annotations

import torch
from torch import nn

from cellsam_triton.errors import UserError

from .cellseg1 import _LoRA, adapter_state, attach_lora, merge_lora
from .sam_vit import StateDict


BASE_KEY = "cellsam_triton.base_decoder_sha256"


def with_base_decoder(adapters: StateDict, sha256: str | None) -> StateDict:
    """``adapters`` naming the decoder weights they were trained from (None: LiteMedSAM's own)."""
    if sha256 is None:
        return adapters
    return {**adapters, BASE_KEY: torch.tensor(list(sha256.encode("ascii")), dtype=torch.uint8)}


def base_decoder_sha256(adapters: StateDict) -> str | None:
    """The sha256 of the decoder weights an adapter file was trained from (None: LiteMedSAM's own)."""
    value = adapters.get(BASE_KEY)
    if value is None:
        return None
    text = bytes(value.to(torch.uint8).tolist()).decode("ascii", errors="replace")
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise UserError(f"adapter file: {BASE_KEY} is not a sha256 hex digest")
    return text


def tiny_attentions(encoder: nn.Module) -> list[nn.Module]:
    """TinyViT's attention modules (those with a fused ``qkv`` and ``key_dim``), in module order."""
    return [m for m in encoder.modules() if hasattr(m, "qkv") and hasattr(m, "key_dim") and hasattr(m, "num_heads")]


def _head_rows(attn: nn.Module) -> tuple[int, int, int]:
    """(heads, key_dim, d) of a TinyViT attention (qkv output = heads x (2 key_dim + d))."""
    heads = int(attn.num_heads)
    base = attn.qkv if isinstance(attn.qkv, nn.Linear) else attn.qkv.qkv
    key_dim = int(attn.key_dim)
    d = base.out_features // heads - 2 * key_dim
    return heads, key_dim, d


class TinyQKVWithLoRA(nn.Module):
    """TinyViT's fused qkv plus adapters on the q and v rows of every head."""

    def __init__(self, qkv: nn.Linear, heads: int, key_dim: int, d: int, rank: int) -> None:
        super().__init__()
        self.qkv, self.heads, self.key_dim, self.d = qkv, heads, key_dim, d
        self.q = _LoRA(qkv.in_features, heads * key_dim, rank)
        self.v = _LoRA(qkv.in_features, heads * d, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.qkv(x).unflatten(-1, (self.heads, -1))
        kd = self.key_dim
        q = out[..., :kd] + self.q(x).unflatten(-1, (self.heads, kd))
        v = out[..., 2 * kd:] + self.v(x).unflatten(-1, (self.heads, self.d))
        return torch.cat([q, out[..., kd:2 * kd], v], dim=-1).flatten(-2)


def attach_lite_lora(encoder: nn.Module | None, mask_decoder: nn.Module, rank: int = 4) -> None:
    """Wrap TinyViT's qkv (when ``encoder`` is given) and the mask decoder's q/v projections."""
    if encoder is not None:
        for attn in tiny_attentions(encoder):
            attn.qkv = TinyQKVWithLoRA(attn.qkv, *_head_rows(attn), rank)
    attach_lora(mask_decoder, rank)


def lite_adapter_state(encoder: nn.Module | None, prompt_encoder: nn.Module, mask_decoder: nn.Module) -> StateDict:
    """The adapter file (CellSeg1 layout) of :func:`attach_lite_lora`-wrapped modules."""
    out = adapter_state(prompt_encoder, mask_decoder)
    if encoder is not None:
        for j, attn in enumerate(tiny_attentions(encoder)):
            for i, lora in ((2 * j, attn.qkv.q), (2 * j + 1, attn.qkv.v)):
                out[f"w_a_{i:03d}"] = lora.a.weight.detach().clone()
                out[f"w_b_{i:03d}"] = lora.b.weight.detach().clone()
    return out


def _delta(adapters: StateDict, i: int, rows: int, cols: int) -> torch.Tensor:
    a, b = adapters.get(f"w_a_{i:03d}"), adapters.get(f"w_b_{i:03d}")
    if a is None or b is None:
        raise UserError(f"adapter file lacks w_a_{i:03d} / w_b_{i:03d}")
    delta = b.float() @ a.float()
    if tuple(delta.shape) != (rows, cols):
        raise UserError(f"encoder adapter {i} has shape {tuple(delta.shape)}, LiteMedSAM needs {(rows, cols)}")
    return delta


@torch.no_grad()
def merge_lite_lora(encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module, adapters: StateDict) -> None:
    """Merge an adapter file into LiteMedSAM modules in place (W' = W + B @ A); the modules hold
    the base decoder the file names (:func:`base_decoder_sha256`)."""
    adapters = {k: v for k, v in adapters.items() if k != BASE_KEY}  # the caller loaded that base
    attentions = tiny_attentions(encoder)
    encoder_keys = [k for k in adapters if k.startswith("w_a_")]
    if len(encoder_keys) not in (0, 2 * len(attentions)):
        raise UserError(f"adapter file has {len(encoder_keys)} encoder adapters; LiteMedSAM has "
                        f"{len(attentions)} attentions (q and v each): not a LiteMedSAM adapter file")
    if encoder_keys:
        for j, attn in enumerate(attentions):
            heads, kd, d = _head_rows(attn)
            weight = attn.qkv.weight.view(heads, 2 * kd + d, -1)
            dim = weight.shape[-1]
            weight[:, :kd] += _delta(adapters, 2 * j, heads * kd, dim).view(heads, kd, dim)
            weight[:, 2 * kd:] += _delta(adapters, 2 * j + 1, heads * d, dim).view(heads, d, dim)
    state = {f"prompt_encoder.{k}": v for k, v in prompt_encoder.state_dict().items()}
    state.update({f"mask_decoder.{k}": v for k, v in mask_decoder.state_dict().items()})
    merged = merge_lora(state, {k: v for k, v in adapters.items() if not k.startswith("w_")})
    for prefix, module in (("prompt_encoder.", prompt_encoder), ("mask_decoder.", mask_decoder)):
        module.load_state_dict({k[len(prefix):]: v for k, v in merged.items() if k.startswith(prefix)}, strict=True)
