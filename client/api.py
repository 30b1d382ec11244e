"""Python API: one call from an image array to a label image and a per-cell table.

    with Segmenter("127.0.0.1:8001") as seg:
        result = seg.segment(image)          # numpy array, HxW or HxWxC (C <= 3)
        result.labels, result.cells

The model family (and so the pre/post-processing rule set) is read from the server's pipeline
config; the client needs no local model files and no torch.
"""

from __future__ import annotations

import asyncio
import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from cellsam_triton.contracts import Family
from cellsam_triton.errors import UserError

from .transport import TritonTransport
from .types import RunRequests, Segmentation, SegmentOptions

if TYPE_CHECKING:
    from .grid_rules import GridOptions, Infer
    from .points import PointPrompts

# Family.preprocess -> module holding that family's `segment(image, run, family, boxes, options)`.
RULE_SETS = {
    "cellsam": "cellsam_triton.client.cellsam_rules",
    "litemedsam": "cellsam_triton.client.lite_rules",
    "sam": "cellsam_triton.client.grid_rules",  # CellSeg1: no detector, grid prompts only
}


def rule_set(family: Family) -> ModuleType:
    """The client-side rule module for a model family."""
    return importlib.import_module(RULE_SETS[family.preprocess])


PROMPTS = ("detector", "grid")


def segment_image(
    image: np.ndarray,
    family: Family,
    run: RunRequests,
    infer: "Infer",
    boxes: np.ndarray | None = None,
    options: SegmentOptions | None = None,
    prompts: str = "detector",
    grid: "GridOptions | None" = None,
    points: "PointPrompts | np.ndarray | None" = None,
) -> Segmentation:
    """Segment one image with a served ``family``: the one dispatch of every client front end.

    ``run`` sends pipeline requests (``TritonTransport.run`` / ``ServerPool.run``), ``infer`` one
    request to any model (``TritonTransport.infer`` / ``ServerPool.infer_model``). ``boxes``:
    [N,4] xyxy in input pixels, no detector runs. ``prompts="grid"``: no detector either, a point
    grid through ``<family>_grid`` (``grid`` sets its options, see client/grid_rules.py).
    ``points``: point prompts through ``<family>_point_decoder``, no detector either: a
    `points.PointPrompts` (cells of positive and negative points, ``points.read_points_csv``) or
    [N,2] xy in input pixels, each a positive point of its own cell (client/point_rules.py).
    """
    options = options or SegmentOptions()
    options.check_tta(family, detector_boxes=points is None and prompts == "detector" and boxes is None, points=points is not None)
    if points is not None:
        from .point_rules import segment_points
        from .points import as_point_prompts

        if boxes is not None or prompts != "detector":
            raise UserError("give one kind of prompt: point prompts exclude prompt boxes and grid prompts")
        return segment_points(image, infer, family, as_point_prompts(points), options)
    if prompts == "grid":
        from .grid_rules import GridOptions, segment_grid

        if boxes is not None:
            raise UserError("give either prompt boxes or grid prompts, not both")
        return segment_grid(image, infer, family, options, grid or GridOptions())
    if prompts not in PROMPTS:
        raise UserError(f"unknown prompts {prompts!r}; choose from {', '.join(PROMPTS)}")
    if boxes is not None:
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    elif family.detector == "none":
        raise UserError(f"model {family.name} has no detector: segment with grid prompts (--prompts grid)")
    return rule_set(family).segment(image, run, family, boxes, options)


class Segmenter:
    """Synchronous client: pre-process, call the served pipeline, post-process."""

    def __init__(self, url: str = "127.0.0.1:8001", model: str | None = None, **transport_options: Any) -> None:
        self.transport = TritonTransport(url, model, **transport_options)
        self.family: Family = self.transport.family

    def segment(
        self,
        image: np.ndarray,
        boxes: np.ndarray | None = None,
        options: SegmentOptions | None = None,
        prompts: str = "detector",
        grid: "GridOptions | None" = None,
        points: "PointPrompts | np.ndarray | None" = None,
    ) -> Segmentation:
        """Segment one image (see :func:`segment_image`)."""
        return segment_image(image, self.family, self.transport.run, self.transport.infer, boxes, options, prompts, grid, points)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> "Segmenter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSegmenter:
    """asyncio client with the same behaviour as `Segmenter`.

    Pre/post-processing is CPU-bound numpy and the transport already overlaps requests, so each
    call runs in a worker thread: the event loop is never blocked.
    """

    def __init__(self, url: str = "127.0.0.1:8001", model: str | None = None, **transport_options: Any) -> None:
        self._sync = Segmenter(url, model, **transport_options)
        self.family = self._sync.family

    async def segment(
        self,
        image: np.ndarray,
        boxes: np.ndarray | None = None,
        options: SegmentOptions | None = None,
        prompts: str = "detector",
        grid: "GridOptions | None" = None,
        points: "PointPrompts | np.ndarray | None" = None,
    ) -> Segmentation:
        t = self._sync.transport
        return await asyncio.to_thread(segment_image, image, self.family, t.run, t.infer, boxes, options, prompts, grid, points)

    async def close(self) -> None:
        await asyncio.to_thread(self._sync.close)

    async def __aenter__(self) -> "AsyncSegmenter":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
