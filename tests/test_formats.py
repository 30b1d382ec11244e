"""`segment --format tif,csv,geojson,ome-zarr` (issue 23 item 3): GeoJSON with one exact, valid
polygon per cell in input pixels (QuPath detections); OME-Zarr (NGFF 0.4) image + labels pyramids
that validate against the NGFF models and read back in ome-zarr-py with the same labels; the same
outputs for slides (read and written in bands / chunks); `--format` errors are one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
import zarr
from shapely.geometry import shape

from cellsam_triton.cli import main as cli
from cellsam_triton.client.labels import cells_table
from cellsam_triton.client.slides import Slide, label_table
from cellsam_triton.client.writers import (
    FORMATS,
    format_paths,
    iter_cell_features,
    mask_geometry,
    parse_formats,
    pyramid_levels,
    write_cells_geojson,
    write_formats,
    write_ome_zarr,
)
from cellsam_triton.errors import UserError
from cellsam_triton.server import EmbeddedServer, free_port

from test_slide_cli import blocks_slide, slide_server  # noqa: F401  (slide_server: the fixture)
from tiny_frames import frame, write_frames

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018"
ALL = "tif,csv,geojson,ome-zarr"


def known_cells() -> np.ndarray:
    """A 40 x 50 label image with the awkward cases: a ring with an empty hole (1) touching the top
    and left borders, a cell inside another's hole (2 in 3), an L (4), a U (5), a one-pixel cell
    (6), a cell in the bottom-right corner (7), one split in two pieces (8), a diagonal pair (9)
    and a cell along the whole bottom border (10)."""
    labels = np.zeros((40, 50), np.uint32)
    labels[0:9, 0:9] = 1
    labels[3:6, 3:6] = 0  # hole: background
    labels[12:21, 0:9] = 3
    labels[15:18, 3:6] = 2  # 2 fills 3's hole
    labels[22:32, 12:15] = 4
    labels[29:32, 12:24] = 4  # L
    labels[2:12, 20:23] = 5
    labels[2:12, 29:32] = 5
    labels[9:12, 20:32] = 5  # U
    labels[15, 40] = 6
    labels[35:40, 44:50] = 7
    labels[0:2, 40:43] = 8
    labels[5:7, 40:43] = 8  # two pieces
    labels[20, 40] = 9
    labels[21, 41] = 9  # touching at a corner only
    labels[38:40, 0:30] = 10
    return labels


def pixel_centres(geometry, shape_hw: tuple[int, int]) -> np.ndarray:
    """Which pixels' centres (c + 0.5, r + 0.5) lie inside the geometry."""
    rows, cols = np.indices(shape_hw)
    return shapely.contains_xy(geometry, cols + 0.5, rows + 0.5)


def read_geojson(path: Path) -> dict:
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    return json.loads(text)


def test_one_exact_valid_polygon_per_cell(tmp_path: Path) -> None:
    labels = known_cells()
    scores = np.linspace(0.3, 0.95, int(labels.max()))
    scores[5] = np.nan  # no score (e.g. a given box without one): left out, not NaN in the JSON
    rows = cells_table(labels, scores)
    assert write_cells_geojson(tmp_path / "c.geojson", labels, rows) == 10
    collection = read_geojson(tmp_path / "c.geojson")
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert [f["id"] for f in features] == [r["label"] for r in rows] == list(range(1, 11))
    for feature, row in zip(features, rows):
        label = row["label"]
        mask = labels == label
        geometry = shape(feature["geometry"])
        assert geometry.is_valid, label
        assert geometry.area == mask.sum() == row["area"]  # exact: outlines follow pixel edges
        assert (pixel_centres(geometry, labels.shape) == mask).all(), label
        xmin, ymin, xmax, ymax = geometry.bounds
        assert (xmin, ymin, xmax, ymax) == (row["x0"], row["y0"], row["x1"], row["y1"])  # input pixels
        expected = "MultiPolygon" if label in (8, 9) else "Polygon"
        assert feature["geometry"]["type"] == expected, label
        properties = feature["properties"]
        assert properties["objectType"] == "detection" and properties["label"] == label
        assert properties["name"] == f"cell {label}"
        measurements = properties["measurements"]
        assert measurements["label"] == label and measurements["area"] == row["area"]
        assert all(isinstance(v, (int, float)) for v in measurements.values())
        if label == 6:
            assert "score" not in measurements
        else:
            assert measurements["score"] == pytest.approx(row["score"], rel=1e-5)
    by_label = {f["id"]: shape(f["geometry"]) for f in features}
    assert len(by_label[1].interiors) == 1 and by_label[1].interiors[0].envelope.area == 9  # the empty hole
    assert len(by_label[3].interiors) == 1 and by_label[3].interiors[0].envelope.equals(by_label[2])  # 2 fills it
    assert not by_label[4].equals(by_label[4].convex_hull) and by_label[4].area == 57  # non-convex
    assert by_label[6].equals(shapely.box(40, 15, 41, 16))  # one pixel spans [c, c+1] x [r, r+1]
    assert by_label[7].bounds == (44, 35, 50, 40) and by_label[10].bounds == (0, 38, 30, 40)  # image edges
    assert len(by_label[8].geoms) == 2
    exterior = np.asarray(by_label[5].exterior.coords)
    assert shapely.LinearRing(exterior).is_ccw and len(exterior) == 9  # U: 8 corners, no collinear vertices


@pytest.mark.parametrize("seed", range(4))
def test_random_labels_outline_exactly_their_pixels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, (23, 31)).astype(np.uint32)  # ragged, holed, split labels
    labels[rng.random(labels.shape) < 0.3] = 0
    rows = cells_table(labels, np.ones(int(labels.max())))
    features = list(iter_cell_features(labels, rows))
    assert [f["id"] for f in features] == sorted(set(np.unique(labels)) - {0})
    union = np.zeros(labels.shape, np.int64)
    for feature in features:
        geometry = shape(feature["geometry"])
        inside = pixel_centres(geometry, labels.shape)
        assert geometry.is_valid and geometry.area == (labels == feature["id"]).sum()
        assert (inside == (labels == feature["id"])).all()
        union += inside
    assert (union == (labels > 0)).all()  # polygons never overlap


def test_mask_geometry_offsets_and_empty() -> None:
    mask = np.zeros((3, 4), bool)
    mask[1, 1:3] = True
    assert mask_geometry(mask, 10, 20).equals(shapely.box(11, 21, 13, 22))
    assert mask_geometry(np.zeros((2, 2), bool)).is_empty


def test_banded_features_from_a_zarr_array_equal_the_whole_image(tmp_path: Path) -> None:
    labels = np.kron(known_cells(), np.ones((3, 3), np.uint32))  # 120 x 150: cells span several bands
    array = zarr.create_array(store=str(tmp_path / "l.zarr"), shape=labels.shape, chunks=(16, 16), dtype=np.uint32)
    array[:] = labels
    rows = cells_table(labels, np.full(10, 0.5))
    whole = {f["id"]: f for f in iter_cell_features(labels, rows)}
    banded = list(iter_cell_features(array, rows, band=16))
    assert sorted(f["id"] for f in banded) == sorted(whole) and all(f == whole[f["id"]] for f in banded)


def test_slide_label_table_matches_the_in_memory_table(tmp_path: Path) -> None:
    labels = known_cells()
    labels[labels == 6] = 0  # a gap: label 6 lost every pixel
    scores = [np.inf] + [0.1 * k for k in range(1, 11)]
    array = zarr.create_array(store=str(tmp_path / "l.zarr"), shape=labels.shape, chunks=(8, 8), dtype=np.uint32)
    array[:] = labels
    table = label_table(array, scores, band=7)
    assert table == cells_table(labels, np.asarray(scores[1:]))
    assert [r["label"] for r in table] == [1, 2, 3, 4, 5, 7, 8, 9, 10]


def check_ome_zarr(path: Path, image_cyx: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """Validate against the NGFF 0.4 models, read back with ome-zarr-py; returns the label levels."""
    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader
    from ome_zarr_models.v04 import Image, ImageLabel, Labels

    group = zarr.open_group(str(path), mode="r")
    assert group.metadata.zarr_format == 2
    image_model = Image.from_zarr(group)
    (multiscale,) = image_model.attributes.multiscales
    assert [a.name for a in multiscale.axes] == (["c", "y", "x"] if image_cyx.ndim == 3 else ["y", "x"])
    assert Labels.from_zarr(group["labels"]).attributes.labels == ["cells"]
    label_model = ImageLabel.from_zarr(group["labels/cells"])
    assert label_model.attributes.image_label.version == "0.4"

    nodes = list(Reader(parse_url(str(path), fmt=FormatV04()))())
    image_node = next(n for n in nodes if any(isinstance(s, Multiscales) for s in n.specs) and not any(isinstance(s, Label) for s in n.specs))
    label_node = next(n for n in nodes if any(isinstance(s, Label) for s in n.specs))
    image_levels = [np.asarray(level) for level in image_node.data]
    label_levels = [np.asarray(level) for level in label_node.data]
    assert len(image_levels) == len(label_levels) == len(multiscale.datasets)
    np.testing.assert_array_equal(image_levels[0], image_cyx)
    assert image_levels[0].dtype == image_cyx.dtype
    np.testing.assert_array_equal(label_levels[0], labels)
    height, width = labels.shape
    present = set(np.unique(labels).tolist())
    for k, (pixels, level) in enumerate(zip(image_levels, label_levels)):
        f = 2**k
        assert level.shape == pixels.shape[-2:] == (height // f, width // f)
        np.testing.assert_array_equal(level, labels[f // 2 :: f, f // 2 :: f][: height // f, : width // f])
        assert set(np.unique(level).tolist()) <= present  # nearest: labels stay labels
        if k:
            block = image_cyx[..., : height // f * f, : width // f * f].astype(np.float64)
            means = block.reshape(*block.shape[:-2], height // f, f, width // f, f).mean(axis=(-3, -1))
            assert np.abs(pixels.astype(np.float64) - means).max() <= 0.5 + 1e-9  # 2^k x 2^k means, rounded
    return label_levels


@pytest.mark.parametrize("layout", ["grey", "channels_last", "channels_first"])
def test_ome_zarr_validates_and_reads_back_the_same_labels(tmp_path: Path, layout: str) -> None:
    labels = np.kron(known_cells(), np.ones((3, 3), np.uint32))[:117, :149]  # odd sides
    rng = np.random.default_rng(1)
    grey = (rng.random(labels.shape) * 4000).astype(np.uint16)
    image = {"grey": grey, "channels_last": np.stack([grey, grey // 2], axis=-1),
             "channels_first": np.stack([grey, grey // 3, grey // 5])}[layout]
    cyx = image if layout != "channels_last" else np.moveaxis(image, -1, 0)
    assert write_ome_zarr(tmp_path / "x.ome.zarr", image, labels, levels=3, chunk=32) == 3
    levels = check_ome_zarr(tmp_path / "x.ome.zarr", cyx, labels)
    assert levels[0].dtype == np.uint16  # as the label TIFF: uint16 when every label fits
    # written again over the old one: replaced whole, nothing left beside it
    write_ome_zarr(tmp_path / "x.ome.zarr", image, labels + (labels > 0) * 70000, levels=2)
    again = check_ome_zarr(tmp_path / "x.ome.zarr", cyx, labels + (labels > 0) * 70000)
    assert len(again) == 2 and again[0].dtype == np.uint32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ome.zarr"]


def test_ome_zarr_of_a_lazy_slide_equals_the_in_memory_one(tmp_path: Path) -> None:
    labels = np.kron(known_cells(), np.ones((4, 4), np.uint32))  # 160 x 200
    image = (np.random.default_rng(2).random((*labels.shape, 3)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "slide.tif", image, tile=(32, 32))
    store = zarr.create_array(store=str(tmp_path / "l.zarr"), shape=labels.shape, chunks=(32, 32), dtype=np.uint32)
    store[:] = labels
    write_ome_zarr(tmp_path / "lazy.ome.zarr", Slide.open(tmp_path / "slide.tif"), store, label_dtype=np.uint16, chunk=48)
    write_ome_zarr(tmp_path / "whole.ome.zarr", image, labels, chunk=48)
    lazy = check_ome_zarr(tmp_path / "lazy.ome.zarr", np.moveaxis(image, -1, 0), labels)
    whole = check_ome_zarr(tmp_path / "whole.ome.zarr", np.moveaxis(image, -1, 0), labels)
    assert len(lazy) == pyramid_levels(160, 200) == 2
    assert all(np.array_equal(a, b) for a, b in zip(lazy, whole))


def test_pyramid_levels_and_size_check() -> None:
    assert pyramid_levels(256, 256) == 3 and pyramid_levels(16000, 16000) == 8 and pyramid_levels(40, 3000) == 6
    with pytest.raises(UserError, match="differ in size"):
        write_ome_zarr("unused.ome.zarr", np.zeros((4, 4)), np.zeros((4, 5), np.uint32))


def test_parse_formats() -> None:
    assert parse_formats("tif,csv") == ("tif", "csv")
    assert parse_formats(" GeoJSON , ome-zarr,tiff,geojson,") == ("geojson", "ome-zarr", "tif")
    assert parse_formats(list(FORMATS)) == FORMATS
    for bad, message in (("tif,png", "unknown format 'png'"), ("", "at least one"), ("zarr", "unknown format 'zarr'")):
        with pytest.raises(UserError, match=message):
            parse_formats(bad)


def test_write_formats_python_api(tmp_path: Path) -> None:
    labels = known_cells()
    rows = cells_table(labels, np.full(10, 0.5))
    image = np.random.default_rng(3).random(labels.shape).astype(np.float32)
    paths = write_formats(tmp_path, "a", labels, rows, image, ("geojson", "ome-zarr", "tif", "csv"))
    assert paths == format_paths(tmp_path, "a", ("geojson", "ome-zarr", "tif", "csv"))
    assert [p.name for p in paths.values()] == ["a_cells.geojson", "a.ome.zarr", "a_labels.tif", "a_cells.csv"]
    assert len(read_geojson(paths["geojson"])["features"]) == 10
    np.testing.assert_array_equal(tifffile.imread(paths["tif"]), labels)
    check_ome_zarr(paths["ome-zarr"], image, labels)
    with pytest.raises(UserError, match="needs the image"):
        write_formats(tmp_path, "b", labels, rows, None, ("ome-zarr",))


def test_bad_format_is_one_line_before_any_server(tmp_path: Path, capsys) -> None:
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((8, 8), np.uint8))
    dead = f"127.0.0.1:{free_port()}"
    for extra in (["--format", "tif,shp"], ["--format", ","], ["--slide", "--format", "png"]):
        code = cli(["segment", str(tmp_path / "a.tif"), "--out", str(tmp_path / "out"), "--url", dead, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and len(err) == 1 and "--format" in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def check_outputs(out: Path, stem: str, image_cyx: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """The four outputs of one input agree: TIFF labels == OME-Zarr labels, CSV rows == GeoJSON
    features (labels, areas), each polygon outlines exactly its label's pixels."""
    labels = tifffile.imread(out / f"{stem}_labels.tif").astype(np.int64)
    with open(out / f"{stem}_cells.csv") as handle:
        rows = list(csv.DictReader(handle))
    features = read_geojson(out / f"{stem}_cells.geojson")["features"]
    present = sorted(set(np.unique(labels).tolist()) - {0})
    assert [int(r["label"]) for r in rows] == [f["id"] for f in features] == present
    for row, feature in zip(rows, features):
        geometry = shape(feature["geometry"])
        mask = labels == feature["id"]
        assert geometry.is_valid and geometry.area == mask.sum() == int(row["area"])
        x0, y0, x1, y1 = geometry.bounds
        assert (x0, y0, x1, y1) == (int(row["x0"]), int(row["y0"]), int(row["x1"]), int(row["y1"]))
    check_ome_zarr(out / f"{stem}.ome.zarr", image_cyx, labels)
    return labels, rows


@pytest.fixture(scope="module")
def tiny_server(single_repository, tmp_path_factory):
    with EmbeddedServer(single_repository, log_path=tmp_path_factory.mktemp("log") / "t.log", exit_timeout_s=2) as s:
        yield s


def test_segment_all_formats_folder_job_resumes(tiny_server, tmp_path: Path, capsys) -> None:
    sources = write_frames(tmp_path / "in", 3)
    out = tmp_path / "out"
    base = ["segment", str(tmp_path / "in"), "--out", str(out), "--url", tiny_server.grpc_url]
    assert cli([*base, "--format", ALL]) == 0
    printed = capsys.readouterr().out
    assert "frame_000.ome.zarr" in printed and "frame_000_cells.geojson" in printed
    counts = []
    for k, source in enumerate(sources):
        labels, rows = check_outputs(out, source.stem, np.moveaxis(frame(k).astype(np.float32), -1, 0))
        counts.append(len(rows))
    assert sum(counts) > 0
    # done with these formats: nothing redone; asking for an output not yet written redoes all
    assert cli([*base, "--format", "geojson,tif"]) == 0
    assert "segmented 0/3 images (3 already done" in capsys.readouterr().out
    (out / "frame_001_cells.geojson").unlink()
    assert cli([*base, "--format", "geojson,tif"]) == 0
    assert "segmented 1/3 images (2 already done" in capsys.readouterr().out
    # default formats unchanged: the label TIFF and the cells CSV
    assert cli(["segment", str(sources[0]), "--out", str(tmp_path / "plain"), "--url", tiny_server.grpc_url]) == 0
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["frame_000_cells.csv", "frame_000_labels.tif"]


def test_slide_all_formats(slide_server, tmp_path: Path, capsys) -> None:  # noqa: F811
    image = blocks_slide(300, 420, seed=5)
    tifffile.imwrite(tmp_path / "slide.ome.tif", image, tile=(64, 64), bigtiff=True)
    base = ["segment", "--slide", str(tmp_path / "slide.ome.tif"), "--url", slide_server.grpc_url, "--max-memory", "30"]
    assert cli([*base, "--out", str(tmp_path / "out"), "--format", ALL]) == 0
    assert "slide.ome.zarr" in capsys.readouterr().out
    labels, rows = check_outputs(tmp_path / "out", "slide", image)
    assert len(rows) > 5
    # the slide default stays the label image alone
    assert cli([*base, "--out", str(tmp_path / "plain")]) == 0
    assert [p.name for p in (tmp_path / "plain").iterdir()] == ["slide_labels.tif"]


def test_large_plain_image_all_formats(slide_server, tmp_path: Path, capsys) -> None:  # noqa: F811
    """A plain input over --slide-above goes window by window; its OME-Zarr reads the TIFF lazily."""
    image = blocks_slide(260, 300, seed=7)
    tifffile.imwrite(tmp_path / "big.tif", image, tile=(64, 64))
    assert cli(["segment", str(tmp_path / "big.tif"), "--out", str(tmp_path / "out"), "--url", slide_server.grpc_url,
                "--slide-above", "10000", "--format", ALL]) == 0
    assert "large image" in capsys.readouterr().out
    labels, rows = check_outputs(tmp_path / "out", "big", image)
    assert len(rows) == labels.max() > 5  # labels 1..n, as for any image


def test_dask_job_all_formats(tiny_server, tmp_path: Path, capsys) -> None:
    pytest.importorskip("distributed")
    sources = write_frames(tmp_path / "in", 2)
    assert cli(["segment", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--url", tiny_server.grpc_url,
                "--dask", "local:1", "--format", ALL]) == 0
    assert "segmented 2/2 images" in capsys.readouterr().out
    for k, source in enumerate(sources):
        check_outputs(tmp_path / "out", source.stem, np.moveaxis(frame(k).astype(np.float32), -1, 0))


@pytest.mark.data
def test_segment_a_real_image_into_every_format(default_server, tmp_path: Path) -> None:
    from cellsam_triton.datasets import load_manifest, load_sample, split_of

    record = next(r for r in load_manifest(DATA) if split_of(r.id) == "val" and 15 <= r.objects <= 60)
    image, _ = load_sample(DATA, record.id)
    tifffile.imwrite(tmp_path / "real.tif", image)
    assert cli(["segment", str(tmp_path / "real.tif"), "--out", str(tmp_path / "out"), "--url", default_server.grpc_url,
                "--format", ALL]) == 0
    cyx = np.moveaxis(image, -1, 0) if image.ndim == 3 else image
    labels, rows = check_outputs(tmp_path / "out", "real", cyx)
    assert len(rows) >= 5
