"""Security of a real tritonserver: loopback only, model control NONE, gRPC TLS, admin key, no secrets in logs."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from test_server import REPO_ROOT, read_line
from tiny_family import image_with_cells
from tritonclient.utils import InferenceServerException

from cellsam_triton.client.transport import TritonTransport
from cellsam_triton.errors import ServerError, UserError
from cellsam_triton.server import (
    ADMIN_GRPC_HEADER, ADMIN_HEADER, EmbeddedServer, TlsConfig, add_arguments, free_port, read_admin_key, tls_config,
)

ADMIN_KEY = "test-admin-key-Zq81xT0pL4mN"
LISTEN = "0A"
LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::ffff:127.0.0.1, ::1
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is needed to make test certificates")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _signed(pki: Path, name: str, subject: str, extension: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=pki)
    (pki / f"{name}.cnf").write_text(extension + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.cnf", cwd=pki)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate; plus an unrelated CA."""
    pki = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca", cwd=pki)
    _signed(pki, "server", "/CN=localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost")
    _signed(pki, "client", "/CN=test-client", "extendedKeyUsage=clientAuth")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.pem", "-days", "2", "-subj", "/CN=other-ca", cwd=pki)
    return pki


@pytest.fixture(scope="module")
def secure(single_repository: Path, pki: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("secure") / "server.log"
    server = EmbeddedServer(single_repository, log_path=log, exit_timeout_s=2,
                            tls=TlsConfig(pki / "server.pem", pki / "server.key"), admin_key=ADMIN_KEY)
    try:
        yield server.start(90)
    finally:
        server.stop()


def serve_process(repository: Path, ports: list[int], *options: str, verbose: str = "-v") -> subprocess.Popen:
    """`cellsam-triton serve` as a child process on the given (grpc, http, metrics) ports."""
    grpc, http, metrics = ports
    cmd = [sys.executable, "-m", "cellsam_triton.cli", verbose, "serve", "--repository", str(repository),
           "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics), *options]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def tls_client(server: EmbeddedServer, pki: Path, ca: str = "ca.pem", **extra) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=str(pki / ca), **extra)


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp) that listen on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == LISTEN and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_defaults_bind_loopback_and_forbid_model_control(secure: EmbeddedServer, pki: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--repository", "x"]).host == "127.0.0.1"
    assert EmbeddedServer(".").host == "127.0.0.1"
    if not Path("/proc/net/tcp").is_file():
        pytest.skip("no /proc/net/tcp to read listening sockets from")
    for port in secure.ports.values():
        addresses = listening_addresses(port)
        assert addresses and addresses <= LOOPBACK_HEX, (port, addresses)
    client = tls_client(secure, pki)
    key = {ADMIN_GRPC_HEADER: ADMIN_KEY}
    for call in (lambda: client.load_model("tiny", headers=key), lambda: client.unload_model("tiny_decoder", headers=key)):
        with pytest.raises(InferenceServerException, match="not allowed"):
            call()
    assert client.is_model_ready("tiny_decoder")


def test_serve_warns_when_not_on_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """`serve --host` off loopback logs a warning before the server starts (no server needed here)."""
    from cellsam_triton import server as server_module

    class Started(Exception):
        pass

    def no_server(*args, **kwargs):
        raise Started

    monkeypatch.setattr(server_module, "EmbeddedServer", no_server)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for host, warned in (("0.0.0.0", True), ("127.0.0.1", False), ("localhost", False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger=server_module.__name__), pytest.raises(Started):
            server_module.run(parser.parse_args(["--repository", str(tmp_path), "--host", host]))
        assert ("reachable from other machines" in caplog.text) == warned, (host, caplog.text)


def test_checkpoints_are_loaded_without_pickle_code() -> None:
    """Every torch.load in the project passes weights_only=True (README: Security)."""
    calls = []
    for folder in ("cellsam_triton", "client", "export", "model_repository", "bench"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            text = path.read_text()
            for match in re.finditer(r"torch\.load\(", text):
                depth, end = 1, match.end()
                while depth:  # to the closing parenthesis of the call
                    depth += {"(": 1, ")": -1}.get(text[end], 0)
                    end += 1
                calls.append((path.name, text[match.start():end]))
    assert calls, "no torch.load found: the scan looks in the wrong place"
    assert all("weights_only=True" in call for _, call in calls), [c for c in calls if "weights_only=True" not in c[1]]


def test_tls_transport_works_and_plain_or_untrusted_clients_are_refused(secure: EmbeddedServer, pki: Path) -> None:
    image = image_with_cells([2, 7])
    with TritonTransport(secure.grpc_url, "tiny", timeout_s=10, ssl=True, root_certificates=str(pki / "ca.pem")) as t:
        (result,) = t.run([{"image": image, "detector_image": image}])
    assert len(result.scores) == 2
    for client in (grpcclient.InferenceServerClient(secure.grpc_url), tls_client(secure, pki, ca="other.pem")):
        with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
            client.is_server_live(client_timeout=5)
    with pytest.raises(ServerError, match=secure.grpc_url):
        TritonTransport(secure.grpc_url, "tiny", timeout_s=5, retries=0)


def test_admin_endpoints_need_the_key_and_inference_stays_open(secure: EmbeddedServer, pki: Path) -> None:
    client = tls_client(secure, pki)
    for call in (client.get_model_repository_index, lambda **h: client.get_inference_statistics("tiny", **h),
                 lambda **h: client.get_log_settings(**h), client.get_system_shared_memory_status,
                 client.get_trace_settings):  # README: repository, statistics, logging, shared memory, trace
        with pytest.raises(InferenceServerException, match="restricted"):
            call()
        with pytest.raises(InferenceServerException, match="restricted"):
            call(headers={ADMIN_GRPC_HEADER: "wrong-key-0123456789"})
        assert call(headers={ADMIN_GRPC_HEADER: ADMIN_KEY}) is not None
    index = f"http://{secure.http_url}/v2/repository/index"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(index, data=b"{}"), timeout=5)
    assert refused.value.code == 403
    with urllib.request.urlopen(urllib.request.Request(index, data=b"{}", headers={ADMIN_HEADER: ADMIN_KEY}), timeout=5) as ok:
        assert ok.status == 200
    with urllib.request.urlopen(f"http://{secure.http_url}/v2/health/ready", timeout=5) as health:
        assert health.status == 200
    image = image_with_cells([5])
    tensor = grpcclient.InferInput("image", list(image.shape), "FP32")
    tensor.set_data_from_numpy(image)
    boxes = grpcclient.InferInput("boxes", [1, 4], "FP32")
    boxes.set_data_from_numpy(np.array([[0, 0, 16, 16]], np.float32))
    assert client.infer("tiny", [tensor, boxes], client_timeout=10).as_numpy("masks").shape == (1, 16, 16)
    assert client.get_model_config("tiny").config.name == "tiny"  # clients read the family from it
    assert ADMIN_KEY not in Path(secure.log_path).read_text()


def test_mutual_tls_demands_a_client_certificate(single_repository: Path, pki: Path, server_factory) -> None:
    server = server_factory(single_repository, tls=TlsConfig(pki / "server.pem", pki / "server.key", pki / "ca.pem")).start(90)
    with pytest.raises(InferenceServerException):
        tls_client(server, pki).is_server_live(client_timeout=5)
    mutual = tls_client(server, pki, private_key=str(pki / "client.key"), certificate_chain=str(pki / "client.pem"))
    assert mutual.is_server_ready(client_timeout=5)


def test_serve_with_tls_and_admin_key_never_shows_the_key(single_repository: Path, pki: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "admin.key"
    key_file.write_text(ADMIN_KEY + "\n")
    key_file.chmod(0o600)
    log = tmp_path / "server.log"
    ports = [free_port(), free_port(), free_port()]
    extra = ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
             "--admin-key-file", str(key_file), "--log-file", str(log), "--log-verbose", "1"]
    process = serve_process(single_repository, ports, *extra, verbose="-vv")
    try:
        line = read_line(process, 90)
        assert line.startswith("cellsam-triton serve: ready") and "tls=on admin-key=on" in line, line
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports[0]}", ssl=True, root_certificates=str(pki / "ca.pem"))
        assert len(client.get_model_repository_index(headers={ADMIN_GRPC_HEADER: ADMIN_KEY}).models) == 4
        process.terminate()
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    for text in (line, out, err, log.read_text()):
        assert ADMIN_KEY not in text


@pytest.mark.parametrize("content, problem", [("short", "16-256 characters"), ("", "16-256 characters"),
                                              ("has space in the middle of it", "16-256 characters")])
def test_bad_admin_key_files_are_refused_without_echoing_them(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "key"
    path.write_text(content)
    with pytest.raises(UserError, match=problem) as info:
        read_admin_key(path)
    assert not content or content not in str(info.value)
    with pytest.raises(UserError, match="cannot read admin key file"):
        read_admin_key(tmp_path / "missing")


def test_tls_options_must_come_together(tmp_path: Path) -> None:
    def options(**given) -> argparse.Namespace:
        return argparse.Namespace(**{"tls_cert": None, "tls_key": None, "tls_ca": None, **given})

    assert tls_config(options()) is None
    with pytest.raises(UserError, match="go together"):
        tls_config(options(tls_cert=tmp_path / "c.pem"))
    with pytest.raises(UserError, match="needs --tls-cert"):
        tls_config(options(tls_ca=tmp_path / "ca.pem"))
    with pytest.raises(UserError, match="TLS certificate not found"):
        EmbeddedServer(".", tls=TlsConfig(tmp_path / "c.pem", tmp_path / "k.pem"))


def test_serve_refuses_a_missing_certificate_in_one_line(single_repository: Path, tmp_path: Path) -> None:
    process = subprocess.run(
        [sys.executable, "-m", "cellsam_triton.cli", "serve", "--repository", str(single_repository),
         "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(tmp_path / "nope.key")],
        capture_output=True, text=True, timeout=60,
    )
    assert process.returncode != 0 and "Traceback" not in process.stderr
    assert process.stderr.strip().splitlines() == [f"cellsam-triton serve: error: TLS certificate not found: {tmp_path / 'nope.pem'}"]


def test_segment_cli_over_tls(secure: EmbeddedServer, pki: Path, tmp_path: Path, capsys) -> None:
    """`segment --tls-ca` reaches a TLS server; without it the run fails with one line."""
    from tiny_frames import frame

    from cellsam_triton.cli import main as cli

    np.save(tmp_path / "f.npy", frame(0))
    base = ["segment", str(tmp_path / "f.npy"), "--out", str(tmp_path / "out"), "--url", secure.grpc_url,
            "--model", "tiny", "--retry-for", "2"]
    assert cli(base + ["--tls-ca", str(pki / "ca.pem")]) == 0
    assert (tmp_path / "out" / "f_labels.tif").is_file()
    capsys.readouterr()
    assert cli(base + ["--tls-ca", str(pki / "other.pem")]) != 0
    assert "Traceback" not in capsys.readouterr().err
    # without a model name the client would list the repository: locked by the admin key
    assert cli(base[:-4] + ["--retry-for", "2", "--tls-ca", str(pki / "ca.pem")]) == 3
    assert "needs the server's admin key" in capsys.readouterr().err
