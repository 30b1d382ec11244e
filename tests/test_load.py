"""Bounded load on a real tritonserver (bench/load.py): no errors below capacity, clear rejections above it,
and the Prometheus metrics count what happened."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from test_server import REPO_ROOT

from bench.load import run_load, synthetic_request
from cellsam_triton.contracts import Family
from cellsam_triton.server import EmbeddedServer

LOW_CLIENTS, OVER_CLIENTS, SECONDS = 2, 12, 3.0


@pytest.fixture(scope="module")
def server(single_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    server = EmbeddedServer(single_repository, log_path=tmp_path_factory.mktemp("load") / "server.log", exit_timeout_s=2)
    try:
        yield server.start(90)
    finally:
        server.stop()


@pytest.fixture
def small_queue_repository(single_repository: Path, tiny: Family, tmp_path: Path) -> Path:
    """The tiny repository whose pipeline has one instance and queues at most one request."""
    repo = tmp_path / "small_queue"
    shutil.copytree(single_repository, repo)
    config = repo / tiny.name / "config.pbtxt"
    text = re.sub(r"count: \d+", "count: 1", config.read_text())
    config.write_text(text + "dynamic_batching { default_queue_policy { max_queue_size: 1 } }\n")
    return repo


def metric(text: str, name: str, model: str) -> float:
    """Sum of a Prometheus counter over the lines of one model."""
    pattern = re.compile(rf'^{name}{{[^}}]*model="{model}"[^}}]*}} ([0-9.e+]+)$', re.M)
    return sum(float(x) for x in pattern.findall(text))


def scrape(server: EmbeddedServer) -> str:
    with urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=5) as response:
        return response.read().decode()


def test_load_below_capacity_has_no_errors_and_is_counted_in_metrics(server: EmbeddedServer, tiny: Family) -> None:
    before = metric(scrape(server), "nv_inference_request_success", tiny.name)
    report = run_load(server.grpc_url, tiny.name, synthetic_request(tiny), LOW_CLIENTS, SECONDS, timeout_s=30)
    print(report.line())
    assert report.error_count == 0, report.first_errors
    assert report.ok > 10 and report.throughput_rps > 0
    assert 0 < report.p50_ms <= report.p99_ms <= report.max_ms < 30_000
    text = scrape(server)
    assert metric(text, "nv_inference_request_success", tiny.name) - before == report.ok + LOW_CLIENTS  # + warm-ups
    assert metric(text, "nv_inference_request_success", tiny.encoder_name) >= report.ok
    assert "nv_inference_request_duration_us" in text and "nv_inference_queue_duration_us" in text
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{tiny.name}/ready"):
        with urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=5) as response:
            assert response.status == 200


def test_load_above_capacity_is_rejected_clearly(small_queue_repository: Path, server_factory, tiny: Family) -> None:
    server = server_factory(small_queue_repository).start(90)
    report = run_load(server.grpc_url, tiny.name, synthetic_request(tiny), OVER_CLIENTS, SECONDS, timeout_s=30)
    print(report.line(), report.first_errors)
    assert report.ok > 0
    assert report.errors.get("rejected", 0) > 0 and set(report.errors) == {"rejected"}, report.errors
    assert all("queue" in message.lower() for message in report.first_errors), report.first_errors
    assert metric(scrape(server), "nv_inference_request_success", tiny.name) >= report.ok  # rejections are not counted
    assert run_load(server.grpc_url, tiny.name, synthetic_request(tiny), 1, 1.0).error_count == 0  # still serving


def test_load_command_prints_one_report_line(server: EmbeddedServer) -> None:
    process = subprocess.run(
        [sys.executable, "-m", "bench.load", "--url", server.grpc_url, "--model", "tiny", "--clients", "2", "--seconds", "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert process.returncode == 0, process.stderr
    assert re.fullmatch(r"2 clients x 1 s: \d+ requests, \d+ ok, [\d.]+ req/s, p50 [\d.]+ ms, p99 [\d.]+ ms, errors: none\n",
                        process.stdout), process.stdout
