"""Where each box is decoded in ROI mode: a window of the image embedding (numpy only).

Shared by the served pipeline (copied beside its model.py), decoder training and the tests, so
the window a box is trained on is the window it is served with. A box (xyxy, inclusive pixel
corners in the encoder frame) spans embedding cells ``floor(x0 / stride) .. floor(x1 / stride)``;
with ``margin`` cells added on each side it goes to the smallest window side in ``sides`` that
holds it, centred on the box and pushed inside the grid at tile borders. Boxes that fit no window
get side 0: the caller decodes them on the full embedding.
"""

import numpy as np


def plan_windows(boxes, embed_size, stride, sides, margin):
    """(side [N] int, origin [N,2] int (x, y) in embedding cells) of each box; side 0 = full."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    limit = embed_size * stride - 1
    cells = np.floor(np.clip(np.nan_to_num(boxes), 0, limit) / stride).astype(np.int64)
    lo = np.minimum(cells[:, :2], cells[:, 2:])
    hi = np.maximum(cells[:, :2], cells[:, 2:])
    needed = (hi - lo + 1).max(axis=1) + 2 * margin
    side = np.zeros(len(boxes), np.int64)
    for s in sorted(int(s) for s in sides if 0 < int(s) < embed_size)[::-1]:
        side[needed <= s] = s
    spare = (side[:, None] - (hi - lo + 1)) // 2  # centre the box in its window
    origin = np.clip(lo - spare, 0, np.maximum(embed_size - side, 0)[:, None])
    origin[side == 0] = 0
    return side, origin.astype(np.int64)


def crop_windows(embeddings, origin, side):
    """Windows [N,C,side,side] of one embedding [1,C,e,e] (or [C,e,e]) at ``origin`` (x, y)."""
    embeddings = np.asarray(embeddings)
    grid = embeddings[0] if embeddings.ndim == 4 else embeddings
    out = np.empty((len(origin), grid.shape[0], side, side), grid.dtype)
    for k, (x, y) in enumerate(np.asarray(origin, np.int64)):
        out[k] = grid[:, y:y + side, x:x + side]
    return out


def paste_windows(out, rows, window_logits, origin, scale, fill):
    """Write window logits [n,1,h,w] into ``out[rows]`` ([N,m,m] frame), ``fill`` elsewhere;
    ``scale`` = low-resolution pixels per embedding cell."""
    height, width = window_logits.shape[-2:]
    for k, row in enumerate(rows):
        x, y = (int(v) * scale for v in origin[k])
        out[row] = fill
        out[row, y:y + height, x:x + width] = window_logits[k, 0]
    return out


def point_windows(points, embed_size, stride, side):
    """Origin [N,2] int (x, y), in embedding cells, of the ``side`` x ``side`` window each point
    prompt (xy in the encoder frame, [N,2]) is decoded on: centred on the point's cell, pushed
    inside the grid at tile borders. The grid pipeline and decoder training share this rule."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    limit = embed_size * stride - 1
    cells = np.floor(np.clip(np.nan_to_num(points), 0, limit) / stride).astype(np.int64)
    return np.clip(cells - side // 2, 0, max(embed_size - side, 0)).astype(np.int64)


def cut_by_window(window_logits, origin, side, embed_size):
    """[n] bool: the mask (logit > 0) of window logits [n,1,h,w] (windows of ``side`` cells at
    ``origin``) reaches a side of its window that is not the embedding grid's border, so part
    of the cell may lie outside the window (the grid pipeline decodes those again, whole)."""
    hot = np.asarray(window_logits)[:, 0] > 0
    origin = np.asarray(origin, np.int64).reshape(-1, 2)
    inner = np.stack([origin[:, 1] > 0, origin[:, 0] > 0, origin[:, 1] + side < embed_size, origin[:, 0] + side < embed_size], 1)
    edges = np.stack([hot[:, 0, :].any(1), hot[:, :, 0].any(1), hot[:, -1, :].any(1), hot[:, :, -1].any(1)], 1)
    return (inner & edges).any(1)
