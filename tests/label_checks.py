"""Label images of two served paths (CLI, API, labels model, Node) compared: the INT8 encoder
quantises activations per tensor on the fly and its dynamic batcher groups concurrent tile requests
differently from run to run, so a tile's embedding depends slightly on its batch, and a pixel that
two masks claim almost equally may go either way."""

from __future__ import annotations

import numpy as np

MAX_DIFFERING = 1e-3  # fraction of pixels that may differ


def assert_same_cells(got: np.ndarray, want: np.ndarray, max_differing: float = MAX_DIFFERING) -> None:
    """Same shape, same labels, and at most ``max_differing`` of the pixels labelled differently."""
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.unique(got), np.unique(want))
    differing = int(np.count_nonzero(got != want))
    assert differing <= max_differing * got.size, f"{differing} of {got.size} pixels differ"
