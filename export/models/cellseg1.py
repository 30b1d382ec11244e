"""CellSeg1 models: official SAM checkpoints run at 512x512 with rank-r LoRA adapters merged in.

Resizing for 512 input (reference.md section 2): ``pos_embed`` [1,64,64,C] -> [1,32,32,C] and
the relative-position tables of the *global* blocks 127 -> 63 rows, bilinear with
align_corners=True; windowed blocks keep theirs.

LoRA (CellSeg1's adapter file, a flat dict): encoder ``w_a_{i:03d}`` [r,dim] / ``w_b_{i:03d}``
[dim,r], block j: i = 2j on the q rows ``[:dim]`` of ``blocks.j.attn.qkv``, i = 2j+1 on the v
rows ``[-dim:]``; decoder layer l, i = 2l (q_proj) and 2l+1 (v_proj) of ``sa`` (self_attn),
``cti`` (cross_attn_token_to_image), ``cit`` (cross_attn_image_to_token); ``fati_{q,v}{a,b}``
for ``final_attn_token_to_image``; plus full ``prompt_encoder.*`` / ``mask_decoder.*`` tensors.
Merge: W' = W + B @ A. :func:`attach_lora` builds the *unmerged* form (used for training and
as the parity reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cellsam_triton.errors import UserError

from .sam_vit import StateDict, ViTConfig, build_image_encoder, build_prompt_decoder, infer_prompt_decoder_config, infer_vit_config
from .point_decoder import PointDecoder

INPUT_SIZE = 512
ENCODER = "image_encoder."
# Official SAM variants (segment_anything's build_sam_vit_{b,l,h}) at CellSeg1's 512 input.
VARIANTS = {
    "vit_b": ViTConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11), img_size=INPUT_SIZE),
    "vit_l": ViTConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23), img_size=INPUT_SIZE),
    "vit_h": ViTConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31), img_size=INPUT_SIZE),
}
# adapter key prefix -> attention module of each two-way transformer layer
DECODER_ADAPTERS = {"sa": "self_attn", "cti": "cross_attn_token_to_image", "cit": "cross_attn_image_to_token"}
FINAL_ATTN = "final_attn_token_to_image"


# --- checkpoints -----------------------------------------------------------------------------------
def load_state(path: str | Path) -> StateDict:
    """A ``torch.save``d flat dict of tensors (SAM checkpoint or adapter file)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors: not a torch file
        raise UserError(f"{path}: not a PyTorch tensor file ({type(exc).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a flat dict of tensors")
    return state


def _resize_rows(table: torch.Tensor, rows: int) -> torch.Tensor:
    """[R,D] -> [rows,D], bilinear (align_corners=True) along R."""
    return F.interpolate(table[None, None], size=(rows, table.shape[1]), mode="bilinear", align_corners=True)[0, 0]


def resize_to_input(state: StateDict, input_size: int = INPUT_SIZE) -> StateDict:
    """SAM state dict for ``input_size``: pos_embed and the global blocks' rel-pos tables resized."""
    key = ENCODER + "pos_embed"
    grid_old = state[key].shape[1] if key in state else 0
    patch = state[ENCODER + "patch_embed.proj.weight"].shape[-1] if grid_old else 0
    if not grid_old:
        raise UserError("checkpoint has no image_encoder.pos_embed: not a SAM checkpoint")
    grid = input_size // patch
    if grid == grid_old:
        return dict(state)
    out = dict(state)
    pos = state[key].permute(0, 3, 1, 2)
    out[key] = F.interpolate(pos, size=(grid, grid), mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
    for name, table in state.items():
        if name.startswith(ENCODER + "blocks.") and name.endswith((".attn.rel_pos_h", ".attn.rel_pos_w")):
            if table.shape[0] == 2 * grid_old - 1:  # a global block: its table spans the whole grid
                out[name] = _resize_rows(table, 2 * grid - 1)
    return out


# --- LoRA merge ------------------------------------------------------------------------------------
def _pairs(adapters: StateDict, prefix: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) for i = 0, 1, ... of ``{prefix}_a_{i:03d}`` / ``{prefix}_b_{i:03d}``."""
    pairs = []
    while f"{prefix}_a_{len(pairs):03d}" in adapters:
        i = len(pairs)
        b = adapters.get(f"{prefix}_b_{i:03d}")
        if b is None:
            raise UserError(f"adapter file has {prefix}_a_{i:03d} but no {prefix}_b_{i:03d}")
        pairs.append((adapters[f"{prefix}_a_{i:03d}"], b))
    return pairs


def _add_delta(state: StateDict, key: str, a: torch.Tensor, b: torch.Tensor, rows: slice = slice(None)) -> None:
    if key not in state:
        raise UserError(f"adapter targets {key!r}, which the SAM checkpoint lacks")
    weight = state[key].clone()
    delta = b.to(torch.float32) @ a.to(torch.float32)
    if delta.shape != weight[rows].shape or delta.shape[1] != weight.shape[1]:
        raise UserError(f"adapter for {key} has shape {tuple(delta.shape)}, weight rows {tuple(weight[rows].shape)}")
    weight[rows] += delta.to(weight.dtype)
    state[key] = weight


def merge_lora(state: StateDict, adapters: StateDict) -> StateDict:
    """SAM state dict with CellSeg1 adapters merged (W' = W + B @ A) and full tensors replaced."""
    out = dict(state)
    enc = _pairs(adapters, "w")
    if len(enc) % 2:
        raise UserError(f"adapter file has {len(enc)} encoder adapters; expected q and v per block")
    for j in range(len(enc) // 2):
        key = f"{ENCODER}blocks.{j}.attn.qkv.weight"
        dim = out[key].shape[1] if key in out else 0
        (qa, qb), (va, vb) = enc[2 * j], enc[2 * j + 1]
        _add_delta(out, key, qa, qb, slice(0, dim))
        _add_delta(out, key, va, vb, slice(out[key].shape[0] - dim, None))
    layers = "mask_decoder.transformer.layers"
    for short, attn in DECODER_ADAPTERS.items():
        for i, (a, b) in enumerate(_pairs(adapters, short)):
            proj = "q_proj" if i % 2 == 0 else "v_proj"
            _add_delta(out, f"{layers}.{i // 2}.{attn}.{proj}.weight", a, b)
    if "fati_qa" in adapters:
        final = f"mask_decoder.transformer.{FINAL_ATTN}"
        _add_delta(out, f"{final}.q_proj.weight", adapters["fati_qa"], adapters["fati_qb"])
        _add_delta(out, f"{final}.v_proj.weight", adapters["fati_va"], adapters["fati_vb"])
    for key, value in adapters.items():
        if key.startswith(("prompt_encoder.", "mask_decoder.")):
            if key not in out or out[key].shape != value.shape:
                raise UserError(f"adapter tensor {key} does not match the SAM checkpoint")
            out[key] = value
    return out


# --- modules ---------------------------------------------------------------------------------------
@dataclass
class SamModules:
    """SAM at the CellSeg1 input size: image encoder and point/box decoder (shared weights)."""

    encoder: nn.Module
    decoder: PointDecoder  # also a BoxDecoder: box prompts through ``BoxDecoder.forward``
    input_size: int


def build_sam(state: StateDict, input_size: int = INPUT_SIZE) -> SamModules:
    """SAM modules for a state dict already at ``input_size`` (see :func:`resize_to_input`), eval mode."""
    vit = infer_vit_config(state, ENCODER)
    encoder = build_image_encoder(vit)
    cfg = infer_prompt_decoder_config(state, "", vit.grid, input_size)
    prompt_encoder, mask_decoder = build_prompt_decoder(cfg)
    prefixes = {"image_encoder.": encoder, "prompt_encoder.": prompt_encoder, "mask_decoder.": mask_decoder}
    for prefix, module in prefixes.items():
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(part, strict=True)
        except RuntimeError as exc:
            raise UserError(f"checkpoint does not fit SAM's {prefix.rstrip('.')}: {str(exc).splitlines()[0]}") from None
    decoder = PointDecoder(prompt_encoder, mask_decoder)
    return SamModules(encoder.eval(), decoder.eval(), input_size)


def load_cellseg1(sam_checkpoint: str | Path, lora: str | Path | None, input_size: int = INPUT_SIZE) -> SamModules:
    """Official SAM checkpoint -> 512-input SAM with the adapter file merged in."""
    state = resize_to_input(load_state(sam_checkpoint), input_size)
    if lora is not None:
        state = merge_lora(state, load_state(lora))
    return build_sam(state, input_size)


def variant_shapes(name: str, input_size: int = INPUT_SIZE) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of an official SAM variant's image encoder at ``input_size`` (meta tensors, no memory)."""
    cfg = VARIANTS[name]
    cfg = ViTConfig(**{**cfg.__dict__, "img_size": input_size})
    with torch.device("meta"):
        encoder = build_image_encoder(cfg)
    return {f"{ENCODER}{k}": tuple(v.shape) for k, v in encoder.state_dict().items()}


# --- unmerged LoRA (training and parity reference) --------------------------------------------------
class _LoRA(nn.Module):
    """A rank-r adapter x -> B(A x); B starts at zero so the adapter starts as the identity."""

    def __init__(self, d_in: int, d_out: int, rank: int) -> None:
        super().__init__()
        self.a = nn.Linear(d_in, rank, bias=False)
        self.b = nn.Linear(rank, d_out, bias=False)
        nn.init.kaiming_uniform_(self.a.weight, a=5**0.5)
        nn.init.zeros_(self.b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class QKVWithLoRA(nn.Module):
    """A fused qkv projection with adapters on its q and v output rows."""

    def __init__(self, qkv: nn.Linear, rank: int) -> None:
        super().__init__()
        self.qkv, self.dim = qkv, qkv.in_features
        self.q = _LoRA(self.dim, self.dim, rank)
        self.v = _LoRA(self.dim, self.dim, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.qkv(x)
        d = self.dim
        return torch.cat([out[..., :d] + self.q(x), out[..., d:-d], out[..., -d:] + self.v(x)], dim=-1)


class LinearWithLoRA(nn.Module):
    """A projection plus one adapter."""

    def __init__(self, linear: nn.Linear, rank: int) -> None:
        super().__init__()
        self.linear = linear
        self.lora = _LoRA(linear.in_features, linear.out_features, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.lora(x)


def _decoder_attentions(mask_decoder: nn.Module) -> list[tuple[str, int, nn.Module]]:
    """(adapter prefix, layer, attention) of every attention in the two-way transformer."""
    found = []
    for l, layer in enumerate(mask_decoder.transformer.layers):
        found += [(short, l, getattr(layer, attn)) for short, attn in DECODER_ADAPTERS.items()]
    return found + [("fati", 0, getattr(mask_decoder.transformer, FINAL_ATTN))]


def attach_lora(mask_decoder: nn.Module, rank: int = 4, encoder: nn.Module | None = None) -> None:
    """Wrap q/v projections of ``mask_decoder`` (and of a SAM ViT ``encoder``'s qkv) with adapters."""
    if encoder is not None:
        for block in encoder.blocks:
            block.attn.qkv = QKVWithLoRA(block.attn.qkv, rank)
    for _, _, attn in _decoder_attentions(mask_decoder):
        attn.q_proj = LinearWithLoRA(attn.q_proj, rank)
        attn.v_proj = LinearWithLoRA(attn.v_proj, rank)


def adapter_state(prompt_encoder: nn.Module, mask_decoder: nn.Module, encoder: nn.Module | None = None) -> StateDict:
    """The adapter file of :func:`attach_lora`-wrapped modules, in CellSeg1's layout."""
    out: StateDict = {}
    if encoder is not None:
        for j, block in enumerate(encoder.blocks):
            for i, lora in ((2 * j, block.attn.qkv.q), (2 * j + 1, block.attn.qkv.v)):
                out[f"w_a_{i:03d}"], out[f"w_b_{i:03d}"] = lora.a.weight, lora.b.weight
    for short, l, attn in _decoder_attentions(mask_decoder):
        q, v = attn.q_proj.lora, attn.v_proj.lora
        if short == "fati":
            out.update(fati_qa=q.a.weight, fati_qb=q.b.weight, fati_va=v.a.weight, fati_vb=v.b.weight)
            continue
        for i, lora in ((2 * l, q), (2 * l + 1, v)):
            out[f"{short}_a_{i:03d}"], out[f"{short}_b_{i:03d}"] = lora.a.weight, lora.b.weight
    out.update({f"prompt_encoder.{k}": v for k, v in prompt_encoder.state_dict().items()})
    base = {k: v for k, v in mask_decoder.state_dict().items() if not k.startswith("transformer.")}
    out.update({f"mask_decoder.{k}": v for k, v in base.items()})
    return {k: v.detach().clone() for k, v in out.items()}
