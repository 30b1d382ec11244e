"""Test-time flips of CellFinder-lite (``--tta``, request input ``tta``): the mirror and fusion rules,
and the default export served by a real tritonserver (the pipeline's fused boxes equal the same
steps done by hand through the encoder and detector models; Triton's own statistics count one
encoder and one detector request per view; CLI, labels model and refusals)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import tritonclient.grpc as grpcclient
from served_checks import assert_same_cells, detector_inputs, infer

from bench.measure import statistics_delta, triton_statistics

from cellsam_triton.cli import main as cli
from cellsam_triton.client.api import Segmenter
from cellsam_triton.client.tiles import family_tiles, lite_normalize, tile_input
from cellsam_triton.client.types import SegmentOptions, check_tta_prompts
from cellsam_triton.contracts import CELLSAM, LITE, NAMES
from cellsam_triton.errors import UserError
from cellsam_triton.model_repository import selection
from cellsam_triton.server import EmbeddedServer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018"
STAINED_VAL = "13f2bec0a2"  # a 256 x 320 H&E validation image (two tiles)


# --- the rules, no server ------------------------------------------------------------------------
def test_a_box_found_on_a_mirrored_view_maps_back_onto_the_object() -> None:
    image = np.zeros((1, 3, 32, 32), np.float32)
    image[..., 5:12, 20:29] = 1.0  # rows 5..11, columns 20..28
    for view in range(4):
        mirrored = selection.flip_view(image, view)
        rows, cols = np.nonzero(mirrored[0, 0])
        found = np.array([[cols.min(), rows.min(), cols.max(), rows.max()]], np.float32)  # inclusive corners
        np.testing.assert_array_equal(selection.unflip_boxes(found, view, 32), [[20, 5, 28, 11]])
    assert np.array_equal(selection.flip_view(selection.flip_view(image, 3), 3), image)


def test_fusion_averages_agreeing_views_and_discounts_boxes_one_view_saw() -> None:
    a = np.array([[10, 10, 20, 20], [50, 50, 60, 60]], np.float32)
    b = np.array([[12, 10, 22, 20]], np.float32)  # the first box again, shifted 2 px; the second box missed
    boxes, scores = selection.fuse_views([(a, np.array([0.8, 0.6], np.float32)), (b, np.array([0.4], np.float32))])
    order = np.argsort(boxes[:, 0])
    boxes, scores = boxes[order], scores[order]
    np.testing.assert_allclose(boxes[0], [(10 * 0.8 + 12 * 0.4) / 1.2, 10, (20 * 0.8 + 22 * 0.4) / 1.2, 20], rtol=1e-6)
    np.testing.assert_allclose(scores, [(0.8 + 0.4) / 2, 0.6 / 2], rtol=1e-6)  # score summed over 2 views
    far = np.array([[30, 30, 40, 40]], np.float32)
    boxes, scores = selection.fuse_views([(a[:1], np.array([0.9], np.float32)), (far, np.array([0.7], np.float32))])
    assert len(boxes) == 2  # no overlap, no fusion
    empty = np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    boxes, scores = selection.fuse_views([empty, empty])
    assert boxes.shape == (0, 4) and scores.shape == (0,)


def test_tta_is_refused_where_it_means_nothing() -> None:
    SegmentOptions(tta=4).check_tta(LITE, detector_boxes=True)
    SegmentOptions().check_tta(CELLSAM, detector_boxes=False)
    with pytest.raises(UserError, match="one of 1, 2, 4, got 3"):
        SegmentOptions(tta=3).check_tta(LITE, detector_boxes=True)
    with pytest.raises(UserError, match="need CellFinder-lite; model cellsam"):
        SegmentOptions(tta=2).check_tta(CELLSAM, detector_boxes=True)
    with pytest.raises(UserError, match="detector boxes and point prompts only, not to given boxes or grid prompts$"):
        SegmentOptions(tta=2).check_tta(LITE, detector_boxes=False)
    for family in (LITE, CELLSAM):  # point prompts are flipped by the client: any family
        SegmentOptions(tta=4).check_tta(family, detector_boxes=False, points=True)
    with pytest.raises(UserError, match="one of 1, 2, 4, got 3"):
        SegmentOptions(tta=3).check_tta(CELLSAM, detector_boxes=False, points=True)
    check_tta_prompts(1, {"--boxes": True})
    check_tta_prompts(4, {"--boxes": False})
    with pytest.raises(UserError, match=r"detector boxes and point prompts only, not to --boxes gt or --prompts grid$"):
        check_tta_prompts(2, {"--boxes gt": True, "--prompts grid": True})  # the CLI's names
    assert NAMES.tta in {t.name for t in LITE.pipeline().inputs}
    assert NAMES.tta in {t.name for t in LITE.labels_model().inputs}
    assert NAMES.tta not in {t.name for t in CELLSAM.pipeline().inputs}


# --- served, default export ------------------------------------------------------------------------
def stained_image() -> np.ndarray:
    from cellsam_triton.datasets import load_manifest, load_sample

    (record,) = [r for r in load_manifest(DATA) if r.id.startswith(STAINED_VAL)]
    return load_sample(DATA, record.id)[0]


def stained_tile() -> np.ndarray:
    image = stained_image()
    return tile_input(lite_normalize(image), family_tiles(LITE, *image.shape[:2])[0])


@pytest.mark.parametrize("views", [2, 4])
def test_served_flips_fuse_the_detections_of_every_view(default_server: EmbeddedServer, views: int) -> None:
    """The pipeline with ``tta`` = the encoder and detector called by hand on each mirrored tile, each
    view's boxes selected at the candidate floor and mirrored back, fused, then the served threshold."""
    tile = stained_tile()
    with grpcclient.InferenceServerClient(default_server.grpc_url) as client:
        manual = []
        for view in range(views):
            mirrored = selection.flip_view(tile, view)
            (embedding,) = infer(client, LITE.encoder_name, {NAMES.image: mirrored}, (NAMES.image_embeddings,))
            scores, boxes = infer(client, LITE.detector_name, detector_inputs(client, LITE.detector_name, embedding, mirrored),
                                  (NAMES.pred_scores, NAMES.pred_boxes))
            kept, kept_scores = selection.select_lite(scores[0], boxes[0], selection.TTA_CANDIDATE_THRESHOLD, LITE.nms_iou,
                                                      LITE.max_detections)
            manual.append((selection.unflip_boxes(kept, view, LITE.input_size), kept_scores))
        fused, fused_scores = selection.fuse_views(manual)
        want, want_scores = selection.select_lite(fused_scores, fused, LITE.bbox_threshold, LITE.nms_iou, LITE.max_detections)
        names = [LITE.encoder_name, LITE.detector_name]
        before = triton_statistics(client, names)
        request = {NAMES.image: tile, NAMES.iou_threshold: np.array([-1.0], np.float32), NAMES.tta: np.array([views], np.int32)}
        boxes, scores = infer(client, LITE.pipeline_name, request, (NAMES.boxes, NAMES.scores))
        requests = {n: d["requests"] for n, d in statistics_delta(before, triton_statistics(client, names)).items()}
        plain_boxes, _ = infer(client, LITE.pipeline_name, {NAMES.image: tile, NAMES.iou_threshold: np.array([-1.0], np.float32)},
                               (NAMES.boxes, NAMES.scores))
    assert requests == {LITE.encoder_name: views, LITE.detector_name: views}
    assert len(want) > 5
    np.testing.assert_allclose(boxes, want, atol=1e-4)
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)
    assert not (len(plain_boxes) == len(boxes) and np.allclose(plain_boxes, boxes))  # the flips changed the boxes


def test_served_tta_refusals_are_one_line(default_server: EmbeddedServer) -> None:
    from tritonclient.utils import InferenceServerException

    tile = stained_tile()
    with grpcclient.InferenceServerClient(default_server.grpc_url) as client:
        with pytest.raises(InferenceServerException, match="input 'tta' must be one of 1, 2, 4, got 3"):
            infer(client, LITE.pipeline_name, {NAMES.image: tile, NAMES.tta: np.array([3], np.int32)}, (NAMES.boxes,))
        with pytest.raises(InferenceServerException, match="does not apply with given 'boxes'"):
            infer(client, LITE.pipeline_name, {NAMES.image: tile, NAMES.tta: np.array([2], np.int32),
                                               NAMES.boxes: np.array([[10, 10, 40, 40]], np.float32)}, (NAMES.boxes,))


def test_cli_and_labels_model_flip_as_the_api_does(default_server: EmbeddedServer, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = stained_image()
    with Segmenter(default_server.grpc_url) as segmenter:
        api = segmenter.segment(image, options=SegmentOptions(tta=2))
        plain = segmenter.segment(image)
    assert api.count > 5 and not np.array_equal(api.labels, plain.labels)
    with grpcclient.InferenceServerClient(default_server.grpc_url) as client:
        (labels,) = infer(client, LITE.labels_name, {NAMES.image: image, NAMES.tta: np.array([2], np.int32)}, (NAMES.labels,))
    assert_same_cells(labels, api.labels)
    tifffile.imwrite(tmp_path / "stained.tif", image)
    assert cli(["segment", str(tmp_path / "stained.tif"), "--out", str(tmp_path / "out"), "--url", default_server.grpc_url, "--tta", "2"]) == 0
    assert_same_cells(tifffile.imread(tmp_path / "out" / "stained_labels.tif"), api.labels)
    with pytest.raises(SystemExit) as exit_info:
        cli(["segment", str(tmp_path / "stained.tif"), "--out", str(tmp_path / "bad"), "--url", default_server.grpc_url, "--tta", "3"])
    assert exit_info.value.code == 2
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("x0,y0,x1,y1\n30,30,50,50\n")
    assert cli(["segment", str(tmp_path / "stained.tif"), "--out", str(tmp_path / "bad"), "--url", default_server.grpc_url, "--tta", "2",
                "--boxes", str(boxes)]) == 2
    assert "test-time flips (tta) apply to detector boxes and point prompts only, not to --boxes\n" in capsys.readouterr().err


def test_eval_scores_with_flips_what_segment_gives(default_server: EmbeddedServer, capsys: pytest.CaptureFixture) -> None:
    """`cellsam-triton eval --tta 2`: per-image F1 of the labels `Segmenter.segment` gives with the same flips."""
    import json

    from cellsam_triton.client.evaluate import select
    from cellsam_triton.client.metrics import score_image
    from cellsam_triton.datasets import load_sample

    (record,) = select(DATA, "val", limit=1)
    image, truth = load_sample(DATA, record.id)
    with Segmenter(default_server.grpc_url) as segmenter:
        want = score_image(truth, segmenter.segment(image, options=SegmentOptions(tta=2)).labels).f1
    capsys.readouterr()
    assert cli(["eval", "--data", str(DATA), "--limit", "1", "--url", default_server.grpc_url, "--tta", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tta"] == 2 and result["f1_mean"] == pytest.approx(want)
    assert cli(["eval", "--data", str(DATA), "--limit", "1", "--url", default_server.grpc_url, "--tta", "2", "--boxes", "gt"]) == 2
