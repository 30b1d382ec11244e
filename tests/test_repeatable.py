"""Served outputs do not depend on what they were batched with (default export, real tritonserver).

The INT8 encoder quantises its activations with one scale per session call, and even FP32 kernels
round differently by batch size; the cpu runners of batched models therefore run each sample
alone (``sample_wise``), so a tile's embedding, and an image's label image, are the same whether it
was sent alone or grouped with other work by Triton's dynamic batcher.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from conftest import DSB
from served_checks import detector_inputs, infer

from bench.measure import statistics_delta, triton_statistics

from cellsam_triton.client.api import Segmenter
from cellsam_triton.client.tiles import family_tiles, lite_normalize, tile_input
from cellsam_triton.contracts import LITE, NAMES
from cellsam_triton.server import EmbeddedServer

MAX_ROUNDS = 4  # segmentations under load until the encoder's dynamic batcher has grouped requests
MAX_TRAFFIC = 200  # encoder requests a traffic thread sends at most


def val_images(count: int) -> list[np.ndarray]:
    from cellsam_triton.client.evaluate import select
    from cellsam_triton.datasets import load_sample

    return [load_sample(DSB, record.id)[0] for record in select(DSB, "val", count)]


def first_tile(image: np.ndarray) -> np.ndarray:
    return tile_input(lite_normalize(image), family_tiles(LITE, *image.shape[:2])[0])


def test_batched_models_answer_each_sample_as_if_it_came_alone(default_server: EmbeddedServer, default_repository: Path) -> None:
    import onnxruntime as ort

    tiles = np.concatenate([first_tile(image) for image in val_images(3)])
    with grpcclient.InferenceServerClient(default_server.grpc_url) as client:
        (batched,) = infer(client, LITE.encoder_name, {NAMES.image: tiles}, (NAMES.image_embeddings,))
        alone = [infer(client, LITE.encoder_name, {NAMES.image: tiles[i:i + 1]}, (NAMES.image_embeddings,))[0] for i in range(3)]
        scores, boxes = infer(client, LITE.detector_name, detector_inputs(client, LITE.detector_name, batched, tiles),
                              (NAMES.pred_scores, NAMES.pred_boxes))
        one_scores, one_boxes = infer(client, LITE.detector_name, detector_inputs(client, LITE.detector_name, batched[1:2], tiles[1:2]),
                                      (NAMES.pred_scores, NAMES.pred_boxes))
    for i in range(3):
        np.testing.assert_array_equal(batched[i], alone[i][0])
    np.testing.assert_array_equal(scores[1], one_scores[0])
    np.testing.assert_array_equal(boxes[1], one_boxes[0])
    # the same INT8 encoder in one session call over the batch does depend on the batch
    session = ort.InferenceSession(str(default_repository / LITE.encoder_name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (one_call,) = session.run([NAMES.image_embeddings], {NAMES.image: tiles})
    assert np.abs(one_call[0] - alone[0][0]).max() > 1e-4


def test_an_image_gets_the_same_labels_alone_and_batched_with_other_traffic(default_server: EmbeddedServer) -> None:
    """The default pipeline segments one image at a time per instance, so other clients' encoder
    requests (tiles of other images, sent straight to the encoder) are what its tiles get batched with."""
    images = val_images(4)
    tiles = [first_tile(image) for image in images[1:]]
    url = default_server.grpc_url
    stop = threading.Event()

    def traffic(tile: np.ndarray) -> int:
        with grpcclient.InferenceServerClient(url) as client:
            for sent in range(MAX_TRAFFIC):
                if stop.is_set():
                    return sent
                infer(client, LITE.encoder_name, {NAMES.image: tile}, (NAMES.image_embeddings,))
        return MAX_TRAFFIC

    with Segmenter(url) as seg, grpcclient.InferenceServerClient(url) as client, ThreadPoolExecutor(len(tiles)) as pool:
        want = seg.segment(images[0]).labels
        assert want.max() > 5
        start = triton_statistics(client, [LITE.encoder_name])
        load = [pool.submit(traffic, tile) for tile in tiles]
        try:
            for _ in range(MAX_ROUNDS):
                np.testing.assert_array_equal(seg.segment(images[0]).labels, want)
                encoder = statistics_delta(start, triton_statistics(client, [LITE.encoder_name]))[LITE.encoder_name]
                if encoder["requests"] > encoder["executions"]:  # more requests than executions: batches formed
                    break
        finally:
            stop.set()
            sent = [future.result() for future in load]
    assert min(sent) > 0
    assert encoder["requests"] > encoder["executions"], "the encoder's dynamic batcher never grouped two requests: nothing was tested"


def test_bench_sample_wise_serves_both_modes_and_reports_them(default_repository: Path, tmp_path: Path) -> None:
    """`python -m bench.sample_wise` (README, Operations) on the default export: a short real run."""
    import json

    from bench.sample_wise import LABELS, batched_copy, main
    from cellsam_triton.export.repository import parse_config

    copy = batched_copy(default_repository, tmp_path)
    for name in (LITE.encoder_name, LITE.detector_name):
        assert parse_config(default_repository / name / "config.pbtxt").parameters["sample_wise"].string_value == "1"
        assert parse_config(copy / name / "config.pbtxt").parameters["sample_wise"].string_value == "0"
    assert main(["--repository", str(default_repository), "--seconds", "2", "--rounds", "1", "--clients", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "sample_wise.json").read_text())
    (row,) = result["rounds"]
    for label in LABELS.values():
        assert row[label]["throughput_rps"] > 0 and row[label]["statistics"]["requests"] > 0
    assert row["ratio"] == row[LABELS["1"]]["throughput_rps"] / row[LABELS["0"]]["throughput_rps"]
    assert "median" in (tmp_path / "sample_wise.md").read_text()
