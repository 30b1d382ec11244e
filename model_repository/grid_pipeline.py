"""Triton Python BLS model: detector-free segmentation of one image with a grid of point prompts.

Copied by export/grid_repository.py to ``<family>_grid/1/model.py`` with grid_masks.py and bls.py
beside it (numpy + scipy). Config parameter ``family`` (Family JSON; its ``extra`` may override the
defaults below). Steps (CellSeg1's automatic mask generation):
for the frame and, with ``crop_n_layers`` >= 1, each overlapping crop (zoomed to the input size):
encoder -> n x n points over its valid part -> point decoder in chunks -> keep predicted IoU >=
t_iou, stability (offset 0.8) >= t_stab, area < 10 % of the crop, and (crops) not cut by the crop
border -> crop masks resampled onto the frame's low-res grid; then over all of them: mask-IoU
NMS (0.05) -> holes/islands < 20 px cleaned -> sorted by area, largest first.
Outputs follow the box pipeline's contract; masks are decided at logit 0 (after clean-up).
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bls  # noqa: E402
import grid_masks  # noqa: E402

DEFAULTS = {
    "points_per_side": 32,
    "pred_iou_threshold": 0.8,
    "stability_threshold": 0.6,
    "stability_offset": 0.8,
    "max_area_fraction": 0.1,
    "mask_nms_iou": 0.05,
    "min_region_area": 20,
    "crop_n_layers": 0,
    "crop_overlap_ratio": 512 / 1500,  # SAM's default
    "crop_edge_fraction": 20 / 1024,  # SAM's 20 px at 1024 input, as a fraction of the input
}
MAX_POINTS_PER_SIDE = 128
MAX_CROP_LAYERS = 2
DECIDED_LOGIT = 0.5  # smallest |logit| of a pixel after clean-up, so logit > 0 is the clean mask
MAX_LOGIT = 8.0  # largest |logit| sent: up-sampling a decided mask keeps its edges where they were


class RequestError(Exception):
    """A problem with the request or with a composing model; answered as a TritonError."""


def _input(request, name, dtype, shape, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    array = tensor.as_numpy()
    if array.dtype != dtype or array.shape != shape:
        raise RequestError(f"input '{name}' must be {np.dtype(dtype)} {list(shape)}, got {array.dtype} {list(array.shape)}")
    if not np.all(np.isfinite(array)):
        raise RequestError(f"input '{name}' contains NaN or infinite values")
    return array


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        family = json.loads(params["family"])
        name = family["name"]
        self.encoder, self.decoder = f"{name}_encoder", f"{name}_point_decoder"
        self.size = int(family["input_size"])
        self.low_res = int(family["low_res_size"])
        self.chunk = max(1, int(family["decoder_chunk"]))
        self.rules = {**DEFAULTS, **{k: v for k, v in family.get("extra", {}).items() if k in DEFAULTS}}
        self.request_options = bls.request_options()

    def _call(self, stage, model, inputs, outputs):
        try:
            return bls.call(stage, model, inputs, outputs, self.request_options)
        except bls.ComposingModelError as exc:
            raise RequestError(str(exc)) from None

    def _decode(self, embeddings, points):
        """Low-res logits [N,m,m] and predicted IoU [N] of N foreground points, chunked."""
        masks, ious = [], []
        for start in range(0, len(points), self.chunk):
            chunk = points[start:start + self.chunk]
            low_res, iou = self._call(
                "point decoder", self.decoder,
                {"image_embeddings": embeddings, "point_coords": chunk[:, None, :],
                 "point_labels": np.ones((len(chunk), 1), np.float32)},
                ("low_res_masks", "iou_predictions"),
            )
            masks.append(low_res[:, 0])
            ious.append(iou[:, 0])
        return np.concatenate(masks), np.concatenate(ious)

    def _candidates(self, image, valid, n, t_iou, t_stab):
        """Filtered masks of one frame or crop: (logits [k,m,m] in its own frame, IoU [k], prompt index [k])."""
        s, m = self.size, self.low_res
        height, width = valid
        (embeddings,) = self._call("encoder", self.encoder, {"image": image}, ("image_embeddings",))
        points = grid_masks.point_grid(n, (0.0, 0.0, float(width), float(height)))
        logits, ious = self._decode(embeddings, points)
        scale = m / s
        logits[:, int(np.ceil(height * scale)):, :] = -np.inf  # nothing outside the image
        logits[:, :, int(np.ceil(width * scale)):] = -np.inf
        stable = grid_masks.stability_score(logits, self.rules["stability_offset"])
        areas = (logits > 0).reshape(len(logits), m * m).sum(1)
        max_area = self.rules["max_area_fraction"] * height * width * scale * scale
        keep = np.flatnonzero((ious >= t_iou) & (stable >= t_stab) & (areas > 0) & (areas < max_area))
        return logits[keep], ious[keep], keep

    def _inputs(self, request):
        """(image, (height, width), points per side, IoU and stability thresholds, crop layers)."""
        s = self.size
        image = _input(request, "image", np.float32, (1, 3, s, s), None)
        if image is None:
            raise RequestError("input 'image' is required")
        height, width = (int(v) for v in _input(request, "valid_size", np.int32, (2,), np.array([s, s])))
        if not (1 <= height <= s and 1 <= width <= s):
            raise RequestError(f"input 'valid_size' must lie in [1, {s}], got {[height, width]}")
        n = int(_input(request, "points_per_side", np.int32, (1,), np.array([self.rules["points_per_side"]]))[0])
        if not 1 <= n <= MAX_POINTS_PER_SIDE:
            raise RequestError(f"input 'points_per_side' must lie in [1, {MAX_POINTS_PER_SIDE}], got {n}")
        t_iou = float(_input(request, "pred_iou_threshold", np.float32, (1,), np.array([self.rules["pred_iou_threshold"]]))[0])
        t_stab = float(_input(request, "stability_threshold", np.float32, (1,), np.array([self.rules["stability_threshold"]]))[0])
        layers = int(_input(request, "crop_n_layers", np.int32, (1,), np.array([self.rules["crop_n_layers"]]))[0])
        if not 0 <= layers <= MAX_CROP_LAYERS:
            raise RequestError(f"input 'crop_n_layers' must lie in [0, {MAX_CROP_LAYERS}], got {layers}")
        return image, (height, width), n, t_iou, t_stab, layers

    def _segment(self, request):
        s, m = self.size, self.low_res
        image, (height, width), n, t_iou, t_stab, layers = self._inputs(request)
        logits, ious, index = self._candidates(image, (height, width), n, t_iou, t_stab)
        found = [(logits, ious, index)]
        frame = (0, 0, width, height)
        tolerance = self.rules["crop_edge_fraction"] * s
        for c, box in enumerate(grid_masks.crop_boxes(width, height, layers, self.rules["crop_overlap_ratio"])):
            crop, valid = grid_masks.crop_input(image, box)
            logits, ious, index = self._candidates(crop, valid, n, t_iou, t_stab)
            logits = grid_masks.crop_to_frame(logits, box, s)
            boxes = grid_masks.mask_boxes(logits > 0) * np.float32(s / m)
            inside = ~grid_masks.near_crop_edge(boxes, box, frame, tolerance) & (logits > 0).any(axis=(1, 2))
            found.append((logits[inside], ious[inside], index[inside] + (c + 1) * n * n))
        logits = np.concatenate([f[0] for f in found])
        ious = np.concatenate([f[1] for f in found])
        index = np.concatenate([f[2] for f in found])
        kept = grid_masks.mask_nms(logits > 0, ious, self.rules["mask_nms_iou"])
        clean = np.stack([grid_masks.clean_mask(logits[i] > 0, int(self.rules["min_region_area"])) for i in kept]) \
            if len(kept) else np.zeros((0, m, m), bool)
        nonempty = clean.reshape(len(clean), m * m).any(1)
        kept, clean = kept[nonempty], clean[nonempty]
        order = np.argsort(-clean.reshape(len(clean), m * m).sum(1), kind="stable")  # largest first
        kept, clean = kept[order], clean[order]
        decided = np.where(clean, np.maximum(logits[kept], DECIDED_LOGIT), np.minimum(logits[kept], -DECIDED_LOGIT))
        decided = np.clip(decided, -MAX_LOGIT, MAX_LOGIT)
        boxes = grid_masks.mask_boxes(clean) / np.float32(m / s)
        return {
            "boxes": boxes.astype(np.float32).reshape(-1, 4),
            "scores": ious[kept].astype(np.float32),
            "iou_predictions": ious[kept].astype(np.float32),
            "masks": decided.astype(np.float16).reshape(-1, m, m),
            "prompt_index": index[kept].astype(np.int32),
        }

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                outputs = self._segment(request)
                tensors = [pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in outputs.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except RequestError as exc:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
            except Exception as exc:  # never take the server down on one request
                message = f"grid pipeline internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)))
        return responses
