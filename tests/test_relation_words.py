"""Relation words in the relative view (`config.region_relation_words`, `model.position.RelationWords`): a region
embedding can carry the LLM's own embedding of the relation word between its question's first region and it,
from training to the exported region graph, in new models and added to trained checkpoints."""

from __future__ import annotations

import json

import numpy as np
import torch

from chatspot_edge.model.position import RELATION_WORDS, RelationWords, relative_features
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


def test_a_chosen_word_is_written_into_the_second_regions_embedding():
    """Forcing the choice to one word adds exactly that word's embedding row to the region embedding, and only
    through the relation view (a mutation that dropped the words or picked the wrong row fails here)."""
    model, tok = build_preset("tiny", seed=3)
    model.eval()
    rows = _word_rows(model, tok)
    ch, cw = model.config.region_crop_size
    emb = torch.randn(1, 16, 64)
    boxes = torch.tensor([[0.1, 0.3, 0.3, 0.5], [0.6, 0.3, 0.8, 0.5]])
    crops = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, ch, cw, 4), dtype=np.uint8))
    head = model.region.relative.words.classify[2]
    with torch.no_grad():
        head.bias.fill_(0.0)
        head.bias[-1] = 50.0  # "none": writes nothing
        base = model.region(emb, boxes, crops)
        for k, word in enumerate(RELATION_WORDS):
            head.bias.fill_(0.0)
            head.bias[k] = 50.0
            got = model.region(emb, boxes, crops)
            assert torch.allclose(got - base, rows[k].expand(2, -1), atol=1e-4), word


def test_the_word_choice_learns_which_word_holds():
    """From the relative features alone the choice learns left / right / above / below and larger / smaller
    (what the data's relation questions ask) within a few hundred steps."""
    torch.manual_seed(0)
    words = RelationWords(16, 9 + 4 * 4, len(RELATION_WORDS))
    g = torch.Generator().manual_seed(1)

    def batch(n):
        first = torch.rand(n, 2, generator=g) * 0.4
        size = 0.05 + torch.rand(n, 2, generator=g) * 0.1
        side = torch.randint(0, 4, (n,), generator=g)  # where the first box lies: left, right, above, below
        shift = torch.tensor([[0.5, 0.0], [-0.5, 0.0], [0.0, 0.5], [0.0, -0.5]])[side]
        ref = torch.cat([first + 0.3, first + 0.3 + size], -1)  # the question's first box
        box = ref + torch.cat([shift, shift], -1)
        return box, ref, side

    opt = torch.optim.Adam(words.parameters(), lr=3e-3)
    for _ in range(300):
        box, ref, side = batch(64)
        logp = torch.log_softmax(words.classify(relative_features(box, ref)), -1)
        loss = torch.nn.functional.nll_loss(logp, side)
        opt.zero_grad()
        loss.backward()
        opt.step()
    box, ref, side = batch(400)
    acc = (words.classify(relative_features(box, ref)).argmax(-1) == side).float().mean()
    assert acc > 0.95


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
                        design={"relation_words": True})
    model, tok2 = _build_model(opts)
    assert model.config.region_relation_words == RELATION_WORDS and model.region.relative.words is not None
    assert torch.equal(model.region.relative.mlp[2].weight, viewed.region.relative.mlp[2].weight)
    assert torch.equal(model.region.relative.words.rows.float(), _word_rows(model, tok2))
    save_checkpoint(model, tok2, tmp_path / "words")
    assert json.loads((tmp_path / "words" / "config.json").read_text())["region_relation_words"] == list(RELATION_WORDS)
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
