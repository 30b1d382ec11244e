"""Reader for DSB-layout data sets: ``manifest.csv`` plus ``images/<id>.npz`` (image, labels).

The train/validation split is a fixed rule of the id (see :func:`split_of`), so every tool
(detector training, evaluation, benchmarks) agrees on it without a split file.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

MANIFEST = "manifest.csv"
IMAGES = "images"
VAL_PERCENT = 20
SPLIT_RULE = f"val if int(sha1(id).hexdigest()[:8], 16) % 100 < {VAL_PERCENT} else train"


@dataclass(frozen=True)
class Record:
    """One manifest row."""

    id: str
    height: int
    width: int
    kind: str
    objects: int

    @property
    def split(self) -> str:
        return split_of(self.id)


def _root(root: str | Path) -> Path:
    path = Path(root)
    if not (path / MANIFEST).is_file():
        raise UserError(f"{path} is not a DSB-layout data folder (no {MANIFEST} there)")
    return path


def load_manifest(root: str | Path) -> list[Record]:
    """All manifest rows, in file order."""
    path = _root(root) / MANIFEST
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    try:
        return [
            Record(r["id"], int(r["height"]), int(r["width"]), r.get("kind", ""), int(r.get("objects") or 0))
            for r in rows
        ]
    except (KeyError, ValueError) as exc:
        raise UserError(f"{path}: malformed manifest ({exc})") from None


def sample_path(root: str | Path, sample_id: str) -> Path:
    """Path of one sample's npz file."""
    return Path(root) / IMAGES / f"{sample_id}.npz"


def load_sample(root: str | Path, sample_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H,W,3], labels [H,W] 0 = background) of one sample."""
    path = sample_path(_root(root), sample_id)
    if not path.is_file():
        raise UserError(f"missing sample file {path}")
    with np.load(path, allow_pickle=False) as npz:
        return npz["image"], npz["labels"]


def split_of(sample_id: str) -> str:
    """"val" for about 20% of ids, "train" for the rest; a fixed rule (see SPLIT_RULE)."""
    bucket = int(hashlib.sha1(sample_id.encode()).hexdigest()[:8], 16) % 100
    return "val" if bucket < VAL_PERCENT else "train"


def data_checksum(root: str | Path, ids: list[str]) -> str:
    """sha256 over the ids (in the given order) and the bytes of their npz files."""
    base = _root(root)
    digest = hashlib.sha256()
    for sample_id in ids:
        path = sample_path(base, sample_id)
        if not path.is_file():
            raise UserError(f"missing sample file {path}")
        digest.update(sample_id.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
