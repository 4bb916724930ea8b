"""Grounding attention supervision (train.ground_attn): which positions it supervises, that its attention is the
layer's own, the loss in adapt's objective, and that it trains the heads it names."""

from __future__ import annotations

import json

import pytest
import torch

from chatspot_edge.errors import InputError
from chatspot_edge.model.presets import build_preset
from chatspot_edge.referring import LOC_FORMAT, ReferringFormat
from chatspot_edge.train.ground_attn import (attention_inputs, box_answer_queries, cell_mask,
                                             grounding_attention_loss, image_attention, image_positions,
                                             supervised_layers)


@pytest.fixture(scope="module")
def loc_tiny():
    return build_preset("tiny", seed=0, referring=ReferringFormat(LOC_FORMAT, 8))


@pytest.fixture(scope="module")
def loc_batch(loc_tiny, tmp_path_factory):
    """A collated adapt batch of SpotWorld records (8 questions per image as turns), with box answers in it."""
    from chatspot_edge.data import generate, load_split
    from chatspot_edge.model.processor import Processor
    from chatspot_edge.train.adapt import Batches

    model, tok = loc_tiny
    data = tmp_path_factory.mktemp("ga") / "sw"
    generate(data, seed=3, n_train=8, n_test=0, workers=1)
    records = load_split(data, "train")
    proc = Processor(tok, model.config)
    batch = Batches(records, data, proc, model.config.vision.image_size, 0, 400, 8).collate(list(range(4)))
    return batch


def test_supervised_layers():
    assert supervised_layers(6) == [2, 3, 4, 5] and supervised_layers(30) == list(range(10, 30))
    assert supervised_layers(2) == [0, 1]


def test_box_answer_queries_reads_box_answers_only(loc_tiny):
    model, _ = loc_tiny
    c = model.config
    loc0 = int(c.referring["loc_token_id"])
    ign = -100
    row0 = [ign, ign, c.box_start_id, loc0 + 1, loc0 + 2, loc0 + 5, loc0 + 7, c.box_end_id, ign]  # a box answer
    row1 = [ign, c.box_start_id, loc0 + 3, loc0 + 4, c.box_end_id, ign, ign, ign, ign]  # a point: not a box
    row2 = [ign, 11, 12, 13, c.box_start_id, loc0, loc0, loc0 + 7, loc0 + 7]  # a box cut at the end of the row
    qb, qt, boxes = box_answer_queries(torch.tensor([row0, row1, row2]), model)
    assert qb.tolist() == [0] * 4 + [2] * 4
    assert qt.tolist() == [2, 3, 4, 5, 4, 5, 6, 7]  # <box> and the first three locs predict the four coordinates
    assert boxes[0].tolist() == pytest.approx([1 / 8, 2 / 8, 6 / 8, 1.0])  # bins decoded to their extent
    assert boxes[4].tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0])
    assert cell_mask(boxes[:1], (2, 2)).tolist() == [[False, False, True, True]]  # the top row: under half a cell
    text_model, _ = build_preset("tiny", seed=0)
    with pytest.raises(InputError, match="loc"):
        box_answer_queries(torch.tensor([row0]), text_model)


def test_image_attention_is_the_layers_own_attention(loc_tiny, loc_batch):
    """The recomputed attention (rotary query and key from the recorded layer input) equals the weights of the
    model's eager attention at the same positions, restricted to the image tokens and renormalized, for every
    layer and head, in a padded batch of independent turns (4D mask, restarting positions)."""
    model, _ = loc_tiny
    b = loc_batch
    qb, qt, _ = box_answer_queries(b["labels"], model)
    assert qb.numel() >= 8 and len(set(qb.tolist())) >= 2
    layers = list(range(len(model.llm.get_decoder().layers)))
    heads = tuple(range(model.config.text["num_attention_heads"]))
    model.llm.set_attn_implementation("eager")
    try:
        with torch.no_grad(), attention_inputs(model, layers) as seen:
            emb = model.embed(b["input_ids"], model.encode_image(b["pixels"]), b["boxes"], b["box_batch"],
                              b["pixels"], b.get("crops"))
            out = model.llm.get_decoder()(inputs_embeds=emb, attention_mask=b["attention_mask"],
                                          position_ids=b["position_ids"], output_attentions=True)
    finally:
        model.llm.set_attn_implementation("sdpa")
    img_pos = image_positions(b["input_ids"], model)
    assert sorted(seen) == layers
    for layer in layers:
        got = image_attention(model, seen, layer, qb, qt, img_pos[qb], heads).exp()  # [G, h, N]
        full = out.attentions[layer][qb, :, qt]  # [G, H, T]
        want = torch.gather(full, 2, img_pos[qb][:, None, :].expand(-1, full.shape[1], -1))
        want = want / want.sum(-1, keepdim=True)
        assert torch.allclose(got, want, atol=1e-5), (layer, (got - want).abs().max())


def test_adapt_objective_adds_the_grounding_loss_and_it_trains_the_heads(loc_tiny, loc_batch):
    """AnswerLoss(ground_attn=w) = the answer loss + w x the grounding attention loss (a "ground" part); a few
    optimizer steps on it alone raise the supervised heads' attention on the answer's cells."""
    import copy

    from chatspot_edge.train.adapt import AnswerLoss

    model0, _ = loc_tiny
    model = copy.deepcopy(model0)
    b = loc_batch
    features = model.vision(b["pixels"]).detach()
    with torch.no_grad():
        base, parts0 = AnswerLoss()(model, features, b)
        total, parts = AnswerLoss(ground_attn=0.5)(model, features, b)
    assert "ground" not in parts0 and parts["ground"] > 0
    assert float(total) == pytest.approx(float(base) + 0.5 * parts["ground"], rel=1e-5)
    assert json.dumps(AnswerLoss(ground_attn=0.5).describe())
    with pytest.raises(InputError):
        AnswerLoss(ground_attn=-1.0)

    layers = supervised_layers(len(model.llm.get_decoder().layers))

    def ground_loss() -> torch.Tensor:
        with attention_inputs(model, layers) as seen:
            fields = {k: b[k] for k in ("input_ids", "attention_mask", "position_ids", "boxes", "box_batch",
                                        "pixels", "crops") if k in b}
            model(image_embeds=model.project(features), **fields)
        return grounding_attention_loss(model, seen, b["input_ids"], b["labels"])

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        loss = ground_loss()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = float(ground_loss())
    assert last < 0.7 * first, (first, last)


def test_no_box_answer_no_loss(loc_tiny, loc_batch):
    model, _ = loc_tiny
    labels = torch.full_like(loc_batch["labels"], -100)
    with torch.no_grad(), attention_inputs(model, [0]) as seen:
        model(image_embeds=model.project(model.vision(loc_batch["pixels"])),
              **{k: loc_batch[k] for k in ("input_ids", "attention_mask", "position_ids", "boxes", "box_batch",
                                           "pixels", "crops") if k in loc_batch})
    assert grounding_attention_loss(model, seen, loc_batch["input_ids"], labels) is None
