"""Faults injected into real tritonserver processes: not started, stopped or killed mid-request, model not
ready, timeouts, and `serve` restarted on the same ports."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from test_security import serve_process
from test_server import read_line
from tiny_family import image_with_cells

from cellsam_triton.client.transport import RETRY_BACKOFF_S, TritonTransport
from cellsam_triton.contracts import ModelSpec, Tensor
from cellsam_triton.errors import ServerError
from cellsam_triton.server import free_port

SLEEPY_CONFIG = """name: "sleepy"
max_batch_size: 0
input [ { name: "seconds" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "seconds" data_type: TYPE_FP32 dims: [ 1 ] } ]
backend: "python"
instance_group [ { kind: KIND_CPU count: 2 } ]
"""
SLEEPY_MODEL = '''import time
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            seconds = pb_utils.get_input_tensor_by_name(request, "seconds").as_numpy()
            time.sleep(float(min(seconds[0], 30.0)))
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("seconds", seconds)]))
        return responses
'''
SLEEPY = ModelSpec("sleepy", (Tensor("seconds", "FP32", (1,)),), (Tensor("seconds", "FP32", (1,)),))


@pytest.fixture
def sleepy_repository(single_repository: Path, tmp_path: Path) -> Path:
    """The tiny repository plus `sleepy`, a model that answers after the seconds it is sent."""
    repo = tmp_path / "repo"
    shutil.copytree(single_repository, repo)
    (repo / "sleepy" / "1").mkdir(parents=True)
    (repo / "sleepy" / "config.pbtxt").write_text(SLEEPY_CONFIG)
    (repo / "sleepy" / "1" / "model.py").write_text(SLEEPY_MODEL)
    return repo


def sleep_on(transport: TritonTransport, seconds: float) -> float:
    return float(transport.infer("sleepy", {"seconds": np.array([seconds], np.float32)}, SLEEPY)["seconds"][0])


def in_thread(fn) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except Exception as exc:  # recorded for the test to inspect
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_server_not_started_is_retried_with_backoff_then_one_clear_line() -> None:
    url = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ServerError) as info:
        TritonTransport(url, "tiny", timeout_s=5, retries=2)
    elapsed = time.monotonic() - started
    assert RETRY_BACKOFF_S * 3 <= elapsed < 5  # two backoffs (0.2 s + 0.4 s) before giving up
    assert "\n" not in str(info.value) and url in str(info.value) and "cellsam-triton serve" in str(info.value)


def test_timeouts_stop_and_kill_mid_request(sleepy_repository: Path, server_factory) -> None:
    server = server_factory(sleepy_repository).start(90)
    with TritonTransport(server.grpc_url, "tiny", timeout_s=1.0, retries=2) as transport:
        # a request slower than the client timeout: a clear line, not retried (the server is busy, not gone)
        started = time.monotonic()
        with pytest.raises(ServerError, match=r"request to inference on sleepy at .* timed out; raise --timeout"):
            sleep_on(transport, 3.0)
        assert time.monotonic() - started < 2.5
    with TritonTransport(server.grpc_url, "tiny", timeout_s=20, retries=2) as transport:
        # SIGTERM mid-request: Triton finishes what it accepted (within --exit-timeout-secs), no work lost
        thread, outcome = in_thread(lambda: sleep_on(transport, 1.0))
        time.sleep(0.4)
        server.stop()
        thread.join(20)
        assert outcome == {"value": 1.0}
        # a killed server mid-request: retried with backoff, then one clear line, well before the timeout
        server.restart(90)
        transport.wait_ready(30)
        thread, outcome = in_thread(lambda: sleep_on(transport, 10.0))
        time.sleep(0.5)
        os.killpg(server.pid, signal.SIGKILL)
        started = time.monotonic()
        thread.join(15)
        assert not thread.is_alive() and time.monotonic() - started < 5
        message = str(outcome["error"])
        assert isinstance(outcome["error"], ServerError) and "\n" not in message
        assert server.grpc_url in message and "cellsam-triton serve" in message
        server.stop()
        # back on the same ports, the same transport works again
        server.restart(90)
        transport.wait_ready(30)
        image = image_with_cells([4])
        assert len(transport.run([{"image": image, "detector_image": image}])[0].scores) == 1


def test_model_not_ready_is_a_clear_error(single_repository: Path, server_factory) -> None:
    # only this test turns on explicit model control (the later option wins) to make a model unready
    server = server_factory(single_repository, extra_args=("--model-control-mode=explicit", "--load-model=*")).start(90)
    grpcclient.InferenceServerClient(server.grpc_url).unload_model("tiny_decoder")
    with TritonTransport(server.grpc_url, "tiny", timeout_s=10, retries=1) as transport:
        with pytest.raises(ServerError, match=r"not ready after 1 s \(models not ready\)"):
            transport.wait_ready(1)
        image = image_with_cells([4])
        with pytest.raises(ServerError) as info:
            transport.run([{"image": image, "detector_image": image}])
    message = str(info.value)
    assert "\n" not in message and "tiny_decoder" in message


def test_serve_restarts_on_the_same_ports(single_repository: Path) -> None:
    ports = [free_port(), free_port(), free_port()]
    for attempt in range(2):
        process = serve_process(single_repository, ports)
        try:
            line = read_line(process, 90)
            assert line.startswith(f"cellsam-triton serve: ready grpc=127.0.0.1:{ports[0]}"), (attempt, line, process.stderr)
            with TritonTransport(f"127.0.0.1:{ports[0]}", "tiny", timeout_s=10) as transport:
                image = image_with_cells([0, 15])
                assert len(transport.run([{"image": image, "detector_image": image}])[0].scores) == 2
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert process.returncode == 0
