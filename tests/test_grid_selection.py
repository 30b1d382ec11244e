"""select-grid: grid thresholds chosen on training images, recorded beside the weights, served by export."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from cellsam_triton.contracts import LITE
from cellsam_triton.errors import UserError
from cellsam_triton.export import grid_selection
from cellsam_triton.export.lite_export import DEFAULT_DECODER_WEIGHTS, served_family
from tiny_dsb import split_ids, write_dataset


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    data = tmp_path / "data"
    if not data.exists():
        write_dataset(data, split_ids(3, "train") + split_ids(1, "val"))
    weights = tmp_path / "w" / "decoder.pt"
    if not weights.exists():
        weights.parent.mkdir()
        shutil.copy(DEFAULT_DECODER_WEIGHTS["full"], weights)
        weights.with_suffix(".json").write_text(json.dumps({"command": "train-decoder (copied)"}))
    parser = argparse.ArgumentParser()
    grid_selection.add_arguments(parser)
    return parser.parse_args(["--weights", str(weights), "--data", str(data), "--images", "2", "--points-per-side", "4",
                              "--threads", "1", *extra])


def test_training_ids_are_seeded_train_images_only(tmp_path: Path) -> None:
    args = _args(tmp_path)
    train = set(split_ids(3, "train"))
    first = grid_selection.training_ids(args.data, 2, 0)
    assert len(first) == 2 and set(first) <= train and first == grid_selection.training_ids(args.data, 2, 0)
    assert set(grid_selection.training_ids(args.data, 10, 0)) == train  # never a val image


def test_select_grid_records_the_best_pair_and_export_serves_it(tmp_path: Path) -> None:
    args = _args(tmp_path)
    assert grid_selection.run(args) == 0
    provenance = json.loads(args.weights.with_suffix(".json").read_text())
    assert provenance["command"] == "train-decoder (copied)"  # kept, the selection added beside it
    chosen = provenance["grid_selection"]
    by_pair = chosen["train_f1_by_threshold"]
    assert len(by_pair) == len(grid_selection.IOU_CANDIDATES) * len(grid_selection.STABILITY_CANDIDATES)
    best = max(by_pair.values())
    winners = [tuple(float(v) for v in k.split("/")) for k, v in by_pair.items() if v == best]
    assert (chosen["pred_iou_threshold"], chosen["stability_threshold"]) == max(winners)  # ties: higher thresholds
    assert chosen["points_per_side"] == 4 and chosen["images"] == 2 and chosen["split"] == "train"
    family = served_family(DEFAULT_DECODER_WEIGHTS["roi"], point_decoder_weights=args.weights)
    assert family.grid == dataclasses.replace(LITE.grid, pred_iou_threshold=chosen["pred_iou_threshold"],
                                              stability_threshold=chosen["stability_threshold"], points_per_side=4)
    assert served_family(DEFAULT_DECODER_WEIGHTS["roi"], point_decoder_weights=None).grid == LITE.grid
    # weights changed after the selection: export refuses the stale thresholds
    args.weights.write_bytes(args.weights.read_bytes() + b"\0")
    with pytest.raises(UserError, match="select-grid"):
        served_family(DEFAULT_DECODER_WEIGHTS["roi"], point_decoder_weights=args.weights)


def test_select_grid_bad_options_are_user_errors(tmp_path: Path) -> None:
    for extra in (["--images", "0"], ["--points-per-side", "200"]):
        with pytest.raises(UserError):
            grid_selection.run(_args(tmp_path, *extra))
    args = _args(tmp_path)
    args.weights.with_suffix(".json").unlink()
    with pytest.raises(UserError, match="train-decoder"):
        grid_selection.run(args)
