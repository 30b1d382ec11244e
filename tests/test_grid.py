"""Grid prompts: mask rules (numpy), the served `<family>_grid` BLS on a tiny SAM, and real DSB images."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cellsam_triton.client.api import Segmenter
from cellsam_triton.client.grid_rules import GridOptions, sam_frame
from cellsam_triton.client.types import SegmentOptions
from cellsam_triton.contracts import Family, GridRules
from cellsam_triton.errors import UserError
from cellsam_triton.export.cellseg1_export import export_sam_family
from cellsam_triton.export.grid_repository import served_roles, write_served
from cellsam_triton.export.models import cellseg1
from cellsam_triton.model_repository import grid_masks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cellseg1 import SERVED, _random_state  # noqa: E402

TINY = Family(name="tiny_grid", input_size=SERVED, embed_dim=16, embed_size=4, low_res_size=16, detector="none",
              preprocess="sam", encoder_batch=2, decoder_chunk=5, min_cell_area=0,
              grid=GridRules(points_per_side=4, min_region_area=2, max_area_fraction=1.01))  # random weights: big masks


# --- mask rules -------------------------------------------------------------------------------------
def test_point_grid_centres():
    points = grid_masks.point_grid(4, (0, 0, 64, 32))
    assert points.shape == (16, 2)
    np.testing.assert_allclose(points[0], [8, 4])
    np.testing.assert_allclose(points[-1], [56, 28])


def test_stability_score_counts_thresholded_pixels():
    logits = np.full((2, 4, 4), -5.0, np.float32)
    logits[0, :2] = 5.0  # crisp: stable
    logits[1, 0] = 5.0
    logits[1, 1] = 0.5  # half the mask only between -offset and +offset
    score = grid_masks.stability_score(logits, offset=0.8)
    np.testing.assert_allclose(score, [1.0, 0.5])


def test_mask_nms_drops_overlapping_lower_scores():
    masks = np.zeros((3, 10, 10), bool)
    masks[0, :5, :5] = True
    masks[1, :5, :4] = True  # IoU 0.8 with mask 0
    masks[2, 6:, 6:] = True
    kept = grid_masks.mask_nms(masks, np.array([0.5, 0.9, 0.7]), iou_threshold=0.05)
    assert kept.tolist() == [1, 2]
    assert grid_masks.mask_nms(masks, np.array([0.5, 0.9, 0.7]), iou_threshold=0.9).tolist() == [1, 2, 0]


def test_clean_mask_fills_small_holes_and_drops_small_islands():
    mask = np.zeros((20, 20), bool)
    mask[2:12, 2:12] = True
    mask[6, 6] = False  # 1-pixel hole
    mask[16:18, 16:18] = True  # 4-pixel island
    clean = grid_masks.clean_mask(mask, min_area=5)
    assert clean[6, 6] and not clean[16:18, 16:18].any() and clean[2:12, 2:12].all()
    lonely = np.zeros((8, 8), bool)
    lonely[1, 1] = lonely[5, 5:7] = True
    assert grid_masks.clean_mask(lonely, 5).sum() == 2  # all islands small: the largest stays


def test_grid_options_validate():
    assert GridOptions(points_per_side=8).arrays()["points_per_side"].dtype == np.int32
    with pytest.raises(UserError):
        GridOptions(points_per_side=0).arrays()


def test_sam_frame_resizes_longest_side_and_pads():
    image = np.random.default_rng(0).integers(0, 255, (30, 60, 3)).astype(np.uint8)
    frame, (h, w) = sam_frame(image, 64)
    assert frame.shape == (1, 3, 64, 64) and (h, w) == (32, 64)
    assert np.all(frame[0, :, h:, :] == 0)


def test_served_roles_skip_missing_detector():
    names = [spec.name for _, spec in served_roles(TINY)]
    assert names == ["tiny_grid_encoder", "tiny_grid_decoder", "tiny_grid", "tiny_grid_point_decoder", "tiny_grid_grid"]


# --- served -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grid_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("grid_repository")
    torch.manual_seed(0)
    modules = cellseg1.build_sam(cellseg1.resize_to_input(_random_state(3), SERVED), SERVED)
    export_sam_family(modules, TINY, repo, tolerance=1e-3)
    write_served(repo, TINY, "cpu", threads=1)
    return repo


def test_grid_pipeline_served(grid_repository: Path, server_factory):
    server = server_factory(grid_repository)
    server.start(90)
    image = np.zeros((40, 64), np.float32)
    image[8:20, 10:24] = 1.0
    image[25:35, 40:55] = 0.7
    loose = GridOptions(points_per_side=6, pred_iou_threshold=-100.0, stability_threshold=0.0)
    with Segmenter(server.grpc_url, model=TINY.grid_name) as seg:
        assert seg.family.name == TINY.name
        frame, (h, w) = sam_frame(image[..., None], SERVED)
        spec = TINY.grid_pipeline()
        arrays = {"image": frame, "valid_size": np.array([h, w], np.int32), **loose.arrays()}
        out = seg.transport.infer(TINY.grid_name, arrays, spec)
        masks = out["masks"].astype(np.float32) > 0
        assert len(masks) > 0
        areas = masks.reshape(len(masks), -1).sum(1)
        assert np.all(np.diff(areas) <= 0)  # largest first
        scale = TINY.low_res_size / SERVED
        assert not masks[:, int(np.ceil(h * scale)):, :].any()  # nothing in the padding
        inter = (masks[:, None] & masks[None]).reshape(len(masks), len(masks), -1).sum(-1)
        iou = inter / (areas[:, None] + areas[None] - inter)
        assert np.all(iou[~np.eye(len(masks), dtype=bool)] <= 0.05)  # mask NMS
        assert np.all(out["prompt_index"] < 36)

        result = seg.segment(image, prompts="grid", grid=loose)
        assert result.labels.shape == image.shape and result.count > 0
        assert sorted(np.unique(result.labels))[1:] == [c["label"] for c in result.cells]
        strict = seg.segment(image, prompts="grid", grid=GridOptions(points_per_side=6, pred_iou_threshold=100.0))
        assert strict.count == 0
        with pytest.raises(UserError, match="grid prompts"):
            seg.segment(image)  # a detector-free family
        # point prompts through its point decoder, in CellSeg1's resized frame
        pointed = seg.segment(image, points=[[16, 14], [47, 30]], options=SegmentOptions(iou_threshold=-1, min_cell_area=0))
        assert pointed.labels.shape == image.shape and 1 <= pointed.count <= 2
        flipped = seg.segment(image, points=[[16, 14], [47, 30]], options=SegmentOptions(iou_threshold=-1, min_cell_area=0, tta=4))
        assert flipped.labels.shape == image.shape and flipped.count <= 2  # test-time flips: any family's point prompts
        with pytest.raises(UserError, match="outside the image"):
            seg.segment(image, points=[[64, 10]])
        with pytest.raises(Exception, match="points_per_side"):
            seg.transport.infer(TINY.grid_name, {**arrays, "points_per_side": np.array([0], np.int32)}, spec)
