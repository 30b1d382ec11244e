"""Batch jobs on Dask: a LocalCluster of several workers against a real tritonserver (tiny model);
every image done once by some worker, outputs equal the direct client's, resumable, failures listed."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from cellsam_triton.cli import main as cli
from cellsam_triton.client.api import Segmenter
from cellsam_triton.client.batch import expand_inputs
from cellsam_triton.client.dask_batch import _POOLS, run_dask_batch

from tiny_frames import frame, write_frames

distributed = pytest.importorskip("distributed")
WORKERS = 3


@pytest.fixture(scope="module")
def server(single_repository, tmp_path_factory):
    from cellsam_triton.server import EmbeddedServer

    with EmbeddedServer(single_repository, log_path=tmp_path_factory.mktemp("log") / "t.log", exit_timeout_s=2) as s:
        yield s


@pytest.fixture(scope="module")
def dask_client():
    with distributed.LocalCluster(n_workers=WORKERS, threads_per_worker=2, processes=False, protocol="tcp://", host="127.0.0.1",
                                  dashboard_address="127.0.0.1:0") as cluster, distributed.Client(cluster) as client:
        client.wait_for_workers(WORKERS, timeout=60)
        yield client


def test_folder_spread_over_dask_workers_and_resumed(server, dask_client, tmp_path) -> None:
    count = 18
    sources = write_frames(tmp_path / "in", count)
    (tmp_path / "in" / "broken.tif").write_bytes(b"not a tiff")
    out = tmp_path / "out"
    report = run_dask_batch(dask_client, expand_inputs([tmp_path / "in"]), out, [server.grpc_url], progress=False, timeout_s=30)
    assert report.segmented == count and report.skipped == 0 and report.total == count + 1
    assert [s.name for s, _ in report.failed] == ["broken.tif"]
    assert len(report.by_worker) >= 2 and sum(report.by_worker.values()) == count, report.by_worker
    assert _POOLS == {}, "worker pools not closed at the end of the job"
    with Segmenter(server.grpc_url) as seg:
        for k, source in enumerate(sources):
            np.testing.assert_array_equal(tifffile.imread(out / f"{source.stem}_labels.tif"), seg.segment(frame(k)).labels)
    assert not [p for p in out.iterdir() if ".tmp" in p.name], "temporary files left behind"

    (out / "frame_004_labels.tif").unlink()  # an interrupted job: one image left to do
    (tmp_path / "in" / "broken.tif").unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run_dask_batch(dask_client, expand_inputs([tmp_path / "in"]), out, [server.grpc_url], progress=False)
    assert (again.segmented, again.skipped, again.failed) == (1, count - 1, [])
    changed = {p.name for p in out.iterdir() if stamps.get(p.name) != p.stat().st_mtime_ns}
    assert changed == {"frame_004_labels.tif", "frame_004_cells.csv"}


def test_cli_local_cluster(server, tmp_path, capsys) -> None:
    write_frames(tmp_path / "in", 4)
    code = cli(["segment", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--url", server.grpc_url, "--dask", "local:2"])
    out = capsys.readouterr().out
    assert code == 0 and "segmented 4/4 images" in out and "Dask workers" in out
    assert len(list((tmp_path / "out").glob("*_labels.tif"))) == 4


def test_bad_dask_address_is_one_line(tmp_path, capsys) -> None:
    write_frames(tmp_path / "in", 1)
    code = cli(["segment", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--dask", "local:x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "local:N" in err[0]
