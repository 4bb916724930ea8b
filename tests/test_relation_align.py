"""The relation-word alignment (train.relation_align): targets read from the question / answer words, one per
region after the first of its question, the loss against a direct computation, and its place in adapt."""

import json
import math

import pytest
import torch

from chatspot_edge.model.position import RELATION_WORDS, relative_features
from chatspot_edge.model.presets import build_preset
from chatspot_edge.train.relation_align import region_relation_targets, relation_alignment_loss, relation_target

W = {w: k for k, w in enumerate(RELATION_WORDS)}


def test_relation_target_reads_the_answer_then_the_asked_word():
    q_word = "Where is the object in <box>[0.1,0.1,0.2,0.2]</box> relative to the object in <box>[0.5,0.5,0.6,0.6]</box>? " \
             "Answer with left, right, above or below."
    assert relation_target(q_word, "left", RELATION_WORDS) == (W["left"], 1)
    assert relation_target(q_word, "The red circle is Above the blue star.", RELATION_WORDS) == (W["above"], 1)
    q_yes = "Is the object in <box>[0.1,0.1,0.2,0.2]</box> larger than the object in <box>[0.5,0.5,0.6,0.6]</box>? " \
            "Answer yes or no."
    assert relation_target(q_yes, "yes", RELATION_WORDS) == (W["larger"], 1)
    assert relation_target(q_yes, "No.", RELATION_WORDS) == (W["larger"], -1)
    # no target: a yes / no question naming several relation words, or none; an answer without one
    assert relation_target("Is it left or right of the star? Answer yes or no.", "yes", RELATION_WORDS) == (-1, 0)
    assert relation_target("Is the first object red? Answer yes or no.", "no", RELATION_WORDS) == (-1, 0)
    assert relation_target(q_word, "a red circle", RELATION_WORDS) == (-1, 0)
    assert relation_target(q_word, "leftover", RELATION_WORDS) == (-1, 0)  # whole words only


def test_only_regions_after_the_first_of_their_question_get_a_target():
    conv = [{"from": "human", "value": "<image>\nWhat is <box>[0.1,0.1,0.2,0.2]</box>?"}, {"from": "gpt", "value": "a left"},
            {"from": "human", "value": "Is the object in <box>[0.1,0.1,0.2,0.2]</box> below the object in "
                                       "<box>[0.5,0.5,0.6,0.6]</box>? Answer yes or no."}, {"from": "gpt", "value": "no"},
            {"from": "human", "value": "<box>[0.1,0.1,0.2,0.2]</box> <box>[0.3,0.3,0.4,0.4]</box> <box>[0.5,0.5,0.6,0.6]</box> "
                                       "Where is the first relative to the second?"}, {"from": "gpt", "value": "right"}]
    word, sign = region_relation_targets(conv, [1, 2, 2, 3, 3, 3], RELATION_WORDS)
    assert word == [-1, -1, W["below"], -1, W["right"], W["right"]]
    assert sign == [0, 0, -1, 0, 1, 1]
    # a truncated sample keeps the targets of the regions it kept
    assert region_relation_targets(conv, [1, 2], RELATION_WORDS) == ([-1, -1], [0, 0])


def _choice(model, boxes, ref):
    """Each word's probability, computed here from the logits' layout: left right above below none | larger
    smaller none, one softmax per group."""
    view = model.region.relative
    z = view.words.classify(relative_features(boxes, ref, view.n_freq))
    return torch.cat([torch.softmax(z[:, :5], -1)[:, :4], torch.softmax(z[:, 5:], -1)[:, :2]], -1)


def test_loss_is_the_choices_log_probability_and_teaches_it():
    """Against a direct computation (yes: -log p(word), no: -log (1 - p(word)), regions without a target left
    out); the loss's gradient reaches the word choice only, and a few hundred steps of it make the choice right
    (a mutation that swapped the signs or the reference would not)."""
    model, _ = build_preset("tiny", seed=0, design={"relation_groups": True, "relation_gain": 0.5})  # gain: no grad
    torch.manual_seed(0)
    boxes = torch.tensor([[0.1, 0.4, 0.2, 0.5], [0.6, 0.4, 0.7, 0.5], [0.5, 0.1, 0.9, 0.3], [0.5, 0.6, 0.6, 0.7]])
    box_batch = torch.tensor([0, 0, 1, 1])
    word = torch.tensor([-1, W["left"], -1, W["larger"]])
    sign = torch.tensor([0, 1, 0, -1])
    with torch.no_grad():
        for p_ in model.region.relative.words.classify.parameters():
            p_.normal_(0, 0.3)
    loss = relation_alignment_loss(model, boxes, box_batch, None, word, sign)
    p = _choice(model, boxes[[1, 3]], boxes[[0, 2]])
    direct = (-torch.log(p[0, W["left"]]) - torch.log(1 - p[1, W["larger"]])) / 2
    assert float(loss.detach()) == pytest.approx(float(direct.detach()), rel=1e-5)
    assert relation_alignment_loss(model, boxes, box_batch, None, word, torch.zeros(4, dtype=torch.long)) is None
    loss.backward()
    assert model.region.relative.words.classify[0].weight.grad.abs().sum() > 0
    assert model.region.relative.mlp[0].weight.grad is None and model.region.proj[0].weight.grad is None
    assert model.region.relative.words.gain.grad is None  # the choice, not how loudly it is written

    opt = torch.optim.Adam(model.region.relative.words.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    sides = ("left", "right", "above", "below")
    shifts = torch.tensor([[0.5, 0.0], [-0.5, 0.0], [0.0, 0.5], [0.0, -0.5]])  # where the SECOND box lies

    def batch(n):
        first = torch.rand(n, 2, generator=g) * 0.4 + 0.3
        size = 0.05 + torch.rand(n, 2, generator=g) * 0.1
        side = torch.randint(0, 4, (n,), generator=g)
        a = torch.cat([first, first + size], -1)
        b = a + torch.cat([shifts[side], shifts[side]], -1)
        asked = torch.where(torch.rand(n, generator=g) < 0.5, side, side ^ 1)  # the true side or its opposite
        boxes = torch.stack([a, b], 1).reshape(-1, 4)
        word = torch.stack([torch.full((n,), -1), torch.tensor([W[sides[int(s)]] for s in asked])], 1).reshape(-1)
        sign = torch.stack([torch.zeros(n, dtype=torch.long), torch.where(asked == side, 1, -1)], 1).reshape(-1)
        return boxes, torch.arange(n).repeat_interleave(2), word, sign, side

    for _ in range(300):
        boxes, bb, word, sign, _ = batch(32)
        loss = relation_alignment_loss(model, boxes, bb, None, word, sign)
        opt.zero_grad()
        loss.backward()
        opt.step()
    boxes, _, _, _, side = batch(400)
    with torch.no_grad():
        p = _choice(model, boxes[1::2], boxes[0::2])
    assert (p[:, :4].argmax(-1) == side).float().mean() > 0.9  # the first box is `side` of the second


def test_adapt_objective_adds_the_relation_loss(tmp_path):
    """AnswerLoss(relation_align=w) = the answer loss + w x the relation loss; Batches collate its targets (one per
    region, in box order) when asked; a model without relation words is refused."""
    from chatspot_edge.data import generate, load_split
    from chatspot_edge.errors import InputError
    from chatspot_edge.model.processor import Processor
    from chatspot_edge.train.adapt import AnswerLoss, Batches

    model, tok = build_preset("tiny", seed=0)
    data = tmp_path / "sw"
    generate(data, seed=5, n_train=8, n_test=2, workers=1)
    records = load_split(data, "train")
    proc = Processor(tok, model.config)
    plain = Batches(records, data, proc, model.config.vision.image_size, 0, 400, 8)
    rel = Batches(records, data, proc, model.config.vision.image_size, 0, 400, 8, None, RELATION_WORDS)
    idx = list(range(8))
    a, b = plain.collate(idx), rel.collate(idx)
    assert "relation_word" not in a
    R = b["boxes"].shape[0]
    assert b["relation_word"].shape == (R,) and b["relation_sign"].shape == (R,)
    assert int((b["relation_sign"] != 0).sum()) > 0  # SpotWorld's turns hold relation questions
    first = torch.ones(R, dtype=torch.bool)
    first[1:] = (b["box_batch"][1:] != b["box_batch"][:-1]) | (b["box_segment"][1:] != b["box_segment"][:-1])
    assert bool((b["relation_sign"][first] == 0).all())  # the first region of a question is the reference
    with torch.no_grad():
        features = model.vision(b["pixels"])
        base, parts0 = AnswerLoss()(model, features, b)
        total, parts = AnswerLoss(relation_align=0.5)(model, features, b)
        direct = relation_alignment_loss(model, b["boxes"], b["box_batch"], b["box_segment"], b["relation_word"],
                                         b["relation_sign"])
    assert "relation" not in parts0 and parts["relation"] == pytest.approx(float(direct), rel=1e-5)
    assert float(total) == pytest.approx(float(base) + 0.5 * float(direct), rel=1e-5)
    assert math.isfinite(float(direct))
    with pytest.raises(ValueError, match="relation_words"):
        AnswerLoss(relation_align=1.0)(model, features, a)
    with pytest.raises(InputError):
        AnswerLoss(relation_align=-1.0)
    assert json.dumps(AnswerLoss(relation_align=0.5).describe())
    off, _ = build_preset("tiny", seed=0, design={"relation_words": False})
    with pytest.raises(ValueError, match="relation words"):
        relation_alignment_loss(off, b["boxes"], b["box_batch"], b["box_segment"], b["relation_word"], b["relation_sign"])
