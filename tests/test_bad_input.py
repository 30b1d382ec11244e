"""Bad input end to end on a real tritonserver: the `segment` CLI per file, and the server's limits."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import tritonclient.grpc as grpcclient
from test_server import REPO_ROOT
from tiny_family import image_with_cells
from tritonclient.utils import InferenceServerException

from cellsam_triton.server import EmbeddedServer

PROMPT_LIMIT = 4096  # pipeline.py DEFAULT_MAX_PROMPTS


@pytest.fixture(scope="module")
def server(single_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    server = EmbeddedServer(single_repository, log_path=tmp_path_factory.mktemp("bad_input") / "server.log", exit_timeout_s=2)
    try:
        yield server.start(90)
    finally:
        server.stop()


def bad_files(folder: Path) -> dict[str, str]:
    """Bad input files -> the problem the error line must name."""
    (folder / "truncated.tif").write_bytes(b"II*\x00\x08\x00\x00\x00garbage")
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image\n")
    np.save(folder / "nan.npy", np.full((32, 32), np.nan, np.float32))
    np.save(folder / "inf.npy", np.where(np.eye(32) > 0, np.inf, 1.0).astype(np.float32))
    np.save(folder / "five_channels.npy", np.zeros((32, 32, 5), np.float32))
    np.save(folder / "empty.npy", np.zeros((0, 32), np.float32))
    np.save(folder / "complex.npy", np.zeros((32, 32), np.complex64))
    np.save(folder / "strings.npy", np.array([["a", "b"], ["c", "d"]]))
    np.save(folder / "absurd.npy", np.zeros((1, 1, 1, 1, 1), np.float32))
    return {
        "truncated.tif": "TIFF", "zero.png": "PNG", "text.png": "PNG", "nan.npy": "NaN", "inf.npy": "infinite",
        "five_channels.npy": "5 channels", "empty.npy": "empty", "complex.npy": "pixel type", "strings.npy": "pixel type",
        "absurd.npy": "shape", "missing.tif": "no such file", "notes.txt": "unsupported file type",
    }


def test_segment_cli_reports_each_bad_file_in_one_line_and_processes_the_rest(server: EmbeddedServer, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    problems = bad_files(inputs)
    (inputs / "notes.txt").write_text("hello")
    good = (image_with_cells([1, 6])[0, 0] * 1000).astype(np.uint16)
    tifffile.imwrite(inputs / "good.tif", good)
    np.save(inputs / "constant.npy", np.full((48, 40), 7.0, np.float32))  # a flat image is valid: no cells
    names = ["good.tif", *problems, "constant.npy"]
    out = tmp_path / "out"
    process = subprocess.run(
        [sys.executable, "-m", "cellsam_triton.cli", "segment", *(str(inputs / n) for n in names),
         "--out", str(out), "--url", server.grpc_url, "--model", "tiny"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert process.returncode == 1, process.stderr
    assert "Traceback" not in process.stderr
    errors = [line for line in process.stderr.splitlines() if line.startswith("cellsam-triton segment: error: ")]
    assert len(errors) == len(problems), process.stderr
    for name, problem in problems.items():
        (line,) = [e for e in errors if f"{inputs / name}:" in e]
        assert problem in line, line
    for stem in ("good", "constant"):
        assert (out / f"{stem}_labels.tif").is_file() and (out / f"{stem}_cells.csv").is_file()
    assert f"segmented 2/{len(names)} images" in process.stdout
    assert process.stderr.strip().splitlines()[-1].startswith("failed")  # the summary line lists them


def infer(client, arrays: dict[str, np.ndarray]):
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return client.infer("tiny", inputs, client_timeout=30)


@pytest.mark.parametrize(
    "arrays, problem",
    [
        ({"image": np.zeros((1, 3, 2048, 2048), np.float32)}, "unexpected shape for input 'image'"),
        ({"image": image_with_cells([1]), "boxes": np.tile(np.float32([0, 0, 8, 8]), (PROMPT_LIMIT + 1, 1))},
         f"at most {PROMPT_LIMIT} per request"),
        ({"image": image_with_cells([1]), "boxes": np.zeros((2, 5), np.float32)}, "unexpected shape for input 'boxes'"),
        ({"image": image_with_cells([1]), "boxes": np.zeros((1, 4), np.float32), "bbox_threshold": np.array([np.nan], np.float32)},
         "NaN"),
        ({"image": image_with_cells([1]), "detector_image": np.full((1, 3, 64, 64), np.inf, np.float32)}, "detector_image"),
    ],
    ids=["oversized-image", "too-many-boxes", "box-columns", "nan-threshold", "inf-detector-image"],
)
def test_server_refuses_oversized_or_malformed_requests_before_work(server: EmbeddedServer, arrays, problem: str) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    started = time.monotonic()
    with pytest.raises(InferenceServerException, match=problem) as info:
        infer(client, arrays)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert time.monotonic() - started < 10
    assert client.is_server_ready()
    good = image_with_cells([2, 3])
    assert infer(client, {"image": good, "detector_image": good}).as_numpy("scores").shape == (2,)
