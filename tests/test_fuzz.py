"""Property-based fuzzing of the server-side glue: random tensors sent raw to the pipeline and the runners.

Every request must end in a valid answer or a clean Triton error (never an internal error of the
glue), and the server must stay live and keep answering good requests.
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_grid import TINY as GRID
from test_grid import grid_repository  # noqa: F401  (the fixture)
from tiny_family import image_with_cells
from tritonclient.utils import InferenceServerException

from cellsam_triton.contracts import LITE, Family, ModelSpec
from cellsam_triton.server import EmbeddedServer

DTYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64,
          "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "BOOL": np.bool_}
SPECIAL = [0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 1e30, -1e30, 64.0, 1e-30]
MAX_ELEMENTS = 3 * 64 * 64 * 2
FUZZ_EXAMPLES = 60


@pytest.fixture(scope="module")
def fuzz_server(single_repository, tmp_path_factory):
    server = EmbeddedServer(single_repository, log_path=tmp_path_factory.mktemp("fuzz") / "server.log", exit_timeout_s=2)
    try:
        yield server.start(90)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(fuzz_server):
    client = grpcclient.InferenceServerClient(fuzz_server.grpc_url)
    yield client
    client.close()


def model_inputs(specs: list[ModelSpec]) -> dict[str, list[tuple[str, tuple[int, ...], str]]]:
    """Input (name, full shape, Triton dtype) of each served model: batch axis 1 where batched, -1 axes 3."""
    inputs = {}
    for spec in specs:
        batch = (1,) if spec.max_batch_size > 0 else ()
        inputs[spec.name] = [(t.name, batch + tuple(3 if d < 0 else d for d in t.dims), t.dtype) for t in spec.inputs]
    return inputs


@st.composite
def tensors(draw, expected: tuple[int, ...], dtype: str, wrong: bool) -> np.ndarray:
    """Values from ordinary, huge, NaN and infinite; with ``wrong``, maybe a wrong shape or dtype too."""
    shape = expected
    if wrong and draw(st.booleans()):
        shape = tuple(draw(st.lists(st.integers(0, 70), min_size=0, max_size=5)))
        if int(np.prod(shape)) > MAX_ELEMENTS:
            shape = expected
    if expected[-1:] == (4,) and draw(st.booleans()):  # a box list: any count, 0 included
        shape = (draw(st.integers(0, 40)), 4)
    if wrong and draw(st.booleans()):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
    fill = draw(st.sampled_from(["zeros", "random", "special", "cells"]))
    size = int(np.prod(shape))
    if fill == "random":
        values = np.random.default_rng(draw(st.integers(0, 2**16))).normal(0, 50, size)
    elif fill == "special":
        values = np.resize(np.array(draw(st.lists(st.sampled_from(SPECIAL), min_size=1, max_size=8))), size)
    elif fill == "cells" and shape == (1, 3, 64, 64):
        values = image_with_cells(draw(st.lists(st.integers(0, 15), max_size=6))).ravel()
    else:
        values = np.zeros(size)
    with np.errstate(all="ignore"):
        return np.asarray(values).astype(DTYPES[dtype]).reshape(shape)


def send(client, model: str, arrays: dict[str, np.ndarray]):
    inputs = []
    for name, array in arrays.items():
        triton_dtype = next(k for k, v in DTYPES.items() if np.dtype(v) == array.dtype)
        tensor = grpcclient.InferInput(name, list(array.shape), triton_dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return client.infer(model, inputs, client_timeout=30)


@st.composite
def requests(draw, specs: list[ModelSpec], wrong: bool):
    """(model, inputs): the contract's names, shapes and dtypes, or (``wrong``) anything near them.
    One-element integer inputs (grid density, crop layers) are drawn small: their legal range is
    the server's own limit, and a large grid is slow, not wrong."""
    inputs = model_inputs(specs)
    model = draw(st.sampled_from(sorted(inputs)))
    arrays = {}
    for name, shape, dtype in inputs[model]:
        if not wrong or draw(st.integers(0, 4)) > 0:  # sometimes missing
            arrays[name] = draw(tensors(shape, dtype, wrong))
            if arrays[name].shape == (1,) and arrays[name].dtype == np.int32:
                arrays[name] = np.array([draw(st.integers(-2, 6))], np.int32)
    if wrong and draw(st.integers(0, 9)) == 0:
        arrays["not_an_input"] = np.zeros((1,), np.float32)
    return model, arrays


def fuzz(client, specs: list[ModelSpec], wrong: bool, examples: int, pipeline: str) -> dict[str, int]:
    """Send random requests to the models of ``specs``; each ends in an answer or a clean INVALID_ARGUMENT."""
    outcomes = {"answer": 0, "error": 0}

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(requests(specs, wrong))
    def one(request) -> None:
        model, arrays = request
        try:
            result = send(client, model, arrays)
        except InferenceServerException as exc:
            outcomes["error"] += 1
            message = str(exc)
            assert exc.status() == "StatusCode.INVALID_ARGUMENT", message  # the caller's fault, said so
            assert "internal error" not in message and "Traceback" not in message, message
            assert "\n" not in message.strip(), message
        else:
            outcomes["answer"] += 1
            if model == pipeline:
                boxes, masks = result.as_numpy("boxes"), result.as_numpy("masks")
                assert boxes.shape[1:] == (4,) and masks.shape[0] == boxes.shape[0] and masks.dtype == np.float16
                assert np.all(np.isfinite(masks.astype(np.float32)))
        assert client.is_server_live(client_timeout=5)

    one()
    return outcomes


@pytest.mark.parametrize("wrong", [False, True], ids=["contract-shapes-hostile-values", "hostile-everything"])
def test_random_tensors_get_an_answer_or_a_clean_error(client, tiny: Family, wrong: bool) -> None:
    specs = [tiny.pipeline(), tiny.encoder(), tiny.detector_model(), tiny.decoder()]
    outcomes = fuzz(client, specs, wrong, FUZZ_EXAMPLES, tiny.name)
    assert outcomes["answer"] > 0 and outcomes["error"] > 0, outcomes
    good = image_with_cells([3, 9])
    assert send(client, tiny.name, {"image": good, "detector_image": good}).as_numpy("scores").shape == (2,)
    assert client.is_server_ready()


# --- the grid pipeline (detector-free), on its own server ------------------------------------
def served_client(repository, log_dir):
    """A gRPC client of a real tritonserver on ``repository`` (stopped when the generator ends)."""
    server = EmbeddedServer(repository, log_path=log_dir / "server.log", exit_timeout_s=2)
    try:
        server.start(90)
        client = grpcclient.InferenceServerClient(server.grpc_url)
        yield client
        client.close()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def grid_client(grid_repository, tmp_path_factory):
    yield from served_client(grid_repository, tmp_path_factory.mktemp("fuzz_grid"))


@pytest.mark.parametrize("wrong", [False, True], ids=["contract-shapes-hostile-values", "hostile-everything"])
def test_grid_pipeline_answers_or_refuses_cleanly(grid_client, wrong: bool) -> None:
    specs = [GRID.grid_pipeline(), GRID.point_decoder()]
    outcomes = fuzz(grid_client, specs, wrong, FUZZ_EXAMPLES // 2, GRID.grid_name)
    assert outcomes["error"] > 0 and (wrong or outcomes["answer"] > 0), outcomes
    s = GRID.input_size
    good = {"image": np.zeros((1, 3, s, s), np.float32), "points_per_side": np.array([2], np.int32)}
    assert send(grid_client, GRID.grid_name, good).as_numpy("boxes").shape[1:] == (4,)
    for name, value in (("points_per_side", np.array([0], np.int32)), ("crop_n_layers", np.array([9], np.int32)),
                        ("valid_size", np.array([0, s], np.int32)), ("image", np.full((1, 3, s, s), np.nan, np.float32))):
        with pytest.raises(InferenceServerException) as info:
            send(grid_client, GRID.grid_name, {**good, name: value})
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and f"'{name}'" in str(info.value), str(info.value)


# --- every model of the default export (real weights), each fuzzed on its own ----------------------
DEFAULT_EXAMPLES = 8


def served_specs(repository, family: Family) -> list[ModelSpec]:
    """The contract of every model in ``repository``; a served model without one fails the test."""
    known = {spec.name: spec for spec in (*family.models(), family.point_decoder(), family.roi_point_decoder(), family.grid_pipeline(),
                                          family.labels_model())}
    served = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    unknown = [name for name in served if name not in known]
    assert not unknown, f"served models with no contract to fuzz: {unknown}"
    return [known[name] for name in served]


@pytest.fixture(scope="module")
def default_client(default_repository, tmp_path_factory):
    yield from served_client(default_repository, tmp_path_factory.mktemp("fuzz_default"))


@pytest.mark.parametrize("wrong", [False, True], ids=["contract-shapes-hostile-values", "hostile-everything"])
def test_every_model_of_the_default_export_answers_or_refuses_cleanly(default_client, default_repository, wrong: bool) -> None:
    specs = served_specs(default_repository, LITE)
    assert {LITE.pipeline_name, LITE.encoder_name, LITE.detector_name, LITE.decoder_name, LITE.roi_decoder_name,
            LITE.point_decoder_name, LITE.roi_point_decoder_name, LITE.grid_name} <= {s.name for s in specs}
    errors = 0
    for spec in specs:
        outcomes = fuzz(default_client, [spec], wrong, DEFAULT_EXAMPLES, spec.name if spec.name == LITE.grid_name else LITE.name)
        assert outcomes["answer"] + outcomes["error"] >= 3, (spec.name, outcomes)  # each model got requests
        errors += outcomes["error"]
    assert errors > 0 or not wrong
    assert default_client.is_server_ready()


def test_roi_decoder_refuses_windows_and_boxes_of_different_counts(default_client) -> None:
    windows = np.zeros((3, LITE.embed_dim, 16, 16), np.float32)
    request = {"embedding_windows": windows, "window_origins": np.zeros((3, 2), np.float32),
               "boxes": np.array([[10, 10, 40, 40]], np.float32)}
    with pytest.raises(InferenceServerException) as info:
        send(default_client, LITE.roi_decoder_name, request)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "'boxes'" in str(info.value), str(info.value)
    request["boxes"] = np.repeat(request["boxes"], 3, axis=0)  # the same request with one box per window
    assert send(default_client, LITE.roi_decoder_name, request).as_numpy("iou_predictions").shape == (3, 1)


def test_point_decoder_refuses_coords_and_labels_of_different_point_counts(default_client) -> None:
    request = {"image_embeddings": np.zeros((1, LITE.embed_dim, LITE.embed_size, LITE.embed_size), np.float32),
               "point_coords": np.full((2, 3, 2), 100.0, np.float32), "point_labels": np.ones((2, 2), np.float32)}
    with pytest.raises(InferenceServerException) as info:
        send(default_client, LITE.point_decoder_name, request)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "'point_labels'" in str(info.value), str(info.value)
    request["point_labels"] = np.float32([[1, 0, -1], [1, 1, 1]])  # several points a prompt, padded with -1
    assert send(default_client, LITE.point_decoder_name, request).as_numpy("iou_predictions").shape == (2, 1)


def test_decoders_refuse_zero_prompts_with_a_clean_error(default_client) -> None:
    """Zero boxes or points (a shape ONNX Runtime cannot reshape) is the caller's mistake, named as such."""
    embeddings = np.zeros((1, LITE.embed_dim, LITE.embed_size, LITE.embed_size), np.float32)
    windows = {"embedding_windows": np.zeros((0, LITE.embed_dim, 16, 16), np.float32), "window_origins": np.zeros((0, 2), np.float32)}
    points = {"point_coords": np.zeros((0, 1, 2), np.float32), "point_labels": np.zeros((0, 1), np.float32)}
    requests = {LITE.decoder_name: {"image_embeddings": embeddings, "boxes": np.zeros((0, 4), np.float32)},
                LITE.roi_decoder_name: {**windows, "boxes": np.zeros((0, 4), np.float32)},
                LITE.point_decoder_name: {"image_embeddings": embeddings, **points},
                LITE.roi_point_decoder_name: {**windows, **points}}
    for model, request in requests.items():
        with pytest.raises(InferenceServerException) as info:
            send(default_client, model, request)
        message = str(info.value)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "is empty" in message, (model, message)
        assert "\n" not in message.strip() and "ONNX Runtime failed" not in message, message
    assert default_client.is_server_ready()
