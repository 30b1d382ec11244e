"""Point prompts decoded on a window of the image embedding (the grid's ROI decoding), for export.

:class:`WindowPointDecoder` is :class:`~.window_decoder.WindowDecoder` (the window's own dense
positional encoding, absolute tile coordinates) with the point prompt of
:class:`~.point_decoder.PointDecoder`: (windows [N,C,w,w], origins [N,2], point_coords [N,P,2],
point_labels [N,P]) -> (low_res_masks [N,1,4w,4w], iou_predictions [N,1]). With the whole grid
as the window it is the point decoder exactly. The window of a grid point is
``model_repository/roi_windows.point_windows``.
"""

from __future__ import annotations

import torch

from .point_decoder import PointDecoder
from .window_decoder import WindowDecoder


class WindowPointDecoder(WindowDecoder):
    """(windows, origins, point_coords, point_labels) -> (low_res_masks [N,1,4w,4w], iou [N,1])."""

    embed_points = PointDecoder.embed_points

    def forward(  # type: ignore[override]
        self, windows: torch.Tensor, origins: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        src = windows + self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return self.decode_dense(src, self.window_pe(origins, windows.shape[-1]), self.embed_points(point_coords, point_labels))
