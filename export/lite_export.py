"""Export the default model family (LITE): LiteMedSAM encoder, CellFinder-lite, box and point decoders.

Writes ``DIR/<model>/1/model.onnx`` for the LITE models with the contract's tensor names, each
parity-checked against PyTorch on a second batch size, box count or window side too, so the
dynamic axes are proven, not only declared. With ``decoder_context="roi"`` (the default) the
window decoder (``<model>_roi_decoder``) is exported beside the full one, both from the decoder
weights fine-tuned on windows. ``<model>_point_decoder`` (point prompts and ``<model>_grid``) is
exported from its own weights, ``DEFAULT_POINT_DECODER_WEIGHTS`` unless given (export/point_export.py).
Detector and decoders go through ``export_onnx``;
the TinyViT encoder needs the dynamo exporter (TorchScript tracing freezes its batch size),
which ``export_onnx`` does not offer, so :func:`export_encoder` runs it and the same checks.
"""

from __future__ import annotations

from pathlib import Path

from cellsam_triton.contracts import LITE, NAMES
from cellsam_triton.errors import UserError

DEFAULT_DETECTOR_WEIGHTS = Path(__file__).resolve().parent / "weights" / "cellfinder_lite.pt"
# LiteMedSAM's mask decoder fine-tuned on DSB cells (`cellsam-triton train-decoder`); None: frozen.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# Per decoder context, the committed decoder weights: "full" fine-tuned on whole embeddings (the
# decoder served before ROI decoding), "roi" fine-tuned on the windows it is served with.
DEFAULT_DECODER_WEIGHTS = {"full": WEIGHTS_DIR / "lite_decoder.pt", "roi": WEIGHTS_DIR / "lite_decoder_roi.pt"}
# The one place that names the weights `cellsam_lite_point_decoder` (point prompts, `cellsam_lite_grid`)
# is exported from: a decoder trained for point prompts (`train-decoder --point-fraction`; its `.json`
# keeps the chain of training stages and the grid thresholds `select-grid` chose on train). A new
# file goes into the Makefile's WEIGHTS too, so `make export` follows it; `export
# --point-decoder-weights` overrides it per export.
DEFAULT_POINT_DECODER_WEIGHTS = WEIGHTS_DIR / "lite_decoder_points.pt"
FROZEN_MASK_THRESHOLD = 0.12  # frozen LiteMedSAM draws cells small: a low threshold (logit ~ -2)


def served_mask_threshold(path: Path, default: float) -> float:
    """The mask threshold recorded beside decoder weights (``default`` without a provenance file)."""
    import json

    beside = path.with_suffix(".json")
    if not beside.is_file():
        return default
    return float(json.loads(beside.read_text()).get("mask_threshold", default))


def detector_selection(path: Path) -> dict:
    """The Family fields a detector's weights decide: ``detector_reads_image`` (a pixel branch) and
    the score threshold and NMS IoU chosen on train (``selection`` in the provenance beside them,
    see export/train_detector.py; absent when none was recorded)."""
    import json

    from .models.detector_lite import load_detector

    fields = {"detector_reads_image": load_detector(path).reads_pixels} if path.is_file() else {}
    beside = path.with_suffix(".json")
    selection = (json.loads(beside.read_text()).get("selection") or {}) if beside.is_file() else {}
    if selection:
        fields.update(bbox_threshold=float(selection["score_threshold"]), nms_iou=float(selection["nms_iou"]))
    return fields


def grid_selection_record(path: Path | None) -> dict:
    """The whole `select-grid` record beside point decoder weights (export/grid_selection.py); {}
    when none was recorded. Recorded for other weights (their sha256 differs) is an error, not a
    silent mismatch."""
    import json

    from .training import sha256_file

    beside = None if path is None else Path(path).with_suffix(".json")
    if beside is None or not beside.is_file():
        return {}
    selection = json.loads(beside.read_text()).get("grid_selection") or {}
    if selection and selection.get("weights_sha256") != sha256_file(path):
        raise UserError(f"{beside}: grid_selection was made for other weights; run `cellsam-triton select-grid --weights {path}` again")
    return selection


def grid_selection(path: Path | None) -> dict:
    """The grid thresholds chosen on train for point decoder weights ({} when none was recorded)."""
    selection = grid_selection_record(path)
    return {k: selection[k] for k in ("pred_iou_threshold", "stability_threshold", "points_per_side")} if selection else {}


def served_family(decoder_weights: Path | None, decoder_context: str = LITE.decoder_context,
                  encoder_precision: str = LITE.encoder_precision, detector_weights: Path = DEFAULT_DETECTOR_WEIGHTS,
                  point_decoder_weights: Path | None = None):
    """LITE with its decoder context, encoder precision, the mask threshold its decoder is served
    with (recorded beside fine-tuned weights), the detector's selection chosen on train and the
    grid thresholds chosen on train for its point decoder."""
    import dataclasses

    if decoder_weights is None:
        threshold = FROZEN_MASK_THRESHOLD
    else:
        threshold = served_mask_threshold(Path(decoder_weights), LITE.mask_threshold)
    grid = dataclasses.replace(LITE.grid, **grid_selection(point_decoder_weights))
    return dataclasses.replace(LITE, mask_threshold=threshold, decoder_context=decoder_context, grid=grid,
                               encoder_precision=encoder_precision, **detector_selection(Path(detector_weights)))


def export_encoder(encoder, examples: list, path: Path, tolerance: float):
    """Dynamo export of the encoder (batch axis dynamic), checked like ``export_onnx`` does."""
    import time

    import numpy as np
    import onnxruntime as ort
    import torch

    from .onnx_export import ExportReport, graph_inputs

    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder.eval()
    batch = torch.export.Dim("batch", min=1, max=max(LITE.encoder_batch, 2))
    with torch.no_grad():
        torch.onnx.export(
            encoder,
            (examples[0],),
            str(path),
            input_names=[NAMES.image],
            output_names=[NAMES.image_embeddings],
            dynamic_shapes={"x": {0: batch}},
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    if graph_inputs(path) != [NAMES.image]:
        raise UserError(f"ONNX export of {path} has inputs {graph_inputs(path)}, expected {[NAMES.image]}")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    error = scale = 0.0
    for image in examples:
        with torch.no_grad():
            want = encoder(image).numpy()
        have = session.run([NAMES.image_embeddings], {NAMES.image: image.numpy()})[0]
        if have.shape != want.shape:
            raise UserError(f"ONNX output image_embeddings of {path} has shape {have.shape}, PyTorch {want.shape}")
        error = max(error, float(np.abs(have.astype(np.float64) - want).max()))
        scale = max(scale, float(np.abs(want).max()))
    report = ExportReport(path, {NAMES.image_embeddings: error}, tolerance, len(examples), time.perf_counter() - started, {NAMES.image_embeddings: scale})
    if not error <= tolerance * max(1.0, scale):
        raise UserError(f"ONNX parity check failed for {path}: max abs error {error:.2e}")
    return report


PARTS = ("encoder", "detector", "decoder", "roi_decoder", "point_decoder", "roi_point_decoder")


def export_lite(
    repository_dir: str | Path,
    detector_weights: str | Path = DEFAULT_DETECTOR_WEIGHTS,
    tolerance: float = 1e-3,
    parts: tuple[str, ...] = PARTS,
    decoder_weights: str | Path | None = DEFAULT_DECODER_WEIGHTS[LITE.decoder_context],
    decoder_context: str = LITE.decoder_context,
    encoder_precision: str = LITE.encoder_precision,
    point_decoder_weights: str | Path | None = DEFAULT_POINT_DECODER_WEIGHTS,
) -> list:
    """Export the LITE models named in ``parts`` under ``repository_dir``; their parity reports.

    ``decoder_weights``: fine-tuned mask decoder (``train-decoder``) loaded before export; None
    exports LiteMedSAM's own (frozen) decoder. The ROI decoder is exported only with
    ``decoder_context`` "roi". ``point_decoder_weights``: the same for the point decoder, on its
    own copy of the decoder. ``encoder_precision`` "int8": the encoder's weight MatMuls are
    quantised after the FP32 parity check (export/encoder_int8.py, cpu target)."""
    import copy

    import torch

    from .models.detector_lite import load_detector
    from .models.litemedsam import load_litemedsam
    from .onnx_export import export_onnx

    weights = Path(detector_weights)
    if "detector" in parts and not weights.is_file():
        raise UserError(f"CellFinder-lite weights not found: {weights} (train them with `cellsam-triton train-detector`)")
    from .train_decoder import load_decoder_weights

    lite = load_litemedsam()
    if LITE.grid.window <= 0:
        parts = tuple(p for p in parts if p != "roi_point_decoder")
    point_decoder = copy.deepcopy(lite.decoder) if {"point_decoder", "roi_point_decoder"} & set(parts) else None
    if point_decoder is not None and point_decoder_weights is not None:
        load_decoder_weights(point_decoder, Path(point_decoder_weights))
    if decoder_context != "roi":
        parts = tuple(p for p in parts if p != "roi_decoder")
    if decoder_weights is not None and {"decoder", "roi_decoder"} & set(parts):
        load_decoder_weights(lite.decoder, Path(decoder_weights))
    generator = torch.Generator().manual_seed(0)
    s, c, e = LITE.input_size, LITE.embed_dim, LITE.embed_size

    def image(batch: int) -> torch.Tensor:
        return torch.rand(batch, 3, s, s, generator=generator)

    def embeddings(batch: int) -> torch.Tensor:
        return torch.randn(batch, c, e, e, generator=generator) * 0.5

    def boxes(n: int) -> torch.Tensor:
        xy = torch.rand(n, 2, generator=generator) * (s - 64)
        wh = 8 + torch.rand(n, 2, generator=generator) * 56
        return torch.cat([xy, xy + wh], dim=1)

    def path(spec) -> Path:
        return Path(repository_dir) / spec.name / "1" / "model.onnx"

    reports = []
    if "encoder" in parts:
        reports.append(export_encoder(lite.encoder, [image(2), image(1)], path(LITE.encoder()), tolerance))
        if encoder_precision == "int8":
            reports.append(quantize_lite_encoder(lite.encoder, path(LITE.encoder()), image(1)))
    if "detector" in parts:
        detector = load_detector(weights)

        def detector_inputs(batch: int) -> dict:  # the tile image too when the detector has a pixel branch
            inputs = {NAMES.image_embeddings: embeddings(batch)}
            return {**inputs, NAMES.image: image(batch)} if detector.reads_pixels else inputs

        reports.append(
            export_onnx(
                detector,
                detector_inputs(2),
                [NAMES.pred_scores, NAMES.pred_boxes],
                {**{name: {0: "batch"} for name in detector_inputs(1)}, NAMES.pred_scores: {0: "batch"}, NAMES.pred_boxes: {0: "batch"}},
                path(LITE.detector_model()),
                tolerance,
                check_inputs=[detector_inputs(3)],
            )
        )
    if "decoder" in parts:
        one = embeddings(1)
        reports.append(
            export_onnx(
                lite.decoder,
                {NAMES.image_embeddings: one, NAMES.boxes: boxes(3)},
                [NAMES.low_res_masks, NAMES.iou_predictions],
                {NAMES.boxes: {0: "boxes"}, NAMES.low_res_masks: {0: "boxes"}, NAMES.iou_predictions: {0: "boxes"}},
                path(LITE.decoder()),
                tolerance,
                check_inputs=[{NAMES.image_embeddings: one, NAMES.boxes: boxes(1)}, {NAMES.image_embeddings: embeddings(1), NAMES.boxes: boxes(7)}],
            )
        )
    if "roi_decoder" in parts:
        reports.append(export_window_decoder(lite.decoder, path(LITE.roi_decoder()), tolerance, embeddings, boxes, generator))
    if "point_decoder" in parts:
        from .point_export import export_point_decoder

        reports.append(export_point_decoder(LITE, point_decoder, repository_dir, tolerance))
    if "roi_point_decoder" in parts:
        from .point_export import export_window_point_decoder

        reports.append(export_window_point_decoder(LITE, point_decoder, repository_dir, tolerance))
    return reports


def quantize_lite_encoder(encoder, path: Path, noise) -> object:
    """INT8 encoder checked on a synthetic nuclei tile (as the client normalises it) and a noise image."""
    import torch

    from cellsam_triton.client.tiles import lite_normalize, tile_grid, tile_input
    from cellsam_triton.demo import synthetic_nuclei

    from .encoder_int8 import quantize_encoder

    cells = synthetic_nuclei(LITE.input_size)
    tile = torch.from_numpy(tile_input(lite_normalize(cells), tile_grid(*cells.shape)[0]))
    inputs = [tile, noise]
    with torch.no_grad():
        want = [encoder(x).numpy() for x in inputs]
    return quantize_encoder(path, [x.numpy() for x in inputs], want)


def export_window_decoder(decoder, path: Path, tolerance: float, embeddings, boxes, generator) -> object:
    """The ROI decoder (window side a dynamic axis), checked on two sides and box counts."""
    import torch

    from .models.window_decoder import WindowDecoder
    from .onnx_export import export_onnx

    window = WindowDecoder(decoder.prompt_encoder, decoder.mask_decoder).eval()
    sides = sorted(LITE.roi_windows)

    def example(n: int, side: int) -> dict:
        origins = torch.randint(0, LITE.embed_size - side + 1, (n, 2), generator=generator).float()
        return {NAMES.embedding_windows: embeddings(n)[:, :, :side, :side].contiguous(), NAMES.window_origins: origins, NAMES.boxes: boxes(n)}

    axes = {NAMES.embedding_windows: {0: "boxes", 2: "side", 3: "side"}, NAMES.window_origins: {0: "boxes"}, NAMES.boxes: {0: "boxes"},
            NAMES.low_res_masks: {0: "boxes", 2: "mask_side", 3: "mask_side"}, NAMES.iou_predictions: {0: "boxes"}}
    return export_onnx(window, example(3, sides[0]), [NAMES.low_res_masks, NAMES.iou_predictions], axes, path, tolerance,
                       check_inputs=[example(1, sides[-1]), example(5, sides[0])])
