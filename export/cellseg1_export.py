"""Export CellSeg1 (SAM at 512 input with merged LoRA) and point decoders, parity-checked.

``DIR/cellseg1_encoder``        image [B,3,512,512] (SAM-normalised, zero-padded) -> [B,256,32,32]
``DIR/cellseg1_decoder``        box prompts, as every family's decoder
``DIR/<family>_point_decoder``  image_embeddings [1,C,e,e], point_coords [N,P,2], point_labels
                                [N,P] -> low_res_masks [N,1,m,m], iou_predictions [N,1]
                                (export/point_export.py)
Encoder and decoders are exported from the merged weights; the parity check compares ONNX
Runtime with the same (merged) PyTorch modules, and tests/test_cellseg1.py compares the ONNX
files with the *unmerged* adapters. ViT-H (> 2 GB) goes to one external data file.

Without a SAM checkpoint the base is LiteMedSAM (``cellseg1_lite``: 256 tiles, TinyViT encoder,
adapters from ``cellsam-triton finetune``, see export/models/lite_lora.py) with the decoder the
adapters were fine-tuned from (by default the default model's point decoder, named in the adapter
file by sha256); tests/test_finetune.py compares its merged ONNX files with the unmerged PyTorch
adapters. ``<family>_roi_point_decoder`` (grid points on embedding windows) is exported when the
family's grid has a window.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cellsam_triton.contracts import CELLSEG1, CELLSEG1_LITE, NAMES, Family

from .cellsam_export import model_path, random_boxes
from .onnx_export import ExportReport, export_onnx
from .point_export import export_point_decoder, random_embeddings


def export_sam_family(modules, family: Family, repository_dir: str | os.PathLike, tolerance: float) -> list[ExportReport]:
    """Encoder, box decoder and point decoder of SAM ``modules`` (``models.cellseg1.SamModules``)."""
    from .models.box_decoder import BoxDecoder

    s = modules.input_size
    enc = family.encoder()
    image = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(0))
    reports = [
        export_onnx(
            modules.encoder, {NAMES.image: image}, [NAMES.image_embeddings],
            {NAMES.image: {0: "batch"}, NAMES.image_embeddings: {0: "batch"}}, model_path(repository_dir, enc), tolerance,
        )
    ]
    box = BoxDecoder(modules.decoder.prompt_encoder, modules.decoder.mask_decoder).eval()
    g = torch.Generator().manual_seed(2)
    dec = family.decoder()
    names, outputs = [t.name for t in dec.inputs], [t.name for t in dec.outputs]
    emb = random_embeddings(box, g)
    sets = [dict(zip(names, (emb, random_boxes(n, s, g)))) for n in (4, 1, 11)]
    axes = {name: {0: "num_boxes"} for name in (names[1], *outputs)}
    reports.append(export_onnx(box, sets[0], outputs, axes, model_path(repository_dir, dec), tolerance, sets[1:]))
    reports.append(export_point_decoder(family, modules.decoder, repository_dir, tolerance))
    return reports


def export_cellseg1(
    sam_checkpoint: str | os.PathLike,
    lora: str | os.PathLike | None,
    repository_dir: str | os.PathLike,
    tolerance: float = 1e-3,
    family: Family = CELLSEG1,
) -> list[ExportReport]:
    """Official SAM checkpoint + CellSeg1 adapter file -> the family's ONNX models under ``repository_dir``."""
    from .models.cellseg1 import load_cellseg1

    modules = load_cellseg1(Path(sam_checkpoint), None if lora is None else Path(lora), family.input_size)
    return export_sam_family(modules, family, repository_dir, tolerance)


BASE_DECODERS = ("points", "litemedsam")  # `finetune --base-decoder`, besides a weights file


def base_decoder_weights(choice: str | os.PathLike) -> Path | None:
    """The decoder weights `finetune --base-decoder` names: "points" the default model's point
    decoder (``lite_export.DEFAULT_POINT_DECODER_WEIGHTS``), "litemedsam" LiteMedSAM's own (None,
    CellSeg1's recipe exactly), else a `train-decoder` weights file."""
    from cellsam_triton.errors import UserError

    from .lite_export import DEFAULT_POINT_DECODER_WEIGHTS

    if str(choice) == "points":
        return DEFAULT_POINT_DECODER_WEIGHTS
    if str(choice) == "litemedsam":
        return None
    if not Path(choice).is_file():
        raise UserError(f"--base-decoder: {choice} is neither {' nor '.join(BASE_DECODERS)} nor a decoder weights file")
    return Path(choice)


def find_base_decoder(sha256: str, lora: Path) -> Path:
    """The decoder weights an adapter file was fine-tuned from (by sha256): among the committed
    weights, then beside the adapter file."""
    from cellsam_triton.errors import UserError

    from .lite_export import WEIGHTS_DIR
    from .training import sha256_file

    for folder in (WEIGHTS_DIR, lora.parent):
        for path in sorted(folder.glob("*.pt")):
            if sha256_file(path) == sha256:
                return path
    raise UserError(f"{lora} was fine-tuned from decoder weights with sha256 {sha256[:12]}..., found neither in "
                    f"{WEIGHTS_DIR} nor beside the adapter file; put that weights file beside it")


def lite_base_modules(decoder_weights: Path | None):
    """LiteMedSAM's encoder and a PointDecoder with ``decoder_weights`` loaded (None: its own)."""
    from .models.litemedsam import load_litemedsam
    from .models.point_decoder import PointDecoder
    from .train_decoder import load_decoder_weights

    lite = load_litemedsam()
    if decoder_weights is not None:
        load_decoder_weights(lite.decoder, Path(decoder_weights))
    return lite, PointDecoder(lite.decoder.prompt_encoder, lite.decoder.mask_decoder).eval()


def lite_base_decoder(lora: str | os.PathLike | None, adapters: dict | None = None) -> Path | None:
    """The decoder weights ``cellseg1_lite`` is built on: the one the adapter file names (None:
    LiteMedSAM's own), without adapters the default model's point decoder. ``adapters``: the
    file's state dict when the caller has read it already."""
    from .models.cellseg1 import load_state
    from .models.lite_lora import base_decoder_sha256

    if lora is None:
        return base_decoder_weights("points")
    sha256 = base_decoder_sha256(load_state(lora) if adapters is None else adapters)
    return None if sha256 is None else find_base_decoder(sha256, Path(lora))


def load_lite_base(lora: str | os.PathLike | None):
    """LiteMedSAM (encoder, PointDecoder) with an adapter file merged in.

    The base decoder is the one the adapter file names (``lite_lora.BASE_KEY``, written by
    `finetune`); an adapter file without that key was trained on LiteMedSAM's own decoder
    (CellSeg1's recipe, adapters from before the point decoder). Without an adapter file: the
    base `finetune` starts from by default, the default model's point decoder (no fine-tuning)."""
    from .models.cellseg1 import load_state
    from .models.lite_lora import merge_lite_lora

    adapters = None if lora is None else load_state(lora)
    lite, decoder = lite_base_modules(lite_base_decoder(lora, adapters))
    if adapters is not None:
        merge_lite_lora(lite.encoder, decoder.prompt_encoder, decoder.mask_decoder, adapters)
    return lite.encoder.eval(), decoder


def export_lite_family(encoder, decoder, family: Family, repository_dir: str | os.PathLike, tolerance: float) -> list[ExportReport]:
    """Encoder (dynamo, batch dynamic), box decoder and point decoder of a LiteMedSAM-based family."""
    from .lite_export import export_encoder
    from .models.box_decoder import BoxDecoder

    s = family.input_size
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(b, 3, s, s, generator=g) for b in (2, 1)]
    reports = [export_encoder(encoder, images, model_path(repository_dir, family.encoder()), tolerance)]
    box = BoxDecoder(decoder.prompt_encoder, decoder.mask_decoder).eval()
    dec = family.decoder()
    names, outputs = [t.name for t in dec.inputs], [t.name for t in dec.outputs]
    emb = random_embeddings(box, g) * 0.5
    sets = [dict(zip(names, (emb, random_boxes(n, s, g)))) for n in (3, 1, 7)]
    axes = {name: {0: "num_boxes"} for name in (names[1], *outputs)}
    reports.append(export_onnx(box, sets[0], outputs, axes, model_path(repository_dir, dec), tolerance, sets[1:]))
    reports.append(export_point_decoder(family, decoder, repository_dir, tolerance))
    if family.grid.window > 0:
        from .point_export import export_window_point_decoder

        reports.append(export_window_point_decoder(family, decoder, repository_dir, tolerance))
    return reports


def export_cellseg1_lite(
    lora: str | os.PathLike | None, repository_dir: str | os.PathLike, tolerance: float = 1e-3, family: Family = CELLSEG1_LITE
) -> list[ExportReport]:
    """LiteMedSAM + a `finetune` adapter file (merged into its base decoder) -> ``cellseg1_lite`` ONNX
    models; without one, the base `finetune` starts from."""
    encoder, decoder = load_lite_base(None if lora is None else Path(lora))
    return export_lite_family(encoder, decoder, family, repository_dir, tolerance)
