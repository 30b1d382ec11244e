"""System shared memory against a real tritonserver: results identical to the gRPC-bytes path,
regions registered while in use and gone afterwards, re-registered after a server restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellsam_triton.cli import main as cli
from cellsam_triton.client.api import Segmenter
from cellsam_triton.client.shm import MIN_REGION_BYTES, region_bytes
from cellsam_triton.client.transport import AsyncTritonTransport, TritonTransport
from cellsam_triton.errors import UserError

from tiny_frames import KINDS, frame, write_frames


@pytest.fixture(scope="module")
def server(single_repository, tmp_path_factory):
    from cellsam_triton.server import EmbeddedServer

    with EmbeddedServer(single_repository, log_path=tmp_path_factory.mktemp("log") / "t.log", exit_timeout_s=2) as s:
        yield s


def our_regions() -> list[str]:
    import os

    return [p.name for p in Path("/dev/shm").glob(f"cellsam-{os.getpid()}-*")]


def registered(url: str) -> list[str]:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        return [r.name for r in client.get_system_shared_memory_status().regions.values()]


def test_region_sizes() -> None:
    assert region_bytes(1) == MIN_REGION_BYTES
    assert region_bytes(MIN_REGION_BYTES + 1) == 2 * MIN_REGION_BYTES
    assert region_bytes(3 * MIN_REGION_BYTES) == 4 * MIN_REGION_BYTES


def test_shared_memory_results_equal_the_grpc_path(server) -> None:
    frames = [frame(k) for k in range(KINDS)]
    with Segmenter(server.grpc_url, "tiny") as plain:
        expected = [plain.segment(f) for f in frames]
        requests = [{"image": np.random.default_rng(k).random((1, 3, 64, 64), dtype=np.float32),
                     "detector_image": np.random.default_rng(k + 1).random((1, 3, 64, 64), dtype=np.float32),
                     "bbox_threshold": np.array([0.0], np.float32), "iou_threshold": np.array([-1.0], np.float32)}
                    for k in range(6)]
        raw = plain.transport.run(requests)
    assert sum(r.count for r in expected) > 0
    with Segmenter(server.grpc_url, "tiny", shared_memory=True, max_in_flight=3) as shm:
        got = [shm.segment(f) for f in frames]
        got_raw = shm.transport.run(requests)
        names = registered(server.grpc_url)
        assert names and all(n.startswith("cellsam-") for n in names) and len(our_regions()) == len(names) <= 3
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.cells == b.cells
    for a, b in zip(raw, got_raw):
        for field in ("boxes", "scores", "iou_predictions", "masks", "prompt_index"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert registered(server.grpc_url) == [] and our_regions() == [], "regions left behind"


def test_region_is_registered_again_after_a_server_restart(server) -> None:
    with TritonTransport(server.grpc_url, "tiny", shared_memory=True, max_in_flight=1, timeout_s=20) as t:
        image = np.random.default_rng(0).random((3, 64, 64), dtype=np.float32)
        before = t.embed(image)
        server.restart(90)
        t.wait_ready(60)
        np.testing.assert_array_equal(t.embed(image), before)
        assert len(registered(server.grpc_url)) == 1
    assert registered(server.grpc_url) == [] and our_regions() == []


def test_cli_flag_and_async_refusal(server, tmp_path, capsys) -> None:
    write_frames(tmp_path / "in", 4)
    for flag, out in (([], "plain"), (["--shared-memory"], "shm")):
        assert cli(["segment", str(tmp_path / "in"), "--out", str(tmp_path / out), "--url", server.grpc_url, *flag]) == 0
    for labels in sorted((tmp_path / "plain").glob("*_labels.tif")):
        np.testing.assert_array_equal(tifffile.imread(labels), tifffile.imread(tmp_path / "shm" / labels.name))
    with pytest.raises(UserError, match="synchronous"):
        AsyncTritonTransport(server.grpc_url, "tiny", shared_memory=True)
