"""`make bench` (``python -m bench.serving``): the served CellSAM pipeline vs in-process PyTorch vs raw ONNX Runtime.

One run, same images, same weights, same box selection, so that every figure is a ratio from
one machine at one time:

- reference: CellSAM's published way, in-process PyTorch: encoder, CellFinder, CellSAM's box
  selection, then SAM's prompt encoder + mask decoder once per box; up-sampling in PyTorch.
- onnxruntime: the exported ONNX files in plain ONNX Runtime sessions in this process, the
  pipeline's steps (decoder in chunks of ``decoder_chunk`` boxes), the client's pre/post-processing.
- served: the same ONNX files behind a real tritonserver (embedded, CPU) through the client.

End to end uses the detector. Random-weight detectors keep arbitrary box counts, so each image's
``bbox_threshold`` is set (from the reference detector's output, the same value for all three
methods) to keep about as many boxes as the image has cells. The decode comparison uses a fixed
set of prompts: the ground-truth cell boxes, decoded one box a call in PyTorch and in ONNX Runtime
and in chunks in ONNX Runtime and served, so ``speedup_decode`` splits into runtime x batching x
serving. Every path is warmed up on the first image; PyTorch and ONNX Runtime run before the
server starts. Outputs ``results.{json,md}`` (machine and git commit included; README's table is
``results.md``) and ``results.png``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellsam_triton.contracts import CELLSAM, NAMES, Family
from cellsam_triton.errors import UserError

from .measure import (
    BenchImage,
    bench_images,
    closed_loop,
    latency_summary,
    peak_rss_mb,
    reset_peak_rss,
    server_peak_mb,
    statistics_delta,
    triton_statistics,
    tritonserver_pids,
)
from .report import machine, write_results

QUICK = {"images": 1, "cells": "3,10", "levels": "1,2", "level_seconds": 0.0, "shm_rounds": 1}
TARGETS = {"speedup_end_to_end": (">=", 1.0), "speedup_decode": (">=", 1.5), "triton_overhead": ("<=", 0.10)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="CellSAM checkpoint (official layout) the reference loads")
    parser.add_argument("--repository", type=Path, default=Path("build/bench/repository"), metavar="DIR",
                        help="cpu-target repository of that checkpoint; exported first when it holds no cellsam model")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/dsb2018"), metavar="DIR", help="DSB-layout data")
    parser.add_argument("--images", type=int, default=3, help="512x512 crops to use (default %(default)s)")
    parser.add_argument("--size", type=int, default=512, help="crop side (default %(default)s)")
    parser.add_argument("--cells", default="20,60", metavar="MIN,MAX", help="ground-truth cells per crop (default %(default)s)")
    parser.add_argument("--levels", default="1,2,4,8", help="client concurrency levels (default %(default)s)")
    parser.add_argument("--level-seconds", type=float, default=60.0,
                        help="time budget per concurrency level above 1; every worker finishes at least one request (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("bench"), metavar="DIR", help="writes results.json and results.png (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per served request (default %(default)s)")
    parser.add_argument("--shm-rounds", type=int, default=3,
                        help="rounds of the same served requests with and without system shared memory (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")


# --- the three methods -------------------------------------------------------------------------
def loop_decode(decoder, embeddings, boxes) -> tuple[np.ndarray, np.ndarray]:
    """CellSAM's decoding: SAM's prompt encoder + mask decoder once per box (multimask off)."""
    import torch

    pe, md = decoder.prompt_encoder, decoder.mask_decoder
    masks, ious = [], []
    with torch.no_grad():
        for box in torch.as_tensor(boxes).reshape(-1, 4):
            sparse, dense = pe(points=None, boxes=box.reshape(1, 1, 4), masks=None)
            mask, iou = md(image_embeddings=embeddings, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
                           dense_prompt_embeddings=dense, multimask_output=False)
            masks.append(mask[0].numpy())
            ious.append(iou[0].numpy())
    if not masks:
        return np.zeros((0, 1, 256, 256), np.float32), np.zeros((0, 1), np.float32)
    return np.stack(masks), np.stack(ious)


def calibrate_threshold(logits: np.ndarray, boxes: np.ndarray, target: int, size: int) -> tuple[float, int]:
    """The bbox_threshold for which CellSAM's selection keeps about ``target`` boxes, and the count.

    The selection keeps scores above BBOX_WEIGHT * bbox_threshold + (k-means term), so the
    threshold that puts the cut between the target-th and the next score is solved for directly
    (it may be negative: random detectors score every query alike).
    """
    from cellsam_triton.model_repository import selection

    _, scores = selection.top_pairs(logits, boxes, size)  # best first
    k = int(np.clip(target, 1, len(scores)))
    cut = (scores[k - 1] + scores[k]) / 2 if k < len(scores) else scores[-1] / 2
    threshold = float((cut - selection.kmeans_threshold(scores, 0.0)) / selection.BBOX_WEIGHT)
    return threshold, len(selection.select_cellfinder(logits, boxes, size, threshold)[0])


@dataclass
class Reference:
    """CellSAM's published path in PyTorch; ``run`` returns labels and per-stage seconds."""

    modules: object
    family: Family = CELLSAM

    def run(self, item: BenchImage, threshold: float | None) -> dict:
        import torch
        import torch.nn.functional as F

        from cellsam_triton.client.cellsam_rules import detector_input, normalize, segmenter_input
        from cellsam_triton.client.images import to_channels_last3
        from cellsam_triton.client.labels import fill_holes_and_remove_small
        from cellsam_triton.model_repository import selection

        t = [time.perf_counter()]
        norm = normalize(to_channels_last3(item.image))
        x, d = torch.from_numpy(segmenter_input(norm)), torch.from_numpy(detector_input(norm))
        t.append(time.perf_counter())
        with torch.no_grad():
            embeddings = self.modules.encoder(x)
            t.append(time.perf_counter())
            logits, raw_boxes = self.modules.cellfinder(d)
        t.append(time.perf_counter())
        logits, raw_boxes = logits.numpy()[0], raw_boxes.numpy()[0]
        if threshold is None:  # not timed: picks the threshold all three methods then use
            threshold, _ = calibrate_threshold(logits, raw_boxes, len(item.boxes), self.family.input_size)
        t_select = time.perf_counter()
        boxes, _ = selection.select_cellfinder(logits, raw_boxes, self.family.input_size, threshold)
        low_res, _ = loop_decode(self.modules.decoder, embeddings, boxes)
        t.append(time.perf_counter())
        masks = torch.from_numpy(low_res).reshape(-1, 1, *low_res.shape[-2:])
        size = self.family.input_size
        masks = F.interpolate(F.interpolate(masks, (size, size), mode="bilinear", align_corners=False),
                              item.image.shape[:2], mode="bilinear", align_corners=False)
        binary = (torch.sigmoid(masks[:, 0]) > self.family.mask_threshold).numpy()
        labels = (binary * np.arange(1, len(binary) + 1)[:, None, None]).max(axis=0) if len(binary) else np.zeros(item.image.shape[:2], np.int64)
        labels, _ = fill_holes_and_remove_small(labels.astype(np.int64), self.family.min_cell_area)
        t.append(time.perf_counter())
        calibration_s = t_select - t[3]
        stages = {"pre_s": t[1] - t[0], "encoder_s": t[2] - t[1], "detector_s": t[3] - t[2],
                  "select_and_decode_s": t[4] - t_select, "post_s": t[5] - t[4]}
        return {"labels": labels, "boxes": len(boxes), "threshold": threshold,
                "embeddings": embeddings, "stages": stages, "seconds": t[5] - t[0] - calibration_s}


@dataclass
class OrtPipeline:
    """The pipeline's steps on plain ONNX Runtime sessions: a `RunRequests` for the client rules."""

    repository: Path
    family: Family = CELLSAM
    threads: int = 0
    stage_s: dict = field(default_factory=lambda: defaultdict(float))
    last_embeddings: np.ndarray | None = None

    def __post_init__(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        path = lambda name: str(self.repository / name / "1" / "model.onnx")  # noqa: E731
        f = self.family
        self.encoder, self.detector, self.decoder = (
            ort.InferenceSession(path(n), options, providers=["CPUExecutionProvider"])
            for n in (f.encoder_name, f.detector_name, f.decoder_name)
        )

    def _timed(self, stage: str, session, outputs: list[str], feeds: dict) -> list[np.ndarray]:
        started = time.perf_counter()
        result = session.run(outputs, feeds)
        self.stage_s[stage] += time.perf_counter() - started
        return result

    def decode(self, embeddings: np.ndarray, boxes: np.ndarray, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mask logits [N,m,m] and IoUs [N], ``chunk`` (default ``decoder_chunk``) boxes per session call."""
        chunk = chunk or self.family.decoder_chunk
        masks, ious = [], []
        for start in range(0, len(boxes), chunk):
            low, iou = self._timed("decoder_s", self.decoder, [NAMES.low_res_masks, NAMES.iou_predictions],
                                   {NAMES.image_embeddings: embeddings, NAMES.boxes: boxes[start:start + chunk]})
            masks.append(low[:, 0])
            ious.append(iou[:, 0])
        m = self.family.low_res_size
        return (np.concatenate(masks), np.concatenate(ious)) if masks else (np.zeros((0, m, m), np.float32), np.zeros(0, np.float32))

    def __call__(self, requests):
        from cellsam_triton.client.types import PipelineResult
        from cellsam_triton.model_repository import selection

        results = []
        for r in requests:
            (embeddings,) = self._timed("encoder_s", self.encoder, [NAMES.image_embeddings], {NAMES.image: r[NAMES.image]})
            self.last_embeddings = embeddings
            if NAMES.boxes in r:
                boxes, scores = r[NAMES.boxes], np.ones(len(r[NAMES.boxes]), np.float32)
            else:
                logits, raw = self._timed("detector_s", self.detector, [NAMES.pred_logits, NAMES.pred_boxes], {NAMES.image: r[NAMES.detector_image]})
                boxes, scores = selection.select_cellfinder(logits[0], raw[0], self.family.input_size, float(r[NAMES.bbox_threshold][0]))
            boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
            masks, ious = self.decode(embeddings, boxes)
            threshold = r[NAMES.iou_threshold][0]
            keep = np.ones(len(ious), bool) if threshold < 0 else ious >= threshold
            results.append(PipelineResult(boxes[keep], np.asarray(scores, np.float32)[keep], ious[keep],
                                          masks[keep].astype(np.float16), np.flatnonzero(keep).astype(np.int32)))
        return results


class WireCounter:
    """Wraps a `RunRequests` and counts payload bytes each way (tensor bytes; gRPC framing excluded)."""

    def __init__(self, run) -> None:
        self._run, self.sent, self.received, self.requests, self.last_boxes = run, 0, 0, 0, 0

    def __call__(self, requests):
        results = self._run(requests)
        self.requests += len(requests)
        self.last_boxes = sum(len(res.boxes) for res in results)
        self.sent += sum(a.nbytes for r in requests for a in r.values())
        self.received += sum(getattr(res, f).nbytes for res in results for f in ("boxes", "scores", "iou_predictions", "masks", "prompt_index"))
        return results


def segment_with(run, item: BenchImage, threshold: float, boxes: np.ndarray | None = None):
    """The client's CellSAM rules (pre-processing, request, post-processing) over ``run``."""
    from cellsam_triton.client import cellsam_rules
    from cellsam_triton.client.types import SegmentOptions

    options = SegmentOptions(bbox_threshold=threshold, iou_threshold=-1.0)
    return cellsam_rules.segment(item.image, run, CELLSAM, boxes, options)


# --- phases ------------------------------------------------------------------------------------
def reference_phase(checkpoint: Path, images: list[BenchImage]) -> dict:
    import torch

    from cellsam_triton.client.cellsam_rules import boxes_to_model
    from cellsam_triton.export.models.cellsam import build_cellsam, load_checkpoint

    reference = Reference(build_cellsam(load_checkpoint(checkpoint)))
    warm = reference.run(images[0], None)  # untimed warm-up, as every compared path gets
    loop_decode(reference.modules.decoder, warm["embeddings"], torch.from_numpy(boxes_to_model(images[0].boxes[:1], images[0].image.shape[:2])))
    del warm
    rows = []
    for item in images:
        out = reference.run(item, None)
        prompts = torch.from_numpy(boxes_to_model(item.boxes, item.image.shape[:2]))
        started = time.perf_counter()
        loop_decode(reference.modules.decoder, out.pop("embeddings"), prompts)
        out["gt_decode_s"] = time.perf_counter() - started
        rows.append(out)
    del reference
    gc.collect()
    return {"rows": rows, "torch_threads": torch.get_num_threads()}


def ort_phase(repository: Path, images: list[BenchImage], thresholds: list[float]) -> dict:
    from cellsam_triton.client.cellsam_rules import boxes_to_model

    pipeline = OrtPipeline(repository)
    counter = WireCounter(pipeline)
    segment_with(pipeline, images[0], thresholds[0])  # untimed warm-up, as every compared path gets
    rows = []
    for item, threshold in zip(images, thresholds):
        pipeline.stage_s.clear()
        started = time.perf_counter()
        result = segment_with(counter, item, threshold)
        seconds = time.perf_counter() - started
        stages = dict(pipeline.stage_s)
        prompts = boxes_to_model(item.boxes, item.image.shape[:2])
        decode_s = {}
        for name, chunk in (("gt_decode_s", None), ("gt_decode_loop_s", 1)):  # chunks vs one box a call
            pipeline.stage_s.clear()
            pipeline.decode(pipeline.last_embeddings, prompts, chunk)
            decode_s[name] = pipeline.stage_s["decoder_s"]
        rows.append({"labels": result.labels, "boxes": counter.last_boxes, "seconds": seconds, "stages": stages, **decode_s})
    del pipeline
    gc.collect()
    return {"rows": rows}


def served_phase(url: str, images: list[BenchImage], thresholds: list[float], levels: list[int], budget_s: float, timeout_s: float) -> dict:
    import tritonclient.grpc as grpcclient

    from cellsam_triton.client.transport import TritonTransport

    family = CELLSAM
    models = [family.pipeline_name, family.encoder_name, family.detector_name, family.decoder_name]
    stats_client = grpcclient.InferenceServerClient(url)
    transports = [TritonTransport(url, family.name, timeout_s=timeout_s, max_in_flight=1) for _ in range(max(levels))]
    try:
        wire = WireCounter(transports[0].run)
        segment_with(transports[0].run, images[0], thresholds[0])  # warm-up: lazy imports, first allocations
        before = triton_statistics(stats_client, models)
        rows, latencies = [], []
        for item, threshold in zip(images, thresholds):  # concurrency 1: one pass, paired with the others
            started = time.perf_counter()
            result = segment_with(wire, item, threshold)
            latencies.append(time.perf_counter() - started)
            rows.append({"labels": result.labels, "boxes": wire.last_boxes, "seconds": latencies[-1]})
        middle = triton_statistics(stats_client, models)
        for item in images:  # fixed prompts: the ground-truth boxes
            segment_with(transports[0].run, item, 0.0, boxes=item.boxes)
        after = triton_statistics(stats_client, models)
        level_rows = [{"concurrency": 1, "wall_s": sum(latencies), "requests": len(latencies),
                       "throughput_per_s": len(latencies) / sum(latencies), "latency": latency_summary(latencies)}]
        for level in (c for c in levels if c > 1):
            work = lambda w, i: segment_with(transports[w].run, images[(w + i) % len(images)], thresholds[(w + i) % len(images)])  # noqa: E731
            level_rows.append(closed_loop(work, level, budget_s))
        return {"rows": rows, "stages": statistics_delta(before, middle), "gt_stages": statistics_delta(middle, after),
                "levels": level_rows, "wire": {"request_bytes_per_image": wire.sent / wire.requests,
                                               "response_bytes_per_image": wire.received / wire.requests}}
    finally:
        for transport in transports:
            transport.close()
        stats_client.close()


def shared_memory_phase(url: str, images: list[BenchImage], rounds: int, timeout_s: float) -> dict:
    """The same served requests (ground-truth box prompts) with inputs over gRPC and over system
    shared memory, alternating which goes first each round; mean client latency of each."""
    from cellsam_triton.client.transport import TritonTransport

    seconds: dict[str, list[float]] = {"grpc": [], "shared_memory": []}
    labels: dict[str, list[np.ndarray]] = {"grpc": [], "shared_memory": []}
    with TritonTransport(url, CELLSAM.name, timeout_s=timeout_s, max_in_flight=1) as grpc, \
            TritonTransport(url, CELLSAM.name, timeout_s=timeout_s, max_in_flight=1, shared_memory=True) as shm:
        paths = {"grpc": grpc, "shared_memory": shm}
        for name, transport in paths.items():  # warm-up: connection, region creation and registration
            segment_with(transport.run, images[0], 0.0, boxes=images[0].boxes)
        for r in range(max(1, rounds)):
            for item in images:
                for name in (("grpc", "shared_memory") if r % 2 == 0 else ("shared_memory", "grpc")):
                    started = time.perf_counter()
                    result = segment_with(paths[name].run, item, 0.0, boxes=item.boxes)
                    seconds[name].append(time.perf_counter() - started)
                    if r == 0:
                        labels[name].append(result.labels)
    mean = {name: float(np.mean(v)) for name, v in seconds.items()}
    request_bytes = 3 * CELLSAM.input_size**2 * 4  # the segmenter image, FP32 (box prompts: no detector image)
    return {
        "requests_per_path": len(seconds["grpc"]),
        "grpc_mean_ms": mean["grpc"] * 1e3,
        "shared_memory_mean_ms": mean["shared_memory"] * 1e3,
        "saved_ms_per_request": (mean["grpc"] - mean["shared_memory"]) * 1e3,
        "gain": mean["grpc"] / max(mean["shared_memory"], 1e-9),
        "input_bytes_per_request": request_bytes,
        "latency": {name: latency_summary(v) for name, v in seconds.items()},
        "labels_identical": all(np.array_equal(a, b) for a, b in zip(labels["grpc"], labels["shared_memory"])),
        "note": "same requests (ground-truth box prompts), one client thread, order alternated per round; "
                "inputs through a registered /dev/shm region instead of the gRPC message, outputs over gRPC",
    }


# --- orchestration -----------------------------------------------------------------------------
def ensure_repository(checkpoint: Path, repository: Path) -> None:
    """Export ``checkpoint`` into ``repository`` (cpu target) unless it holds a newer CellSAM export."""
    config = repository / CELLSAM.pipeline_name / "config.pbtxt"
    if config.is_file() and config.stat().st_mtime >= checkpoint.stat().st_mtime:
        return
    from cellsam_triton.cli import main

    if main(["export", "--model", "cellsam", "--checkpoint", str(checkpoint), "--repository", str(repository)]) != 0:
        raise UserError(f"export of {checkpoint} failed")


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels on which two label images agree about cell vs background."""
    return float(((a > 0) == (b > 0)).mean())


def summarize(images, ref: dict, ort: dict, served: dict, memory: dict, setup: dict) -> dict:
    """results.json: headline ratios, then every measurement they come from."""
    seconds = {name: [r["seconds"] for r in phase["rows"]] for name, phase in (("reference_pytorch", ref), ("onnxruntime", ort), ("served", served))}
    total = {name: sum(v) for name, v in seconds.items()}
    boxes_gt = [len(i.boxes) for i in images]
    decode = {
        "prompts": "ground-truth cell boxes (fixed count per image)",
        "boxes_per_image": boxes_gt,
        "reference_loop_s": sum(r["gt_decode_s"] for r in ref["rows"]),
        "onnxruntime_loop_s": sum(r["gt_decode_loop_s"] for r in ort["rows"]),
        "onnxruntime_chunked_s": sum(r["gt_decode_s"] for r in ort["rows"]),
        "served_decoder_stage_s": served["gt_stages"][CELLSAM.decoder_name]["total_ms"] / 1e3,
    }
    decode["ms_per_box"] = {k[:-2]: v * 1e3 / max(sum(boxes_gt), 1) for k, v in decode.items() if k.endswith("_s")}
    ratio = lambda a, b: decode[a] / max(decode[b], 1e-9)  # noqa: E731
    # speedup_decode = runtime x batching x serving, each factor one change at a time
    decode["factors"] = {"runtime": ratio("reference_loop_s", "onnxruntime_loop_s"),
                         "batching": ratio("onnxruntime_loop_s", "onnxruntime_chunked_s"),
                         "serving": ratio("onnxruntime_chunked_s", "served_decoder_stage_s")}
    ref_stages = {k: sum(r["stages"][k] for r in ref["rows"]) for k in ref["rows"][0]["stages"]}
    ort_stages = {k: sum(r["stages"].get(k, 0.0) for r in ort["rows"]) for k in ("encoder_s", "detector_s", "decoder_s")}
    results = {
        "speedup_end_to_end": total["reference_pytorch"] / total["served"],
        "speedup_decode": decode["reference_loop_s"] / max(decode["served_decoder_stage_s"], 1e-9),
        "triton_overhead": total["served"] / total["onnxruntime"] - 1.0,
        "setup": setup,
        "end_to_end": {name: {"per_image_s": v, "total_s": total[name], "latency": latency_summary(v)} for name, v in seconds.items()},
        "boxes_decoded": {"reference_pytorch": [r["boxes"] for r in ref["rows"]],
                          "onnxruntime": [r["boxes"] for r in ort["rows"]], "served": [r["boxes"] for r in served["rows"]],
                          "bbox_threshold": [r["threshold"] for r in ref["rows"]], "ground_truth_cells": boxes_gt},
        "stages": {"reference_pytorch_s": ref_stages, "onnxruntime_s": ort_stages, "served_triton_statistics": served["stages"]},
        "decode": decode,
        "concurrency": served["levels"],
        "wire": served["wire"],
        "memory": memory,
        "checks": {
            "cell_pixels_agree_served_vs_onnxruntime": [agreement(a["labels"], b["labels"]) for a, b in zip(served["rows"], ort["rows"])],
            "cell_pixels_agree_served_vs_reference": [agreement(a["labels"], b["labels"]) for a, b in zip(served["rows"], ref["rows"])],
        },
    }
    results["targets_met"] = {
        f"{key} {op} {bound}": bool(results[key] >= bound if op == ">=" else results[key] <= bound) for key, (op, bound) in TARGETS.items()
    }
    return results


def markdown(results: dict) -> str:
    """results.md (and README's <!-- serving --> block): the headline table, every figure from ``results``."""
    setup, m = results["setup"], results["setup"]["machine"]
    e2e, decode, per_box, factors = results["end_to_end"], results["decode"], results["decode"]["ms_per_box"], results["decode"]["factors"]
    n = len(setup["images"])
    cells = "/".join(str(c) for c in results["boxes_decoded"]["ground_truth_cells"])
    stages = results["stages"]
    served = stages["served_triton_statistics"]
    per_image = lambda d, k: d[k] / n  # noqa: E731
    fmt_t = lambda key: f"{'>=' if TARGETS[key][0] == '>=' else '<='} {TARGETS[key][1]:g}"  # noqa: E731
    levels = " / ".join(f"{lv['throughput_per_s']:.3f}" for lv in results["concurrency"])
    concurrency = " / ".join(str(lv["concurrency"]) for lv in results["concurrency"])
    memory, shm = results["memory"], results.get("shared_memory")
    agree = lambda key: ", ".join(f"{v:.4f}" for v in results["checks"][key])  # noqa: E731
    lines = [
        "# make bench: served CellSAM vs in-process PyTorch vs raw ONNX Runtime", "",
        f"{m['cpu']}, {m['cores']} cores, no GPU; onnxruntime {m['onnxruntime']}, torch threads {setup['torch_threads']}; "
        f"commit {m['git_commit'][:10]}{' (local changes)' if m.get('git_dirty') else ''}; {m['date']}; "
        f"load average {m['load_average_start']:.1f} at the start, {m['load_average_end']:.1f} at the end; "
        f"{n} {setup['size']}x{setup['size']} DSB images with {cells} cells; checkpoint `{Path(setup['checkpoint']).name}` (official layout).", "",
        "| figure | value | target |", "| --- | --- | --- |",
        f"| `speedup_end_to_end` (reference PyTorch {e2e['reference_pytorch']['total_s']:.1f} s / served {e2e['served']['total_s']:.1f} s "
        f"for the {n} images) | **{results['speedup_end_to_end']:.2f}x** | {fmt_t('speedup_end_to_end')} |",
        f"| `speedup_decode` (reference one box at a time {per_box['reference_loop']:.1f} ms/box / served decoder stage "
        f"{per_box['served_decoder_stage']:.1f} ms/box, chunks of {setup['decoder_chunk']}) | **{results['speedup_decode']:.2f}x** | {fmt_t('speedup_decode')} |",
        f"| of which runtime (PyTorch {per_box['reference_loop']:.1f} vs ONNX Runtime {per_box['onnxruntime_loop']:.1f} ms/box, both one box a call) "
        f"| {factors['runtime']:.2f}x | |",
        f"| of which batching (ONNX Runtime one box a call {per_box['onnxruntime_loop']:.1f} vs chunks of {setup['decoder_chunk']} "
        f"{per_box['onnxruntime_chunked']:.1f} ms/box) | {factors['batching']:.2f}x | |",
        f"| of which serving (ONNX Runtime chunks {per_box['onnxruntime_chunked']:.1f} vs served decoder stage "
        f"{per_box['served_decoder_stage']:.1f} ms/box) | {factors['serving']:.2f}x | |",
        f"| `triton_overhead` (served {e2e['served']['total_s']:.1f} s vs raw ONNX Runtime {e2e['onnxruntime']['total_s']:.1f} s, "
        f"same ONNX files, same steps) | **{results['triton_overhead']:+.1%}** | {fmt_t('triton_overhead')[:3]}{TARGETS['triton_overhead'][1]:.0%} |",
        f"| stages per image, PyTorch reference | encoder {per_image(stages['reference_pytorch_s'], 'encoder_s'):.2f} s, detector "
        f"{per_image(stages['reference_pytorch_s'], 'detector_s'):.2f} s, select + decode {per_image(stages['reference_pytorch_s'], 'select_and_decode_s'):.2f} s | |",
        f"| stages per image, raw ONNX Runtime | encoder {per_image(stages['onnxruntime_s'], 'encoder_s'):.2f} s, detector "
        f"{per_image(stages['onnxruntime_s'], 'detector_s'):.2f} s, decoder {per_image(stages['onnxruntime_s'], 'decoder_s'):.2f} s | |",
        "| stages per request, served (Triton statistics) | " + ", ".join(
            f"{name.removeprefix(CELLSAM.name + '_') if name != CELLSAM.name else 'pipeline'} {row['request_ms'] / 1e3:.2f} s"
            for name, row in served.items()) + " | |",
        f"| bytes on the wire per image | {results['wire']['request_bytes_per_image'] / 1e6:.1f} MB request, "
        f"{results['wire']['response_bytes_per_image'] / 1e6:.1f} MB response | |",
        f"| throughput at concurrency {concurrency} | {levels} images/s | |",
        f"| peak memory | client {memory['client_peak_mb'] / 1024:.1f} GB (served phase); tritonserver {memory['server']['tritonserver_mb'] / 1024:.1f} GB, "
        f"with its Python-backend stubs {memory['server']['with_stubs_mb'] / 1024:.1f} GB (sum of per-process peaks) | |",
        f"| cell/background pixel agreement, served vs raw ONNX Runtime / served vs reference | {agree('cell_pixels_agree_served_vs_onnxruntime')} / "
        f"{agree('cell_pixels_agree_served_vs_reference')} | |",
    ]
    if shm:
        lines.append(f"| inputs over system shared memory vs gRPC ({shm['requests_per_path']} requests each) | {shm['shared_memory_mean_ms']:.0f} vs "
                     f"{shm['grpc_mean_ms']:.0f} ms per request ({shm['gain']:.3f}x), labels identical: {shm['labels_identical']} | |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Four panels: end to end per method, decode ms per box, latency and throughput vs concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    e2e = results["end_to_end"]
    axes[0].bar(list(e2e), [v["total_s"] / len(v["per_image_s"]) for v in e2e.values()], color=["grey", "tab:blue", "tab:green"])
    axes[0].set(title="end to end, s per image", ylabel="s")
    per_box = results["decode"]["ms_per_box"]
    axes[1].bar(list(per_box), list(per_box.values()), color=["grey", "tab:blue", "tab:green"])
    axes[1].set(title="decode (ground-truth boxes), ms per box", ylabel="ms")
    levels = results["concurrency"]
    c = [lv["concurrency"] for lv in levels]
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        axes[2].plot(c, [lv["latency"][key] / 1e3 for lv in levels], marker="o", label=key[:3])
    axes[2].set(title="served latency", xlabel="concurrency", ylabel="s", xscale="log", xticks=c, xticklabels=c)
    axes[2].legend()
    axes[3].plot(c, [lv["throughput_per_s"] * 60 for lv in levels], marker="o", color="tab:green")
    axes[3].set(title="served throughput", xlabel="concurrency", ylabel="images per minute", xscale="log", xticks=c, xticklabels=c)
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelrotation=15)
    fig.suptitle(f"{results['setup']['machine']['cpu']} ({results['setup']['machine']['cores']} cores, no GPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bench(args: argparse.Namespace) -> dict:
    """Run everything; returns the results dict (also written to ``args.out``)."""
    from cellsam_triton.server import EmbeddedServer

    levels = sorted({int(x) for x in str(args.levels).split(",") if x.strip()} | {1})
    if min(levels) < 1:
        raise UserError(f"--levels must be positive integers, got {args.levels!r}")
    cells = tuple(int(x) for x in str(args.cells).split(","))
    if len(cells) != 2 or not 0 < cells[0] <= cells[1]:
        raise UserError(f"--cells must be MIN,MAX with 0 < MIN <= MAX, got {args.cells!r}")
    images = bench_images(args.data, args.images, args.size, cells)
    ensure_repository(args.checkpoint, args.repository)
    setup = {"machine": machine(), "images": [i.id for i in images], "size": args.size, "checkpoint": str(args.checkpoint),
             "levels": levels, "level_seconds": args.level_seconds, "decoder_chunk": CELLSAM.decoder_chunk,
             "note": "bbox_threshold per image chosen from the reference detector so the random detector keeps about "
                     "as many boxes as the image has cells; the same value for all three methods. Every path gets one "
                     "untimed warm-up image before its timed pass; PyTorch and ONNX Runtime run in this process "
                     "before tritonserver starts (no server holding cores or memory), the served path after."}
    started = time.perf_counter()
    # the in-process paths run with no server up (nothing else holds memory or cores), each after a
    # warm-up; then the server starts and the served path gets its own warm-up
    ref = reference_phase(args.checkpoint, images)
    thresholds = [r["threshold"] for r in ref["rows"]]
    ort = ort_phase(args.repository, images, thresholds)
    with tempfile.TemporaryDirectory(prefix="cellsam-bench-") as tmp, EmbeddedServer(args.repository, log_path=Path(tmp) / "triton.log") as server:
        pids = tritonserver_pids()
        baseline = reset_peak_rss()
        served = served_phase(server.grpc_url, images, thresholds, levels, args.level_seconds, args.timeout)
        client_peak = peak_rss_mb()
        shm = shared_memory_phase(server.grpc_url, images, getattr(args, "shm_rounds", 3), args.timeout)
        memory = {"client_peak_mb": client_peak, "client_before_served_phase_mb": baseline,
                  "client_note": "peak RSS of this process during the served phase only (VmHWM reset before it)",
                  "server": server_peak_mb(pids),
                  "server_note": "VmHWM of tritonserver and of its Python-backend stubs (sum of per-process peaks)"}
    setup["machine"]["load_average_end"] = os.getloadavg()[0]
    setup["wall_s"] = time.perf_counter() - started
    setup["torch_threads"] = ref["torch_threads"]
    results = summarize(images, ref, ort, served, memory, setup)
    results["shared_memory"] = shm
    results["machine"] = setup["machine"]
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out, "results", results, markdown(results))
    plot(results, args.out / "results.png")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return exc.exit_code


def run(args: argparse.Namespace) -> int:
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if not args.checkpoint.is_file():
        raise UserError(f"checkpoint not found: {args.checkpoint}")
    results = bench(args)
    print(f"speedup_end_to_end {results['speedup_end_to_end']:.2f}  speedup_decode {results['speedup_decode']:.2f}  "
          f"triton_overhead {results['triton_overhead']:+.1%}  -> {args.out / 'results.json'}")
    factors = results["decode"]["factors"]
    print(f"speedup_decode = runtime {factors['runtime']:.2f}x * batching {factors['batching']:.2f}x * serving {factors['serving']:.2f}x")
    shm = results["shared_memory"]
    print(f"shared memory: {shm['shared_memory_mean_ms']:.0f} ms vs gRPC {shm['grpc_mean_ms']:.0f} ms per request "
          f"(gain {shm['gain']:.3f}x, {shm['saved_ms_per_request']:+.1f} ms saved), labels identical: {shm['labels_identical']}")
    for target, met in results["targets_met"].items():
        print(f"  {'ok  ' if met else 'MISS'} {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
