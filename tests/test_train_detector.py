"""DSB reader, split rule, FCOS assignment, box matching and a seconds-long train-detector run."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellsam_triton.datasets import data_checksum, load_manifest, load_sample, split_of
from cellsam_triton.errors import UserError
from tiny_dsb import split_ids, tiny_encoder_onnx, write_dataset

DSB = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "dsb2018"


def test_split_rule_is_stable_across_processes_and_near_20_percent() -> None:
    ids = [f"{k:x}{k * 7919:x}" for k in range(2000)]
    here = [split_of(i) for i in ids[:50]]
    code = "import sys; from cellsam_triton.datasets import split_of; print(' '.join(split_of(i) for i in sys.argv[1:]))"
    other = subprocess.run([sys.executable, "-c", code, *ids[:50]], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.split()
    assert here == other
    share = np.mean([split_of(i) == "val" for i in ids])
    assert 0.15 < share < 0.25


def test_reader_and_checksum(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a DSB-layout"):
        load_manifest(tmp_path)
    ids = split_ids(2, "train")
    write_dataset(tmp_path, ids)
    records = load_manifest(tmp_path)
    assert [r.id for r in records] == ids and records[0].height == 256 and records[0].split == "train"
    image, labels = load_sample(tmp_path, ids[0])
    assert image.shape == (256, 300, 3) and labels.shape == (256, 300)
    first = data_checksum(tmp_path, ids)
    assert first == data_checksum(tmp_path, ids) and first != data_checksum(tmp_path, ids[:1])
    with pytest.raises(UserError, match="missing sample"):
        load_sample(tmp_path, "nope")


def test_assignment_gives_every_box_a_positive_and_prefers_small_boxes() -> None:
    from cellsam_triton.export.models.detector_lite import DetectorConfig, grid_centers
    from cellsam_triton.export.train_detector import assign

    centers = grid_centers(DetectorConfig())
    gt = np.array([[100, 100, 101, 101], [0, 0, 200, 200], [30, 40, 70, 60]], np.float32)
    index, boxes = assign(centers, gt)
    assert len(index) == len(np.unique(index)) == len(boxes)
    for g in gt:
        assert (boxes == g).all(axis=1).any()  # no box is left without a positive
    tiny_owner = boxes[np.argmin(((centers[index] - 100.5) ** 2).sum(1))]
    np.testing.assert_array_equal(tiny_owner, gt[0])  # inside the big box too, the small one wins
    assert len(assign(centers, np.zeros((0, 4), np.float32))[0]) == 0


def test_box_matches_is_one_to_one() -> None:
    from cellsam_triton.export.train_detector import box_matches

    true = np.array([[0, 0, 9, 9], [20, 20, 29, 29]], np.float32)
    assert box_matches(true.copy(), true) == 2
    assert box_matches(np.array([[0, 0, 9, 9], [0, 0, 9, 8]], np.float32), true) == 1  # duplicate counts once
    assert box_matches(np.array([[0, 0, 3, 3]], np.float32), true) == 0
    assert box_matches(np.zeros((0, 4), np.float32), true) == 0


def test_train_detector_smoke(tmp_path: Path) -> None:
    from cellsam_triton.export import train_detector
    from cellsam_triton.export.models.detector_lite import load_detector

    data = tmp_path / "data"
    write_dataset(data, split_ids(2, "train") + split_ids(1, "val"))
    parser = argparse.ArgumentParser()
    train_detector.add_arguments(parser)
    out = tmp_path / "weights" / "det.pt"
    args = parser.parse_args([
        "--data", str(data), "--epochs", "1", "--out", str(out), "--workers", "1", "--threads", "1",
        "--cache-dir", str(tmp_path / "cache"), "--encoder-onnx", str(tiny_encoder_onnx(tmp_path / "enc.onnx")),
    ])
    assert train_detector.run(args) == 0
    provenance = json.loads(out.with_suffix(".json").read_text())
    assert provenance["images"] == {"train": 2, "val": 1} and provenance["tiles"] == {"train": 4, "val": 2}
    assert provenance["data_checksum"] == data_checksum(data, [r.id for r in load_manifest(data)])
    assert provenance["seed"] == 0 and "sha1" in provenance["split_rule"]
    assert 0.0 <= provenance["val_metrics"]["best_box_f1_mean"] <= 1.0
    scores, boxes = load_detector(out)(__import__("torch").zeros(1, 256, 64, 64))
    assert scores.shape == (1, 4096) and boxes.shape == (1, 4096, 4)
    # the cache is reused: a second run encodes nothing and trains the same (seeded) weights
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.npy"))
    assert len(cached) == 3
    args.out = tmp_path / "again.pt"
    train_detector.run(args)
    first, second = (__import__("torch").load(p, weights_only=True)["state_dict"] for p in (out, args.out))
    assert all((first[k] == second[k]).all() for k in first)


def test_dihedral_views_are_the_8_distinct_symmetries_and_keep_labels_aligned(tmp_path: Path) -> None:
    from cellsam_triton.export.train_detector import DIHEDRAL_VIEWS, dihedral, label_boxes, load_view, view_id

    a = np.arange(12).reshape(3, 4)
    views = {dihedral(a, k).tobytes() + bytes(dihedral(a, k).shape) for k in range(DIHEDRAL_VIEWS)}
    assert len(views) == 8
    data = tmp_path / "data"
    (sample,) = split_ids(1, "train")
    write_dataset(data, [sample])
    image, labels = load_sample(data, sample)
    for k in range(DIHEDRAL_VIEWS):
        view_image, view_labels = load_view(data, view_id(sample, k))
        assert view_image.shape[:2] == view_labels.shape
        assert np.array_equal(view_image[..., 0] > 100, view_labels > 0)  # image and labels move together
        areas = np.sort((label_boxes(view_labels)[:, 2:] - label_boxes(view_labels)[:, :2] + 1).prod(1))
        assert np.array_equal(areas, np.sort((label_boxes(labels)[:, 2:] - label_boxes(labels)[:, :2] + 1).prod(1)))
    assert view_id(sample, 0) == sample


def test_augmented_kind_adds_seven_cached_views_per_train_image(tmp_path: Path) -> None:
    from cellsam_triton.export import train_detector

    data = tmp_path / "data"
    write_dataset(data, split_ids(2, "train") + split_ids(1, "val"))
    parser = argparse.ArgumentParser()
    train_detector.add_arguments(parser)
    out = tmp_path / "det.pt"
    args = parser.parse_args([
        "--data", str(data), "--epochs", "1", "--out", str(out), "--workers", "1", "--threads", "1",
        "--augment-kinds", "fluorescence", "--limit", "1", "--width", "16", "--dilations", "1,3,1",
        "--cache-dir", str(tmp_path / "cache"), "--encoder-onnx", str(tiny_encoder_onnx(tmp_path / "enc.onnx")),
    ])
    assert train_detector.run(args) == 0
    provenance = json.loads(out.with_suffix(".json").read_text())
    assert provenance["augment_kinds"] == ["fluorescence"] and provenance["augmented_views"] == 7
    assert provenance["architecture"]["width"] == 16 and provenance["architecture"]["dilations"] == [1, 3, 1]
    from cellsam_triton.export.models.detector_lite import load_detector

    model = load_detector(out)
    assert model.config.width == 16 and [b.depthwise.dilation[0] for b in model.blocks] == [1, 3, 1]
    # 256x300 gives 2 tiles; its quarter-turned views (300x256) give 2 as well
    assert provenance["tiles"]["train"] == 2 * 8
    assert len(list((tmp_path / "cache").rglob("*@d*.npy"))) == 7


def test_missing_data_folder_is_a_user_error(tmp_path: Path) -> None:
    from cellsam_triton.export import train_detector

    parser = argparse.ArgumentParser()
    train_detector.add_arguments(parser)
    with pytest.raises(UserError):
        train_detector.run(parser.parse_args(["--data", str(tmp_path / "absent")]))


@pytest.mark.parametrize("extra", [["--width", "12"], ["--width", "0"], ["--dilations", "1,x"], ["--dilations", "0,2"],
                                   ["--width", "64", "--init", "start.pt"], ["--dilations", "1,2", "--init", "start.pt"]])
def test_bad_architecture_is_a_user_error(tmp_path: Path, extra: list[str]) -> None:
    from cellsam_triton.export import train_detector

    parser = argparse.ArgumentParser()
    train_detector.add_arguments(parser)
    with pytest.raises(UserError, match="--width|--dilations"):
        train_detector.run(parser.parse_args(["--data", str(tmp_path), *extra]))


def test_real_split_has_both_kinds_of_images() -> None:
    if not (DSB / "manifest.csv").is_file():
        pytest.skip(f"DSB2018 data not found at {DSB}")
    records = load_manifest(DSB)
    val = [r for r in records if r.split == "val"]
    assert 0.15 < len(val) / len(records) < 0.25
    assert {r.kind for r in val} >= {"fluorescence", "stained"}
