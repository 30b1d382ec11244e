"""A tiny DSB-layout data set (bright discs) and a stand-in LiteMedSAM encoder, for training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cellsam_triton.datasets import split_of


def split_ids(count: int, split: str) -> list[str]:
    """``count`` synthetic ids that the split rule puts in ``split``."""
    found, k = [], 0
    while len(found) < count:
        candidate = f"synthetic{k:04d}"
        if split_of(candidate) == split:
            found.append(candidate)
        k += 1
    return found


def write_dataset(root: Path, ids: list[str], size: tuple[int, int] = (256, 300)) -> None:
    """A DSB-layout folder with bright discs as cells."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["id,height,width,kind,objects"]
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
    for sample_id in ids:
        labels = np.zeros(size, np.uint16)
        for n in range(1, 9):
            cy, cx, r = rng.uniform(15, size[0] - 15), rng.uniform(15, size[1] - 15), rng.uniform(4, 12)
            labels[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (labels == 0)] = n
        image = np.repeat(np.where(labels > 0, 200, 20).astype(np.uint8)[..., None], 3, axis=2)
        np.savez_compressed(root / "images" / f"{sample_id}.npz", image=image, labels=labels)
        rows.append(f"{sample_id},{size[0]},{size[1]},fluorescence,{len(np.unique(labels)) - 1}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")


def tiny_encoder_onnx(path: Path) -> Path:
    """A stand-in encoder with LiteMedSAM's interface: [1,3,256,256] -> [1,256,64,64]."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 256, 4, stride=4), torch.nn.Tanh()).eval()
    torch.onnx.export(net, (torch.rand(1, 3, 256, 256),), str(path), input_names=["image"], output_names=["image_embeddings"], dynamo=False)
    return path
