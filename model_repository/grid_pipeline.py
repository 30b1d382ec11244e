"""Triton Python BLS model: detector-free segmentation of one image with a grid of point prompts.

Copied by export/grid_repository.py to ``<family>_grid/1/model.py`` with grid_masks.py beside it
(numpy + scipy). Config parameter ``family`` (Family JSON; its ``extra`` may override the
defaults below). Steps (CellSeg1's automatic mask generation, one crop):
encoder -> n x n points over the valid part of the frame -> point decoder in chunks ->
keep predicted IoU >= t_iou and stability (offset 0.8) >= t_stab and area < 10 % of the image
-> mask-IoU NMS (0.05) -> holes/islands < 20 px cleaned -> sorted by area, largest first.
Outputs follow the box pipeline's contract; masks are decided at logit 0 (after clean-up).
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grid_masks  # noqa: E402

DEFAULTS = {
    "points_per_side": 32,
    "pred_iou_threshold": 0.8,
    "stability_threshold": 0.6,
    "stability_offset": 0.8,
    "max_area_fraction": 0.1,
    "mask_nms_iou": 0.05,
    "min_region_area": 20,
}
MAX_POINTS_PER_SIDE = 128
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
        memory = getattr(pb_utils, "PreferredMemory", None)
        self.request_options = (
            {"preferred_memory": memory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)} if memory is not None else {}
        )

    def _call(self, stage, model, inputs, outputs):
        request = pb_utils.InferenceRequest(
            model_name=model,
            requested_output_names=list(outputs),
            inputs=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in inputs.items()],
            **self.request_options,
        )
        response = request.exec()
        if response.has_error():
            raise RequestError(f"{stage} ({model}) failed: {response.error().message()}")
        return [pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs]

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

    def _segment(self, request):
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

        (embeddings,) = self._call("encoder", self.encoder, {"image": image}, ("image_embeddings",))
        points = grid_masks.point_grid(n, (0.0, 0.0, float(width), float(height)))
        logits, ious = self._decode(embeddings, points)

        m, scale = self.low_res, self.low_res / s
        logits[:, int(np.ceil(height * scale)):, :] = -np.inf  # nothing outside the image
        logits[:, :, int(np.ceil(width * scale)):] = -np.inf
        stable = grid_masks.stability_score(logits, self.rules["stability_offset"])
        areas = (logits > 0).reshape(len(logits), m * m).sum(1)
        max_area = self.rules["max_area_fraction"] * height * width * scale * scale
        candidates = np.flatnonzero((ious >= t_iou) & (stable >= t_stab) & (areas > 0) & (areas < max_area))
        masks = logits[candidates] > 0
        kept = candidates[grid_masks.mask_nms(masks, ious[candidates], self.rules["mask_nms_iou"])]
        clean = np.stack([grid_masks.clean_mask(logits[i] > 0, int(self.rules["min_region_area"])) for i in kept]) \
            if len(kept) else np.zeros((0, m, m), bool)
        nonempty = clean.reshape(len(clean), m * m).any(1)
        kept, clean = kept[nonempty], clean[nonempty]
        order = np.argsort(-clean.reshape(len(clean), m * m).sum(1), kind="stable")  # largest first
        kept, clean = kept[order], clean[order]
        decided = np.where(clean, np.maximum(logits[kept], DECIDED_LOGIT), np.minimum(logits[kept], -DECIDED_LOGIT))
        decided = np.clip(decided, -MAX_LOGIT, MAX_LOGIT)
        boxes = grid_masks.mask_boxes(clean) / np.float32(scale)
        return {
            "boxes": boxes.astype(np.float32).reshape(-1, 4),
            "scores": ious[kept].astype(np.float32),
            "iou_predictions": ious[kept].astype(np.float32),
            "masks": decided.astype(np.float16).reshape(-1, m, m),
            "prompt_index": kept.astype(np.int32),
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
