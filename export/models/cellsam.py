"""CellSAM from its official checkpoint: segmenter image encoder, CellFinder, batched box decoder.

Official layout (a flat state dict): ``model_cp.{image_encoder,prompt_encoder,mask_decoder}.*``
(the segmenter), ``cellfinder.decode_head.*`` (the detector) and an unused copy
``model.{...}.*`` of a segmenter; ``model.*`` is the segmenter only when ``model_cp.*`` is absent.
The architecture is read from the tensors' shapes, so small test checkpoints load the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from cellsam_triton.errors import UserError

from .box_decoder import BoxDecoder
from .cellfinder import CELLFINDER_KEYS, CellFinder, CellFinderConfig, infer_cellfinder_config
from .sam_vit import (
    SAM_DECODER,
    VIT_B,
    PromptDecoderConfig,
    StateDict,
    ViTConfig,
    build_image_encoder,
    build_prompt_decoder,
    infer_prompt_decoder_config,
    infer_vit_config,
)

SEGMENTER_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


@dataclass(frozen=True)
class CellSAMConfig:
    """Architecture of the three networks CellSAM serves."""

    segmenter: ViTConfig = VIT_B
    decoder: PromptDecoderConfig = SAM_DECODER
    cellfinder: CellFinderConfig = field(default_factory=CellFinderConfig)


_SMALL_VIT = ViTConfig(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,))
VARIANTS = {
    "vit_b": CellSAMConfig(),
    # Same 1024 input and 64x64 grid, tiny widths: for tests, demos and benchmarks.
    "small": CellSAMConfig(
        segmenter=_SMALL_VIT,
        cellfinder=CellFinderConfig(
            vit=ViTConfig(**{**_SMALL_VIT.__dict__, "out_chans": None}),
            d_model=64,
            enc_layers=1,
            dec_layers=2,
            ffn_dim=128,
            num_queries=300,
        ),
    ),
}


@dataclass
class CellSAMModules:
    """The exportable networks: encoder (image -> embeddings), cellfinder, decoder (BoxDecoder)."""

    encoder: ImageEncoderViT
    cellfinder: CellFinder
    decoder: BoxDecoder

    @property
    def image_size(self) -> int:
        return self.encoder.img_size

    def segmenter_parts(self) -> dict[str, nn.Module]:
        return dict(zip(SEGMENTER_PARTS, (self.encoder, self.decoder.prompt_encoder, self.decoder.mask_decoder)))

    def official_state_dict(self, segmenter_prefix: str = "model_cp.") -> StateDict:
        """The weights under their official checkpoint names (without the unused copy)."""
        state = _prefixed(self.segmenter_parts(), segmenter_prefix)
        cellfinder = self.cellfinder.state_dict()
        for official, local in CELLFINDER_KEYS.items():
            state.update({official + k[len(local):]: v for k, v in cellfinder.items() if k.startswith(local)})
        return state


def _prefixed(parts: dict[str, nn.Module], prefix: str) -> StateDict:
    return {prefix + name + k: v for name, module in parts.items() for k, v in module.state_dict().items()}


def _build(cfg: CellSAMConfig) -> CellSAMModules:
    prompt_encoder, mask_decoder = build_prompt_decoder(cfg.decoder)
    return CellSAMModules(
        encoder=build_image_encoder(cfg.segmenter),
        cellfinder=CellFinder(cfg.cellfinder),
        decoder=BoxDecoder(prompt_encoder, mask_decoder),
    )


def _listing(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _check_keys(state: StateDict, expected: StateDict, ignored_prefix: str | None) -> None:
    """One-line ``UserError`` naming missing / unexpected keys and shape mismatches."""
    given = [k for k in state if not (ignored_prefix and k.startswith(ignored_prefix))]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in given if k not in expected]
    wrong = [
        f"{k} is {list(state[k].shape)}, expected {list(expected[k].shape)}"
        for k in given
        if k in expected and state[k].shape != expected[k].shape
    ]
    problems = [
        f"{len(found)} {what} ({_listing(found)})"
        for what, found in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong))
        if found
    ]
    if problems:
        raise UserError("checkpoint does not fit CellSAM: " + "; ".join(problems))


def build_cellsam(
    state_dict: StateDict, detr_heads: int = 8, vit_heads: int = 12, decoder_heads: int = 8
) -> CellSAMModules:
    """CellSAM's networks with the checkpoint's weights (eval mode, no grad).

    Every ``model_cp.*`` and ``cellfinder.*`` tensor must be used; the architecture is read
    from shapes, head counts (which shapes cannot tell) are the parameters.
    """
    not_tensors = [k for k, v in state_dict.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise UserError(f"checkpoint entries are not tensors: {_listing(not_tensors)}")
    if any(k.startswith("model_cp.") for k in state_dict):
        segmenter, ignored = "model_cp.", "model."
    elif any(k.startswith("model.") for k in state_dict):
        segmenter, ignored = "model.", None
    else:
        raise UserError(f"not a CellSAM checkpoint: no 'model_cp.*' or 'model.*' tensors (keys: {_listing(list(state_dict))})")
    if not any(k.startswith("cellfinder.") for k in state_dict):
        raise UserError("not a CellSAM checkpoint: no 'cellfinder.*' tensors (the detector)")

    vit = infer_vit_config(state_dict, segmenter + "image_encoder.", vit_heads)
    if vit.out_chans is None:
        raise UserError(f"checkpoint has no {segmenter}image_encoder.neck.*: not a SAM image encoder")
    cfg = CellSAMConfig(
        segmenter=vit,
        decoder=infer_prompt_decoder_config(state_dict, segmenter, vit.grid, vit.img_size, decoder_heads),
        cellfinder=infer_cellfinder_config(state_dict, detr_heads, vit_heads),
    )
    modules = _build(cfg)
    _check_keys(state_dict, modules.official_state_dict(segmenter), ignored)

    for name, module in modules.segmenter_parts().items():
        prefix = segmenter + name
        module.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
    cellfinder = {
        local + k[len(official):]: v
        for official, local in CELLFINDER_KEYS.items()
        for k, v in state_dict.items()
        if k.startswith(official)
    }
    modules.cellfinder.load_state_dict(cellfinder)
    for module in (modules.encoder, modules.cellfinder, modules.decoder):
        module.eval().requires_grad_(False)
    return modules


def load_checkpoint(path: str | os.PathLike) -> StateDict:
    """Read a checkpoint's state dict on CPU (safe loader; ``{'state_dict': ...}`` is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: truncated zip, pickle, not a torch file ...
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"cannot read checkpoint {path}: {reason}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"checkpoint {path} does not hold a state dict (got {type(obj).__name__})")
    return obj


def _perturb_constants(module: nn.Module, generator: torch.Generator) -> None:
    """Give constant-initialised tensors (norm scales, biases, zero tables) random values,
    so that a random checkpoint exercises every weight."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if bool((tensor == 0).all()):
                tensor.copy_(0.02 * noise)
            elif bool((tensor == 1).all()):
                tensor.copy_(1 + 0.1 * noise)


def _random_segmenter(cfg: CellSAMConfig, generator: torch.Generator) -> dict[str, nn.Module]:
    prompt_encoder, mask_decoder = build_prompt_decoder(cfg.decoder)
    parts = dict(zip(SEGMENTER_PARTS, (build_image_encoder(cfg.segmenter), prompt_encoder, mask_decoder)))
    for module in parts.values():
        _perturb_constants(module, generator)
    return parts


def _random_modules(cfg: CellSAMConfig, generator: torch.Generator) -> CellSAMModules:
    modules = _build(cfg)
    for module in (modules.encoder, modules.cellfinder, modules.decoder):
        _perturb_constants(module, generator)
    # The published model shares one class head and one box head across decoder layers,
    # so the official checkpoint holds identical copies.
    transformer = modules.cellfinder.transformer
    for heads in (transformer.class_embed, transformer.bbox_embed):
        for head in heads[1:]:
            head.load_state_dict(heads[0].state_dict())
    return modules


def make_random_checkpoint(path: str | os.PathLike | None, variant: str = "small", seed: int = 0) -> StateDict:
    """Random weights in exactly the official key layout (with the unused ``model.*`` copy).

    ``variant``: "vit_b" (the published architecture) or "small" (tiny widths, same 1024 input).
    Saved with ``torch.save`` when ``path`` is given.
    """
    if variant not in VARIANTS:
        raise UserError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    cfg = VARIANTS[variant]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed + 1)
        state = _prefixed(_random_segmenter(cfg, generator), "model.")
        modules = _random_modules(cfg, generator)
    state.update(modules.official_state_dict("model_cp."))
    state = {k: v.detach().clone() for k, v in state.items()}
    if path is not None:
        torch.save(state, path)
    return state
