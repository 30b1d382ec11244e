"""Client side of ``segment --prompts grid``: detector-free segmentation through ``<family>_grid``.

The served grid pipeline does the point grid, filtering, NMS and clean-up of one frame and
returns decided masks (logit > 0) largest first. Here the image becomes frames and the
frames' masks one label image, painted large-to-small (small cells win where masks overlap):
  litemedsam  native-resolution tiles (as lite_rules); a tile keeps the masks whose box
              centre lies in its core. Images with small cells get the auto-scale pass of the
              detector route (client/autoscale.py, ``--scale``).
  sam         CellSeg1's frame: min-max to 0..255, longest side resized to the input size,
              SAM pixel mean/std, zero-padded; masks up-sampled back like SAM's postprocessing.
  cellsam     CellSAM's frame (cellsam_rules: normalised, stretched to the input size); masks
              up-sampled back as its box masks are.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from cellsam_triton.contracts import NAMES, Family
from cellsam_triton.errors import UserError

from .autoscale import check_scale, segment_at_scale
from .images import to_channels_last3, validate_image
from .labels import cells_table, paint_cells
from .lite_rules import channels_last
from .resize import iter_mask_logits, resize, resize_weights
from .tiles import Tile, family_tiles, lite_normalize, mask_block, owned, tile_input
from .types import PipelineResult, Segmentation, SegmentOptions

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
DECIDED = 0.0  # the grid pipeline's masks are decided at logit 0
MAX_IN_FLIGHT = 2

Infer = Callable[[str, dict, object], dict]  # TritonTransport.infer(model, arrays, spec)


@dataclass
class GridOptions:
    """Point-grid settings; None means the served model's default (CellSeg1's: 32, 0.8, 0.6, 0).

    ``crop_n_layers`` 1 adds 2x2 overlapping crops of each frame (zoomed to the input size, each
    with its own point grid; masks merged by mask-IoU NMS), 2 also 4x4: 5x / 21x the work.
    """

    points_per_side: int | None = None
    pred_iou_threshold: float | None = None
    stability_threshold: float | None = None
    crop_n_layers: int | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """The optional request inputs these settings fill in."""
        out: dict[str, np.ndarray] = {}
        if self.points_per_side is not None:
            if not 1 <= self.points_per_side <= 128:
                raise UserError(f"points per side must be in [1, 128], got {self.points_per_side}")
            out[NAMES.points_per_side] = np.array([self.points_per_side], np.int32)
        if self.crop_n_layers is not None:
            if not 0 <= self.crop_n_layers <= 2:
                raise UserError(f"crop layers must be 0, 1 or 2, got {self.crop_n_layers}")
            out[NAMES.crop_n_layers] = np.array([self.crop_n_layers], np.int32)
        for name in (NAMES.pred_iou_threshold, NAMES.stability_threshold):
            value = getattr(self, name)
            if value is not None:
                out[name] = np.array([value], np.float32)
        return out


def add_grid_arguments(parser) -> None:
    """The --prompts grid options of `segment` and `eval` (read back by :func:`grid_options`)."""
    parser.add_argument("--points-per-side", type=int, default=None, metavar="N", help="--prompts grid: N x N points per frame (default: model's)")
    parser.add_argument("--grid-iou-threshold", type=float, default=None, metavar="T",
                        help="--prompts grid: keep masks whose predicted IoU >= T (default: the model's: calibrated by finetune, or CellSeg1's 0.8)")
    parser.add_argument("--crop-layers", type=int, default=None, choices=(0, 1, 2), help="--prompts grid: add 2x2 (1) / and 4x4 (2) zoomed crops (default: model's, 0)")


def grid_options(args) -> GridOptions:
    """Validated GridOptions from the CLI's --points-per-side, --grid-iou-threshold, --crop-layers."""
    if args.grid_iou_threshold is not None and not 0.0 <= args.grid_iou_threshold <= 1.0:  # also catches NaN
        raise UserError(f"--grid-iou-threshold must be in [0, 1], got {args.grid_iou_threshold}")
    grid = GridOptions(points_per_side=args.points_per_side, pred_iou_threshold=args.grid_iou_threshold,
                       crop_n_layers=args.crop_layers)
    grid.arrays()  # validates
    return grid


def run_grid(infer: Infer, family: Family, requests: list[dict[str, np.ndarray]]) -> list[PipelineResult]:
    """Send requests to ``<family>_grid`` (a few at a time); results in request order."""
    from .transport import to_result

    spec = family.grid_pipeline()
    with ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT) as pool:
        futures = [pool.submit(infer, family.grid_name, request, spec) for request in requests]
        return [to_result(f.result()) for f in futures]


# --- litemedsam: native-resolution tiles --------------------------------------------------------------
def _tile_requests(norm: np.ndarray, tiles: list[Tile], extra: dict) -> list[dict[str, np.ndarray]]:
    height, width = norm.shape[:2]
    return [
        {NAMES.image: tile_input(norm, t),
         NAMES.valid_size: np.array([min(t.size, height - t.y0), min(t.size, width - t.x0)], np.int32), **extra}
        for t in tiles
    ]


def _tiled_blocks(image: np.ndarray, infer: Infer, family: Family, extra: dict) -> list[tuple[float, float, tuple]]:
    norm = lite_normalize(image)
    height, width = norm.shape[:2]
    tiles = family_tiles(family, height, width)
    results = run_grid(infer, family, _tile_requests(norm, tiles, extra))
    found = []
    for tile, result in zip(tiles, results):
        for i in owned(result.boxes, tile):
            block = mask_block(result.masks[i], tile, (height, width), DECIDED)
            found.append((float((block[2] > DECIDED).sum()), float(result.scores[i]), block))
    return found


# --- sam: one resized frame -------------------------------------------------------------------------------
def sam_frame(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """CellSeg1/SAM input [1,3,size,size] of an [H,W,C] image and the (h, w) it occupies."""
    norm = lite_normalize(image) * np.float32(255)
    height, width = norm.shape[:2]
    scale = size / max(height, width)
    h, w = int(height * scale + 0.5), int(width * scale + 0.5)
    chw = resize(np.ascontiguousarray(np.moveaxis(norm, -1, 0)), (h, w), antialias=True).astype(np.float32)
    mean = np.asarray(SAM_PIXEL_MEAN, np.float32)[:, None, None]
    std = np.asarray(SAM_PIXEL_STD, np.float32)[:, None, None]
    frame = np.zeros((1, 3, size, size), np.float32)
    frame[0, :, :h, :w] = (chw - mean) / std
    return frame, (h, w)


def sam_upsample(low_res: int, size: int, valid: int, out: int) -> np.ndarray:
    """SAM postprocess along one axis: low_res -> size, crop to valid, -> out; weights [out, low_res]."""
    first = resize_weights(low_res, size, antialias=False)[:valid]
    return (resize_weights(valid, out, antialias=False) @ first).astype(np.float32)


def _sam_blocks(image: np.ndarray, infer: Infer, family: Family, extra: dict) -> list[tuple[float, float, tuple]]:
    height, width = image.shape[:2]
    frame, (h, w) = sam_frame(image, family.input_size)
    (result,) = run_grid(infer, family, [{NAMES.image: frame, NAMES.valid_size: np.array([h, w], np.int32), **extra}])
    m = family.low_res_size
    wy, wx = sam_upsample(m, family.input_size, h, height), sam_upsample(m, family.input_size, w, width)
    full = (slice(0, height), slice(0, width))
    found = []
    for mask, score in zip(result.masks, result.scores):
        logits = wy @ mask.astype(np.float32) @ wx.T
        found.append((float((logits > DECIDED).sum()), float(score), (*full, logits)))
    return found


# --- cellsam: CellSAM's stretched frame -------------------------------------------------------------------
def _cellsam_blocks(image: np.ndarray, infer: Infer, family: Family, extra: dict) -> list[tuple[float, float, tuple]]:
    from .cellsam_rules import normalize, segmenter_input  # scikit-image: only for this family

    height, width = image.shape[:2]
    frame = segmenter_input(normalize(to_channels_last3(image)), family.input_size)
    (result,) = run_grid(infer, family, [{NAMES.image: frame, **extra}])  # the whole frame is image: no valid_size
    blocks = iter_mask_logits(result.masks, family.input_size, (height, width), above=DECIDED)
    return [(float((block[2] > DECIDED).sum()), float(score), block) for block, score in zip(blocks, result.scores)]


FRAMES = {"litemedsam": _tiled_blocks, "sam": _sam_blocks, "cellsam": _cellsam_blocks}


def segment(image: np.ndarray, run: object, family: Family, boxes: np.ndarray | None, options: SegmentOptions) -> Segmentation:
    """The "sam" rule set's detector/box entry point: such a model (CellSeg1) has no detector."""
    raise UserError(f"model {family.name} has no detector: segment with grid prompts (--prompts grid)")


def segment_grid(image: np.ndarray, infer: Infer, family: Family, options: SegmentOptions, grid: GridOptions) -> Segmentation:
    """Segment one image with the family's served grid pipeline. Tiled families with an
    auto-scale rule (the default model) follow ``options.scale`` as the detector route does: a
    native pass, then one enlarged pass when its cells are small (client/autoscale.py)."""
    if family.preprocess not in FRAMES:
        raise UserError(f"grid prompts are not available for model {family.name} (pre-processing {family.preprocess!r})")
    check_scale(options.scale)
    image = channels_last(validate_image(image, "image"))
    arrays = grid.arrays()

    def native(img: np.ndarray, _boxes: None, opts: SegmentOptions) -> Segmentation:
        found = FRAMES[family.preprocess](img, infer, family, arrays)
        found.sort(key=lambda item: -item[0])  # paint large to small: smaller cells win overlaps
        blocks: Iterator = (block for _, _, block in found)
        min_area = family.min_cell_area if opts.min_cell_area is None else opts.min_cell_area
        labels, index = paint_cells(blocks, img.shape[:2], DECIDED, min_area)
        scores = np.array([found[i][1] for i in index], np.float64)
        return Segmentation(labels, cells_table(labels, scores))

    if family.preprocess != "litemedsam" or family.auto_scale_below <= 0:
        return native(image, None, options)
    return segment_at_scale(native, image, None, options.resolved(family), family)
