"""Vision encoder + projector -> `vision.mlpackage` (Core ML ML program, FP16 compute).

`coremltools.convert` of a `torch.jit.trace`. Core ML ML programs do not accept uint8 multi-array inputs
(coremltools: "dtype=uint8 is unsupported for inputs/outputs of the model"), so the input keeps its name
`image` and shape `[1, H, W, 3]` but is int32 holding the same 0..255 RGB values (exact; the graph casts
to float and normalizes as the ONNX graph does). The output `image_embeds` is float32 `[1, N, d]`.
The manifest's vision entry records this under `coreml.input_dtype`.

On Linux the package can be written and its spec read back; predictions need macOS.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

COREML_INPUT_DTYPE = "int32"
COREML_NOTE = ("Core ML ML programs reject uint8 inputs: `image` is int32 [1,H,W,3] holding the same 0..255 RGB "
               "values (cast the uint8 pixels to int32); compute precision fp16, output float32")


class _Vision(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(image)


def export_vision_coreml(model, path: str | Path) -> dict[str, Any]:
    """Write `path` (a `.mlpackage` folder); returns the manifest's `coreml` sub-entry (without `file`)."""
    import coremltools as ct

    path = Path(path)
    h, w = model.config.vision.image_size
    example = torch.randint(0, 256, (1, h, w, 3), dtype=torch.int32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(_Vision(model).eval().float(), (example,))
        ml = ct.convert(
            traced,
            inputs=[ct.TensorType(name="image", shape=(1, h, w, 3), dtype=np.int32)],
            outputs=[ct.TensorType(name="image_embeds", dtype=np.float32)],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=ct.target.iOS16,
        )
    ml.short_description = "ChatSpot Edge vision encoder + projector: RGB image -> image embeddings"
    ml.save(str(path))
    check_coreml_spec(path, h, w, model.config.num_image_tokens, model.config.hidden_size)
    return {"precision": "fp16", "input_dtype": COREML_INPUT_DTYPE, "note": COREML_NOTE}


def check_coreml_spec(path: str | Path, h: int, w: int, n: int, d: int) -> None:
    """Load the package's spec (works on Linux) and check it is an ML program with our input / output."""
    import coremltools as ct

    ml = ct.models.MLModel(str(path), skip_model_load=True)
    spec = ml.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise RuntimeError(f"{path}: not an ML program")
    ins = {i.name: i for i in spec.description.input}
    outs = {o.name: o for o in spec.description.output}
    if list(ins) != ["image"] or list(outs) != ["image_embeds"]:
        raise RuntimeError(f"{path}: inputs {list(ins)}, outputs {list(outs)}")
    if list(ins["image"].type.multiArrayType.shape) != [1, h, w, 3]:
        raise RuntimeError(f"{path}: image shape {list(ins['image'].type.multiArrayType.shape)}")
    if list(outs["image_embeds"].type.multiArrayType.shape) not in ([1, n, d], []):
        raise RuntimeError(f"{path}: image_embeds shape {list(outs['image_embeds'].type.multiArrayType.shape)}")


def coreml_can_predict() -> bool:
    return sys.platform == "darwin"
