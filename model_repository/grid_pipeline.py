"""Triton Python BLS model: detector-free segmentation of one image with a grid of point prompts.

Copied by export/grid_repository.py to ``<family>_grid/1/model.py`` with grid_generator.py,
grid_masks.py and bls.py beside it (numpy + scipy). Config parameter ``family`` (Family JSON; its
``extra`` may override grid_generator.DEFAULTS). This file checks the request and answers it;
the rules themselves (CellSeg1's automatic mask generation) are grid_generator.GridGenerator.
Outputs follow the box pipeline's contract; masks are decided at logit 0 (after clean-up).
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bls  # noqa: E402
import grid_generator  # noqa: E402

MAX_POINTS_PER_SIDE = 128
MAX_CROP_LAYERS = 2


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
        self.size = int(family["input_size"])
        self.generator = grid_generator.GridGenerator(
            self._call, f"{name}_encoder", f"{name}_point_decoder", self.size, int(family["low_res_size"]),
            int(family["decoder_chunk"]), family.get("extra", {}))
        self.rules = self.generator.rules
        self.request_options = bls.request_options()

    def _call(self, stage, model, inputs, outputs):
        try:
            return bls.call(stage, model, inputs, outputs, self.request_options)
        except bls.ComposingModelError as exc:
            raise RequestError(str(exc)) from None

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
        return self.generator.segment(*self._inputs(request))

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
