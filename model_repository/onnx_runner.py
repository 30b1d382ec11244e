"""Triton Python-backend model that runs one ONNX file with ONNX Runtime on CPU.

Copied by the repository renderer to ``<model>/1/model.py``; self-contained (numpy + onnxruntime).
Config parameters: ``onnx_file`` (default model.onnx), ``intra_op_threads`` (0 = all cores),
``inter_op_threads``, ``allow_spinning`` ("0": idle intra-op threads sleep at once instead of
spinning, so a model that just ran does not take the cores from the next one in another process),
``sample_wise`` ("1": a batched model runs each sample of a batch in its own session call, so a
sample's output does not depend on what it was batched with; the INT8 encoder quantises its
activations with one scale per call, and even FP32 kernels round differently by batch size).
Every request is checked against the model config (names, dtypes, shapes)
before anything runs, inputs must agree on the axes the ONNX graph names alike (the ROI decoder's
windows, origins and boxes on "boxes") and no input may be empty (zero prompts); a bad request gets
a TritonError (INVALID_ARGUMENT) and the others in the batch still run.
Requests of a dynamically batched model are concatenated on axis 0 and run in one session call
(sample by sample with ``sample_wise``).
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

NUMPY_DTYPES = {
    "TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64, "TYPE_UINT8": np.uint8, "TYPE_BOOL": np.bool_,
}


class RequestError(Exception):
    """A request that does not match the model config."""


def _tensor_specs(entries):
    return [
        (e["name"], np.dtype(NUMPY_DTYPES[e["data_type"]]), [int(d) for d in e["dims"]], bool(e.get("optional", False)))
        for e in entries
    ]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.name = config["name"]
        self.max_batch = int(config.get("max_batch_size", 0))
        self.sample_wise = self.max_batch > 0 and params.get("sample_wise", "0") == "1"
        self.inputs = _tensor_specs(config["input"])
        self.outputs = _tensor_specs(config["output"])
        path = os.path.join(args["model_repository"], args["model_version"], params.get("onnx_file", "model.onnx"))
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"{self.name}: ONNX file not found: {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", 0))
        options.inter_op_num_threads = int(params.get("inter_op_threads", 1))
        options.add_session_config_entry("session.intra_op.allow_spinning", params.get("allow_spinning", "1"))
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        wanted_in = {n for n, _, _, optional in self.inputs if not optional}
        if not wanted_in <= graph_inputs:
            raise pb_utils.TritonModelException(
                f"{self.name}: ONNX inputs {sorted(graph_inputs)} lack config inputs {sorted(wanted_in - graph_inputs)}"
            )
        unfed = graph_inputs - {n for n, _, _, _ in self.inputs}
        if unfed:
            raise pb_utils.TritonModelException(f"{self.name}: ONNX inputs {sorted(unfed)} are not in the config")
        missing_out = {n for n, _, _, _ in self.outputs} - graph_outputs
        if missing_out:
            raise pb_utils.TritonModelException(f"{self.name}: ONNX outputs {sorted(graph_outputs)} lack {sorted(missing_out)}")
        self.graph_inputs = graph_inputs
        # axes the graph names (its dynamic axes, e.g. every input's "boxes"): one size per name
        self.named_axes = {i.name: [d if isinstance(d, str) else None for d in i.shape] for i in self.session.get_inputs()}

    def _check_named_axes(self, arrays):
        """Inputs whose axes the ONNX graph gives one name must agree on that axis' size."""
        seen = {}
        for name, array in arrays.items():
            for axis, symbol in enumerate(self.named_axes.get(name, ())):
                if symbol is None or axis >= array.ndim:
                    continue
                first = seen.setdefault(symbol, (name, axis, array.shape[axis]))
                if first[2] != array.shape[axis]:
                    raise RequestError(f"{self.name}: input '{name}' has {array.shape[axis]} on axis {axis} and input "
                                       f"'{first[0]}' {first[2]} on axis {first[1]}; both are axis '{symbol}' and must agree")

    def _request_arrays(self, request):
        """Named input arrays of one request, validated against the config."""
        arrays = {}
        for name, dtype, dims, optional in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                if optional:
                    continue
                raise RequestError(f"{self.name}: missing input '{name}'")
            array = tensor.as_numpy()
            if array.dtype != dtype:
                raise RequestError(f"{self.name}: input '{name}' has dtype {array.dtype}, expected {dtype}")
            if array.size == 0:  # ONNX Runtime would fail on it (zero prompts: a reshape of nothing)
                raise RequestError(f"{self.name}: input '{name}' is empty (shape {list(array.shape)}); send at least one")
            expected = ([-1] if self.max_batch > 0 else []) + dims
            shape_ok = array.ndim == len(expected) and all(e in (-1, a) for e, a in zip(expected, array.shape))
            if not shape_ok:
                raise RequestError(f"{self.name}: input '{name}' has shape {list(array.shape)}, expected {expected}")
            if self.max_batch > 0 and not 1 <= array.shape[0] <= self.max_batch:
                raise RequestError(f"{self.name}: batch {array.shape[0]} outside 1..{self.max_batch}")
            arrays[name] = array
        sizes = {a.shape[0] for a in arrays.values()} if self.max_batch > 0 else set()
        if len(sizes) > 1:
            raise RequestError(f"{self.name}: inputs disagree on the batch size: {sorted(sizes)}")
        arrays = {k: v for k, v in arrays.items() if k in self.graph_inputs}
        self._check_named_axes(arrays)
        return arrays

    def _run(self, arrays):
        names = [n for n, _, _, _ in self.outputs]
        batch = next(iter(arrays.values())).shape[0] if self.sample_wise else 1
        if batch > 1:  # sample_wise: one session call a sample
            parts = [self.session.run(names, {k: v[i:i + 1] for k, v in arrays.items()}) for i in range(batch)]
            results = [np.concatenate(outputs) for outputs in zip(*parts)]
        else:
            results = self.session.run(names, arrays)
        return {n: np.ascontiguousarray(r.astype(dtype, copy=False)) for (n, dtype, _, _), r in zip(self.outputs, results)}

    def _respond(self, outputs):
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, a) for n, a in outputs.items()])

    @staticmethod
    def _error(message, invalid_argument=False):
        """An error response; the caller's mistakes carry INVALID_ARGUMENT where this backend knows the code."""
        code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if invalid_argument else None
        error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
        return pb_utils.InferenceResponse(output_tensors=[], error=error)

    def execute(self, requests):
        responses = [None] * len(requests)
        valid = []
        for i, request in enumerate(requests):
            try:
                valid.append((i, self._request_arrays(request)))
            except RequestError as exc:
                responses[i] = self._error(str(exc), invalid_argument=True)
        if self.max_batch > 0 and len(valid) > 1:
            groups = [valid]  # one session call for the whole dynamic batch
        else:
            groups = [[item] for item in valid]
        for group in groups:
            try:
                arrays = {k: np.concatenate([a[k] for _, a in group]) for k in group[0][1]}
                outputs = self._run(arrays)
            except Exception as exc:  # ONNX Runtime failure: answer, stay up
                for i, _ in group:
                    responses[i] = self._error(f"{self.name}: ONNX Runtime failed: {str(exc).splitlines()[0]}")
                continue
            start = 0
            for i, a in group:
                if len(group) == 1:
                    responses[i] = self._respond(outputs)
                    continue
                size = next(iter(a.values())).shape[0]
                responses[i] = self._respond({n: o[start:start + size] for n, o in outputs.items()})
                start += size
        return responses

    def finalize(self):
        self.session = None
