"""Many Triton servers behind one `run`: requests spread over the healthy ones.

Each request goes to the healthy server with the fewest requests in flight. A server that fails
with a transient error (down, restarting, timed out) is rested for ``retry_after_s`` and the
request is sent again to another server (or to the same one once it is back); a request waits at
most ``patience_s`` for any server before it fails. Servers that are down when the pool opens
are tried again later the same way. Every request gets exactly one answer.

    with ServerPool(["gpu1:8001", "gpu2:8001"]) as pool:
        result = pool.segment(image)                    # or pool.segment(image, prompts="grid")
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from cellsam_triton.contracts import Family
from cellsam_triton.errors import ServerError, UserError

from .transport import TransientServerError, TritonTransport, to_result
from .types import PipelineResult, Segmentation, SegmentOptions

if TYPE_CHECKING:
    from cellsam_triton.contracts import ModelSpec

    from .grid_rules import GridOptions
    from .points import PointPrompts

log = logging.getLogger(__name__)

RETRY_AFTER_S = 2.0
PATIENCE_S = 60.0


@dataclass
class ServerState:
    """Bookkeeping for one URL (read under the pool's lock)."""

    url: str
    transport: TritonTransport | None = None
    down_until: float = 0.0
    in_flight: int = 0
    answered: int = 0
    failures: int = 0
    last_error: str = ""


class ServerPool:
    """Pipeline requests over several servers of the same model; a `Segmenter` look-alike."""

    def __init__(
        self,
        urls: Sequence[str],
        model: str | None = None,
        timeout_s: float = 120.0,
        max_in_flight: int = 4,
        retry_after_s: float = RETRY_AFTER_S,
        patience_s: float = PATIENCE_S,
        **transport_options: Any,
    ) -> None:
        urls = list(dict.fromkeys(urls))
        if not urls:
            raise UserError("no server URL given")
        self.model = model
        self.retry_after_s = float(retry_after_s)
        self.patience_s = float(patience_s)
        self._transport_options = dict(transport_options, timeout_s=timeout_s, max_in_flight=max_in_flight, retries=0)
        self.servers = [ServerState(url) for url in urls]
        self._lock = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=max(1, max_in_flight) * len(urls), thread_name_prefix="pool")
        self.family: Family | None = None
        self._opened = False  # while opening, failures are reported by the error, not logged
        for server in self.servers:
            self._connect(server)
        self._opened = True
        if self.family is None:
            self.close()
            errors = "; ".join(s.last_error for s in self.servers)
            raise ServerError(errors if len(urls) == 1 else f"no server of {', '.join(urls)} answered: {errors}")

    # --- servers ---------------------------------------------------------------------------------
    def _connect(self, server: ServerState) -> bool:
        """Open the server's transport (reads its family); on failure rest the server."""
        try:
            transport = TritonTransport(server.url, self.model, **self._transport_options)
        except ServerError as exc:
            self._rest(server, exc)
            if not isinstance(exc, TransientServerError):
                raise
            return False
        if self.family is not None and transport.family.name != self.family.name:
            transport.close()
            raise UserError(f"{server.url} serves {transport.family.name}, the other servers {self.family.name}")
        self.family = self.family or transport.family
        self.model = transport.model
        with self._lock:
            server.transport = transport
        return True

    def _rest(self, server: ServerState, exc: Exception) -> None:
        with self._lock:
            server.down_until = time.monotonic() + self.retry_after_s
            server.failures += 1
            server.last_error = str(exc)
            self._lock.notify_all()
        level = logging.WARNING if self._opened else logging.INFO
        log.log(level, "server %s failed, resting %.1f s: %s", server.url, self.retry_after_s, exc)

    def _acquire(self, deadline: float, last_error: str) -> ServerState:
        """The healthy server with the fewest requests in flight; waits (bounded) while none is."""
        with self._lock:
            while True:
                now = time.monotonic()
                healthy = [s for s in self.servers if s.down_until <= now]
                if healthy:
                    server = min(healthy, key=lambda s: (s.in_flight, s.answered))
                    server.in_flight += 1
                    return server
                if now >= deadline:
                    raise ServerError(f"no server answered for {self.patience_s:.0f} s; last error: {last_error}")
                wake = min(min(s.down_until for s in self.servers), deadline)
                self._lock.wait(timeout=max(0.01, wake - now))

    def _release(self, server: ServerState, answered: bool) -> None:
        with self._lock:
            server.in_flight -= 1
            server.answered += int(answered)
            if answered:
                server.down_until = 0.0
            self._lock.notify_all()

    # --- requests ----------------------------------------------------------------------------------
    def infer(self, request: dict[str, np.ndarray]) -> PipelineResult:
        """One pipeline request, resent to a healthy server after each transient failure."""
        return to_result(self.infer_model(self.model, request, self.family.pipeline()))

    def infer_model(self, model: str, arrays: dict[str, np.ndarray], spec: "ModelSpec") -> dict[str, np.ndarray]:
        """One request to any served model (e.g. ``<family>_grid``), with the same failover."""
        deadline = time.monotonic() + self.patience_s
        last_error = "none"
        while True:
            server = self._acquire(deadline, last_error)
            answered = False
            try:
                if server.transport is None and not self._connect(server):
                    last_error = server.last_error
                    continue
                outputs = server.transport.infer(model, arrays, spec)
                answered = True
                return outputs
            except TransientServerError as exc:
                last_error = str(exc)
                self._rest(server, exc)
            finally:
                self._release(server, answered)

    def run(self, requests: Sequence[dict[str, np.ndarray]]) -> list[PipelineResult]:
        """Pipeline requests in, results out in the same order (spread over the servers)."""
        futures = [self._pool.submit(self.infer, request) for request in requests]
        return [f.result() for f in futures]

    def segment(
        self,
        image: np.ndarray,
        boxes: np.ndarray | None = None,
        options: SegmentOptions | None = None,
        prompts: str = "detector",
        grid: "GridOptions | None" = None,
        points: "PointPrompts | np.ndarray | None" = None,
    ) -> Segmentation:
        """Segment one image (same contract as `Segmenter.segment`, see `api.segment_image`)."""
        from .api import segment_image

        return segment_image(image, self.family, self.run, self.infer_model, boxes, options, prompts, grid, points)

    def answered(self) -> dict[str, int]:
        """Requests answered so far, by URL."""
        with self._lock:
            return {s.url: s.answered for s in self.servers}

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for server in self.servers:
            if server.transport is not None:
                server.transport.close()
                server.transport = None

    def __enter__(self) -> "ServerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
