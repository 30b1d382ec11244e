"""EmbeddedServer and `cellsam-triton serve` against a real tritonserver: start, fail clearly, stop."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tiny_family import image_with_cells

from cellsam_triton.client.transport import TritonTransport
from cellsam_triton.errors import ServerError
from cellsam_triton.server import free_port, port_in_use

REPO_ROOT = Path(__file__).resolve().parents[1]


def serve(repository: Path, *ports: int) -> subprocess.Popen:
    grpc, http, metrics = ports
    cmd = [sys.executable, "-m", "cellsam_triton.cli", "serve", "--repository", str(repository),
           "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics)]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_line(process: subprocess.Popen, timeout_s: float) -> str:
    """One stdout line, or '' when the process exits or the time is up."""
    with selectors.DefaultSelector() as sel:
        sel.register(process.stdout, selectors.EVENT_READ)
        if sel.select(timeout_s):
            return process.stdout.readline()
    return ""


def test_serve_prints_one_ready_line_and_exits_0_on_sigterm(single_repository: Path, tiny) -> None:
    ports = [free_port(), free_port(), free_port()]
    process = serve(single_repository, *ports)
    try:
        line = read_line(process, 90)
        assert line.startswith(f"cellsam-triton serve: ready grpc=127.0.0.1:{ports[0]} http=127.0.0.1:{ports[1]}"), line
        models = line.strip().split("models=")[1].split(",")
        assert sorted(models) == sorted(spec.name for spec in tiny.models())
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/v2/health/ready", timeout=5) as response:
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert out == ""  # nothing after the ready line
    assert not any(port_in_use("127.0.0.1", p) for p in ports)


def test_serve_port_taken_is_a_clear_failure(single_repository: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        process = serve(single_repository, free_port(), taken, free_port())
        out, err = process.communicate(timeout=30)
    assert process.returncode != 0
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert f"127.0.0.1:{taken} is already in use" in err


def test_broken_model_names_the_model(broken_repository: Path, server_factory, tiny) -> None:
    server = server_factory(broken_repository)
    started = time.monotonic()
    with pytest.raises(ServerError) as info:
        server.start(60)
    message = str(info.value)
    assert "\n" not in message
    assert f"model '{tiny.encoder_name}' failed to load" in message and "Protobuf" in message
    assert str(server.log_path) in message
    assert not server.running and time.monotonic() - started < 60


def test_empty_repository_is_refused(tmp_path: Path, server_factory) -> None:
    with pytest.raises(ServerError, match="no models in repository"):
        server_factory(tmp_path).start(10)


def test_client_fails_fast_when_stopped_and_works_after_restart(single_repository: Path, server_factory) -> None:
    server = server_factory(single_repository).start(90)
    grpc_url = server.grpc_url
    image = image_with_cells([0, 5])
    with TritonTransport(grpc_url, "tiny", timeout_s=10) as transport:
        transport.wait_ready(10)
        assert len(transport.run([{"image": image, "detector_image": image}])[0].scores) == 2
        server.stop()
        assert not server.running
        started = time.monotonic()
        with pytest.raises(ServerError) as info:
            transport.run([{"image": image, "detector_image": image}])
        assert time.monotonic() - started < 5
        assert grpc_url in str(info.value) and "cellsam-triton serve" in str(info.value)
        server.restart(90)
        assert server.grpc_url == grpc_url
        transport.wait_ready(10)
        assert len(transport.run([{"image": image, "detector_image": image}])[0].scores) == 2


def test_transport_to_nothing_is_a_one_line_server_error() -> None:
    url = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ServerError) as info:
        TritonTransport(url, timeout_s=5)
    assert time.monotonic() - started < 5
    assert "\n" not in str(info.value) and url in str(info.value) and "cellsam-triton serve" in str(info.value)


def test_runtime_folder_is_prepared_once() -> None:
    from cellsam_triton.server import prepare_runtime, runtime_dir

    first = prepare_runtime()
    assert first == runtime_dir() and (first / "backends" / "python" / "triton_python_backend_stub").is_file()
    assert os.access(first / "bin" / "tritonserver", os.X_OK)
    marker = (first / ".complete").stat().st_mtime_ns
    assert prepare_runtime() == first and (first / ".complete").stat().st_mtime_ns == marker


def test_port_bound_after_the_check_is_read_from_the_log(single_repository: Path, server_factory) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        # the later --http-port wins in tritonserver: simulates losing a race for a checked port
        server = server_factory(single_repository, extra_args=(f"--http-port={taken}",))
        with pytest.raises(ServerError, match=rf"could not bind a port: .*127\.0\.0\.1:{taken}' already in use"):
            server.start(60)
    assert not server.running


def test_shared_memory_regions_are_removed_even_after_a_crash(single_repository: Path, server_factory) -> None:
    """Python-backend regions (32 MB each in /dev/shm, RAM) must not outlive a killed server."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm on this system")
    server = server_factory(single_repository).start(90)
    assert server.shm_regions(), "the server's Python-backend regions should carry its prefix"
    os.killpg(server.pid, signal.SIGKILL)  # a crash: nothing of the server gets to clean up
    deadline = time.monotonic() + 10
    while server.running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.shm_regions(), "a killed server leaves its regions behind"
    server.stop()
    assert server.shm_regions() == []
    other = server_factory(single_repository)
    assert other.shm_prefix != server.shm_prefix


def test_a_crash_during_start_up_is_retried_once(single_repository: Path, server_factory, tmp_path: Path) -> None:
    """The first launch aborts (SIGABRT, like a gRPC poller crash); the second is the real server."""
    from cellsam_triton.server import EmbeddedServer

    marker = tmp_path / "crashed-once"

    class CrashFirst(EmbeddedServer):
        def command(self, runtime: Path) -> list[str]:
            real = " ".join(f"'{part}'" for part in super().command(runtime))
            script = f"if [ ! -e '{marker}' ]; then touch '{marker}'; kill -ABRT $$; fi; exec {real}"
            return ["bash", "-c", script]

    server = CrashFirst(single_repository, log_path=tmp_path / "server.log", exit_timeout_s=1)
    try:
        server.start(90)
        assert marker.exists() and server.running
        with TritonTransport(server.grpc_url, "tiny", timeout_s=10) as transport:
            image = image_with_cells([0, 5])
            assert len(transport.run([{"image": image, "detector_image": image}])[0].scores) == 2
    finally:
        server.stop()
    marker.unlink()
    again = CrashFirst(single_repository, log_path=tmp_path / "server2.log", exit_timeout_s=1)
    with pytest.raises(ServerError, match="during start-up"):
        again.start(90, retry_crash=False)
    assert not again.running
