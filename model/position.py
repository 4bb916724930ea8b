"""2D position and box geometry as embeddings: what lets the LLM tell WHERE an image token or a region is.

Image tokens reach the LLM in raster order with 1D rotary positions only, so without help the model cannot
tell a token of the top-left cell from one of the bottom-right cell except by counting. Each image token
therefore gets an embedding of its cell centre added in the projector (`GridPosition`, exported inside
the vision graph as a constant); each region embedding gets one of its box (`BoxGeometry`: centre, size) and,
with `RelativeGeometry`, one of where it lies relative to the first region of its question (offset, edge gaps,
size ratios), so two regions can be compared ("left of", "larger than") from one token.

Both read the same fixed Fourier basis of a normalized coordinate c in [0, 1]:

    fourier(c) = [sin(pi * f * c), cos(pi * f * c)] for f = 1, 2, 4, ..., 2**(n_freq - 1)

(`pi * f`: the lowest frequency spans the image once, without wrapping left onto right), followed by a
learned linear map to the hidden size. `loc_rows` uses the same basis to give `<loc_k>` coordinate tokens
(chatspot-loc-v1) smooth, ordered initial embeddings: neighbouring bins start similar, so the tied output
head spreads probability over nearby bins from the first step instead of treating N bins as unrelated words.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

GRID_FREQ = 4  # image-token cells: periods 2, 1, 1/2, 1/4 of the image side (cells are 1/7 apart)
BOX_FREQ = 8  # box geometry: down to a period of 1/64 (relations between nearby small boxes)


def fourier(coords: torch.Tensor, n_freq: int = BOX_FREQ) -> torch.Tensor:
    """`[..., k]` coordinates in [0, 1] -> `[..., k * 2 * n_freq]` (per coordinate: sines then cosines)."""
    freqs = math.pi * (2.0 ** torch.arange(n_freq, dtype=coords.dtype, device=coords.device))
    x = coords[..., None] * freqs  # [..., k, F]
    return torch.cat([torch.sin(x), torch.cos(x)], dim=-1).flatten(-2)


def cell_centres(grid: tuple[int, int]) -> torch.Tensor:
    """Normalized (x, y) centres `[gh * gw, 2]` of a row-major grid of (gh, gw) cells."""
    gh, gw = grid
    ys = (torch.arange(gh, dtype=torch.float32) + 0.5) / gh
    xs = (torch.arange(gw, dtype=torch.float32) + 0.5) / gw
    return torch.stack([xs.repeat(gh), ys.repeat_interleave(gw)], dim=-1)


class GridPosition(nn.Module):
    """Learned map of each grid cell's Fourier-encoded centre to the hidden size: `forward()` -> `[N, d]`,
    added to the projected image tokens. The cell centres are a buffer, so the exported graph holds them as
    constants (no new input)."""

    def __init__(self, hidden: int, grid: tuple[int, int], n_freq: int = GRID_FREQ, scale: float = 1.0):
        super().__init__()
        self.n_freq = n_freq
        self.register_buffer("basis", fourier(cell_centres(tuple(grid)), n_freq), persistent=False)  # [N, 4F]
        self.linear = nn.Linear(4 * n_freq, hidden, bias=False)
        nn.init.normal_(self.linear.weight, std=scale / math.sqrt(4 * n_freq))

    def forward(self) -> torch.Tensor:
        return self.linear(self.basis)


class BoxGeometry(nn.Module):
    """`boxes [R, 4]` normalized (x1, y1, x2, y2) -> `[R, d]`: Fourier features of the centre and the size,
    plus log width, log height and log area (sizes span 1/100 to 1 of the image), through a small MLP."""

    def __init__(self, hidden: int, n_freq: int = BOX_FREQ):
        super().__init__()
        self.n_freq = n_freq
        self.mlp = nn.Sequential(nn.Linear(8 * n_freq + 3, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        x1, y1, x2, y2 = boxes.unbind(-1)
        w, h = (x2 - x1).clamp(min=0.0), (y2 - y1).clamp(min=0.0)
        centre_size = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, w, h], dim=-1)
        logs = torch.log(torch.stack([w, h, w * h], dim=-1).clamp(min=1e-4)) / math.log(1e4)  # [-1, 0]
        return self.mlp(torch.cat([fourier(centre_size, self.n_freq), logs], dim=-1))


REL_FREQ = 4  # relative geometry: centre offsets, periods 4 down to 1/2 of the image side (offsets span [-1, 1])
_REL_SIZE_FLOOR = 1e-3  # a point is a zero-size box: sizes are floored here before their log ratios


def relative_features(boxes: torch.Tensor, ref: torch.Tensor, n_freq: int = REL_FREQ) -> torch.Tensor:
    """Where box `[R, 4]` lies relative to its reference box `[R, 4]` (both normalized x1, y1, x2, y2):
    the centre offset (dx, dy, in [-1, 1]) raw and as Fourier features, the four edge gaps (x1 - ref x2:
    > 0 when the box lies wholly right of the reference; ref x1 - x2: wholly left; y1 - ref y2: below;
    ref y1 - y2: above) and the log ratios of width, height and area (in units of log 1000). -> `[R, 9 + 4F]`."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    a1, b1, a2, b2 = ref.unbind(-1)
    dx, dy = (x1 + x2 - a1 - a2) / 2, (y1 + y2 - b1 - b2) / 2
    gaps = torch.stack([x1 - a2, a1 - x2, y1 - b2, b1 - y2], dim=-1)
    w, h = (x2 - x1).clamp(min=_REL_SIZE_FLOOR), (y2 - y1).clamp(min=_REL_SIZE_FLOOR)
    rw, rh = (a2 - a1).clamp(min=_REL_SIZE_FLOOR), (b2 - b1).clamp(min=_REL_SIZE_FLOOR)
    logs = torch.stack([torch.log(w / rw), torch.log(h / rh), torch.log(w * h / (rw * rh))], dim=-1) / math.log(1e3)
    offset = torch.stack([dx, dy], dim=-1)
    # the Fourier basis reads [0, 1]: an offset in [-1, 1] is mapped there, so its lowest period (4 in offset
    # units) never wraps a left offset onto a right one
    return torch.cat([offset, gaps, logs, fourier((offset + 1) / 2, n_freq)], dim=-1)


# The relation words a region's relative view can write into its embedding (`RelationWords`): what the first
# region of a question is to this one ("the first object is left of the second"), in the words questions use,
# in groups of which one word at most holds: a pair can be "left" and "larger" at once. With
# `config.region_relation_groups` each group is a choice of its own (one choice over all six makes "larger" compete
# with the position word that also holds); measured 2026-12-07, the split makes the size word right but region
# recognition worse in 2 of 2 seeds, so the presets keep one choice (docs/results.md, "Relation words in two choices").
RELATION_GROUPS: tuple[tuple[str, ...], ...] = (("left", "right", "above", "below"), ("larger", "smaller"))
RELATION_WORDS: tuple[str, ...] = tuple(w for group in RELATION_GROUPS for w in group)
RELATION_GROUP_SIZES: tuple[int, ...] = tuple(len(g) for g in RELATION_GROUPS)
# The relation words' initial share of a region embedding's norm (`RelationWords.gain`); 0: the LLM's rows as they
# are. Measured 2026-12-07 (docs/results.md, "Relation words in two choices"): 0.5 cost 33 points of region
# recognition and made the yes / no relation answers collapse to "no", so the default writes the rows as they are.
RELATION_GAIN = 0.0


class RelationWords(nn.Module):
    """`relative_features [R, 9 + 4F] -> [R, d]`: per group of relation words (`groups`, word counts summing to
    `n_words`; () = one group of all), a soft choice of one word or "none", written with the fixed embedding
    rows `rows [n_words, d]`: the LLM's own rows for the words as they appear inside a question (" left",
    " larger"; set by `model.region.init_relation_words`, saved with the weights). A region that lies right of
    its question's first region can then carry the embedding of " left" (the first is left of it): the
    word-form answer is a copy of that row through the tied head, and "is the first object to the left of the
    second?" becomes "does the question's relation word occur in the region token", the duplicate-token match
    a pretrained LM already makes, instead of a product of a word and two coordinates.

    With `gain` > 0 the words are written at the region embedding's own scale: `gain * |region| * p @ rows /
    mean |row|`, `gain` learned from its initial value (`region` is the embedding before this view: a region
    embedding's norm is hundreds of times a word row's, 666 against 2.7 in a trained mini, so rows added as
    they are weigh 0.3% of the token the LLM reads; louder, they were measured to hurt: `RELATION_GAIN`).
    `gain` 0: the rows as they are (the default, and session-15 checkpoints)."""

    def __init__(self, hidden: int, n_in: int, n_words: int, width: int = 64, groups: tuple[int, ...] = (),
                 gain: float = 0.0):
        super().__init__()
        self.groups = tuple(groups) or (n_words,)
        if sum(self.groups) != n_words or min(self.groups) < 1:
            raise ValueError(f"relation word groups {self.groups} do not split {n_words} words")
        self.classify = nn.Sequential(nn.Linear(n_in, width), nn.GELU(),
                                      nn.Linear(width, n_words + len(self.groups)))  # each group: words, none
        nn.init.zeros_(self.classify[2].weight)  # the choice starts uniform, so every word's row gets gradient
        nn.init.zeros_(self.classify[2].bias)
        # fixed: trained, they would drift from the LLM's rows at the region encoder's learning rate
        self.register_buffer("rows", torch.zeros(n_words, hidden))
        self.gain = nn.Parameter(torch.tensor(float(gain))) if gain > 0 else None

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """`[R, n_words]`: each word's probability in its group's choice (a group's "none" takes the rest)."""
        logits = self.classify(features).float().split([g + 1 for g in self.groups], dim=-1)
        return torch.cat([torch.softmax(z, dim=-1)[:, :-1] for z in logits], dim=-1)

    def forward(self, features: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
        """`region` `[R, d]`: the region embeddings before this view, whose norm scales the words (needed when
        `gain` > 0; no gradient flows through the norm)."""
        out = self.probabilities(features).to(self.rows.dtype) @ self.rows
        if self.gain is None:
            return out
        if region is None:
            raise ValueError("relation words with a gain are written at the region embedding's scale: pass region")
        scale = region.detach().norm(dim=-1, keepdim=True).to(out.dtype)
        return out * (self.gain * scale / self.rows.norm(dim=-1).mean().clamp(min=1e-6))


class RelativeGeometry(nn.Module):
    """`(boxes [R, 4], ref [R, 4]) -> [R, d]`: each region's place and size relative to a reference region
    (the first region of its question, `model.region.reference_index`), through a small MLP whose output
    layer starts at zero (a model gains the view without changing what it computed), and with `n_words` > 0
    the relation words of `RelationWords` (in `groups`, written with `gain`). With it, "is the first region
    left of the second?" is one token's feature, not a comparison of two tokens' coordinates."""

    def __init__(self, hidden: int, n_freq: int = REL_FREQ, n_words: int = 0, groups: tuple[int, ...] = (),
                 gain: float = 0.0):
        super().__init__()
        self.n_freq = n_freq
        self.mlp = nn.Sequential(nn.Linear(9 + 4 * n_freq, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        self.words = RelationWords(hidden, 9 + 4 * n_freq, n_words, groups=groups, gain=gain) if n_words else None

    def forward(self, boxes: torch.Tensor, ref: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
        """`region` `[R, d]`: the region embeddings before this view (the scale of words with a gain)."""
        feats = relative_features(boxes, ref, self.n_freq)
        out = self.mlp(feats)
        return out if self.words is None else out + self.words(feats, region).to(out.dtype)


def loc_rows(n_bins: int, mean: torch.Tensor, scale: float, position: GridPosition | None = None,
             seed: int = 0) -> torch.Tensor:
    """Initial embedding rows `[n_bins, d]` for `<loc_0>`..`<loc_{n_bins-1}>` (chatspot-loc-v1): the mean token
    embedding plus a map of the Fourier features of each bin's centre (k + 0.5) / n_bins, scaled to RMS
    `scale` per row. The map is the image tokens' own position map when `position` is given (its x and y
    halves summed: a `<loc_k>` row then points the same way as the position code of the image cells at
    coordinate k, on either axis), else a fixed random projection. Either way adjacent bins start similar
    and distant bins dissimilar, so the tied output head spreads probability over neighbouring bins."""
    n_freq = position.n_freq if position is not None else GRID_FREQ
    centres = (torch.arange(n_bins, dtype=torch.float32) + 0.5) / n_bins
    feats = fourier(centres[:, None], n_freq)  # [n_bins, 2F]
    if position is not None:
        w = position.linear.weight.detach().float()  # [d, 4F]: x features, then y features
        proj = (w[:, : 2 * n_freq] + w[:, 2 * n_freq:]).T
    else:
        g = torch.Generator().manual_seed(seed)
        proj = torch.randn(2 * n_freq, mean.shape[-1], generator=g)
    rows = feats @ proj
    rows = rows - rows.mean(0, keepdim=True)  # the shared part is the mean embedding's job
    rows = rows / rows.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6) * scale
    return mean.to(rows.dtype)[None, :] + rows
