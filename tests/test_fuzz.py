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
from tiny_family import image_with_cells
from tritonclient.utils import InferenceServerException

from cellsam_triton.contracts import Family
from cellsam_triton.server import EmbeddedServer

DTYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64,
          "UINT8": np.uint8, "BOOL": np.bool_}
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


def model_inputs(family: Family) -> dict[str, list[tuple[str, tuple[int, ...], str]]]:
    """Input (name, full shape, Triton dtype) of each served model: batch axis 1 where batched, -1 axes 3."""
    inputs = {}
    for spec in (family.pipeline(), family.encoder(), family.detector_model(), family.decoder()):
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
def requests(draw, family: Family, wrong: bool):
    """(model, inputs): the contract's names, shapes and dtypes, or (``wrong``) anything near them."""
    inputs = model_inputs(family)
    model = draw(st.sampled_from(sorted(inputs)))
    arrays = {}
    for name, shape, dtype in inputs[model]:
        if not wrong or draw(st.integers(0, 4)) > 0:  # sometimes missing
            arrays[name] = draw(tensors(shape, dtype, wrong))
    if wrong and draw(st.integers(0, 9)) == 0:
        arrays["not_an_input"] = np.zeros((1,), np.float32)
    return model, arrays


@pytest.mark.parametrize("wrong", [False, True], ids=["contract-shapes-hostile-values", "hostile-everything"])
def test_random_tensors_get_an_answer_or_a_clean_error(client, tiny: Family, wrong: bool) -> None:
    outcomes = {"answer": 0, "error": 0}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(requests(tiny, wrong))
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
            if model == tiny.name:
                boxes, masks = result.as_numpy("boxes"), result.as_numpy("masks")
                assert boxes.shape[1:] == (4,) and masks.shape[0] == boxes.shape[0] and masks.dtype == np.float16
                assert np.all(np.isfinite(masks.astype(np.float32)))
        assert client.is_server_live(client_timeout=5)

    one()
    assert outcomes["answer"] > 0 and outcomes["error"] > 0, outcomes
    good = image_with_cells([3, 9])
    assert send(client, tiny.name, {"image": good, "detector_image": good}).as_numpy("scores").shape == (2,)
    assert client.is_server_ready()
