"""Stage 0 of adapt (train.reader): which questions are reading questions, and that only the region's crop view
learns from them, towards the answer's tokens."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from chatspot_edge.model.presets import build_preset
from chatspot_edge.model.preprocess import resize_pixels
from chatspot_edge.train.reader import pretrain_reader, reader_items


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
    res = pretrain_reader(model, tok, records, lambda r: images[r["image"]],
                          lambda r: resize_pixels(images[r["image"]], model.config.vision.image_size),
                          steps=40, batch_size=4, lr=3e-3)
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
    load, pix = (lambda r: images[r["image"]]), (lambda r: resize_pixels(images[r["image"]], (64, 64)))
    assert pretrain_reader(model, tok, records, load, pix, steps=0)["steps"] == 0
    for r in records:
        r["task"] = "point_qa"
    assert pretrain_reader(model, tok, records, load, pix, steps=5)["reason"] == "no reading questions in the data"
    resized, _ = build_preset("tiny", seed=0, design=dict(region_crop="resized"))
    assert pretrain_reader(resized, tok, _word_records(["stop"])[1], load, pix, steps=5)["reason"] == \
        "the model has no crop view"
