"""The one place where every served model's name, tensors and numeric defaults are defined.

Both sides read this module: `export` renders Triton configs from it and the client builds
requests from it. Shapes use -1 for a dynamic axis. Models with ``max_batch_size > 0`` have an
implicit leading batch axis (Triton convention), which is not listed in ``dims``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

# Triton data type names (config.pbtxt spells them TYPE_<name>).
FP32, FP16, INT32, INT64, UINT8 = "FP32", "FP16", "INT32", "INT64", "UINT8"

NUMPY_DTYPES = {FP32: "float32", FP16: "float16", INT32: "int32", INT64: "int64", UINT8: "uint8"}

# How the pipeline decodes detector or given boxes: "full" runs SAM's decoder on the whole
# embedding for every box; "roi" decodes each box on a window of it (``Family.roi_windows``) and
# falls back to the full decoder for boxes too large for every window.
DECODER_CONTEXTS = ("full", "roi")
# Encoder weights as served on the cpu target: "int8" = per-channel INT8 weight MatMuls
# (export/encoder_int8.py); the gpu target always serves the FP32 graph (TensorRT FP32/FP16).
ENCODER_PRECISIONS = ("fp32", "int8")


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
    or "cellfinder_lite" (reads the SAM image embedding).
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
    extra: dict = field(default_factory=dict, hash=False, compare=False)

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
            inputs=(Tensor("image", FP32, (3, s, s)),),
            outputs=(Tensor("image_embeddings", FP32, (self.embed_dim, self.embed_size, self.embed_size)),),
            max_batch_size=self.encoder_batch,
        )

    def detector_model(self) -> ModelSpec:
        s, e = self.input_size, self.embed_size
        if self.detector == "cellfinder":
            inputs = (Tensor("image", FP32, (3, s, s)),)
            outputs = (Tensor("pred_logits", FP32, (-1, 2)), Tensor("pred_boxes", FP32, (-1, 4)))
        else:  # cellfinder_lite: reads the embedding, dense per-cell outputs
            inputs = (Tensor("image_embeddings", FP32, (self.embed_dim, e, e)),)
            outputs = (Tensor("pred_scores", FP32, (-1,)), Tensor("pred_boxes", FP32, (-1, 4)))
        return ModelSpec(self.detector_name, inputs, outputs, max_batch_size=self.encoder_batch)

    def decoder(self) -> ModelSpec:
        e, m = self.embed_size, self.low_res_size
        return ModelSpec(
            self.decoder_name,
            inputs=(
                Tensor("image_embeddings", FP32, (1, self.embed_dim, e, e)),
                Tensor("boxes", FP32, (-1, 4)),  # xyxy in the encoder frame, boxes on axis 0
            ),
            outputs=(
                Tensor("low_res_masks", FP32, (-1, 1, m, m)),  # mask logits
                Tensor("iou_predictions", FP32, (-1, 1)),
            ),
        )

    def roi_decoder(self) -> ModelSpec:
        """Box decoding on embedding windows: window side w is dynamic, boxes on axis 0."""
        return ModelSpec(
            self.roi_decoder_name,
            inputs=(
                Tensor("embedding_windows", FP32, (-1, self.embed_dim, -1, -1)),  # [N,C,w,w] crops
                Tensor("window_origins", FP32, (-1, 2)),  # (x, y) of each window, embedding cells
                Tensor("boxes", FP32, (-1, 4)),  # xyxy in the encoder frame (not the window's)
            ),
            outputs=(
                Tensor("low_res_masks", FP32, (-1, 1, -1, -1)),  # the window's logits [N,1,sw,sw]
                Tensor("iou_predictions", FP32, (-1, 1)),
            ),
        )

    def pipeline(self) -> ModelSpec:
        s, m = self.input_size, self.low_res_size
        inputs = [Tensor("image", FP32, (1, 3, s, s))]
        if self.detector == "cellfinder":
            inputs.append(Tensor("detector_image", FP32, (1, 3, s, s), optional=True))
        inputs += [
            Tensor("boxes", FP32, (-1, 4), optional=True),  # prompts: skip the detector
            # x0, y0, x1, y1 (encoder frame): detections whose box centre lies outside are not decoded
            Tensor("core", FP32, (4,), optional=True),
            Tensor("bbox_threshold", FP32, (1,), optional=True),
            Tensor("iou_threshold", FP32, (1,), optional=True),
        ]
        outputs = (
            Tensor("boxes", FP32, (-1, 4)),  # kept boxes, xyxy, encoder frame, label order
            Tensor("scores", FP32, (-1,)),  # detector score (1.0 for given prompts)
            Tensor("iou_predictions", FP32, (-1,)),
            Tensor("masks", FP16, (-1, m, m)),  # low-resolution mask logits (compact wire form)
            Tensor("prompt_index", INT32, (-1,)),  # index of each kept mask among the prompts
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
        """One image embedding, N single-point prompts on axis 0 (SAM's point rule, no mask input)."""
        e, m = self.embed_size, self.low_res_size
        return ModelSpec(
            self.point_decoder_name,
            inputs=(
                Tensor("image_embeddings", FP32, (1, self.embed_dim, e, e)),
                Tensor("point_coords", FP32, (-1, 1, 2)),  # xy in the encoder frame
                Tensor("point_labels", FP32, (-1, 1)),  # 1 foreground, 0 background
            ),
            outputs=(
                Tensor("low_res_masks", FP32, (-1, 1, m, m)),
                Tensor("iou_predictions", FP32, (-1, 1)),
            ),
        )

    def grid_pipeline(self) -> ModelSpec:
        """Detector-free pipeline: a point grid as prompts; same outputs as :meth:`pipeline`.

        Masks come out decided (logit > 0 after clean-up), sorted by area, largest first.
        """
        s = self.input_size
        inputs = (
            Tensor("image", FP32, (1, 3, s, s)),
            Tensor("valid_size", INT32, (2,), optional=True),  # (h, w) of the image part of the frame
            Tensor("points_per_side", INT32, (1,), optional=True),
            Tensor("pred_iou_threshold", FP32, (1,), optional=True),
            Tensor("stability_threshold", FP32, (1,), optional=True),
            Tensor("crop_n_layers", INT32, (1,), optional=True),  # 0: the frame only; 1: + 2x2 crops
        )
        return ModelSpec(self.grid_name, inputs, self.pipeline().outputs)

    def models(self) -> tuple[ModelSpec, ...]:
        roi = (self.roi_decoder(),) if self.decoder_context == "roi" else ()
        return (self.encoder(), self.detector_model(), self.decoder(), *roi, self.pipeline())

    # --- serialisation: the pipeline config carries its family, so clients learn it ------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Family":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in known}
        if "roi_windows" in fields:  # JSON has lists; the frozen dataclass keeps tuples (hashable)
            fields["roi_windows"] = tuple(int(v) for v in fields["roi_windows"])
        return cls(**fields)


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
    extra={"nms_iou": 0.3, "tile_overlap": 64, "auto_scale_below": 16.0, "auto_scale_factor": 2.0,
           "auto_scale_min_factor": 1.5},
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
    extra={"pred_iou_threshold": 0.8, "stability_threshold": 0.6},
)

# CellSeg1 on the LiteMedSAM base (`finetune` + `export --model cellseg1` without
# --sam-checkpoint): LiteMedSAM's 256 tiles, LoRA merged, detector-free (grid prompts).
CELLSEG1_LITE = Family(
    name="cellseg1_lite",
    input_size=256,
    low_res_size=256,
    detector="none",
    preprocess="litemedsam",
    encoder_batch=4,
    extra={"pred_iou_threshold": 0.8, "stability_threshold": 0.6, "points_per_side": 16, "tile_overlap": 64},
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
