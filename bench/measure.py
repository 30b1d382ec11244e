"""Measuring tools of `make bench` (bench/serving.py): the image set, latency summaries, closed-loop load
at a fixed concurrency, Triton's statistics API and peak memory from /proc (numpy only, no torch)."""

from __future__ import annotations

import ctypes
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cellsam_triton.datasets import load_manifest, load_sample
from cellsam_triton.errors import UserError
from cellsam_triton.model_repository import raster

MIN_CELL_AREA = 25  # ground-truth cells smaller than this give no prompt box


# --- images ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchImage:
    """One benchmark image: a real DSB2018 crop and its ground-truth cell boxes (xyxy, pixels)."""

    id: str
    image: np.ndarray  # uint8 [size,size,3]
    boxes: np.ndarray  # float32 [N,4]


def label_boxes(labels: np.ndarray, min_area: int = MIN_CELL_AREA) -> np.ndarray:
    """xyxy boxes (exclusive max) of every label with at least ``min_area`` pixels, label order."""
    return raster.label_boxes(labels, min_area)


def bench_images(data: str | Path, count: int, size: int = 512, cells: tuple[int, int] = (20, 60)) -> list[BenchImage]:
    """``count`` centre crops of size x size from DSB2018 images at least that large, holding
    ``cells`` ground-truth cells (ids in sorted order, so every run uses the same images)."""
    records = sorted((r for r in load_manifest(data) if min(r.height, r.width) >= size), key=lambda r: r.id)
    chosen: list[BenchImage] = []
    for record in records:
        image, labels = load_sample(data, record.id)
        top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
        crop = np.ascontiguousarray(image[top:top + size, left:left + size])
        boxes = label_boxes(labels[top:top + size, left:left + size])
        if cells[0] <= len(boxes) <= cells[1]:
            chosen.append(BenchImage(record.id, crop, boxes))
        if len(chosen) == count:
            return chosen
    raise UserError(f"{data}: only {len(chosen)} images of at least {size}x{size} with {cells[0]}-{cells[1]} cells; asked for {count}")


# --- latency -------------------------------------------------------------------------------------
def latency_summary(seconds: list[float]) -> dict[str, float]:
    """count, mean and p50/p95/p99 of a list of latencies, in milliseconds."""
    ms = np.asarray(seconds, np.float64) * 1e3
    if ms.size == 0:
        return {"count": 0}
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"count": int(ms.size), "mean_ms": float(ms.mean()), "p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def closed_loop(work: Callable[[int, int], None], concurrency: int, budget_s: float) -> dict:
    """``concurrency`` workers each call ``work(worker, i)`` back to back until ``budget_s`` has
    passed (at least once each). Returns latencies, wall time and throughput (requests/s)."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    started = time.perf_counter()

    def worker(index: int) -> None:
        i = 0
        while not errors and (i == 0 or time.perf_counter() - started < budget_s):
            t0 = time.perf_counter()
            try:
                work(index, i)
            except BaseException as exc:  # reported after the workers stopped
                with lock:
                    errors.append(exc)
                return
            with lock:
                latencies.append(time.perf_counter() - t0)
            i += 1

    threads = [threading.Thread(target=worker, args=(w,), name=f"bench-{w}") for w in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    wall = time.perf_counter() - started
    return {"concurrency": concurrency, "wall_s": wall, "requests": len(latencies),
            "throughput_per_s": len(latencies) / wall, "latency": latency_summary(latencies)}


# --- Triton statistics ---------------------------------------------------------------------------
STAT_FIELDS = ("queue", "compute_input", "compute_infer", "compute_output")


def triton_statistics(client, models: list[str]) -> dict[str, dict[str, int]]:
    """Cumulative request count, execution count and ns per phase of each model (statistics API)."""
    out = {}
    for name in models:
        stats = client.get_inference_statistics(model_name=name).model_stats[0]
        inference = stats.inference_stats
        # per-request phase times count a dynamic batch's time once for every request in it;
        # batch_stats count each execution once (the compute the model really did)
        executed = sum(b.compute_infer.ns for b in stats.batch_stats) or inference.compute_infer.ns
        out[name] = {"requests": inference.success.count, "executions": stats.execution_count,
                     "request_ns": inference.success.ns, "executed_infer_ns": executed,
                     **{f"{f}_ns": getattr(inference, f).ns for f in STAT_FIELDS}}
    return out


def statistics_delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per model: requests, executions (batches) and mean ms per request of every phase in between."""
    out = {}
    for name, end in after.items():
        d = {k: end[k] - before[name][k] for k in end}
        n = max(d["requests"], 1)
        out[name] = {"requests": d["requests"], "executions": d["executions"],
                     "total_ms": d["request_ns"] / 1e6, "request_ms": d["request_ns"] / 1e6 / n,
                     "executed_infer_ms": d["executed_infer_ns"] / 1e6,
                     **{f"{f}_ms": d[f"{f}_ns"] / 1e6 / n for f in STAT_FIELDS}}
    return out


# --- memory ------------------------------------------------------------------------------------
def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_rss_mb(pid: int | None = None) -> float:
    """VmHWM (peak resident set) of a process, MiB."""
    return _status_kb(pid or os.getpid(), "VmHWM") / 1024


def reset_peak_rss() -> float:
    """Return freed heap to the OS and restart this process's VmHWM at its current RSS (MiB)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_kb(os.getpid(), "VmRSS") / 1024


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def tritonserver_pids(parent: int | None = None) -> list[int]:
    """The tritonserver child of ``parent`` (default: this process) and all its descendants (stubs)."""
    servers = [p for p in _children(parent or os.getpid()) if Path(f"/proc/{p}/comm").read_text().strip() == "tritonserver"]
    found, todo = [], list(servers)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(_children(pid))
    return found


def server_peak_mb(pids: list[int]) -> dict[str, float]:
    """Peak RSS of the server processes: tritonserver itself, and the sum over it and its stubs."""
    peaks = {}
    for pid in pids:
        try:
            peaks[pid] = peak_rss_mb(pid)
        except OSError:  # exited
            continue
    server = peaks.get(pids[0], 0.0) if pids else 0.0
    return {"tritonserver_mb": server, "with_stubs_mb": sum(peaks.values()), "processes": len(peaks)}
