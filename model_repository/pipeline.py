"""Triton Python BLS model: one image in, cells (boxes, scores, mask logits) out.

Copied by the repository renderer to ``<family>/1/model.py`` with selection.py and bls.py (the
call to a composing model, shared with grid_pipeline.py) beside it; numpy + scikit-learn. Config parameters: ``family`` (Family JSON), ``nms_iou``,
``max_detections``, ``max_prompts`` (given boxes per request). Steps: validate -> encoder -> prompts (given boxes, or detector + selection)
-> decoder in chunks -> IoU filter. Zero detections is an empty answer, not an error.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bls  # noqa: E402
import selection  # noqa: E402

DEFAULT_MAX_PROMPTS = 4096  # given boxes per request; 4096 masks of 256x256 FP16 = 512 MiB answer
FP16_MAX = float(np.finfo(np.float16).max)


def _triton_error(message, invalid_argument):
    """A TritonError; the caller's mistakes carry INVALID_ARGUMENT where this backend knows the code."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if invalid_argument else None
    return pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)


class RequestError(Exception):
    """A problem with the request (INVALID_ARGUMENT) or with a composing model; answered as a TritonError."""

    def __init__(self, message, invalid_argument=True):
        super().__init__(message)
        self.invalid_argument = invalid_argument


def _optional(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _check(name, array, dtype, shape):
    """dtype, shape (-1 = any) and finiteness of one input."""
    if array.dtype != dtype:
        raise RequestError(f"input '{name}' has dtype {array.dtype}, expected {np.dtype(dtype)}")
    if array.ndim != len(shape) or any(s not in (-1, a) for s, a in zip(shape, array.shape)):
        raise RequestError(f"input '{name}' has shape {list(array.shape)}, expected {list(shape)}")
    if not np.all(np.isfinite(array)):
        raise RequestError(f"input '{name}' contains NaN or infinite values")
    return array


def _scalar(request, name, default):
    array = _optional(request, name)
    if array is None:
        return float(default)
    return float(_check(name, array, np.float32, (1,))[0])


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.family = json.loads(params["family"])
        self.nms_iou = float(params.get("nms_iou", 0.5))
        self.max_detections = int(params.get("max_detections", 1000))
        self.max_prompts = int(params.get("max_prompts", DEFAULT_MAX_PROMPTS))
        name = self.family["name"]
        self.encoder, self.detector, self.decoder = f"{name}_encoder", f"{name}_detector", f"{name}_decoder"
        size = int(self.family["input_size"])
        self.image_shape = (1, 3, size, size)
        self.low_res = int(self.family["low_res_size"])
        self.chunk = max(1, int(self.family["decoder_chunk"]))
        self.request_options = bls.request_options()

    # --- composing models -------------------------------------------------------------------
    def _call(self, stage, model, inputs, outputs):
        """Run a composing model (bls.call); a failure becomes a RequestError naming the stage."""
        try:
            return bls.call(stage, model, inputs, outputs, self.request_options)
        except bls.ComposingModelError as exc:
            raise RequestError(str(exc), invalid_argument=False) from None

    def _detect(self, request, embeddings, bbox_threshold):
        """(boxes [N,4], scores [N]) chosen by the family's detector and selection rule."""
        if self.family["detector"] == "cellfinder":
            image = _optional(request, "detector_image")
            if image is None:
                raise RequestError("input 'detector_image' is required when no 'boxes' are given")
            _check("detector_image", image, np.float32, self.image_shape)
            logits, boxes = self._call("detector", self.detector, {"image": image}, ("pred_logits", "pred_boxes"))
            return selection.select_cellfinder(logits[0], boxes[0], self.image_shape[-1], bbox_threshold)
        scores, boxes = self._call(
            "detector", self.detector, {"image_embeddings": embeddings}, ("pred_scores", "pred_boxes")
        )
        return selection.select_lite(scores[0], boxes[0], bbox_threshold, self.nms_iou, self.max_detections)

    def _decode(self, embeddings, boxes):
        """Mask logits [N,m,m] and IoU predictions [N] for N boxes, decoder_chunk boxes per call."""
        masks, ious = [], []
        for start in range(0, len(boxes), self.chunk):
            chunk = boxes[start:start + self.chunk]
            low_res, iou = self._call(
                "decoder", self.decoder, {"image_embeddings": embeddings, "boxes": chunk},
                ("low_res_masks", "iou_predictions"),
            )
            if low_res.shape[0] != len(chunk) or iou.shape[0] != len(chunk):
                raise RequestError(f"decoder ({self.decoder}) returned {low_res.shape[0]} masks for {len(chunk)} boxes",
                                   invalid_argument=False)
            masks.append(low_res[:, 0])
            ious.append(iou[:, 0])
        if not masks:
            return np.zeros((0, self.low_res, self.low_res), np.float32), np.zeros((0,), np.float32)
        return np.concatenate(masks), np.concatenate(ious)

    # --- one request -------------------------------------------------------------------------
    def _segment(self, request):
        image = _optional(request, "image")
        if image is None:
            raise RequestError("input 'image' is required")
        _check("image", image, np.float32, self.image_shape)
        bbox_threshold = _scalar(request, "bbox_threshold", self.family["bbox_threshold"])
        iou_threshold = _scalar(request, "iou_threshold", self.family["iou_threshold"])
        prompts = _optional(request, "boxes")
        if prompts is not None:
            _check("boxes", prompts, np.float32, (-1, 4))
            if len(prompts) > self.max_prompts:
                raise RequestError(f"{len(prompts)} boxes given; at most {self.max_prompts} per request")
        (embeddings,) = self._call("encoder", self.encoder, {"image": image}, ("image_embeddings",))
        if prompts is not None:
            boxes, scores = prompts, np.ones(len(prompts), np.float32)
        else:
            boxes, scores = self._detect(request, embeddings, bbox_threshold)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        masks, ious = self._decode(embeddings, boxes)
        keep = np.ones(len(ious), bool) if iou_threshold < 0 else ious >= iou_threshold
        return {
            "boxes": boxes[keep],
            "scores": np.asarray(scores, np.float32)[keep],
            "iou_predictions": ious[keep].astype(np.float32),
            "masks": np.clip(masks[keep], -FP16_MAX, FP16_MAX).astype(np.float16),
            "prompt_index": np.flatnonzero(keep).astype(np.int32),
        }

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                outputs = self._segment(request)
                tensors = [pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in outputs.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except RequestError as exc:
                error = _triton_error(str(exc), exc.invalid_argument)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
            except Exception as exc:  # never take the server down on one request
                message = f"pipeline internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=_triton_error(message, False)))
        return responses
