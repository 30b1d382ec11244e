"""Request checks shared by every Python pipeline (box and grid), free of Triton.

Copied beside each pipeline's model.py. A :class:`RequestError` is answered as a TritonError:
INVALID_ARGUMENT when it is the caller's mistake (``invalid_argument``), else a plain error
(a composing model failed).
"""

import numpy as np


class RequestError(Exception):
    """A problem with the request (INVALID_ARGUMENT) or with a composing model (``invalid_argument`` False)."""

    def __init__(self, message, invalid_argument=True):
        super().__init__(message)
        self.invalid_argument = invalid_argument


def check(name, array, dtype, shape):
    """dtype, shape (-1 = any) and finiteness of one input."""
    if array.dtype != dtype:
        raise RequestError(f"input '{name}' has dtype {array.dtype}, expected {np.dtype(dtype)}")
    if array.ndim != len(shape) or any(s not in (-1, a) for s, a in zip(shape, array.shape)):
        raise RequestError(f"input '{name}' has shape {list(array.shape)}, expected {list(shape)}")
    if not np.all(np.isfinite(array)):
        raise RequestError(f"input '{name}' contains NaN or infinite values")
    return array


def required(inputs, name, dtype, shape):
    """A checked input that must be present."""
    array = inputs.get(name)
    if array is None:
        raise RequestError(f"input '{name}' is required")
    return check(name, array, dtype, shape)


def scalar(inputs, name, dtype, default):
    """A one-element optional input as a Python number (``default`` when absent)."""
    array = inputs.get(name)
    if array is None:
        return default
    value = check(name, array, dtype, (1,))[0]
    return float(value) if np.dtype(dtype).kind == "f" else int(value)


def in_range(name, value, low, high):
    """``value`` when low <= value <= high, else INVALID_ARGUMENT."""
    if not low <= value <= high:
        raise RequestError(f"input '{name}' must lie in [{low}, {high}], got {value}")
    return value
