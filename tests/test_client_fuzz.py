"""Property-based fuzzing of the client's readers and pre-processing (no server needed).

Whatever bytes or arrays come in, a reader either returns a valid image or raises one-line
`UserError`; pre-processing of any valid image yields finite model inputs of the contract's
shape, never NaN and never an unexpected exception.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cellsam_triton.client import cellsam_rules
from cellsam_triton.client.images import read_image, to_channels_last3, validate_image
from cellsam_triton.client.tiles import lite_normalize, tile_grid, tile_input
from cellsam_triton.errors import UserError

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

dtypes = st.sampled_from([np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64])


def _valid_tiff_bytes(data: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, data)
    return buffer.getvalue()


@FUZZ
@given(
    suffix=st.sampled_from([".tif", ".png", ".npy"]),
    payload=st.one_of(
        st.binary(max_size=2048),
        hnp.arrays(np.uint8, st.tuples(st.integers(2, 24), st.integers(2, 24))).map(_valid_tiff_bytes),
    ),
    cut=st.integers(0, 4096),
)
def test_readers_never_crash_on_arbitrary_bytes(tmp_path: Path, suffix: str, payload: bytes, cut: int) -> None:
    """Random or truncated files: an image back, or a UserError naming the file in one line."""
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(payload[: max(cut, 1)] if cut < len(payload) else payload)
    try:
        image = read_image(path)
    except UserError as exc:
        message = str(exc)
        assert str(path) in message and "\n" not in message
        return
    assert image.ndim in (2, 3) and image.size > 0 and np.isfinite(image.astype(np.float64)).all()


finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)


def as_dtype(values: np.ndarray, dtype: type) -> np.ndarray:
    """Finite float values cast into ``dtype``'s range (integers are clipped and rounded)."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def images(shape: st.SearchStrategy) -> st.SearchStrategy:
    return st.builds(as_dtype, hnp.arrays(np.float32, shape, elements=finite), dtypes)


@FUZZ
@given(
    image=images(st.tuples(st.integers(2, 40), st.integers(2, 40), st.integers(1, 3))),
)
def test_cellsam_preprocessing_gives_finite_inputs(image: np.ndarray) -> None:
    image = validate_image(image, "fuzz")
    norm = cellsam_rules.normalize(to_channels_last3(image))
    for tensor in (cellsam_rules.segmenter_input(norm, 64), cellsam_rules.detector_input(norm, 64)):
        assert tensor.shape == (1, 3, 64, 64) and tensor.dtype == np.float32
        assert np.isfinite(tensor).all()


@FUZZ
@given(image=images(st.tuples(st.integers(2, 300), st.integers(2, 300))))
def test_lite_preprocessing_gives_finite_tiles(image: np.ndarray) -> None:
    norm = lite_normalize(validate_image(image, "fuzz"))
    assert norm.min() >= 0.0 and norm.max() <= 1.0
    for tile in tile_grid(*norm.shape[:2]):
        tensor = tile_input(norm, tile)
        assert tensor.shape == (1, 3, 256, 256) and np.isfinite(tensor).all()


@FUZZ
@given(bad=st.sampled_from([np.nan, np.inf, -np.inf]), where=st.integers(0, 15))
def test_non_finite_pixels_are_refused(bad: float, where: int) -> None:
    image = np.ones((4, 4), np.float32)
    image.flat[where] = bad
    try:
        validate_image(image, "img.tif")
    except UserError as exc:
        assert "img.tif" in str(exc)
    else:
        raise AssertionError("a non-finite pixel must be refused")
