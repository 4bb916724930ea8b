"""Vision encoder + projector -> `vision.onnx`, region encoder -> `region.onnx` (TorchScript-based exporter).

vision.onnx: ONE input `image` uint8 `[1, H, W, 3]` (RGB, already resized), ONE output `image_embeds`
float32 `[1, N, d]`; normalization and projector inside. region.onnx: inputs `image_embeds` float32
`[1, N, d]`, `boxes` float32 `[R, 4]` (normalized x1, y1, x2, y2; R dynamic) and the appearance source:
`crops` uint8 `[R, h, w, 4]` (models that read the original image: `model.preprocess.region_crops`, computed
outside the graph by the same function in training and in the runtime) or `image` uint8 `[1, H, W, 3]` (the
resized image; the first design); output `region_embeds` float32 `[R, d]`. Weights are stored inside the .onnx file unless the graph exceeds protobuf's 2 GB limit,
in which case they go to `<name>.data` next to it.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

OPSET = 17
PROTOBUF_LIMIT = 2_000_000_000  # bytes; over this the weights go to external data


class _Vision(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(image)


class _Region(nn.Module):
    def __init__(self, region):
        super().__init__()
        self.region = region

    def forward(self, image_embeds: torch.Tensor, boxes: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return self.region(image_embeds, boxes, source)


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_axes: dict | None = None, opset: int = OPSET) -> None:
    import onnx

    module = module.eval().float()
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = n_bytes > PROTOBUF_LIMIT
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not external:
            buf = io.BytesIO()
            torch.onnx.export(module, args, buf, input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True)
            proto = onnx.load_from_string(buf.getvalue())
            onnx.checker.check_model(proto)
            path.write_bytes(buf.getvalue())
            return
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    proto = onnx.load(str(path))
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    onnx.checker.check_model(str(path))


def export_vision_onnx(model, path: str | Path, opset: int = OPSET) -> dict[str, Any]:
    """Write the vision graph; returns its I/O description."""
    path = Path(path)
    h, w = model.config.vision.image_size
    dummy = torch.randint(0, 256, (1, h, w, 3), dtype=torch.uint8)
    _export(_Vision(model), (dummy,), path, ["image"], ["image_embeds"], None, opset)
    return {"inputs": {"image": {"dtype": "uint8", "shape": [1, h, w, 3]}},
            "outputs": {"image_embeds": {"dtype": "float32", "shape": [1, model.config.num_image_tokens,
                                                                      model.config.hidden_size]}},
            "opset": opset}


def export_region_onnx(model, path: str | Path, opset: int = OPSET) -> dict[str, Any]:
    """Write the region graph (`model.region`); returns its manifest inputs / outputs."""
    if model.region is None:
        raise ValueError("the model has no region encoder (config.region_token is false)")
    path = Path(path)
    n, d = model.config.num_image_tokens, model.config.hidden_size
    h, w = model.config.vision.image_size
    emb = torch.randn(1, n, d)
    boxes = torch.tensor([[0.1, 0.2, 0.45, 0.61], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float32)
    inputs = {
        "image_embeds": {"dtype": "float32", "shape": [1, n, d], "from": "vision image_embeds"},
        "boxes": {"dtype": "float32", "shape": ["R", 4],
                  "meaning": "normalized x1,y1,x2,y2 of each region in <region> order (a point: x1=x2, y1=y2)"},
    }
    if model.region.crop == "original":
        ch, cw = model.config.region_crop_size
        source = torch.randint(0, 256, (2, ch, cw, 4), dtype=torch.uint8)
        names, axes = ["image_embeds", "boxes", "crops"], {"boxes": {0: "R"}, "crops": {0: "R"}, "region_embeds": {0: "R"}}
        inputs["crops"] = {"dtype": "uint8", "shape": ["R", ch, cw, 4],
                           "from": "chatspot_edge.model.preprocess.region_crops(original image, boxes, (h, w)): each "
                                   "region cut out of the ORIGINAL image, aspect kept, centred on the h x w canvas; "
                                   "channels R, G, B, validity (255 inside the crop, 0 in padding)"}
    else:
        source = torch.randint(0, 256, (1, h, w, 3), dtype=torch.uint8)
        names, axes = ["image_embeds", "boxes", "image"], {"boxes": {0: "R"}, "region_embeds": {0: "R"}}
        inputs["image"] = {"dtype": "uint8", "shape": [1, h, w, 3], "from": "the vision graph's input image"}
    # GridSample (the resized-image crop) needs opset 16
    _export(_Region(model.region), (emb, boxes, source), path, names, ["region_embeds"], axes, max(opset, 16))
    return {
        "inputs": inputs,
        "outputs": {"region_embeds": {"dtype": "float32", "shape": ["R", d],
                                      "meaning": "row r replaces the r-th <region> id of the prompt"}},
        "opset": opset,
    }


def onnx_session(path: str | Path, threads: int = 2):
    """The runtime's onnxruntime session (`runtime.vision.cpu_session`), for parity checks."""
    from chatspot_edge.runtime.vision import cpu_session

    return cpu_session(path, threads)
