"""The BLS pipeline and the ONNX runners on a real tritonserver (tiny families), through the transport."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tiny_family import GRID, PATCH, full_size_family, grid_boxes_xyxy, image_with_cells
from tritonclient.utils import InferenceServerException

from cellsam_triton.client.transport import AsyncTritonTransport, TritonTransport
from cellsam_triton.client.types import PipelineResult
from cellsam_triton.errors import ServerError


@pytest.fixture(scope="module", params=["tiny", "tiny_lite"])
def transport(request, tiny_server):
    with TritonTransport(tiny_server.grpc_url, request.param, timeout_s=30) as t:
        yield t


def request_for(transport: TritonTransport, image: np.ndarray, **extra: np.ndarray) -> dict[str, np.ndarray]:
    req = {"image": image, **extra}
    if transport.family.detector == "cellfinder" and "boxes" not in extra:
        req["detector_image"] = image
    return req


def sorted_rows(boxes: np.ndarray) -> list:
    return sorted(map(tuple, boxes.tolist()))


def test_family_is_read_from_the_server(transport: TritonTransport) -> None:
    assert transport.family.input_size == 64 and transport.family.low_res_size == 16
    assert transport.family.name == transport.model


def test_detections_become_masks(transport: TritonTransport) -> None:
    cells = [1, 5, 6, 15]
    image = image_with_cells(cells)
    (result,) = transport.run([request_for(transport, image)])
    assert sorted_rows(result.boxes) == sorted_rows(grid_boxes_xyxy()[cells])
    assert np.all(result.scores > 0.99)
    assert result.masks.dtype == np.float16 and result.masks.shape == (4, 16, 16)
    assert result.prompt_index.dtype == np.int32 and result.prompt_index.tolist() == [0, 1, 2, 3]
    # the masks are what the decoder gives for those boxes on this image's embedding
    masks, iou = transport.decode(transport.embed(image[0])[0], result.boxes)
    np.testing.assert_array_equal(result.masks, masks[:, 0].astype(np.float16))
    np.testing.assert_allclose(result.iou_predictions, iou[:, 0])


def test_zero_detections_is_an_empty_answer(transport: TritonTransport) -> None:
    (result,) = transport.run([request_for(transport, image_with_cells([]))])
    empty = PipelineResult.empty(16)
    for name in ("boxes", "scores", "iou_predictions", "masks", "prompt_index"):
        got, want = getattr(result, name), getattr(empty, name)
        assert got.shape == want.shape and got.dtype == want.dtype, name


def test_bbox_threshold_input_is_honoured(tiny_server) -> None:
    with TritonTransport(tiny_server.grpc_url, "tiny_lite") as t:
        image = image_with_cells([2, 3], value=0.55)  # score sigmoid(20*0.55-10) = 0.73
        low, high = t.run([
            {"image": image, "bbox_threshold": np.array([0.5], np.float32)},
            {"image": image, "bbox_threshold": np.array([0.9], np.float32)},
        ])
    assert len(low.scores) == 2 and len(high.scores) == 0


def test_given_boxes_skip_the_detector_and_filter_by_iou(transport: TritonTransport) -> None:
    boxes = np.array([[0, 0, 20, 20], [10, 10, 14, 40], [30, 30, 62, 50], [5, 40, 9, 60]], np.float32)
    image = image_with_cells([0])  # no detector_image: the detector must not run
    kept, everything = transport.run([
        {"image": image, "boxes": boxes},
        {"image": image, "boxes": boxes, "iou_threshold": np.array([-1], np.float32)},
    ])
    # tiny decoder: predicted IoU = width / 16, so the two 4-px-wide boxes fall below 0.5
    assert kept.prompt_index.tolist() == [0, 2]
    np.testing.assert_array_equal(kept.boxes, boxes[[0, 2]])
    assert kept.scores.tolist() == [1.0, 1.0]
    assert everything.prompt_index.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(everything.iou_predictions, np.clip((boxes[:, 2] - boxes[:, 0]) / PATCH, 0, 1))


def test_chunked_decoding_equals_one_decoder_call(transport: TritonTransport) -> None:
    assert transport.family.decoder_chunk == 3
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 40, (8, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 24, (8, 2))], 1).astype(np.float32)
    image = image_with_cells([3, 9], value=0.7)
    (result,) = transport.run([{"image": image, "boxes": boxes, "iou_threshold": np.array([-1], np.float32)}])
    masks, _ = transport.decode(transport.embed(image[0]), boxes)
    assert result.masks.shape == (8, 16, 16)
    np.testing.assert_array_equal(result.masks, masks[:, 0].astype(np.float16))


def test_encoder_alone_batches(transport: TritonTransport) -> None:
    images = np.concatenate([image_with_cells([0]), image_with_cells([5, 10])])[:, :, :, :]
    embeddings = transport.embed(images)
    assert embeddings.shape == (2, 8, GRID, GRID)
    patch_means = images[:, 0].reshape(2, GRID, PATCH, GRID, PATCH).mean(axis=(2, 4))
    np.testing.assert_allclose(embeddings[:, 0], patch_means, atol=1e-6)


def test_run_keeps_request_order_under_concurrency(transport: TritonTransport) -> None:
    cell_lists = [[0], [1, 2], [], [3, 4, 5], [6], [7, 8, 9, 10], [11, 12]]
    results = transport.run([request_for(transport, image_with_cells(c)) for c in cell_lists])
    assert [len(r.scores) for r in results] == [len(c) for c in cell_lists]


def test_async_transport_matches_sync(tiny_server, transport: TritonTransport) -> None:
    image = image_with_cells([4, 9])
    (expected,) = transport.run([request_for(transport, image)])

    async def go():
        async with AsyncTritonTransport(tiny_server.grpc_url, transport.model) as t:
            await t.wait_ready(10)
            results = await t.run([request_for(transport, image)] * 3)
            embeddings = await t.embed(image[0])
            return results, embeddings

    results, embeddings = asyncio.run(go())
    for r in results:
        np.testing.assert_array_equal(r.masks, expected.masks)
    assert embeddings.shape == (1, 8, GRID, GRID)


@pytest.fixture(scope="module")
def raw(tiny_server):
    client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    yield client
    client.close()


def raw_infer(client, model: str, arrays: dict[str, np.ndarray], dtypes: dict[str, str] | None = None):
    inputs = []
    for name, array in arrays.items():
        dtype = (dtypes or {}).get(name, "FP32")
        infer_input = grpcclient.InferInput(name, list(array.shape), dtype)
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return client.infer(model, inputs, client_timeout=30)


@pytest.mark.parametrize(
    "model, arrays, dtypes, message",
    [
        ("tiny", {"image": image_with_cells([1]).astype(np.float64)}, {"image": "FP64"}, "data-type|dtype"),
        ("tiny", {"image": np.zeros((1, 3, 32, 32), np.float32)}, None, "shape"),
        ("tiny", {"image": np.full((1, 3, 64, 64), np.nan, np.float32), "boxes": np.zeros((1, 4), np.float32)}, None, "NaN"),
        ("tiny", {"image": image_with_cells([1])}, None, "detector_image"),
        ("tiny_lite", {"image": image_with_cells([1]), "boxes": np.array([[0, 0, np.inf, 4]], np.float32)}, None, "boxes"),
        ("tiny_encoder", {"image": np.zeros((2, 3, 8, 8), np.float32)}, None, "shape"),
        ("tiny_decoder", {"image_embeddings": np.zeros((1, 8, 4, 4), np.float32)}, None, "boxes"),
    ],
    ids=["fp64-image", "wrong-shape", "nan-image", "no-detector-image", "inf-box", "encoder-shape", "decoder-missing-input"],
)
def test_malformed_requests_get_an_error_and_the_server_stays_up(raw, tiny_server, model, arrays, dtypes, message) -> None:
    with pytest.raises(InferenceServerException, match=message) as info:
        raw_infer(raw, model, arrays, dtypes)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value  # README: Security
    assert raw.is_server_ready()
    result = raw_infer(raw, "tiny_lite", {"image": image_with_cells([2])})
    assert result.as_numpy("scores").shape == (1,)


def test_unknown_model_names_the_served_pipelines(tiny_server) -> None:
    with pytest.raises(ServerError, match=r"'nope' is not served at .*served pipelines: tiny, tiny_full, tiny_lite"):
        TritonTransport(tiny_server.grpc_url, "nope")

    async def go():
        async with AsyncTritonTransport(tiny_server.grpc_url, "nope"):
            pass

    with pytest.raises(ServerError, match="served pipelines: tiny, tiny_full, tiny_lite"):
        asyncio.run(go())


def test_zero_given_boxes_is_an_empty_answer(transport: TritonTransport) -> None:
    (result,) = transport.run([{"image": image_with_cells([1]), "boxes": np.zeros((0, 4), np.float32)}])
    assert result.boxes.shape == (0, 4) and result.masks.shape == (0, 16, 16) and result.masks.dtype == np.float16


def test_one_structured_debug_line_per_request(transport: TritonTransport, caplog) -> None:
    with caplog.at_level("DEBUG", logger="cellsam_triton.client.transport"):
        transport.run([request_for(transport, image_with_cells([c])) for c in (1, 2)])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("infer ")]
    assert len(lines) == 2
    assert all(f"model={transport.model} " in x and "image=[1, 3, 64, 64]" in x and " ms=" in x and "bytes_sent=" in x for x in lines)


def test_production_sized_tensors_pass_through(tiny_server) -> None:
    """1024x1024 images, 4096 queries and 256x256 masks: Python-backend shared memory must grow."""
    family = full_size_family()
    cells = list(range(0, 4096, 97))  # 43 detections
    image = image_with_cells(cells, family=family)
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 900, (300, 2))
    prompts = np.concatenate([xy, xy + rng.uniform(20, 120, (300, 2))], 1).astype(np.float32)
    with TritonTransport(tiny_server.grpc_url, family.name, timeout_s=60) as t:
        detected, prompted = t.run([
            {"image": image, "detector_image": image},
            {"image": image, "boxes": prompts, "iou_threshold": np.array([-1], np.float32)},
        ])
        assert sorted_rows(detected.boxes) == sorted_rows(grid_boxes_xyxy(family)[cells])
        masks, _ = t.decode(t.embed(image[0]), detected.boxes)
    assert detected.masks.shape == (len(cells), 256, 256)
    np.testing.assert_array_equal(detected.masks, masks[:, 0].astype(np.float16))
    assert prompted.masks.shape == (300, 256, 256) and prompted.prompt_index.tolist() == list(range(300))
