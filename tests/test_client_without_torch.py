"""The client side needs no torch (README, Install): `segment` runs end to end in a process where
torch, torchvision, onnx and onnxruntime cannot be imported (real tritonserver, tiny model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile
from test_server import REPO_ROOT
from tiny_frames import frame, write_frames

from cellsam_triton.client.api import Segmenter
from cellsam_triton.server import EmbeddedServer

SERVER_SIDE = ("torch", "torchvision", "onnx", "onnxruntime")
CLIENT = (
    "import sys\n"
    f"sys.modules.update(dict.fromkeys({SERVER_SIDE!r}))  # None: `import torch` raises ImportError\n"
    "from cellsam_triton.cli import main\n"
    "code = main(sys.argv[1:])\n"
    f"assert all(sys.modules[m] is None for m in {SERVER_SIDE!r}), 'the guard was replaced'\n"
    "sys.exit(code)\n"
)


def test_segment_runs_without_torch(single_repository: Path, tmp_path: Path) -> None:
    (source,) = write_frames(tmp_path / "in", 1)
    with EmbeddedServer(single_repository, log_path=tmp_path / "server.log", exit_timeout_s=2) as server:
        process = subprocess.run(
            [sys.executable, "-c", CLIENT, "segment", str(source), "--out", str(tmp_path / "out"),
             "--url", server.grpc_url, "--model", "tiny"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        )
        with Segmenter(server.grpc_url, "tiny") as seg:
            expected = seg.segment(frame(0)).labels
    assert process.returncode == 0, process.stderr
    assert expected.max() > 0, "no cells: the test would prove little"
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / f"{source.stem}_labels.tif"), expected)
