"""gRPC transport to the served pipeline (tritonclient.grpc; asyncio flavour in AsyncTritonTransport).

The transport learns the model family from the pipeline's config (`family` parameter), so the
client needs no local model files. Every failure to reach or use the server becomes a one-line
`ServerError` naming the URL. Only UNAVAILABLE answers (no response was produced) are retried.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from cellsam_triton.contracts import DECODER_MAX_BOXES, DEFAULT_FAMILY, NAMES, NUMPY_DTYPES, Family, ModelSpec
from cellsam_triton.errors import ServerError, UserError

from .types import PipelineResult

log = logging.getLogger(__name__)

PIPELINE_OUTPUTS = (NAMES.boxes, NAMES.scores, NAMES.iou_predictions, NAMES.masks, NAMES.prompt_index)
RETRY_BACKOFF_S = 0.2
COMPOSING_SUFFIXES = ("_encoder", "_detector", "_decoder")
ATTACHED_SUFFIXES = ("_grid", "_labels")  # models beside a pipeline that are not pipelines of their own
SERVE_HINT = "is the server running? start it with `cellsam-triton serve --repository DIR`"
# A restarted server is reconnected to within about a second (gRPC's default backoff grows to 120 s).
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
# Answers that say nothing about the request itself: the same request may succeed later or elsewhere
# ("no available versions": the model is known but being unloaded or loaded, e.g. a restart).
TRANSIENT_STATUSES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")
TRANSIENT_MESSAGES = ("not ready", "no available versions", "shutting down", "stopping", "socket closed", "connection reset")
_TRITON_DTYPE = {np.dtype(v): k for k, v in NUMPY_DTYPES.items()}


# --- helpers shared by both transports ---------------------------------------------------------
def _status(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    return str(status() if callable(status) else status or "")


def _first_line(exc: Exception) -> str:
    message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    return (str(message).strip().splitlines() or [type(exc).__name__])[0]


class TransientServerError(ServerError):
    """A failure that says nothing about the request (server down, restarting, too slow): worth retrying."""


def is_transient(exc: Exception) -> bool:
    """Whether a tritonclient exception may go away if the same request is sent again later."""
    status, message = _status(exc), _first_line(exc).lower()
    if _restricted(exc):
        return False
    return any(s in status for s in TRANSIENT_STATUSES) or any(m in message for m in TRANSIENT_MESSAGES)


def _restricted(exc: Exception) -> bool:
    """Triton refuses an endpoint locked by an admin key (restricted protocol) with UNAVAILABLE."""
    return "protocol is restricted" in _first_line(exc).lower()


def server_error(url: str, model: str, exc: Exception) -> ServerError:
    """A one-line ServerError (a TransientServerError when retrying may help) for a failed call."""
    status = _status(exc)
    kind = TransientServerError if is_transient(exc) else ServerError
    if _restricted(exc):
        return ServerError(f"{model} at {url} needs the server's admin key ({_first_line(exc)})")
    if "UNAVAILABLE" in status:
        return kind(f"cannot reach Triton at {url}: {_first_line(exc)}; {SERVE_HINT}")
    if "DEADLINE_EXCEEDED" in status:
        return kind(f"request to {model} at {url} timed out; raise --timeout or check the server load")
    return kind(f"{model} at {url} failed: {_first_line(exc)}")


def _retryable(exc: Exception) -> bool:
    return "UNAVAILABLE" in _status(exc) and not _restricted(exc)


def make_inputs(arrays: dict[str, np.ndarray]) -> list:
    """tritonclient InferInputs from named numpy arrays (dtype kept as given)."""
    from tritonclient.grpc import InferInput

    inputs = []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        dtype = _TRITON_DTYPE.get(array.dtype)
        if dtype is None:
            raise ServerError(f"input {name!r} has unsupported dtype {array.dtype}")
        infer_input = InferInput(name, list(array.shape), dtype)
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs


def make_outputs(spec: ModelSpec) -> list:
    from tritonclient.grpc import InferRequestedOutput

    return [InferRequestedOutput(t.name) for t in spec.outputs]


def _log_request(model: str, arrays: dict[str, np.ndarray], started: float, outputs: dict[str, np.ndarray]) -> None:
    if log.isEnabledFor(logging.DEBUG):
        shapes = ",".join(f"{k}={list(v.shape)}" for k, v in arrays.items())
        sent = sum(v.nbytes for v in arrays.values())
        received = sum(v.nbytes for v in outputs.values())
        log.debug("infer model=%s inputs=%s ms=%.1f bytes_sent=%d bytes_received=%d",
                  model, shapes, (time.perf_counter() - started) * 1e3, sent, received)


def to_result(outputs: dict[str, np.ndarray]) -> PipelineResult:
    return PipelineResult(*(outputs[name] for name in PIPELINE_OUTPUTS))


def family_from_config(config: Any, url: str, model: str) -> Family:
    """The Family carried by a pipeline's ModelConfig (its `family` parameter)."""
    param = config.parameters.get("family")
    if param is None or not param.string_value:
        raise ServerError(f"model {model} at {url} is not a cellsam-triton pipeline (no 'family' parameter)")
    return Family.from_json(param.string_value)


def is_unknown_model(exc: Exception) -> bool:
    """Whether a failed config request means the server does not serve that model."""
    text = str(exc).lower()
    return "not found" in text or "unknown model" in text


def resolve_unknown_model(url: str, model: str, requested: str | None, served: list[str]) -> str:
    """The pipeline to use when ``model`` is not served: the sole pipeline if no model was asked for.

    Pure: both transports call it with the server's repository index; otherwise a one-line
    ServerError names the pipelines the server does serve.
    """
    sole = sole_pipeline(served)
    if requested is None and sole is not None and sole != model:
        return sole
    raise ServerError(unknown_model_message(url, model, served))


def pipeline_names(served: list[str]) -> list[str]:
    """The pipelines among served model names: composing models, ``<pipeline>_grid`` (reached
    through its pipeline's family) and ``<pipeline>_labels`` (for clients in other languages) left out."""
    names = set(served)

    def attached(name: str) -> bool:
        return any(name.endswith(suffix) and name[: -len(suffix)] in names for suffix in ATTACHED_SUFFIXES)

    return sorted(n for n in names if not n.endswith(COMPOSING_SUFFIXES) and not attached(n))


def sole_pipeline(served: list[str]) -> str | None:
    """The only pipeline a server serves, if it serves exactly one (used when no model was named)."""
    pipelines = pipeline_names(served)
    return pipelines[0] if len(pipelines) == 1 else None


def unknown_model_message(url: str, model: str, served: list[str]) -> str:
    """One line naming the pipelines a server does serve (composing models left out)."""
    pipelines = pipeline_names(served)
    return f"model {model!r} is not served at {url}; served pipelines: {', '.join(pipelines) or 'none'} (pick one with --model)"


def _embed_batch(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    return image[None] if image.ndim == 3 else image


def _one_embedding(embeddings: np.ndarray) -> np.ndarray:
    """A decoder's image embedding [1,D,e,e] (float32) from [D,e,e] or [1,D,e,e]."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    return embeddings[None] if embeddings.ndim == 3 else embeddings


def _decoder_inputs(embeddings: np.ndarray, boxes: np.ndarray) -> dict[str, np.ndarray]:
    return {
        NAMES.image_embeddings: _one_embedding(embeddings),
        NAMES.boxes: np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
    }


def box_decoder_requests(embeddings: np.ndarray, boxes: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Box decoder requests for [N,4] xyxy boxes (encoder frame) on one embedding, at most DECODER_MAX_BOXES each."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return [_decoder_inputs(embeddings, boxes[start:start + DECODER_MAX_BOXES]) for start in range(0, len(boxes), DECODER_MAX_BOXES)]


def point_decoder_requests(embeddings: np.ndarray, coords: np.ndarray, labels: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
    """Point decoder requests for N prompts on one embedding, at most DECODER_MAX_BOXES each.

    ``coords`` [N,P,2] (or [N,2]: one point a prompt) xy in the encoder frame; ``labels`` [N,P]
    1 foreground, 0 background, -1 padding (default: all foreground).
    """
    coords = np.asarray(coords, dtype=np.float32)
    coords = coords[:, None, :] if coords.ndim == 2 else coords
    if coords.ndim != 3 or coords.shape[-1] != 2:
        raise UserError(f"point prompts must be [N,P,2] or [N,2] xy, got shape {coords.shape}")
    labels = np.ones(coords.shape[:2], np.float32) if labels is None else np.asarray(labels, np.float32).reshape(coords.shape[:2])
    embeddings = _one_embedding(embeddings)
    return [{NAMES.image_embeddings: embeddings, NAMES.point_coords: coords[start:start + DECODER_MAX_BOXES],
             NAMES.point_labels: labels[start:start + DECODER_MAX_BOXES]} for start in range(0, len(coords), DECODER_MAX_BOXES)]


def joined_masks(outputs: list[dict[str, np.ndarray]], low_res_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(low_res_masks [N,1,m,m], iou_predictions [N,1]) of decoder answers, concatenated in order."""
    if not outputs:
        return np.zeros((0, 1, low_res_size, low_res_size), np.float32), np.zeros((0, 1), np.float32)
    return (np.concatenate([o[NAMES.low_res_masks] for o in outputs]),
            np.concatenate([o[NAMES.iou_predictions] for o in outputs]))


# --- settings shared by both transports ----------------------------------------------------------
class _TransportSettings:
    """What both transports are configured with (one constructor for both)."""

    def __init__(
        self,
        url: str = "127.0.0.1:8001",
        model: str | None = None,
        timeout_s: float = 120.0,
        retries: int = 2,
        ssl: bool = False,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
        max_in_flight: int = 4,
        shared_memory: bool = False,
    ) -> None:
        self.url = url
        self.requested = model  # None: the default model, or the only pipeline served
        self.model = model or DEFAULT_FAMILY
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.max_in_flight = max(1, int(max_in_flight))
        self.shared_memory = bool(shared_memory)
        self._client_options = dict(
            ssl=ssl, root_certificates=root_certificates, private_key=private_key, certificate_chain=certificate_chain
        )


# --- synchronous transport -----------------------------------------------------------------------
class TritonTransport(_TransportSettings):
    """Blocking gRPC transport; `run` sends requests concurrently (at most ``max_in_flight``).

    ``shared_memory=True`` (server on this host): request inputs travel through system shared
    memory (`client/shm.py`) instead of the gRPC message; results are identical.
    """

    def __init__(self, url: str = "127.0.0.1:8001", model: str | None = None, **settings: Any) -> None:
        super().__init__(url, model, **settings)
        self._local = threading.local()
        self._clients: list = []
        self._regions: list = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix="triton")
        try:
            self.family = self._read_family()
        except BaseException:
            self.close()
            raise

    def _client(self):
        """One client per thread: tritonclient's gRPC client is not thread-safe."""
        client = getattr(self._local, "client", None)
        if client is None:
            import tritonclient.grpc as grpcclient

            try:
                client = grpcclient.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS, **self._client_options)
            except Exception as exc:  # bad URL or certificates
                raise ServerError(f"cannot connect to Triton at {self.url}: {_first_line(exc)}") from None
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _call(self, model: str, what: str, fn):
        """Run ``fn(client)``; retry UNAVAILABLE with backoff; map failures to ServerError."""
        from tritonclient.utils import InferenceServerException

        for attempt in range(self.retries + 1):
            try:
                return fn(self._client())
            except InferenceServerException as exc:
                if _retryable(exc) and attempt < self.retries:
                    time.sleep(RETRY_BACKOFF_S * 2**attempt)
                    continue
                raise server_error(self.url, f"{what} {model}", exc) from None

    def _read_family(self) -> Family:
        try:
            response = self._call(self.model, "config of", lambda c: c.get_model_config(self.model, client_timeout=self.timeout_s))
        except ServerError as exc:
            if not is_unknown_model(exc):
                raise
            index = self._call(self.model, "index of", lambda c: c.get_model_repository_index(client_timeout=self.timeout_s))
            self.model = self.requested = resolve_unknown_model(self.url, self.model, self.requested, [m.name for m in index.models])
            return self._read_family()
        return family_from_config(response.config, self.url, self.model)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait (bounded) until the pipeline and its composing models are ready."""
        from tritonclient.utils import InferenceServerException

        names = [self.model, self.family.encoder_name, self.family.detector_name, self.family.decoder_name]
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client = self._client()
                if all(client.is_model_ready(n, client_timeout=2.0) for n in names):
                    return
                problem = "models not ready"
            except InferenceServerException as exc:
                problem = _first_line(exc)
            if time.monotonic() >= deadline:
                raise ServerError(f"Triton at {self.url} not ready after {timeout_s:.0f} s ({problem}); {SERVE_HINT}")
            time.sleep(0.2)

    def _region(self, client):
        """This thread's shared-memory input region (created on first use)."""
        region = getattr(self._local, "region", None)
        if region is None or region.client is not client:
            from .shm import ShmInputs

            region = self._local.region = ShmInputs(client, _TRITON_DTYPE)
            with self._lock:
                self._regions.append(region)
        return region

    def _send(self, client, model: str, arrays: dict[str, np.ndarray], outputs: list):
        """One infer call: inputs in the gRPC message, or in this thread's shared-memory region."""
        if not self.shared_memory:
            return client.infer(model, make_inputs(arrays), outputs=outputs, client_timeout=self.timeout_s)
        from tritonclient.utils import InferenceServerException

        region = self._region(client)
        try:
            return client.infer(model, region.inputs(arrays), outputs=outputs, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            if "shared memory" not in _first_line(exc).lower():
                raise
            region.reset()  # the server lost the registration (restart): register again, once
            return client.infer(model, region.inputs(arrays), outputs=outputs, client_timeout=self.timeout_s)

    def infer(self, model: str, arrays: dict[str, np.ndarray], spec: ModelSpec) -> dict[str, np.ndarray]:
        """One request to any served model; returns its outputs by name."""
        for name, array in arrays.items():  # dtype errors before any call
            if np.asarray(array).dtype not in _TRITON_DTYPE:
                raise ServerError(f"input {name!r} has unsupported dtype {np.asarray(array).dtype}")
        outputs = make_outputs(spec)
        started = time.perf_counter()
        result = self._call(model, "inference on", lambda c: self._send(c, model, arrays, outputs))
        named = {t.name: result.as_numpy(t.name) for t in spec.outputs}
        _log_request(model, arrays, started, named)
        return named

    def run(self, requests: Sequence[dict[str, np.ndarray]]) -> list[PipelineResult]:
        """Pipeline requests in, results out in the same order (concurrent, bounded in flight)."""
        spec = self.family.pipeline()
        futures = [self._pool.submit(self.infer, self.model, request, spec) for request in requests]
        return [to_result(f.result()) for f in futures]

    def embed(self, image: np.ndarray) -> np.ndarray:
        """Encoder alone: image [3,s,s] or [B,3,s,s] (already normalised) -> embeddings [B,D,e,e]."""
        spec = self.family.encoder()
        return self.infer(spec.name, {NAMES.image: _embed_batch(image)}, spec)[NAMES.image_embeddings]

    def decode(self, embeddings: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decoder alone: one embedding and [N,4] xyxy boxes -> (low_res_masks [N,1,m,m], iou [N,1])."""
        spec = self.family.decoder()
        out = self.infer(spec.name, _decoder_inputs(embeddings, boxes), spec)
        return out[NAMES.low_res_masks], out[NAMES.iou_predictions]

    def decode_points(
        self, embeddings: np.ndarray, point_coords: np.ndarray, point_labels: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Point decoder alone: one embedding and N prompts of P points ([N,P,2] xy, encoder frame;
        labels [N,P] 1/0, -1 pads; default all 1) -> (low_res_masks [N,1,m,m], iou [N,1])."""
        spec = self.family.point_decoder()
        requests = point_decoder_requests(embeddings, point_coords, point_labels)
        return joined_masks([self.infer(spec.name, r, spec) for r in requests], self.family.low_res_size)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            regions, self._regions = self._regions, []
            clients, self._clients = self._clients, []
        for region in regions:
            region.close()
        for client in clients:
            client.close()

    def __enter__(self) -> "TritonTransport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- asyncio transport -----------------------------------------------------------------------------
class AsyncTritonTransport(_TransportSettings):
    """asyncio gRPC transport with the same methods as coroutines; ``await open()`` (or ``async with``) first."""

    def __init__(self, url: str = "127.0.0.1:8001", model: str | None = None, **settings: Any) -> None:
        import tritonclient.grpc.aio as aioclient

        super().__init__(url, model, **settings)
        if self.shared_memory:
            raise UserError("shared memory is supported by the synchronous client (TritonTransport, Segmenter)")
        try:
            self._client = aioclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS, **self._client_options)
        except Exception as exc:
            raise ServerError(f"cannot connect to Triton at {url}: {_first_line(exc)}") from None
        self.family: Family | None = None

    async def _call(self, model: str, what: str, fn):
        from tritonclient.utils import InferenceServerException

        for attempt in range(self.retries + 1):
            try:
                return await fn()
            except InferenceServerException as exc:
                if _retryable(exc) and attempt < self.retries:
                    await asyncio.sleep(RETRY_BACKOFF_S * 2**attempt)
                    continue
                raise server_error(self.url, f"{what} {model}", exc) from None

    async def open(self) -> "AsyncTritonTransport":
        """Read the family from the pipeline config (once)."""
        if self.family is None:
            try:
                response = await self._call(
                    self.model, "config of", lambda: self._client.get_model_config(self.model, client_timeout=self.timeout_s)
                )
            except ServerError as exc:
                if not is_unknown_model(exc):
                    raise
                index = await self._call(
                    self.model, "index of", lambda: self._client.get_model_repository_index(client_timeout=self.timeout_s)
                )
                served = [m.name for m in index.models]
                self.model = self.requested = resolve_unknown_model(self.url, self.model, self.requested, served)
                return await self.open()
            self.family = family_from_config(response.config, self.url, self.model)
        return self

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        from tritonclient.utils import InferenceServerException

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await self.open()
                f = self.family
                names = [self.model, f.encoder_name, f.detector_name, f.decoder_name]
                if all([await self._client.is_model_ready(n, client_timeout=2.0) for n in names]):
                    return
                problem = "models not ready"
            except (InferenceServerException, ServerError) as exc:
                problem = _first_line(exc)
            if time.monotonic() >= deadline:
                raise ServerError(f"Triton at {self.url} not ready after {timeout_s:.0f} s ({problem}); {SERVE_HINT}")
            await asyncio.sleep(0.2)

    async def infer(self, model: str, arrays: dict[str, np.ndarray], spec: ModelSpec) -> dict[str, np.ndarray]:
        inputs, outputs = make_inputs(arrays), make_outputs(spec)
        started = time.perf_counter()
        result = await self._call(
            model, "inference on",
            lambda: self._client.infer(model, inputs, outputs=outputs, client_timeout=self.timeout_s),
        )
        named = {t.name: result.as_numpy(t.name) for t in spec.outputs}
        _log_request(model, arrays, started, named)
        return named

    async def run(self, requests: Sequence[dict[str, np.ndarray]]) -> list[PipelineResult]:
        await self.open()
        spec = self.family.pipeline()
        gate = asyncio.Semaphore(self.max_in_flight)

        async def one(request: dict[str, np.ndarray]) -> PipelineResult:
            async with gate:
                return to_result(await self.infer(self.model, request, spec))

        return list(await asyncio.gather(*(one(r) for r in requests)))

    async def embed(self, image: np.ndarray) -> np.ndarray:
        await self.open()
        spec = self.family.encoder()
        return (await self.infer(spec.name, {NAMES.image: _embed_batch(image)}, spec))[NAMES.image_embeddings]

    async def decode(self, embeddings: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        await self.open()
        spec = self.family.decoder()
        out = await self.infer(spec.name, _decoder_inputs(embeddings, boxes), spec)
        return out[NAMES.low_res_masks], out[NAMES.iou_predictions]

    async def decode_points(
        self, embeddings: np.ndarray, point_coords: np.ndarray, point_labels: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """As `TritonTransport.decode_points`."""
        await self.open()
        spec = self.family.point_decoder()
        requests = point_decoder_requests(embeddings, point_coords, point_labels)
        return joined_masks([await self.infer(spec.name, r, spec) for r in requests], self.family.low_res_size)

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "AsyncTritonTransport":
        try:
            return await self.open()
        except BaseException:
            await self.close()
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
