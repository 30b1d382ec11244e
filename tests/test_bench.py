"""`make bench` (bench/serving.py): the measuring tools, and one quick real run on the small random CellSAM
(export -> tritonserver -> three methods -> results.json + plot). Speed targets are not asserted
here (a small model on a shared CPU); the JSON's shape and the equal work of the methods are."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bench.serving import TARGETS, calibrate_threshold, markdown
from bench.serving import main as bench_main
from bench.measure import (
    closed_loop,
    label_boxes,
    latency_summary,
    peak_rss_mb,
    reset_peak_rss,
    statistics_delta,
    tritonserver_pids,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018"


def test_latency_summary_percentiles() -> None:
    summary = latency_summary([0.001 * i for i in range(1, 101)])
    assert summary["count"] == 100
    assert summary["p50_ms"] == pytest.approx(50.5) and summary["p99_ms"] == pytest.approx(99.01)
    assert summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"]
    assert latency_summary([]) == {"count": 0}


def test_closed_loop_runs_every_worker_within_budget() -> None:
    seen: dict[int, int] = {}
    lock = threading.Lock()

    def work(worker: int, i: int) -> None:
        time.sleep(0.01)
        with lock:
            seen[worker] = seen.get(worker, 0) + 1

    level = closed_loop(work, 3, budget_s=0.1)
    assert sorted(seen) == [0, 1, 2] and level["requests"] == sum(seen.values()) >= 3
    assert level["wall_s"] < 1.0 and level["throughput_per_s"] == pytest.approx(level["requests"] / level["wall_s"])
    once = closed_loop(work, 2, budget_s=0.0)  # at least one request per worker, no more
    assert once["requests"] == 2

    def fail(worker: int, i: int) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        closed_loop(fail, 2, budget_s=1.0)


def test_label_boxes_are_exclusive_xyxy_and_skip_small_cells() -> None:
    labels = np.zeros((20, 30), np.int32)
    labels[2:8, 3:10] = 1  # 42 px
    labels[10:12, 20:22] = 2  # 4 px: too small
    np.testing.assert_array_equal(label_boxes(labels), [[3, 2, 10, 8]])


@pytest.mark.parametrize("target", [1, 7, 40])
def test_calibrated_threshold_keeps_the_target_count(target: int) -> None:
    rng = np.random.default_rng(target)
    logits = rng.normal(-2.0, 0.3, (100, 2)).astype(np.float32)  # random-detector-like: all alike
    boxes = rng.uniform(0.1, 0.9, (100, 4)).astype(np.float32)
    threshold, kept = calibrate_threshold(logits, boxes, target, 1024)
    assert kept == target
    from cellsam_triton.model_repository import selection

    assert len(selection.select_cellfinder(logits, boxes, 1024, threshold)[0]) == target


def test_peak_memory_reset_and_statistics_delta() -> None:
    baseline = reset_peak_rss()
    block = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB touched
    assert peak_rss_mb() >= baseline + 60
    del block
    assert tritonserver_pids() == []  # no server started by this process here
    before = {"m": {"requests": 1, "executions": 1, "request_ns": 1_000_000, "queue_ns": 0, "compute_input_ns": 0,
                    "compute_infer_ns": 0, "compute_output_ns": 0, "executed_infer_ns": 0}}
    after = {"m": {"requests": 5, "executions": 2, "request_ns": 9_000_000, "queue_ns": 400_000, "compute_input_ns": 0,
                   "compute_infer_ns": 8_000_000, "compute_output_ns": 0, "executed_infer_ns": 7_000_000}}
    delta = statistics_delta(before, after)["m"]
    assert (delta["requests"], delta["executions"]) == (4, 1)
    assert delta["request_ms"] == pytest.approx(2.0) and delta["queue_ms"] == pytest.approx(0.1) and delta["total_ms"] == pytest.approx(8.0)
    assert delta["executed_infer_ms"] == pytest.approx(7.0)  # per batch, not divided by requests


@pytest.mark.data
def test_quick_bench_on_the_small_cellsam(tmp_path: Path) -> None:
    if not (DATA / "manifest.csv").is_file():
        pytest.skip(f"DSB2018 data not found at {DATA}")
    from cellsam_triton.export.models.cellsam import make_random_checkpoint

    checkpoint = tmp_path / "cellsam_small.pt"
    make_random_checkpoint(checkpoint, "small", seed=1)
    out = tmp_path / "out"
    code = bench_main(["--checkpoint", str(checkpoint), "--repository", str(tmp_path / "repo"), "--data", str(DATA),
                "--out", str(out), "--quick"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.png").stat().st_size > 10_000
    for key in TARGETS:
        assert isinstance(results[key], float) and np.isfinite(results[key])
        assert any(name.startswith(key) for name in results["targets_met"])
    assert results["speedup_end_to_end"] > 0 and results["speedup_decode"] > 0 and results["triton_overhead"] > -1
    # the three methods did the same work: same boxes, and the served masks equal raw ONNX Runtime's
    decoded = results["boxes_decoded"]
    assert decoded["reference_pytorch"] == decoded["onnxruntime"] == decoded["served"]
    assert all(n > 0 for n in decoded["served"]), "calibrated threshold kept no boxes: nothing was compared"
    assert min(results["checks"]["cell_pixels_agree_served_vs_onnxruntime"]) >= 0.99
    for method in ("reference_pytorch", "onnxruntime", "served"):
        row = results["end_to_end"][method]
        assert len(row["per_image_s"]) == 1 and row["total_s"] > 0 and row["latency"]["p50_ms"] > 0
    stats = results["stages"]["served_triton_statistics"]
    assert stats["cellsam"]["requests"] == 1 and stats["cellsam_encoder"]["requests"] == 1
    assert stats["cellsam_decoder"]["requests"] == -(-decoded["served"][0] // results["setup"]["decoder_chunk"])
    decode = results["decode"]
    assert decode["served_decoder_stage_s"] > 0 and decode["reference_loop_s"] > 0 and decode["onnxruntime_loop_s"] > 0
    factors = decode["factors"]  # runtime x batching x serving is the whole decode ratio
    assert factors["runtime"] * factors["batching"] * factors["serving"] == pytest.approx(results["speedup_decode"], rel=1e-6)
    assert (out / "results.md").read_text() == markdown(results)
    assert results["machine"]["git_commit"] and "warm-up" in results["setup"]["note"]
    levels = results["concurrency"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    assert all(lv["requests"] >= lv["concurrency"] and lv["throughput_per_s"] > 0 for lv in levels)
    assert all(lv["latency"]["p50_ms"] <= lv["latency"]["p95_ms"] <= lv["latency"]["p99_ms"] for lv in levels)
    wire = results["wire"]
    assert wire["request_bytes_per_image"] >= 2 * 3 * 1024 * 1024 * 4  # image + detector_image, FP32 1024^2
    assert wire["response_bytes_per_image"] >= decoded["served"][0] * 256 * 256 * 2  # FP16 mask logits
    shm = results["shared_memory"]  # the same requests with inputs in system shared memory
    assert shm["labels_identical"] and shm["requests_per_path"] == 1 and shm["gain"] > 0
    memory = results["memory"]
    assert memory["client_peak_mb"] >= memory["client_before_served_phase_mb"] > 0
    assert memory["server"]["processes"] >= 5  # tritonserver + a stub per Python-backend instance
    assert memory["server"]["with_stubs_mb"] > memory["server"]["tritonserver_mb"] > 0
    assert results["setup"]["machine"]["cores"] == os.cpu_count()
