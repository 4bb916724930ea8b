"""The relative-geometry view of the region embedding (`config.region_relative`): each region placed relative to
its question's first region, the same in training's batches, in the exported region graph (one question per
call) and when added to a trained checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chatspot_edge.model.position import RelativeGeometry, relative_features
from chatspot_edge.model.presets import build_preset
from chatspot_edge.model.region import reference_index


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero weights everywhere (the view's output layer starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_reference_index_groups_regions_by_image_and_turn():
    box_batch = torch.tensor([0, 0, 0, 1, 1, 2])
    assert reference_index(box_batch).tolist() == [0, 0, 0, 3, 3, 5]
    box_segment = torch.tensor([1, 1, 3, 2, 2, 1])  # image 0: turn 1 has two regions, turn 3 one
    assert reference_index(box_batch, box_segment).tolist() == [0, 0, 2, 3, 3, 5]


def test_relative_features_say_left_right_above_below_and_size():
    ref = torch.tensor([[0.4, 0.4, 0.6, 0.6]])
    boxes = torch.tensor([[0.1, 0.45, 0.2, 0.55],   # wholly left, smaller
                          [0.7, 0.4, 0.9, 0.6],     # wholly right, same size
                          [0.4, 0.05, 0.6, 0.25],   # wholly above
                          [0.5, 0.8, 0.5, 0.8]])    # a point below (zero size: finite)
    f = relative_features(boxes, ref.expand(4, 4))
    dx, dy, right_gap, left_gap, below_gap, above_gap, log_w, log_h, log_a = f[:, :9].unbind(-1)
    assert torch.isfinite(f).all() and f.shape == (4, 9 + 4 * 4)
    assert dx[0] < 0 and left_gap[0] > 0 and right_gap[0] < 0 and log_a[0] < 0
    assert dx[1] > 0 and right_gap[1] > 0 and left_gap[1] < 0 and abs(float(log_a[1])) < 1e-6
    assert dy[2] < 0 and above_gap[2] > 0 and below_gap[2] < 0
    assert dy[3] > 0 and below_gap[3] > 0
    same = relative_features(ref, ref)
    assert same[0, 0] == 0 and same[0, 1] == 0 and torch.allclose(same[0, 6:9], torch.zeros(3))


def test_view_starts_at_zero_and_learns_left_of_right():
    """Its output starts at zero (adding it changes nothing), and a linear readout of it learns which of two
    boxes is further left within a few hundred steps (the comparison a relation question asks)."""
    torch.manual_seed(0)
    view = RelativeGeometry(32)
    g = torch.Generator().manual_seed(1)

    def batch(n):
        xy = torch.rand(n, 2, 2, generator=g) * 0.8
        wh = 0.05 + torch.rand(n, 2, 2, generator=g) * 0.15
        b = torch.cat([xy, xy + wh], -1)  # [n, 2 boxes, 4]
        label = ((b[:, 1, 0] + b[:, 1, 2]) < (b[:, 0, 0] + b[:, 0, 2])).float()  # second box further left
        return b[:, 1], b[:, 0], label

    boxes, ref, _ = batch(8)
    assert torch.equal(view(boxes, ref), torch.zeros(8, 32))
    head = torch.nn.Linear(32, 1)
    opt = torch.optim.Adam([*view.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(300):
        boxes, ref, label = batch(64)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(view(boxes, ref))[:, 0], label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    boxes, ref, label = batch(500)
    acc = ((head(view(boxes, ref))[:, 0] > 0).float() == label).float().mean()
    assert acc > 0.9


@pytest.fixture(scope="module")
def relative_model():
    model = build_preset("tiny", design={"region_relative": True})[0]
    _randomize(model.region.relative)
    return model.eval()


def test_batched_questions_equal_one_question_at_a_time(relative_model):
    """Training encodes the regions of many questions in one call (`box_batch`, `box_segment`); the runtime's
    region graph sees one question at a time. Each region's embedding must be the same either way."""
    model = relative_model
    rng = np.random.default_rng(0)
    emb = torch.randn(2, 16, 64)
    ch, cw = model.config.region_crop_size
    xy = torch.from_numpy(rng.random((6, 2, 2)).astype(np.float32))
    boxes = torch.cat([xy.min(1).values, xy.max(1).values], 1)
    crops = torch.from_numpy(rng.integers(0, 256, (6, ch, cw, 4), dtype=np.uint8))
    box_batch = torch.tensor([0, 0, 0, 1, 1, 1])
    box_segment = torch.tensor([1, 1, 2, 1, 3, 3])  # questions: {0, 1}, {2}, {3}, {4, 5}
    with torch.no_grad():
        batched = model.encode_regions(emb, boxes, box_batch, crops=crops, box_segment=box_segment)
        for q in ([0, 1], [2], [3], [4, 5]):
            alone = model.region(emb[box_batch[q[0]]][None], boxes[q], crops[q])
            assert torch.allclose(batched[q], alone, atol=1e-5), q
        # the view matters: placed relative to image 0's first region, question {2} would differ
        wrong = model.encode_regions(emb, boxes, box_batch, crops=crops)
    assert not torch.allclose(wrong[2], batched[2], atol=1e-3)


def test_region_graph_places_boxes_relative_to_the_first(relative_model, tmp_path):
    from chatspot_edge.export.onnx_vision import export_region_onnx, onnx_session
    from chatspot_edge.model.preprocess import region_crops

    model = relative_model
    export_region_onnx(model, tmp_path / "region.onnx")
    sess = onnx_session(tmp_path / "region.onnx")
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((1, 16, 64)).astype(np.float32)
    original = rng.integers(0, 256, (90, 170, 3), dtype=np.uint8)
    for r in (1, 2, 4):
        xy = rng.random((r, 2, 2)).astype(np.float32)
        boxes = np.concatenate([xy.min(1), xy.max(1)], 1)
        crops = region_crops(original, boxes, model.config.region_crop_size)
        got = sess.run(["region_embeds"], {"image_embeds": emb, "boxes": boxes, "crops": crops})[0]
        with torch.no_grad():
            ref = model.encode_regions(torch.from_numpy(emb), torch.from_numpy(boxes),
                                       torch.zeros(r, dtype=torch.long), crops=torch.from_numpy(crops)).numpy()
        assert np.abs(got - ref).max() <= 1e-5 * max(np.abs(ref).max(), 1.0)


def test_encode_conversation_numbers_each_questions_regions():
    from chatspot_edge.model.processor import Processor

    model, tok = build_preset("tiny")
    conv = [{"from": "human", "value": "<image>\n<box>[0.1,0.1,0.2,0.2]</box> <box>[0.5,0.5,0.6,0.6]</box> left?"},
            {"from": "gpt", "value": "yes"},
            {"from": "human", "value": "What is <box>[0.3,0.3,0.4,0.4]</box>?"}, {"from": "gpt", "value": "a cat"}]
    enc = Processor(tok, model.config).encode_conversation(conv)
    assert enc.box_segments == [1, 1, 2]


def test_init_with_region_relative_adds_the_view_without_changing_the_model(tmp_path):
    """`adapt --init CKPT --region-relative` gives a trained checkpoint the view: zero at first, so the logits are
    the checkpoint's; saved in the config; a warm start from a checkpoint without it copies the rest."""
    from chatspot_edge.model.checkpoint import load_checkpoint, save_checkpoint
    from chatspot_edge.train.adapt import AdaptOptions, _build_model, warm_start_from

    plain, tok = build_preset("tiny", seed=2, design={"region_relative": False})  # a checkpoint from before the view
    assert plain.region.relative is None
    save_checkpoint(plain, tok, tmp_path / "plain")
    opts = AdaptOptions(preset="tiny", data=tmp_path, out=tmp_path / "x", init=tmp_path / "plain",
                        design={"region_relative": True})
    model, tok2 = _build_model(opts)
    assert model.region.relative is not None and model.config.region_relative
    ids = torch.tensor([[model.config.image_token_id] * 16 + [5, model.config.region_token_id, model.config.region_token_id, 7]])
    px = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8))
    boxes = torch.tensor([[0.1, 0.1, 0.3, 0.4], [0.5, 0.2, 0.9, 0.6]])
    from chatspot_edge.model.preprocess import region_crops

    crops = torch.from_numpy(region_crops(px[0].numpy(), boxes.numpy(), model.config.region_crop_size))
    with torch.no_grad():
        a = plain.eval()(ids, pixels=px, boxes=boxes, box_batch=torch.zeros(2, dtype=torch.long), crops=crops).logits
        b = model.eval()(ids, pixels=px, boxes=boxes, box_batch=torch.zeros(2, dtype=torch.long), crops=crops).logits
    assert torch.equal(a, b)
    save_checkpoint(model, tok2, tmp_path / "rel")
    assert json.loads((tmp_path / "rel" / "config.json").read_text())["region_relative"] is True
    reloaded, _ = load_checkpoint(tmp_path / "rel")
    assert reloaded.region.relative is not None
    fresh, _ = build_preset("tiny", seed=0, design={"region_relative": True})
    assert "region" in warm_start_from(fresh, tmp_path / "plain")["copied"]
    assert torch.equal(fresh.region.proj[0].weight, plain.region.proj[0].weight)
