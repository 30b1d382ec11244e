"""The "cellsam" rule set: CellSAM's pre- and post-processing, reproduced in numpy.

Each step follows the published `segment_cellular_image(img, model, normalize=True)` in the
same order and the same float precision, so a served CellSAM gives the reference label image:

normalise (per channel: clip at the 99.9th percentile of non-zero values, rescale to [0,1],
CLAHE) -> stretch to 1024x1024 (antialiased bilinear) -> two model inputs:

- segmenter: clip/rescale to the [0, 99.5] percentiles of all non-zero values, ImageNet
  mean/std, per-channel min-max (kornia, eps 1e-6), SAM's pixel mean/std divided by 255;
- detector: quantise to uint8 (floor of x*255), SAM's pixel mean/std on 0-255, ImageNet
  mean/std, per-channel min-max, an empty channel 1 or 2 filled from the other.

Masks come back as low-resolution logits, are up-sampled to the image, thresholded, painted
(later masks win), hole-filled and cleaned of small objects.
"""

from __future__ import annotations

import numpy as np
from skimage.exposure import equalize_adapthist, rescale_intensity

from cellsam_triton.contracts import NAMES, Family
from cellsam_triton.errors import UserError

from .images import to_channels_last3, validate_image
from .labels import cells_table, logit_threshold, paint_cells
from .resize import iter_mask_logits, resize
from .types import PipelineResult, RunRequests, Segmentation, SegmentOptions

CLIP_PERCENTILE = 99.9
CLAHE_KERNEL = 128
SEGMENTER_PERCENTILES = (0.0, 99.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)  # on 0-255
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
MINMAX_EPS = 1e-6


def normalize(image_hw3: np.ndarray) -> np.ndarray:
    """Per-channel 99.9th-percentile clip of non-zero values, rescale to [0,1], CLAHE (kernel 128).

    Computed in float64 like the reference; returned as float32, the precision the reference
    converts it to before the model. A constant channel (blank included) becomes 0.
    """
    height, width, channels = image_hw3.shape
    out = np.zeros((height, width, channels), np.float32)
    for c in range(channels):
        channel = image_hw3[:, :, c].astype(np.float64)
        nonzero = channel[channel != 0]
        if nonzero.size:
            top = np.percentile(nonzero, CLIP_PERCENTILE)
            channel[channel > top] = top
        else:
            channel[:] = 0.0  # an all-zero channel (also -0.0) stays zero
        if (channel == channel[0, 0]).all():
            continue
        channel = rescale_intensity(channel, out_range=(0.0, 1.0))
        out[:, :, c] = equalize_adapthist(channel, kernel_size=CLAHE_KERNEL)
    return out


def _stretch(norm: np.ndarray, size: int) -> np.ndarray:
    """[H,W,3] -> float32 [3,size,size], antialiased bilinear (torchvision v2 Resize)."""
    chw = np.ascontiguousarray(np.moveaxis(np.asarray(norm, np.float32), -1, 0))
    return resize(chw, (size, size), antialias=True)


def _affine(chw: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(x - mean) / std per channel in float32 (torch Normalize's arithmetic)."""
    m = np.asarray(mean, np.float32)[:, None, None]
    s = np.asarray(std, np.float32)[:, None, None]
    return (chw - m) / s


def _min_max(chw: np.ndarray) -> np.ndarray:
    """kornia normalize_min_max to [0,1] per channel: (x - min) / (max - min + eps), float32."""
    low = chw.min(axis=(1, 2), keepdims=True)
    high = chw.max(axis=(1, 2), keepdims=True)
    return (chw - low) / (high - low + np.float32(MINMAX_EPS))


def _sam_pixel_norm(chw: np.ndarray, div_255: bool) -> np.ndarray:
    """SAM's pixel mean/std step; with ``div_255`` both are divided by 255 in float32 first."""
    mean = np.asarray(SAM_PIXEL_MEAN, np.float32)
    std = np.asarray(SAM_PIXEL_STD, np.float32)
    if div_255:
        mean, std = mean / np.float32(255), std / np.float32(255)
    return (chw - mean[:, None, None]) / std[:, None, None]


def _percentile_rescale(chw: np.ndarray) -> np.ndarray:
    """Clip to the [0, 99.5] percentiles of all non-zero values and rescale (skimage semantics)."""
    nonzero = chw[chw != 0]
    if nonzero.size == 0:
        return chw  # the reference would crash here; an empty image stays empty
    low, high = np.percentile(nonzero, SEGMENTER_PERCENTILES)
    return rescale_intensity(chw, in_range=(low, high), out_range="float32")


def segmenter_input(norm: np.ndarray, size: int = 1024) -> np.ndarray:
    """What the segmenter's first layer sees: float32 [1,3,size,size] from a normalised [H,W,3]."""
    x = _percentile_rescale(_stretch(norm, size))
    x = _min_max(_affine(x, IMAGENET_MEAN, IMAGENET_STD))
    return _sam_pixel_norm(x, div_255=True)[None].astype(np.float32, copy=False)


def detector_input(norm: np.ndarray, size: int = 1024) -> np.ndarray:
    """What CellFinder sees: float32 [1,3,size,size] from a normalised [H,W,3]."""
    x = _stretch(norm, size)
    quantised = np.clip(x * np.float32(255), 0, 255).astype(np.uint8)  # ToPILImage: floor
    x = _sam_pixel_norm(quantised.astype(np.float32), div_255=False)
    x = _min_max(_affine(x, IMAGENET_MEAN, IMAGENET_STD))
    if x[1].max() == 0:  # ToRGB: fill an empty channel from the other, 1 first
        x[1] = x[2]
    if x[2].max() == 0:
        x[2] = x[1]
    return x[None].astype(np.float32, copy=False)


def boxes_to_model(boxes_xyxy: np.ndarray, image_hw: tuple[int, int], size: int = 1024) -> np.ndarray:
    """Boxes xyxy in input pixels -> float32 xyxy in the stretched size x size frame."""
    scale = np.array([size / image_hw[1], size / image_hw[0]] * 2, np.float64)
    return (np.asarray(boxes_xyxy, np.float64).reshape(-1, 4) * scale).astype(np.float32)


def boxes_to_image(boxes_xyxy: np.ndarray, image_hw: tuple[int, int], size: int = 1024) -> np.ndarray:
    """Inverse of `boxes_to_model`: float32 xyxy in the model frame -> input pixels."""
    scale = np.array([image_hw[1] / size, image_hw[0] / size] * 2, np.float64)
    return (np.asarray(boxes_xyxy, np.float64).reshape(-1, 4) * scale).astype(np.float32)


def build_request(
    norm: np.ndarray, boxes: np.ndarray | None, bbox_threshold: float, iou_threshold: float, size: int
) -> dict[str, np.ndarray]:
    """One pipeline request: the detector image is sent only when no prompt boxes are given."""
    request = {NAMES.image: segmenter_input(norm, size)}
    if boxes is None:
        request[NAMES.detector_image] = detector_input(norm, size)
    else:
        request[NAMES.boxes] = boxes_to_model(boxes, norm.shape[:2], size)
    request[NAMES.bbox_threshold] = np.array([bbox_threshold], np.float32)
    request[NAMES.iou_threshold] = np.array([iou_threshold], np.float32)
    return request


def segment(
    image: np.ndarray,
    run: RunRequests,
    family: Family,
    boxes: np.ndarray | None,
    options: SegmentOptions,
) -> Segmentation:
    """Segment one image with a served CellSAM pipeline; ``boxes`` xyxy in input pixels or None."""
    if options.scale not in (None, 1.0):
        raise UserError("--scale applies to tiled models (cellsam_lite); CellSAM resizes every image to 1024")
    image = validate_image(image, "image")
    norm = normalize(to_channels_last3(image))
    height, width = norm.shape[:2]
    options = options.resolved(family)
    request = build_request(
        norm,
        boxes,
        options.bbox_threshold,
        options.iou_threshold,
        family.input_size,
    )
    return paint_frame(run([request])[0], family, (height, width), options)


def paint_frame(
    result: PipelineResult, family: Family, shape: tuple[int, int], options: SegmentOptions,
    seeds: list[np.ndarray] | None = None,
) -> Segmentation:
    """The label image of one stretched frame's masks: up-sampled to ``shape``, thresholded,
    painted in order (later masks win; with point ``seeds`` per mask, ``labels.paint_seeded``),
    cleaned (``options`` resolved)."""
    cut = logit_threshold(options.mask_threshold)
    blocks = iter_mask_logits(result.masks, family.input_size, shape, above=cut)
    labels, index = paint_cells(blocks, shape, cut, options.min_cell_area, seeds)
    scores = np.asarray(result.scores, np.float64)[index]
    return Segmentation(labels, cells_table(labels, scores))
