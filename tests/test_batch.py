"""`segment DIR --out DIR` against a real tiny tritonserver: failures listed, resumable, summary."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile

from cellsam_triton.cli import main as cli
from cellsam_triton.client.api import Segmenter

from tiny_frames import frame, write_frames


@pytest.fixture(scope="module")
def server(single_repository, tmp_path_factory):
    from cellsam_triton.server import EmbeddedServer

    with EmbeddedServer(single_repository, log_path=tmp_path_factory.mktemp("log") / "t.log", exit_timeout_s=2) as s:
        yield s


def test_folder_job_lists_failures_and_resumes(server, tmp_path, capsys) -> None:
    sources = write_frames(tmp_path / "in", 6)
    (tmp_path / "in" / "broken.tif").write_bytes(b"not a tiff")
    out = tmp_path / "out"
    code = cli(["segment", str(tmp_path / "in"), "--out", str(out), "--url", server.grpc_url, "--workers", "3"])
    captured = capsys.readouterr()
    assert code == 1
    assert "segmented 6/7 images (0 already done, 1 failed)" in captured.out
    assert "broken.tif" in captured.err.splitlines()[-1] and "failed (1)" in captured.err
    with Segmenter(server.grpc_url) as seg:
        for k, source in enumerate(sources):
            labels = tifffile.imread(out / f"{source.stem}_labels.tif")
            np.testing.assert_array_equal(labels, seg.segment(frame(k)).labels)
    assert sum(tifffile.imread(out / f"{s.stem}_labels.tif").max() for s in sources) > 0

    older = sources[2].stat().st_mtime - 10  # frame 2 changed after its outputs were written
    for name in ("frame_002_labels.tif", "frame_002_cells.csv"):
        os.utime(out / name, (older, older))
    stamps = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    (tmp_path / "in" / "broken.tif").unlink()
    code = cli(["segment", str(tmp_path / "in"), "--out", str(out), "--url", server.grpc_url])
    captured = capsys.readouterr()
    assert code == 0
    assert "segmented 1/6 images (5 already done, 0 failed)" in captured.out
    changed = {p.name for p, t in stamps.items() if p.stat().st_mtime_ns != t}
    assert changed == {"frame_002_labels.tif", "frame_002_cells.csv"}
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"

    code = cli(["segment", str(tmp_path / "in"), "--out", str(out), "--url", server.grpc_url, "--overwrite"])
    assert code == 0 and "segmented 6/6 images (0 already done" in capsys.readouterr().out


def test_named_files_are_always_segmented(server, tmp_path, capsys) -> None:
    (source,) = write_frames(tmp_path, 1)
    for _ in range(2):
        assert cli(["segment", str(source), "--out", str(tmp_path / "out"), "--url", server.grpc_url]) == 0
        assert "segmented 1/1 images (0 already done" in capsys.readouterr().out


def test_empty_folder_is_one_clear_error(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert cli(["segment", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "no .tif" in capsys.readouterr().err
