"""The grounding probe (benchmarks/grounding_probe.py) on a tiny chatspot-loc-v1 checkpoint and a small SpotWorld."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chatspot_edge.benchmarks.grounding_probe import best_constant, centre_in, main, teacher_forced
from chatspot_edge.data import generate, load_image, load_split
from chatspot_edge.model.checkpoint import save_checkpoint
from chatspot_edge.model.presets import build_preset
from chatspot_edge.referring import LOC_FORMAT, ReferringFormat


@pytest.fixture(scope="module")
def spotworld(tmp_path_factory):
    out = tmp_path_factory.mktemp("gp") / "sw"
    generate(out, seed=1, n_train=0, n_test=40, workers=1)  # 6 grounding questions
    return out


@pytest.fixture(scope="module")
def loc_model():
    """A tiny loc model whose argmax is a different loc token from position to position: its (tied) loc rows are
    large random vectors, so what each position predicts depends on its hidden state."""
    from chatspot_edge.model.loc_tokens import loc_token_ids

    model, tok = build_preset("tiny", seed=0, referring=ReferringFormat(LOC_FORMAT, 32))
    ids = loc_token_ids(model)
    with torch.no_grad():
        emb = model.llm.get_input_embeddings().weight
        emb[ids.start:ids.stop] = 4.0 * torch.randn(len(ids), emb.shape[1], generator=torch.Generator().manual_seed(0))
    return model, tok


def test_teacher_forced_bins_are_the_full_forward_argmax_at_the_loc_positions(loc_model, spotworld):
    """The probe's predictions equal the argmax of the model's full-sequence logits at the positions that predict
    each loc token of the answer (the indexing a teacher-forced probe can get wrong), and its truth is the answer's
    own loc bins."""
    from chatspot_edge.model.loc_tokens import loc_token_ids
    from chatspot_edge.model.preprocess import resize_pixels
    from chatspot_edge.model.processor import Processor

    model, tok = loc_model
    recs = [r for r in load_split(spotworld, "test") if r["task"] == "grounding"][:3]
    assert recs
    pred, truth = teacher_forced(model, tok, recs, spotworld, batch_size=2)  # a padded batch and a single one
    locs = loc_token_ids(model)
    proc = Processor(tok, model.config)
    for n, rec in enumerate(recs):
        enc = proc.encode_conversation(rec["conversations"][:2])
        px = torch.from_numpy(resize_pixels(load_image(spotworld, rec), model.config.vision.image_size).copy())[None]
        with torch.no_grad():
            logits = model(torch.tensor([enc.ids]), pixels=px).logits[0]  # [T, V]
        at = [i for i, t in enumerate(enc.labels) if t in locs]  # label positions of the 4 loc tokens
        assert len(at) == 4
        assert truth[n].tolist() == [enc.labels[i] - locs.start for i in at]
        want = [int(logits[i - 1].argmax()) for i in at]  # position i-1 predicts token i
        assert pred[n].tolist() == [w - locs.start if w in locs else -1 for w in want]
    assert len({tuple(p) for p in pred.tolist()}) > 1 and len(set(pred[0].tolist())) > 1  # predictions vary


def test_attention_on_target_is_the_heads_mass_on_the_answer_cells(loc_model, spotworld):
    """The probe's attention figure: per record `[L, H]` masses in [0, 1] that depend on the record (that they are the
    layers' own attention is train.ground_attn's test)."""
    from chatspot_edge.train.ground_attn import supervised_layers

    model, tok = loc_model
    recs = [r for r in load_split(spotworld, "test") if r["task"] == "grounding"][:3]
    att: list = []
    teacher_forced(model, tok, recs, spotworld, batch_size=2, attention=att)
    assert len(att) == 3
    L, H = len(model.llm.get_decoder().layers), model.config.text["num_attention_heads"]
    for mass, uniform in att:
        assert mass.shape == (L, H) and ((mass >= 0) & (mass <= 1 + 1e-5)).all() and 0 < uniform <= 1
    assert len({round(float(m[0, 0]), 4) for m, _ in att}) > 1  # it depends on the record
    assert supervised_layers(L) == [0, 1]


def test_best_constant_and_centre_in():
    truth = np.array([[3, 0], [4, 0], [5, 9], [20, 9]])
    c = best_constant(truth, 32)
    assert c[0]["bin"] == 4 and c[0]["within1"] == 0.75 and c[0]["exact"] == 0.25
    assert c[1]["within1"] == 0.5
    rec = {"width": 100, "height": 50, "target": {"object": 1},
           "objects": [{"box": [0, 0, 10, 10]}, {"box": [50, 25, 70, 45]}]}
    assert centre_in((0.5, 0.5, 0.7, 0.9), rec) == "target"
    assert centre_in((0.0, 0.0, 0.1, 0.2), rec) == "other"
    assert centre_in((0.8, 0.0, 1.0, 0.2), rec) == "none"


def test_cli_writes_the_report_and_refuses_text_models(tmp_path, loc_model, spotworld, tiny):
    model, tok = loc_model
    save_checkpoint(model, tok, tmp_path / "loc")
    out = tmp_path / "probe.json"
    assert main([str(tmp_path / "loc"), "--data", str(spotworld), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    n = r["items"]
    assert n >= 3 and r["bins"] == 32 and len(r["answers"]) == n
    assert set(r["teacher_forced"]) == {"x1", "y1", "x2", "y2"} == set(r["best_constant"])
    assert all(0 <= v["exact"] <= v["within1"] <= 1 for v in r["teacher_forced"].values())
    assert sum(r["answer_centre_in"].values()) == n and 0 <= r["grounding"] <= 1
    find = r["attention_on_target_at_x1"]  # tiny: 2 layers of 4 heads, a 4 x 4 grid
    assert len(find["best_head_per_layer"]) == len(find["head0_per_layer"]) == 2
    assert all(0 <= h <= b <= 1 for h, b in zip(find["head0_per_layer"], find["best_head_per_layer"]))
    assert 1 / 16 <= find["uniform"] <= 1 and 0 <= find["supervised_heads_over_half"] <= 1
    text, ttok = tiny  # chatspot-text-v1: a coordinate is several tokens, no teacher-forced bins
    save_checkpoint(text, ttok, tmp_path / "text")
    assert main([str(tmp_path / "text"), "--data", str(spotworld)]) == 2
