"""SpotWorld generator and LLaVA-style loader: determinism, label correctness, referring text, loader errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chatspot_edge import referring
from chatspot_edge.data import COLORS, SHAPES, TASKS, generate, load_image, load_split, render_scene
from chatspot_edge.data import spotworld as sw
from chatspot_edge.errors import InputError

SEED = 7
N_TRAIN, N_TEST = 40, 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sw") / "ds"
    generate(out, seed=SEED, n_train=N_TRAIN, n_test=N_TEST, workers=2)
    return out


@pytest.fixture(scope="module")
def records(dataset) -> list[dict]:
    return load_split(dataset, "train") + load_split(dataset, "test")


@pytest.fixture(scope="module")
def samples(records) -> dict[str, sw.Sample]:
    """Regenerated samples (spec, image, masks) for every record."""
    out = {}
    for r in records:
        split, index = r["id"].split("-")
        out[r["id"]] = sw.make_sample(SEED, split, int(index), r["task"])
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- determinism and folder handling --------------------------------------------------------------------


def test_same_seed_is_byte_identical_whatever_the_worker_count(dataset, tmp_path):
    generate(tmp_path / "one", seed=SEED, n_train=N_TRAIN, n_test=N_TEST, workers=1)
    a, b = _files(dataset), _files(tmp_path / "one")
    assert a.keys() == b.keys()
    assert len([k for k in a if k.endswith(".png")]) == N_TRAIN + N_TEST
    assert all(a[k] == b[k] for k in a)


def test_other_seed_differs_and_samples_are_prefix_stable(dataset, tmp_path):
    generate(tmp_path / "s7", seed=SEED, n_train=5, n_test=0, workers=1)
    generate(tmp_path / "s8", seed=SEED + 1, n_train=5, n_test=0, workers=1)
    full = (dataset / "train.jsonl").read_text().splitlines()
    s7 = (tmp_path / "s7" / "train.jsonl").read_text().splitlines()
    s8 = (tmp_path / "s8" / "train.jsonl").read_text().splitlines()
    assert s7 == full[:5]  # a sample does not depend on the dataset size
    assert s8 != s7
    assert (tmp_path / "s8" / "images" / "train-000000.png").read_bytes() != (
        tmp_path / "s7" / "images" / "train-000000.png").read_bytes()


def test_existing_folder_is_reused_or_rejected(dataset, tmp_path):
    meta_file = dataset / "meta.json"
    before = meta_file.stat().st_mtime_ns
    meta = generate(dataset, seed=SEED, n_train=N_TRAIN, n_test=N_TEST, workers=2)
    assert meta_file.stat().st_mtime_ns == before
    assert meta == json.loads(meta_file.read_text())
    assert meta["version"] == sw.GENERATOR_VERSION and meta["seed"] == SEED
    assert meta["counts"] == {"train": N_TRAIN, "test": N_TEST}
    assert set(meta["colors"]) == set(COLORS) and meta["shapes"] == list(SHAPES)
    with pytest.raises(InputError, match="already exists"):
        generate(dataset, seed=SEED + 1, n_train=N_TRAIN, n_test=N_TEST, workers=1)
    assert not list(dataset.parent.glob("*.tmp-*"))  # nothing half-written left behind


def test_progress_and_bad_arguments(tmp_path):
    calls = []
    generate(tmp_path / "p", seed=1, n_train=3, n_test=2, workers=1, progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1] == (5, 5)
    with pytest.raises(InputError):
        generate(tmp_path / "q", seed=-1, n_train=1, n_test=1)


# --- records --------------------------------------------------------------------------------------------


def test_vocab_is_large_enough():
    assert len(COLORS) >= 8 and len(SHAPES) >= 8
    rgb = np.array(list(COLORS.values()), float)
    d = np.sqrt(((rgb[:, None] - rgb[None]) ** 2).sum(-1))
    assert d[~np.eye(len(rgb), dtype=bool)].min() > 90  # colours clearly distinct
    assert len(sw.WORDS) >= 60 and all(3 <= len(w) <= 8 for w in sw.WORDS)


def test_records_schema_and_task_coverage(dataset, records):
    train = load_split(dataset, "train")
    assert {r["task"] for r in train} == set(TASKS)
    for r in records:
        assert r["image"] == f"images/{r['id']}.png"
        with Image.open(dataset / r["image"]) as im:
            assert im.size == (r["width"], r["height"]) and im.mode == "RGB"
            assert 160 <= max(im.size) <= 448
        human, gpt = r["conversations"][:2]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        assert gpt["value"].strip()
        split = r["id"].split("-")[0]
        extra = r["conversations"][2:]
        assert len(extra) == 2 * sw.EXTRA_TURNS[split] == 2 * len(r.get("turns", []))
        for k in range(0, len(extra), 2):  # later turns: questions that stand alone, no image token
            assert extra[k]["from"] == "human" and extra[k + 1]["from"] == "gpt"
            assert "<image>" not in extra[k]["value"] and extra[k + 1]["value"].strip()
        assert 1 <= len(r["objects"]) <= 9
        for o in r["objects"]:
            x1, y1, x2, y2 = o["box"]
            assert all(isinstance(v, int) for v in o["box"])
            assert 0 <= x1 < x2 <= r["width"] and 0 <= y1 < y2 <= r["height"]
            assert o["size"] in ("small", "medium", "large")
            if o["shape"] == "text":
                assert isinstance(o["text"], str) and o["color"] in COLORS
            else:
                assert o["shape"] in SHAPES and o["color"] in COLORS and "text" not in o


def test_rendered_labels_match_pixels(dataset, records, samples):
    for r in records:
        s = samples[r["id"]]
        assert s.record == r
        with Image.open(dataset / r["image"]) as im:
            saved = np.asarray(im.convert("RGB"))
        image, masks = render_scene(s.spec)
        assert np.array_equal(np.asarray(image), saved)
        for k, (o, mask) in enumerate(zip(r["objects"], masks)):
            assert mask.any()
            assert sw.mask_box(mask) == o["box"]  # the box is tight around the visible pixels
            if o["shape"] != "text":
                assert (saved[mask] == np.array(COLORS[o["color"]])).all()
                full = sw._coverage(s.spec.objects[k], r["width"], r["height"])
                assert mask.sum() >= 0.6 * full.sum()  # at least 60% visible


def test_referring_text_round_trips(records):
    for r in records:
        question = r["conversations"][0]["value"]
        parsed = referring.parse_regions(question)
        regions = r.get("regions", [])
        assert len(parsed) == len(regions)
        if regions:
            assert r["region"] == regions[0]
        for reg, p in zip(regions, parsed):
            assert p.kind == reg["kind"]
            px = p.to_pixels(r["width"], r["height"])
            sides = [r["width"] if i % 2 == 0 else r["height"] for i in range(len(px))]
            assert len(px) == len(reg["pixels"])
            assert all(abs(a - b) <= s / 1000 for a, b, s in zip(px, reg["pixels"], sides))
        # every region is written exactly as chatspot_edge.referring writes it
        for m in re.finditer(r"<box>\[([^\]]*)\]</box>", question + r["conversations"][1]["value"]):
            assert all(re.fullmatch(r"\d\.\d{3}", v) for v in m.group(1).split(","))


def _turns(r: dict) -> list[tuple[str, dict, list, str, str]]:
    """(task, target, regions, question, answer) of every turn of a record: the scheduled one, then the extra."""
    conv = r["conversations"]
    out = [(r["task"], r["target"], r.get("regions", []), conv[0]["value"], conv[1]["value"])]
    for k, t in enumerate(r.get("turns", [])):
        out.append((t["task"], t["target"], t.get("regions", []), conv[2 + 2 * k]["value"], conv[3 + 2 * k]["value"]))
    return out


def test_task_answers(records, samples):
    n_extra = 0
    for r in records:
        objs = r["objects"]
        masks = samples[r["id"]].masks
        for turn, (task, target, regions, question, answer) in enumerate(_turns(r)):
            n_extra += turn > 0
            assert len(referring.parse_regions(question)) == len(regions)
            for reg, parsed in zip(regions, referring.parse_regions(question)):
                px = parsed.to_pixels(r["width"], r["height"])
                assert all(abs(a - b) <= max(r["width"], r["height"]) / 1000 for a, b in zip(px, reg["pixels"]))
            _check_answer(r, objs, masks, samples, task, target, regions, answer)
    assert n_extra == sum(sw.EXTRA_TURNS[r["id"].split("-")[0]] for r in records)


def _check_answer(r, objs, masks, samples, task, target, regions, answer) -> None:
        if task == "region_recognition":
            o = objs[target["object"]]
            assert o["shape"] != "text"
            assert f"{o['color']} {o['shape']}" in answer
            reg = regions[0]
            if reg["kind"] == "box":
                assert reg["pixels"] == o["box"]
            elif reg["kind"] == "point":
                x, y = reg["pixels"]
                assert masks[target["object"]][int(y), int(x)]
        elif task == "point_qa":
            o = objs[target["object"]]
            x, y = regions[0]["pixels"]
            assert regions[0]["kind"] == "point" and masks[target["object"]][int(y), int(x)]
            assert target["attribute"] in ("color", "shape")
            assert target["answer"] == o[target["attribute"]] and o[target["attribute"]] in answer
        elif task == "region_ocr":
            o = objs[target["object"]]
            assert o["shape"] == "text" and answer == o["text"] == target["answer"]
            assert o["text"].lower() in sw.WORDS or (o["text"].isdigit() and 3 <= len(o["text"]) <= 4)
            assert regions[0]["pixels"] == o["box"]
        elif task == "region_relation":
            i, j = target["objects"]
            assert i != j and [reg["pixels"] for reg in regions] == [objs[i]["box"], objs[j]["box"]]
            assert target["answer"] in ("left", "right", "above", "below", "yes", "no")
            if answer in ("yes", "no"):
                assert target["relation"] in ("left", "right", "above", "below", "larger", "smaller")
            elif " " in answer:  # detailed: "The red triangle is to the left of the blue circle."
                phrase = sw.RELATION_PHRASES[target["relation"]]
                assert answer == f"The {objs[i]['color']} {objs[i]['shape']} is {phrase} the {objs[j]['color']} {objs[j]['shape']}."
            else:
                assert answer == target["relation"] in ("left", "right", "above", "below")
        elif task == "grounding":
            o = objs[target["object"]]
            (box,) = referring.parse_regions(answer)
            assert referring.iou(box.to_pixels(r["width"], r["height"]), o["box"]) > 0.97
            assert target["description"] in sw.unique_descriptions(samples[r["id"]].spec.objects, target["object"])
        elif task == "counting":
            assert int(re.search(r"\d+", answer).group()) == target["answer"]
        elif task == "image_caption":
            assert answer == target["answer"]


def test_extra_turns_leave_the_first_turn_and_the_test_split_as_version_1():
    """The extra turns draw from their own generator: the image, objects and first question of a training
    sample, and every test sample, are what they were without them."""
    saved = dict(sw.EXTRA_TURNS)
    try:
        with_turns = [sw.make_sample(5, "train", i).record for i in range(6)]
        sw.EXTRA_TURNS.update(train=0)
        without = [sw.make_sample(5, "train", i).record for i in range(6)]
    finally:
        sw.EXTRA_TURNS.update(saved)
    for a, b in zip(with_turns, without):
        assert a["conversations"][:2] == b["conversations"] and "turns" not in b
        assert {k: v for k, v in a.items() if k not in ("conversations", "turns")} == {k: v for k, v in b.items() if k != "conversations"}
        assert len(a["turns"]) == sw.EXTRA_TURNS["train"]
    assert "turns" not in sw.make_sample(5, "test", 0).record


def test_recognition_uses_all_region_kinds():
    kinds = set()
    for index in range(80):
        rec = sw.make_sample(3, "train", index, "region_recognition").record
        kinds.add(rec["region"]["kind"])
        if len(kinds) == 3:
            break
    assert kinds == {"box", "point", "polygon"}


def test_task_schedule_matches_mix():
    sched = sw.task_schedule("train", 1000)
    assert sw.task_schedule("train", 10) == sched[:10]
    for task, pct in sw.TRAIN_MIX.items():
        assert sched.count(task) == pct * 10
    test = sw.task_schedule("test", 100)
    assert test.count("region_recognition") >= 40


# --- loader ---------------------------------------------------------------------------------------------


def test_loader_reads_foreign_records_and_images(dataset, tmp_path):
    rec = load_split(dataset, "train")[0]
    img = load_image(dataset, rec)
    assert img.mode == "RGB" and img.size == (rec["width"], rec["height"])
    # a minimal LLaVA record without width/height: the size comes from the image
    Image.new("RGB", (30, 20), (1, 2, 3)).save(tmp_path / "a.png")
    line = {"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nhi"}]}
    (tmp_path / "val.jsonl").write_text(json.dumps(line) + "\n\n")
    (r,) = load_split(tmp_path, "val")
    assert (r["width"], r["height"]) == (30, 20)
    bad = dict(r, width=31)
    with pytest.raises(InputError, match="30x20"):
        load_image(tmp_path, bad)


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ('{"id": "x", "image": "a.png"}', "conversations"),
    ('{"id": "x", "image": "a.png", "conversations": []}', "non-empty"),
    ('[1, 2]', "JSON object"),
    ('{"id": "x", "image": "missing.png", "conversations": [{"from": "human", "value": "q"}]}', "not found"),
])
def test_loader_rejects_malformed_lines(tmp_path, line, message):
    good = {"id": "g", "image": "a.png", "width": 4, "height": 4, "conversations": [{"from": "human", "value": "q"}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(InputError, match=message) as e:
        load_split(tmp_path, "train")
    assert "train.jsonl:2" in str(e.value)


def test_loader_missing_split(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_split(tmp_path, "train")
