"""CellSAM's client numerics against torch re-computations of the published pipeline's steps.

The reference steps are written here with torch / torchvision as the published code runs them
(torchvision v2 Resize on float tensors, ToPILImage, Normalize, kornia's min-max formula,
SAM's postprocess_masks); the client computes them in numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from skimage.exposure import equalize_adapthist, rescale_intensity
from torchvision.transforms.functional import to_pil_image

from cellsam_triton.client import cellsam_rules as rules
from cellsam_triton.client.labels import fill_holes_and_remove_small, logit_threshold
from cellsam_triton.client.resize import iter_mask_logits, mask_logits_to_image, resize, resize_weights
from cellsam_triton.client.types import PipelineResult, SegmentOptions
from tests.tiny_family import tiny_family

RNG = np.random.default_rng(3)
# PyTorch's vectorised CPU kernels use fused multiply-adds, which the client reproduces exactly
FUSED_KERNELS = torch.backends.cpu.get_cpu_capability() != "DEFAULT"
SIZES = [(5, 17), (17, 5), (64, 64), (100, 37), (37, 100), (1, 9), (300, 64), (64, 1024)]


@pytest.mark.parametrize("n_in,n_out", SIZES)
def test_resize_weights_rows_sum_to_one(n_in, n_out):
    for antialias in (False, True):
        weights = resize_weights(n_in, n_out, antialias)
        assert weights.shape == (n_out, n_in) and (weights >= 0).all()
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize("hw_in,hw_out", [((31, 45), (64, 20)), ((64, 64), (17, 90)), ((13, 7), (13, 30)), ((200, 150), (64, 64))])
def test_resize_matches_torch(hw_in, hw_out):
    image = RNG.random((3,) + hw_in).astype(np.float32)
    tensor = torch.from_numpy(image)[None]
    plain = F.interpolate(tensor, hw_out, mode="bilinear", align_corners=False)[0].numpy()
    smooth = T.Resize(hw_out)(torch.from_numpy(image)).numpy()  # v2 default: antialias=True
    np.testing.assert_allclose(resize(image, hw_out, antialias=False), plain, atol=1e-5)
    np.testing.assert_allclose(resize(image, hw_out, antialias=True), smooth, atol=1e-5)
    hwc = resize(np.moveaxis(image, 0, -1), hw_out, antialias=True, channels_last=True)
    np.testing.assert_allclose(np.moveaxis(hwc, -1, 0), smooth, atol=1e-5)


def _sam_postprocess(low: np.ndarray, input_size: int, out_hw: tuple[int, int]) -> np.ndarray:
    """SAM's postprocess_masks for an unpadded square frame, in torch."""
    x = F.interpolate(torch.from_numpy(low)[:, None], (input_size, input_size), mode="bilinear", align_corners=False)
    return F.interpolate(x, out_hw, mode="bilinear", align_corners=False)[:, 0].numpy()


@pytest.mark.parametrize("out_hw", [(256, 320), (1100, 700), (37, 64)])
def test_mask_upsampling_matches_sam(out_hw):
    low = (RNG.normal(0, 4, (3, 64, 64))).astype(np.float32)
    expected = _sam_postprocess(low, 256, out_hw)
    full = mask_logits_to_image(low, 256, out_hw)
    assert full.shape == (3,) + out_hw and full.dtype == np.float32
    # one composed float32 product vs two float32 resizes: terms of up to ~15 cancel near 0
    np.testing.assert_allclose(full, expected, atol=1e-4, rtol=1e-5)
    cut = 3.0
    for (rows, cols, block), want in zip(iter_mask_logits(low, 256, out_hw, above=cut), expected):
        np.testing.assert_allclose(block, want[rows, cols], atol=1e-4, rtol=1e-5)
        outside = np.ones(out_hw, bool)
        outside[rows, cols] = False
        assert (want[outside] <= cut + 1e-5).all()


def test_mask_blocks_are_small_for_small_cells():
    low = np.full((2, 256, 256), -10.0, np.float32)
    low[0, 100:104, 50:53] = 5.0  # one small cell; mask 1 is empty
    blocks = list(iter_mask_logits(low, 1024, (2000, 2000), above=logit_threshold(0.4)))
    (rows, cols, block), (_, _, empty) = blocks
    assert block.size < 60 * 60 and empty.size == 0
    assert (block > 0).any()


def _reference_normalize(image_hw3: np.ndarray) -> np.ndarray:
    """The published normalisation, written out: float64 in, float64 out."""
    image = image_hw3.astype(np.float64)
    clipped = np.zeros_like(image)
    for c in range(3):
        channel = image[..., c].copy()
        values = channel[np.nonzero(channel)]
        if len(values):
            top = np.percentile(values, 99.9)
            channel[channel > top] = top
            clipped[..., c] = channel
    for c in range(3):
        channel = clipped[:, :, c]
        if (channel == channel[0, 0]).all():
            clipped[:, :, c] = 0
            continue
        clipped[:, :, c] = equalize_adapthist(rescale_intensity(channel, out_range=(0.0, 1.0)), kernel_size=128)
    return clipped


def _cells_image(shape=(70, 90), channels=(1, 2)) -> np.ndarray:
    image = np.zeros(shape + (3,), np.float64)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(12):
        cy, cx, r = RNG.uniform(0, shape[0]), RNG.uniform(0, shape[1]), RNG.uniform(3, 9)
        image[..., channels[-1]] += 900 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)
    image[..., channels[0]] += RNG.poisson(20, shape) if len(channels) > 1 else 0
    image[5, 5, channels[-1]] = 1e6  # a hot pixel the 99.9th percentile clips
    return image


def test_normalize_matches_reference():
    image = _cells_image()
    norm = rules.normalize(image)
    assert norm.dtype == np.float32 and norm.shape == image.shape
    np.testing.assert_array_equal(norm, _reference_normalize(image).astype(np.float32))
    assert not norm[..., 0].any()  # blank channel stays blank


def _torch_minmax(x: torch.Tensor) -> torch.Tensor:
    """kornia.enhance.normalize_min_max(x[None])[0] with its defaults (0, 1, eps 1e-6)."""
    low = x.flatten(1).min(-1, keepdim=True)[0][..., None]
    high = x.flatten(1).max(-1, keepdim=True)[0][..., None]
    return 1.0 * (x - low) / (high - low + 1e-6) + 0.0


IMAGENET = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
SAM_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
SAM_STD = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)


def _torch_segmenter_input(norm: np.ndarray, size: int) -> np.ndarray:
    x = T.Resize((size, size))(torch.from_numpy(norm.transpose(2, 0, 1)).float())
    array = x.numpy()
    values = array[np.nonzero(array)]
    low, high = np.percentile(values, [0.0, 99.5])
    x = torch.Tensor(rescale_intensity(array, in_range=(low, high), out_range="float32"))
    x = _torch_minmax(IMAGENET(x))
    return ((x - SAM_MEAN / 255) / (SAM_STD / 255))[None].numpy()


def _torch_detector_input(norm: np.ndarray, size: int) -> np.ndarray:
    x = T.Resize((size, size))(torch.from_numpy(norm.transpose(2, 0, 1)).float())
    quantised = torch.from_numpy(np.array(to_pil_image(x))).permute(2, 0, 1)
    x = _torch_minmax(IMAGENET((quantised - SAM_MEAN) / SAM_STD))
    if torch.max(x[1]) == 0:
        x[1] = x[2]
    if torch.max(x[2]) == 0:
        x[2] = x[1]
    return x[None].numpy()


@pytest.mark.parametrize("channels", [(2,), (1, 2), (0, 1, 2)])
@pytest.mark.parametrize("size", [64, 1024])
def test_model_inputs_match_torch_reference(channels, size):
    norm = rules.normalize(_cells_image(channels=channels))
    seg, det = rules.segmenter_input(norm, size), rules.detector_input(norm, size)
    for ours, theirs in ((seg, _torch_segmenter_input(norm, size)), (det, _torch_detector_input(norm, size))):
        assert ours.shape == (1, 3, size, size) and ours.dtype == np.float32
        if FUSED_KERNELS:  # resize reproduced bit for bit -> identical model inputs
            np.testing.assert_array_equal(ours, theirs)
        else:  # a rounding difference may flip one uint8 level of the detector image
            assert np.isclose(ours, theirs, atol=1e-5, rtol=0).mean() > 0.99
    if channels == (2,):  # ToRGB: the empty nuclear channel is filled from the whole-cell one
        np.testing.assert_array_equal(det[0, 1], det[0, 2])


def test_boxes_round_trip():
    boxes = RNG.uniform(0, 300, (6, 4)).astype(np.float32)
    model = rules.boxes_to_model(boxes, (300, 150), 1024)
    np.testing.assert_allclose(model[:, 0], boxes[:, 0] * 1024 / 150, rtol=1e-6)
    np.testing.assert_allclose(model[:, 3], boxes[:, 3] * 1024 / 300, rtol=1e-6)
    np.testing.assert_allclose(rules.boxes_to_image(model, (300, 150), 1024), boxes, rtol=1e-6)


def _disc_logits(centres, size=16, radius=3.0) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] + 0.5
    return np.stack([radius - np.hypot(yy - cy, xx - cx) for cy, cx in centres]).astype(np.float16)


class Recorder:
    """A `RunRequests` standing in for the pipeline: records requests, returns a fixed result."""

    def __init__(self, result: PipelineResult):
        self.result, self.requests = result, []

    def __call__(self, requests):
        self.requests.extend(requests)
        return [self.result for _ in requests]


def _check_contract(request: dict, family) -> None:
    spec = family.pipeline()
    for name, array in request.items():
        tensor = spec.input(name)
        assert array.dtype == np.float32
        assert all(d == -1 or d == n for d, n in zip(tensor.dims, array.shape)) and len(tensor.dims) == array.ndim


def test_segment_builds_the_request_and_paints_masks():
    family = tiny_family()
    image = _cells_image((40, 50), channels=(2,))[..., 2].astype(np.float32)
    masks = _disc_logits([(4, 4), (5, 6), (12, 12), (8, 1)])
    masks[3] = -5  # an empty mask
    result = PipelineResult(
        np.zeros((4, 4), np.float32), np.array([0.9, 0.8, 0.7, 0.6], np.float32), np.ones(4, np.float32), masks, np.arange(4, dtype=np.int32)
    )
    run = Recorder(result)
    seg = rules.segment(image, run, family, None, SegmentOptions())
    (request,) = run.requests
    assert set(request) == {"image", "detector_image", "bbox_threshold", "iou_threshold"}
    _check_contract(request, family)
    assert request["bbox_threshold"][0] == np.float32(family.bbox_threshold)
    assert seg.labels.shape == (40, 50) and seg.labels.dtype == np.uint32
    # masks 0 and 1 overlap: mask 1 (later) wins the overlap; mask 3 is empty
    painted = (mask_logits_to_image(masks[:3], 64, (40, 50)) > logit_threshold(0.4)).astype(np.uint32)
    expected = np.max(painted * np.arange(1, 4)[:, None, None], axis=0)
    expected, _ = fill_holes_and_remove_small(expected, family.min_cell_area)
    np.testing.assert_array_equal(seg.labels, expected)
    assert [row["label"] for row in seg.cells] == [1, 2, 3]
    assert [row["score"] for row in seg.cells] == pytest.approx([0.9, 0.8, 0.7])
    for row in seg.cells:
        ys, xs = np.nonzero(seg.labels == row["label"])
        assert (row["x0"], row["y0"], row["x1"], row["y1"]) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert row["area"] == ys.size


def test_segment_with_boxes_and_options_and_no_masks():
    family = tiny_family()
    run = Recorder(PipelineResult.empty(family.low_res_size))
    boxes = np.array([[0, 0, 25, 20], [10, 5, 50, 40]], np.float32)
    options = SegmentOptions(bbox_threshold=0.2, iou_threshold=-1, mask_threshold=0.6, min_cell_area=5)
    seg = rules.segment(np.ones((2, 40, 50), np.uint16), run, family, boxes, options)
    (request,) = run.requests
    assert "detector_image" not in request and request["iou_threshold"][0] == -1
    np.testing.assert_allclose(request["boxes"], boxes * np.float32([64 / 50, 64 / 40, 64 / 50, 64 / 40]), rtol=1e-6)
    _check_contract(request, family)
    assert seg.count == 0 and seg.labels.shape == (40, 50) and not seg.labels.any()
