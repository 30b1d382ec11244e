"""Precision contexts, CUDA graphs, error and FLOP counts, label-image agreement (`make gpu-check`)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import numpy as np

from .harness import MATCH_IOU


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
