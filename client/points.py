"""Point prompts: one prompt per cell, made of its positive (label 1) and negative (label 0) points.

``segment --points CSV`` reads them from a file with the header ``x,y`` and the optional columns
``label`` (1 positive, the default; 0 negative) and ``cell``, coordinates in input pixels (x the
column, y the row; fractions allowed). Without ``cell`` every point is a cell of its own; rows that
share a ``cell`` value are one prompt for one cell. Every cell needs a positive point and has at
most ``MAX_PROMPT_POINTS``. Prompts are padded to the longest with label -1, SAM's "not a point".
Problems are one-line `UserError`s naming the file and line (or the cell).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np

from cellsam_triton.contracts import MAX_PROMPT_POINTS
from cellsam_triton.errors import UserError

POINT_COLUMNS = ("x", "y", "label", "cell")
PAD_LABEL = -1.0


@dataclass(frozen=True)
class PointPrompts:
    """K prompts of P points: ``coords`` float32 [K,P,2] xy in input pixels, ``labels`` float32
    [K,P] (1, 0, or -1 for padding, after a prompt's points) and ``names``, what an error message
    calls each cell. Made by :func:`point_prompts`."""

    coords: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.coords)

    def extents(self) -> np.ndarray:
        """[K,4] float32 xyxy pixel extent of each cell's points (x1/y1 exclusive), padding left out:
        a cell goes to a tile as a box with this extent would (``lite_rules.assign_boxes``)."""
        real = (self.labels >= 0)[..., None]
        low = np.where(real, self.coords, np.inf).min(axis=1)
        high = np.where(real, self.coords, -np.inf).max(axis=1)
        return np.concatenate([low, high + 1], axis=1).astype(np.float32).reshape(-1, 4)

    def seeds(self, indices: Sequence[int]) -> list[np.ndarray]:
        """The pixels (row, col) [n,2] int of the positive points of each prompt at ``indices``:
        where a prompt's cell must lie when masks are painted (``labels.paint_seeded``)."""
        out = []
        for k in indices:
            positive = self.coords[k][self.labels[k] == 1]
            out.append(np.floor(positive[:, ::-1]).astype(np.int64))
        return out

    def check_inside(self, shape: tuple[int, ...]) -> None:
        """A `UserError` naming the first point outside an image of ``shape`` (H, W, ...)."""
        height, width = shape[:2]
        x, y = self.coords[..., 0], self.coords[..., 1]
        outside = (self.labels >= 0) & ((x < 0) | (y < 0) | (x >= width) | (y >= height))
        if outside.any():
            k, p = np.argwhere(outside)[0]
            raise UserError(f"{self.names[k]}: point ({x[k, p]:g}, {y[k, p]:g}) lies outside the image "
                            f"({width} x {height} pixels)")

    def frame(self, scale: tuple[float, float] = (1.0, 1.0), offset: tuple[float, float] = (0.0, 0.0),
              indices: Sequence[int] | None = None) -> "PointPrompts":
        """The prompts (all, or those at ``indices``) in another frame: xy * scale - offset (a resized
        image or the encoder frame scales as boxes do; a tile's frame starts at its offset)."""
        keep = np.arange(len(self)) if indices is None else np.asarray(indices, np.int64)
        coords = self.coords[keep] * np.float32(scale) - np.float32(offset)
        return PointPrompts(coords.astype(np.float32), self.labels[keep], tuple(self.names[k] for k in keep))


def point_prompts(
    xy: np.ndarray, labels: np.ndarray | None = None, cells: Sequence[Hashable] | None = None,
    rows: Sequence[str] | None = None, source: str = "points",
) -> PointPrompts:
    """Prompts from N points: ``xy`` [N,2] input pixels, ``labels`` [N] 1/0 (default all 1),
    ``cells`` [N] (points with equal values are one cell, cells in order of first appearance;
    default: each point a cell). ``rows`` name the points in messages (default "``source`` point i")."""
    xy = np.asarray(xy, np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise UserError(f"{source}: points must be [N,2] (x, y), got shape {xy.shape}")
    if len(xy) == 0:
        raise UserError(f"{source}: no points given")
    rows = rows or [f"{source} point {i + 1}" for i in range(len(xy))]
    labels = np.ones(len(xy)) if labels is None else np.asarray(labels, np.float64).reshape(-1)
    if len(labels) != len(xy) or (cells is not None and len(cells) != len(xy)):
        raise UserError(f"{source}: {len(xy)} points but {len(labels)} labels" + ("" if cells is None else f" and {len(cells)} cells"))
    for i in range(len(xy)):
        if not np.isfinite(xy[i]).all():
            raise UserError(f"{rows[i]}: NaN or infinite coordinate ({xy[i, 0]:g}, {xy[i, 1]:g})")
        if labels[i] not in (0.0, 1.0):
            raise UserError(f"{rows[i]}: label must be 1 (positive) or 0 (negative), got {labels[i]:g}")
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(range(len(xy)) if cells is None else cells):
        groups.setdefault(key, []).append(i)
    names = tuple(rows[members[0]] if cells is None else f"{source} cell {key!r}" for key, members in groups.items())
    for name, members in zip(names, groups.values()):
        if not labels[members].any():
            raise UserError(f"{name}: no positive point (label 1); a cell needs one" +
                            (" (negative points join a positive one through the 'cell' column)" if cells is None else ""))
        if len(members) > MAX_PROMPT_POINTS:
            raise UserError(f"{name}: {len(members)} points; at most {MAX_PROMPT_POINTS} a cell")
    width = max(len(m) for m in groups.values())
    coords = np.zeros((len(groups), width, 2), np.float32)
    padded = np.full((len(groups), width), PAD_LABEL, np.float32)
    for k, members in enumerate(groups.values()):
        coords[k, :len(members)] = xy[members]
        padded[k, :len(members)] = labels[members]
    return PointPrompts(coords, padded, names)


def as_point_prompts(points: "PointPrompts | np.ndarray | Sequence") -> PointPrompts:
    """``points`` as prompts: a `PointPrompts` as it is, else [N,2] xy positive points, one cell each."""
    return points if isinstance(points, PointPrompts) else point_prompts(np.asarray(points, np.float64))


def read_points_csv(path: str | Path) -> PointPrompts:
    """Prompts from a points CSV (see the module docstring); one-line `UserError`s name the file and line."""
    from .writers import prompt_csv_lines

    path = Path(path)
    lines = prompt_csv_lines(path, "points")
    if not lines:
        raise UserError(f"{path}: empty points file; expected a header x,y[,label][,cell] and one point a line")
    header = [cell.strip().lower() for cell in lines[0][1].split(",")]
    unknown = [name for name in header if name not in POINT_COLUMNS]
    if unknown or len(set(header)) != len(header):
        problem = f"unknown column {unknown[0]!r}" if unknown else "a column named twice"
        raise UserError(f"{path}: points header must name columns x,y and optionally label,cell; got {lines[0][1].strip()!r} ({problem})")
    missing = [name for name in ("x", "y") if name not in header]
    if missing:
        raise UserError(f"{path}: points header has no {missing[0]!r} column (got {lines[0][1].strip()!r})")
    if len(lines) == 1:
        raise UserError(f"{path}: no points (only the header)")
    column = {name: header.index(name) for name in header}
    values, rows = [], []
    for number, line in lines[1:]:
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) != len(header):
            raise UserError(f"{path}:{number}: expected {len(header)} values, got {len(cells)}")
        try:
            numbers = [float(cells[column[name]]) for name in ("x", "y", "label") if name in column]
        except ValueError:
            raise UserError(f"{path}:{number}: not a number in {line.strip()!r}") from None
        if "cell" in column and not cells[column["cell"]]:
            raise UserError(f"{path}:{number}: empty cell value in {line.strip()!r}")
        values.append((numbers, cells[column["cell"]] if "cell" in column else None))
        rows.append(f"{path}:{number}")
    xy = np.array([v[0][:2] for v in values], np.float64)
    labels = np.array([v[0][2] for v in values], np.float64) if "label" in column else None
    cells = [v[1] for v in values] if "cell" in column else None
    return point_prompts(xy, labels, cells, rows, source=str(path))
