"""The "litemedsam" rule set: native-resolution 256x256 tiles through a served LITE pipeline.

The image is min-max normalised once (``tiles.lite_normalize``), cut into overlapping tiles
(``tiles.tile_grid``) and every tile is one pipeline request; all requests go to ``run`` in one
call (the transport runs them concurrently). A tile keeps only the cells whose box centre lies
in its core, so each cell comes from exactly one tile, segmented with at least half the
overlap of context around it. The 256x256 low-resolution logits are the tile's pixels: they
are pasted at native resolution, thresholded and painted with the shared label helpers.

Prompt boxes given by the user (image pixels, x1/y1 exclusive like the cells table) go to one
tile each: the one whose core holds the box centre when its window holds the whole box, else
the tile whose window holds it with the most margin.

Images with small cells are enlarged and segmented again (``client/autoscale.py``).
"""

from __future__ import annotations

import numpy as np

from cellsam_triton.contracts import NAMES, Family

from .autoscale import check_scale, segment_at_scale
from .images import validate_image
from .labels import cells_table, logit_threshold, paint_cells
from .tiles import Tile, core_prompt, family_tiles, lite_normalize, mask_block, owned, tile_input
from .types import PipelineResult, RunRequests, Segmentation, SegmentOptions


def channels_last(image: np.ndarray) -> np.ndarray:
    """[H,W] as is; a 3-D image with its smallest axis (channels) moved last."""
    return image if image.ndim == 2 else np.moveaxis(image, int(np.argmin(image.shape)), -1)


def _margin(tile: Tile, box: np.ndarray) -> float:
    """Smallest distance from the box to the tile window's border (negative: box sticks out)."""
    x0, y0, x1, y1 = box
    return min(x0 - tile.x0, y0 - tile.y0, tile.x0 + tile.size - x1, tile.y0 + tile.size - y1)


def assign_boxes(boxes: np.ndarray, tiles: list[Tile]) -> list[list[int]]:
    """For each tile, the indices of the boxes (xyxy, image pixels) it segments; each box once."""
    per_tile: list[list[int]] = [[] for _ in tiles]
    for index, box in enumerate(np.asarray(boxes, np.float64).reshape(-1, 4)):
        cy, cx = (box[1] + box[3]) / 2, (box[0] + box[2]) / 2
        margins = [_margin(t, box) for t in tiles]
        owners = [k for k, t in enumerate(tiles) if t.owns(cy, cx)]
        owner = owners[0] if owners and margins[owners[0]] >= 0 else int(np.argmax(margins))
        per_tile[owner].append(index)
    return per_tile


def build_requests(
    norm: np.ndarray, tiles: list[Tile], boxes: np.ndarray | None, bbox_threshold: float, iou_threshold: float,
    tta: int | None = None,
) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """Pipeline requests and the index of the tile each one is for (tiles without prompts skipped);
    ``tta`` > 1 asks the detector for that many flipped views of each tile."""
    thresholds = {
        NAMES.bbox_threshold: np.array([bbox_threshold], np.float32),
        NAMES.iou_threshold: np.array([iou_threshold], np.float32),
    }
    if boxes is None:
        if tta not in (None, 1):
            thresholds[NAMES.tta] = np.array([tta], np.int32)
        return [{NAMES.image: tile_input(norm, t), NAMES.core: core_prompt(t), **thresholds} for t in tiles], list(range(len(tiles)))
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    requests, used = [], []
    for k, indices in enumerate(assign_boxes(boxes, tiles)):
        if not indices:
            continue
        t = tiles[k]
        # image pixel extent (x1/y1 exclusive) -> inclusive corners in the tile frame
        prompt = boxes[indices] - np.array([t.x0, t.y0, t.x0 + 1, t.y0 + 1], np.float32)
        requests.append({NAMES.image: tile_input(norm, t), NAMES.boxes: prompt, **thresholds})
        used.append(k)
    return requests, used


def segment(
    image: np.ndarray,
    run: RunRequests,
    family: Family,
    boxes: np.ndarray | None,
    options: SegmentOptions,
) -> Segmentation:
    """Segment one image with a served LITE pipeline at the scale ``options.scale`` asks for.

    ``scale`` None: native resolution, then (detector boxes only) one enlarged pass when the
    cells found are small; 1.0: native only; another factor: that factor only.
    """
    check_scale(options.scale)
    image = channels_last(validate_image(image, "image"))

    def native(img: np.ndarray, prompts: np.ndarray | None, opts: SegmentOptions) -> Segmentation:
        return segment_native(img, run, family, prompts, opts)

    return segment_at_scale(native, image, boxes, options.resolved(family), family)


def segment_native(
    image: np.ndarray,
    run: RunRequests,
    family: Family,
    boxes: np.ndarray | None,
    options: SegmentOptions,
) -> Segmentation:
    """Segment one image at its own resolution; ``boxes`` xyxy in input pixels or None.

    ``image`` is already validated and channels-last and ``options`` resolved (by :func:`segment`).
    Overlaps follow CellSAM's rule (later masks win) with masks ordered by decreasing score
    over the whole image, so where two cells' masks overlap the lower-scored one wins, as in
    the reference.
    """
    norm = lite_normalize(image)
    height, width = norm.shape[:2]
    tiles = family_tiles(family, height, width)
    requests, used = build_requests(
        norm,
        tiles,
        boxes,
        options.bbox_threshold,
        options.iou_threshold,
        options.tta,
    )
    results = run(requests) if requests else []
    return paint_tiles([tiles[k] for k in used], results, (height, width), options, prompted=boxes is not None)


def paint_tiles(
    tiles: list[Tile], results: list[PipelineResult], shape: tuple[int, int], options: SegmentOptions, prompted: bool,
    seeds: list[list[np.ndarray]] | None = None,
) -> Segmentation:
    """The label image of tile results (``results[i]`` from ``tiles[i]``): masks painted in order of
    decreasing score, later masks winning overlaps. ``prompted``: every mask answers a given prompt
    (boxes, points) and is kept; else a tile keeps the masks it owns (box centre in its core).
    ``seeds[i][j]``: the point pixels (image frame) of result i's mask j, for point prompts
    (``labels.paint_seeded`` arbitrates overlaps)."""
    cut = logit_threshold(options.mask_threshold)
    kept = []  # (score, tile index, mask index)
    for t, (tile, result) in enumerate(zip(tiles, results)):
        indices = np.arange(len(result.scores)) if prompted else owned(result.boxes, tile)
        kept += [(float(result.scores[i]), t, int(i)) for i in indices]
    kept.sort(key=lambda item: -item[0])  # stable: equal scores keep tile and prompt order
    blocks = (mask_block(results[t].masks[i], tiles[t], shape, cut) for _, t, i in kept)
    ordered = None if seeds is None else [seeds[t][i] for _, t, i in kept]
    labels, index = paint_cells(blocks, shape, cut, options.min_cell_area, ordered)
    scores = np.array([kept[i][0] for i in index], np.float64)
    return Segmentation(labels, cells_table(labels, scores))
