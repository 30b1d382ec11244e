"""`segment --slide` against a real tritonserver with a tiny tiled model: output formats, equality
with the whole-image path, background skip on/off, memory setting, one-line errors on bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellsam_triton.cli import main as cli
from cellsam_triton.client import lite_rules
from cellsam_triton.client.pool import ServerPool
from cellsam_triton.client.slides import Slide
from cellsam_triton.client.types import SegmentOptions
from cellsam_triton.server import EmbeddedServer, free_port

from tiny_family import write_tiny_repository

BLOCK = 40  # bright squares: each covers at least one whole 16 px patch of the tiny detector in any tile


@pytest.fixture(scope="module")
def slide_server(tiny_lite, tmp_path_factory):
    """The tiny LITE-style family with tile-sized mask logits (as LiteMedSAM) and an overlap that fits 64 px tiles."""
    family = dataclasses.replace(tiny_lite, name="tiny_slide", low_res_size=64, tile_overlap=16)
    root = tmp_path_factory.mktemp("slide_repo")
    write_tiny_repository(root / "repo", [family])
    with EmbeddedServer(root / "repo", log_path=root / "triton.log", exit_timeout_s=2) as server:
        yield server


def blocks_slide(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint16 background of 10 with bright 40x40 squares in a few places (blank elsewhere)."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width), 10, np.uint16)
    for _ in range(40):
        y, x = rng.integers(0, height - BLOCK), rng.integers(0, width - BLOCK)
        image[y:y + BLOCK, x:x + BLOCK] = 1000
    image[-40:, -40:] = 0  # the slide minimum, so normalisation is not trivial
    return image


def same_cells(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to label numbering."""
    assert ((a > 0) == (b > 0)).all()
    pairs = np.unique(np.stack([a[a > 0], b[a > 0]]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def read_labels(path: Path) -> np.ndarray:
    slide = Slide.open(path)
    return slide.read(0, slide.shape[0], 0, slide.shape[1]).astype(np.int64)


def test_slide_cli_equals_the_whole_image_path(slide_server, tmp_path, capsys) -> None:
    image = blocks_slide(700, 900)
    tifffile.imwrite(tmp_path / "slide.ome.tif", image, tile=(128, 128), bigtiff=True)
    with ServerPool([slide_server.grpc_url]) as pool:
        whole = lite_rules.segment(image, pool.run, pool.family, None, SegmentOptions(scale=1.0))
    assert whole.count > 10
    base = ["segment", "--slide", str(tmp_path / "slide.ome.tif"), "--url", slide_server.grpc_url, "--max-memory", "30"]
    assert cli([*base, "--out", str(tmp_path / "on")]) == 0
    out = capsys.readouterr().out
    assert f"{whole.count} cells" in out and "background skipped" in out
    sent = int(out.split(" sent")[0].split("(")[-1])
    labels = tmp_path / "on" / "slide_labels.tif"
    with tifffile.TiffFile(labels) as tif:
        assert tif.is_bigtiff and tif.pages[0].is_tiled and tif.pages[0].shape == image.shape
    same_cells(read_labels(labels), whole.labels.astype(np.int64))

    # background skip off: every tile sent, same cells; Zarr output
    assert cli([*base, "--out", str(tmp_path / "off"), "--no-skip-background", "--slide-format", "zarr"]) == 0
    out = capsys.readouterr().out
    total = int(out.split(" tiles (")[0].split(", ")[-1])
    assert "0 background skipped" in out and sent < total
    same_cells(read_labels(tmp_path / "off" / "slide_labels.zarr"), whole.labels.astype(np.int64))
    assert not [p for p in (tmp_path / "on").iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_zarr_slide_input(slide_server, tmp_path, capsys) -> None:
    import zarr

    image = blocks_slide(300, 260, seed=3)
    array = zarr.create_array(store=str(tmp_path / "in.zarr"), shape=image.shape, chunks=(100, 100), dtype=image.dtype)
    array[:] = image
    assert cli(["segment", "--slide", str(tmp_path / "in.zarr"), "--out", str(tmp_path / "out"), "--url", slide_server.grpc_url]) == 0
    with ServerPool([slide_server.grpc_url]) as pool:
        whole = lite_rules.segment(image, pool.run, pool.family, None, SegmentOptions(scale=1.0))
    same_cells(read_labels(tmp_path / "out" / "in_labels.tif"), whole.labels.astype(np.int64))


def test_bad_slides_are_one_line_each_without_a_server(tmp_path, capsys) -> None:
    (tmp_path / "corrupt.tif").write_bytes(b"II*\x00 this is not a tiff")
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 4, 64, 64), np.uint8))
    tifffile.imwrite(tmp_path / "five.tif", np.zeros((5, 64, 64), np.uint8))
    np.save(tmp_path / "text.npy", np.array([["a", "b"], ["c", "d"]]))
    names = ["missing.tif", "corrupt.tif", "stack.tif", "five.tif", "text.npy"]
    dead = f"127.0.0.1:{free_port()}"
    code = cli(["segment", "--slide", *(str(tmp_path / n) for n in names), "--out", str(tmp_path / "out"), "--url", dead])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == len(names) + 1 and lines[-1].startswith(f"failed ({len(names)})")
    for name, line in zip(names, lines):
        assert name in line and line.startswith("cellsam-triton segment: error:")
    assert "no such file" in lines[0] and "cannot open" in lines[1]
    assert "expected a 2-D image" in lines[2] and "5 channels" in lines[3] and "not a real number" in lines[4]


def test_bad_slide_settings_are_one_line(tmp_path, capsys) -> None:
    for extra, message in ((["--max-memory", "0"], "--max-memory"), (["--windows", "0"], "--windows"),
                           (["--background-tolerance", "2"], "--background-tolerance")):
        code = cli(["segment", "--slide", "x.tif", "--out", str(tmp_path), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0]
