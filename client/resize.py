"""Bilinear resizing as PyTorch does it, written as per-axis weight matrices (numpy only).

Two kernels, both with ``align_corners=False`` geometry (pixel centres at ``i + 0.5``):

- plain bilinear (``F.interpolate(mode="bilinear")``): two taps, the source coordinate clamped
  at 0 and the last pixel repeated past the end; it aliases when shrinking.
- antialiased bilinear (``antialias=True``, torchvision v2 ``Resize``' default on tensors, and
  PIL's): a triangle filter whose support grows with the shrink factor, taps normalised to sum
  to 1. When enlarging it equals plain bilinear.

A resize is a product ``Wy @ image @ Wx.T``; composing two resizes multiplies their matrices,
which is how SAM's two-step mask up-sampling becomes one small matrix per axis.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterator

import numpy as np

from cellsam_triton.errors import UserError
from cellsam_triton.model_repository.raster import linear_weights


@lru_cache(maxsize=32)
def _antialias_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps of PyTorch's antialiased bilinear kernel: first index [n_out,K], float32 weights [n_out,K].

    Computed with PyTorch's float32/float64 mix step for step, so the weights are bit-identical.
    """
    f32 = np.float32
    scale = f32(f32(n_in) / f32(n_out))
    support = scale if scale >= 1.0 else f32(1.0)
    inv = f32(f32(1.0) / scale) if scale >= 1.0 else f32(1.0)
    rows = []
    for i in range(n_out):
        centre = f32(float(scale) * (i + 0.5))
        lo = max(int(float(f32(centre - support)) + 0.5), 0)
        hi = min(int(float(f32(centre + support)) + 0.5), n_in)
        distance = [abs(f32((float(f32(f32(lo + j) - centre)) + 0.5) * float(inv))) for j in range(hi - lo)]
        weights = [f32(1.0) - d if d < 1.0 else f32(0.0) for d in distance]
        total = f32(0.0)
        for w in weights:
            total = f32(total + w)
        rows.append((lo, [w / total if total != 0.0 else w for w in weights]))
    width = max(len(w) for _, w in rows)
    first = np.array([lo for lo, _ in rows], np.int64)
    table = np.zeros((n_out, width), np.float32)
    for i, (_, w) in enumerate(rows):
        table[i, : len(w)] = w
    return first, table


def _linear_source(n_in: int, n_out: int) -> np.ndarray:
    """Plain bilinear's source coordinate of each output pixel, in float32 as PyTorch computes
    them for float32 tensors: far from the origin their rounding moves the taps by up to ~1e-4 of
    a pixel, which shows in logits."""
    half = np.float32(0.5)
    return np.float32(n_in) / np.float32(n_out) * (np.arange(n_out, dtype=np.float32) + half) - half


def resize_weights(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """Weights [n_out, n_in] (float64 holding PyTorch's float32 weights) of a 1-D resize n_in -> n_out."""
    if n_in < 1 or n_out < 1:
        raise UserError(f"cannot resize {n_in} pixels to {n_out}")
    if not antialias:
        return linear_weights(_linear_source(n_in, n_out), n_in)
    weights = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    first, table = _antialias_taps(n_in, n_out)
    for k in range(table.shape[1]):
        np.add.at(weights, (rows, np.minimum(first + k, n_in - 1)), table[:, k])
    return weights


def _antialias_last_axis(x: np.ndarray, n_out: int) -> np.ndarray:
    """PyTorch's float32 antialiased pass along the last axis, bit for bit.

    Taps are summed in order with fused multiply-adds (PyTorch's compiled CPU kernel); a float64
    product and sum rounded to float32 after each tap gives the same result.
    """
    first, table = _antialias_taps(x.shape[-1], n_out)
    last = x.shape[-1] - 1
    total = (x[..., first] * table[:, 0]).astype(np.float64)  # first tap: a plain float32 product
    for k in range(1, table.shape[1]):
        total += x[..., np.minimum(first + k, last)].astype(np.float64) * table[:, k]
        total = total.astype(np.float32).astype(np.float64)
    return total.astype(np.float32)


def resize(image: np.ndarray, size: tuple[int, int], antialias: bool, channels_last: bool = False) -> np.ndarray:
    """Resize the last two axes (or H,W of an HWC array with ``channels_last``) to ``size``.

    Float32 input gives float32 (antialiased: bit-identical to PyTorch on CPU); anything else
    is computed in float64. An axis whose length does not change is left untouched, as
    torchvision does. Width is resized first, then height: PyTorch's order.
    """
    array = np.asarray(image)
    if channels_last:
        return np.moveaxis(resize(np.moveaxis(array, -1, 0), size, antialias), 0, -1)
    exact = antialias and array.dtype == np.float32
    dtype = np.float32 if array.dtype == np.float32 else np.float64
    out = array.astype(dtype, copy=False)
    height, width = out.shape[-2:]
    if width != size[1]:
        if exact:
            out = _antialias_last_axis(out, size[1])
        else:
            out = out @ resize_weights(width, size[1], antialias).T.astype(dtype)
    if height != size[0]:
        if exact:
            out = np.moveaxis(_antialias_last_axis(np.moveaxis(out, -1, -2), size[0]), -1, -2)
        else:
            out = resize_weights(height, size[0], antialias).astype(dtype) @ out
    return out


def mask_upsample_weights(low_res: int, input_size: int, n_out: int) -> np.ndarray:
    """SAM's postprocess_masks along one axis: bilinear low_res -> input_size -> n_out, [n_out, low_res].

    The frame is square and unpadded (the whole image was stretched to ``input_size``), so the
    crop between the two steps keeps everything.
    """
    first = resize_weights(low_res, input_size, antialias=False)
    second = resize_weights(input_size, n_out, antialias=False)
    return second @ first


def mask_logits_to_image(low_res: np.ndarray, input_size: int, out_hw: tuple[int, int]) -> np.ndarray:
    """Low-resolution mask logits [N,m,m] -> [N,H,W] float32 logits at image size (all at once)."""
    masks = np.asarray(low_res, np.float32)
    wy = mask_upsample_weights(masks.shape[-2], input_size, out_hw[0]).astype(np.float32)
    wx = mask_upsample_weights(masks.shape[-1], input_size, out_hw[1]).astype(np.float32)
    return wy @ masks @ wx.T


MaskBlock = tuple[slice, slice, np.ndarray]


def iter_mask_logits(
    low_res: np.ndarray, input_size: int, out_hw: tuple[int, int], above: float = -math.inf
) -> Iterator[MaskBlock]:
    """Memory-light `mask_logits_to_image`: one ``(rows, cols, logits)`` block per mask, in order.

    The block covers every pixel whose logit may exceed ``above``; every pixel outside it is
    <= ``above`` (up-sampled values are convex combinations of low-resolution ones). With the
    default every block is the whole image. A mask with nothing above gives an empty block.
    """
    masks = np.asarray(low_res)
    wy = mask_upsample_weights(masks.shape[-2], input_size, out_hw[0]).astype(np.float32)
    wx = mask_upsample_weights(masks.shape[-1], input_size, out_hw[1]).astype(np.float32)
    reach_y, reach_x = wy != 0, wx != 0
    for mask in masks:
        mask = mask.astype(np.float32)
        hot = mask > above
        rows = _reach(hot.any(axis=1), reach_y)
        cols = _reach(hot.any(axis=0), reach_x)
        if rows.stop <= rows.start or cols.stop <= cols.start:
            yield rows, cols, np.zeros((0, 0), np.float32)
            continue
        yield rows, cols, wy[rows] @ mask @ wx[cols].T


def _reach(hot: np.ndarray, reach: np.ndarray) -> slice:
    """Output rows [start, stop) that take any weight from the low-resolution rows marked ``hot``."""
    touched = np.flatnonzero(reach[:, hot].any(axis=1)) if hot.any() else np.zeros(0, np.int64)
    if touched.size == 0:
        return slice(0, 0)
    return slice(int(touched[0]), int(touched[-1]) + 1)
