"""Calibrate a fine-tuned model's grid threshold on its own training image (in process, PyTorch).

CellSeg1 keeps grid masks with predicted IoU >= 0.8: a value tuned for SAM ViT-H, whose IoU head
is confident. After one-image fine-tuning of the LiteMedSAM base the IoU head is honest but
lower (its point masks have true IoU ~0.6-0.7 on DSB nuclei), so at 0.8 almost every mask is
dropped. The rule here: run the served grid rules (model_repository/grid_generator.py, the same
code as ``<family>_grid``, through client/grid_rules.py's tiling) on the training image with each
threshold of :data:`CANDIDATES`, keep the one with the best F1@0.5 against its labels (ties: the
higher threshold). Only the training image is used, never validation data. The point decoder's
answers are cached, so the sweep costs one grid pass. A base decoder whose grid thresholds were
chosen on several training images (`select-grid`, the default model's point decoder) keeps them:
the sweep is then recorded, not used to choose.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch

from cellsam_triton.contracts import NAMES, Family

CANDIDATES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
RULE = ("predicted-IoU threshold in (0.3, 0.4, ..., 0.8) with the best F1@0.5 of grid segmentation "
        "on the training image itself (ties: the higher threshold)")


class InProcessGrid:
    """``infer(model, arrays, spec)`` for ``<family>_grid`` run on PyTorch modules, answers cached."""

    def __init__(self, encoder: torch.nn.Module, point_decoder: torch.nn.Module, family: Family) -> None:
        from cellsam_triton.model_repository.grid_generator import GridGenerator

        from .models.window_point_decoder import WindowPointDecoder

        window = WindowPointDecoder(point_decoder.prompt_encoder, point_decoder.mask_decoder)  # same modules
        self.modules = {"encoder": encoder.eval(), "point decoder": point_decoder.eval(), "roi point decoder": window.eval()}
        self.family = family
        self.generator = GridGenerator(family, self._call, encoder="encoder", decoder="point decoder",
                                       window_decoder="roi point decoder")
        self._cache: dict[str, list[np.ndarray]] = {}

    def _call(self, stage: str, model: str, inputs: dict, outputs: tuple) -> list[np.ndarray]:
        digest = hashlib.sha1(stage.encode())
        for value in inputs.values():
            digest.update(np.ascontiguousarray(value).tobytes())
        key = digest.hexdigest()
        if key not in self._cache:
            tensors = [torch.from_numpy(np.ascontiguousarray(v, np.float32)) for v in inputs.values()]
            with torch.no_grad():
                answer = self.modules[stage](*tensors)
            answer = answer if isinstance(answer, tuple) else (answer,)
            self._cache[key] = [a.numpy() for a in answer]
        return self._cache[key]

    def __call__(self, model: str, arrays: dict[str, np.ndarray], spec=None) -> dict[str, np.ndarray]:
        rules = self.generator.rules
        valid = tuple(int(v) for v in arrays[NAMES.valid_size])
        option = {k: float(arrays[k][0]) if k in arrays else getattr(rules, k)
                  for k in (NAMES.points_per_side, NAMES.pred_iou_threshold, NAMES.stability_threshold, NAMES.crop_n_layers)}
        return self.generator.segment(arrays[NAMES.image], valid, int(option[NAMES.points_per_side]), option[NAMES.pred_iou_threshold],
                                      option[NAMES.stability_threshold], int(option[NAMES.crop_n_layers]))


KEPT_RULE = ("the base decoder's thresholds, chosen by select-grid on {images} seeded training images (a choice on "
             "one image is noisier); F1 on the training image by threshold is recorded for information")


def calibrate(
    encoder: torch.nn.Module, point_decoder: torch.nn.Module, family: Family, image: np.ndarray, labels: np.ndarray,
    points_per_side: int | None = None, candidates: tuple[float, ...] = CANDIDATES, keep: dict | None = None,
) -> dict:
    """The calibration record: chosen ``pred_iou_threshold``, the rule, F1 per candidate, grid size, seconds.

    ``keep``: the base decoder's `select-grid` record (export/grid_selection.py); its thresholds are
    kept (and swept with its stability threshold) instead of the best on the training image."""
    from cellsam_triton.client.grid_rules import GridOptions, segment_grid
    from cellsam_triton.client.metrics import score_image
    from cellsam_triton.client.types import SegmentOptions

    started = time.perf_counter()
    infer = InProcessGrid(encoder, point_decoder, family)
    side = int(points_per_side or family.grid.points_per_side)
    f1 = {}
    stability = None if keep is None else float(keep["stability_threshold"])
    for threshold in candidates:
        grid = GridOptions(points_per_side=side, pred_iou_threshold=threshold, stability_threshold=stability)
        found = segment_grid(image, infer, family, SegmentOptions(), grid)
        f1[threshold] = round(score_image(np.asarray(labels), found.labels).f1, 4)
    record = {"pred_iou_threshold": max(candidates, key=lambda t: (f1[t], t)), "rule": RULE, "points_per_side": side,
              "training_f1_by_threshold": {f"{t:g}": v for t, v in f1.items()}}
    if keep is not None:
        record.update(kept_thresholds(keep))
    return {**record, "seconds": round(time.perf_counter() - started, 1)}


def kept_thresholds(keep: dict) -> dict:
    """The grid record of a base decoder's `select-grid` thresholds, kept (no sweep needed)."""
    return {"pred_iou_threshold": float(keep["pred_iou_threshold"]), "stability_threshold": float(keep["stability_threshold"]),
            "rule": KEPT_RULE.format(images=keep.get("images", "several"))}
