"""Vision / region graphs -> ONNX (and Core ML): I/O contract and parity with torch."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch

from chatspot_edge.export.onnx_vision import export_region_onnx, export_vision_onnx, onnx_session
from chatspot_edge.model.preprocess import region_crops
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
    """The presets' region graph reads crops of the original image (`crops` [R, h, w, 4], made outside the
    graph by model.preprocess.region_crops); R is dynamic."""
    m = onnx.load(str(graphs / "region.onnx"))
    onnx.checker.check_model(m, full_check=True)
    assert [i.name for i in m.graph.input] == ["image_embeds", "boxes", "crops"]
    assert [o.name for o in m.graph.output] == ["region_embeds"]
    ch, cw = tiny.config.region_crop_size
    t = m.graph.input[2].type.tensor_type
    assert t.elem_type == onnx.TensorProto.UINT8 and [d.dim_value for d in t.shape.dim][1:] == [ch, cw, 4]
    sess = onnx_session(graphs / "region.onnx")
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((1, 16, 64)).astype(np.float32)
    original = rng.integers(0, 256, (90, 170, 3), dtype=np.uint8)  # any size: crops come from the original
    for r in (1, 3, 7):
        xy = rng.random((r, 2, 2)).astype(np.float32)
        boxes = np.concatenate([xy.min(1), xy.max(1)], 1)  # x1,y1,x2,y2
        boxes[0, 2:] = boxes[0, :2]  # a point
        crops = region_crops(original, boxes, (ch, cw))
        got = sess.run(["region_embeds"], {"image_embeds": emb, "boxes": boxes, "crops": crops})[0]
        with torch.no_grad():
            ref = tiny.region(torch.from_numpy(emb), torch.from_numpy(boxes), torch.from_numpy(crops)).numpy()
        assert got.shape == (r, 64)
        assert rel_err(got, ref) <= 1e-5


def test_resized_crop_region_graph_still_exports(tmp_path):
    """The first design (16x16 RoI of the resized image, input `image`) exports and matches torch."""
    model = build_preset("tiny", design={"region_crop": "resized", "region_geometry": False, "position_2d": False})[0]
    export_region_onnx(model, tmp_path / "region.onnx")
    sess = onnx_session(tmp_path / "region.onnx")
    assert [i.name for i in sess.get_inputs()] == ["image_embeds", "boxes", "image"]
    rng = np.random.default_rng(2)
    emb = rng.standard_normal((1, 16, 64)).astype(np.float32)
    image = rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    boxes = np.array([[0.1, 0.2, 0.5, 0.7], [0.3, 0.3, 0.3, 0.3]], np.float32)
    got = sess.run(["region_embeds"], {"image_embeds": emb, "boxes": boxes, "image": image})[0]
    with torch.no_grad():
        ref = model.region(torch.from_numpy(emb), torch.from_numpy(boxes), torch.from_numpy(image)).numpy()
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
