"""Bounded load test: N concurrent clients send pipeline requests for T seconds, then a report.

    python -m bench.load --url 127.0.0.1:8001 --clients 4 --seconds 30 [--model NAME] [--boxes K]

Each client is a thread with its own gRPC connection that sends one warm-up request (not counted),
then one request at a time (closed loop). The report gives throughput, latency percentiles of the
successful requests and the errors by kind: ``rejected`` (the server refused: queue full or
unavailable), ``timeout`` (no answer within --timeout) and ``other``. A rejected client pauses REJECT_PAUSE_S before its next request; nothing
is retried, and every loop is bounded by the duration.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from cellsam_triton.contracts import NAMES, Family

REJECT_PAUSE_S = 0.05  # a rejected client waits this long before its next request, as a polite client would


@dataclass
class LoadReport:
    clients: int
    seconds: float
    requests: int
    ok: int
    errors: dict[str, int] = field(default_factory=dict)
    throughput_rps: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    first_errors: list[str] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def line(self) -> str:
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.errors.items())) or "none"
        return (f"{self.clients} clients x {self.seconds:.0f} s: {self.requests} requests, {self.ok} ok, "
                f"{self.throughput_rps:.1f} req/s, p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, errors: {kinds}")


def synthetic_request(family: Family, boxes: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    """One pipeline request of the family's sizes: a random image, and ``boxes`` prompts or the detector input."""
    rng = np.random.default_rng(seed)
    size = family.input_size
    image = rng.random((1, 3, size, size), dtype=np.float32)
    request = {NAMES.image: image}
    if boxes:
        xy = rng.uniform(0, size * 0.8, (boxes, 2))
        request[NAMES.boxes] = np.concatenate([xy, xy + size * 0.1], 1).astype(np.float32)
    elif family.detector == "cellfinder":
        request[NAMES.detector_image] = image
    return request


def error_kind(exc: Exception) -> str:
    """rejected / timeout / other, from a tritonclient error."""
    status = str(exc.status()) if callable(getattr(exc, "status", None)) else ""
    text = str(exc).lower()
    if "DEADLINE_EXCEEDED" in status:
        return "timeout"
    if "queue" in text or "UNAVAILABLE" in status or "RESOURCE_EXHAUSTED" in status:
        return "rejected"
    return "other"


def run_load(url: str, model: str, request: dict[str, np.ndarray], clients: int, seconds: float,
             timeout_s: float = 30.0, ssl_options: dict | None = None) -> LoadReport:
    """Closed-loop load on ``model`` at ``url``; returns when every client has stopped (bounded)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    latencies: list[float] = []
    errors: Counter[str] = Counter()
    first_errors: list[str] = []
    lock = threading.Lock()
    warmed = threading.Barrier(clients + 1, timeout=timeout_s + 60)
    go = threading.Event()
    deadline = [0.0]

    def client_loop() -> None:
        client = grpcclient.InferenceServerClient(url, **(ssl_options or {}))
        inputs = []
        for name, array in request.items():
            tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        try:
            try:  # warm-up, not counted: first calls load libraries and grow buffers in the backend
                client.infer(model, inputs, client_timeout=timeout_s)
            except InferenceServerException:
                pass
            warmed.wait()
            go.wait(timeout_s + 60)
            while time.monotonic() < deadline[0]:
                sent = time.perf_counter()
                try:
                    client.infer(model, inputs, client_timeout=timeout_s)
                except InferenceServerException as exc:
                    kind = error_kind(exc)
                    with lock:
                        errors[kind] += 1
                        if len(first_errors) < 5:
                            first_errors.append(str(exc).splitlines()[0])
                    if kind == "rejected":
                        time.sleep(REJECT_PAUSE_S)
                    continue
                with lock:
                    latencies.append(time.perf_counter() - sent)
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    warmed.wait()
    began = time.monotonic()
    deadline[0] = began + seconds
    go.set()
    for thread in threads:
        thread.join(seconds + timeout_s + 10)
    elapsed = time.monotonic() - began
    ms = np.array(latencies) * 1e3
    ok = len(latencies)
    report = LoadReport(clients, seconds, ok + sum(errors.values()), ok, dict(errors), ok / elapsed if elapsed else 0.0,
                        first_errors=first_errors)
    if ok:
        report.p50_ms, report.p99_ms, report.max_ms = (float(x) for x in np.percentile(ms, [50, 99, 100]))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address (default %(default)s)")
    parser.add_argument("--model", default=None, help="pipeline name (default: the served one)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=30.0, help="duration (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default %(default)s)")
    parser.add_argument("--boxes", type=int, default=0, help="send K prompt boxes instead of running the detector")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0:
        parser.error("--clients must be >= 1 and --seconds > 0")
    from cellsam_triton.client.transport import TritonTransport
    from cellsam_triton.errors import UserError

    try:
        with TritonTransport(args.url, args.model, timeout_s=args.timeout) as transport:
            family, model = transport.family, transport.model
    except UserError as exc:
        print(f"bench.load: error: {exc}", file=sys.stderr)
        return exc.exit_code
    report = run_load(args.url, model, synthetic_request(family, args.boxes), args.clients, args.seconds, args.timeout)
    print(json.dumps(asdict(report), indent=2) if args.json else report.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
