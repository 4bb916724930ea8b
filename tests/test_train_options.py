"""adapt's options a user relies on: --grad-accum, --lora, --no-region-token, --eval-every, the per-sample loss
weighting, and the CLI flags that set them (tiny preset, a few steps in-process)."""

from __future__ import annotations

import contextlib
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from chatspot_edge.errors import InputError
from chatspot_edge.model.checkpoint import load_checkpoint
from chatspot_edge.model.preprocess import region_crops
from chatspot_edge.model.processor import Processor
from chatspot_edge.train import adapt as adapt_mod
from chatspot_edge.train.adapt import AdaptOptions, adapt


@pytest.fixture(scope="module")
def spot(tmp_path_factory):
    from chatspot_edge.data import generate

    d = tmp_path_factory.mktemp("spot") / "sw"
    generate(d, seed=3, n_train=48, n_test=24, workers=1)
    return d


@pytest.fixture(scope="module")
def init_state():
    from chatspot_edge.model.presets import build_preset

    return build_preset("tiny", seed=0)[0].state_dict()  # what adapt starts from (seed 0)


def _adapt(spot, out, **options) -> dict:
    base = dict(preset="tiny", data=spot, out=out, steps=2, stage1_steps=1, batch_size=4, save_every=0, quiet=True)
    return adapt(AdaptOptions(**{**base, **options}))


def test_grad_accum_takes_the_full_batch_step(spot, tmp_path, monkeypatch, init_state):
    """--grad-accum 4 (micro-batches of one sample) takes the optimizer steps of the whole batch of 4: the same
    losses and the same weights. Float32 here: bf16 autocast rounds the two batch shapes differently."""
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())
    one = _adapt(spot, tmp_path / "ga1")
    four = _adapt(spot, tmp_path / "ga4", grad_accum=4)
    assert [x[:2] for x in one["losses"]] == [x[:2] for x in four["losses"]] == [[1, 1], [2, 1], [2, 2]]
    assert all(abs(x[2] - y[2]) < 1e-3 for x, y in zip(one["losses"], four["losses"])), (one["losses"], four["losses"])
    a, b = load_file(str(tmp_path / "ga1" / "model.safetensors")), load_file(str(tmp_path / "ga4" / "model.safetensors"))
    moved = 0
    for k in a:
        step = float((a[k] - init_state[k]).abs().max())  # how far training moved this tensor
        diff = float((a[k] - b[k]).abs().max())
        moved += step > 1e-4
        # equal up to float rounding (AdamW turns a rounding difference of a near-zero gradient into a step)
        assert diff < 1e-3 and (step < 1e-4 or diff < 0.1 * step), (k, diff, step)
    assert moved > 10
    with pytest.raises(InputError, match="divisible"):
        _adapt(spot, tmp_path / "bad", grad_accum=3)


def test_lora_trains_low_rank_updates_and_merges_them(spot, tmp_path, init_state):
    _adapt(spot, tmp_path / "lora", lora=True)
    w = load_file(str(tmp_path / "lora" / "model.safetensors"))
    # merged: plain weights under the base names (the tied head stored once), no adapter tensors
    assert set(w) == set(init_state) - {"llm.lm_head.weight"}
    projections = [k for k in w if k.startswith("llm.") and k.endswith("_proj.weight")]
    assert len(projections) == 2 * 7
    for k in projections:  # each attention / MLP projection moved by a matrix of rank <= r = 16
        delta = (w[k] - init_state[k]).double()
        s = torch.linalg.svdvals(delta)
        assert s[0] > 0 and int((s > 1e-4 * s[0]).sum()) <= 16 < min(delta.shape), (k, int((s > 1e-4 * s[0]).sum()))
    for k in w:  # LoRA leaves the embeddings and norms as they were; the projector and region encoder train fully
        if k.startswith("llm.") and k not in projections:
            assert torch.equal(w[k], init_state[k]), k
    assert not torch.equal(w["projector.linear_1.weight"], init_state["projector.linear_1.weight"])
    model, _ = load_checkpoint(tmp_path / "lora")
    assert model.config.provenance["adapt"]["lora"] is True


def test_no_region_token_trains_a_model_without_region_embeddings(spot, tmp_path):
    _adapt(spot, tmp_path / "plain", region_token=False)
    w = load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert w and not [k for k in w if k.startswith("region.")]
    model, tok = load_checkpoint(tmp_path / "plain")
    assert model.config.region_token is False and model.region is None
    enc = Processor(tok, model.config).encode_prompt("What is in <box>[0.100,0.200,0.450,0.610]</box>?")
    assert model.config.region_token_id not in enc.ids and enc.boxes == []  # the region is its text alone
    assert model.config.box_start_id in enc.ids and model.config.box_end_id in enc.ids


def test_region_align_kind_trains_and_is_recorded(spot, tmp_path):
    """--region-align-kind: the contrastive alignment trains the region encoder differently from the absolute one
    (the same seed and batches), the checkpoint records which one, and an unknown kind is refused."""
    runs = {}
    for kind in ("absolute", "contrastive"):
        _adapt(spot, tmp_path / kind, region_align_kind=kind)
        model, _ = load_checkpoint(tmp_path / kind)
        assert model.config.provenance["adapt"]["objective"]["region_align_kind"] == kind
        runs[kind] = load_file(str(tmp_path / kind / "model.safetensors"))
    w = "region.proj.2.weight"
    assert not torch.equal(runs["absolute"][w], runs["contrastive"][w])
    assert torch.equal(runs["absolute"]["vision.backbone.convs.0.weight"],
                       runs["contrastive"]["vision.backbone.convs.0.weight"])  # frozen in both
    with pytest.raises(InputError, match="unknown region alignment"):
        _adapt(spot, tmp_path / "bad", region_align_kind="cosine")


def test_eval_every_records_the_learning_curve(spot, tmp_path):
    from chatspot_edge.train.adapt import quick_eval

    _adapt(spot, tmp_path / "curve", steps=4, eval_every=2, eval_samples=8)
    log = json.loads((tmp_path / "curve" / "training_log.json").read_text())
    assert [e["step"] for e in log["evals"]] == [2, 4]
    model, tok = load_checkpoint(tmp_path / "curve")
    score = quick_eval(model, tok, spot, 8)
    assert {"region_recognition", "point_qa"} <= set(score)  # every accuracy the records allow
    last = {k: log["evals"][-1][k] for k in score}
    assert last == score  # the last point is the saved checkpoint's score


def test_per_sample_loss_weighs_each_sample_alike(spread):
    """per_sample: the mean over samples of each sample's mean token loss (a 25-token box answer weighs what a
    2-token answer weighs); otherwise the mean over all answer tokens."""
    import torch.nn.functional as F

    model, tok = spread  # the random tiny preset's token losses are all about log(vocab): weightings agree
    proc = Processor(tok, model.config)
    convs = [[{"from": "human", "value": "<image>\nWhat is in <box>[0.100,0.200,0.450,0.610]</box>?"},
              {"from": "gpt", "value": "red"}],
             [{"from": "human", "value": "<image>\nLocate the blue circle."},
              {"from": "gpt", "value": "<box>[0.612,0.100,0.850,0.345]</box>"}]]
    encs = [proc.encode_conversation(c) for c in convs]
    T = max(len(e.ids) for e in encs)
    ids = torch.full((2, T), model.config.pad_token_id)
    labels = torch.full((2, T), -100)
    mask = torch.zeros((2, T), dtype=torch.long)
    for i, e in enumerate(encs):
        ids[i, :len(e.ids)], labels[i, :len(e.ids)], mask[i, :len(e.ids)] = torch.tensor(e.ids), torch.tensor(e.labels), 1
    pixels = torch.zeros(2, 64, 64, 3, dtype=torch.uint8)
    crops = torch.from_numpy(region_crops(pixels[0].numpy(), [encs[0].boxes[0]], model.config.region_crop_size))
    args = dict(attention_mask=mask, pixels=pixels, boxes=torch.tensor([encs[0].boxes[0]]), box_batch=torch.tensor([0]),
                crops=crops)
    with torch.no_grad():
        logits = model(ids, **args).logits
        per_sample = model(ids, labels=labels, per_sample=True, **args).loss
        per_token = model(ids, labels=labels, per_sample=False, **args).loss
    losses = [F.cross_entropy(logits[i, :-1][labels[i, 1:] != -100], labels[i, 1:][labels[i, 1:] != -100],
                              reduction="none") for i in range(2)]
    assert [len(x) for x in losses][0] < 5 < 20 < [len(x) for x in losses][1]
    assert torch.allclose(per_sample, (losses[0].mean() + losses[1].mean()) / 2, atol=1e-5)
    assert torch.allclose(per_token, torch.cat(losses).mean(), atol=1e-5)
    assert abs(float(per_sample - per_token)) > 1e-2  # the two weightings differ here
    assert AdaptOptions(preset="tiny", data=None, out=None).per_sample_loss is True  # adapt's default


def test_cli_flags_reach_the_options(monkeypatch, tmp_path):
    from chatspot_edge import cli

    seen = []
    monkeypatch.setattr(adapt_mod, "adapt", seen.append)
    common = ["chatspot-edge", "adapt", "--preset", "mini", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    for extra in ([], ["--grad-accum", "4", "--lora", "--no-region-token", "--vision-pool", "1", "--eval-every", "5",
                       "--eval-samples", "7", "--reader-steps", "9", "--init", str(tmp_path / "ckpt"),
                       "--region-align-kind", "contrastive", "--lr-proj", "5e-4"]):
        monkeypatch.setattr(sys, "argv", common + extra)
        cli.main()
    default, given = seen
    fields = lambda o: (o.grad_accum, o.lora, o.region_token, o.vision_pool, o.eval_every, o.eval_samples,  # noqa: E731
                        o.reader_steps, o.init, o.region_align_kind, o.lr_proj)
    assert fields(default) == (1, False, True, 2, 0, 200, None, None, None, None)
    assert fields(given) == (4, True, False, 1, 5, 7, 9, tmp_path / "ckpt", "contrastive", 5e-4)


def test_reader_steps_run_stage_0_before_stage_1(spot, tmp_path, init_state):
    """--reader-steps N: the crop view trains on the reading questions first (train.reader), alone in a fresh
    model, next to the region encoder's frozen views where they come from a checkpoint (--init, --warm-start); the
    checkpoint's provenance says what it did; 0 (the default of the tiny preset) leaves stage 0 out."""
    res = _adapt(spot, tmp_path / "reader", reader_steps=3)
    assert res["reader"]["steps"] == 3 and res["reader"]["items"] > 0 and res["reader"]["crops_seen"] > 0
    assert res["reader"]["frozen_views"] is False
    model, _ = load_checkpoint(tmp_path / "reader")
    assert model.config.provenance["adapt"]["reader"]["steps"] == 3
    assert _adapt(spot, tmp_path / "again", reader_steps=2, init=tmp_path / "reader")["reader"]["frozen_views"] is True
    warm = _adapt(spot, tmp_path / "warm", reader_steps=2, warm_start=tmp_path / "reader")
    assert warm["reader"]["frozen_views"] is True
    assert "region" in load_checkpoint(tmp_path / "warm")[0].config.provenance["adapt"]["warm_start"]["copied"]
    assert _adapt(spot, tmp_path / "plain")["reader"] is None
