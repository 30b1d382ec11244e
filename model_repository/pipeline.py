"""Triton Python BLS model: one image in, cells (boxes, scores, mask logits) out.

Copied by the repository renderer to ``<family>/1/model.py`` with box_pipeline.py (the steps),
selection.py, roi_windows.py, contracts.py, request_checks.py and bls.py (the base shared with
grid_pipeline.py) beside it; numpy + scikit-learn. Config parameters: ``family`` (Family JSON:
names, tensor contract, thresholds, NMS), ``max_prompts`` (given boxes per request, optional).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bls  # noqa: E402
import box_pipeline  # noqa: E402


class TritonPythonModel(bls.BlsModel):
    kind = "pipeline"

    def setup(self, family, parameters):
        self.pipeline = box_pipeline.BoxPipeline(
            family, self.call, max_prompts=int(parameters.get("max_prompts", box_pipeline.DEFAULT_MAX_PROMPTS)))

    def segment(self, inputs):
        return self.pipeline.segment(inputs)
