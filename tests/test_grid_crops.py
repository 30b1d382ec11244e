"""Grid crop layer (crops zoomed to the input, own point grid each, merged by mask-IoU NMS), the shared
BLS glue, and the one `segment_image` dispatch used by Segmenter, AsyncSegmenter and ServerPool."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cellsam_triton.client.api import AsyncSegmenter, Segmenter
from cellsam_triton.client.grid_rules import GridOptions, sam_frame
from cellsam_triton.client.pool import ServerPool
from cellsam_triton.errors import UserError
from cellsam_triton.export.cellseg1_export import export_sam_family
from cellsam_triton.export.grid_repository import write_served
from cellsam_triton.export.models import cellseg1
from cellsam_triton.model_repository import grid_masks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cellseg1 import SERVED, _random_state  # noqa: E402
from test_grid import TINY  # noqa: E402

LOOSE = dict(pred_iou_threshold=-100.0, stability_threshold=0.0)


# --- crop geometry (numpy) ------------------------------------------------------------------------
def test_crop_boxes_cover_the_image_with_overlap() -> None:
    boxes = grid_masks.crop_boxes(300, 200, 1, 0.25)
    assert len(boxes) == 4
    covered = np.zeros((200, 300), int)
    for x0, y0, x1, y1 in boxes:
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1 and covered.max() == 4  # every pixel, the centre by all four
    assert boxes[0][:2] == (0, 0) and boxes[-1][2:] == (300, 200)
    assert len(grid_masks.crop_boxes(64, 64, 2, 0.3)) == 4 + 16 and grid_masks.crop_boxes(64, 64, 0, 0.3) == []


def test_crop_input_zooms_the_crop_to_the_input() -> None:
    image = np.zeros((1, 3, 64, 64), np.float32)
    image[0, :, 8:16, 8:16] = 1.0  # an 8 px square in the top-left crop
    crop, (h, w) = grid_masks.crop_input(image, (0, 0, 32, 32))
    assert (h, w) == (64, 64)
    bright = np.argwhere(crop[0, 0] > 0.5)
    assert bright.min(0).tolist() == [16, 16] and bright.max(0).tolist() == [31, 31]  # 2x zoom


def test_crop_to_frame_maps_a_crop_mask_back() -> None:
    size, m = 64, 16
    box = (32, 0, 64, 32)  # top-right quarter, zoom 2
    logits = np.full((1, m, m), -5.0, np.float32)
    logits[0, 4:8, 4:8] = 5.0  # crop low-res cells 4..7 = crop pixels 16..31 = frame pixels 40..47
    frame = grid_masks.crop_to_frame(logits, box, size)
    inside = np.argwhere(frame[0] > 0)
    assert inside.min(0).tolist() == [2, 10] and inside.max(0).tolist() == [3, 11]  # frame low-res cells
    assert np.all(frame[0, 8:, :] == grid_masks.FAR) and np.all(frame[0, :, :8] == grid_masks.FAR)
    identity = grid_masks.crop_to_frame(logits, (0, 0, size, size), size)
    np.testing.assert_allclose(identity, logits)


def test_masks_cut_by_an_inner_crop_border_are_dropped() -> None:
    crop, frame = (0, 0, 40, 40), (0, 0, 64, 64)
    boxes = np.array([[0, 0, 10, 10], [30, 5, 40, 15], [10, 10, 20, 20]], np.float32)
    assert grid_masks.near_crop_edge(boxes, crop, frame, 2.0).tolist() == [False, True, False]


# --- served ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grid_server(tmp_path_factory: pytest.TempPathFactory):
    from cellsam_triton.server import EmbeddedServer

    repo = tmp_path_factory.mktemp("grid_crops")
    torch.manual_seed(0)
    modules = cellseg1.build_sam(cellseg1.resize_to_input(_random_state(3), SERVED), SERVED)
    export_sam_family(modules, TINY, repo, tolerance=1e-3)
    write_served(repo, TINY, "cpu", threads=1)
    for pipeline in (TINY.pipeline_name, TINY.grid_name):
        assert (repo / pipeline / "1" / "bls.py").is_file()  # the shared BLS glue beside both pipelines
    with EmbeddedServer(repo, log_path=repo / "triton.log", exit_timeout_s=2) as server:
        yield server


def _image() -> np.ndarray:
    image = np.zeros((48, 64), np.float32)
    image[8:20, 10:24] = 1.0
    image[28:40, 40:55] = 0.7
    return image


def test_crop_layer_served(grid_server) -> None:
    with Segmenter(grid_server.grpc_url, model=TINY.grid_name) as seg:
        frame, (h, w) = sam_frame(_image()[..., None], SERVED)
        spec = TINY.grid_pipeline()
        base = {"image": frame, "valid_size": np.array([h, w], np.int32), **GridOptions(points_per_side=4, **LOOSE).arrays()}
        plain = seg.transport.infer(TINY.grid_name, base, spec)
        cropped = seg.transport.infer(TINY.grid_name, {**base, "crop_n_layers": np.array([1], np.int32)}, spec)
        assert np.all(plain["prompt_index"] < 16)
        assert np.all(cropped["prompt_index"] < 5 * 16)  # frame + 4 crops, 16 points each
        masks = cropped["masks"].astype(np.float32) > 0
        areas = masks.reshape(len(masks), -1).sum(1)
        assert len(masks) and np.all(np.diff(areas) <= 0)
        inter = (masks[:, None] & masks[None]).reshape(len(masks), len(masks), -1).sum(-1)
        iou = inter / (areas[:, None] + areas[None] - inter)
        assert np.all(iou[~np.eye(len(masks), dtype=bool)] <= 0.05)  # one NMS over frame and crops
        scale = TINY.low_res_size / SERVED
        assert not masks[:, int(np.ceil(h * scale)):, :].any()
        with pytest.raises(Exception, match="crop_n_layers"):
            seg.transport.infer(TINY.grid_name, {**base, "crop_n_layers": np.array([3], np.int32)}, spec)
        result = seg.segment(_image(), prompts="grid", grid=GridOptions(points_per_side=4, crop_n_layers=1, **LOOSE))
        assert result.labels.shape == (48, 64)


def test_one_dispatch_for_segmenter_async_and_pool(grid_server) -> None:
    grid = GridOptions(points_per_side=4, **LOOSE)
    with Segmenter(grid_server.grpc_url) as seg:  # no model named: the only pipeline family
        want = seg.segment(_image(), prompts="grid", grid=grid).labels
        with pytest.raises(UserError, match="either prompt boxes or grid"):
            seg.segment(_image(), boxes=[[0, 0, 4, 4]], prompts="grid")
        with pytest.raises(UserError, match="unknown prompts"):
            seg.segment(_image(), prompts="points")

    async def run_async() -> np.ndarray:
        async with AsyncSegmenter(grid_server.grpc_url) as aseg:
            return (await aseg.segment(_image(), prompts="grid", grid=grid)).labels

    np.testing.assert_array_equal(asyncio.run(run_async()), want)
    with ServerPool([grid_server.grpc_url], timeout_s=60) as pool:
        np.testing.assert_array_equal(pool.segment(_image(), prompts="grid", grid=grid).labels, want)
        with pytest.raises(UserError, match="grid prompts"):
            pool.segment(_image())  # a detector-free model
    with pytest.raises(UserError, match="crop layers"):
        GridOptions(crop_n_layers=3).arrays()
