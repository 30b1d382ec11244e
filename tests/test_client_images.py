"""Image readers, the channel layout rule, and the output writers / boxes reader."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from cellsam_triton.client.images import read_image, to_channels_last3, validate_image
from cellsam_triton.client.writers import (
    outlines,
    read_boxes_csv,
    write_cells_csv,
    write_labels_tiff,
    write_overlay_png,
)
from cellsam_triton.errors import UserError

RNG = np.random.default_rng(7)


def _random(shape, dtype):
    if np.dtype(dtype).kind == "f":
        return (RNG.random(shape) * 1000 - 10).astype(dtype)
    info = np.iinfo(dtype)
    return RNG.integers(max(info.min, -1000), min(info.max, 100000), shape, endpoint=True).astype(dtype)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int32", "uint32", "float32", "float64"])
@pytest.mark.parametrize("shape", [(20, 30), (20, 30, 1), (20, 30, 2), (3, 20, 30), (20, 30, 3)])
def test_tiff_and_npy_round_trip(tmp_path, dtype, shape):
    array = _random(shape, dtype)
    tifffile.imwrite(tmp_path / "a.tif", array)
    np.save(tmp_path / "a.npy", array)
    for name in ("a.tif", "a.npy"):
        read = read_image(tmp_path / name)
        assert read.dtype == array.dtype
        np.testing.assert_array_equal(read, np.squeeze(array) if 1 in shape else array)


@pytest.mark.parametrize("mode,shape,channels", [("L", (12, 9), 1), ("RGB", (12, 9, 3), 3), ("RGBA", (12, 9, 4), 3), ("I;16", (12, 9), 1)])
def test_png_modes(tmp_path, mode, shape, channels):
    dtype = np.uint16 if mode == "I;16" else np.uint8
    array = _random(shape, dtype)
    Image.fromarray(array).save(tmp_path / "a.png")
    read = read_image(tmp_path / "a.png")
    assert read.shape[:2] == (12, 9) and (read.ndim == 2 if channels == 1 else read.shape[2] == channels)
    np.testing.assert_array_equal(read, array[..., :3] if mode == "RGBA" else array)


def _bad_files(tmp_path):
    """(file, expected words in the message) for each kind of bad input."""
    cases = []

    def npy(name, array):
        np.save(tmp_path / name, array)
        cases.append((tmp_path / name, None))

    npy("bool.npy", np.zeros((5, 5), bool))
    npy("complex.npy", np.zeros((5, 5), np.complex64))
    npy("empty.npy", np.zeros((0, 5), np.float32))
    npy("four.npy", np.zeros((5, 6, 4), np.uint8))
    npy("nan.npy", np.full((5, 5), np.nan, np.float32))
    npy("inf.npy", np.full((5, 5), np.inf))
    npy("tiny.npy", np.zeros((1, 5), np.uint8))
    npy("four_d.npy", np.zeros((2, 5, 5, 2), np.uint8))
    np.save(tmp_path / "object.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases.append((tmp_path / "object.npy", None))
    np.save(tmp_path / "trunc.npy", np.zeros((50, 50), np.float32))
    (tmp_path / "trunc.npy").write_bytes((tmp_path / "trunc.npy").read_bytes()[:500])
    cases.append((tmp_path / "trunc.npy", None))
    tifffile.imwrite(tmp_path / "trunc.tif", np.zeros((64, 64), np.uint16))
    (tmp_path / "trunc.tif").write_bytes((tmp_path / "trunc.tif").read_bytes()[:100])
    cases.append((tmp_path / "trunc.tif", None))
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    cases.append((tmp_path / "junk.png", None))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "jpeg.png", format="JPEG")
    cases.append((tmp_path / "jpeg.png", None))
    (tmp_path / "a.jpg").write_bytes(b"x")
    cases.append((tmp_path / "a.jpg", "unsupported"))
    cases.append((tmp_path / "missing.tif", "no such file"))
    return cases


def test_bad_inputs_are_one_line_user_errors_naming_the_file(tmp_path):
    for path, words in _bad_files(tmp_path):
        with pytest.raises(UserError) as info:
            read_image(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message, message
        if words:
            assert words in message


def test_pixel_limit(tmp_path):
    np.save(tmp_path / "big.npy", np.zeros((40, 50), np.uint8))
    with pytest.raises(UserError, match="limit"):
        read_image(tmp_path / "big.npy", max_pixels=1999)
    assert read_image(tmp_path / "big.npy", max_pixels=2000).shape == (40, 50)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.float64]),
        shape=st.one_of(
            hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=9),
            st.tuples(st.integers(1, 3), st.integers(4, 9), st.integers(4, 9)),
            st.tuples(st.integers(4, 9), st.integers(4, 9), st.integers(1, 3)),
        ),
        elements={"min_value": 0, "max_value": 200},
    )
)
def test_read_then_channels_last_keeps_every_value(array):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.npy"
        np.save(path, array)
        hw3 = to_channels_last3(read_image(path))
    squeezed = np.squeeze(array) if array.ndim == 3 else array
    channels = 1 if squeezed.ndim == 2 else min(squeezed.shape)
    assert hw3.shape[2] == 3 and hw3.dtype in (np.float32, np.float64)
    assert hw3.shape[0] * hw3.shape[1] * channels == array.size
    assert not hw3[:, :, : 3 - channels].any()  # blank slots on the left
    used = hw3[:, :, 3 - channels :]
    np.testing.assert_array_equal(np.sort(used, axis=None), np.sort(array.astype(np.float64), axis=None))
    if squeezed.ndim == 3 and int(np.argmin(squeezed.shape)) == 0:
        np.testing.assert_array_equal(used, np.moveaxis(squeezed, 0, -1))


def test_channels_last_dtype_follows_precision():
    assert to_channels_last3(np.zeros((4, 4), np.uint16)).dtype == np.float32
    assert to_channels_last3(np.zeros((4, 4), np.int32)).dtype == np.float64
    assert to_channels_last3(np.zeros((4, 4), np.float64)).dtype == np.float64
    with pytest.raises(UserError, match="channels"):
        to_channels_last3(np.zeros((5, 5, 4)))
    with pytest.raises(UserError, match="NaN"):
        validate_image(np.array([[1.0, np.nan], [0, 0]]), "image")


def test_label_tiff_dtype_rule_and_round_trip(tmp_path):
    small = RNG.integers(0, 65536, (30, 20)).astype(np.uint32)
    large = small.copy()
    large[0, 0] = 70000
    for labels, dtype in ((small, np.uint16), (large, np.uint32), (np.zeros((4, 4), np.uint32), np.uint16)):
        write_labels_tiff(tmp_path / "l.tif", labels)
        read = tifffile.imread(tmp_path / "l.tif")
        assert read.dtype == dtype
        np.testing.assert_array_equal(read, labels)
    assert [p.name for p in tmp_path.iterdir()] == ["l.tif"]  # no temp files left


def test_cells_csv_round_trip(tmp_path):
    rows = [dict(label=1, x0=0, y0=2, x1=5, y1=7, score=0.123456789, area=12), dict(label=2, x0=3, y0=3, x1=4, y1=4, score=1.0, area=1)]
    write_cells_csv(tmp_path / "c.csv", rows)
    lines = (tmp_path / "c.csv").read_text().splitlines()
    assert lines == ["label,x0,y0,x1,y1,score,area", "1,0,2,5,7,0.123457,12", "2,3,3,4,4,1,1"]
    write_cells_csv(tmp_path / "empty.csv", [])
    assert (tmp_path / "empty.csv").read_text() == "label,x0,y0,x1,y1,score,area\n"


@pytest.mark.parametrize("image", [RNG.random((16, 12)), RNG.integers(0, 4000, (2, 16, 12)).astype(np.uint16), RNG.integers(0, 255, (16, 12, 3)).astype(np.uint8)])
def test_overlay_draws_outlines(tmp_path, image):
    labels = np.zeros((16, 12), np.uint32)
    labels[3:9, 2:7] = 1
    labels[9:14, 5:11] = 2
    write_overlay_png(tmp_path / "o.png", image, labels)
    rgb = np.asarray(Image.open(tmp_path / "o.png"))
    assert rgb.shape == (16, 12, 3) and rgb.dtype == np.uint8
    edge = outlines(labels)
    assert edge[3, 2] and not edge[5, 4] and not edge[0, 0]
    assert (rgb[edge] == (255, 255, 0)).all()


def test_boxes_csv(tmp_path):
    path = tmp_path / "b.csv"
    path.write_text("x0,y0,x1,y1\n1,2,3,4\n\n5.5, 6 ,7,8.25\n")
    np.testing.assert_array_equal(read_boxes_csv(path), np.array([[1, 2, 3, 4], [5.5, 6, 7, 8.25]], np.float32))
    path.write_text("x0,y0,x1,y1\n")
    assert read_boxes_csv(path).shape == (0, 4)
    path.write_text("")
    assert read_boxes_csv(path).shape == (0, 4)
    for text, words in [
        ("a,b,c,d\n1,2,3,4\n", "header"),
        ("x0,y0,x1,y1\n1,2,x,4\n", "not a number"),
        ("x0,y0,x1,y1\n1,2,nan,4\n", "NaN"),
        ("x0,y0,x1,y1\n3,2,3,4\n", "x1 > x0"),
        ("x0,y0,x1,y1\n1,2,3\n", "4 values"),
    ]:
        path.write_text(text)
        with pytest.raises(UserError, match=words) as info:
            read_boxes_csv(path)
        assert str(path) in str(info.value)
    with pytest.raises(UserError, match="cannot read"):
        read_boxes_csv(tmp_path / "missing.csv")
