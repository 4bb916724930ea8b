"""Vision encoder backends for a bundle: ONNX Runtime everywhere, Core ML on macOS.

Contract (SPEC section 3): input `image` uint8 `[1, H, W, 3]` (already resized with the manifest's filter),
output `image_embeds` float32 `[1, N, d]`.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from chatspot_edge.errors import BundleError, InputError


def cpu_session(path: str | Path, threads: int | None = 2):
    """An onnxruntime CPU session as the runtime uses it (full graph optimization, `threads` intra-op
    threads, no busy-waiting workers: they would compete with llama.cpp for the same cores)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _load(path: Path, threads: int | None):
    try:
        return cpu_session(path, threads)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise BundleError(f"{path}: onnxruntime cannot load this graph ({e})") from None


class OnnxVision:
    def __init__(self, path: Path, threads: int | None = None):
        self.session = _load(path, threads)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.output_shape = outputs[0].shape
        self.input_type = inputs[0].type

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        x = pixels[None] if pixels.ndim == 3 else pixels
        if "uint8" not in self.input_type:
            x = x.astype(np.float32)
        return self.session.run([self.output_name], {self.input_name: x})[0]


class CoreMLVision:
    def __init__(self, path: Path):
        if platform.system() != "Darwin":
            raise InputError("Core ML prediction runs on macOS only; use vision_backend='onnxruntime' here")
        import coremltools as ct

        self.model = ct.models.MLModel(str(path))
        self.output_shape = None

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        x = pixels[None] if pixels.ndim == 3 else pixels
        out = self.model.predict({"image": x})
        return np.asarray(out["image_embeds"], dtype=np.float32)


class OnnxRegion:
    """`region.onnx`: (image_embeds `[1, N, d]`, boxes `[R, 4]` normalized, and the appearance source:
    `crops` uint8 `[R, h, w, 4]` cut from the original image, or `image` uint8 `[1, H, W, 3]` resized)
    -> region_embeds `[R, d]`. Inputs are fed by name; crops are made here, from `original`, by the
    function training used (`model.preprocess.region_crops`)."""

    def __init__(self, path: Path, threads: int | None = None):
        self.path = Path(path)
        self.session = _load(path, threads)
        self.names = [i.name for i in self.session.get_inputs()]
        self.output = self.session.get_outputs()[0].name
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        self.crop_size = tuple(shapes["crops"][1:3]) if "crops" in shapes else None
        if self.crop_size is not None and not all(isinstance(v, int) for v in self.crop_size):
            raise BundleError(f"{path}: region graph input `crops` needs a fixed [R, h, w, 4] shape, has {shapes['crops']}")

    def __call__(self, image_embeds: np.ndarray, boxes: np.ndarray, image: np.ndarray, original=None) -> np.ndarray:
        """`image`: the resized uint8 `[H, W, 3]` the vision graph saw; `original`: the original image (PIL
        or uint8 array; `model.preprocess.region_source`), which graphs with a `crops` input read."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        values = {"image_embeds": image_embeds[None] if image_embeds.ndim == 2 else image_embeds, "boxes": boxes,
                  "image": image[None] if image.ndim == 3 else image}
        if self.crop_size is not None:
            if original is None:
                raise BundleError(f"{self.path}: this region graph reads crops of the original image; none was given")
            from chatspot_edge.model.preprocess import region_crops

            values["crops"] = region_crops(original, boxes, self.crop_size)
        missing = [n for n in self.names if n not in values]
        if missing:
            raise BundleError(f"region graph wants inputs {missing} this runtime does not know")
        feed = {n: values[n] for n in self.names}
        return self.session.run([self.output], feed)[0].reshape(len(boxes), -1)
