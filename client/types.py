"""Plain data passed between the client's transport, rule sets and writers."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from cellsam_triton.contracts import CELL_COLUMNS, TTA_VIEWS  # the columns of the CSV and of `<family>_labels`' cells
from cellsam_triton.errors import UserError

if TYPE_CHECKING:
    from cellsam_triton.contracts import Family


@dataclass
class PipelineResult:
    """What the pipeline model returns for one request (encoder frame, label order)."""

    boxes: np.ndarray  # [N,4] float32 xyxy in the encoder frame
    scores: np.ndarray  # [N] float32 detector scores (1.0 for given prompts)
    iou_predictions: np.ndarray  # [N] float32
    masks: np.ndarray  # [N,m,m] float16 low-resolution mask logits
    prompt_index: np.ndarray  # [N] int32 index of each mask among the request's prompts

    @classmethod
    def empty(cls, low_res_size: int) -> "PipelineResult":
        return cls(
            np.zeros((0, 4), np.float32),
            np.zeros((0,), np.float32),
            np.zeros((0,), np.float32),
            np.zeros((0, low_res_size, low_res_size), np.float16),
            np.zeros((0,), np.int32),
        )


def check_tta_prompts(tta: int | None, prompts: dict[str, bool]) -> None:
    """UserError when test-time flips (``tta`` other than None/1) come with prompts they do not apply
    to (given boxes, grid prompts): ``prompts`` maps each kind, named as the caller knows it (CLI
    flags, or a description), to whether it was given."""
    given = [name for name, on in prompts.items() if on]
    if tta not in (None, 1) and given:
        raise UserError(f"test-time flips (tta) apply to detector boxes and point prompts only, not to {' or '.join(given)}")


@dataclass
class SegmentOptions:
    """User-facing thresholds; None means the model family's default."""

    bbox_threshold: float | None = None
    iou_threshold: float | None = None  # -1 keeps every mask
    mask_threshold: float | None = None  # on sigmoid(logit)
    min_cell_area: int | None = None
    scale: float | None = None  # tiled families: None = automatic (client/autoscale.py), 1.0 = native
    tta: int | None = None  # test-time flips, one of contracts.TTA_VIEWS; None = 1 (off)

    def check_tta(self, family: "Family", detector_boxes: bool, points: bool = False) -> None:
        """UserError unless ``tta`` is off, or one of TTA_VIEWS on CellFinder-lite's detector boxes or
        with point prompts (any family: the client decodes them on each view)."""
        if self.tta in (None, 1):
            return
        if self.tta not in TTA_VIEWS:
            raise UserError(f"tta must be one of {', '.join(map(str, TTA_VIEWS))}, got {self.tta}")
        if points:
            return
        if family.detector != "cellfinder_lite":
            raise UserError(f"test-time flips (tta) need CellFinder-lite; model {family.name} has detector {family.detector}")
        check_tta_prompts(self.tta, {"given boxes or grid prompts": not detector_boxes})

    def resolved(self, family: "Family") -> "SegmentOptions":
        """A copy with every None replaced by the model family's default (``scale`` stays automatic)."""
        return SegmentOptions(
            *(getattr(family, f.name, None) if getattr(self, f.name) is None else getattr(self, f.name) for f in fields(self))
        )


@dataclass
class Segmentation:
    """A label image and its per-cell table (one row per label, input pixels).

    Table boxes are the extent of each cell's pixels: x0,y0 inclusive, x1,y1 exclusive.
    """

    labels: np.ndarray  # [H,W] uint32, 0 = background, 1..N sequential
    cells: list[dict] = field(default_factory=list)  # rows keyed by CELL_COLUMNS

    @property
    def count(self) -> int:
        return len(self.cells)


# A rule set sends its requests through this: a list of pipeline input dicts in, results out
# in the same order (the transport may run them concurrently).
RunRequests = Callable[[Sequence[dict[str, np.ndarray]]], list[PipelineResult]]
