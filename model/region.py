"""Region embedding: what a region looks like and where it is, as one extra embedding per region (Ferret /
GPT4RoI).

It is an addition to the text coordinates: the coordinates stay in the prompt, and one embedding per region
(the `<region>` placeholder) sums up to three views of it:

- context: the image embeddings pooled with each grid cell's overlap with the box (elementwise ops only);
- appearance, one of two crops (`config.region_crop`):
  - "original" (presets): the box cut out of the ORIGINAL image, aspect kept, on a 32 x 128 canvas
    (`model.preprocess.region_crops`, computed outside the graph by the same function for training,
    evaluation and the runtime) and read by a small conv net that keeps the horizontal layout (a word of
    3-8 letters is ~20 px tall there: legible);
  - "resized" (the first design, kept for old checkpoints and the ablation): the box resampled out of the
    model's 224 x 224 square resize at 16 x 16 with `grid_sample` (RoIAlign on pixels); a word is a smear.
- geometry (`config.region_geometry`): the box's centre and size (`model.position.BoxGeometry`), so that two
  regions can be compared ("left of", "larger than") without decoding digits;
- relative geometry (`config.region_relative`): the box's offset, edge gaps and size ratios to the first
  region of the same question (`model.position.RelativeGeometry`; the first region's is its relation to
  itself, which depends on its size alone), so a comparison of two regions is read off the second region's
  embedding. The region graph runs once per question, so inside it the reference is simply the first box;
  training batches many questions and passes each region's reference (`reference_index`). With relation words
  (`config.region_relation_words`) the view also writes, softly, the LLM's own embedding of the relation word
  ("left", "larger", ...) that holds between the question's first region and this one, from one choice over all
  the words (the presets) or, with `config.region_relation_groups`, a position word and a size word from a choice
  each; as rows or, with `config.region_relation_gain`, at the scale of the region embedding
  (`model.position.RelationWords`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatspot_edge.model.position import BoxGeometry, RelativeGeometry

REGION_CROPS = ("resized", "original")


def reference_index(box_batch: torch.Tensor, box_segment: torch.Tensor | None = None) -> torch.Tensor:
    """`[R]` index of the first region of each region's question: the regions of sample `box_batch[r]`
    (and, for samples of several questions, of turn `box_segment[r]`) form one question; regions are in
    (batch, position) order, so the first is the one with the lowest index."""
    key = box_batch if box_segment is None else box_batch * (int(box_segment.max()) + 1) + box_segment
    _, inverse = torch.unique(key, return_inverse=True)
    order = torch.arange(key.shape[0], device=key.device)
    first = torch.full((int(inverse.max()) + 1,), key.shape[0], dtype=torch.long, device=key.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    return first[inverse]


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


class CropEncoder(nn.Module):
    """uint8 crops `[R, h, w, 4]` (RGB + validity, `model.preprocess.region_crops`) -> `[R, d]`. Three stride-2
    convolutions (32 x 128 -> 4 x 16), a 1x1 reduction, then a linear layer over the whole map, so the
    letters' left-to-right order survives (global pooling would make "stop" and "pots" alike)."""

    def __init__(self, hidden: int, size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        h, w = size
        if h % 8 or w % 8:
            raise ValueError(f"crop size {size} must be a multiple of 8")
        self.register_buffer("scale", torch.tensor([1 / (255 * s) for s in std] + [1 / 255]).view(1, 4, 1, 1),
                             persistent=False)
        self.register_buffer("shift", torch.tensor([m / s for m, s in zip(mean, std)] + [0.0]).view(1, 4, 1, 1),
                             persistent=False)
        self.convs = nn.Sequential(
            nn.Conv2d(4, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(64, 96, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(96, 128, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(128, 32, 1), nn.GELU(), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(32 * (h // 8) * (w // 8), hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        x = crops.permute(0, 3, 1, 2).to(self.scale.dtype) * self.scale - self.shift
        return self.head(self.convs(x.to(self.head[0].weight.dtype)))


class RegionEncoder(nn.Module):
    """`(image_embeds [1 or R, N, d], boxes [R, 4], source) -> region_embeds [R, d]`, where `source` is
    the crops uint8 `[R, h, w, 4]` (crop "original") or the resized image uint8 `[1 or R, H, W, 3]`
    (crop "resized")."""

    def __init__(self, hidden: int, grid: tuple[int, int], min_size: float = 0.0,
                 mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.25, 0.25, 0.25),
                 crop: str = "resized", crop_size: tuple[int, int] = (32, 128), geometry: bool = False,
                 relative: bool = False, relation_words: int = 0, relation_groups: tuple[int, ...] = (),
                 relation_gain: float = 0.0):
        super().__init__()
        if crop not in REGION_CROPS:
            raise ValueError(f"unknown region crop {crop!r} (one of {REGION_CROPS})")
        self.grid = tuple(grid)
        self.min_size = min_size
        self.crop = crop
        self.proj = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        if crop == "original":
            self.crops = CropEncoder(hidden, tuple(crop_size), mean, std)
        else:
            from chatspot_edge.model.vision import PixelNormalize

            self.norm = PixelNormalize(mean, std)
            self.crop_min = max(min_size, 1.0 / max(grid))
            self.appearance = nn.Sequential(  # 16x16 crop -> 4x4 x 64 -> d
                nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),
                nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.GELU(), nn.Flatten(),
                nn.Linear(64 * (CROP // 4) ** 2, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.geometry = BoxGeometry(hidden) if geometry else None
        self.relative = (RelativeGeometry(hidden, n_words=relation_words, groups=relation_groups, gain=relation_gain)
                         if relative else None)

    def forward(self, image_embeds: torch.Tensor, boxes: torch.Tensor, source: torch.Tensor,
                ref: torch.Tensor | None = None) -> torch.Tensor:
        """`ref` `[R]`: the index of each region's reference region (`reference_index`); None: all the boxes
        are one question's and the first is the reference (the exported graph)."""
        R = boxes.shape[0]
        w = box_cell_weights(boxes.to(image_embeds.dtype), self.grid, self.min_size)  # [R, N]
        pooled = torch.einsum("rn,rnd->rd", w, image_embeds.expand(R, -1, -1))
        out = self.proj(pooled)
        if self.crop == "original":
            out = out + self.crops(source).to(out.dtype)
        else:
            img = self.norm(source).expand(R, -1, -1, -1)
            crops = crop_boxes(img, boxes.to(img.dtype), CROP, self.crop_min)
            out = out + self.appearance(crops.to(pooled.dtype))
        if self.geometry is not None:
            out = out + self.geometry(boxes.to(out.dtype))
        if self.relative is not None:
            b = boxes.to(out.dtype)
            out = out + self.relative(b, b[ref] if ref is not None else b[:1].expand_as(b), out)
        return out


def relation_word_ids(tokenizer, words: tuple[str, ...]) -> list[list[int]]:
    """Token ids of each relation word as it appears inside a question (after a space: " left")."""
    ids = [tokenizer.encode(" " + w, add_special_tokens=False) for w in words]
    if any(not t for t in ids):
        raise ValueError(f"a relation word tokenizes to nothing: {dict(zip(words, ids))}")
    return ids


@torch.no_grad()
def init_relation_words(region: RegionEncoder, embeddings: torch.Tensor, tokenizer,
                        words: tuple[str, ...]) -> None:
    """Set the relation-word rows of `region`'s relative view (`model.position.RelationWords.rows`) to the
    LLM's input embedding rows `embeddings [V, d]` of `words` (the mean of a word's rows if it is several
    tokens)."""
    target = region.relative.words.rows if region.relative is not None and region.relative.words is not None else None
    if target is None or target.shape[0] != len(words):
        raise ValueError(f"the region encoder has no relation-word view for {len(words)} words")
    rows = torch.stack([embeddings[t].float().mean(0) for t in relation_word_ids(tokenizer, words)])
    target.copy_(rows.to(target.dtype))
