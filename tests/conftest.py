"""Shared fixtures: tiny model repositories and real tritonserver processes (always stopped)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_family import full_size_family, tiny_family, write_tiny_repository  # noqa: E402

from cellsam_triton.contracts import Family  # noqa: E402
from cellsam_triton.server import EmbeddedServer  # noqa: E402

TEST_EXIT_TIMEOUT_S = 2
START_TIMEOUT_S = 90
DSB = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018"  # real labelled data, never committed


@pytest.fixture(scope="session")
def tiny() -> Family:
    """The tiny CellFinder-style family (detector reads `detector_image`)."""
    return tiny_family("cellfinder")


@pytest.fixture(scope="session")
def tiny_lite() -> Family:
    """The tiny CellFinder-lite-style family (detector reads the embeddings)."""
    return tiny_family("cellfinder_lite")


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory, tiny: Family, tiny_lite: Family) -> Path:
    """A cpu-target repository holding both tiny families and a full-size one (12 models)."""
    families = [tiny, tiny_lite, full_size_family()]
    return write_tiny_repository(tmp_path_factory.mktemp("tiny_repository"), families)


@pytest.fixture(scope="session")
def single_repository(tmp_path_factory: pytest.TempPathFactory, tiny: Family) -> Path:
    """A cpu-target repository with only the tiny CellFinder family (4 models: quicker to start)."""
    return write_tiny_repository(tmp_path_factory.mktemp("single_repository"), [tiny])


@pytest.fixture
def broken_repository(tmp_path: Path, single_repository: Path, tiny: Family) -> Path:
    """The single-family repository with a corrupt encoder ONNX file."""
    repo = tmp_path / "broken"
    shutil.copytree(single_repository, repo)
    (repo / tiny.encoder_name / "1" / "model.onnx").write_bytes(b"not an onnx file")
    return repo


@pytest.fixture(scope="session")
def default_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model (cellsam_lite) exported once per session by `cellsam-triton export` (cpu target)."""
    from cellsam_triton.cli import main as cli

    repository = tmp_path_factory.mktemp("default_model") / "repository"
    assert cli(["export", "--repository", str(repository), "--threads", "1"]) == 0
    return repository


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[EmbeddedServer]:
    """A real tritonserver on the default export for one test module (skips, before exporting, when the
    DSB data are absent: these modules segment real images)."""
    if not (DSB / "manifest.csv").is_file():
        pytest.skip(f"DSB2018 data not found at {DSB}")
    repository = request.getfixturevalue("default_repository")  # exported once per session
    with EmbeddedServer(repository, log_path=tmp_path_factory.mktemp("default_server") / "triton.log") as server:
        yield server


@pytest.fixture(scope="session")
def tiny_server(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """One real tritonserver on free loopback ports serving the tiny families."""
    log = tmp_path_factory.mktemp("logs") / "tiny_server.log"
    server = EmbeddedServer(tiny_repository, log_path=log, exit_timeout_s=TEST_EXIT_TIMEOUT_S)
    try:
        server.start(START_TIMEOUT_S)
        yield server
    finally:
        server.stop()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., EmbeddedServer]]:
    """Make (not start) EmbeddedServers for one test; every one is stopped afterwards."""
    servers: list[EmbeddedServer] = []

    def make(repository: Path, **options) -> EmbeddedServer:
        options.setdefault("log_path", tmp_path / f"server{len(servers)}.log")
        options.setdefault("exit_timeout_s", TEST_EXIT_TIMEOUT_S)
        server = EmbeddedServer(repository, **options)
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()
