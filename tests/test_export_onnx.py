"""Vision / region graphs -> ONNX (and Core ML): I/O contract and parity with torch."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch

from chatspot_edge.export.onnx_vision import export_region_onnx, export_vision_onnx, onnx_session
from chatspot_edge.model.presets import build_preset


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref| (elementwise ratios blow up at zeros)."""
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))


@pytest.fixture(scope="module")
def tiny():
    return build_preset("tiny")[0]


@pytest.fixture(scope="module")
def graphs(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    export_vision_onnx(tiny, d / "vision.onnx")
    export_region_onnx(tiny, d / "region.onnx")
    return d


def test_vision_graph_contract(graphs):
    m = onnx.load(str(graphs / "vision.onnx"))
    onnx.checker.check_model(m, full_check=True)
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in m.graph.input] == ["image"]
    assert [o.name for o in m.graph.output] == ["image_embeds"]
    t = m.graph.input[0].type.tensor_type
    assert t.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in t.shape.dim] == [1, 64, 64, 3]
    o = m.graph.output[0].type.tensor_type
    assert o.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value for d in o.shape.dim] == [1, 16, 64]
    assert not list(graphs.glob("*.data"))  # weights inline (< 2 GB)


def test_vision_matches_torch(tiny, graphs):
    sess = onnx_session(graphs / "vision.onnx")
    rng = np.random.default_rng(0)
    for _ in range(3):
        img = rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
        got = sess.run(["image_embeds"], {"image": img})[0]
        with torch.no_grad():
            ref = tiny.encode_image(torch.from_numpy(img)).numpy()
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert rel_err(got, ref) <= 1e-5


def test_region_graph_matches_torch_dynamic_r(tiny, graphs):
    m = onnx.load(str(graphs / "region.onnx"))
    onnx.checker.check_model(m, full_check=True)
    assert [i.name for i in m.graph.input] == ["image_embeds", "boxes", "image"]
    assert [o.name for o in m.graph.output] == ["region_embeds"]
    sess = onnx_session(graphs / "region.onnx")
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((1, 16, 64)).astype(np.float32)
    image = rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    for r in (1, 3, 7):
        xy = rng.random((r, 2, 2)).astype(np.float32)
        boxes = np.concatenate([xy.min(1), xy.max(1)], 1)  # x1,y1,x2,y2
        boxes[0, 2:] = boxes[0, :2]  # a point
        got = sess.run(["region_embeds"], {"image_embeds": emb, "boxes": boxes, "image": image})[0]
        with torch.no_grad():
            ref = tiny.region(torch.from_numpy(emb), torch.from_numpy(boxes), torch.from_numpy(image)).numpy()
        assert got.shape == (r, 64)
        assert rel_err(got, ref) <= 1e-5


def test_coreml_package(tiny, tmp_path):
    pytest.importorskip("coremltools")
    from chatspot_edge.export.coreml_vision import check_coreml_spec, export_vision_coreml

    entry = export_vision_coreml(tiny, tmp_path / "vision.mlpackage")
    assert entry["precision"] == "fp16" and entry["input_dtype"] == "int32"
    check_coreml_spec(tmp_path / "vision.mlpackage", 64, 64, 16, 64)
    if sys.platform != "darwin":
        pytest.skip("Core ML prediction needs macOS (spec validated on Linux)")
    import coremltools as ct

    ml = ct.models.MLModel(str(tmp_path / "vision.mlpackage"))
    img = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    got = ml.predict({"image": img.astype(np.int32)})["image_embeds"]
    with torch.no_grad():
        ref = tiny.encode_image(torch.from_numpy(img)).numpy()
    assert rel_err(got, ref) <= 1e-2
