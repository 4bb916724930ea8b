import torch

from chatspot_edge.model.checkpoint import load_checkpoint, save_checkpoint
from chatspot_edge.model.preprocess import batch_region_crops
from chatspot_edge.model.processor import Processor
from chatspot_edge.model.region import box_cell_weights

CONV = [{"from": "human", "value": "<image>\nWhat is in <box>[0.100,0.200,0.450,0.610]</box>?"},
        {"from": "gpt", "value": "a red triangle"}]


def test_special_tokens_are_single_ids(tiny):
    _, tok = tiny
    for t in ("<image>", "<box>", "</box>", "<region>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    ids = tok("<box>[0.100,0.200]</box>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<box>") and ids[-1] == tok.convert_tokens_to_ids("</box>")


def test_encode_conversation(tiny):
    model, tok = tiny
    enc = Processor(tok, model.config).encode_conversation(CONV)
    cfg = model.config
    assert enc.ids.count(cfg.image_token_id) == cfg.num_image_tokens == 16
    assert enc.ids.count(cfg.region_token_id) == 1 and enc.boxes == [(0.1, 0.2, 0.45, 0.61)]
    answer = [i for i, l in zip(enc.ids, enc.labels) if l != -100]
    assert tok.decode(answer) == "a red triangle<|im_end|>"
    # placement: the tiny preset puts the region embeddings just before the answer
    k = enc.ids.index(cfg.region_token_id)
    assert cfg.region_placement == "before_answer" and enc.labels[k + 1] != -100 and enc.labels[k] == -100
    cfg2 = type(cfg).from_dict({**cfg.to_dict(), "region_placement": "after_box"})
    enc2 = Processor(tok, cfg2).encode_conversation(CONV)
    k2 = enc2.ids.index(cfg.region_token_id)
    assert enc2.ids[k2 - 1] == cfg.box_end_id and sorted(enc2.ids) == sorted(enc.ids)


def test_forward_shapes_and_answer_only_loss(tiny):
    model, tok = tiny
    proc = Processor(tok, model.config)
    enc = proc.encode_conversation(CONV)
    ids = torch.tensor([enc.ids])
    px = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)
    emb = model.encode_image(px)
    assert emb.shape == (1, 16, 64)
    full = model(ids, **regions(model, px, enc.boxes))
    assert full.logits.shape == (1, len(enc.ids), len(tok))
    out = model(ids, labels=torch.tensor([enc.labels]), **regions(model, px, enc.boxes))
    assert out.n_targets == 4 and out.logits.shape == (4, len(tok))
    # the answer-only loss equals cross-entropy of the full logits at the answer positions
    tgt = torch.tensor(enc.labels[1:])
    sel = tgt != -100
    ref = torch.nn.functional.cross_entropy(full.logits[0, :-1][sel], tgt[sel])
    assert torch.allclose(out.loss, ref, atol=1e-5)
    out.loss.backward()
    assert model.projector.linear_1.weight.grad is not None and model.region.proj[0].weight.grad is not None


def test_image_and_region_change_the_output(spread):
    model, tok = spread  # the tiny preset with unit-RMS image and region rows (tests/conftest.py)
    enc = Processor(tok, model.config).encode_prompt("What is in <box>[0.100,0.200,0.450,0.610]</box>?")
    ids = torch.tensor([enc.ids])
    a = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    b = torch.full((1, 64, 64, 3), 255, dtype=torch.uint8)
    with torch.no_grad():
        la = model(ids, **regions(model, a, enc.boxes)).logits[0, -1]
        lb = model(ids, **regions(model, b, enc.boxes)).logits[0, -1]
        lc = model(ids, **regions(model, a, [[0.6, 0.6, 0.9, 0.9]])).logits[0, -1]
    # both effects sit 100x above the GGUF parity tolerance (1e-4, test_export_gguf), so a parity test on this
    # model notices a missing or wrong image or region row
    assert (la - lb).abs().max() > 1e-2 and (la - lc).abs().max() > 1e-2


def test_box_cell_weights():
    w = box_cell_weights(torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.6, 0.6, 0.6, 0.6]]), (2, 2))
    assert torch.allclose(w[0], torch.tensor([1.0, 0, 0, 0]))  # exactly the top-left cell
    assert torch.allclose(w.sum(-1), torch.ones(2))
    assert w[1].argmax() == 3  # a point in the bottom-right cell


def test_batched_generate_matches_single(tiny):
    model, tok = tiny
    proc = Processor(tok, model.config)
    qs = ["What is in <box>[0.100,0.200,0.450,0.610]</box>?", "Describe <box>[0.500,0.500]</box> in detail please."]
    encs = [proc.encode_prompt(q) for q in qs]
    px = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    crops = regions(model, px, [b for e in encs for b in e.boxes], [i for i, e in enumerate(encs) for _ in e.boxes])["crops"]
    batch = model.generate([e.ids for e in encs], px, [e.boxes for e in encs], max_new_tokens=6, crops=crops)
    for i, e in enumerate(encs):
        single = model.generate([e.ids], px[i:i + 1], [e.boxes], max_new_tokens=6, crops=crops[i:i + 1])
        assert single[0] == batch[i]


def test_checkpoint_round_trip_is_exact(tiny, tmp_path):
    model, tok = tiny
    save_checkpoint(model, tok, tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in (tmp_path / "ckpt").iterdir())
    loaded, tok2 = load_checkpoint(tmp_path / "ckpt")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.llm.lm_head.weight.data_ptr() == loaded.llm.get_input_embeddings().weight.data_ptr()
    assert tok2("x <image> <box>", add_special_tokens=False) == tok("x <image> <box>", add_special_tokens=False)
    assert loaded.config.to_dict() == model.config.to_dict()
    # an interrupted write leaves the old checkpoint in place
    import pytest

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom):
        from chatspot_edge.files import atomic_dir

        with atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "config.json").write_text("{}")
            raise Boom()
    assert load_checkpoint(tmp_path / "ckpt")[0].config.preset == "tiny"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_bad_checkpoint_is_input_error(tmp_path):
    import pytest

    from chatspot_edge.errors import InputError

    with pytest.raises(InputError):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"preset": 1}')
    with pytest.raises(InputError):
        load_checkpoint(tmp_path)


def test_crop_boxes_samples_inside_the_box():
    from chatspot_edge.model.region import crop_boxes

    img = torch.zeros(1, 3, 64, 64)
    img[:, 0, 16:32, 32:48] = 1.0  # a red square: x 32..48, y 16..32
    boxes = torch.tensor([[0.5, 0.25, 0.75, 0.5], [0.0, 0.5, 0.25, 1.0], [0.625, 0.375, 0.625, 0.375]])
    crops = crop_boxes(img.expand(3, -1, -1, -1), boxes, size=8, min_size=0.125)
    assert torch.allclose(crops[0, 0], torch.ones(8, 8))  # the whole crop is the square
    assert crops[1].abs().max() == 0  # elsewhere nothing
    assert torch.allclose(crops[2, 0], torch.ones(8, 8))  # a point inside grows to a box inside the square


def test_region_alignment_loss_trains_the_region_encoder(tiny):
    model, tok = tiny
    enc = Processor(tok, model.config).encode_conversation(CONV)
    px = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)
    args = dict(labels=torch.tensor([enc.labels]), **regions(model, px, enc.boxes))
    model.zero_grad()
    base = model(torch.tensor([enc.ids]), **args).loss
    total = model(torch.tensor([enc.ids]), region_align=1.0, **args).loss
    assert total > base  # a positive extra term
    (total - base).backward()
    assert model.region.crops.convs[0].weight.grad.abs().sum() > 0
    assert model.llm.model.layers[0].mlp.up_proj.weight.grad is None or \
        model.llm.model.layers[0].mlp.up_proj.weight.grad.abs().sum() == 0  # it reads through norm + head only
    model.zero_grad()


def test_contrastive_region_alignment_scores_which_region_says_each_token(tiny):
    """The contrastive kind: per answer token, the softmax over the batch's regions. Alike regions score log R
    whatever they are; a region that moves towards its own answer's word lowers the loss, one that moves towards
    another region's word raises it; a word every answer has cannot be won (the absolute kind rewards it)."""
    import math

    import pytest

    from chatspot_edge.model.chatspot import IGNORE_INDEX

    model, _ = tiny
    emb = model.llm.get_input_embeddings().weight.detach()
    shared, red, blue, cross = 500, 501, 502, 503
    targets = torch.full((3, 6), IGNORE_INDEX)
    targets[:, 2:5] = torch.tensor([[shared, red, cross], [shared, blue, cross], [shared, blue, cross]])
    targets[1, 4] = IGNORE_INDEX  # answers of different lengths
    bb = torch.arange(3)
    base = torch.randn(1, emb.shape[1], generator=torch.Generator().manual_seed(0)).repeat(3, 1)

    def loss(region: torch.Tensor, t: torch.Tensor = targets, contrastive: bool = True) -> float:
        with torch.no_grad():
            return float(model.region_alignment_loss(region, bb, t, contrastive=contrastive))

    def towards(token: int, rows: list[int]) -> torch.Tensor:
        r = base.clone()
        r[rows] += emb[token] / emb[token].norm() * base[0].norm()
        return r

    assert loss(base) == pytest.approx(math.log(3), abs=1e-5)
    assert loss(towards(red, [0])) < math.log(3) < loss(towards(blue, [0]))
    only_shared = torch.where(targets == shared, targets, torch.full_like(targets, IGNORE_INDEX))
    assert loss(towards(shared, [0]), only_shared) > math.log(3)  # one region cannot win a word all answers have
    assert loss(towards(shared, [0, 1, 2]), only_shared) == pytest.approx(math.log(3), abs=1e-5)
    assert loss(towards(shared, [0, 1, 2]), only_shared, contrastive=False) < loss(base, only_shared,
                                                                                    contrastive=False)


def test_region_align_kind_both_adds_the_two_losses(tiny):
    import pytest

    model, tok = tiny
    enc = Processor(tok, model.config).encode_turns(TURNS, 4, 512)
    px = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    args = dict(labels=torch.tensor([enc.labels]), **regions(model, px, enc.boxes), per_sample=True)
    with torch.no_grad():
        losses = {kind: float(model(torch.tensor([enc.ids]), region_align=1.0, region_align_kind=kind, **args).loss)
                  for kind in ("absolute", "contrastive", "both")}
        base = float(model(torch.tensor([enc.ids]), **args).loss)
    assert losses["both"] - base == pytest.approx((losses["absolute"] - base) + (losses["contrastive"] - base),
                                                  rel=1e-4)
    assert losses["contrastive"] > base  # two regions in the sample: a positive term
    with pytest.raises(ValueError, match="unknown region alignment"):
        model(torch.tensor([enc.ids]), region_align=1.0, region_align_kind="cosine", **args)


def regions(model, px: torch.Tensor, boxes, box_batch=None) -> dict:
    """The region arguments of a forward pass: boxes, their images and their crops (read from `px`, which
    stands in for the original images here)."""
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    box_batch = torch.zeros(len(boxes), dtype=torch.long) if box_batch is None else torch.tensor(box_batch)
    crops = torch.from_numpy(batch_region_crops(list(px.numpy()), boxes.numpy(), box_batch.numpy(),
                                                model.config.region_crop_size))
    return dict(pixels=px, boxes=boxes, box_batch=box_batch, crops=crops)


TURNS = [{"from": "human", "value": "<image>\nWhat is in <box>[0.100,0.200,0.450,0.610]</box>?"},
         {"from": "gpt", "value": "a red triangle"},
         {"from": "human", "value": "How many shapes are there in the image?"},
         {"from": "gpt", "value": "3"},
         {"from": "human", "value": "<box>[0.500,0.500]</box> What is the color of this object?"},
         {"from": "gpt", "value": "blue"}]


def test_independent_turns_equal_separate_questions_on_the_cached_prefix(tiny):
    """Turns packed on one [system + image] prefix (the training layout) give every turn the logits it gets
    alone after that prefix, which is what the runtime computes for a follow-up question on a cached image."""
    from chatspot_edge.train.adapt import turn_masks

    model, tok = tiny
    proc = Processor(tok, model.config)
    packed = proc.encode_turns(TURNS)
    px = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    T = len(packed.ids)
    m = turn_masks([packed], T)
    with torch.no_grad():
        out = model(torch.tensor([packed.ids]), attention_mask=m["attention_mask"], position_ids=m["position_ids"],
                    **regions(model, px, packed.boxes)).logits[0]
    n_prefix = packed.segments.count(0)
    assert packed.positions[:n_prefix] == list(range(n_prefix))
    box_at = 0
    for k in (1, 2, 3):
        idx = [i for i, s in enumerate(packed.segments) if s == k]
        assert packed.positions[idx[0]] == n_prefix  # every turn starts right after the prefix
        alone = proc.encode_turns(TURNS[2 * (k - 1): 2 * k])  # this turn as the only question
        n_boxes = packed.box_segments.count(k)
        with torch.no_grad():
            ref = model(torch.tensor([alone.ids]), **regions(model, px, packed.boxes[box_at:box_at + n_boxes])).logits[0]
        box_at += n_boxes
        assert alone.ids == packed.ids[:n_prefix] + [packed.ids[i] for i in idx]
        assert torch.allclose(out[idx], ref[n_prefix:], atol=1e-4)


def test_per_turn_loss_weighs_turns_alike(tiny):
    from chatspot_edge.train.adapt import turn_masks

    model, tok = tiny
    proc = Processor(tok, model.config)
    packed = proc.encode_turns(TURNS)
    px = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
    m = turn_masks([packed], len(packed.ids))
    args = dict(labels=torch.tensor([packed.labels]), attention_mask=m["attention_mask"],
                position_ids=m["position_ids"], **regions(model, px, packed.boxes))
    with torch.no_grad():
        per_turn = model(torch.tensor([packed.ids]), per_sample=True, segments=m["segments"], **args)
        tokens = model(torch.tensor([packed.ids]), **args)
    targets = torch.tensor(packed.labels[1:])
    seg = torch.tensor(packed.segments[1:])
    ce = torch.nn.functional.cross_entropy(tokens.logits.float(), targets[targets != -100], reduction="none")
    s = seg[targets != -100]
    ref = torch.stack([ce[s == k].mean() for k in (1, 2, 3)]).mean()
    assert torch.allclose(per_turn.loss, ref, atol=1e-5)
