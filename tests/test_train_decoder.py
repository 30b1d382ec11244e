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


def _tile_with_cells() -> train_decoder.TileCells:
    labels = np.zeros((256, 256), np.int32)
    labels[10:30, 40:70] = 5
    labels[30:34, 40:70] = 6  # a neighbour touching cell 5
    labels[200:210, 0:8] = 8
    values = np.array([5, 6, 8])
    boxes = np.array([[40, 10, 69, 29], [40, 30, 69, 33], [0, 200, 7, 209]], np.float32)
    return train_decoder.TileCells("s", 0, labels, values, boxes, (220, 256))


def test_point_prompts_lie_on_their_cell_and_negatives_off_it() -> None:
    tile = _tile_with_cells()
    rule = train_decoder.PointRule(fraction=1.0, max_points=3)
    rng = np.random.default_rng(0)
    counts, negatives = set(), 0
    for _ in range(60):
        picks = np.array([0, 1, 2])
        coords, labels = train_decoder.cell_points(tile, picks, rule, rng)
        assert coords.shape == (3, 4, 2) and labels.shape == (3, 4)
        for row, pick in enumerate(picks):
            value = tile.values[pick]
            x, y = coords[row].astype(int).T
            on = tile.labels[y, x] == value
            assert on[labels[row] == 1].all() and not on[labels[row] == 0].any()
            assert (labels[row] == 1).sum() >= 1 and labels[row, 0] == 1  # positives first, then padding
            assert set(labels[row].tolist()) <= {-1.0, 0.0, 1.0}
            counts.add(int((labels[row] == 1).sum()))
            negatives += int((labels[row] == 0).sum())
    assert counts == {1, 2, 3} and negatives > 0  # one to max_points positives; negatives half the time
    single = train_decoder.PointRule(max_points=1, negative_probability=0.0)
    _, labels = train_decoder.cell_points(tile, np.array([0]), single, rng)
    assert labels.tolist() == [[1.0, -1.0]]


def test_background_points_are_off_every_cell_and_inside_the_image() -> None:
    tile = _tile_with_cells()
    points = train_decoder.background_points(tile, 50, np.random.default_rng(1))
    assert points.shape == (50, 1, 2)
    x, y = points[:, 0].astype(int).T
    assert (tile.labels[y, x] == 0).all() and y.max() < 220  # tile.valid: 220 rows of image
    assert train_decoder.background_points(tile, 0, np.random.default_rng(1)).shape == (0, 1, 2)


def test_point_prompts_are_trained_unpadded_as_the_client_sends_them() -> None:
    """A one-point prompt is decoded as [point] (+ SAM's own padding point), never with the extra
    -1 padding of a batch of longer prompts: a decoder trained on padded prompts only fails on the
    served one-point prompts of the grid and of clicks."""
    trainer = train_decoder.DecoderTrainer(Path("unused"), 1, 1e-4, 1.0, "full", None)
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0))
    trainer.embedding = lambda tile: embedding  # the cached embedding of the tile
    coords = np.array([[[40, 50], [0, 0], [0, 0]], [[100, 90], [110, 95], [120, 80]], [[7, 9], [12, 3], [0, 0]]], np.float32)
    labels = np.array([[1, -1, -1], [1, 1, 0], [1, 0, -1]], np.float32)
    with torch.no_grad():
        logits, iou = trainer.predict_points(_tile_with_cells(), coords, labels)
        for k, count in enumerate((1, 3, 2)):
            alone, alone_iou = trainer.points(embedding, torch.from_numpy(coords[k:k + 1, :count]), torch.from_numpy(labels[k:k + 1, :count]))
            torch.testing.assert_close(logits[k], alone[0, 0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(iou[k], alone_iou[0, 0], atol=1e-5, rtol=1e-5)
        padded, _ = trainer.points(embedding, torch.from_numpy(coords[:1]), torch.from_numpy(labels[:1]))
    assert not torch.allclose(padded[0, 0], logits[0], atol=1e-3)  # padding changes the answer: why it is avoided


def test_roi_context_decodes_one_point_prompts_on_the_grid_windows() -> None:
    """In the roi context a one-point prompt (the grid's) is decoded on its grid window as served
    (``roi_windows.point_windows``, logits placed in the tile frame, ROI_FILL outside); prompts of
    several points stay on the whole embedding, as the client decodes clicked cells."""
    from cellsam_triton.contracts import LITE
    from cellsam_triton.model_repository.roi_windows import point_windows

    trainer = train_decoder.DecoderTrainer(Path("unused"), 1, 1e-4, 1.0, "roi", None)
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(1))
    trainer.embedding = lambda tile: embedding
    coords = np.array([[[200, 30], [0, 0]], [[100, 90], [110, 95]]], np.float32)
    labels = np.array([[1, -1], [1, 0]], np.float32)
    w = LITE.grid.window
    with torch.no_grad():
        logits, iou = trainer.predict_points(_tile_with_cells(), coords, labels)
        x, y = point_windows(coords[0, :1], 64, 4, w)[0]
        window = embedding[:, :, y:y + w, x:x + w]
        alone, alone_iou = trainer.window_points(window, torch.tensor([[float(x), float(y)]]), torch.from_numpy(coords[:1, :1]),
                                                 torch.ones(1, 1))
        whole, _ = trainer.points(embedding, torch.from_numpy(coords[1:]), torch.from_numpy(labels[1:]))
    inside = logits[0, 4 * y:4 * (y + w), 4 * x:4 * (x + w)]
    torch.testing.assert_close(inside, alone[0, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(iou[0], alone_iou[0, 0], atol=1e-5, rtol=1e-5)
    assert (logits[0] == train_decoder.ROI_FILL).sum() == 256 * 256 - (4 * w) ** 2
    torch.testing.assert_close(logits[1], whole[0, 0], atol=1e-4, rtol=1e-4)


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
    assert provenance["prompts"]["point_fraction"] == 0.0 and provenance["val_points_after"] is None  # boxes only
    assert served_family(args.out).mask_threshold == provenance["mask_threshold"] == 0.5
    # the trained weights load strictly into a fresh decoder and differ from LiteMedSAM's own
    fresh = load_litemedsam().decoder
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    train_decoder.load_decoder_weights(fresh, args.out)
    after = fresh.state_dict()
    assert set(after) == set(before) and any(not torch.equal(before[k], after[k]) for k in before)


def test_mixed_prompts_train_the_point_path_and_record_it(tmp_path: Path) -> None:
    args = _run(tmp_path, "--out", str(tmp_path / "w" / "mixed.pt"), "--point-fraction", "0.5", "--background-points", "2")
    assert train_decoder.run(args) == 0
    provenance = json.loads(args.out.with_suffix(".json").read_text())
    assert provenance["prompts"] == {"point_fraction": 0.5, "max_points": 3, "negative_probability": 0.5,
                                     "single_point_probability": 0.5, "background_points": 2}
    for key in ("val_points_before", "val_points_after"):
        assert provenance[key]["cells"] == 6 and 0.0 <= provenance[key]["threshold 0.5"]["mean_iou"] <= 1.0
        assert provenance[key]["background_mean_predicted_iou"] is not None
    for extra in (["--point-fraction", "1.5"], ["--point-fraction", "nan"], ["--max-points", "0"], ["--background-points", "-1"]):
        with pytest.raises(UserError):
            train_decoder.run(_run(tmp_path, *extra))


def test_roi_context_trains_on_the_served_windows_from_init_weights(tmp_path: Path) -> None:
    from cellsam_triton.contracts import LITE
    from cellsam_triton.model_repository.roi_windows import plan_windows

    first = _run(tmp_path, "--out", str(tmp_path / "w" / "full.pt"))
    assert train_decoder.run(first) == 0
    args = _run(tmp_path, "--context", "roi", "--init", str(first.out), "--out", str(tmp_path / "w" / "roi.pt"))
    assert train_decoder.run(args) == 0
    provenance = json.loads(args.out.with_suffix(".json").read_text())
    assert provenance["context"] == "roi" and provenance["roi"] == {"windows": list(LITE.roi_windows), "margin": LITE.roi_margin,
                                                                "grid_window": LITE.grid.window}
    assert provenance["init"]["path"] == "full.pt"
    assert provenance["init"]["sha256"] == hashlib.sha256(first.out.read_bytes()).hexdigest()
    assert provenance["init"]["provenance"] == json.loads(first.out.with_suffix(".json").read_text())  # the chain kept
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
    import dataclasses

    from cellsam_triton.contracts import LITE, Family
    from cellsam_triton.export.lite_export import DEFAULT_DECODER_WEIGHTS, DEFAULT_POINT_DECODER_WEIGHTS, grid_selection
    from cellsam_triton.export.repository import parse_config

    config = parse_config(default_repository / LITE.name / "config.pbtxt")
    family = Family.from_json(config.parameters["family"].string_value)
    assert family.decoder_context == LITE.decoder_context
    weights = DEFAULT_DECODER_WEIGHTS[family.decoder_context]
    assert family.mask_threshold == json.loads(weights.with_suffix(".json").read_text())["mask_threshold"]
    assert family.grid == dataclasses.replace(LITE.grid, **grid_selection(DEFAULT_POINT_DECODER_WEIGHTS))


@pytest.mark.parametrize("extra", [["--decoder-weights", "none"], ["--detector-weights", "x.pt"], ["--decoder-context", "roi"], ["--encoder-precision", "int8"]])
def test_lite_weight_options_with_another_model_are_a_user_error(tmp_path: Path, extra: list[str], capsys) -> None:
    from cellsam_triton.cli import main as cli

    assert cli(["export", "--model", "cellsam", "--checkpoint", "x.pt", "--repository", str(tmp_path / "r"), *extra]) != 0
    assert "are for the default model" in capsys.readouterr().err


def test_committed_point_decoder_learnt_points_and_records_its_chain() -> None:
    """The default point decoder: mixed box / point prompts from the ROI weights, then points only;
    its grid thresholds chosen on train for these very weights."""
    from cellsam_triton.export.lite_export import DEFAULT_DECODER_WEIGHTS, DEFAULT_POINT_DECODER_WEIGHTS

    weights = DEFAULT_POINT_DECODER_WEIGHTS
    assert weights not in DEFAULT_DECODER_WEIGHTS.values()  # boxes keep their own decoder
    provenance = json.loads(weights.with_suffix(".json").read_text())
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert provenance["weights_sha256"] == sha == provenance["grid_selection"]["weights_sha256"]
    assert provenance["grid_selection"]["split"] == "train" and provenance["prompts"]["point_fraction"] == 1.0
    stages = [provenance]  # the chain of --init weights back to the committed ROI decoder
    while "provenance" in stages[-1]["init"]:
        assert stages[-1]["init"]["sha256"] == stages[-1]["init"]["provenance"]["weights_sha256"]
        stages.append(stages[-1]["init"]["provenance"])
    mixed = stages[-1]  # stage 1: mixed prompts from the committed ROI weights
    assert mixed["prompts"]["point_fraction"] == 0.5 and mixed["context"] == "roi"
    assert mixed["init"]["sha256"] == hashlib.sha256(COMMITTED_ROI.read_bytes()).hexdigest()
    # one point per val cell: from the box-trained decoder's poor masks to cells
    before, after = mixed["val_points_before"]["threshold 0.5"], provenance["val_points_after"]["threshold 0.5"]
    assert before["iou_at_least_0.5"] < 0.1 and after["iou_at_least_0.5"] > 0.8
    assert provenance["val_points_after"]["background_mean_predicted_iou"] < 0.2  # the grid's IoU filter drops background
