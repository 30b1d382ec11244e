"""Raster helpers shared by the client, the trainers and the server glue (numpy + scipy only, so
the grid pipeline imports it inside Triton's Python backend; the project imports it as
``cellsam_triton.model_repository.raster``):

  label_boxes     boxes of the objects of a label image (pixel extent, or inclusive corners)
  mask_boxes      boxes of a stack of boolean masks
  linear_weights  two-tap linear interpolation weights at given source coordinates
"""

import numpy as np
from scipy import ndimage


def label_boxes(labels, min_area=1, inclusive=False):
    """[N,4] float32 boxes x0,y0,x1,y1 of the objects of an integer label image with at least
    ``min_area`` pixels, in label order. x1/y1 exclusive (the pixel extent), or with ``inclusive``
    the index of the last pixel."""
    labels = np.asarray(labels)
    end = 1 if inclusive else 0
    areas = np.bincount(labels.ravel().astype(np.intp)) if min_area > 1 else None
    boxes = [
        (s[1].start, s[0].start, s[1].stop - end, s[0].stop - end)
        for value, s in enumerate(ndimage.find_objects(labels), start=1)
        if s is not None and (areas is None or areas[value] >= min_area)
    ]
    return np.asarray(boxes, np.float32).reshape(-1, 4)


def mask_boxes(masks):
    """[N,4] float32 xyxy extent (x1/y1 exclusive) of boolean masks [N,H,W]; zeros for empty masks."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if rows.size:
            boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def linear_weights(source, n_in):
    """Weights [len(source), n_in] (float64) of linear interpolation at source coordinates
    ``source`` (pixel indices, any float dtype; the arithmetic stays in that dtype, so float32
    coordinates give PyTorch's float32 bilinear taps). Below 0 the first pixel is taken; at and
    past the last one both taps point at it (weights 1 - f and f), as PyTorch's kernel does."""
    source = np.maximum(np.asarray(source), 0)
    left = np.minimum(source.astype(np.int64), n_in - 1)
    right = np.minimum(left + 1, n_in - 1)
    frac = np.clip(source - left.astype(source.dtype), 0, 1)
    weights = np.zeros((len(source), n_in), np.float64)
    rows = np.arange(len(source))
    np.add.at(weights, (rows, left), 1 - frac)
    np.add.at(weights, (rows, right), frac)
    return weights
