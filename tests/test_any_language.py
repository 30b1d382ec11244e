"""Clients that are not Python: the Node.js client (clients/node, @grpc/grpc-js and the project's
KServe v2 proto) and curl on the KServe v2 HTTP binary extension, against the default model
exported by `cellsam-triton export` and served by a real tritonserver.

A raw uint8 image sent to ``cellsam_lite_labels`` must give the cells of ``cellsam-triton
segment`` on the same image (>= 98 % of the cells identical at IoU 0.9, both ways) on real DSB
images; the label image is compared cell by cell. ``make setup`` installs the Node packages
(``npm ci``); without Node.js on the machine the Node tests skip, saying so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile
from served_checks import assert_same_cells

from cellsam_triton.cli import main as cli
from cellsam_triton.contracts import CELL_COLUMNS, LITE
from cellsam_triton.server import EmbeddedServer

ROOT = Path(__file__).resolve().parents[1]
NODE_CLIENT = ROOT / "clients" / "node"
PROTO = NODE_CLIENT / "proto" / "kserve_v2.proto"
DATA = ROOT.parent / "shared" / "data" / "dsb2018"
# fluorescence (125 nuclei), stained, small nuclei (auto-scale enlarges it), a 520x696 one (12 tiles)
IMAGES = ("0402a81e75", "0e21d7b3ee", "094afe3675", "351771edfc")
IDENTICAL_IOU = 0.9
MIN_IDENTICAL = 0.98
MODEL = LITE.labels_name
# README, "From any language": the curl example, run here as written (host and file substituted)
CURL_EXAMPLE = """\
H=520 W=696 C=3      # image.raw: H*W*C bytes, uint8, row-major [H, W, C]
HEADER='{"inputs":[{"name":"image","datatype":"UINT8","shape":['$H','$W','$C'],"parameters":{"binary_data_size":'$((H*W*C))'}}],'\\
'"outputs":[{"name":"cells","parameters":{"binary_data":false}}]}'
{ printf '%s' "$HEADER"; cat image.raw; } | curl -sS --fail-with-body --data-binary @- \\
  -H 'Content-Type: application/octet-stream' -H "Inference-Header-Content-Length: ${#HEADER}" \\
  http://127.0.0.1:8000/v2/models/cellsam_lite_labels/infer > answer.json
"""


def node_or_skip() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js not found: the any-language client test needs node >= 18 (`make setup` then installs its packages)")
    assert (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir(), f"run `make setup` (npm ci in {NODE_CLIENT})"
    return node


# --- the proto is Triton's wire format ----------------------------------------------------------------
SCALARS = {"string": "TYPE_STRING", "bool": "TYPE_BOOL", "int64": "TYPE_INT64", "int32": "TYPE_INT32", "uint32": "TYPE_UINT32",
           "uint64": "TYPE_UINT64", "float": "TYPE_FLOAT", "double": "TYPE_DOUBLE", "bytes": "TYPE_BYTES"}


def parse_proto(text: str) -> tuple[dict[str, dict[str, tuple]], dict[str, tuple[str, str]]]:
    """{message path: {field: (number, type, repeated)}} and {rpc: (request, response)} of a simple proto3 file."""
    messages: dict[str, dict[str, tuple]] = {}
    rpcs: dict[str, tuple[str, str]] = {}
    stack: list[str | None] = []
    for raw in text.splitlines():
        line = raw.split("//")[0].strip()
        if not line:
            continue
        opened = re.match(r"(message|oneof|service)\s+(\w+)\s*\{", line)
        if opened:
            kind, name = opened.groups()
            path = ".".join([s for s in stack if s] + [name])
            if kind == "message":
                messages[path] = {}
            stack.append(name if kind == "message" else None)
            if line.endswith("}"):
                stack.pop()
            continue
        rpc = re.match(r"rpc\s+(\w+)\((\w+)\)\s+returns\s+\((\w+)\)", line)
        if rpc:
            rpcs[rpc.group(1)] = (rpc.group(2), rpc.group(3))
            continue
        if line == "}":
            stack.pop()
            continue
        field = re.match(r"(repeated\s+)?(map<\s*\w+\s*,\s*\w+\s*>|\w+)\s+(\w+)\s*=\s*(\d+);", line)
        if field:
            repeated, kind, name, number = field.groups()
            owner = ".".join(s for s in stack if s)
            messages[owner][name] = (int(number), kind.replace(" ", ""), bool(repeated) or kind.startswith("map<"))
    return messages, rpcs


def test_node_proto_matches_tritons_wire_format() -> None:
    """Every field of the client's proto has Triton's number and type (tritonclient's compiled descriptors)."""
    from google.protobuf.descriptor import FieldDescriptor
    from tritonclient.grpc import service_pb2

    messages, rpcs = parse_proto(PROTO.read_text())
    assert "ModelInferRequest.InferInputTensor" in messages and rpcs["ModelInfer"] == ("ModelInferRequest", "ModelInferResponse")
    package = service_pb2.DESCRIPTOR
    assert re.search(r"^package inference;", PROTO.read_text(), re.M) and package.package == "inference"
    service = package.services_by_name["GRPCInferenceService"]
    for name, (request, response) in rpcs.items():
        method = service.methods_by_name[name]
        assert (method.input_type.name, method.output_type.name) == (request, response)
    for path, fields in messages.items():
        top, *nested = path.split(".")
        descriptor = package.message_types_by_name[top]
        for part in nested:
            descriptor = descriptor.nested_types_by_name[part]
        assert set(fields) == set(descriptor.fields_by_name), path
        for name, (number, kind, repeated) in fields.items():
            want = descriptor.fields_by_name[name]
            assert want.number == number, f"{path}.{name}"
            assert (want.label == FieldDescriptor.LABEL_REPEATED) == repeated, f"{path}.{name}"
            if kind in SCALARS:
                assert want.type == getattr(FieldDescriptor, SCALARS[kind]), f"{path}.{name}"
            else:
                assert want.type == FieldDescriptor.TYPE_MESSAGE, f"{path}.{name}"
                expected = want.message_type
                if kind.startswith("map<"):
                    assert expected.GetOptions().map_entry and expected.fields_by_name["value"].message_type.name in kind
                else:
                    assert expected.name == kind, f"{path}.{name}"


# --- served: the default model --------------------------------------------------------------------------
def cells_identical(a: np.ndarray, b: np.ndarray, iou: float = IDENTICAL_IOU) -> float:
    """Fraction of the cells of label image ``a`` that have a cell in ``b`` with IoU >= ``iou``."""
    fa, fb = a.ravel().astype(np.int64), b.ravel().astype(np.int64)
    cells = np.unique(fa[fa > 0])
    if cells.size == 0:
        return 1.0 if not fb.any() else 0.0
    both = (fa > 0) & (fb > 0)
    pairs, inter = np.unique(np.stack([fa[both], fb[both]]), axis=1, return_counts=True)
    union = np.bincount(fa)[pairs[0]] + np.bincount(fb)[pairs[1]] - inter
    return np.unique(pairs[0][inter / union >= iou]).size / cells.size


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    if not (DATA / "manifest.csv").is_file():
        pytest.skip(f"DSB2018 data not found at {DATA}")
    repository = request.getfixturevalue("default_repository")  # exported once per session (conftest)
    assert (repository / MODEL / "config.pbtxt").is_file(), "export writes <family>_labels"
    root = tmp_path_factory.mktemp("any_language")
    with EmbeddedServer(repository, log_path=root / "triton.log") as server:
        yield server


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The DSB images as .npy files (uint8 [H, W, 3]): what both clients read."""
    from cellsam_triton.datasets import load_manifest, load_sample

    folder = tmp_path_factory.mktemp("dsb_npy")
    ids = {prefix: next(r.id for r in load_manifest(DATA) if r.id.startswith(prefix)) for prefix in IMAGES}
    paths = {}
    for prefix, sample_id in ids.items():
        image, _ = load_sample(DATA, sample_id)
        assert image.dtype == np.uint8 and image.ndim == 3
        np.save(folder / f"{prefix}.npy", image)
        paths[prefix] = folder / f"{prefix}.npy"
    return paths


@pytest.fixture(scope="module")
def cli_labels(default_server: EmbeddedServer, images: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """`cellsam-triton segment` on the same files, default settings."""
    out = tmp_path_factory.mktemp("cli_out")
    assert cli(["segment", *map(str, images.values()), "--out", str(out), "--url", default_server.grpc_url]) == 0
    return {prefix: tifffile.imread(out / f"{prefix}_labels.tif") for prefix in images}


def run_node(node: str, server: EmbeddedServer, *args: str) -> subprocess.CompletedProcess:
    command = [node, str(NODE_CLIENT / "segment.js"), "--url", server.grpc_url, "--model", MODEL, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_node_client_gets_the_clis_cells(default_server: EmbeddedServer, images, cli_labels, tmp_path: Path) -> None:
    node = node_or_skip()
    report = []
    for prefix, path in images.items():
        done = run_node(node, default_server, str(path), "--out", str(tmp_path / f"{prefix}.json"),
                        "--labels", str(tmp_path / f"{prefix}_labels.npy"))
        assert done.returncode == 0, done.stderr
        answer = json.loads((tmp_path / f"{prefix}.json").read_text())
        labels = np.load(tmp_path / f"{prefix}_labels.npy")
        cli = cli_labels[prefix]
        assert labels.dtype == np.uint32 and labels.shape == cli.shape == tuple(answer["shape"])
        # the table describes the label image: one row per label, its pixel extent and area
        assert answer["count"] == len(answer["cells"]) == len(np.unique(labels[labels > 0]))
        areas = np.bincount(labels.ravel())
        for cell in answer["cells"]:
            assert list(cell) == list(CELL_COLUMNS) and areas[cell["label"]] == cell["area"]
            ys, xs = np.nonzero(labels == cell["label"])
            assert (cell["x0"], cell["y0"], cell["x1"], cell["y1"]) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        both_ways = (cells_identical(labels, cli), cells_identical(cli, labels))
        report.append((prefix, answer["count"], len(np.unique(cli[cli > 0])), both_ways, bool(np.array_equal(labels, cli))))
        assert min(both_ways) >= MIN_IDENTICAL, report
    print("node vs CLI (image, node cells, CLI cells, identical at IoU 0.9 both ways, same label image):", report)


def test_node_client_reports_refusals_in_one_line(default_server: EmbeddedServer, tmp_path: Path) -> None:
    node = node_or_skip()
    image = np.zeros((64, 64, 1), np.float32)
    image[5, 5, 0] = np.nan
    np.save(tmp_path / "nan.npy", image)
    done = run_node(node, default_server, str(tmp_path / "nan.npy"))
    assert done.returncode == 1 and done.stderr.strip() == "error: INVALID_ARGUMENT: input 'image_fp32' contains NaN or infinite values"
    np.save(tmp_path / "grey.npy", np.zeros((64, 80), np.uint16))  # [H, W] goes out as [H, W, 1]
    done = run_node(node, default_server, str(tmp_path / "grey.npy"), "--mask-threshold", "0.6", "--scale", "1")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"model": MODEL, "shape": [64, 80], "count": 0, "cells": []}
    done = run_node(node, default_server, "--raw", str(tmp_path / "grey.npy"), "--shape", "64,80", "--dtype", "uint16")
    assert done.returncode == 2 and "bytes" in done.stderr  # the NPY header is not pixels


def test_node_client_sends_point_prompts_as_segment_does(default_server: EmbeddedServer, images, cli_labels, tmp_path: Path) -> None:
    """`--points CSV` (the CLI's format): the same cells as `Segmenter.segment(points=...)` with that file."""
    from cellsam_triton.client.api import Segmenter
    from cellsam_triton.client.points import read_points_csv

    node = node_or_skip()
    prefix, path = next(iter(images.items()))
    found = cli_labels[prefix]
    rows = ["x,y,label,cell"]
    for k, label in enumerate(np.unique(found[found > 0])[:6]):  # a point inside each of six cells the CLI found
        ys, xs = np.nonzero(found == label)
        rows.append(f"{xs[len(xs) // 2]},{ys[len(ys) // 2]},1,c{k}")
    rows.append("0,0,0,c0")  # a negative point joins cell c0 (its row padded for the others)
    points = tmp_path / "points.csv"
    points.write_text("\n".join(rows) + "\n")
    done = run_node(node, default_server, str(path), "--points", str(points), "--labels", str(tmp_path / "labels.npy"))
    assert done.returncode == 0, done.stderr
    with Segmenter(default_server.grpc_url) as segmenter:
        local = segmenter.segment(np.load(path), points=read_points_csv(points))
    assert 1 <= local.count <= 6
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), local.labels)
    points.write_text("x,y\n5,9999\n")  # outside the image: the server's one-line refusal
    done = run_node(node, default_server, str(path), "--points", str(points))
    assert done.returncode == 1 and done.stderr.startswith("error: INVALID_ARGUMENT:") and "outside the image" in done.stderr
    points.write_text("x,z\n1,2\n")  # a bad file: a usage error before any request
    done = run_node(node, default_server, str(path), "--points", str(points))
    assert done.returncode == 2 and "points header must name columns x,y" in done.stderr


def test_node_client_sends_test_time_flips(default_server: EmbeddedServer, images, tmp_path: Path) -> None:
    """`--tta 2` (the `tta` input): the labels of `Segmenter.segment` with the same flips, on the stained image."""
    from cellsam_triton.client.api import Segmenter
    from cellsam_triton.client.types import SegmentOptions

    node = node_or_skip()
    path = images["0e21d7b3ee"]
    done = run_node(node, default_server, str(path), "--tta", "2", "--labels", str(tmp_path / "labels.npy"))
    assert done.returncode == 0, done.stderr
    with Segmenter(default_server.grpc_url) as segmenter:
        local = segmenter.segment(np.load(path), options=SegmentOptions(tta=2))
    assert local.count > 10
    assert_same_cells(np.load(tmp_path / "labels.npy"), local.labels)
    done = run_node(node, default_server, str(path), "--tta", "3")
    assert done.returncode == 1 and done.stderr.strip() == "error: INVALID_ARGUMENT: input 'tta' must be one of 1, 2, 4, got 3"


def test_curl_example_of_the_readme(default_server: EmbeddedServer, images, cli_labels, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl not found")
    readme = (ROOT / "README.md").read_text()
    assert CURL_EXAMPLE in readme, "README's curl example differs from the one tested here"
    prefix = "351771edfc"
    image = np.load(images[prefix])
    assert image.shape == (520, 696, 3)
    (tmp_path / "image.raw").write_bytes(np.ascontiguousarray(image).tobytes())
    script = CURL_EXAMPLE.replace("127.0.0.1:8000", default_server.http_url)
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr + (tmp_path / "answer.json").read_text()
    (output,) = json.loads((tmp_path / "answer.json").read_text())["outputs"]
    assert output["name"] == "cells" and output["datatype"] == "FP32" and output["shape"][1] == len(CELL_COLUMNS)
    cells = np.asarray(output["data"], np.float32).reshape(output["shape"])
    cli = cli_labels[prefix]
    # the CLI's cells, row for row: label, pixel extent and area of each cell of its label image
    assert len(cells) == len(np.unique(cli[cli > 0]))
    areas = np.bincount(cli.ravel())
    matched = sum(int(areas[int(row[0])] == row[6]) for row in cells if row[0] < len(areas))
    assert matched >= MIN_IDENTICAL * len(cells)
