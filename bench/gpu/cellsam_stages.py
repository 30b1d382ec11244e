"""The CellSAM stages of `make gpu-check`: build, encoder, CellFinder, decoder chunks, end to end."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from .harness import MATCH_IOU, QUICK_VARIANT, Run
from .numerics import count_flops, cuda_graph, keep_norms_fp32, match_labels, paint, precision, relative_error

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


def with_graphs(run: Run, out: dict, eager: list[tuple], graphed: list[tuple]) -> list[tuple]:
    """The variants to time, each with a last element "CUDA graph": ``eager`` always, ``graphed``
    on cuda only (``out`` notes the skip elsewhere)."""
    if not run.cuda:
        out["graphs"] = "skipped on cpu"
    return [(*v, False) for v in eager] + ([(*v, True) for v in graphed] if run.cuda else [])


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

    variants = with_graphs(run, out, [(p, b) for p in run.precisions for b in run.plan.batches],
                           [(p, b) for p in ("fp16", "bf16") for b in run.plan.batches])
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
    variants = with_graphs(run, out, [(c, p) for c in run.plan.chunks for p in ("fp32", run.half)],
                           [(c, p) for c in run.plan.chunks for p in ("fp32", "fp16", "bf16")])
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
