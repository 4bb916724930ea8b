"""ChatSpotConfig: everything needed to rebuild a ChatSpot model from `config.json` (SPEC section 2).

Coordinate and shape conventions used across the model:
- images enter as uint8 RGB `[B, H, W, 3]`, already resized to `image_size` (H, W) with `resize` filter;
- the vision encoder yields a feature grid `[B, grid_h * grid_w, C]` (row-major) that the projector maps to
  `[B, N, d]`, N = `num_image_tokens`, d = the LLM hidden size;
- regions are normalized (x1, y1, x2, y2) boxes in [0, 1] of the original image (which the square resize
  maps linearly onto the grid, so normalized coordinates stay valid).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ARCHITECTURE = "ChatSpotEdgeForConditionalGeneration"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class VisionConfig:
    """kind: "tiny_conv" (random, tests), "efficientnet_lite0" (ImageNet weights), "clip" / "siglip" (HF LLaVA towers)."""

    kind: str = "tiny_conv"
    image_size: tuple[int, int] = (64, 64)  # (H, W)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channels: int = 32  # feature channels C of the grid the projector sees
    grid: tuple[int, int] = (4, 4)  # (grid_h, grid_w) of the image tokens
    pool: int = 1  # average-pool factor applied to the encoder's map before the projector
    stride: int = 16  # encoder output stride before pooling (documentation + checks)
    multiscale: bool = False  # EfficientNet: also the half-stride map, pooled to the output grid
    merge: str = "avg"  # how `pool` x `pool` cells become one token: "avg" (average) or "shuffle" (stacked
    # channels, pixel-unshuffle: the token keeps its 4 sub-cells apart, `channels` counts them all)
    # HF towers only
    hf_config: dict[str, Any] | None = None
    feature_layer: int | list[int] = -2
    select_strategy: str = "default"  # LLaVA: "default" drops CLS, "full" keeps it

    @property
    def num_tokens(self) -> int:
        n = self.grid[0] * self.grid[1]
        if self.kind in ("clip", "siglip"):  # patches, + CLIP's CLS token, - the first token under "default"
            n += (1 if self.kind == "clip" else 0) - (1 if self.select_strategy == "default" else 0)
        return n


@dataclass
class ChatSpotConfig:
    preset: str
    vision: VisionConfig
    text: dict[str, Any]  # transformers LlamaConfig.to_dict() of the LLM
    projector: str = "mlp2x_gelu"  # "mlp2x_gelu" (LLaVA-1.5) or "linear"
    projector_bias: bool = True
    region_token: bool = True  # one extra region embedding per region (see model.region)
    region_placement: str = "after_box"  # "after_box" or "before_answer" (referring.with_region_tokens)
    region_min_size: float = 0.0  # a region smaller than this (normalized) is grown to it; 0 = one grid cell
    region_crop: str = "resized"  # region appearance: "original" (aspect-kept crop of the original image) or
    # "resized" (16x16 RoI of the model's square resize; the first design); see model.region
    region_crop_size: tuple[int, int] = (32, 128)  # (h, w) canvas of the "original" crop
    region_geometry: bool = False  # add the box's centre / size embedding to each region embedding
    region_relative: bool = False  # add the box's geometry relative to its question's first region
    # relation words the relative view may write into a region embedding (model.position.RelationWords); () = none
    region_relation_words: tuple[str, ...] = ()
    # word count of each separate choice among them (model.position.RELATION_GROUPS); () = one choice over all
    region_relation_groups: tuple[int, ...] = ()
    # > 0: the words are written at the region embedding's scale, with a learned gain starting here; 0: as rows
    region_relation_gain: float = 0.0
    position_2d: bool = False  # add each image token's 2D cell-centre embedding in the projector (model.position)
    image_token_id: int = -1
    box_start_id: int = -1
    box_end_id: int = -1
    region_token_id: int = -1
    # referring format (SPEC 1 / 1b): {"format": "chatspot-text-v1"} or {"format": "chatspot-loc-v1", "bins": N,
    # "loc_token_id": id of `<loc_0>` (the N ids are consecutive)}; see model.loc_tokens.set_referring
    referring: dict[str, Any] = field(default_factory=lambda: {"format": "chatspot-text-v1"})
    pad_token_id: int = 0
    eos_token_id: int = 2
    system_prompt: str = ""
    prompt_template: str = ""  # holds "{system}", "{image}" and "{question}"; see model.prompt
    assistant_end: str = ""  # text that closes an assistant turn (the stop string)
    turn_template: str = ""  # a later user turn in a multi-turn chat, with "{question}"
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.text["hidden_size"])

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_tokens

    @property
    def referring_format(self):
        """The `chatspot_edge.referring.ReferringFormat` this model speaks."""
        from chatspot_edge.referring import ReferringFormat

        return ReferringFormat.from_dict(self.referring)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["architectures"] = [ARCHITECTURE]
        d["model_type"] = "chatspot_edge"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChatSpotConfig":
        d = dict(d)
        d.pop("architectures", None)
        d.pop("model_type", None)
        v = dict(d.pop("vision"))
        for k in ("image_size", "mean", "std", "grid"):
            if k in v and v[k] is not None:
                v[k] = tuple(v[k])
        for k in ("region_crop_size", "region_relation_words", "region_relation_groups"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        known = set(cls.__dataclass_fields__)
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown config keys: {sorted(extra)}")
        return cls(vision=VisionConfig(**v), **d)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> "ChatSpotConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
