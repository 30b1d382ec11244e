"""``<family>_labels``: the client's rule code run inside Triton, for clients in any language.

In process: the contract, the rendered config, the copied rule code (imports from the copy
alone, byte-identical to the installed modules) and every refused request (one line each).
Served (tiny families of the three rule sets, CellSAM's, LiteMedSAM's tiles with auto-scale and
CellSeg1's grid, on one real tritonserver): the labels model answers exactly what
``Segmenter.segment`` gives on the same server, options and prompt boxes included, and bad or
random requests end in a one-line INVALID_ARGUMENT with the server still serving.
"""

from __future__ import annotations

import dataclasses
import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_grid import TINY as GRID_FAMILY
from test_grid import grid_repository  # noqa: F401  (the fixture)
from tiny_family import tiny_family, write_tiny_repository
from tritonclient.utils import InferenceServerException

from cellsam_triton.client.api import Segmenter
from cellsam_triton.client.grid_rules import GridOptions
from cellsam_triton.client.transport import pipeline_names
from cellsam_triton.client.types import SegmentOptions
from cellsam_triton.contracts import CELL_COLUMNS, CELLSAM, CELLSEG1, CELLSEG1_LITE, LABELS_MAX_PIXELS, LITE, NAMES, Family
from cellsam_triton.export.labels_repository import LABELS_GLUE, RULE_MODULES, labels_roles, rule_files, write_labels
from cellsam_triton.export.repository import LABELS_INSTANCES, PIPELINE_INSTANCES, parse_config, render_config
from cellsam_triton.model_repository import labels_request
from cellsam_triton.model_repository.bls_transport import BlsTransport
from cellsam_triton.model_repository.request_checks import RequestError
from cellsam_triton.server import EmbeddedServer

TILED = dataclasses.replace(tiny_family("cellfinder_lite"), name="tiny_tiled", low_res_size=64, tile_overlap=16,
                            auto_scale_below=40.0)  # tiles of 64 px; every image with cells is enlarged again
CELLSAM_LIKE = tiny_family("cellfinder")
DTYPES = {"UINT8": np.uint8, "UINT16": np.uint16, "FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "BOOL": np.bool_}


def blocks_image(height: int = 150, width: int = 170, seed: int = 0) -> np.ndarray:
    """uint8 RGB noise with bright 30 px squares in channel 0 (the tiny detectors fire on those)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 20, (height, width, 3)).astype(np.uint8)
    for y, x in [(10, 10), (60, 90), (100, 30), (height - 31, width - 31)]:
        image[y:y + 30, x:x + 30, 0] = 250
    return image


# --- contract and export ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", [LITE, CELLSAM, CELLSEG1, CELLSEG1_LITE], ids=lambda f: f.name)
def test_every_family_has_a_labels_contract(family: Family) -> None:
    spec = family.labels_model()
    assert spec.name == f"{family.name}_labels" and spec.max_batch_size == 0
    inputs = {t.name: t for t in spec.inputs}
    assert all(t.optional for t in spec.inputs)  # exactly one image input: the model checks that
    assert {n: (inputs[n].dtype, inputs[n].dims) for n in labels_request.IMAGE_INPUTS} == {
        "image": ("UINT8", (-1, -1, -1)), "image_uint16": ("UINT16", (-1, -1, -1)), "image_fp32": ("FP32", (-1, -1, -1))}
    grid = {NAMES.points_per_side, NAMES.pred_iou_threshold, NAMES.stability_threshold, NAMES.crop_n_layers}
    assert (grid <= set(inputs)) == (family.detector == "none")
    assert (NAMES.boxes in inputs) == (family.detector != "none")
    assert (inputs[NAMES.point_coords].dims, inputs[NAMES.point_labels].dims) == ((-1, -1, 2), (-1, -1))  # every family
    assert (NAMES.scale in inputs) == (family.preprocess == "litemedsam" and family.detector != "none")
    assert [(t.name, t.dtype, t.dims) for t in spec.outputs] == [("labels", "UINT32", (-1, -1)), ("cells", "FP32", (-1, 7))]
    assert CELL_COLUMNS == ("label", "x0", "y0", "x1", "y1", "score", "area")
    from cellsam_triton.client.large_images import LARGE_IMAGE_PIXELS

    assert LABELS_MAX_PIXELS == LARGE_IMAGE_PIXELS  # where `segment` turns to its window-by-window path


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_labels_config_is_a_python_model_on_cpu_carrying_its_family(target: str) -> None:
    ((role, spec),) = labels_roles(LITE)
    config = parse_config(render_config(spec, target, role, family=LITE))
    assert config.backend == "python" and config.name == "cellsam_lite_labels"
    assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU
    assert config.instance_group[0].count == (LABELS_INSTANCES["cpu"] if target == "cpu" else LITE.encoder_batch)
    assert PIPELINE_INSTANCES <= config.instance_group[0].count
    assert Family.from_json(config.parameters["family"].string_value) == LITE
    assert [i.name for i in config.input if not i.optional] == []


def test_written_model_carries_the_installed_rule_code(tmp_path: Path) -> None:
    written = write_labels(tmp_path, LITE, "cpu")
    version = tmp_path / "cellsam_lite_labels" / "1"
    assert (version / "model.py").read_text().startswith('"""Triton Python BLS model ``<family>_labels``')
    assert all((version / name).is_file() for name in LABELS_GLUE[1:])
    for source, relative in rule_files():  # byte-identical copies: the CLI's files, not a re-implementation
        assert version / relative in written and filecmp.cmp(source, version / relative, shallow=False)
    # the copy imports on its own: every cellsam_triton module the rule sets use comes from it
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import labels_request, bls_transport; "
        "import cellsam_triton.client.lite_rules, cellsam_triton.client.cellsam_rules, cellsam_triton.client.grid_rules, "
        "cellsam_triton.client.point_rules; "
        "bad = [m for m, v in sys.modules.items() if m.startswith('cellsam_triton') and not v.__file__.startswith(sys.argv[1])]; "
        "print(len([m for m in sys.modules if m.startswith('cellsam_triton')]), bad)"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(version)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    count, bad = out.stdout.split(" ", 1)
    assert bad.strip() == "[]" and int(count) == len(RULE_MODULES)


def test_labels_models_are_not_pipelines_of_their_own() -> None:
    served = ["cellsam_lite", "cellsam_lite_labels", "cellsam_lite_encoder", "cellsam_lite_detector", "cellsam_lite_decoder"]
    assert pipeline_names(served) == ["cellsam_lite"]


# --- refused requests, in process ------------------------------------------------------------------
def _no_cells(stage, model, inputs, outputs):
    """A BLS call whose pipeline finds nothing."""
    shapes = {"boxes": (0, 4), "scores": (0,), "iou_predictions": (0,), "masks": (0, 64, 64), "prompt_index": (0,)}
    types = {"masks": np.float16, "prompt_index": np.int32}
    return [np.zeros(shapes[n], types.get(n, np.float32)) for n in outputs]


def test_an_empty_answer_is_a_zero_label_image_and_no_rows() -> None:
    out = labels_request.answer({"image": blocks_image(90, 80)}, TILED, BlsTransport(TILED, _no_cells))
    assert out["labels"].shape == (90, 80) and out["labels"].dtype == np.uint32 and not out["labels"].any()
    assert out["cells"].shape == (0, 7) and out["cells"].dtype == np.float32


GOOD = blocks_image(40, 50)
POINT = {"point_coords": np.array([[[10, 12]]], np.float32)}  # one cell, one positive point
NAN = GOOD.astype(np.float32)
NAN[3, 4, 0] = np.nan
BAD_REQUESTS = [
    ({}, "exactly one image input"),
    ({"image": GOOD, "image_fp32": GOOD.astype(np.float32)}, "exactly one image input"),
    ({"image": GOOD.astype(np.float32)}, "input 'image' has dtype float32, expected uint8"),
    ({"image": GOOD[..., 0]}, "expected [H, W, C]"),
    ({"image": GOOD[None]}, "expected [H, W, C]"),
    ({"image": np.zeros((40, 50, 5), np.uint8)}, "expected [H, W, C] with 1 <= C <= 3"),
    ({"image": np.zeros((0, 50, 1), np.uint8)}, "input 'image' is empty (shape [0, 50, 1])"),
    ({"image": np.zeros((1, 50, 1), np.uint8)}, "at least 2x2"),
    ({"image": np.zeros((LABELS_MAX_PIXELS // 4096 + 1, 4096, 1), np.uint8)}, f"more than the limit of {LABELS_MAX_PIXELS}"),
    ({"image_fp32": NAN}, "input 'image_fp32' contains NaN"),
    ({"image_fp32": np.full((8, 8, 1), np.inf, np.float32)}, "contains NaN or infinite"),
    ({"image": GOOD, "boxes": np.array([[0, 0, 5, np.nan]], np.float32)}, "'boxes' contains NaN"),
    ({"image": GOOD, "boxes": np.array([[0, 0, 5, 5], [5, 5, 5, 9]], np.float32)}, "row 1 has x1 <= x0"),
    ({"image": GOOD, "boxes": np.zeros((2, 5), np.float32)}, "'boxes' has shape [2, 5]"),
    ({"image": GOOD, "boxes": np.tile([[0, 0, 5, 5]], (4097, 1)).astype(np.float32)}, "more than the limit of 4096"),
    ({"image": GOOD, "bbox_threshold": np.array([1.5], np.float32)}, "'bbox_threshold' must lie in [0.0, 1.0]"),
    ({"image": GOOD, "mask_threshold": np.array([1], np.int32)}, "'mask_threshold' has dtype int32"),
    ({"image": GOOD, "mask_threshold": np.array([np.nan], np.float32)}, "'mask_threshold' contains NaN"),
    ({"image": GOOD, "iou_threshold": np.array([0.5, 0.5], np.float32)}, "'iou_threshold' has shape [2]"),
    ({"image": GOOD, "min_cell_area": np.array([-1], np.int32)}, "'min_cell_area' must lie in"),
    ({"image": GOOD, "scale": np.array([-1], np.float32)}, "'scale' must be 0 (auto) or a factor in (0, 8]"),
    ({"image": GOOD, "scale": np.array([9], np.float32)}, "'scale' must be 0 (auto)"),
    ({"image": GOOD, "point_coords": np.ones((2, 2), np.float32)}, "'point_coords' has shape [2, 2], expected [-1, -1, 2]"),
    ({"image": GOOD, "point_coords": np.full((1, 1, 2), np.nan, np.float32)}, "'point_coords' contains NaN"),
    ({"image": GOOD, "point_coords": np.ones((0, 1, 2), np.float32)}, "'point_coords' is empty"),
    ({"image": GOOD, "point_coords": np.ones((1, 33, 2), np.float32)}, "33 points a cell, at most 32"),
    ({"image": GOOD, "point_labels": np.ones((1, 1), np.float32)}, "'point_labels' needs the points themselves"),
    ({"image": GOOD, **POINT, "point_labels": np.ones((1, 2), np.float32)}, "'point_labels' has shape [1, 2], expected [1, 1]"),
    ({"image": GOOD, **POINT, "point_labels": np.array([[2]], np.float32)}, "values must be 1 (positive), 0 (negative) or -1"),
    ({"image": GOOD, "point_coords": np.ones((2, 2, 2), np.float32), "point_labels": np.float32([[1, 1], [-1, 1]])},
     "'point_labels' row 1: padding (-1) must follow"),
    ({"image": GOOD, **POINT, "point_labels": np.array([[0]], np.float32)}, "input 'point_coords' cell 0: no positive point"),
    ({"image": GOOD, **POINT, "boxes": np.array([[0, 0, 5, 5]], np.float32)}, "input 'boxes' does not go with point prompts"),
    ({"image": GOOD, "point_coords": np.float32([[[3, 4]], [[60, 4]]])}, "point (60, 4) lies outside the image (50 x 40 pixels)"),
]


@pytest.mark.parametrize("inputs, message", BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_bad_requests_are_one_line_invalid_arguments(inputs: dict, message: str) -> None:
    with pytest.raises(RequestError) as info:
        labels_request.answer(inputs, TILED, BlsTransport(TILED, _no_cells))
    assert info.value.invalid_argument and message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_rule_code_refusals_and_grid_settings_are_invalid_arguments() -> None:
    with pytest.raises(RequestError, match="applies to tiled models") as info:  # CellSAM resizes to 1024: no scale
        labels_request.answer({"image": GOOD, "scale": np.array([2], np.float32)}, CELLSAM_LIKE, BlsTransport(CELLSAM_LIKE, _no_cells))
    assert info.value.invalid_argument
    for name, value in ((NAMES.points_per_side, np.array([0], np.int32)), (NAMES.crop_n_layers, np.array([3], np.int32)),
                        (NAMES.pred_iou_threshold, np.array([2], np.float32))):
        with pytest.raises(RequestError, match=f"'{name}' must lie in"):
            labels_request.answer({"image": GOOD, name: value}, GRID_FAMILY, BlsTransport(GRID_FAMILY, _no_cells))
    with pytest.raises(RequestError, match="'points_per_side' does not go with point prompts") as info:  # points or a grid
        labels_request.answer({"image": GOOD, **POINT, "points_per_side": np.array([4], np.int32)}, GRID_FAMILY,
                              BlsTransport(GRID_FAMILY, _no_cells))
    assert info.value.invalid_argument


# --- served: tiny families of every rule set --------------------------------------------------------------
@pytest.fixture(scope="module")
def labels_server(grid_repository: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    root = tmp_path_factory.mktemp("labels")
    repo = root / "repo"
    shutil.copytree(grid_repository, repo)
    write_tiny_repository(repo, [CELLSAM_LIKE, TILED])
    for family in (CELLSAM_LIKE, TILED, GRID_FAMILY):
        write_labels(repo, family, "cpu", threads=1)
    with EmbeddedServer(repo, log_path=root / "triton.log", exit_timeout_s=2) as server:
        yield server


@pytest.fixture(scope="module")
def client(labels_server: EmbeddedServer):
    client = grpcclient.InferenceServerClient(labels_server.grpc_url)
    yield client
    client.close()


def send(client, model: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), next(k for k, v in DTYPES.items() if np.dtype(v) == array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer(model, inputs, client_timeout=60)
    return {name: result.as_numpy(name) for name in (NAMES.labels, NAMES.cells)}


def same(served: dict[str, np.ndarray], local) -> None:
    np.testing.assert_array_equal(served[NAMES.labels], local.labels)
    assert served[NAMES.labels].dtype == np.uint32
    want = np.array([[row[c] for c in CELL_COLUMNS] for row in local.cells], np.float32).reshape(-1, 7)
    np.testing.assert_array_equal(served[NAMES.cells], want)


IMAGES = {
    "uint8 rgb": lambda: blocks_image(),
    "uint16 grey": lambda: (blocks_image(130, 200, seed=1)[..., :1].astype(np.uint16) * 257),
    "fp32 two channels": lambda: blocks_image(120, 90, seed=2)[..., :2].astype(np.float32) / 7.0,
    "uint8 channels first": lambda: np.ascontiguousarray(np.moveaxis(blocks_image(seed=4), -1, 0)),  # as segment reads it
}
IMAGE_INPUT = {np.uint8: "image", np.uint16: "image_uint16", np.float32: "image_fp32"}


@pytest.mark.parametrize("kind", sorted(IMAGES))
@pytest.mark.parametrize("family", [CELLSAM_LIKE, TILED], ids=lambda f: f.name)
def test_labels_model_equals_the_client_path(labels_server, client, family: Family, kind: str) -> None:
    image = IMAGES[kind]()
    served = send(client, family.labels_name, {IMAGE_INPUT[image.dtype.type]: image})
    with Segmenter(labels_server.grpc_url, family.name) as segmenter:
        local = segmenter.segment(image)
    # CellSAM's layout puts one or two channels last ([blank, nuclear, whole-cell]): the tiny
    # CellFinder reads channel 0 and finds nothing in them, which must be the same answer too
    assert local.count > 0 or (family is CELLSAM_LIKE and kind in ("uint16 grey", "fp32 two channels"))
    same(served, local)


def test_rgba_is_segmented_as_its_rgb_the_way_segment_reads_a_png(labels_server, client) -> None:
    rgb = blocks_image(seed=5)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    with Segmenter(labels_server.grpc_url, TILED.name) as segmenter:
        local = segmenter.segment(rgb)
    assert local.count > 0
    same(send(client, TILED.labels_name, {"image": rgba}), local)


def test_settings_and_prompt_boxes_reach_the_rule_code(labels_server, client) -> None:
    image = blocks_image(seed=3)
    boxes = np.array([[8, 8, 42, 42], [88, 58, 122, 92]], np.float32)
    cases = [
        ({"mask_threshold": 0.3, "min_cell_area": 40, "scale": 1.0}, None),
        ({"bbox_threshold": 0.9, "iou_threshold": -1.0, "scale": 1.6}, None),
        ({"iou_threshold": -1.0}, boxes),
    ]
    with Segmenter(labels_server.grpc_url, TILED.name) as segmenter:
        for settings_, prompts in cases:
            arrays = {"image": image, **{k: np.array([v], np.int32 if k == "min_cell_area" else np.float32) for k, v in settings_.items()}}
            if prompts is not None:
                arrays["boxes"] = prompts
            served = send(client, TILED.labels_name, arrays)
            local = segmenter.segment(image, boxes=prompts, options=SegmentOptions(**settings_))
            same(served, local)
    assert len(served[NAMES.cells]) == 2  # one cell per prompt box


def test_grid_family_labels_equal_grid_prompts(labels_server, client) -> None:
    image = np.zeros((40, 64, 1), np.float32)
    image[8:20, 10:24] = 1.0
    image[25:35, 40:55] = 0.7
    grid = GridOptions(points_per_side=6, pred_iou_threshold=0.0, stability_threshold=0.0)
    arrays = {"image_fp32": image, "points_per_side": np.array([6], np.int32),
              "pred_iou_threshold": np.array([0.0], np.float32), "stability_threshold": np.array([0.0], np.float32)}
    served = send(client, GRID_FAMILY.labels_name, arrays)
    with Segmenter(labels_server.grpc_url, GRID_FAMILY.name) as segmenter:
        same(served, segmenter.segment(image, prompts="grid", grid=grid))


SERVED_BAD = [
    ("tiny_tiled_labels", {"image": GOOD.astype(np.uint16)}, "data-type is 'UINT16'"),  # Triton: one type per name
    ("tiny_tiled_labels", {"image": GOOD[..., 0]}, "unexpected shape"),  # Triton: one rank per name
    ("tiny_tiled_labels", {"image": np.zeros((6, 6, 5), np.uint8)}, "1 <= C <= 3"),
    ("tiny_tiled_labels", {"image_fp32": NAN}, "contains NaN"),
    ("tiny_tiled_labels", {"image": np.zeros((0, 9, 3), np.uint8)}, "is empty"),
    ("tiny_tiled_labels", {"image": np.zeros((1, 9, 1), np.uint8)}, "at least 2x2"),
    ("tiny_tiled_labels", {"image": np.zeros((4097, 4097, 1), np.uint8)}, "more than the limit"),
    ("tiny_tiled_labels", {"image": GOOD, "image_uint16": GOOD.astype(np.uint16)}, "exactly one image input"),
    ("tiny_labels", {"image": GOOD, "scale": np.array([2], np.float32)}, "unexpected inference input 'scale'"),
    ("tiny_grid_labels", {"image": GOOD, "crop_n_layers": np.array([7], np.int32)}, "'crop_n_layers' must lie in"),
]


@pytest.mark.parametrize("model, arrays, message", SERVED_BAD, ids=range(len(SERVED_BAD)))
def test_served_bad_requests_get_one_line_invalid_argument(client, model: str, arrays: dict, message: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        send(client, model, arrays)
    text = str(info.value)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and message in text, text
    assert "internal error" not in text and "Traceback" not in text and "\n" not in text.strip()
    assert client.is_server_live()


@st.composite
def hostile(draw):
    """Any of the image names with any shape (small), pixel type and values, sometimes a setting."""
    name = draw(st.sampled_from(sorted(IMAGE_INPUT.values())))
    if draw(st.booleans()):  # the contract's rank and pixel type, any sizes
        shape = (draw(st.integers(0, 40)), draw(st.integers(0, 40)), draw(st.integers(1, 4)))
        dtype = next(k for k, v in DTYPES.items() if IMAGE_INPUT.get(v) == name)
    else:
        shape = tuple(draw(st.lists(st.integers(0, 40), min_size=0, max_size=4)))
        dtype = draw(st.sampled_from(sorted(DTYPES)))
    values = draw(st.sampled_from([0.0, 1.0, 255.0, -3.0, np.nan, np.inf, 1e30]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    with np.errstate(all="ignore"):
        array = np.asarray(rng.normal(0, 1, shape) * values).astype(DTYPES[dtype])
    arrays = {name: array}
    if draw(st.booleans()):
        arrays[draw(st.sampled_from(["mask_threshold", "scale", "bbox_threshold"]))] = np.array([draw(st.sampled_from(
            [0.0, 0.5, 1.5, -1.0, np.nan, 9.0]))], np.float32)
    return arrays


def test_random_requests_get_an_answer_or_a_clean_refusal(client) -> None:
    outcomes = {"answer": 0, "error": 0}

    @settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(hostile())
    def one(arrays) -> None:
        try:
            out = send(client, TILED.labels_name, arrays)
        except InferenceServerException as exc:
            outcomes["error"] += 1
            text = str(exc)
            assert exc.status() == "StatusCode.INVALID_ARGUMENT", text
            assert "internal error" not in text and "\n" not in text.strip(), text
        else:
            outcomes["answer"] += 1
            shape = next(iter(arrays.values())).shape
            plane = tuple(n for axis, n in enumerate(shape) if axis != int(np.argmin(shape)))  # the smallest axis: channels
            assert out[NAMES.labels].shape == plane and out[NAMES.cells].shape[1:] == (7,)

    one()
    assert outcomes["answer"] > 0 and outcomes["error"] > 0, outcomes
    assert client.is_server_ready()
