"""CellFinder-lite: a small FCOS-style cell detector on the SAM image embedding.

Reads LiteMedSAM's embedding [B,256,64,64] (one encoder pass serves detection and masks) and
predicts, at every grid location (stride 4 in the 256 tile frame, Q = 64 * 64 = 4096):

- a score in [0, 1]: ``sqrt(sigmoid(class) * sigmoid(centerness))`` (FCOS), so locations near
  a cell's centre rank first for the pipeline's score threshold and greedy box NMS;
- a box xyxy in tile pixel indices (inclusive corners, SAM/MedSAM's box-prompt convention)
  from the distances (left, top, right, bottom) to the location centre, ``exp(.) * stride``.

The trunk is a 1x1 projection and depthwise-separable residual blocks with growing dilation
(receptive field ~130 px, enough for the largest nuclei); 40-150 k parameters: it trains on a
2-core CPU in minutes and exports to ONNX with plain ops.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture of CellFinder-lite (saved beside its weights)."""

    in_channels: int = 256
    width: int = 64
    dilations: tuple[int, ...] = (1, 2, 4, 8)
    grid: int = 64
    stride: float = 4.0  # tile pixels per grid cell (256 / 64)
    max_log_distance: float = 6.0  # clamp of the box-distance exponent (exp(6) * 4 ~ 1600 px)
    pixel_width: int = 0  # channels of the pixel branch on the tile itself (0: embedding only)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DetectorConfig":
        data = dict(data)
        data["dilations"] = tuple(data["dilations"])
        return cls(**data)


def grid_centers(config: DetectorConfig) -> np.ndarray:
    """Location centres [Q,2] (x, y), row-major, in tile pixel indices (pixel i spans [i, i+1))."""
    g = np.arange(config.grid, dtype=np.float32) * config.stride + (config.stride - 1) / 2
    xs, ys = np.meshgrid(g, g, indexing="xy")
    return np.stack([xs.ravel(), ys.ravel()], -1)


class _Block(nn.Module):
    """Residual depthwise 3x3 (dilated) + pointwise conv."""

    def __init__(self, width: int, dilation: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation, groups=width)
        self.pointwise = nn.Conv2d(width, width, 1)
        self.norm = nn.GroupNorm(8, width)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.norm(self.pointwise(self.depthwise(x))))


class _PixelBranch(nn.Module):
    """The tile's own pixels [B,3,256,256] -> features at the embedding grid [B,width,64,64]: two
    stride-2 3x3 convs and one more 3x3 (receptive field 15 px: nuclear edges and stain colour the
    SAM embedding may blur), then a 1x1 projection that starts at zero (the detector's outputs are
    unchanged until training moves it)."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        half = max(8, channels // 2)
        self.convs = nn.Sequential(
            nn.Conv2d(3, half, 3, stride=2, padding=1), nn.GroupNorm(4, half), nn.GELU(),
            nn.Conv2d(half, channels, 3, stride=2, padding=1), nn.GroupNorm(8, channels), nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(8, channels), nn.GELU(),
        )
        self.project = nn.Conv2d(channels, width, 1)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.project(self.convs(image))


class CellFinderLite(nn.Module):
    """image_embeddings [B,C,64,64] (and, with a pixel branch, the tile image [B,3,256,256]) -> raw
    maps, or with :meth:`forward` the served outputs."""

    def __init__(self, config: DetectorConfig = DetectorConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.stem = nn.Sequential(nn.Conv2d(config.in_channels, w, 1), nn.GroupNorm(8, w), nn.GELU())
        self.pixels = _PixelBranch(config.pixel_width, w) if config.pixel_width else None
        self.blocks = nn.Sequential(*[_Block(w, d) for d in config.dilations])
        self.head = nn.Conv2d(w, 6, 3, padding=1)  # class, centerness, l, t, r, b
        nn.init.normal_(self.head.weight, std=0.01)
        with torch.no_grad():
            self.head.bias.zero_()
            self.head.bias[0] = -4.6  # prior probability ~0.01 of a cell centre
            self.head.bias[2:] = 0.5
        self.register_buffer("centers", torch.from_numpy(grid_centers(config)), persistent=False)

    @property
    def reads_pixels(self) -> bool:
        """Whether the detector also reads the tile image (``image`` input)."""
        return self.pixels is not None

    def raw(self, image_embeddings: torch.Tensor, image: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(class logits [B,Q], centerness logits [B,Q], distances l,t,r,b in pixels [B,Q,4])."""
        x = self.stem(image_embeddings)
        if self.pixels is not None:
            if image is None:
                raise ValueError("this CellFinder-lite reads the tile image too: pass image [B,3,256,256]")
            x = x + self.pixels(image)
        out = self.head(self.blocks(x))
        out = out.flatten(2).transpose(1, 2)  # [B,Q,6]
        log_dist = out[..., 2:].clamp(max=self.config.max_log_distance)
        return out[..., 0], out[..., 1], torch.exp(log_dist) * self.config.stride

    def boxes(self, distances: torch.Tensor) -> torch.Tensor:
        """xyxy boxes [B,Q,4] in tile pixels from distances [B,Q,4] to each location centre."""
        c = self.centers
        return torch.cat([c - distances[..., :2], c + distances[..., 2:]], dim=-1)

    def forward(self, image_embeddings: torch.Tensor, image: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pred_scores [B,Q] in [0,1], pred_boxes [B,Q,4] xyxy in the 256 tile frame)."""
        cls, ctr, dist = self.raw(image_embeddings, image)
        scores = torch.sqrt(torch.sigmoid(cls) * torch.sigmoid(ctr))
        return scores, self.boxes(dist)


def grow_detector(model: CellFinderLite, dilations: tuple[int, ...]) -> CellFinderLite:
    """A deeper copy of ``model``: its blocks, then new blocks for the rest of ``dilations`` (which
    must start with the model's own), each new block starting as the identity (its GroupNorm scale
    and shift zero, so it adds GELU(0) = 0): the grown detector's outputs equal the model's."""
    old = model.config.dilations
    if tuple(dilations[: len(old)]) != tuple(old) or len(dilations) <= len(old):
        raise ValueError(f"dilations {list(dilations)} must extend the starting detector's {list(old)}")
    config = DetectorConfig.from_dict({**model.config.to_dict(), "dilations": tuple(dilations)})
    grown = CellFinderLite(config)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("blocks.") for k in missing), (missing, unexpected)
    with torch.no_grad():
        for block in list(grown.blocks)[len(old) :]:
            block.norm.weight.zero_()
            block.norm.bias.zero_()
    return grown


def add_pixel_branch(model: CellFinderLite, channels: int) -> CellFinderLite:
    """A copy of ``model`` that also reads the tile image through a new pixel branch of ``channels``
    whose projection starts at zero: its outputs equal the model's until training moves them."""
    if model.reads_pixels:
        raise ValueError("the starting detector already has a pixel branch")
    if channels < 8 or channels % 8:
        raise ValueError(f"the pixel branch needs a positive multiple of 8 channels, got {channels}")
    config = DetectorConfig.from_dict({**model.config.to_dict(), "pixel_width": channels})
    extended = CellFinderLite(config)
    missing, unexpected = extended.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("pixels.") for k in missing), (missing, unexpected)
    return extended


def save_detector(model: CellFinderLite, path, meta: dict | None = None) -> None:
    """Weights + architecture in one torch file (``weights_only`` loadable)."""
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict(), "meta": meta or {}}, path)


def load_detector(path) -> CellFinderLite:
    """CellFinder-lite in eval mode from a file written by :func:`save_detector`."""
    import pickle

    from cellsam_triton.errors import UserError

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = CellFinderLite(DetectorConfig.from_dict(blob["config"]))
        model.load_state_dict(blob["state_dict"])
    except (OSError, KeyError, RuntimeError, TypeError, ValueError, pickle.UnpicklingError) as exc:
        raise UserError(f"{path}: not a CellFinder-lite weights file ({exc})") from None
    return model.eval()
