"""Several servers: requests spread over the healthy ones; one stopped mid-run loses no image."""

from __future__ import annotations

import threading

import numpy as np
import tifffile

from cellsam_triton.cli import main as cli
from cellsam_triton.client.batch import expand_inputs, run_batch
from cellsam_triton.client.pool import ServerPool
from cellsam_triton.server import free_port

from tiny_frames import KINDS, frame, write_frames


def test_a_server_stopped_mid_run_is_skipped_then_used_again(server_factory, single_repository, tmp_path, capsys) -> None:
    a = server_factory(single_repository).start(90)
    b = server_factory(single_repository).start(90)
    count, stop_after = 40, 8
    sources = write_frames(tmp_path / "in", count)
    with ServerPool([a.grpc_url, b.grpc_url], timeout_s=20, retry_after_s=0.5, patience_s=60) as pool:
        expected = [pool.segment(frame(k)).labels for k in range(KINDS)]
        before = pool.answered()
        assert all(n > 0 for n in before.values()), f"requests not spread: {before}"
        calls: list[int] = []
        lock = threading.Lock()
        stopper = threading.Thread(target=b.stop)

        def segment(image):
            with lock:
                calls.append(1)
                if len(calls) == stop_after:
                    stopper.start()
            return pool.segment(image)

        report = run_batch(expand_inputs([tmp_path / "in"]), tmp_path / "out", segment, workers=4, progress=False)
        stopper.join(30)
        after = pool.answered()
        assert report.segmented == count and not report.failed and len(calls) == count
        for k, source in enumerate(sources):
            np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / f"{source.stem}_labels.tif"), expected[k % KINDS])
        assert sum(after.values()) - sum(before.values()) == count, "each image is answered by exactly one server"
        assert after[a.grpc_url] - before[a.grpc_url] > count // 2
        b_failures = next(s.failures for s in pool.servers if s.url == b.grpc_url)
        assert b_failures > 0, "server b was never found down: the test proved nothing"

        b.restart(90)  # same ports: the pool tries it again after its rest
        for k in range(12):
            np.testing.assert_array_equal(pool.segment(frame(k)).labels, expected[k % KINDS])
        assert pool.answered()[b.grpc_url] > after[b.grpc_url], "the restarted server was never used again"

    # the CLI: a URL with nothing behind it is skipped, every image is still done
    dead = f"127.0.0.1:{free_port()}"
    code = cli(["segment", str(tmp_path / "in"), "--out", str(tmp_path / "cli"), "--url", dead, "--url", a.grpc_url])
    assert code == 0 and f"segmented {count}/{count} images" in capsys.readouterr().out
    assert len(list((tmp_path / "cli").glob("*_labels.tif"))) == count


def test_all_urls_dead_is_one_line_naming_them(tmp_path, capsys) -> None:
    write_frames(tmp_path / "in", 1)
    dead = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    code = cli(["segment", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--url", dead[0], "--url", dead[1]])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 3 and len(err) == 1 and all(u in err[0] for u in dead)
