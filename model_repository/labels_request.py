"""One ``<family>_labels`` request, free of Triton: check the inputs, run the client's rule code,
pack the label image and the cell table.

The segmentation itself is ``cellsam_triton.client.api.segment_image``, the very function behind
``cellsam-triton segment`` and ``Segmenter.segment`` (normalisation, tiling, auto-scale,
up-sampling, thresholds, overlaps, clean-up), with a transport that reaches the pipeline by BLS
(bls_transport.py). What is checked here is only what the wire adds: which image input is
given, its pixel type, shape, size and values, the optional settings and their ranges. Every
problem is a one-line RequestError (INVALID_ARGUMENT) naming the input.
"""

import numpy as np

from cellsam_triton.client.api import rule_set, segment_image
from cellsam_triton.client.autoscale import MAX_SCALE
from cellsam_triton.client.grid_rules import GridOptions
from cellsam_triton.client.points import PAD_LABEL, point_prompts
from cellsam_triton.client.types import SegmentOptions
from cellsam_triton.contracts import CELL_COLUMNS, LABELS_MAX_BOXES, LABELS_MAX_PIXELS, MAX_PROMPT_POINTS, NAMES, TTA_VIEWS
from cellsam_triton.errors import UserError

try:  # a package in the project, loose files beside model.py inside Triton
    from .request_checks import RequestError, check, in_range, scalar
except ImportError:
    from request_checks import RequestError, check, in_range, scalar

# tensor name -> its pixel type; a request carries exactly one of them
IMAGE_INPUTS = {NAMES.image: np.uint8, NAMES.image_uint16: np.uint16, NAMES.image_fp32: np.float32}
MAX_CHANNELS = 3
ALPHA_CHANNELS = 4  # RGBA: the alpha channel is dropped, as `segment` drops a PNG's
MAX_POINTS_PER_SIDE = 128  # the grid pipeline's own limits
MAX_CROP_LAYERS = 2


def load_rules(family):
    """Import the family's rule module now, so a package missing in the backend fails the model's
    load rather than its first request."""
    rule_set(family)


def image_input(inputs):
    """(name, array) of the one image input: [H, W, C], 1 <= C <= 3 (C = 4: RGBA, alpha dropped), at
    most LABELS_MAX_PIXELS, finite.

    As ``segment`` reads image files, the channel axis is the smallest one (first on a tie), so a
    channels-first [C, H, W] array is read the same way; H and W are the other two axes.
    """
    given = [name for name in IMAGE_INPUTS if inputs.get(name) is not None]
    if len(given) != 1:
        names = ", ".join(f"'{name}'" for name in IMAGE_INPUTS)
        raise RequestError(f"give exactly one image input of {names}; got {len(given)}")
    name = given[0]
    array = inputs[name]
    if array.dtype != IMAGE_INPUTS[name]:
        raise RequestError(f"input '{name}' has dtype {array.dtype}, expected {np.dtype(IMAGE_INPUTS[name])}")
    if array.ndim != 3 or min(array.shape) > ALPHA_CHANNELS:
        raise RequestError(f"input '{name}' has shape {list(array.shape)}, expected [H, W, C] with 1 <= C <= {MAX_CHANNELS} "
                           f"(or {ALPHA_CHANNELS}: RGBA)")
    if array.size == 0:
        raise RequestError(f"input '{name}' is empty (shape {list(array.shape)})")
    channel = int(np.argmin(array.shape))
    height, width = (n for axis, n in enumerate(array.shape) if axis != channel)
    if height < 2 or width < 2:
        raise RequestError(f"input '{name}' is {height}x{width} pixels; at least 2x2 are needed")
    if height * width > LABELS_MAX_PIXELS:
        raise RequestError(f"input '{name}' is {height}x{width} = {height * width} pixels, more than the limit of "
                           f"{LABELS_MAX_PIXELS}; segment larger images window by window (`cellsam-triton segment --slide`)")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise RequestError(f"input '{name}' contains NaN or infinite values")
    if array.shape[channel] == ALPHA_CHANNELS:
        array = np.take(array, range(MAX_CHANNELS), axis=channel)
    return name, array


def _fraction(inputs, name):
    value = scalar(inputs, name, np.float32, None)
    return None if value is None else in_range(name, value, 0.0, 1.0)


def segment_options(inputs):
    """SegmentOptions of the optional inputs (None: the family's default, as the CLI leaves them)."""
    iou = scalar(inputs, NAMES.iou_threshold, np.float32, None)  # any value; negative keeps every mask
    area = scalar(inputs, NAMES.min_cell_area, np.int32, None)
    if area is not None:
        in_range(NAMES.min_cell_area, area, 0, LABELS_MAX_PIXELS)
    scale = scalar(inputs, NAMES.scale, np.float32, None)
    if scale is not None and not 0.0 <= scale <= MAX_SCALE:
        raise RequestError(f"input '{NAMES.scale}' must be 0 (auto) or a factor in (0, {MAX_SCALE:g}], got {scale}")
    tta = scalar(inputs, NAMES.tta, np.int32, None)
    if tta is not None and tta not in TTA_VIEWS:
        raise RequestError(f"input '{NAMES.tta}' must be one of {', '.join(map(str, TTA_VIEWS))}, got {tta}")
    return SegmentOptions(_fraction(inputs, NAMES.bbox_threshold), iou, _fraction(inputs, NAMES.mask_threshold), area,
                          scale or None, tta)


def grid_options(inputs):
    """GridOptions of the optional grid inputs of a detector-free family (None: the served default)."""
    points = scalar(inputs, NAMES.points_per_side, np.int32, None)
    layers = scalar(inputs, NAMES.crop_n_layers, np.int32, None)
    return GridOptions(
        points_per_side=None if points is None else in_range(NAMES.points_per_side, points, 1, MAX_POINTS_PER_SIDE),
        pred_iou_threshold=_fraction(inputs, NAMES.pred_iou_threshold),
        stability_threshold=_fraction(inputs, NAMES.stability_threshold),
        crop_n_layers=None if layers is None else in_range(NAMES.crop_n_layers, layers, 0, MAX_CROP_LAYERS),
    )


def prompt_boxes(inputs):
    """The optional prompt boxes: FP32 [N, 4] xyxy in input pixels, finite, x1 > x0 and y1 > y0."""
    boxes = inputs.get(NAMES.boxes)
    if boxes is None:
        return None
    check(NAMES.boxes, boxes, np.float32, (-1, 4))
    if len(boxes) > LABELS_MAX_BOXES:
        raise RequestError(f"input '{NAMES.boxes}' has {len(boxes)} boxes, more than the limit of {LABELS_MAX_BOXES}")
    empty = np.flatnonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    if empty.size:
        raise RequestError(f"input '{NAMES.boxes}' row {int(empty[0])} has x1 <= x0 or y1 <= y0: {boxes[empty[0]].tolist()}")
    return boxes


GRID_SETTINGS = (NAMES.points_per_side, NAMES.pred_iou_threshold, NAMES.stability_threshold, NAMES.crop_n_layers)


def prompt_points(inputs):
    """The optional point prompts, one row per cell: ``point_coords`` FP32 [N, P, 2] xy in input
    pixels and ``point_labels`` FP32 [N, P] (1 positive, 0 negative, -1 padding after a row's points;
    absent: every point positive), as `segment --points` reads a CSV with a ``cell`` column."""
    coords, labels = inputs.get(NAMES.point_coords), inputs.get(NAMES.point_labels)
    if coords is None:
        if labels is not None:
            raise RequestError(f"input '{NAMES.point_labels}' needs the points themselves in '{NAMES.point_coords}'")
        return None
    check(NAMES.point_coords, coords, np.float32, (-1, -1, 2))
    cells, width = coords.shape[:2]
    if cells == 0 or width == 0:
        raise RequestError(f"input '{NAMES.point_coords}' is empty (shape {list(coords.shape)})")
    if cells > LABELS_MAX_BOXES:
        raise RequestError(f"input '{NAMES.point_coords}' has {cells} cells, more than the limit of {LABELS_MAX_BOXES}")
    if width > MAX_PROMPT_POINTS:
        raise RequestError(f"input '{NAMES.point_coords}' has {width} points a cell, at most {MAX_PROMPT_POINTS}")
    labels = np.ones((cells, width), np.float32) if labels is None else check(NAMES.point_labels, labels, np.float32, (cells, width))
    if not np.isin(labels, (1, 0, PAD_LABEL)).all():
        raise RequestError(f"input '{NAMES.point_labels}' values must be 1 (positive), 0 (negative) or {PAD_LABEL:g} (padding)")
    real = labels != PAD_LABEL
    misplaced = (np.diff(real.astype(np.int8), axis=1) > 0).any(axis=1) | ~real[:, 0]  # a point after padding, or none
    if misplaced.any():
        raise RequestError(f"input '{NAMES.point_labels}' row {int(np.flatnonzero(misplaced)[0])}: padding ({PAD_LABEL:g}) "
                           "must follow the cell's points, and a cell needs at least one point")
    rows, columns = np.nonzero(real)
    try:
        return point_prompts(coords[rows, columns], labels[rows, columns], cells=rows.tolist(), source=f"input '{NAMES.point_coords}'")
    except UserError as exc:
        raise RequestError(str(exc).strip().splitlines()[0]) from None


def cells_array(cells):
    """The cell table (rows keyed by CELL_COLUMNS) as FP32 [N, len(CELL_COLUMNS)]."""
    rows = [[row[column] for column in CELL_COLUMNS] for row in cells]
    return np.asarray(rows, np.float32).reshape(len(rows), len(CELL_COLUMNS))


def answer(inputs, family, transport):
    """The outputs of one request (named numpy arrays in, named numpy arrays out).

    ``family`` is the served cellsam_triton.contracts.Family, ``transport`` has the interface of
    the client's TritonTransport (``run``, ``infer``): a BlsTransport inside Triton.
    """
    _, image = image_input(inputs)
    options = segment_options(inputs)
    points = prompt_points(inputs)
    if points is not None:  # the CLI's --points: no detector, no grid
        other = [name for name in (NAMES.boxes, *GRID_SETTINGS) if inputs.get(name) is not None]
        if other:
            raise RequestError(f"input '{other[0]}' does not go with point prompts ('{NAMES.point_coords}'): give one kind of prompt")
        boxes, prompts, grid = None, "detector", None
    elif family.detector == "none":  # detector-free (CellSeg1): the CLI's --prompts grid
        boxes, prompts, grid = None, "grid", grid_options(inputs)
    else:
        boxes, prompts, grid = prompt_boxes(inputs), "detector", None
    try:
        result = segment_image(image, family, transport.run, transport.infer, boxes, options, prompts, grid, points)
    except UserError as exc:  # what the CLI would say about this image or setting
        lines = str(exc).strip().splitlines()
        raise RequestError(lines[0] if lines else type(exc).__name__) from None
    labels = np.ascontiguousarray(result.labels, np.uint32)
    return {NAMES.labels: labels, NAMES.cells: cells_array(result.cells)}
