"""The client transport's interface over BLS calls: the client's rule code, unchanged, inside Triton.

``client/transport.py``'s ``TritonTransport`` sends pipeline requests over gRPC; this class has the
same methods (``family``, ``run``, ``infer``, ``embed``, ``decode``, ``close``) and sends them with
the ``call(stage, model, inputs, outputs)`` of ``bls.BlsModel`` (``pb_utils.InferenceRequest``)
instead, so ``api.segment_image`` and the rule sets run on the server exactly as in the CLI.
Triton-free itself (the call is injected), so tests run it in process too.

Requests run one after another: on the cpu target the pipeline has one instance, so a second
request in flight would only queue there. ``infer`` may be called from several threads (the grid
rules send two frames at a time); BLS requests are independent, so it needs no lock.
"""

import numpy as np

from cellsam_triton.client.transport import _decoder_inputs, _embed_batch, to_result
from cellsam_triton.contracts import NAMES

STAGE = "segmentation"  # a failed call reads "segmentation (<model>) failed: ..."


class BlsTransport:
    """Pipeline and composing-model requests of one ``family`` (a cellsam_triton.contracts.Family)."""

    def __init__(self, family, call):
        self.family = family
        self.model = family.pipeline_name
        self._call = call

    def infer(self, model, arrays, spec):
        """One request to any served model; returns its outputs by name."""
        names = [t.name for t in spec.outputs]
        inputs = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
        return dict(zip(names, self._call(STAGE, model, inputs, names)))

    def run(self, requests):
        """Pipeline requests in, ``PipelineResult``s out in the same order."""
        spec = self.family.pipeline()
        return [to_result(self.infer(self.model, request, spec)) for request in requests]

    def embed(self, image):
        """Encoder alone: image [3,s,s] or [B,3,s,s] (already normalised) -> embeddings [B,D,e,e]."""
        spec = self.family.encoder()
        return self.infer(spec.name, {NAMES.image: _embed_batch(image)}, spec)[NAMES.image_embeddings]

    def decode(self, embeddings, boxes):
        """Decoder alone: one embedding and [N,4] xyxy boxes -> (low_res_masks [N,1,m,m], iou [N,1])."""
        spec = self.family.decoder()
        out = self.infer(spec.name, _decoder_inputs(embeddings, boxes), spec)
        return out[NAMES.low_res_masks], out[NAMES.iou_predictions]

    def close(self):
        """Nothing to release (the BLS requests belong to the model instance)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
