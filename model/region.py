"""Region embedding: image embeddings pooled inside a region's box, then projected (Ferret / GPT4RoI style).

It is an addition to ChatSpot's text coordinates: the coordinates stay in the prompt, and one extra
embedding follows each `</box>` (the `<region>` placeholder). Pooling weights are the overlap of each grid
cell with the box, so the module is differentiable and exports to ONNX with elementwise ops only.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def box_cell_weights(boxes: torch.Tensor, grid: tuple[int, int], min_size: float = 0.0) -> torch.Tensor:
    """Overlap weights of normalized boxes with a row-major grid.

    boxes: `[R, 4]` (x1, y1, x2, y2) in [0, 1]; returns `[R, gh * gw]`, each row summing to 1. A box smaller
    than one cell (a point) is grown around its center to `max(min_size, 1 cell)`."""
    gh, gw = grid
    x1, y1, x2, y2 = boxes.unbind(-1)
    min_w = max(min_size, 1.0 / gw)
    min_h = max(min_size, 1.0 / gh)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half_w = torch.clamp((x2 - x1) / 2, min=min_w / 2)
    half_h = torch.clamp((y2 - y1) / 2, min=min_h / 2)
    x1, x2 = cx - half_w, cx + half_w
    y1, y2 = cy - half_h, cy + half_h
    xs = torch.arange(gw, dtype=boxes.dtype, device=boxes.device) / gw  # cell left edges
    ys = torch.arange(gh, dtype=boxes.dtype, device=boxes.device) / gh
    wx = torch.clamp(torch.minimum(x2[:, None], xs + 1.0 / gw) - torch.maximum(x1[:, None], xs), min=0.0)
    wy = torch.clamp(torch.minimum(y2[:, None], ys + 1.0 / gh) - torch.maximum(y1[:, None], ys), min=0.0)
    w = (wy[:, :, None] * wx[:, None, :]).reshape(boxes.shape[0], gh * gw)
    return w / torch.clamp(w.sum(-1, keepdim=True), min=1e-12)


class RegionEncoder(nn.Module):
    """`(image_embeds [R, N, d] or [1, N, d], boxes [R, 4]) -> region_embeds [R, d]`."""

    def __init__(self, hidden: int, grid: tuple[int, int], min_size: float = 0.0):
        super().__init__()
        self.grid = tuple(grid)
        self.min_size = min_size
        self.proj = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, image_embeds: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        w = box_cell_weights(boxes.to(image_embeds.dtype), self.grid, self.min_size)  # [R, N]
        pooled = torch.einsum("rn,rnd->rd", w, image_embeds.expand(boxes.shape[0], -1, -1))
        return self.proj(pooled)
