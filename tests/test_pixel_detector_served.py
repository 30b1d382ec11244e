"""A CellFinder-lite with a pixel branch (``detector_reads_image``) served by a real tritonserver: the
pipeline sends the detector the tile it encoded (and each mirrored tile under ``tta``), so a cell only
the pixels show is found; the detector model's config asks for the tile; without it Triton refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from served_checks import infer
from tiny_family import PATCH, grid_boxes_xyxy, image_with_cells, tiny_family, write_tiny_repository

from cellsam_triton.contracts import NAMES
from cellsam_triton.server import EmbeddedServer

PIXELS = tiny_family("cellfinder_lite", reads_image=True)
PLAIN = tiny_family("cellfinder_lite")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    repository = write_tiny_repository(tmp_path_factory.mktemp("pixel_repository"), [PIXELS, PLAIN])
    with EmbeddedServer(repository, log_path=tmp_path_factory.mktemp("pixel_logs") / "triton.log", exit_timeout_s=2) as server:
        with grpcclient.InferenceServerClient(server.grpc_url) as c:
            yield c


def _image() -> np.ndarray:
    """Channel 0 bright in cells 1 and 2 (the embedding shows them); channel 2 bright in cell 13 only."""
    image = image_with_cells([1, 2])
    row, col = divmod(13, 4)
    image[0, 2, row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH] = 1.0
    return image


def _cells(boxes: np.ndarray) -> list[int]:
    """The grid cells (row-major) holding the boxes' centres."""
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    return [int(y // PATCH) * 4 + int(x // PATCH) for x, y in centres]


@pytest.mark.parametrize("views", [1, 2, 4])
def test_the_pipeline_sends_the_detector_the_tile_of_every_view(client, views: int) -> None:
    image = _image()
    arrays = {NAMES.image: image, NAMES.tta: np.array([views], np.int32)}
    (boxes,) = infer(client, PIXELS.pipeline_name, arrays, (NAMES.boxes,))
    cells = _cells(boxes)
    assert sorted(cells) == [1, 2, 13]
    np.testing.assert_allclose(boxes[np.argsort(cells)], grid_boxes_xyxy()[[1, 2, 13]], atol=0.5)  # mirrored views: inclusive corners
    (plain,) = infer(client, PLAIN.pipeline_name, {NAMES.image: image}, (NAMES.boxes,))
    assert len(plain) == 2  # the embedding-only detector misses the cell only the pixels show


def test_the_detector_model_asks_for_the_tile(client) -> None:
    config = client.get_model_config(PIXELS.detector_name, as_json=True)["config"]
    assert [i["name"] for i in config["input"]] == [NAMES.image_embeddings, NAMES.image]
    embeddings = np.zeros((1, PIXELS.embed_dim, PIXELS.embed_size, PIXELS.embed_size), np.float32)
    with pytest.raises(Exception, match="image"):
        infer(client, PIXELS.detector_name, {NAMES.image_embeddings: embeddings}, (NAMES.pred_scores,))
    (scores,) = infer(client, PIXELS.detector_name, {NAMES.image_embeddings: embeddings, NAMES.image: _image()}, (NAMES.pred_scores,))
    assert np.flatnonzero(scores[0] > 0.5).tolist() == [13]
