"""Automatic mask generation of one frame with a grid of point prompts (numpy + scipy only).

The core of ``<family>_grid`` (grid_pipeline.py), kept free of Triton so that the same rules run
in process too (export/grid_calibration.py calibrates a fine-tuned model's thresholds with it).
``call(stage, model, inputs, outputs)`` runs a composing model: a BLS request when served, the
PyTorch modules in process. Steps (CellSeg1's automatic mask generation): for the frame and,
with ``crop_n_layers`` >= 1, each overlapping crop (zoomed to the input size): encoder -> n x n
points over its valid part -> point decoder in chunks (with ``grid.window``, each point on an
embedding window around it, masks reaching an inner window side again whole) -> keep predicted IoU >= t_iou, stability
(offset 0.8) >= t_stab, area < 10 % of the crop, and (crops) not cut by the crop border -> crop
masks resampled onto the frame's low-res grid; then over all of them: mask-IoU NMS (0.05) ->
holes/islands < 20 px cleaned -> sorted by area, largest first.
"""

import numpy as np

try:  # a package in the project, loose files beside model.py inside Triton
    from ..contracts import NAMES
    from . import grid_masks, roi_windows
    from .raster import mask_boxes
except ImportError:
    import grid_masks
    import roi_windows
    from contracts import NAMES
    from raster import mask_boxes

DECIDED_LOGIT = 0.5  # smallest |logit| of a pixel after clean-up, so logit > 0 is the clean mask
MAX_LOGIT = 8.0  # largest |logit| sent: up-sampling a decided mask keeps its edges where they were


class GridGenerator:
    """Grid segmentation of a family's frames by its rules (``family.grid``); ``encoder`` and
    ``decoder`` name the composing models (default: the family's served names)."""

    def __init__(self, family, call, encoder=None, decoder=None, window_decoder=None) -> None:
        self.call = call
        self.encoder = encoder or family.encoder_name
        self.decoder = decoder or family.point_decoder_name
        self.window_decoder = window_decoder or family.roi_point_decoder_name
        self.size, self.low_res, self.chunk = family.input_size, family.low_res_size, max(1, family.decoder_chunk)
        self.embed_size = family.embed_size
        self.rules = family.grid
        self.decoded = {"window": 0, "whole": 0}  # points decoded each way (what a window saves)

    def decode(self, embeddings, points):
        """Low-res logits [N,m,m] and predicted IoU [N] of N foreground points: on windows of
        ``grid.window`` cells (masks cut by their window decoded again whole), else whole."""
        if self.rules.window <= 0 or self.rules.window >= self.embed_size:
            return self.decode_whole(embeddings, points)
        side, e = int(self.rules.window), self.embed_size
        origins = roi_windows.point_windows(points, e, self.size // e, side)
        masks = np.empty((len(points), self.low_res, self.low_res), np.float32)
        ious = np.empty(len(points), np.float32)
        cut = np.zeros(len(points), bool)
        step = self.chunk * max(1, e // side)
        for start in range(0, len(points), step):
            rows = np.arange(start, min(start + step, len(points)))
            low_res, iou = self.call(
                "roi point decoder", self.window_decoder,
                {NAMES.embedding_windows: roi_windows.crop_windows(embeddings, origins[rows], side),
                 NAMES.window_origins: origins[rows].astype(np.float32), NAMES.point_coords: points[rows, None, :],
                 NAMES.point_labels: np.ones((len(rows), 1), np.float32)},
                (NAMES.low_res_masks, NAMES.iou_predictions),
            )
            roi_windows.paste_windows(masks, rows, low_res, origins[rows], self.low_res // e, grid_masks.FAR)
            ious[rows] = iou[:, 0]
            cut[rows] = roi_windows.cut_by_window(low_res, origins[rows], side, e)
        self.decoded["window"] += len(points)
        if cut.any():
            masks[cut], ious[cut] = self.decode_whole(embeddings, points[cut])
        return masks, ious

    def decode_whole(self, embeddings, points):
        """Low-res logits [N,m,m] and predicted IoU [N] of N foreground points on the whole embedding, chunked."""
        masks, ious = [np.zeros((0, self.low_res, self.low_res), np.float32)], [np.zeros(0, np.float32)]
        for start in range(0, len(points), self.chunk):
            chunk = points[start:start + self.chunk]
            low_res, iou = self.call(
                "point decoder", self.decoder,
                {NAMES.image_embeddings: embeddings, NAMES.point_coords: chunk[:, None, :],
                 NAMES.point_labels: np.ones((len(chunk), 1), np.float32)},
                (NAMES.low_res_masks, NAMES.iou_predictions),
            )
            masks.append(low_res[:, 0])
            ious.append(iou[:, 0])
        self.decoded["whole"] += len(points)
        return np.concatenate(masks), np.concatenate(ious)

    def candidates(self, image, valid, n, t_iou, t_stab):
        """Filtered masks of one frame or crop: (logits [k,m,m] in its own frame, IoU [k], prompt index [k])."""
        s, m = self.size, self.low_res
        height, width = valid
        (embeddings,) = self.call("encoder", self.encoder, {NAMES.image: image}, (NAMES.image_embeddings,))
        points = grid_masks.point_grid(n, (0.0, 0.0, float(width), float(height)))
        logits, ious = self.decode(embeddings, points)
        scale = m / s
        logits[:, int(np.ceil(height * scale)):, :] = -np.inf  # nothing outside the image
        logits[:, :, int(np.ceil(width * scale)):] = -np.inf
        stable = grid_masks.stability_score(logits, self.rules.stability_offset)
        areas = (logits > 0).reshape(len(logits), m * m).sum(1)
        max_area = self.rules.max_area_fraction * height * width * scale * scale
        keep = np.flatnonzero((ious >= t_iou) & (stable >= t_stab) & (areas > 0) & (areas < max_area))
        return logits[keep], ious[keep], keep

    def segment(self, image, valid, n, t_iou, t_stab, layers):
        """The pipeline's outputs (boxes, scores, iou_predictions, masks, prompt_index) for one frame."""
        s, m = self.size, self.low_res
        height, width = valid
        found = [self.candidates(image, valid, n, t_iou, t_stab)]
        frame = (0, 0, width, height)
        tolerance = self.rules.crop_edge_fraction * s
        for c, box in enumerate(grid_masks.crop_boxes(width, height, layers, self.rules.crop_overlap_ratio)):
            crop, crop_valid = grid_masks.crop_input(image, box)
            logits, ious, index = self.candidates(crop, crop_valid, n, t_iou, t_stab)
            logits = grid_masks.crop_to_frame(logits, box, s)
            boxes = mask_boxes(logits > 0) * np.float32(s / m)
            inside = ~grid_masks.near_crop_edge(boxes, box, frame, tolerance) & (logits > 0).any(axis=(1, 2))
            found.append((logits[inside], ious[inside], index[inside] + (c + 1) * n * n))
        logits = np.concatenate([f[0] for f in found])
        ious = np.concatenate([f[1] for f in found])
        index = np.concatenate([f[2] for f in found])
        kept = grid_masks.mask_nms(logits > 0, ious, self.rules.mask_nms_iou)
        clean = np.stack([grid_masks.clean_mask(logits[i] > 0, int(self.rules.min_region_area)) for i in kept]) \
            if len(kept) else np.zeros((0, m, m), bool)
        nonempty = clean.reshape(len(clean), m * m).any(1)
        kept, clean = kept[nonempty], clean[nonempty]
        order = np.argsort(-clean.reshape(len(clean), m * m).sum(1), kind="stable")  # largest first
        kept, clean = kept[order], clean[order]
        decided = np.where(clean, np.maximum(logits[kept], DECIDED_LOGIT), np.minimum(logits[kept], -DECIDED_LOGIT))
        decided = np.clip(decided, -MAX_LOGIT, MAX_LOGIT)
        boxes = mask_boxes(clean) / np.float32(m / s)
        return {
            NAMES.boxes: boxes.astype(np.float32).reshape(-1, 4),
            NAMES.scores: ious[kept].astype(np.float32),
            NAMES.iou_predictions: ious[kept].astype(np.float32),
            NAMES.masks: decided.astype(np.float16).reshape(-1, m, m),
            NAMES.prompt_index: index[kept].astype(np.int32),
        }
