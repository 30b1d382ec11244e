"""ROI decoding: the window rule, the window decoder against SAM's full decoder, and the served
default model decoding on windows vs on the whole embedding (same weights, real DSB image)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from cellsam_triton.contracts import LITE
from cellsam_triton.model_repository.roi_windows import crop_windows, cut_by_window, paste_windows, plan_windows, point_windows

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018"
E, STRIDE, SIDES, MARGIN = LITE.embed_size, LITE.input_size // LITE.embed_size, LITE.roi_windows, LITE.roi_margin


def box_of_cells(x_cell: int, y_cell: int, span: int) -> list[float]:
    """A box whose pixels cover exactly ``span`` embedding cells from (x_cell, y_cell)."""
    x0, y0 = x_cell * STRIDE, y_cell * STRIDE
    return [x0, y0, x0 + span * STRIDE - 1, y0 + span * STRIDE - 1]


# --- the window rule ------------------------------------------------------------------------------
def test_bucket_edges() -> None:
    small, large = min(SIDES), max(SIDES)
    spans = [small - 2 * MARGIN, small - 2 * MARGIN + 1, large - 2 * MARGIN, large - 2 * MARGIN + 1]
    sides, _ = plan_windows(np.array([box_of_cells(20, 20, s) for s in spans], np.float32), E, STRIDE, SIDES, MARGIN)
    assert list(sides) == [small, large, large, 0]  # 0: too large for every window -> full decoder


def test_windows_hold_box_and_margin_and_stay_in_the_grid() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 250, (500, 2))
    wh = rng.uniform(2, 140, (500, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, 255)], axis=1).astype(np.float32)
    sides, origins = plan_windows(boxes, E, STRIDE, SIDES, MARGIN)
    assert set(np.unique(sides)) <= {0, *SIDES}
    for box, side, (ox, oy) in zip(boxes, sides, origins):
        if side == 0:
            continue
        assert 0 <= ox <= E - side and 0 <= oy <= E - side
        lo, hi = np.floor(box[:2] / STRIDE), np.floor(box[2:] / STRIDE)
        # the box and its margin (clipped to the grid) lie inside the window
        assert ox <= max(lo[0] - MARGIN, 0) and min(hi[0] + MARGIN, E - 1) < ox + side
        assert oy <= max(lo[1] - MARGIN, 0) and min(hi[1] + MARGIN, E - 1) < oy + side


def test_boxes_at_tile_borders_get_windows_pushed_inside() -> None:
    boxes = np.array([[0, 0, 9, 9], [246, 246, 255, 255], [0, 240, 10, 255], [250, 0, 255, 5]], np.float32)
    sides, origins = plan_windows(boxes, E, STRIDE, SIDES, MARGIN)
    small = min(SIDES)
    assert list(sides) == [small] * 4
    assert origins.tolist() == [[0, 0], [E - small, E - small], [0, E - small], [E - small, 0]]


def test_zero_boxes_and_odd_boxes() -> None:
    sides, origins = plan_windows(np.zeros((0, 4), np.float32), E, STRIDE, SIDES, MARGIN)
    assert sides.shape == (0,) and origins.shape == (0, 2)
    # corners swapped or outside the frame: planned on the clipped, ordered box
    sides, origins = plan_windows(np.array([[40, 40, 20, 20], [-30, -30, 8, 8]], np.float32), E, STRIDE, SIDES, MARGIN)
    assert list(sides) == [min(SIDES)] * 2 and (origins >= 0).all()


def test_crop_and_paste_round_trip() -> None:
    rng = np.random.default_rng(1)
    grid = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    origins = np.array([[0, 0], [4, 2]])
    windows = crop_windows(grid, origins, 4)
    assert np.array_equal(windows[1], grid[0, :, 2:6, 4:8])
    out = np.zeros((2, 16, 16), np.float16)
    logits = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    paste_windows(out, [0, 1], logits, origins, 2, -1.0)
    assert np.allclose(out[1, 4:12, 8:16], logits[1, 0], atol=1e-2)
    assert (out[1, :4] == -1).all() and (out[1, :, :8] == -1).all()


# --- the window decoder vs SAM's full decoder ---------------------------------------------------
@pytest.fixture(scope="module")
def lite():
    pytest.importorskip("torch")
    from cellsam_triton.export.models.litemedsam import load_litemedsam

    return load_litemedsam()


def test_window_decoder_on_the_whole_grid_is_the_full_decoder(lite) -> None:
    import torch

    from cellsam_triton.export.models.window_decoder import WindowDecoder

    window = WindowDecoder(lite.decoder.prompt_encoder, lite.decoder.mask_decoder).eval()
    torch.manual_seed(0)
    embedding = torch.randn(1, 256, E, E) * 0.5
    boxes = torch.tensor([[100.0, 100.0, 130.0, 140.0], [10.0, 20.0, 60.0, 50.0]])
    with torch.no_grad():
        masks, iou = lite.decoder(embedding, boxes)
        window_masks, window_iou = window(embedding.expand(2, -1, -1, -1), torch.zeros(2, 2), boxes)
        # the window's positional encoding is the crop of SAM's dense encoding
        dense = lite.decoder.prompt_encoder.get_dense_pe()
        pe = window.window_pe(torch.tensor([[10.0, 20.0]]), 16)
    assert torch.equal(masks, window_masks) and torch.equal(iou, window_iou)
    assert torch.equal(pe, dense[:, :, 20:36, 10:26])


# --- grid points on windows (``grid.window``) ----------------------------------------------------------
def test_point_windows_centre_the_point_and_stay_in_the_grid() -> None:
    side = LITE.grid.window
    points = np.array([[128.0, 128.0], [0.0, 0.0], [255.9, 3.0], [40.0, 250.0]])
    origin = point_windows(points, E, STRIDE, side)
    np.testing.assert_array_equal(origin[0], [32 - side // 2] * 2)  # cell 32 in the middle of its window
    np.testing.assert_array_equal(origin[1], [0, 0])
    np.testing.assert_array_equal(origin[2], [E - side, 0])  # pushed inside at the far border
    np.testing.assert_array_equal(origin[3], [max(0, 10 - side // 2), E - side])
    cells = np.floor(points / STRIDE)
    assert ((origin <= cells) & (cells < origin + side)).all()  # every point lies inside its window


def test_cut_by_window_only_counts_window_sides_inside_the_grid() -> None:
    side = 8
    logits = np.full((4, 1, 4 * side, 4 * side), -5.0, np.float32)
    logits[:, 0, 10:20, 10:20] = 3.0  # inside: never cut
    logits[1, 0, 0, 12] = 1.0  # top row
    logits[2, 0, 15, -1] = 1.0  # right column
    logits[3, 0, 0, 12] = 1.0  # top row, but the window lies on the grid's top border
    origin = np.array([[5, 5], [5, 5], [5, 5], [5, 0]])
    np.testing.assert_array_equal(cut_by_window(logits, origin, side, E), [False, True, True, False])
    far = np.array([[E - side, E - side]] * 4)  # right and bottom sides on the grid border
    np.testing.assert_array_equal(cut_by_window(logits, far, side, E), [False, True, False, True])


def test_window_point_decoder_on_the_whole_grid_is_the_point_decoder(lite) -> None:
    import torch

    from cellsam_triton.export.models.point_decoder import PointDecoder
    from cellsam_triton.export.models.window_point_decoder import WindowPointDecoder

    point = PointDecoder(lite.decoder.prompt_encoder, lite.decoder.mask_decoder).eval()
    window = WindowPointDecoder(lite.decoder.prompt_encoder, lite.decoder.mask_decoder).eval()
    torch.manual_seed(0)
    embedding = torch.randn(1, 256, E, E) * 0.5
    coords, labels = torch.tensor([[[100.0, 120.0]], [[10.0, 30.0]]]), torch.ones(2, 1)
    with torch.no_grad():
        masks, iou = point(embedding, coords, labels)
        window_masks, window_iou = window(embedding.expand(2, -1, -1, -1), torch.zeros(2, 2), coords, labels)
    assert torch.equal(masks, window_masks) and torch.equal(iou, window_iou)


def test_grid_generator_decodes_on_windows_and_cut_masks_again_whole() -> None:
    """The generator's windowed decoding with stand-in decoders that record their calls: each point's
    window logits are pasted at its window (FAR elsewhere); a mask reaching an inner window side is
    replaced by the whole-embedding decoding of that point, and only those points are decoded whole."""
    import dataclasses

    from cellsam_triton.contracts import NAMES
    from cellsam_triton.model_repository import grid_masks
    from cellsam_triton.model_repository.grid_generator import GridGenerator

    family = dataclasses.replace(LITE, grid=dataclasses.replace(LITE.grid, window=16))
    calls = []
    whole_value = 7.0

    def call(stage, model, inputs, outputs):
        calls.append((stage, model, len(inputs[NAMES.point_coords])))
        n = len(inputs[NAMES.point_coords])
        if stage == "point decoder":
            return np.full((n, 1, 256, 256), whole_value, np.float32), np.full((n, 1), 0.5, np.float32)
        side = inputs[NAMES.embedding_windows].shape[-1]
        logits = np.full((n, 1, 4 * side, 4 * side), -3.0, np.float32)
        logits[:, 0, 20:40, 20:40] = 2.0
        logits[::2, 0, 10:50, 0] = 2.0  # every other point: a mask reaching the window's left side
        return logits, np.arange(n, dtype=np.float32)[:, None] / 100

    generator = GridGenerator(family, call)
    points = np.array([[128.0, 128.0], [130.0, 40.0], [2.0, 100.0], [200.0, 200.0]], np.float32)
    embeddings = np.zeros((1, 256, E, E), np.float32)
    masks, ious = generator.decode(embeddings, points)
    origin = point_windows(points, E, STRIDE, 16)
    assert calls[0] == ("roi point decoder", family.roi_point_decoder_name, 4)
    assert calls[1:] == [("point decoder", family.point_decoder_name, 1)]  # point 0; point 2's window is on the grid's left border
    assert (masks[0] == whole_value).all() and ious[0] == 0.5
    for k in (1, 2, 3):
        x, y = origin[k] * 4
        assert (masks[k, y + 20:y + 40, x + 20:x + 40] == 2.0).all() and ious[k] == np.float32(k / 100)
        assert (masks[k] == grid_masks.FAR).sum() == 256 * 256 - 64 * 64
    assert generator.decoded == {"window": 4, "whole": 1}


# --- served: windows vs the whole embedding, same weights ------------------------------------------
@pytest.fixture(scope="module")
def served(default_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    from cellsam_triton.client.transport import TritonTransport
    from cellsam_triton.server import EmbeddedServer

    if not (DATA / "manifest.csv").is_file():
        pytest.skip(f"DSB2018 data not found at {DATA}")
    log = tmp_path_factory.mktemp("roi") / "triton.log"
    with EmbeddedServer(default_repository, log_path=log) as server, TritonTransport(server.grpc_url) as transport:
        assert transport.family.decoder_context == "roi"
        yield transport


def _tile(sample: str):
    from cellsam_triton.client.tiles import lite_normalize, tile_grid, tile_input
    from cellsam_triton.datasets import load_sample
    from cellsam_triton.export.train_detector import label_boxes

    image, labels = load_sample(DATA, sample)
    tile = tile_grid(*image.shape[:2])[0]
    crop = labels[tile.window]
    return tile_input(lite_normalize(image), tile), label_boxes(crop, 25)


VAL_IMAGE = "0c6507d493bf79b2ba248c5cca3d14df8b67328b89efa5f4a32f97a06a88c92c"  # 256x256 fluorescence, ~25 nuclei


def test_served_roi_masks_agree_with_full_decoding_where_the_window_holds_the_mask(served) -> None:
    image, boxes = _tile(VAL_IMAGE)
    iou_off = np.array([-1.0], np.float32)
    (result,) = served.run([{"image": image, "boxes": boxes, "iou_threshold": iou_off}])
    roi = result.masks.astype(np.float32) > 0
    full, _ = served.decode(served.embed(image[0]), boxes)  # the `_decoder` model: whole embedding
    full = full[:, 0] > 0
    sides, origins = plan_windows(boxes, E, STRIDE, SIDES, MARGIN)
    held = []
    for k, (side, (ox, oy)) in enumerate(zip(sides, origins)):
        if side == 0 or not full[k].any():
            continue
        inside = np.zeros_like(full[k])
        inside[oy * STRIDE:(oy + side) * STRIDE, ox * STRIDE:(ox + side) * STRIDE] = True
        if not (full[k] & ~inside).any():  # the window holds the whole full-context mask
            held.append((roi[k] & full[k]).sum() / (roi[k] | full[k]).sum())
        assert not (roi[k] & ~inside).any()  # nothing painted outside the window
    assert len(held) >= 15, len(held)
    held = np.array(held)
    assert np.mean(held >= 0.9) >= 0.9 and held.mean() >= 0.93, np.round(held, 3)


def test_served_roi_decodes_every_bucket_border_boxes_and_zero_boxes(served) -> None:
    image, _ = _tile(VAL_IMAGE)
    small, large = min(SIDES), max(SIDES)
    boxes = np.array([box_of_cells(2, 2, small - 2 * MARGIN), box_of_cells(20, 20, large - 2 * MARGIN),
                      box_of_cells(10, 0, large - 2 * MARGIN + 1), [246, 246, 255, 255], [0, 0, 6, 6]], np.float32)
    iou_off = np.array([-1.0], np.float32)
    (result,) = served.run([{"image": image, "boxes": boxes, "iou_threshold": iou_off}])
    assert result.masks.shape == (5, LITE.low_res_size, LITE.low_res_size)
    assert np.array_equal(result.prompt_index, np.arange(5)) and np.isfinite(result.iou_predictions).all()
    sides, origins = plan_windows(boxes, E, STRIDE, SIDES, MARGIN)
    assert list(sides) == [small, large, 0, small, small]
    masks = result.masks.astype(np.float32)
    for k in (0, 1, 3, 4):  # outside its window a box's mask is the most negative FP16
        ox, oy = origins[k] * STRIDE
        outside = np.ones(masks.shape[1:], bool)
        outside[oy:oy + sides[k] * STRIDE, ox:ox + sides[k] * STRIDE] = False
        assert (masks[k][outside] == -np.finfo(np.float16).max).all()
    (empty,) = served.run([{"image": image, "boxes": np.zeros((0, 4), np.float32)}])
    assert empty.masks.shape == (0, LITE.low_res_size, LITE.low_res_size) and len(empty.scores) == 0


def test_core_limits_decoding_to_the_detections_a_tile_owns(served) -> None:
    image, _ = _tile(VAL_IMAGE)
    (everything,) = served.run([{"image": image}])
    assert len(everything.scores) >= 10
    core = np.array([0, 0, 128, 256], np.float32)  # left half of the tile
    (left,) = served.run([{"image": image, "core": core}])
    centres = (everything.boxes[:, 0] + everything.boxes[:, 2]) / 2
    assert 0 < len(left.scores) < len(everything.scores)
    assert np.array_equal(left.boxes, everything.boxes[centres < 128])
    assert np.array_equal(left.masks, everything.masks[centres < 128])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
