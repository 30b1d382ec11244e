"""Client side of point prompts (``segment --points``, ``Segmenter.segment(image, points=...)``).

Each prompt (one cell: its positive and negative points, client/points.py) is decoded by the
served ``<family>_point_decoder`` on the image embedding of the frame that holds it; the encoder
runs once a frame. Frames and masks follow the family's box rules:
  litemedsam  native-resolution tiles (as lite_rules): a cell goes to the tile a box with the
              extent of its points would go to (``lite_rules.assign_boxes``), its masks are
              painted as box masks are (``lite_rules.paint_tiles``); an explicit ``scale``
              resizes image and points as it resizes boxes.
  cellsam     CellSAM's 1024 stretch (as cellsam_rules), points scaled as boxes are.
  sam         CellSeg1's resized, zero-padded frame (as grid_rules), points scaled as SAM does.
Prompts of equal point count are decoded together, unpadded (a prompt's mask does not depend on
the others). A click says a cell lies under it: a prompt whose mask covers none of its positive
points (the decoder took the nucleus for background) or is below the minimum cell area is decoded
again by the family's box decoder on the same embedding, from boxes of ``FALLBACK_SIDES`` input
pixels centred on its first positive point (negative points play no part there), and takes the
mask that covers that point with the highest predicted IoU (``box_fallback``; its own mask stays
where none does). That mask is a second opinion: its logits are capped just above the mask cut, so
it takes no pixel another click's mask claims. Every mask is kept unless ``iou_threshold`` is given
(masks whose predicted IoU is below it are then dropped) and every cell's score is 1.0. Overlaps go
to the mask with the higher logit and each cell keeps the connected part that holds its points
(``labels.paint_seeded``): a neighbour's mask spilling over a clicked nucleus does not take it.

Test-time flips (``SegmentOptions.tta`` 2 or 4, any family): each frame is also encoded mirrored
(left-right; with 4 also top-bottom and both, the detector's views), every prompt is decoded on
each view with its points mirrored, and the views' mask logits (mirrored back) and predicted IoUs
are averaged (fallback boxes too, mirrored alike); ``tta`` encoder passes and point-decoder calls
a frame.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from cellsam_triton.contracts import NAMES, Family
from cellsam_triton.errors import UserError
from cellsam_triton.model_repository.selection import flip_view, mirror_points, unflip_boxes

from .autoscale import capped, check_scale, segment_rescaled
from .grid_rules import sam_frame, sam_upsample
from .images import to_channels_last3, validate_image
from .labels import cells_table, logit_threshold, paint_cells
from .lite_rules import assign_boxes, channels_last, paint_tiles
from .points import PointPrompts
from .tiles import family_tiles, lite_normalize, tile_input
from .transport import box_decoder_requests, joined_masks, point_decoder_requests
from .types import PipelineResult, Segmentation, SegmentOptions

if TYPE_CHECKING:
    from .grid_rules import Infer

MAX_IN_FLIGHT = 2  # tiles decoded at once
FALLBACK_SIDES = (10.0, 14.0, 20.0, 28.0, 40.0, 56.0)  # input pixels: boxes tried around a click its mask misses
FALLBACK_MARGIN = 1e-3  # a fallback mask's logits stay this close above the cut: it loses every overlap


def decode_prompts(infer: "Infer", family: Family, embeddings: np.ndarray, prompts: PointPrompts) -> tuple[np.ndarray, np.ndarray]:
    """(low-res logits [K,m,m], predicted IoU [K]) of K prompts on one embedding. Prompts of equal
    point count are decoded together without padding, so a prompt's mask does not depend on the
    other prompts of the request (padding tokens, label -1, would change it slightly)."""
    spec = family.point_decoder()
    m = family.low_res_size
    masks, ious = np.zeros((len(prompts), m, m), np.float32), np.zeros(len(prompts), np.float32)
    counts = (prompts.labels >= 0).sum(axis=1)  # padding is at the end of each prompt
    for count in np.unique(counts):
        rows = np.flatnonzero(counts == count)
        requests = point_decoder_requests(embeddings, prompts.coords[rows, :count], prompts.labels[rows, :count])
        low_res, iou = joined_masks([infer(spec.name, request, spec) for request in requests], m)
        masks[rows], ious[rows] = low_res[:, 0], iou[:, 0]
    return masks, ious


def embed_views(infer: "Infer", family: Family, frame: np.ndarray, views: int) -> np.ndarray:
    """Image embeddings [views,D,e,e] of the first ``views`` mirrors of one frame [1,3,s,s]
    (``selection.flip_view``), at most the encoder's batch a request."""
    encoder = family.encoder()
    mirrored = np.concatenate([flip_view(frame, view) for view in range(views)])
    step = max(1, family.encoder_batch)
    return np.concatenate([infer(encoder.name, {NAMES.image: mirrored[start:start + step]}, encoder)[NAMES.image_embeddings]
                           for start in range(0, views, step)])


def mean_over_views(embeddings: np.ndarray, decode) -> tuple[np.ndarray, np.ndarray]:
    """``decode(view, embedding [1,D,e,e])`` -> (mask logits [N,m,m] on that view, predicted IoU [N])
    for each mirrored view of ``embeddings`` (``embed_views``); the masks mirrored back, both averaged
    over the views (one view: as decoded)."""
    if len(embeddings) == 1:
        return decode(0, embeddings[:1])
    masks, ious = [], []
    for view, embedding in enumerate(embeddings):
        low_res, iou = decode(view, embedding[None])
        masks.append(flip_view(low_res, view))
        ious.append(iou)
    return np.mean(masks, axis=0, dtype=np.float32), np.mean(ious, axis=0, dtype=np.float32)


def decode_views(infer: "Infer", family: Family, embeddings: np.ndarray, prompts: PointPrompts) -> tuple[np.ndarray, np.ndarray]:
    """``decode_prompts`` on each mirrored view's embedding with the points mirrored alike, averaged
    (``mean_over_views``)."""
    def one(view: int, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        seen = prompts if view == 0 else dataclasses.replace(prompts, coords=mirror_points(prompts.coords, view, family.input_size))
        return decode_prompts(infer, family, embedding, seen)

    return mean_over_views(embeddings, one)


def decode_boxes(infer: "Infer", family: Family, embeddings: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The box decoder on each mirrored view's embedding with ``boxes`` [N,4] (frame) mirrored alike,
    averaged (``mean_over_views``): (mask logits [N,m,m], predicted IoU [N])."""
    spec = family.decoder()

    def one(view: int, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        requests = box_decoder_requests(embedding, unflip_boxes(boxes, view, family.input_size))
        low_res, iou = joined_masks([infer(spec.name, request, spec) for request in requests], family.low_res_size)
        return low_res[:, 0], iou[:, 0]

    return mean_over_views(embeddings, one)


def under_points(masks: np.ndarray, coords: np.ndarray, size: int) -> np.ndarray:
    """Mask logits [K,P] of masks [K,m,m] at each prompt's points [K,P,2] (xy, a ``size`` frame)."""
    m = masks.shape[-1]
    cells = np.clip(np.floor(coords * (m / size)).astype(np.int64), 0, m - 1)
    return masks[np.arange(len(masks))[:, None], cells[..., 1], cells[..., 0]]


def box_fallback(infer: "Infer", family: Family, embeddings: np.ndarray, prompts: PointPrompts, masks: np.ndarray,
                 ious: np.ndarray, cut: float, sides: np.ndarray, min_pixels: float = 0.0) -> np.ndarray:
    """In place on ``masks``/``ious``: each prompt whose mask misses its click (logits at most ``cut``
    under all its positive points, or fewer than ``min_pixels`` mask pixels above it: no cell would be
    left) takes the box decoder's mask (``decode_boxes``) of the box, among ``sides`` [S,2] (w, h in
    frame pixels) centred on its first positive point, whose mask covers that point (and has
    ``min_pixels``) with the highest predicted IoU, its logits capped at ``cut + FALLBACK_MARGIN`` (so
    it yields every contested pixel to the other masks); it keeps its own mask where no box does.
    Returns the indices of the prompts that changed."""
    positive = prompts.labels == 1
    covered = ((under_points(masks, prompts.coords, family.input_size) > cut) & positive).any(axis=1)
    missed = np.flatnonzero(~covered | ((masks > cut).sum(axis=(1, 2)) < min_pixels))
    if not missed.size:
        return missed
    centres = prompts.coords[missed, np.argmax(positive[missed], axis=1)]  # [n,2]
    half = np.asarray(sides, np.float32) / 2
    boxes = np.concatenate([centres[:, None] - half, centres[:, None] + half], axis=2)  # [n,S,4]
    low_res, iou = decode_boxes(infer, family, embeddings, boxes.reshape(-1, 4))
    at_centre = np.repeat(centres, len(sides), axis=0)[:, None]  # [n*S,1,2]
    large = (low_res > cut).sum(axis=(1, 2)) >= min_pixels
    covers = ((under_points(low_res, at_centre, family.input_size)[:, 0] > cut) & large).reshape(len(missed), len(sides))
    iou = iou.reshape(len(missed), len(sides))
    changed = []
    for row, k in enumerate(missed):
        if covers[row].any():
            best = int(np.argmax(np.where(covers[row], iou[row], -np.inf)))
            masks[k], ious[k] = np.minimum(low_res[row * len(sides) + best], cut + FALLBACK_MARGIN), iou[row, best]
            changed.append(k)
    return np.asarray(changed, np.int64)


def fallback_sides(scale: tuple[float, float]) -> np.ndarray:
    """``FALLBACK_SIDES`` as (w, h) [S,2] in a frame that is ``scale`` (x, y) times the input."""
    return np.asarray(FALLBACK_SIDES, np.float32)[:, None] * np.float32(scale)


def decode_frame(infer: "Infer", family: Family, frame: np.ndarray, prompts: PointPrompts, options: SegmentOptions,
                 scale: tuple[float, float]) -> PipelineResult:
    """Encoder, then the point decoder for ``prompts`` (in the frame's coordinates) on one frame
    [1,3,s,s], on ``options.tta`` mirrors of it (test-time flips; None or 1: the frame alone), then
    ``box_fallback`` for clicks their masks miss (the frame is ``scale`` (x, y) times the input: box
    sides and ``min_cell_area`` follow); the kept masks as a pipeline result (low-res logits, prompt
    extents as boxes)."""
    embeddings = embed_views(infer, family, frame, options.tta or 1)
    masks, ious = decode_views(infer, family, embeddings, prompts)
    per_input_pixel = (family.low_res_size / family.input_size) ** 2 * scale[0] * scale[1]  # low-res pixels
    box_fallback(infer, family, embeddings, prompts, masks, ious, logit_threshold(options.mask_threshold), fallback_sides(scale),
                 (options.min_cell_area or 0) * per_input_pixel)
    keep = np.flatnonzero(ious >= options.iou_threshold) if options.iou_threshold >= 0 else np.arange(len(ious))
    return PipelineResult(prompts.extents()[keep], np.ones(len(keep), np.float32), ious[keep], masks[keep], keep.astype(np.int32))


def _checked(prompts: PointPrompts, image: np.ndarray) -> np.ndarray:
    """``image`` (validated, channels last), once every point lies inside it."""
    prompts.check_inside(image.shape)
    return image


# --- litemedsam: native-resolution tiles ------------------------------------------------------------
def _tiles(image: np.ndarray, infer: "Infer", family: Family, prompts: PointPrompts, options: SegmentOptions,
           scale: float = 1.0) -> Segmentation:
    norm = lite_normalize(image)
    height, width = norm.shape[:2]
    tiles = family_tiles(family, height, width)
    jobs = [(tiles[k], indices) for k, indices in enumerate(assign_boxes(prompts.extents(), tiles)) if indices]

    def one(job) -> PipelineResult:
        tile, indices = job
        local = prompts.frame(offset=(tile.x0, tile.y0), indices=indices)
        return decode_frame(infer, family, tile_input(norm, tile), local, options, (scale, scale))

    with ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT) as pool:
        results = list(pool.map(one, jobs))
    seeds = [prompts.seeds([indices[k] for k in result.prompt_index]) for (_, indices), result in zip(jobs, results)]
    return paint_tiles([tile for tile, _ in jobs], results, (height, width), options, prompted=True, seeds=seeds)


def _lite(image: np.ndarray, infer: "Infer", family: Family, prompts: PointPrompts, options: SegmentOptions) -> Segmentation:
    image = _checked(prompts, channels_last(image))
    height, width = image.shape[:2]
    factor = 1.0 if options.scale is None else capped(float(options.scale), (height, width), family)
    if factor == 1.0:
        return _tiles(image, infer, family, prompts, options)

    def native(big: np.ndarray, _boxes: None, inner: SegmentOptions) -> Segmentation:
        scaled = prompts.frame(scale=(big.shape[1] / width, big.shape[0] / height))
        return _tiles(big, infer, family, scaled, inner, big.shape[1] / width)

    return segment_rescaled(native, image, factor, None, options)


# --- cellsam and sam: one frame ---------------------------------------------------------------------
def _cellsam(image: np.ndarray, infer: "Infer", family: Family, prompts: PointPrompts, options: SegmentOptions) -> Segmentation:
    from .cellsam_rules import normalize, paint_frame, segmenter_input  # scikit-image: only for this family

    image = _checked(prompts, to_channels_last3(image))
    height, width = image.shape[:2]
    size = family.input_size
    frame = segmenter_input(normalize(image), size)
    scale = (size / width, size / height)
    result = decode_frame(infer, family, frame, prompts.frame(scale=scale), options, scale)
    return paint_frame(result, family, (height, width), options, prompts.seeds(result.prompt_index))


def _sam(image: np.ndarray, infer: "Infer", family: Family, prompts: PointPrompts, options: SegmentOptions) -> Segmentation:
    image = _checked(prompts, channels_last(image))
    height, width = image.shape[:2]
    size, m = family.input_size, family.low_res_size
    frame, (h, w) = sam_frame(image, size)
    scale = (w / width, h / height)
    result = decode_frame(infer, family, frame, prompts.frame(scale=scale), options, scale)
    wy, wx = sam_upsample(m, size, h, height), sam_upsample(m, size, w, width)
    full = (slice(0, height), slice(0, width))
    cut = logit_threshold(options.mask_threshold)
    blocks = ((*full, wy @ mask.astype(np.float32) @ wx.T) for mask in result.masks)
    labels, index = paint_cells(blocks, (height, width), cut, options.min_cell_area, prompts.seeds(result.prompt_index))
    return Segmentation(labels, cells_table(labels, np.asarray(result.scores, np.float64)[index]))


RULES = {"litemedsam": _lite, "cellsam": _cellsam, "sam": _sam}


def segment_points(image: np.ndarray, infer: "Infer", family: Family, prompts: PointPrompts, options: SegmentOptions) -> Segmentation:
    """Segment one image with point prompts (input pixels) through the family's served point decoder.

    ``infer(model, arrays, spec)`` sends one request to any served model (``TritonTransport.infer``,
    ``ServerPool.infer_model``). A point outside the image is a `UserError`.
    """
    if family.preprocess not in RULES:
        raise UserError(f"point prompts are not available for model {family.name} (pre-processing {family.preprocess!r})")
    check_scale(options.scale)
    if family.preprocess != "litemedsam" and options.scale not in (None, 1.0):
        raise UserError(f"--scale applies to tiled models (cellsam_lite); {family.name} resizes every image to its input")
    if options.iou_threshold is None:  # a click asks for a cell: keep every mask unless a threshold is given
        options = dataclasses.replace(options, iou_threshold=-1.0)
    return RULES[family.preprocess](validate_image(image, "image"), infer, family, prompts, options.resolved(family))
