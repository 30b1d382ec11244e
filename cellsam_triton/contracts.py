"""The one place where every served model's name, tensors and numeric defaults are defined.

Both sides read this module: `export` renders Triton configs from it and the client builds
requests from it. Shapes use -1 for a dynamic axis. Models with ``max_batch_size > 0`` have an
implicit leading batch axis (Triton convention), which is not listed in ``dims``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

# Triton data type names (config.pbtxt spells them TYPE_<name>).
FP32, FP16, INT32, INT64, UINT8 = "FP32", "FP16", "INT32", "INT64", "UINT8"
UINT16, UINT32 = "UINT16", "UINT32"  # `<family>_labels`: 16-bit images in, label images out

NUMPY_DTYPES = {FP32: "float32", FP16: "float16", INT32: "int32", INT64: "int64", UINT8: "uint8",
                UINT16: "uint16", UINT32: "uint32"}

# How the pipeline decodes detector or given boxes: "full" runs SAM's decoder on the whole
# embedding for every box; "roi" decodes each box on a window of it (``Family.roi_windows``) and
# falls back to the full decoder for boxes too large for every window.
DECODER_CONTEXTS = ("full", "roi")
# Encoder weights as served on the cpu target: "int8" = per-channel INT8 weight MatMuls
# (export/encoder_int8.py); the gpu target always serves the FP32 graph (TensorRT FP32/FP16).
ENCODER_PRECISIONS = ("fp32", "int8")
# Test-time flips of the cellfinder_lite detector (request input ``tta``): 1 = off, 2 = the tile
# and its left-right mirror, 4 = also its top-bottom mirror and both (model_repository/selection.py);
# the client decodes point prompts on the same views (client/point_rules.py).
TTA_VIEWS = (1, 2, 4)


# Tile overlap of whole-image tiling (pixels of the encoder frame) unless a family sets its own.
TILE_OVERLAP = 64

# `<family>_labels` (a raw image in, label image and cell table out, for clients in any language):
# the largest image it takes, H * W (where `segment` switches to window-by-window segmentation,
# `--slide-above`; the answer alone is 4 bytes a pixel), the most prompt boxes of one request (the
# pipeline's own limit per request) and the columns of its `cells` output (those of the cells CSV).
LABELS_MAX_PIXELS = 4096 * 4096
LABELS_MAX_BOXES = 4096
CELL_COLUMNS = ("label", "x0", "y0", "x1", "y1", "score", "area")

# Largest prompt count one decoder call may carry (the gpu target's TensorRT profile max): the
# pipeline sends decoder_chunk boxes per call; direct decoder callers chunk to at most this many.
DECODER_MAX_BOXES = 256
# Points of one point prompt (one cell: its positive and negative points) at most; the point
# decoder's point axis (gpu target: TensorRT profile max). Shorter prompts are padded with label -1.
MAX_PROMPT_POINTS = 32


class NAMES:
    """The one spelling of every tensor name of the contracts below: export, the server glue, the
    client and the benchmarks read them from here."""

    image = "image"
    detector_image = "detector_image"
    image_embeddings = "image_embeddings"
    boxes = "boxes"
    core = "core"
    bbox_threshold = "bbox_threshold"
    iou_threshold = "iou_threshold"
    tta = "tta"
    scores = "scores"
    iou_predictions = "iou_predictions"
    masks = "masks"
    prompt_index = "prompt_index"
    low_res_masks = "low_res_masks"
    pred_logits = "pred_logits"
    pred_scores = "pred_scores"
    pred_boxes = "pred_boxes"
    embedding_windows = "embedding_windows"
    window_origins = "window_origins"
    point_coords = "point_coords"
    point_labels = "point_labels"
    valid_size = "valid_size"
    points_per_side = "points_per_side"
    pred_iou_threshold = "pred_iou_threshold"
    stability_threshold = "stability_threshold"
    crop_n_layers = "crop_n_layers"
    # `<family>_labels`: one image input per pixel type (Triton fixes one type per tensor name)
    image_uint16 = "image_uint16"
    image_fp32 = "image_fp32"
    mask_threshold = "mask_threshold"
    min_cell_area = "min_cell_area"
    scale = "scale"
    labels = "labels"
    cells = "cells"


@dataclass(frozen=True)
class GridRules:
    """Detector-free (point-grid) mask generation rules, CellSeg1 / SAM automatic-mask style.

    The grid pipeline (model_repository/grid_generator.py) reads them from the family JSON;
    ``points_per_side``, ``pred_iou_threshold``, ``stability_threshold`` and ``crop_n_layers`` are
    also per-request inputs.
    """

    points_per_side: int = 32
    pred_iou_threshold: float = 0.8
    stability_threshold: float = 0.6
    stability_offset: float = 0.8
    max_area_fraction: float = 0.1  # of the frame; larger masks are background
    mask_nms_iou: float = 0.05
    min_region_area: int = 20  # pixels of the low-res frame; smaller holes and islands are removed
    crop_n_layers: int = 0
    crop_overlap_ratio: float = 512 / 1500  # SAM's default
    crop_edge_fraction: float = 20 / 1024  # SAM's 20 px at 1024 input, as a fraction of the input
    # embedding cells of the window each grid point is decoded on (``<family>_roi_point_decoder``,
    # model_repository/roi_windows.point_windows); masks reaching an inner window side are decoded
    # again on the whole embedding. 0: every point on the whole embedding
    window: int = 0


@dataclass(frozen=True)
class Tensor:
    """One input or output of a Triton model."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    optional: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """Contract of one Triton model: its name, tensors and batching."""

    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    max_batch_size: int = 0

    def input(self, name: str) -> Tensor:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> Tensor:
        return next(t for t in self.outputs if t.name == name)


@dataclass(frozen=True)
class Family:
    """A SAM-family model served as one pipeline: encoder, detector and prompt decoder.

    ``preprocess`` names the client's pre-processing rule set (see client/preprocess.py);
    ``detector`` is "cellfinder" (CellSAM's Anchor-DETR on its own ViT trunk, reads the image)
    or "cellfinder_lite" (reads the SAM image embedding and, with ``detector_reads_image``, the
    encoder's input tile too: a pixel branch for detail the embedding blurs).
    """

    name: str
    input_size: int  # square side the encoder sees
    embed_dim: int = 256
    embed_size: int = 64  # side of the image embedding grid
    low_res_size: int = 256  # side of the decoder's low-resolution mask logits
    detector: str = "cellfinder"
    preprocess: str = "cellsam"
    encoder_batch: int = 8
    decoder_chunk: int = 16  # boxes per decoder call inside the pipeline
    bbox_threshold: float = 0.4
    iou_threshold: float = 0.5
    mask_threshold: float = 0.4  # on sigmoid(logit)
    min_cell_area: int = 25
    decoder_context: str = "full"  # one of DECODER_CONTEXTS
    roi_windows: tuple[int, ...] = (16, 32)  # window sides, embedding cells (model_repository/roi_windows.py)
    roi_margin: int = 4  # embedding cells kept around a box inside its window
    encoder_precision: str = "fp32"  # one of ENCODER_PRECISIONS
    # detector post-processing (cellfinder_lite): greedy NMS IoU and the most detections per tile
    nms_iou: float = 0.5
    max_detections: int = 1000
    detector_reads_image: bool = False  # cellfinder_lite with a pixel branch: its `image` input too
    tile_overlap: int = TILE_OVERLAP  # whole-image tiling, pixels of the encoder frame
    # auto-scale (client/autoscale.py): images whose median cell size is below ``auto_scale_below``
    # px (0: never) are segmented again, enlarged by the tile-snapped factor in
    # [auto_scale_min_factor (None: = auto_scale_factor), auto_scale_factor], at most
    # ``auto_scale_max_pixels`` pixels
    auto_scale_below: float = 0.0
    auto_scale_factor: float = 2.0
    auto_scale_min_factor: float | None = None
    auto_scale_max_pixels: int = 64_000_000
    grid: GridRules = GridRules()  # `<family>_grid` (detector-free)

    # --- model names in the repository -------------------------------------------------
    @property
    def pipeline_name(self) -> str:
        return self.name

    @property
    def encoder_name(self) -> str:
        return f"{self.name}_encoder"

    @property
    def detector_name(self) -> str:
        return f"{self.name}_detector"

    @property
    def decoder_name(self) -> str:
        return f"{self.name}_decoder"

    @property
    def roi_decoder_name(self) -> str:
        return f"{self.name}_roi_decoder"

    # --- tensor contracts ----------------------------------------------------------------
    def encoder(self) -> ModelSpec:
        s = self.input_size
        return ModelSpec(
            self.encoder_name,
            inputs=(Tensor(NAMES.image, FP32, (3, s, s)),),
            outputs=(Tensor(NAMES.image_embeddings, FP32, (self.embed_dim, self.embed_size, self.embed_size)),),
            max_batch_size=self.encoder_batch,
        )

    def detector_model(self) -> ModelSpec:
        s, e = self.input_size, self.embed_size
        if self.detector == "cellfinder":
            inputs = (Tensor(NAMES.image, FP32, (3, s, s)),)
            outputs = (Tensor(NAMES.pred_logits, FP32, (-1, 2)), Tensor(NAMES.pred_boxes, FP32, (-1, 4)))
        else:  # cellfinder_lite: reads the embedding (and the tile), dense per-cell outputs
            inputs = (Tensor(NAMES.image_embeddings, FP32, (self.embed_dim, e, e)),)
            if self.detector_reads_image:
                inputs += (Tensor(NAMES.image, FP32, (3, s, s)),)
            outputs = (Tensor(NAMES.pred_scores, FP32, (-1,)), Tensor(NAMES.pred_boxes, FP32, (-1, 4)))
        return ModelSpec(self.detector_name, inputs, outputs, max_batch_size=self.encoder_batch)

    def decoder(self) -> ModelSpec:
        e, m = self.embed_size, self.low_res_size
        return ModelSpec(
            self.decoder_name,
            inputs=(
                Tensor(NAMES.image_embeddings, FP32, (1, self.embed_dim, e, e)),
                Tensor(NAMES.boxes, FP32, (-1, 4)),  # xyxy in the encoder frame, boxes on axis 0
            ),
            outputs=(
                Tensor(NAMES.low_res_masks, FP32, (-1, 1, m, m)),  # mask logits
                Tensor(NAMES.iou_predictions, FP32, (-1, 1)),
            ),
        )

    def roi_decoder(self) -> ModelSpec:
        """Box decoding on embedding windows: window side w is dynamic, boxes on axis 0."""
        return ModelSpec(
            self.roi_decoder_name,
            inputs=(
                Tensor(NAMES.embedding_windows, FP32, (-1, self.embed_dim, -1, -1)),  # [N,C,w,w] crops
                Tensor(NAMES.window_origins, FP32, (-1, 2)),  # (x, y) of each window, embedding cells
                Tensor(NAMES.boxes, FP32, (-1, 4)),  # xyxy in the encoder frame (not the window's)
            ),
            outputs=(
                Tensor(NAMES.low_res_masks, FP32, (-1, 1, -1, -1)),  # the window's logits [N,1,sw,sw]
                Tensor(NAMES.iou_predictions, FP32, (-1, 1)),
            ),
        )

    def pipeline(self) -> ModelSpec:
        s, m = self.input_size, self.low_res_size
        inputs = [Tensor(NAMES.image, FP32, (1, 3, s, s))]
        if self.detector == "cellfinder":
            inputs.append(Tensor(NAMES.detector_image, FP32, (1, 3, s, s), optional=True))
        inputs += [
            Tensor(NAMES.boxes, FP32, (-1, 4), optional=True),  # prompts: skip the detector
            # x0, y0, x1, y1 (encoder frame): detections whose box centre lies outside are not decoded
            Tensor(NAMES.core, FP32, (4,), optional=True),
            Tensor(NAMES.bbox_threshold, FP32, (1,), optional=True),
            Tensor(NAMES.iou_threshold, FP32, (1,), optional=True),
        ]
        if self.detector == "cellfinder_lite":  # detector views per tile, one of TTA_VIEWS
            inputs.append(Tensor(NAMES.tta, INT32, (1,), optional=True))
        outputs = (
            Tensor(NAMES.boxes, FP32, (-1, 4)),  # kept boxes, xyxy, encoder frame, label order
            Tensor(NAMES.scores, FP32, (-1,)),  # detector score (1.0 for given prompts)
            Tensor(NAMES.iou_predictions, FP32, (-1,)),
            Tensor(NAMES.masks, FP16, (-1, m, m)),  # low-resolution mask logits (compact wire form)
            Tensor(NAMES.prompt_index, INT32, (-1,)),  # index of each kept mask among the prompts
        )
        return ModelSpec(self.pipeline_name, tuple(inputs), outputs)

    # --- detector-free point-grid segmentation (issue 7) ---------------------------------
    @property
    def point_decoder_name(self) -> str:
        return f"{self.name}_point_decoder"

    @property
    def grid_name(self) -> str:
        return f"{self.name}_grid"

    def point_decoder(self) -> ModelSpec:
        """One image embedding, N point prompts on axis 0, P points each (SAM's point rule, no mask
        input); the grid sends P = 1, a cell clicked several times P > 1 (at most MAX_PROMPT_POINTS)."""
        e, m = self.embed_size, self.low_res_size
        return ModelSpec(
            self.point_decoder_name,
            inputs=(
                Tensor(NAMES.image_embeddings, FP32, (1, self.embed_dim, e, e)),
                Tensor(NAMES.point_coords, FP32, (-1, -1, 2)),  # [N,P,2] xy in the encoder frame
                Tensor(NAMES.point_labels, FP32, (-1, -1)),  # [N,P] 1 foreground, 0 background, -1 padding (not a point)
            ),
            outputs=(
                Tensor(NAMES.low_res_masks, FP32, (-1, 1, m, m)),
                Tensor(NAMES.iou_predictions, FP32, (-1, 1)),
            ),
        )

    @property
    def roi_point_decoder_name(self) -> str:
        return f"{self.name}_roi_point_decoder"

    def roi_point_decoder(self) -> ModelSpec:
        """Grid points decoded on embedding windows (``grid.window`` cells a side, dynamic in the
        ONNX model): one positive point a prompt, prompts on axis 0."""
        return ModelSpec(
            self.roi_point_decoder_name,
            inputs=(
                Tensor(NAMES.embedding_windows, FP32, (-1, self.embed_dim, -1, -1)),  # [N,C,w,w] crops
                Tensor(NAMES.window_origins, FP32, (-1, 2)),  # (x, y) of each window, embedding cells
                Tensor(NAMES.point_coords, FP32, (-1, 1, 2)),  # [N,1,2] xy in the encoder frame (not the window's)
                Tensor(NAMES.point_labels, FP32, (-1, 1)),  # [N,1] 1 (foreground)
            ),
            outputs=(
                Tensor(NAMES.low_res_masks, FP32, (-1, 1, -1, -1)),  # the window's logits [N,1,sw,sw]
                Tensor(NAMES.iou_predictions, FP32, (-1, 1)),
            ),
        )

    def grid_pipeline(self) -> ModelSpec:
        """Detector-free pipeline: a point grid as prompts; same outputs as :meth:`pipeline`.

        Masks come out decided (logit > 0 after clean-up), sorted by area, largest first.
        """
        s = self.input_size
        inputs = (
            Tensor(NAMES.image, FP32, (1, 3, s, s)),
            Tensor(NAMES.valid_size, INT32, (2,), optional=True),  # (h, w) of the image part of the frame
            Tensor(NAMES.points_per_side, INT32, (1,), optional=True),
            Tensor(NAMES.pred_iou_threshold, FP32, (1,), optional=True),
            Tensor(NAMES.stability_threshold, FP32, (1,), optional=True),
            Tensor(NAMES.crop_n_layers, INT32, (1,), optional=True),  # 0: the frame only; 1: + 2x2 crops
        )
        return ModelSpec(self.grid_name, inputs, self.pipeline().outputs)

    # --- a raw image in, labels out (issue 23): the client's rule code run inside the server ----
    @property
    def labels_name(self) -> str:
        return f"{self.name}_labels"

    def labels_model(self) -> ModelSpec:
        """``<family>_labels``: the whole client path of ``cellsam-triton segment`` as one model.

        Exactly one of ``image`` (UINT8), ``image_uint16``, ``image_fp32`` (finite): [H, W, C],
        C <= 3 (a grey image is [H, W, 1]; C = 4 is RGBA, its alpha dropped; as the CLI reads files, the smallest axis holds the
        channels, so [C, H, W] works too), H * W <= LABELS_MAX_PIXELS. The other inputs are
        optional, absent = the family's default, as the CLI's options: prompt ``boxes`` (xyxy,
        input pixels, x1/y1 exclusive; the detector is skipped), thresholds, ``min_cell_area``,
        ``scale`` (tiled families; absent or 0 = auto), ``tta`` (test-time flips, 1 / 2 / 4, of the
        detector or of point prompts; families with CellFinder-lite), point prompts (``point_coords`` [N, P, 2] xy in
        input pixels, one row per cell, ``point_labels`` [N, P] 1 / 0 / -1 padding; the detector or
        grid is skipped, ``<family>_point_decoder`` decodes them as `segment --points` does) and, for
        detector-free families, the grid settings. Outputs: ``labels`` [H, W] (0 background, 1..N)
        and ``cells`` [N, 7] rows of CELL_COLUMNS, as in the CLI's cells CSV.
        """
        image = (-1, -1, -1)
        inputs = [Tensor(NAMES.image, UINT8, image, optional=True), Tensor(NAMES.image_uint16, UINT16, image, optional=True),
                  Tensor(NAMES.image_fp32, FP32, image, optional=True)]
        if self.detector != "none":
            inputs += [Tensor(NAMES.boxes, FP32, (-1, 4), optional=True),
                       Tensor(NAMES.bbox_threshold, FP32, (1,), optional=True),
                       Tensor(NAMES.iou_threshold, FP32, (1,), optional=True),
                       Tensor(NAMES.mask_threshold, FP32, (1,), optional=True)]
        inputs.append(Tensor(NAMES.min_cell_area, INT32, (1,), optional=True))
        if self.detector != "none" and self.preprocess == "litemedsam":
            inputs.append(Tensor(NAMES.scale, FP32, (1,), optional=True))
        if self.detector == "cellfinder_lite":
            inputs.append(Tensor(NAMES.tta, INT32, (1,), optional=True))
        inputs += [Tensor(NAMES.point_coords, FP32, (-1, -1, 2), optional=True),
                   Tensor(NAMES.point_labels, FP32, (-1, -1), optional=True)]
        if self.detector == "none":
            inputs += [Tensor(NAMES.points_per_side, INT32, (1,), optional=True),
                       Tensor(NAMES.pred_iou_threshold, FP32, (1,), optional=True),
                       Tensor(NAMES.stability_threshold, FP32, (1,), optional=True),
                       Tensor(NAMES.crop_n_layers, INT32, (1,), optional=True)]
        outputs = (Tensor(NAMES.labels, UINT32, (-1, -1)), Tensor(NAMES.cells, FP32, (-1, len(CELL_COLUMNS))))
        return ModelSpec(self.labels_name, tuple(inputs), outputs)

    def models(self) -> tuple[ModelSpec, ...]:
        roi = (self.roi_decoder(),) if self.decoder_context == "roi" else ()
        return (self.encoder(), self.detector_model(), self.decoder(), *roi, self.pipeline())

    # --- serialisation: the pipeline config carries its family, so clients learn it ------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Family":
        """The family of :meth:`to_json`; also reads repositories exported before the typed fields
        (their untyped ``extra`` dict: known keys become fields, unknown ones are ignored)."""
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        grid_known = {f.name for f in dataclasses.fields(GridRules)}
        legacy = data.get("extra") or {}
        fields = {k: v for k, v in legacy.items() if k in known and k != "grid"}
        fields.update({k: v for k, v in data.items() if k in known})
        grid = {k: v for k, v in legacy.items() if k in grid_known}
        grid.update({k: v for k, v in (data.get("grid") or {}).items() if k in grid_known})
        fields["grid"] = GridRules(**grid)
        if "roi_windows" in fields:  # JSON has lists; the frozen dataclass keeps tuples (hashable)
            fields["roi_windows"] = tuple(int(v) for v in fields["roi_windows"])
        return cls(**fields)


# grid (`cellsam_grid`): GridRules() as they are, CellSeg1's 32 x 32 points on SAM's own input size
CELLSAM = Family(name="cellsam", input_size=1024, detector="cellfinder", preprocess="cellsam")
LITE = Family(
    name="cellsam_lite",
    input_size=256,
    detector="cellfinder_lite",
    preprocess="litemedsam",
    encoder_batch=16,
    low_res_size=256,
    # Chosen on the DSB2018 validation split (export/weights/cellfinder_lite.json): NMS 0.3 beats
    # 0.5. Images whose cells are < 16 px (median box side) are segmented again, enlarged by the
    # factor in [1.5, 2] that needs the fewest tiles (client/autoscale.py).
    # Mask threshold 0.5: the committed decoder is fine-tuned with BCE (export/weights/
    # lite_decoder.json); export writes 0.12 for LiteMedSAM's own decoder, whose cells run small.
    bbox_threshold=0.5,
    mask_threshold=0.5,
    # Each box decoded on a window of the embedding (export/models/window_decoder.py), with the
    # decoder fine-tuned on those windows (export/weights/lite_decoder_roi.json).
    decoder_context="roi",
    # cpu target: INT8 weight MatMuls in the encoder (1.28x faster per tile; val per-image F1 0.874
    # vs 0.877 with FP32, bench/speed_default.md); `export --encoder-precision fp32` keeps FP32.
    encoder_precision="int8",
    nms_iou=0.3,
    auto_scale_below=16.0,
    auto_scale_factor=2.0,
    auto_scale_min_factor=1.5,
    # `cellsam_lite_grid` (detector-free): cellseg1_lite's rules on the same 256 tiles (16 x 16 points;
    # `--points-per-side 32` per request for CellSeg1's density); export serves the thresholds
    # `select-grid` chose for the point decoder. Each point decoded on a 24-cell (96 px) window of
    # the embedding: one-point val nuclei IoU >= 0.5 for 0.811 vs 0.821 whole, ~6x less decoding.
    grid=GridRules(pred_iou_threshold=0.8, stability_threshold=0.6, points_per_side=16, window=24),
)

# CellSeg1 (SAM + merged LoRA at 512 input): detector-free, served with grid prompts; not in
# FAMILIES because its pipeline has no detector (box prompts or `<name>_grid` only).
CELLSEG1 = Family(
    name="cellseg1",
    input_size=512,
    embed_size=32,
    low_res_size=128,
    detector="none",
    preprocess="sam",
    encoder_batch=1,
    grid=GridRules(pred_iou_threshold=0.8, stability_threshold=0.6),  # CellSeg1's published rules
)

# CellSeg1 on the LiteMedSAM base (`finetune` + `export --model cellseg1` without
# --sam-checkpoint): LiteMedSAM's 256 tiles, LoRA merged into the point decoder `finetune`
# started from (the default model's, export/cellseg1_export.py), detector-free (grid prompts).
# Grid and auto-scale as the default model's grid: the same base, the same tiles.
CELLSEG1_LITE = Family(
    name="cellseg1_lite",
    input_size=256,
    low_res_size=256,
    detector="none",
    preprocess="litemedsam",
    encoder_batch=4,
    auto_scale_below=LITE.auto_scale_below,
    auto_scale_factor=LITE.auto_scale_factor,
    auto_scale_min_factor=LITE.auto_scale_min_factor,
    grid=GridRules(pred_iou_threshold=0.8, stability_threshold=0.6, points_per_side=16, window=LITE.grid.window),
)

FAMILIES = {f.name: f for f in (CELLSAM, LITE)}
DEFAULT_FAMILY = LITE.name


def family(name: str) -> Family:
    """The family called ``name``; a clear error names the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        from .errors import UserError

        raise UserError(f"unknown model {name!r}; known: {', '.join(sorted(FAMILIES))}") from None
