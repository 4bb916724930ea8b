"""Relation words in the relative view (`config.region_relation_words`, `model.position.RelationWords`): a region
embedding can carry the LLM's own embedding of the relation word between its question's first region and it,
from training to the exported region graph, in new models and added to trained checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chatspot_edge.model.position import (RELATION_GAIN, RELATION_GROUP_SIZES, RELATION_WORDS, RelationWords,
                                          relative_features)
from chatspot_edge.model.presets import build_preset
from chatspot_edge.model.region import relation_word_ids


def _word_rows(model, tok) -> torch.Tensor:
    emb = model.llm.get_input_embeddings().weight
    return torch.stack([emb[ids].float().mean(0) for ids in relation_word_ids(tok, RELATION_WORDS)])


def test_new_models_carry_the_llms_rows_of_the_question_words():
    model, tok = build_preset("tiny", seed=1)
    assert model.config.region_relation_words == RELATION_WORDS
    words = model.region.relative.words
    assert torch.equal(words.rows.float(), _word_rows(model, tok))
    assert "region.relative.words.rows" in model.state_dict()  # saved (and exported) with the weights
    assert not any(p is words.rows for p in model.parameters())  # fixed: never drifts from the LLM's rows
    # the rows are the in-question spelling: " left" is what "Is it to the left of ..." contains
    assert all(len(ids) >= 1 for ids in relation_word_ids(tok, RELATION_WORDS))
    off, _ = build_preset("tiny", seed=1, design={"relation_words": False})
    assert off.region.relative.words is None and off.config.region_relation_words == ()


def _force(head, word: int | None, size_word: int | None) -> None:
    """Make the choice certain: position group `word` (0-3, None = its "none"), size group `size_word` (0-1)."""
    head.weight.zero_()
    head.bias.fill_(0.0)
    head.bias[4 if word is None else word] = 50.0
    head.bias[7 if size_word is None else 5 + size_word] = 50.0


def test_a_chosen_word_is_written_into_the_second_regions_embedding():
    """Forcing the choice to one word adds exactly that word's embedding row to the region embedding, at the
    region embedding's own scale (gain x |embedding| / mean |row|), and only through the relation view; a
    position word and a size word are written together; with gain 0 the row as it is (a mutation that dropped
    the words, picked the wrong row, or ignored the scale fails here)."""
    for gain in (0.5, 0.0):
        model, tok = build_preset("tiny", seed=3, design={"relation_groups": True, "relation_gain": gain})
        model.eval()
        rows = _word_rows(model, tok)
        unit = gain / rows.norm(dim=-1).mean() if gain else None
        ch, cw = model.config.region_crop_size
        emb = torch.randn(1, 16, 64)
        boxes = torch.tensor([[0.1, 0.3, 0.3, 0.5], [0.6, 0.3, 0.8, 0.5]])
        crops = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, ch, cw, 4), dtype=np.uint8))
        head = model.region.relative.words.classify[2]
        with torch.no_grad():
            _force(head, None, None)  # "none" in both groups: writes nothing
            base = model.region(emb, boxes, crops)  # = the embedding before the view (its MLP starts at zero)
            scale = base.norm(dim=-1, keepdim=True) * unit if gain else torch.ones(2, 1)
            for k, word in enumerate(RELATION_WORDS):
                _force(head, k if k < 4 else None, k - 4 if k >= 4 else None)
                got = model.region(emb, boxes, crops)
                assert torch.allclose(got - base, scale * rows[k], atol=1e-4, rtol=1e-4), (gain, word)
            _force(head, 1, 0)  # "right" and "larger" at once
            got = model.region(emb, boxes, crops)
            assert torch.allclose(got - base, scale * (rows[1] + rows[4]), atol=1e-4, rtol=1e-4), gain
            if gain:  # written at the embedding's scale: the words' share of a region token does not depend on it
                big = model.region(emb * 100, boxes, crops)
                _force(head, None, None)
                big_base = model.region(emb * 100, boxes, crops)
                share = ((got - base).norm(dim=-1) / base.norm(dim=-1), (big - big_base).norm(dim=-1) / big_base.norm(dim=-1))
                assert torch.allclose(*share, rtol=1e-3)


def test_the_word_choice_learns_a_position_and_a_size_at_once():
    """From the relative features alone the choice learns left / right / above / below and, in its own group,
    larger / smaller / neither (what the data's relation questions ask) within a few hundred steps; both words
    of a pair that is left of and larger than the other get most of their group's probability (one choice over
    all six words could give them half at most between them)."""
    torch.manual_seed(0)
    words = RelationWords(16, 9 + 4 * 4, len(RELATION_WORDS), groups=RELATION_GROUP_SIZES)
    g = torch.Generator().manual_seed(1)

    def batch(n):
        first = torch.rand(n, 2, generator=g) * 0.4
        size = 0.05 + torch.rand(n, 1, generator=g) * 0.05
        side = torch.randint(0, 4, (n,), generator=g)  # where the first box lies: left, right, above, below
        rel = torch.randint(0, 3, (n,), generator=g)  # the first is larger, smaller, or about the same
        ratio = torch.tensor([0.4, 2.5, 1.0])[rel][:, None]
        shift = torch.tensor([[0.5, 0.0], [-0.5, 0.0], [0.0, 0.5], [0.0, -0.5]])[side]
        ref = torch.cat([first + 0.3, first + 0.3 + size], -1)  # the question's first box
        box = torch.cat([first + 0.3 + shift, first + 0.3 + shift + size * ratio], -1)
        return box, ref, side, rel

    opt = torch.optim.Adam(words.parameters(), lr=3e-3)
    for _ in range(300):
        box, ref, side, rel = batch(64)
        p = words.probabilities(relative_features(box, ref))
        sized = rel < 2
        loss = -torch.log(p[torch.arange(64), side]).mean() - torch.log(p[sized, 4 + rel[sized]]).mean() \
            - torch.log1p(-p[~sized, 4:].sum(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    box, ref, side, rel = batch(400)
    with torch.no_grad():
        p = words.probabilities(relative_features(box, ref))
    assert (p[:, :4].argmax(-1) == side).float().mean() > 0.95
    sized = rel < 2
    both = (p[torch.arange(400), side] > 0.5) & (p[torch.arange(400), 4 + rel.clamp(max=1)] > 0.5)
    assert both[sized].float().mean() > 0.9
    assert (p[~sized, 4:].sum(-1) < 0.5).float().mean() > 0.9  # neither larger nor smaller: the size "none"


def test_the_gain_is_learned_and_session_15_checkpoints_still_load(tmp_path):
    """The words' gain is a parameter the answer loss trains; a checkpoint written before groups and gain (one
    choice over all six words, rows as they are) loads as exactly that model."""
    from chatspot_edge.model.checkpoint import load_checkpoint, save_checkpoint

    default = build_preset("tiny", seed=5)[0].config  # the preset's: one choice, rows as they are
    assert default.region_relation_gain == RELATION_GAIN == 0.0 and default.region_relation_groups == ()
    model, tok = build_preset("tiny", seed=5, design={"relation_groups": True, "relation_gain": 0.5})
    assert model.config.region_relation_groups == RELATION_GROUP_SIZES
    assert model.config.region_relation_gain == 0.5
    words = model.region.relative.words
    assert any(p is words.gain for p in model.parameters())
    emb = torch.randn(1, 16, 64)
    boxes = torch.tensor([[0.1, 0.3, 0.3, 0.5], [0.6, 0.3, 0.8, 0.5]])
    ch, cw = model.config.region_crop_size
    crops = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, ch, cw, 4), dtype=np.uint8))
    model.region(emb, boxes, crops).sum().backward()
    assert words.gain.grad is not None and float(words.gain.grad.abs()) > 0
    with pytest.raises(ValueError, match="pass region"):
        words(torch.zeros(2, 9 + 4 * model.region.relative.n_freq))

    old, tok = build_preset("tiny", seed=6, design={"relation_gain": 0.0})
    old.config.region_relation_groups = ()
    old.region.relative.words = RelationWords(64, 9 + 4 * old.region.relative.n_freq, len(RELATION_WORDS))
    save_checkpoint(old, tok, tmp_path / "s15")
    cfg = json.loads((tmp_path / "s15" / "config.json").read_text())
    for k in ("region_relation_groups", "region_relation_gain"):
        cfg.pop(k)
    (tmp_path / "s15" / "config.json").write_text(json.dumps(cfg))
    loaded, _ = load_checkpoint(tmp_path / "s15")
    w = loaded.region.relative.words
    assert w.groups == (len(RELATION_WORDS),) and w.gain is None and w.classify[2].out_features == 7
    with torch.no_grad():
        w.classify[2].bias.normal_()
        assert float(w.probabilities(torch.zeros(1, 9 + 4 * loaded.region.relative.n_freq)).sum()) < 1.0

    from chatspot_edge.train.adapt import warm_start_from  # a new model warm-started from it keeps its own choice

    fresh, _ = build_preset("tiny", seed=0, design={"relation_groups": True})
    assert "region" in warm_start_from(fresh, tmp_path / "s15")["copied"]
    assert fresh.region.relative.words.classify[2].out_features == 8
    assert torch.equal(fresh.region.relative.mlp[0].weight, old.region.relative.mlp[0].weight)


def test_init_adds_the_words_to_a_checkpoint_with_or_without_the_view(tmp_path):
    """`adapt --init CKPT --relation-words`: a checkpoint with the relative view keeps its trained view and gains
    the words (rows from its own LLM, saved, reloaded); one without the view gains both; a warm start from a
    checkpoint without the words keeps the new model's rows."""
    from chatspot_edge.model.checkpoint import load_checkpoint, save_checkpoint
    from chatspot_edge.train.adapt import AdaptOptions, _build_model, warm_start_from

    viewed, tok = build_preset("tiny", seed=2, design={"relation_words": False})
    with torch.no_grad():
        for p in viewed.region.relative.parameters():
            p.add_(0.1)
    save_checkpoint(viewed, tok, tmp_path / "viewed")
    opts = AdaptOptions(preset="tiny", data=tmp_path, out=tmp_path / "x", init=tmp_path / "viewed",
                        design={"relation_words": True, "relation_groups": True})
    model, tok2 = _build_model(opts)
    assert model.config.region_relation_words == RELATION_WORDS and model.region.relative.words is not None
    assert torch.equal(model.region.relative.mlp[2].weight, viewed.region.relative.mlp[2].weight)
    assert torch.equal(model.region.relative.words.rows.float(), _word_rows(model, tok2))
    assert model.region.relative.words.groups == RELATION_GROUP_SIZES
    assert model.region.relative.words.gain is None and model.config.region_relation_gain == RELATION_GAIN == 0.0
    save_checkpoint(model, tok2, tmp_path / "words")
    saved = json.loads((tmp_path / "words" / "config.json").read_text())
    assert saved["region_relation_words"] == list(RELATION_WORDS)
    assert saved["region_relation_groups"] == list(RELATION_GROUP_SIZES) and saved["region_relation_gain"] == 0.0
    reloaded, _ = load_checkpoint(tmp_path / "words")
    assert torch.equal(reloaded.region.relative.words.rows, model.region.relative.words.rows)

    plain, tok = build_preset("tiny", seed=4, design={"region_relative": False})
    save_checkpoint(plain, tok, tmp_path / "plain")
    both, _ = _build_model(AdaptOptions(preset="tiny", data=tmp_path, out=tmp_path / "y", init=tmp_path / "plain",
                                        design={"relation_words": True}))
    assert both.config.region_relative and both.region.relative.words is not None

    fresh, _ = build_preset("tiny", seed=0)
    rows = fresh.region.relative.words.rows.clone()
    assert "region" in warm_start_from(fresh, tmp_path / "viewed")["copied"]
    assert torch.equal(fresh.region.relative.words.rows, rows)
    assert torch.equal(fresh.region.relative.mlp[2].weight, viewed.region.relative.mlp[2].weight)
