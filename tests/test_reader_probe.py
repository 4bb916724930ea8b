"""The OCR diagnostic (benchmarks/reader_probe.py) on a tiny checkpoint and a hand-made reading dataset."""

from __future__ import annotations

import json

import pytest

from PIL import Image, ImageDraw

from chatspot_edge.benchmarks.reader_probe import main
from chatspot_edge.model.checkpoint import save_checkpoint
from chatspot_edge.model.presets import build_preset


def test_the_probe_reports_every_figure_and_finds_a_word_that_is_there(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    lines = []
    for k in range(18):
        word = ("stop", "open", "exit")[k % 3]
        im = Image.new("RGB", (96, 64), (250, 250, 250))
        ImageDraw.Draw(im).text((8 + k % 4, 24), word, fill=(10, 10, 10))
        im.save(data / "images" / f"{k}.png")
        lines.append(json.dumps({"id": str(k), "image": f"images/{k}.png", "width": 96, "height": 64,
                                 "task": "region_ocr", "conversations": [
                                     {"from": "human", "value": "<image>\nRead <box>[0.050,0.300,0.600,0.650]</box>."},
                                     {"from": "gpt", "value": word.upper() if k % 2 else word}]}))
    lines.append(json.dumps({"id": "n", "image": "images/0.png", "width": 96, "height": 64, "task": "region_ocr",
                             "conversations": [{"from": "human", "value": "<image>\nRead <box>[0.1,0.1,0.5,0.5]</box>."},
                                               {"from": "gpt", "value": "9977"}]}))  # seen once: not a class (MIN_SEEN 5)
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    model, tok = build_preset("tiny", seed=0)
    save_checkpoint(model, tok, tmp_path / "ckpt")
    out = tmp_path / "probe.json"
    assert main([str(tmp_path / "ckpt"), "--data", str(data), "--out", str(out), "--holdout", "6", "--epochs", "300",
                 "--scratch-epochs", "2"]) == 0
    r = json.loads(out.read_text())
    assert (r["items"], r["classes"], r["holdout"], r["chance"]) == (18, 3, 6, 0.3333)
    assert 0 <= r["readout_first_token"] <= 1 and len(r["scratch"]) == 2 and r["scratch_crops_per_epoch"] == 12
    assert 0 <= r["readout_answer_tokens"] <= 1 and r["task"] == "region_ocr"
    assert r["probe_crop_view"] >= 0.5  # three words drawn alike: even random conv features tell them apart


def test_the_probe_takes_another_task_and_a_limit(tmp_path):
    """--task region_recognition: what the region shows (here a coloured square) instead of its word; --max-items
    keeps the first N questions; a task with too few questions is refused."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    lines = []
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    for k in range(24):
        name = list(colours)[k % 3]
        im = Image.new("RGB", (96, 64), (250, 250, 250))
        ImageDraw.Draw(im).rectangle((10 + k % 5, 10, 50 + k % 5, 50), fill=colours[name])
        im.save(data / "images" / f"{k}.png")
        lines.append(json.dumps({"id": str(k), "image": f"images/{k}.png", "width": 96, "height": 64,
                                 "task": "region_recognition", "objects": [
                                     {"box": [10 + k % 5, 10, 50 + k % 5, 50], "shape": "square", "color": name}],
                                 "conversations": [
                                     {"from": "human", "value": "<image>\nWhat is in <box>[0.050,0.100,0.600,0.850]</box>?"},
                                     {"from": "gpt", "value": f"a {name} square"}]}))
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    model, tok = build_preset("tiny", seed=0)
    save_checkpoint(model, tok, tmp_path / "ckpt")
    out = tmp_path / "probe.json"
    args = [str(tmp_path / "ckpt"), "--data", str(data), "--out", str(out), "--holdout", "6", "--epochs", "300"]
    assert main(args + ["--task", "region_recognition", "--max-items", "21"]) == 0
    r = json.loads(out.read_text())
    assert (r["task"], r["items"], r["classes"]) == ("region_recognition", 21, 3)
    assert 0 <= r["readout_answer_tokens"] <= 1
    assert r["probe_crop_view"] >= 0.5  # three colours: random conv features tell them apart
    assert main(args + ["--task", "region_recognition", "--attribute", "color"]) == 0
    r = json.loads(out.read_text())  # the colour of the object under the box: the same three classes
    assert (r["attribute"], r["items"], r["classes"]) == ("color", 24, 3) and r["probe_crop_view"] >= 0.5
    with pytest.raises(SystemExit, match="1 classes"):
        main(args + ["--task", "region_recognition", "--attribute", "shape"])  # every object a square: one class
    with pytest.raises(SystemExit, match="0 region_ocr questions"):
        main(args)  # no reading questions here
