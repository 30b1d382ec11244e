"""Helpers of the tests that talk to a served default export: one raw gRPC request, and the label
images of two served paths (CLI, API, labels model, Node) compared pixel for pixel."""

from __future__ import annotations

import numpy as np

TRITON_DTYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32", np.dtype(np.uint8): "UINT8"}


def infer(client, model: str, arrays: dict[str, np.ndarray], outputs: tuple[str, ...]) -> list[np.ndarray]:
    """``outputs`` of one request to ``model`` (a ``tritonclient.grpc`` client)."""
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), TRITON_DTYPES[array.dtype])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer(model, inputs, client_timeout=120)
    return [result.as_numpy(name) for name in outputs]


def detector_inputs(client, detector: str, embeddings: np.ndarray, tiles: np.ndarray) -> dict[str, np.ndarray]:
    """A request to a served detector: the tiles' embeddings, and the tiles themselves when the
    detector asks for them (a pixel branch: its metadata names an ``image`` input)."""
    from cellsam_triton.contracts import NAMES

    reads_image = NAMES.image in [t.name for t in client.get_model_metadata(detector).inputs]
    return {NAMES.image_embeddings: embeddings, **({NAMES.image: tiles} if reads_image else {})}


def assert_same_cells(got: np.ndarray, want: np.ndarray) -> None:
    """The same label image. Served outputs are bit-repeatable: the cpu runners of batched models run
    each sample alone (``sample_wise``), so a tile's embedding does not depend on the tiles the
    dynamic batcher grouped it with (tests/test_repeatable.py)."""
    assert got.shape == want.shape
    differing = int(np.count_nonzero(got != want))
    assert differing == 0, f"{differing} of {got.size} pixels differ; labels {np.unique(got).size} vs {np.unique(want).size}"
