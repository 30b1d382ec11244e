"""train-decoder: tile cells, box jitter, a seconds-long real run, weights that export loads."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cellsam_triton.client.tiles import Tile
from cellsam_triton.errors import UserError
from cellsam_triton.export import train_decoder
from tiny_dsb import split_ids, tiny_encoder_onnx, write_dataset

COMMITTED = train_decoder.DEFAULT_OUT["full"]
COMMITTED_ROI = train_decoder.DEFAULT_OUT["roi"]


def test_tile_cells_pads_and_keeps_visible_cells_with_their_boxes() -> None:
    labels = np.zeros((100, 120), np.int32)
    labels[10:20, 30:45] = 3  # 150 px
    labels[50:53, 60:62] = 7  # 6 px: below MIN_VISIBLE_AREA
    labels[95:100, 0:4] = 9  # 20 px
    tile = Tile(y0=0, x0=0, size=256, cy0=0, cy1=100, cx0=0, cx1=120)
    padded, values, boxes = train_decoder.tile_cells(labels, tile)
    assert padded.shape == (256, 256) and padded[100:].max() == 0
    assert values.tolist() == [3, 9]
    assert boxes.tolist() == [[30, 10, 44, 19], [0, 95, 3, 99]]  # x0, y0, x1, y1 inclusive


def test_jitter_stays_in_the_frame_and_within_the_fraction() -> None:
    rng = np.random.default_rng(0)
    boxes = np.array([[10, 20, 29, 59], [0, 0, 3, 3], [240, 250, 255, 255]], np.float32)
    for _ in range(50):
        moved = train_decoder.jitter_boxes(boxes, 0.1, rng, 256)
        assert moved.min() >= 0 and moved.max() <= 255
        assert (moved[:, 2:] >= moved[:, :2]).all()
        side = boxes[:, 2:] - boxes[:, :2] + 1
        reach = np.maximum(np.concatenate([side, side], 1) * 0.1, 1.0)
        assert (np.abs(moved - boxes) <= reach + 1e-4).all()
    assert np.array_equal(train_decoder.jitter_boxes(boxes, 0.0, rng, 256), boxes)  # no jitter: unchanged


def _run(tmp_path: Path, *extra: str) -> argparse.Namespace:
    data = tmp_path / "data"
    if not data.exists():
        write_dataset(data, split_ids(2, "train") + split_ids(1, "val"))
    parser = argparse.ArgumentParser()
    train_decoder.add_arguments(parser)
    return parser.parse_args([
        "--data", str(data), "--steps", "3", "--boxes-per-tile", "2", "--val-boxes", "6", "--threads", "1",
        "--cache-dir", str(tmp_path / "cache"), "--encoder-onnx", str(tiny_encoder_onnx(tmp_path / "enc.onnx")), *extra,
    ])


def test_train_decoder_smoke_writes_weights_that_export_loads(tmp_path: Path) -> None:
    from cellsam_triton.export.lite_export import served_family
    from cellsam_triton.export.models.litemedsam import load_litemedsam

    args = _run(tmp_path, "--out", str(tmp_path / "w" / "dec.pt"))
    assert train_decoder.run(args) == 0
    provenance = json.loads(args.out.with_suffix(".json").read_text())
    assert provenance["steps"] == 3 and provenance["seed"] == 0 and provenance["images"] == {"train": 2, "val": 1}
    assert provenance["weights_sha256"] == hashlib.sha256(args.out.read_bytes()).hexdigest()
    assert provenance["val_before"]["cells"] == provenance["val_after"]["cells"] == 6
    assert 0.0 <= provenance["val_after"]["threshold 0.5"]["mean_iou"] <= 1.0
    assert served_family(args.out).mask_threshold == provenance["mask_threshold"] == 0.5
    # the trained weights load strictly into a fresh decoder and differ from LiteMedSAM's own
    fresh = load_litemedsam().decoder
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    train_decoder.load_decoder_weights(fresh, args.out)
    after = fresh.state_dict()
    assert set(after) == set(before) and any(not torch.equal(before[k], after[k]) for k in before)


def test_roi_context_trains_on_the_served_windows_from_init_weights(tmp_path: Path) -> None:
    from cellsam_triton.contracts import LITE
    from cellsam_triton.model_repository.roi_windows import plan_windows

    first = _run(tmp_path, "--out", str(tmp_path / "w" / "full.pt"))
    assert train_decoder.run(first) == 0
    args = _run(tmp_path, "--context", "roi", "--init", str(first.out), "--out", str(tmp_path / "w" / "roi.pt"))
    assert train_decoder.run(args) == 0
    provenance = json.loads(args.out.with_suffix(".json").read_text())
    assert provenance["context"] == "roi" and provenance["roi"] == {"windows": list(LITE.roi_windows), "margin": LITE.roi_margin}
    assert provenance["init"] == {"path": "full.pt", "sha256": hashlib.sha256(first.out.read_bytes()).hexdigest()}
    assert provenance["val_after_full_context"]["cells"] == provenance["val_after"]["cells"] == 6
    # the windows of training are the served ones: outside its window a box's logits are ROI_FILL
    trainer = train_decoder.DecoderTrainer(Path("unused"), 1, 1e-4, 1.0, "roi", args.out)
    boxes = np.array([[10, 10, 30, 30], [200, 180, 250, 240], [0, 0, 255, 200]], np.float32)
    with torch.no_grad():
        logits, iou = trainer.predict_windows(torch.randn(1, 256, 64, 64), boxes)
    assert logits.shape == (3, 256, 256) and iou.shape == (3,)
    sides, origins = plan_windows(boxes, 64, 4, LITE.roi_windows, LITE.roi_margin)
    assert sides.tolist() == [16, 32, 0]
    for k in (0, 1):
        (x, y), w = origins[k] * 4, sides[k] * 4
        inside = torch.zeros(256, 256, dtype=torch.bool)
        inside[y:y + w, x:x + w] = True
        assert (logits[k][~inside] == train_decoder.ROI_FILL).all() and (logits[k][inside] != train_decoder.ROI_FILL).any()
    assert (logits[2] != train_decoder.ROI_FILL).all()  # too large for every window: full context
    with pytest.raises(UserError, match="--init"):
        train_decoder.run(_run(tmp_path, "--init", str(tmp_path / "absent.pt")))


def test_bad_decoder_weights_and_options_are_user_errors(tmp_path: Path) -> None:
    from cellsam_triton.export.models.litemedsam import load_litemedsam

    decoder = load_litemedsam().decoder
    with pytest.raises(UserError, match="train-decoder"):
        train_decoder.load_decoder_weights(decoder, tmp_path / "absent.pt")
    (tmp_path / "bad.pt").write_bytes(b"not torch")
    with pytest.raises(UserError, match="not LiteMedSAM decoder weights"):
        train_decoder.load_decoder_weights(decoder, tmp_path / "bad.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not LiteMedSAM decoder weights"):
        train_decoder.load_decoder_weights(decoder, tmp_path / "other.pt")
    for extra in (["--steps", "0"], ["--jitter", "0.7"]):
        with pytest.raises(UserError):
            train_decoder.run(_run(tmp_path, *extra))


def test_committed_decoder_weights_have_their_provenance() -> None:
    from cellsam_triton.export.lite_export import FROZEN_MASK_THRESHOLD, served_family

    provenance = json.loads(COMMITTED.with_suffix(".json").read_text())
    assert provenance["weights_sha256"] == hashlib.sha256(COMMITTED.read_bytes()).hexdigest()
    assert COMMITTED.stat().st_size < 20e6
    # the fine-tuned decoder beat the frozen one on the val split when it was trained
    assert provenance["val_after"]["threshold 0.5"]["mean_iou"] > provenance["val_before"]["threshold 0.12"]["mean_iou"]
    assert served_family(COMMITTED).mask_threshold == provenance["mask_threshold"]
    assert served_family(None).mask_threshold == FROZEN_MASK_THRESHOLD


def test_committed_roi_decoder_weights_start_from_the_full_ones_and_record_it() -> None:
    from cellsam_triton.contracts import LITE

    provenance = json.loads(COMMITTED_ROI.with_suffix(".json").read_text())
    assert provenance["weights_sha256"] == hashlib.sha256(COMMITTED_ROI.read_bytes()).hexdigest()
    assert provenance["context"] == "roi" and provenance["roi"]["windows"] == list(LITE.roi_windows)
    assert provenance["roi"]["margin"] == LITE.roi_margin
    assert provenance["init"]["sha256"] == hashlib.sha256(COMMITTED.read_bytes()).hexdigest()
    # windows lose no mask quality against the full decoder it started from (val split, GT boxes)
    full = json.loads(COMMITTED.with_suffix(".json").read_text())["val_after"]["threshold 0.5"]["mean_iou"]
    assert provenance["val_after"]["threshold 0.5"]["mean_iou"] >= full - 0.005


def test_default_repository_serves_the_threshold_of_its_decoder(default_repository: Path) -> None:
    from cellsam_triton.contracts import LITE, Family
    from cellsam_triton.export.repository import parse_config

    config = parse_config(default_repository / LITE.name / "config.pbtxt")
    family = Family.from_json(config.parameters["family"].string_value)
    assert family.decoder_context == LITE.decoder_context
    weights = train_decoder.DEFAULT_OUT[family.decoder_context]
    assert family.mask_threshold == json.loads(weights.with_suffix(".json").read_text())["mask_threshold"]


@pytest.mark.parametrize("extra", [["--decoder-weights", "none"], ["--detector-weights", "x.pt"], ["--decoder-context", "roi"], ["--encoder-precision", "int8"]])
def test_lite_weight_options_with_another_model_are_a_user_error(tmp_path: Path, extra: list[str], capsys) -> None:
    from cellsam_triton.cli import main as cli

    assert cli(["export", "--model", "cellsam", "--checkpoint", "x.pt", "--repository", str(tmp_path / "r"), *extra]) != 0
    assert "are for the default model" in capsys.readouterr().err
