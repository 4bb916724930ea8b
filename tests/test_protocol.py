"""Evaluation protocol (SPEC section 6, `evaluation/protocol.py`): every scoring rule on hand-written answers
that must score and answers that must not, the noisy boxes, the items built from records, the metrics of a
whole run, and SpotWorld's own labels (which must score perfectly).

Grounding answers are written by each referring format a bundle may speak (`FORMATS`, SPEC section 1): a new
format adds its box writer there and every format-independent grounding case runs for it too."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from chatspot_edge import referring
from chatspot_edge.evaluation.protocol import (METRIC_KEYS, NOISE_LEVELS, build_items, contains_word, evaluate,
                                               grounding_hit, names, noisy_box, ocr_match, score)


def _text_v1(coords) -> str:
    return referring.Region("box" if len(coords) == 4 else "point", tuple(coords)).text()


class _Writer:
    """How a model speaking `fmt` writes normalized coordinates; `bins` goes to the scorer (loc tokens)."""

    def __init__(self, fmt: referring.ReferringFormat):
        self.fmt, self.bins = fmt, fmt.bins

    def __call__(self, coords) -> str:
        return self.fmt.write(referring.Region("box" if len(coords) == 4 else "point", tuple(coords)))


# referring format -> how a model writes normalized coordinates
FORMATS = {f.name: _Writer(f) for f in (referring.TEXT, referring.ReferringFormat(referring.LOC_FORMAT, 32))}


# -- region recognition: color AND shape, as adjacent words ------------------------------------------------------

@pytest.mark.parametrize("answer", [
    "a red triangle", "It is a large red triangle.", "RED TRIANGLE", "Red Triangle!", "red-triangle", "red\ntriangle",
    "The object in the box is a red triangle, next to the text.",
])
def test_names_scores(answer):
    assert names(answer, "red", "triangle")


@pytest.mark.parametrize("answer", [
    "a triangle", "a red one", "a blue triangle", "a red circle",  # one of the two words
    "a triangle that is red", "triangle red",  # both, but not as "<color> <shape>"
    "a crimson triangle", "a red trigon",  # synonyms are not the dataset's words
    "a reddish triangle", "red triangles", "redtriangle",  # words, not substrings
    "",
])
def test_names_does_not_score(answer):
    assert not names(answer, "red", "triangle")


# -- point QA, relations, counting: the value as a word ----------------------------------------------------------

@pytest.mark.parametrize("answer,value", [
    ("white", "white"), ("White.", "white"), ("It is white.", "white"), ("large", "large"), ("3", "3"),
    ("There are 3 of them.", "3"), ("No.", "no"), ("YES", "yes"),
])
def test_contains_word_scores(answer, value):
    assert contains_word(answer, value)


@pytest.mark.parametrize("answer,value", [
    ("whitish", "white"), ("black", "white"), ("larger", "large"), ("13", "3"), ("three", "3"), ("", "white"),
    ("not", "no"), ("yesterday", "yes"),
])
def test_contains_word_does_not_score(answer, value):
    assert not contains_word(answer, value)


# -- regional OCR: case-insensitive exact text --------------------------------------------------------------------

@pytest.mark.parametrize("answer", ["Sleep", "sleep", "SLEEP", "sLeEp", "sleep.", "  sleep  ", '"sleep"', "'SLEEP'.",
                                    '"Sleep."'])
def test_ocr_scores_whatever_the_case(answer):
    assert ocr_match(answer, "Sleep")


@pytest.mark.parametrize("answer", ["sleeps", "sleep well", "The word is sleep.", "slep", "s l e e p", "sleep sleep",
                                    "", "."])
def test_ocr_does_not_score(answer):
    assert not ocr_match(answer, "Sleep")


def test_ocr_target_case_and_spaces_do_not_matter():
    assert ocr_match("house", "HOUSE ") and ocr_match("HOUSE", "house") and not ocr_match("houses", "HOUSE")


# -- grounding: the answer's first box, IoU >= 0.5 ---------------------------------------------------------------

W, H = 400, 200  # not square: x and y normalize by different sides
TARGET_PX = (40, 50, 160, 150)  # normalized (0.1, 0.25, 0.4, 0.75)
TARGET = (0.1, 0.25, 0.4, 0.75)
WRONG = (0.6, 0.25, 0.9, 0.75)


@pytest.fixture(params=sorted(FORMATS))
def write_box(request):
    return FORMATS[request.param]


@pytest.mark.parametrize("template", ["{box}", "It is here: {box}.", "{point} no, {box}", "{box} and {wrong}"])
def test_grounding_hits(write_box, template):
    # a point is not a box: the first BOX counts
    answer = template.format(box=write_box(TARGET), wrong=write_box(WRONG), point=write_box((0.9, 0.9)))
    assert grounding_hit(answer, TARGET_PX, W, H, write_box.bins), answer


def test_grounding_hits_a_box_a_little_off(write_box):
    assert referring.iou((0.12, 0.27, 0.41, 0.74), TARGET) > 0.85
    assert grounding_hit(write_box((0.12, 0.27, 0.41, 0.74)), TARGET_PX, W, H, write_box.bins)


@pytest.mark.parametrize("case", ["wrong place", "axes swapped", "normalized by the other side", "wrong box first",
                                  "nothing"])
def test_grounding_misses(write_box, case):
    answer = {
        "wrong place": write_box(WRONG),
        "axes swapped": write_box((0.25, 0.1, 0.75, 0.4)),
        "normalized by the other side": write_box((40 / H, 50 / W, 160 / H, 150 / W)),
        "wrong box first": write_box(WRONG) + " " + write_box(TARGET),
        "nothing": "at the top left",
    }[case]
    assert not grounding_hit(answer, TARGET_PX, W, H, write_box.bins), answer


@pytest.mark.parametrize("answer", [
    "<box>[0.100,0.250]</box>",  # a point at the target's corner
    "<box>[0.100,0.250,0.400]</box>",  # three numbers: malformed
    "<box>[40,50,160,150]</box>",  # pixels, not normalized
    "<box>[0.100,0.250,0.400,0.750</box>",  # unclosed
])
def test_grounding_rejects_text_v1_that_is_not_a_normalized_box(answer):
    assert not grounding_hit(answer, TARGET_PX, W, H)


@pytest.mark.parametrize("pred,iou,hit", [
    ((0.0, 0.0, 0.5, 0.25), 0.5, True),  # exactly 0.5 counts (>=); every number exact in binary
    ((0.0, 0.0, 0.5, 0.251), 0.502, True),
    ((0.0, 0.0, 0.5, 0.249), 0.498, False),
])
def test_grounding_threshold_on_a_256_px_image(pred, iou, hit):
    target_px, target = (0, 0, 128, 128), (0.0, 0.0, 0.5, 0.5)
    assert referring.iou(pred, target) == pytest.approx(iou, abs=1e-12)
    assert grounding_hit(_text_v1(pred), target_px, 256, 256) is hit


@pytest.mark.parametrize("shift,hit", [(0.099, True), (0.101, False)])
def test_grounding_threshold_for_a_shifted_box(shift, hit):
    """The target moved right by `shift`: IoU = (0.3 - shift) / (0.3 + shift), 0.5 at shift 0.1."""
    x1, y1, x2, y2 = TARGET
    pred = (round(x1 + shift, 3), y1, round(x2 + shift, 3), y2)
    assert referring.iou(pred, TARGET) == pytest.approx((0.3 - shift) / (0.3 + shift), abs=1e-9)
    assert grounding_hit(_text_v1(pred), TARGET_PX, W, H) is hit


def test_iou():
    a = (0.1, 0.1, 0.3, 0.5)
    assert referring.iou(a, a) == pytest.approx(1.0)
    assert referring.iou(a, (0.3, 0.1, 0.5, 0.5)) == 0.0  # touching edges
    assert referring.iou(a, (0.6, 0.6, 0.9, 0.9)) == 0.0
    assert referring.iou((0.0, 0.0, 1.0, 1.0), (0.0, 0.0, 0.5, 0.5)) == pytest.approx(0.25)  # contained
    assert referring.iou((0.0, 0.0, 0.2, 0.2), (0.1, 0.1, 0.3, 0.3)) == pytest.approx(0.01 / 0.07)
    assert referring.iou((0.5, 0.5, 0.5, 0.5), (0.5, 0.5, 0.5, 0.5)) == 0.0  # no area: no overlap


# -- box-noise robustness: U[-s, s] x box side per coordinate, clipped ---------------------------------------------

def test_noisy_box_without_noise_is_the_box():
    assert noisy_box([20, 30, 80, 90], 0.0, 200, 100, np.random.default_rng(0)) == [20, 30, 80, 90]


@st.composite
def boxes_in_images(draw):
    w, h = draw(st.integers(16, 4000)), draw(st.integers(16, 4000))
    bw = draw(st.floats(max(2.0, 0.02 * w), w))
    bh = draw(st.floats(max(2.0, 0.02 * h), h))
    x1, y1 = draw(st.floats(0, w - bw)), draw(st.floats(0, h - bh))
    return w, h, [x1, y1, x1 + bw, y1 + bh]


@given(boxes_in_images(), st.sampled_from(NOISE_LEVELS), st.integers(0, 2**32 - 1))
def test_noisy_box_moves_each_coordinate_within_s_and_stays_in_the_image(arg, s, seed):
    w, h, b = arg
    nb = noisy_box(b, s, w, h, np.random.default_rng(seed))
    bw, bh = b[2] - b[0], b[3] - b[1]
    assert 0 <= nb[0] < nb[2] <= w and 0 <= nb[1] < nb[3] <= h
    for got, orig, side in zip(nb, b, (bw, bh, bw, bh)):
        assert abs(got - orig) <= s * side + 1e-9  # clipping to the image only moves it back towards the box
    assert nb[2] - nb[0] >= (1 - 2 * s) * bw - 1e-9 and nb[3] - nb[1] >= (1 - 2 * s) * bh - 1e-9
    assert noisy_box(b, s, w, h, np.random.default_rng(seed)) == nb  # the seed decides
    referring.box(*nb, w, h)  # a noisy box can always be written as a question


def test_noisy_box_offsets_are_uniform_over_the_whole_range():
    box, bw, bh = [200, 100, 260, 140], 60, 40
    for s in NOISE_LEVELS:
        d = np.array([noisy_box(box, s, 1000, 1000, np.random.default_rng(i)) for i in range(400)]) - box
        rel = d / np.array([bw, bh, bw, bh]) / s  # U[-1, 1] per coordinate
        assert rel.min() < -0.95 and rel.max() > 0.95 and np.abs(rel).max() <= 1 + 1e-9
        assert np.abs(rel.mean(0)).max() < 0.12 and np.all(np.abs(rel.std(0) - 1 / np.sqrt(3)) < 0.06)
        assert np.abs(np.corrcoef(rel.T) - np.eye(4)).max() < 0.2  # the four coordinates move independently


def test_noisy_box_clips_to_the_border_and_keeps_a_pixel():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x1, y1, x2, y2 = noisy_box([0, 0, 10, 10], 0.3, 10, 10, rng)  # the whole image: every move is clipped
        assert 0 <= x1 < x2 <= 10 and 0 <= y1 < y2 <= 10
    for _ in range(200):  # s > 0.5 can cross the corners: a collapsed box keeps one pixel
        x1, y1, x2, y2 = noisy_box([500, 500, 502, 502], 2.0, 1000, 1000, rng)
        assert x2 - x1 >= 1 - 1e-9 and y2 - y1 >= 1 - 1e-9


# -- items: one per record, plus the noisy copies of box region-recognition questions -----------------------------

OBJECTS = [
    {"box": [20, 30, 80, 90], "shape": "triangle", "color": "red", "size": "large"},
    {"box": [120, 10, 160, 50], "shape": "circle", "color": "blue", "size": "small"},
    {"box": [100, 70, 180, 90], "shape": "text", "color": "green", "size": "small", "text": "Sleep"},
]
RW, RH = 200, 100


def _record(rid: str, task: str, question: str, target: dict, region: dict | None = None, label: str = "") -> dict:
    rec = {"id": rid, "image": f"images/{rid}.png", "width": RW, "height": RH, "objects": OBJECTS, "task": task,
           "conversations": [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": label}],
           "target": target}
    if region is not None:
        rec["region"] = region
    return rec


BOX_Q = "Describe the object in " + referring.box(20, 30, 80, 90, RW, RH).text() + " in detail."
RR_BOX = _record("rr-box", "region_recognition", BOX_Q, {"object": 0}, {"kind": "box", "pixels": [20, 30, 80, 90]})
RR_POINT = _record("rr-point", "region_recognition", "What is at " + referring.point(50, 60, RW, RH).text() + "?",
                   {"object": 0}, {"kind": "point", "pixels": [50, 60]})


def _load(record):  # scoring never needs the image
    raise AssertionError("the image was loaded")


def test_items_box_recognition_gets_noisy_copies():
    items = build_items([RR_BOX, RR_POINT], _load)
    assert [(it.kind, it.level) for it in items] == [("region_recognition", 0.0), ("noise", 0.0)] + [
        ("noise", s) for s in NOISE_LEVELS] + [("region_recognition", 0.0)]
    original = RR_BOX["conversations"][0]["value"]
    assert items[0].request.question == items[1].request.question == original
    assert all(it.request.image_key == "rr-box" for it in items[:5]) and items[5].request.image_key == "rr-point"
    before, after = original.split(referring.box(20, 30, 80, 90, RW, RH).text())
    for it in items[2:5]:
        q = it.request.question
        assert q != original and q.startswith(before) and q.endswith(after)  # only the box text changed
        (region,) = referring.parse_regions(q)
        moved = np.array(region.to_pixels(RW, RH)) - [20, 30, 80, 90]
        assert np.all(np.abs(moved) <= it.level * np.array([60, 60, 60, 60]) + 0.0005 * RW + 1e-9)
    assert [it.kind for it in build_items([RR_BOX], _load, noise=False)] == ["region_recognition"]


def test_items_are_seeded():
    q = lambda seed: [it.request.question for it in build_items([RR_BOX], _load, seed=seed)]  # noqa: E731
    assert q(0) == q(0) and q(0)[2:] != q(1)[2:] and q(0)[:2] == q(1)[:2]


# -- score: the metrics of hand-written answers --------------------------------------------------------------------

RECORDS_AND_ANSWERS = [
    # region recognition (no noise copies: noise=False below), hallucination = another object named instead
    (RR_POINT, "It is a small red triangle.", dict(ok=True, halluc=False)),
    (RR_POINT, "a blue circle", dict(ok=False, halluc=True)),
    (RR_POINT, "a green square", dict(ok=False, halluc=False)),  # names no object of the image
    (RR_POINT, "a red triangle next to a blue circle", dict(ok=True, halluc=False)),  # right one named too
    (RR_POINT, "green text", dict(ok=False, halluc=False)),  # rendered text is not an object to hallucinate
    (RR_POINT, "a blue triangle", dict(ok=False, halluc=False)),
    (_record("pq1", "point_qa", "What color?", {"object": 1, "attribute": "color", "answer": "blue"}), "Blue.", {}),
    (_record("pq2", "point_qa", "What color?", {"object": 1, "attribute": "color", "answer": "blue"}), "red", {}),
    (_record("pq3", "point_qa", "What shape?", {"object": 1, "attribute": "shape"}), "a circle", {}),  # value from objects
    (_record("ocr1", "region_ocr", "Which word?", {"object": 2, "answer": "Sleep"}), "SLEEP", {}),
    (_record("ocr2", "region_ocr", "Which word?", {"object": 2}), "sleeps", {}),  # text from objects
    (_record("g1", "grounding", "Locate the red triangle.", {"object": 0}), "<box>[0.100,0.300,0.400,0.900]</box>", {}),
    (_record("g2", "grounding", "Locate the red triangle.", {"object": 0}), "<box>[0.300,0.100,0.900,0.400]</box>", {}),
    (_record("rel1", "region_relation", "Left of?", {"objects": [0, 1], "answer": "no"}), "No.", {}),
    (_record("rel2", "region_relation", "Left of?", {"objects": [0, 1], "answer": "no"}), "yes", {}),
    (_record("cnt1", "counting", "How many?", {"answer": 3}), "3", {}),
    (_record("cnt2", "counting", "How many?", {"answer": 3}), "13", {}),
    (_record("cap", "image_caption", "Describe the image.", {"answer": "..."}), "anything", {}),
]


def test_score_hand_written_answers():
    records = [r for r, _, _ in RECORDS_AND_ANSWERS]
    items = build_items(records, _load, noise=False)
    assert len(items) == len(records)
    res = score(items, [a for _, a, _ in RECORDS_AND_ANSWERS])
    assert list(res["metrics"]) == list(METRIC_KEYS)
    assert res["metrics"] == {
        "region_recognition": pytest.approx(2 / 6), "point_qa": pytest.approx(2 / 3), "region_ocr": 0.5,
        "grounding": 0.5, "noise_0.1": None, "noise_0.2": None, "noise_0.3": None,  # no noisy items: None, not 0
        "hallucination": pytest.approx(1 / 6)}
    assert res["extra_metrics"] == {"region_relation": 0.5, "counting": 0.5}
    assert res["counts"] == {"region_recognition": 6, "point_qa": 3, "region_ocr": 2, "grounding": 2,
                             "region_relation": 2, "counting": 2}


@pytest.mark.parametrize("answer,ok,halluc", [(a, e["ok"], e["halluc"]) for _, a, e in RECORDS_AND_ANSWERS if e])
def test_score_each_recognition_answer(answer, ok, halluc):
    res = score(build_items([RR_POINT], _load), [answer])
    assert res["metrics"]["region_recognition"] == float(ok) and res["metrics"]["hallucination"] == float(halluc)


class Scripted:
    """Answers each request with `reply(request)`; records every request it saw."""

    def __init__(self, reply):
        self.reply, self.seen = reply, []

    def answer(self, requests):
        self.seen += list(requests)
        return [self.reply(r) for r in requests]


def test_noise_levels_score_the_noisy_questions():
    """An answerer that is right only on the unperturbed box: 1.0 without noise, 0.0 at every noise level."""
    original = RR_BOX["conversations"][0]["value"]
    res = evaluate(Scripted(lambda r: "a red triangle" if r.question == original else "a blue circle"), [RR_BOX], _load)
    m = res["metrics"]
    assert m["region_recognition"] == 1.0 and res["extra_metrics"]["noise_0.0"] == 1.0
    assert m["noise_0.1"] == m["noise_0.2"] == m["noise_0.3"] == 0.0 and m["hallucination"] == 0.0
    assert res["counts"]["noise_0.1"] == 1


def test_evaluate_keeps_item_order_across_chunks():
    records = [RR_BOX, RR_POINT] + [r for r, _, _ in RECORDS_AND_ANSWERS[6:]]
    reply = lambda r: f"{r.image_key}:{r.question}"  # noqa: E731
    calls = []
    whole = evaluate(Scripted(reply), records, _load, chunk=64)
    bits = evaluate(Scripted(reply), records, _load, chunk=3, progress=lambda done, total: calls.append((done, total)))
    assert whole["answers"] == bits["answers"] and whole["n"] == bits["n"] == len(records)
    n_items = len(whole["answers"])
    assert n_items == len(records) + 4 and calls[-1] == (n_items, n_items) and len(calls) == -(-n_items // 3)
    assert [a.split(":", 1)[0] for a in whole["answers"][:6]] == ["rr-box"] * 5 + ["rr-point"]


# -- SpotWorld's own labels score perfectly; another object's name is a hallucination -------------------------------

@pytest.fixture(scope="module")
def spotworld(tmp_path_factory):
    from chatspot_edge.data import generate, load_split

    d = tmp_path_factory.mktemp("protocol") / "sw"
    generate(d, seed=5, n_train=1, n_test=60, workers=1)
    return load_split(d, "test")


def test_dataset_labels_score_perfectly(spotworld):
    by_id = {r["id"]: r for r in spotworld}
    res = evaluate(Scripted(lambda q: by_id[q.image_key]["conversations"][1]["value"]), spotworld, _load)
    assert set(res["counts"]) >= {"region_recognition", "point_qa", "region_ocr", "grounding", "noise_0.1",
                                  "region_relation", "counting"}  # every scored task is in the sample
    m = res["metrics"]
    assert all(m[k] == 1.0 for k in METRIC_KEYS if k != "hallucination"), m
    assert m["hallucination"] == 0.0 and all(v == 1.0 for v in res["extra_metrics"].values()), res["extra_metrics"]


def test_naming_another_object_is_a_hallucination(spotworld):
    def other(rec):
        o = rec["objects"][rec["target"]["object"]]
        for p in rec["objects"]:
            if p["shape"] != "text" and (p["color"], p["shape"]) != (o["color"], o["shape"]):
                return p
        return None

    by_id = {r["id"]: r for r in spotworld}
    rr = [r for r in spotworld if r["task"] == "region_recognition"]
    with_other = [r for r in rr if other(r) is not None]
    assert with_other  # the check is not vacuous

    def reply(q):
        p = other(by_id[q.image_key])
        return f"It is a {p['size']} {p['color']} {p['shape']}." if p else "I cannot tell."

    res = evaluate(Scripted(reply), rr, _load, noise=False)
    assert res["metrics"]["region_recognition"] == 0.0
    assert res["metrics"]["hallucination"] == pytest.approx(len(with_other) / len(rr))
