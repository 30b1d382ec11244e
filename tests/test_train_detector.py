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


def _tiny_run(tmp_path: Path, *options: str) -> tuple[Path, dict]:
    """train-detector (1 epoch, first image of each split) on a tiny set with a stand-in encoder:
    (weights path, provenance)."""
    from cellsam_triton.export import train_detector

    data = tmp_path / "data"
    write_dataset(data, split_ids(2, "train") + split_ids(1, "val"))
    parser = argparse.ArgumentParser()
    train_detector.add_arguments(parser)
    out = tmp_path / "det.pt"
    args = parser.parse_args([
        "--data", str(data), "--epochs", "1", "--out", str(out), "--workers", "1", "--threads", "1", "--limit", "1",
        "--cache-dir", str(tmp_path / "cache"), "--encoder-onnx", str(tiny_encoder_onnx(tmp_path / "enc.onnx")), *options,
    ])
    assert train_detector.run(args) == 0
    return out, json.loads(out.with_suffix(".json").read_text())


def test_augmented_kind_adds_seven_cached_views_per_train_image(tmp_path: Path) -> None:
    out, provenance = _tiny_run(tmp_path, "--augment-kinds", "fluorescence", "--width", "16", "--dilations", "1,3,1")
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
                                   ["--width", "64", "--init", "start.pt"]])
def test_bad_architecture_is_a_user_error(tmp_path: Path, extra: list[str]) -> None:
    from cellsam_triton.export import train_detector

    parser = argparse.ArgumentParser()
    train_detector.add_arguments(parser)
    with pytest.raises(UserError, match="--width|--dilations"):
        train_detector.run(parser.parse_args(["--data", str(tmp_path), *extra]))


def test_init_with_deeper_dilations_grows_the_detector_from_an_identical_start(tmp_path: Path) -> None:
    import torch

    from cellsam_triton.export.models.detector_lite import CellFinderLite, DetectorConfig, grow_detector, load_detector, save_detector
    from cellsam_triton.export.training import sha256_file

    torch.manual_seed(0)
    start = CellFinderLite(DetectorConfig(width=16, dilations=(1, 2))).eval()
    grown = grow_detector(start, (1, 2, 4, 1)).eval()
    x = torch.randn(2, 256, 64, 64)
    with torch.no_grad():
        for a, b in zip(start(x), grown(x)):
            assert torch.equal(a, b)  # the new blocks start as the identity
    for bad in ((1,), (1, 2), (2, 1, 4)):
        with pytest.raises(ValueError, match="must extend"):
            grow_detector(start, bad)
    save_detector(start, tmp_path / "start.pt")
    with pytest.raises(UserError, match="--dilations"):
        _tiny_run(tmp_path / "bad", "--augment-kinds", "", "--init", str(tmp_path / "start.pt"), "--dilations", "2,1,4")
    assert not (tmp_path / "bad" / "cache").exists()  # refused before any embedding is computed
    out, provenance = _tiny_run(tmp_path / "good", "--augment-kinds", "", "--init", str(tmp_path / "start.pt"), "--dilations", "1,2,4")
    assert provenance["architecture"]["dilations"] == [1, 2, 4] and provenance["architecture"]["width"] == 16
    assert provenance["init"]["weights_sha256"] == sha256_file(tmp_path / "start.pt")
    trained = load_detector(out)
    assert not torch.equal(trained.blocks[2].norm.weight, torch.zeros(16))  # the new block trained
    assert not torch.equal(trained.blocks[0].pointwise.weight, start.blocks[0].pointwise.weight)


def test_real_split_has_both_kinds_of_images() -> None:
    if not (DSB / "manifest.csv").is_file():
        pytest.skip(f"DSB2018 data not found at {DSB}")
    records = load_manifest(DSB)
    val = [r for r in records if r.split == "val"]
    assert 0.15 < len(val) / len(records) < 0.25
    assert {r.kind for r in val} >= {"fluorescence", "stained"}


def _stained_sample(tmp_path: Path) -> tuple[Path, str]:
    """One train image in H&E-like colours (purple nuclei on pink) with small cells."""
    data = tmp_path / "data"
    (sample,) = split_ids(1, "train")
    write_dataset(data, [sample])
    image, labels = load_sample(data, sample)
    coloured = np.where(labels[..., None] > 0, np.array([90, 40, 140], np.uint8), np.array([235, 190, 215], np.uint8))
    np.savez_compressed(data / "images" / f"{sample}.npz", image=coloured.astype(np.uint8), labels=labels)
    return data, sample


def test_colour_views_are_seeded_by_their_key_and_keep_labels_aligned(tmp_path: Path) -> None:
    from cellsam_triton.export.detector_views import DIHEDRAL_VIEWS, color_view_id, dihedral, load_view

    data, sample = _stained_sample(tmp_path)
    image, labels = load_sample(data, sample)
    first, first_labels = load_view(data, color_view_id(sample, 1))
    again, _ = load_view(data, color_view_id(sample, 1))
    other, _ = load_view(data, color_view_id(sample, 2))
    assert np.array_equal(first, again)  # a cached view is a function of its key
    assert first.dtype == np.uint8 and first.shape == dihedral(image, 1).shape
    assert not np.array_equal(dihedral(first, (-1) % DIHEDRAL_VIEWS), image)
    assert np.array_equal(first_labels, dihedral(labels, 1))
    for view, view_labels in ((first, first_labels), (other, dihedral(labels, 2))):
        nuclei, background = view[view_labels > 0].mean(0), view[view_labels == 0].mean(0)
        assert nuclei.sum() < background.sum()  # stain jitter keeps dark nuclei on a light background
        assert np.abs(nuclei - image[labels > 0].mean(0)).max() > 2  # ... in new colours
    assert not np.array_equal(first[first_labels > 0].mean(0), other[dihedral(labels, 2) > 0].mean(0))


def test_scale_view_is_what_the_client_sends_for_small_cells(tmp_path: Path) -> None:
    from cellsam_triton.client.autoscale import auto_factor
    from cellsam_triton.client.labels import cells_table
    from cellsam_triton.contracts import LITE
    from cellsam_triton.export.detector_views import auto_scale_factor, invert_view_id, load_view, scale_view_id

    data, sample = _stained_sample(tmp_path)
    image, labels = load_sample(data, sample)
    factor = auto_scale_factor(labels)
    assert factor == auto_factor(cells_table(labels.astype(np.int32), np.ones(int(labels.max()))), LITE, labels.shape)
    if factor == 1.0:  # the tiny set's cells straddle 16 px: shrink them so the rule applies
        np.savez_compressed(data / "images" / f"{sample}.npz", image=image[::2, ::2].copy(), labels=labels[::2, ::2].copy())
        image, labels = load_sample(data, sample)
        factor = auto_scale_factor(labels)
    assert 1.5 <= factor <= 2.0
    view, view_labels = load_view(data, scale_view_id(sample))
    assert view.shape[:2] == view_labels.shape == (round(labels.shape[0] * factor), round(labels.shape[1] * factor))
    assert set(np.unique(view_labels)) == set(np.unique(labels))  # every cell survives the enlargement
    assert np.mean((view[..., 0] < 150) == (view_labels > 0)) > 0.95  # image and labels line up
    inverted, inverted_labels = load_view(data, invert_view_id(sample, 0))
    assert np.array_equal(inverted, 255 - image) and np.array_equal(inverted_labels, labels)


def test_training_options_add_views_weight_kinds_and_choose_the_threshold_on_train(tmp_path: Path) -> None:
    _, provenance = _tiny_run(
        tmp_path, "--augment-kinds", "", "--color-kinds", "fluorescence", "--color-views", "2", "--invert-kinds", "fluorescence",
        "--scale-kinds", "fluorescence", "--kind-weights", "fluorescence=2", "--width", "16", "--dilations", "1,2")
    views = provenance["views"]
    assert views["color_kinds"] == ["fluorescence"] and views["color_views"] == 2 and views["invert_kinds"] == ["fluorescence"]
    assert views["count_by_type"]["c"] == 2 and views["count_by_type"]["i"] == 2
    assert views["count_by_type"].get("s", 0) in (0, 1)
    selection = provenance["selection"]
    assert "never on val" in selection["rule"] and selection["nms_iou"] in (0.3, 0.4, 0.5)
    assert 0.0 <= selection["train_box_f1"] <= 1.0 and provenance["kind_weights"] == {"fluorescence": 2}
    row = provenance["val_metrics"]["by_threshold"][f"{selection['score_threshold']:g}"]
    assert set(row["by_kind"]) == {"fluorescence"} and row["by_kind"]["fluorescence"] == row["box_f1_mean"]


def test_kind_weights_repeat_tiles_and_refuse_bad_text() -> None:
    from cellsam_triton.export.train_detector import epoch_items, parse_kind_weights

    assert parse_kind_weights("stained=3, brightfield=2") == {"stained": 3, "brightfield": 2}
    assert parse_kind_weights("") == {}
    samples = [{"tiles": [0, 1], "kind": "fluorescence"}, {"tiles": [0], "kind": "stained"}]
    assert sorted(epoch_items(samples, {"stained": 3})) == [(0, 0), (0, 1), (1, 0), (1, 0), (1, 0)]
    for bad in ("stained", "stained=x", "stained=0", "=2"):
        with pytest.raises(UserError, match="--kind-weights"):
            parse_kind_weights(bad)


def test_selection_is_chosen_on_train_samples_only() -> None:
    """choose_on_train never sees val: two train sets that differ only in their boxes choose
    different thresholds for the same detections."""
    from cellsam_triton.client.tiles import Tile
    from cellsam_triton.export.train_detector import choose_on_train

    class Fixed:
        """A stand-in detector: one strong (0.9) and one weak (0.3) box per tile."""

        def __call__(self, embeddings):
            import torch

            scores = torch.zeros(len(embeddings), 4096)
            scores[:, 0], scores[:, 1] = 0.9, 0.3
            boxes = torch.zeros(len(embeddings), 4096, 4)
            boxes[:, 0] = torch.tensor([10.0, 10, 30, 30])
            boxes[:, 1] = torch.tensor([100.0, 100, 120, 120])
            return scores, boxes

    tile = Tile(y0=0, x0=0, size=256, cy0=0, cy1=256, cx0=0, cx1=256)
    sample = {"tiles": [tile], "embeddings": np.zeros((1, 256, 64, 64), np.float16), "kind": "fluorescence"}
    strong_only = [{**sample, "boxes": np.array([[10, 10, 30, 30]], np.float32)}]
    both = [{**sample, "boxes": np.array([[10, 10, 30, 30], [100, 100, 120, 120]], np.float32)}]
    assert choose_on_train(Fixed(), strong_only)["score_threshold"] >= 0.3
    assert choose_on_train(Fixed(), both)["score_threshold"] < 0.3


def test_levers_table_scores_detectors_on_val_with_train_chosen_selection(tmp_path: Path) -> None:
    from bench.detector_levers import main as levers
    from cellsam_triton.export import train_detector

    data = tmp_path / "data"
    write_dataset(data, split_ids(2, "train") + split_ids(1, "val"))
    encoder = str(tiny_encoder_onnx(tmp_path / "enc.onnx"))
    parser = argparse.ArgumentParser()
    train_detector.add_arguments(parser)
    common = ["--data", str(data), "--workers", "1", "--threads", "1", "--cache-dir", str(tmp_path / "cache"),
              "--encoder-onnx", encoder]
    assert train_detector.run(parser.parse_args([*common, "--width", "16", "--dilations", "1", "--epochs", "1",
                                                 "--out", str(tmp_path / "a.pt")])) == 0
    assert train_detector.run(parser.parse_args([*common, "--init", str(tmp_path / "a.pt"), "--dilations", "1,2",
                                                 "--epochs", "2", "--out", str(tmp_path / "b.pt")])) == 0
    out = tmp_path / "bench"
    assert levers([f"one={tmp_path / 'a.pt'}", f"two={tmp_path / 'b.pt'}", "--data", str(data), "--out", str(out),
                   "--cache-dir", str(tmp_path / "cache"), "--encoder-onnx", encoder]) == 0
    result = json.loads((out / "detector_levers.json").read_text())
    first, second = result["rows"]
    assert first["decision"] == "reference" and second["decision"] in ("better", "not better")
    assert "from scratch, 1 epochs" in first["lever"] and "width 16, 1 blocks;" in first["lever"]
    assert "fine-tune, 2 epochs" in second["lever"] and "width 16, 2 blocks (grown from 1)" in second["lever"]
    assert "never on val" in result["selection_rule"]
    table = (out / "detector_levers.md").read_text()
    assert table.count("\n| ") == 3 and "| one |" in table and "| two |" in table
    assert levers(["one=absent.pt", "--data", str(data), "--out", str(out)]) != 0
    # a later run keeps the earlier rows it does not re-measure, only against the same reference
    later = tmp_path / "later"
    assert levers([f"one={tmp_path / 'a.pt'}", "--data", str(data), "--out", str(later), "--cache-dir", str(tmp_path / "cache"),
                   "--encoder-onnx", encoder, "--previous", str(out / "detector_levers.json")]) == 0
    carried = json.loads((later / "detector_levers.json").read_text())["rows"]
    assert [r["name"] for r in carried] == ["one", "two"] and carried[1]["carried_from"]
    assert {k: carried[1][k] for k in ("box_f1_mean", "lever")} == {k: second[k] for k in ("box_f1_mean", "lever")}
    assert "| two (measured " in (later / "detector_levers.md").read_text()
    assert levers([f"two={tmp_path / 'b.pt'}", "--data", str(data), "--out", str(tmp_path / "refused"), "--cache-dir",
                   str(tmp_path / "cache"), "--encoder-onnx", encoder, "--previous", str(out / "detector_levers.json")]) != 0


def test_export_serves_the_selection_chosen_on_train(tmp_path: Path) -> None:
    """`export` takes the detector's score threshold and NMS IoU from the provenance beside its
    weights (chosen on train by train-detector), and the family defaults without one."""
    from cellsam_triton.contracts import LITE
    from cellsam_triton.export.lite_export import DEFAULT_DETECTOR_WEIGHTS, served_family

    from cellsam_triton.export.models.detector_lite import CellFinderLite, DetectorConfig, save_detector

    weights = tmp_path / "det.pt"
    save_detector(CellFinderLite(DetectorConfig(width=16, dilations=(1,))), weights)
    plain = served_family(None, detector_weights=weights)
    assert (plain.bbox_threshold, plain.nms_iou) == (LITE.bbox_threshold, LITE.nms_iou)
    assert not plain.detector_reads_image
    weights.with_suffix(".json").write_text(json.dumps({"selection": {"score_threshold": 0.45, "nms_iou": 0.4}}))
    chosen = served_family(None, detector_weights=weights)
    assert (chosen.bbox_threshold, chosen.nms_iou) == (0.45, 0.4)
    committed = json.loads(DEFAULT_DETECTOR_WEIGHTS.with_suffix(".json").read_text()).get("selection")
    if committed is not None:  # the committed detector is served with what train chose for it
        assert served_family(None).bbox_threshold == committed["score_threshold"]


def test_quality_focal_loss_is_least_where_the_score_equals_its_soft_target() -> None:
    import torch

    from cellsam_triton.export.train_detector import quality_focal_loss

    logits = torch.linspace(-6, 6, 241)
    for target in (0.0, 0.3, 0.8, 1.0):
        losses = torch.stack([quality_focal_loss(x.reshape(1), torch.tensor([target])) for x in logits])
        best = torch.sigmoid(logits[int(losses.argmin())]).item()
        assert abs(best - target) < 0.03, (target, best)
    # the weight |p - t| ** 2 makes a near-right score cost far less than plain BCE's entropy floor
    assert quality_focal_loss(torch.tensor([0.0]), torch.tensor([0.5])).item() < 1e-6


def test_quality_focal_targets_are_the_predicted_boxes_iou_and_train_from_the_cli(tmp_path: Path) -> None:
    import torch

    from cellsam_triton.export.models.detector_lite import CellFinderLite, DetectorConfig
    from cellsam_triton.export.train_detector import class_targets, detection_loss

    torch.manual_seed(0)
    model = CellFinderLite(DetectorConfig(width=16, dilations=(1,)))
    x = torch.randn(1, 256, 64, 64)
    loc = np.array([100, 2000])
    with torch.no_grad():
        cls, _, dist = model.raw(x)
        predicted = model.boxes(dist)[0, loc]
    batch, where = torch.zeros(2, dtype=torch.int64), torch.from_numpy(loc)
    exact = class_targets(cls, batch, where, predicted, predicted.clone(), "quality-focal")
    assert torch.allclose(exact[0, where], torch.ones(2), atol=1e-5)
    shifted = class_targets(cls, batch, where, predicted, predicted + 3.0, "quality-focal")
    assert ((shifted[0, where] > 0) & (shifted[0, where] < 0.95)).all() and shifted.sum() == shifted[0, where].sum()
    assert (class_targets(cls, batch, where, predicted, predicted + 3.0)[0, where] == 1).all()  # focal
    truth = [(loc, (predicted + 3.0).numpy())]
    assert detection_loss(model, x, truth, "focal")[0].item() != detection_loss(model, x, truth, "quality-focal")[0].item()
    _, provenance = _tiny_run(tmp_path, "--class-loss", "quality-focal", "--augment-kinds", "", "--width", "16", "--dilations", "1")
    assert provenance["class_loss"] == "quality-focal"


def test_pixel_branch_starts_at_zero_and_trains_from_the_cli(tmp_path: Path) -> None:
    """--pixel-width adds a branch on the tile image to --init weights without changing their outputs
    at the start; training moves it; the export's family then sends the detector the tile too."""
    import torch

    from cellsam_triton.export.lite_export import served_family
    from cellsam_triton.export.models.detector_lite import CellFinderLite, DetectorConfig, add_pixel_branch, load_detector, save_detector

    torch.manual_seed(0)
    start = CellFinderLite(DetectorConfig(width=16, dilations=(1,))).eval()
    extended = add_pixel_branch(start, 8).eval()
    x, image = torch.randn(2, 256, 64, 64), torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        for a, b in zip(start(x), extended(x, image)):
            assert torch.equal(a, b)  # the projection starts at zero
    with pytest.raises(ValueError, match="tile image"):
        extended(x)
    for bad in (0, 12):
        with pytest.raises(ValueError, match="multiple of 8"):
            add_pixel_branch(start, bad)
    with pytest.raises(ValueError, match="already"):
        add_pixel_branch(extended, 8)
    save_detector(start, tmp_path / "start.pt")
    with pytest.raises(UserError, match="--pixel-width"):
        _tiny_run(tmp_path / "bad", "--augment-kinds", "", "--init", str(tmp_path / "start.pt"), "--pixel-width", "5")
    out, provenance = _tiny_run(tmp_path / "good", "--augment-kinds", "", "--init", str(tmp_path / "start.pt"), "--pixel-width", "8")
    assert provenance["architecture"]["pixel_width"] == 8 and provenance["architecture"]["width"] == 16
    trained = load_detector(out)
    assert trained.reads_pixels and trained.pixels.project.weight.abs().sum() > 0  # the branch trained
    with torch.no_grad():  # and the tile now changes the detections
        assert not torch.equal(trained(x, image)[0], trained(x, torch.zeros_like(image))[0])
    assert served_family(None, detector_weights=out).detector_reads_image
    assert not served_family(None, detector_weights=tmp_path / "start.pt").detector_reads_image
    _, scratch = _tiny_run(tmp_path / "new", "--augment-kinds", "", "--width", "16", "--dilations", "1", "--pixel-width", "16")
    assert scratch["architecture"]["pixel_width"] == 16
