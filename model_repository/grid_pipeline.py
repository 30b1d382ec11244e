"""Triton Python BLS model: detector-free segmentation of one image with a grid of point prompts.

Copied by export/grid_repository.py to ``<family>_grid/1/model.py`` with grid_generator.py,
grid_masks.py, raster.py, contracts.py, request_checks.py and bls.py (the base shared with
pipeline.py) beside it (numpy + scipy). Config parameter ``family`` (Family JSON; its ``grid``
rules are the defaults of the per-request inputs). This file checks the request; the rules
themselves (CellSeg1's automatic mask generation) are grid_generator.GridGenerator. Outputs
follow the box pipeline's contract; masks are decided at logit 0 (after clean-up).
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bls  # noqa: E402
import grid_generator  # noqa: E402
from contracts import NAMES  # noqa: E402
from request_checks import RequestError, check, in_range, required, scalar  # noqa: E402

MAX_POINTS_PER_SIDE = 128
MAX_CROP_LAYERS = 2


class TritonPythonModel(bls.BlsModel):
    kind = "grid pipeline"

    def setup(self, family, parameters):
        self.size = family.input_size
        self.generator = grid_generator.GridGenerator(family, self.call)
        self.rules = family.grid

    def segment(self, inputs):
        """Check the request: image, valid size, points per side, IoU / stability thresholds, crop layers."""
        s, rules = self.size, self.rules
        image = required(inputs, NAMES.image, np.float32, (1, 3, s, s))
        valid = inputs.get(NAMES.valid_size)
        height, width = (s, s) if valid is None else (int(v) for v in check(NAMES.valid_size, valid, np.int32, (2,)))
        if not (1 <= height <= s and 1 <= width <= s):
            raise RequestError(f"input '{NAMES.valid_size}' must lie in [1, {s}], got {[height, width]}")
        n = in_range(NAMES.points_per_side, scalar(inputs, NAMES.points_per_side, np.int32, rules.points_per_side),
                     1, MAX_POINTS_PER_SIDE)
        t_iou = scalar(inputs, NAMES.pred_iou_threshold, np.float32, float(rules.pred_iou_threshold))
        t_stab = scalar(inputs, NAMES.stability_threshold, np.float32, float(rules.stability_threshold))
        layers = in_range(NAMES.crop_n_layers, scalar(inputs, NAMES.crop_n_layers, np.int32, rules.crop_n_layers),
                          0, MAX_CROP_LAYERS)
        return self.generator.segment(image, (height, width), n, t_iou, t_stab, layers)
