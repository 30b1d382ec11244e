"""Frame streams: order, backpressure, retries, and a real tritonserver restarted mid-stream."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cellsam_triton.client.api import Segmenter
from cellsam_triton.client.stream import segment_stream
from cellsam_triton.client.transport import TransientServerError
from cellsam_triton.client.types import Segmentation
from cellsam_triton.errors import UserError

from tiny_frames import frame


class SlowCounter:
    """A stand-in segmenter for the stream mechanics: sleeps, counts concurrency, fails on cue."""

    def __init__(self, fail_first: dict[int, int] | None = None, bad: set[int] = frozenset()) -> None:
        self.fail_first = dict(fail_first or {})
        self.bad = bad
        self.active = self.peak = 0
        self.lock = threading.Lock()

    def segment(self, image, boxes=None, options=None) -> Segmentation:
        key = int(image[0, 0])
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            time.sleep(0.01 * (key % 3))  # out-of-order completion
            if key in self.bad:
                raise UserError(f"frame {key} is bad")
            with self.lock:
                if self.fail_first.get(key, 0) > 0:
                    self.fail_first[key] -= 1
                    raise TransientServerError("server restarting")
            return Segmentation(np.full((2, 2), key, np.uint32))
        finally:
            with self.lock:
                self.active -= 1


def test_results_in_frame_order_with_bounded_in_flight_and_backpressure() -> None:
    pulled = []

    def frames():
        for k in range(30):
            pulled.append(k)
            yield np.full((4, 4), k, np.float32)

    segmenter = SlowCounter()
    stream = segment_stream(frames(), segmenter, max_in_flight=3)
    seen = []
    for result in stream:
        assert len(pulled) <= result.index + 1 + 3, "more frames read than in flight allows"
        seen.append(result.index)
        assert int(result.segmentation.labels[0, 0]) == result.index
    assert seen == list(range(30))
    assert 1 < segmenter.peak <= 3
    assert stream.stats.frames == 30 and stream.stats.failed == 0 and stream.stats.fps > 0


def test_transient_failures_are_retried_and_bad_frames_answered_once() -> None:
    segmenter = SlowCounter(fail_first={2: 2, 5: 99}, bad={7})
    frames = (np.full((4, 4), k, np.float32) for k in range(10))
    stream = segment_stream(frames, segmenter, max_in_flight=4, retries=3, backoff_s=0.001)
    results = list(stream)
    assert [r.index for r in results] == list(range(10))
    assert results[2].ok and results[2].attempts == 3
    assert not results[5].ok and results[5].attempts == 4 and "restarting" in results[5].error
    assert not results[7].ok and results[7].attempts == 1 and "bad" in results[7].error
    assert stream.stats.failed == 2 and stream.stats.retries == 2 + 3


def test_every_frame_answered_once_across_a_real_server_restart(server_factory, single_repository) -> None:
    server = server_factory(single_repository).start(90)
    count, restart_at = 24, 6
    with Segmenter(server.grpc_url, timeout_s=20.0, max_in_flight=3) as segmenter:
        expected = {k: segmenter.segment(frame(k)).labels for k in range(15)}
        assert len({int(v.max()) for v in expected.values()}) > 2, "frames must differ for the test to mean anything"
        restarted = threading.Event()

        def frames():
            for k in range(count):
                if k == restart_at:
                    threading.Thread(target=lambda: (server.restart(90), restarted.set()), daemon=True).start()
                    time.sleep(0.3)  # the stop is under way while frames are in flight
                yield frame(k)

        stream = segment_stream(frames(), segmenter, max_in_flight=3, retries=30, backoff_s=0.2, max_backoff_s=1.0)
        results = list(stream)
        assert restarted.wait(60)
    assert [r.index for r in results] == list(range(count))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    for r in results:
        np.testing.assert_array_equal(r.segmentation.labels, expected[r.index % 15])
    assert stream.stats.retries > 0, "the restart never reached the stream: the test proved nothing"
    assert any(r.attempts > 1 for r in results)


def test_max_in_flight_must_be_positive() -> None:
    with pytest.raises(UserError):
        segment_stream(iter([]), SlowCounter(), max_in_flight=0)
