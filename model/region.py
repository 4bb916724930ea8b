"""Region embedding: what a region looks like, as one extra embedding after its `</box>` (Ferret / GPT4RoI).

It is an addition to ChatSpot's text coordinates: the coordinates stay in the prompt, and one embedding
follows each `</box>` (the `<region>` placeholder). It sums two views of the region:

- context: the image embeddings pooled with each grid cell's overlap with the box (elementwise ops only);
- appearance: the box cropped out of the (resized) image with bilinear sampling (RoIAlign on pixels,
  `grid_sample`, so it exports to ONNX) at 16x16 and encoded by a small conv net. Averaging over a box keeps
  neither the object's outline nor, for an object smaller than a grid cell, its colour: measured with linear
  probes on SpotWorld, box-pooled EfficientNet features gave 66% colour / 78% shape; the crop sees both.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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


CROP = 16  # side of the RoI crop, pixels


def crop_boxes(pixels: torch.Tensor, boxes: torch.Tensor, size: int = CROP, min_size: float = 0.0) -> torch.Tensor:
    """Bilinear crops of normalized boxes: pixels float `[R, 3, H, W]` (one image per box), boxes `[R, 4]`
    -> `[R, 3, size, size]`. Boxes smaller than `min_size` (points) grow around their centre."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    hw = torch.clamp((x2 - x1) / 2, min=min_size / 2)
    hh = torch.clamp((y2 - y1) / 2, min=min_size / 2)
    # sample at cell centres of a size x size grid over the box, in grid_sample's [-1, 1] coordinates
    t = (torch.arange(size, dtype=boxes.dtype, device=boxes.device) + 0.5) / size * 2 - 1  # [-1, 1]
    gx = (cx[:, None] + hw[:, None] * t) * 2 - 1  # [R, size]
    gy = (cy[:, None] + hh[:, None] * t) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(-1, size, -1), gy[:, :, None].expand(-1, -1, size)], dim=-1)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)


class RegionEncoder(nn.Module):
    """`(image_embeds [1 or R, N, d], boxes [R, 4], pixels uint8 [1 or R, H, W, 3]) -> region_embeds [R, d]`."""

    def __init__(self, hidden: int, grid: tuple[int, int], min_size: float = 0.0,
                 mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.25, 0.25, 0.25)):
        super().__init__()
        self.grid = tuple(grid)
        self.min_size = min_size
        self.proj = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        from chatspot_edge.model.vision import PixelNormalize

        self.norm = PixelNormalize(mean, std)
        self.crop_min = max(min_size, 1.0 / max(grid))
        self.appearance = nn.Sequential(  # 16x16 crop -> 4x4 x 64 -> d
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.GELU(), nn.Flatten(),
            nn.Linear(64 * (CROP // 4) ** 2, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, image_embeds: torch.Tensor, boxes: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        R = boxes.shape[0]
        w = box_cell_weights(boxes.to(image_embeds.dtype), self.grid, self.min_size)  # [R, N]
        pooled = torch.einsum("rn,rnd->rd", w, image_embeds.expand(R, -1, -1))
        img = self.norm(pixels).expand(R, -1, -1, -1)
        crops = crop_boxes(img, boxes.to(img.dtype), CROP, self.crop_min)
        return self.proj(pooled) + self.appearance(crops.to(pooled.dtype))
