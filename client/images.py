"""Image readers (TIFF, PNG, NPY) and CellSAM's channel layout rule, numpy only.

Every problem with an input becomes a one-line `UserError` naming the file. The readers return
the array as stored (its own dtype); `to_channels_last3` turns it into the [H,W,3] float layout
the CellSAM rule set works on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cellsam_triton.errors import UserError

# 16384 x 16384. The CellSAM rule set holds a few float copies of the whole image (up to
# 24 bytes a pixel in float64), so larger inputs would need tens of GB of memory.
MAX_PIXELS = 2**28
MAX_CHANNELS = 3
SUFFIXES = (".tif", ".tiff", ".png", ".npy")


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read a TIFF, PNG or NPY image: [H,W] or a 3-D array with 1-3 channels (either end).

    Size-1 axes of higher-dimensional files (e.g. ImageJ stacks of one plane) are dropped;
    PNG alpha channels are dropped. Raises `UserError` naming the file for any problem.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; use {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    reader = {".png": _read_png, ".npy": _read_npy}.get(suffix, _read_tiff)
    array = reader(path, max_pixels)
    return validate_image(array, str(path), max_pixels)


def validate_image(array: np.ndarray, name: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Check dtype, shape, size and finiteness of an image; return it with size-1 axes dropped."""
    array = np.asarray(array)
    dtype = array.dtype
    if dtype == np.bool_ or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise UserError(f"{name}: unsupported pixel type {dtype} (need integers or floats)")
    if array.size == 0:
        raise UserError(f"{name}: image is empty (shape {array.shape})")
    if array.ndim > 2:
        array = array.reshape([n for n in array.shape if n != 1] or [1])
    if array.ndim == 3 and min(array.shape) > MAX_CHANNELS:
        raise UserError(f"{name}: {min(array.shape)} channels; at most {MAX_CHANNELS} are supported")
    if array.ndim not in (2, 3):
        raise UserError(f"{name}: expected a 2-D image or a 3-D image with channels, got shape {array.shape}")
    height, width = _plane_shape(array.shape)
    if height < 2 or width < 2:
        raise UserError(f"{name}: image is smaller than 2x2 pixels (shape {array.shape})")
    if height * width > max_pixels:
        raise UserError(f"{name}: {height}x{width} pixels is more than the limit of {max_pixels}")
    if dtype.kind == "f" and not np.isfinite(array).all():
        raise UserError(f"{name}: image contains NaN or infinite values")
    return array


def _plane_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(H, W) of a 2-D image or of a 3-D one whose channel axis is its smallest axis."""
    if len(shape) == 2:
        return shape[0], shape[1]
    channel = int(np.argmin(shape))
    height, width = (n for i, n in enumerate(shape) if i != channel)
    return height, width


def _check_count(path: Path, shape: tuple[int, ...], max_pixels: int) -> None:
    """Refuse a file before loading it when its shape alone is over the pixel limit."""
    if len(shape) in (2, 3) and all(shape):
        height, width = _plane_shape(tuple(shape))
        if height * width > max_pixels:
            raise UserError(f"{path}: {height}x{width} pixels is more than the limit of {max_pixels}")


def _read_tiff(path: Path, max_pixels: int) -> np.ndarray:
    import tifffile

    # tifffile logs its own warning for damaged files; the UserError below is the one line.
    logging.getLogger("tifffile").setLevel(logging.ERROR)
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise UserError(f"{path}: TIFF file holds no image")
            series = tif.series[0]
            _check_count(path, tuple(n for n in series.shape if n != 1), max_pixels)
            return series.asarray()
    except UserError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged files
        raise UserError(f"{path}: cannot read TIFF ({_first_line(exc)})") from None


def _read_png(path: Path, max_pixels: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise UserError(f"{path}: not a PNG file (found {image.format})")
            _check_count(path, (image.height, image.width), max_pixels)
            image.load()
            mode = image.mode
            if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                image, mode = image.convert("RGB"), "RGB"
            elif mode == "1":
                image, mode = image.convert("L"), "L"
            array = np.asarray(image)
    except UserError:
        raise
    except Image.DecompressionBombError:
        raise UserError(f"{path}: PNG has too many pixels") from None
    except Exception as exc:
        raise UserError(f"{path}: cannot read PNG ({_first_line(exc)})") from None
    if mode in ("RGBA", "LA", "La", "RGBa"):
        array = array[..., :-1]
    return array


def _read_npy(path: Path, max_pixels: int) -> np.ndarray:
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        if not isinstance(mapped, np.ndarray):
            raise UserError(f"{path}: not a single array")
        _check_count(path, tuple(n for n in mapped.shape if n != 1), max_pixels)
        return np.array(mapped)
    except UserError:
        raise
    except Exception as exc:  # ValueError for pickled/object arrays, truncated or damaged files
        raise UserError(f"{path}: cannot read NPY ({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def working_dtype(dtype: np.dtype) -> type:
    """float32 when every value of ``dtype`` is exact in float32, else float64."""
    return np.float32 if np.can_cast(dtype, np.float32, casting="safe") else np.float64


def to_channels_last3(image: np.ndarray, dtype: type | None = None) -> np.ndarray:
    """CellSAM's layout rule: [H,W,3] float, channels right-aligned as [blank, nuclear, whole-cell].

    A 2-D image becomes channel 2. In a 3-D image the smallest axis (the first one on a tie) is
    the channel axis; its C <= 3 channels fill the last C slots. ``dtype`` defaults to float32,
    or float64 when the input's values are not all exact in float32 (int32, float64, ...).
    """
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        array = np.moveaxis(array, int(np.argmin(array.shape)), -1)
    else:
        raise UserError(f"expected an image [H,W] or [H,W,C], got shape {array.shape}")
    channels = array.shape[2]
    if channels > MAX_CHANNELS:
        raise UserError(f"image has {channels} channels; at most {MAX_CHANNELS} are supported")
    out = np.zeros(array.shape[:2] + (3,), dtype or working_dtype(array.dtype))
    out[:, :, 3 - channels :] = array
    return out
