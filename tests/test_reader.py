"""Stage 0 of adapt (train.reader): which questions are reading questions, and that only the region's crop view
learns from them, towards the answer's tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from chatspot_edge.model.presets import build_preset
from chatspot_edge.model.preprocess import resize_pixels
from chatspot_edge.train.reader import ReaderItem, _balanced_batches, pretrain_reader, reader_inputs, reader_items


def _turn(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_reading_questions_follow_the_task_labels_or_one_box():
    labelled = {"id": "a", "image": "a.png", "task": "region_ocr",
                "conversations": _turn("<image>\nWhat word is written in <box>[0.100,0.200,0.500,0.400]</box>?", "stop")
                + _turn("<box>[0.500,0.500]</box> What color is this?", "red")  # a point: no crop to read
                + _turn("Describe <box>[0.200,0.200,0.300,0.300]</box>.", "a red square")
                + _turn("Read the text in <box>[0.600,0.100,0.900,0.200]</box>.", "9977"),
                "turns": [{"task": "point_qa"}, {"task": "region_recognition"}, {"task": "region_ocr"}]}
    unlabelled = {"id": "b", "image": "b.png",
                  "conversations": _turn("<image>\nWhat is in <box>[0.000,0.000,0.500,0.500]</box>?", "a blue star")
                  + _turn("Is <box>[0.1,0.1,0.2,0.2]</box> left of <box>[0.5,0.5,0.6,0.6]</box>?", "yes")
                  + _turn("What color is <box>[0.300,0.300]</box>?", "green")
                  + _turn("How many stars are there?", "2")}
    items = reader_items([labelled, unlabelled])
    assert [(i.record, i.answer) for i in items] == [(0, "stop"), (0, "a red square"), (0, "9977"), (1, "a blue star")]
    assert [i.task for i in items] == ["region_ocr", "region_recognition", "region_ocr", None]
    assert items[0].box == pytest.approx((0.1, 0.2, 0.5, 0.4)) and items[2].box == pytest.approx((0.6, 0.1, 0.9, 0.2))
    assert [i.answer for i in reader_items([labelled], tasks=("region_ocr",))] == ["stop", "9977"]


def _word_records(words):
    images, records = {}, []
    for k, w in enumerate(words):
        im = Image.new("RGB", (96, 64), (250, 250, 250))
        ImageDraw.Draw(im).text((8, 24), w, fill=(10, 10, 10))
        images[f"{k}.png"] = im
        records.append({"id": str(k), "image": f"{k}.png", "width": 96, "height": 64, "task": "region_ocr",
                        "conversations": _turn("<image>\nWhat word is written in <box>[0.050,0.300,0.600,0.650]</box>?", w)})
    return images, records


def test_the_reader_stage_trains_the_crop_view_only_towards_the_answer():
    model, tok = build_preset("tiny", seed=0)
    with torch.no_grad():  # the random tiny head is nearly flat (std 0.02): rows of unit scale, as a trained LLM's
        model.llm.get_input_embeddings().weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    images, records = _word_records(["stop", "open", "exit", "sale"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    model.vision.eval()
    res = pretrain_reader(model, tok, records, lambda r: images[r["image"]], True, steps=40, batch_size=4, lr=3e-3)
    assert res["steps"] == 40 and res["items"] == 4 and res["crops_seen"] == 160
    assert res["last_loss"] < 0.5 * res["first_loss"], res  # four crops, four answers: it fits them
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("region.crops.") for k in changed), sorted(changed)[:5]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training and not model.vision.training  # the modes it was called with


def test_the_reader_stage_skips_what_it_cannot_train():
    model, tok = build_preset("tiny", seed=0)
    images, records = _word_records(["stop"])
    load = lambda r: images[r["image"]]
    assert pretrain_reader(model, tok, records, load, True, steps=0)["steps"] == 0
    for r in records:
        r["task"] = "point_qa"
    assert pretrain_reader(model, tok, records, load, True, steps=5)["reason"] == "no reading questions in the data"
    resized, _ = build_preset("tiny", seed=0, design=dict(region_crop="resized"))
    assert pretrain_reader(resized, tok, _word_records(["stop"])[1], load, True, steps=5)["reason"] == \
        "the model has no crop view"


def test_batches_give_each_task_an_equal_share():
    """Reading is the rare task (SpotWorld: 5k questions against recognition's 16k): each batch holds as many of
    one task as of the other, and each task's questions are walked in epochs (every one seen before a repeat)."""
    items = [_item(k, "region_ocr") for k in range(5)] + [_item(k, "region_recognition") for k in range(5, 45)]
    batches = _balanced_batches(items, 8, np.random.default_rng(0))
    first = [next(batches) for _ in range(10)]
    for b in first:
        assert sorted(items[k].task for k in b) == ["region_ocr"] * 4 + ["region_recognition"] * 4
    reading = [k for b in first[:5] for k in b if items[k].task == "region_ocr"]  # 20 draws of 5 questions: 4 epochs
    assert all(sorted(reading[e * 5:(e + 1) * 5]) == [0, 1, 2, 3, 4] for e in range(4))
    assert len({k for b in first[:5] for k in b if k >= 5}) == 20  # 20 of the 40 recognition questions, no repeat


def _item(record: int, task: str) -> ReaderItem:
    return ReaderItem(record, (0.1, 0.1, 0.5, 0.5), "x", task)


def test_reader_inputs_are_the_crop_and_the_rest_of_the_region_embedding():
    """The frozen views + the crop view = what the model's region encoder gives for the box (the image resized as
    training resizes it); without frozen views only the crops (no vision forward)."""
    model, tok = build_preset("tiny", seed=0)
    model.eval()
    images, records = _word_records(["stop", "open"])
    records[1]["conversations"] += _turn("Read <box>[0.500,0.100,0.900,0.400]</box>.", "exit")
    items = reader_items(records)
    load = lambda r: images[r["image"]]
    pix = lambda r: resize_pixels(images[r["image"]], model.config.vision.image_size)
    crops, context = reader_inputs(model, records, items, load, frozen_views=True, log=lambda m: None)
    assert crops.shape == (3, *model.config.region_crop_size, 4) and crops.dtype == np.uint8
    with torch.no_grad():
        for k, it in enumerate(items):
            emb = model.encode_image(torch.from_numpy(np.array(pix(records[it.record])))[None])
            x = torch.from_numpy(crops[k:k + 1])
            full = model.encode_regions(emb, torch.tensor([it.box]), torch.zeros(1, dtype=torch.long), crops=x)
            torch.testing.assert_close(context[k] + model.region.crops(x)[0], full[0], rtol=1e-4, atol=1e-4)
    alone, none = reader_inputs(model, records, items, load, frozen_views=False, log=lambda m: None)
    assert none is None and np.array_equal(alone, crops)


def test_without_frozen_views_the_crop_view_trains_alone():
    model, tok = build_preset("tiny", seed=0)
    with torch.no_grad():
        model.llm.get_input_embeddings().weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    images, records = _word_records(["stop", "open", "exit", "sale"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = pretrain_reader(model, tok, records, lambda r: images[r["image"]], False, steps=40, batch_size=4, lr=3e-3)
    assert res["frozen_views"] is False and res["tasks"] == {"region_ocr": 4}
    assert res["last_loss"] < 0.5 * res["first_loss"], res
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("region.crops.") for k in changed)
