"""Triton Python BLS model: one image in, cells (boxes, scores, mask logits) out.

Copied by the repository renderer to ``<family>/1/model.py`` with box_pipeline.py (the steps),
selection.py, roi_windows.py and bls.py (the call to a composing model, shared with
grid_pipeline.py) beside it; numpy + scikit-learn. Config parameters: ``family`` (Family JSON),
``nms_iou``, ``max_detections``, ``max_prompts`` (given boxes per request). This file reads each
request's inputs, runs :class:`box_pipeline.BoxPipeline` on them and answers.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bls  # noqa: E402
import box_pipeline  # noqa: E402


def _triton_error(message, invalid_argument):
    """A TritonError; the caller's mistakes carry INVALID_ARGUMENT where this backend knows the code."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if invalid_argument else None
    return pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.input_names = [entry["name"] for entry in config["input"]]
        self.request_options = bls.request_options()
        self.pipeline = box_pipeline.BoxPipeline(
            json.loads(params["family"]),
            self._call,
            nms_iou=params.get("nms_iou", 0.5),
            max_detections=params.get("max_detections", 1000),
            max_prompts=params.get("max_prompts", box_pipeline.DEFAULT_MAX_PROMPTS),
        )

    def _call(self, stage, model, inputs, outputs):
        """Run a composing model (bls.call); a failure becomes a RequestError naming the stage."""
        try:
            return bls.call(stage, model, inputs, outputs, self.request_options)
        except bls.ComposingModelError as exc:
            raise box_pipeline.RequestError(str(exc), invalid_argument=False) from None

    def _inputs(self, request):
        tensors = ((name, pb_utils.get_input_tensor_by_name(request, name)) for name in self.input_names)
        return {name: tensor.as_numpy() for name, tensor in tensors if tensor is not None}

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                outputs = self.pipeline.segment(self._inputs(request))
                tensors = [pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in outputs.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except box_pipeline.RequestError as exc:
                error = _triton_error(str(exc), exc.invalid_argument)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
            except Exception as exc:  # never take the server down on one request
                message = f"pipeline internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=_triton_error(message, False)))
        return responses
