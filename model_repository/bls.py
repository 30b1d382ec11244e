"""BLS glue shared by the Python pipelines (pipeline.py, grid_pipeline.py): call a composing model.

Copied by export/repository.py beside each pipeline's model.py. Needs only numpy and Triton's
``triton_python_backend_utils``; a failed call raises :class:`ComposingModelError` naming the
stage and the model, which each pipeline answers as a (non INVALID_ARGUMENT) TritonError.
"""

import numpy as np
import triton_python_backend_utils as pb_utils


class ComposingModelError(Exception):
    """A composing model (encoder, detector, decoder) answered with an error."""


def request_options():
    """Keyword arguments of every BLS request: outputs in CPU memory where the backend allows it."""
    memory = getattr(pb_utils, "PreferredMemory", None)
    return {"preferred_memory": memory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)} if memory is not None else {}


def call(stage, model, inputs, outputs, options=None):
    """Run ``model`` on named numpy ``inputs``; its ``outputs`` as numpy arrays, in that order."""
    request = pb_utils.InferenceRequest(
        model_name=model,
        requested_output_names=list(outputs),
        inputs=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in inputs.items()],
        **(options or {}),
    )
    response = request.exec()
    if response.has_error():
        raise ComposingModelError(f"{stage} ({model}) failed: {response.error().message()}")
    return [pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs]
