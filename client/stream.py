"""Frame streams: segment an iterator of frames, results in frame order, bounded in flight.

    with ServerPool([url]) as pool:                      # or a Segmenter
        stream = segment_stream(camera_frames(), pool, max_in_flight=4)
        for result in stream:                            # FrameResult, in frame order
            ...
        stream.stats.fps

At most ``max_in_flight`` frames are being segmented at any time; the next frame is taken from
the iterator only when one of them is finished (backpressure: a fast camera is not buffered
without bound). The per-request timeout is the segmenter's ``timeout_s``. A frame whose request
fails transiently (server down or restarting, timeout) is sent again after an exponential
backoff, up to ``retries`` times; every frame yields exactly one `FrameResult`, a segmentation
or the error that ended its retries.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol

import numpy as np

from cellsam_triton.errors import UserError

from .transport import TransientServerError
from .types import Segmentation, SegmentOptions

RETRIES = 8
BACKOFF_S = 0.2
MAX_BACKOFF_S = 4.0


class SegmentsImages(Protocol):
    def segment(self, image: np.ndarray, boxes: np.ndarray | None = None, options: SegmentOptions | None = None) -> Segmentation: ...


@dataclass
class FrameResult:
    """The one answer for frame ``index``: ``segmentation`` or ``error`` (one line)."""

    index: int
    segmentation: Segmentation | None
    error: str | None
    attempts: int
    latency_s: float

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class StreamStats:
    """Counts so far; ``fps`` is frames answered per second since the first frame was sent."""

    frames: int = 0
    failed: int = 0
    retries: int = 0
    started: float | None = None
    finished: float | None = None

    @property
    def elapsed_s(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.perf_counter()) - self.started

    @property
    def fps(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s > 0 else 0.0


class FrameStream:
    """Iterator of `FrameResult`s for a frame iterator (see the module docstring)."""

    def __init__(
        self,
        frames: Iterable[np.ndarray],
        segmenter: SegmentsImages,
        max_in_flight: int = 4,
        retries: int = RETRIES,
        backoff_s: float = BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        options: SegmentOptions | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise UserError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self._frames = iter(frames)
        self._segmenter = segmenter
        self.max_in_flight = int(max_in_flight)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.options = options
        self.stats = StreamStats()
        self._stats_lock = threading.Lock()
        self._closed = threading.Event()

    def _segment(self, index: int, frame: np.ndarray) -> FrameResult:
        started = time.perf_counter()
        for attempt in range(self.retries + 1):
            try:
                result = self._segmenter.segment(frame, options=self.options)
                return FrameResult(index, result, None, attempt + 1, time.perf_counter() - started)
            except TransientServerError as exc:
                if attempt == self.retries or self._closed.is_set():
                    return FrameResult(index, None, str(exc), attempt + 1, time.perf_counter() - started)
                with self._stats_lock:
                    self.stats.retries += 1
                self._closed.wait(min(self.max_backoff_s, self.backoff_s * 2**attempt))
            except UserError as exc:  # this frame is bad, or the server refuses it: no retry
                return FrameResult(index, None, str(exc), attempt + 1, time.perf_counter() - started)
        raise AssertionError("unreachable")

    def __iter__(self) -> Iterator[FrameResult]:
        pending: deque[Future] = deque()
        executor = ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix="stream")
        try:
            index, exhausted = 0, False
            while True:
                while not exhausted and len(pending) < self.max_in_flight:
                    frame = next(self._frames, None)
                    if frame is None:
                        exhausted = True
                        break
                    if self.stats.started is None:
                        self.stats.started = time.perf_counter()
                    pending.append(executor.submit(self._segment, index, frame))
                    index += 1
                if not pending:
                    return
                result = pending.popleft().result()
                self.stats.frames += 1
                self.stats.failed += int(not result.ok)
                self.stats.finished = time.perf_counter()
                yield result
        finally:
            self._closed.set()
            executor.shutdown(wait=True, cancel_futures=True)


def segment_stream(frames: Iterable[np.ndarray], segmenter: SegmentsImages, **options) -> FrameStream:
    """A `FrameStream` over ``frames``; keyword options as `FrameStream`."""
    return FrameStream(frames, segmenter, **options)
