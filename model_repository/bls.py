"""The base of every Python BLS pipeline (pipeline.py, grid_pipeline.py): configuration, the call
to a composing model, the request loop and its error codes.

Copied by the repository renderers beside each pipeline's model.py with request_checks.py and
contracts.py (the typed family and tensor names, the very module the client uses). A
subclass sets ``kind`` (named in internal errors), builds its steps in :meth:`BlsModel.setup`
from the config parameters and answers one request's named inputs in :meth:`BlsModel.segment`.
Every :class:`request_checks.RequestError` of the caller is answered with INVALID_ARGUMENT, a
composing model's failure with a plain error naming the stage, anything else as a one-line
internal error; the server never goes down on one request.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from contracts import Family  # noqa: E402
from request_checks import RequestError  # noqa: E402


def request_options():
    """Keyword arguments of every BLS request: outputs in CPU memory where the backend allows it."""
    memory = getattr(pb_utils, "PreferredMemory", None)
    return {"preferred_memory": memory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)} if memory is not None else {}


def triton_error(message, invalid_argument):
    """A TritonError; the caller's mistakes carry INVALID_ARGUMENT where this backend knows the code."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if invalid_argument else None
    return pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)


def first_line(exc):
    text = str(exc)
    return text.splitlines()[0] if text else ""


class BlsModel:
    """Triton Python model skeleton shared by the pipelines."""

    kind = "pipeline"

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.input_names = [entry["name"] for entry in config["input"]]
        self.request_options = request_options()
        self.setup(Family.from_json(self.parameters["family"]), self.parameters)

    def setup(self, family, parameters):
        """Build the steps from the family (a contracts.Family) and the config parameters (strings)."""
        raise NotImplementedError

    def segment(self, inputs):
        """Named numpy outputs of one request from its named numpy inputs; RequestError on bad input."""
        raise NotImplementedError

    def call(self, stage, model, inputs, outputs):
        """Run composing ``model`` on named numpy ``inputs``; its ``outputs`` as numpy arrays, in order."""
        request = pb_utils.InferenceRequest(
            model_name=model,
            requested_output_names=list(outputs),
            inputs=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in inputs.items()],
            **self.request_options,
        )
        response = request.exec()
        if response.has_error():
            raise RequestError(f"{stage} ({model}) failed: {response.error().message()}", invalid_argument=False)
        return [pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs]

    def inputs(self, request):
        tensors = ((name, pb_utils.get_input_tensor_by_name(request, name)) for name in self.input_names)
        return {name: tensor.as_numpy() for name, tensor in tensors if tensor is not None}

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                outputs = self.segment(self.inputs(request))
                tensors = [pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in outputs.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except RequestError as exc:
                error = triton_error(first_line(exc), exc.invalid_argument)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
            except Exception as exc:  # never take the server down on one request
                message = f"{self.kind} internal error: {type(exc).__name__}: {first_line(exc)}"
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=triton_error(message, False)))
        return responses
