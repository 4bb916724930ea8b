"""ChatSpot's evaluation protocol, made exact (SPEC section 6).

Scoring works on any answerer (`answer(requests) -> answers`): a torch checkpoint, or a bundle through the
runtime, so both are measured by the same code. Greedy decoding is the answerer's job.

- region recognition: the answer names the referred object's color AND shape ("red triangle" as words);
- point QA: the answer contains the asked attribute's value as a word;
- regional OCR: case-insensitive exact text (surrounding quotes, spaces and a final period ignored);
- grounding: the first box region of the answer, in either referring format (`<box>[x1,y1,x2,y2]</box>`, or
  `<box><loc_x1><loc_y1><loc_x2><loc_y2></box>` decoded with the model's bins), has IoU >= 0.5 with the target;
- box-noise robustness: region-recognition samples whose region is a box, each coordinate moved by
  U[-s, s] x (box width or height), clipped to the image, at s in {0.1, 0.2, 0.3} (seeded per record);
- hallucination: fraction of region-recognition answers that name ANOTHER object of the image (its color
  and shape, different from the referred object's) instead of the referred one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
from PIL import Image

from chatspot_edge import referring

NOISE_LEVELS = (0.1, 0.2, 0.3)
METRIC_KEYS = ("region_recognition", "point_qa", "region_ocr", "grounding",
               "noise_0.1", "noise_0.2", "noise_0.3", "hallucination")


@dataclass
class Request:
    """One question on one image. `question` is the human turn (`<image>\\n` + text with `<box>` regions
    in chatspot-text-v1); `image_key` identifies the image so answerers can reuse its encoding."""

    image: Callable[[], Image.Image]
    image_key: str
    question: str


class Answerer(Protocol):
    """`answer` gives one answer per request. An answerer whose model speaks chatspot-loc-v1 also has
    `referring` (a `referring.ReferringFormat`): its bins decode `<loc_k>` in grounding answers."""

    def answer(self, requests: Sequence[Request]) -> list[str]: ...


def _words(text: str) -> str:
    return " " + re.sub(r"[^a-z0-9]+", " ", text.lower()).strip() + " "


def names(answer: str, color: str, shape: str) -> bool:
    """True if `answer` contains '<color> <shape>' as adjacent words."""
    return f" {color} {shape} " in _words(answer)


def contains_word(answer: str, word: str) -> bool:
    return f" {word.lower()} " in _words(answer)


def ocr_match(answer: str, text: str) -> bool:
    a = answer.strip().strip(".").strip().strip("\"'").strip()
    return a.lower() == text.strip().lower()


def grounding_hit(answer: str, target_px: Sequence[float], width: int, height: int, bins: int | None = None) -> bool:
    """The answer's first box (either format; `bins`: the model's chatspot-loc-v1 bins) has IoU >= 0.5 with
    the target box (pixels of a `width` x `height` image)."""
    regions = [r for r in referring.parse_regions(answer, bins) if r.kind == "box"]
    if not regions:
        return False
    pred = regions[0].coords
    tgt = (target_px[0] / width, target_px[1] / height, target_px[2] / width, target_px[3] / height)
    return referring.iou(pred, tgt) >= 0.5


def noisy_box(box: Sequence[float], s: float, width: int, height: int, rng: np.random.Generator) -> list[float]:
    """Each coordinate moved by U[-s, s] x (box width for x, box height for y), clipped to the image; a box
    that collapses keeps at least one pixel of extent."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    d = rng.uniform(-s, s, size=4) * np.array([bw, bh, bw, bh])
    nx1, ny1, nx2, ny2 = (x1 + d[0], y1 + d[1], x2 + d[2], y2 + d[3])
    nx1, nx2 = sorted((min(max(nx1, 0.0), width), min(max(nx2, 0.0), width)))
    ny1, ny2 = sorted((min(max(ny1, 0.0), height), min(max(ny2, 0.0), height)))
    if nx2 - nx1 < 1:
        nx1, nx2 = max(0.0, nx1 - 0.5), min(float(width), nx2 + 0.5)
    if ny2 - ny1 < 1:
        ny1, ny2 = max(0.0, ny1 - 0.5), min(float(height), ny2 + 0.5)
    return [nx1, ny1, nx2, ny2]


def _question(record: dict) -> str:
    return record["conversations"][0]["value"]


def _replace_region(question: str, new_text: str) -> str:
    spans = referring.region_spans(question)
    assert spans, question
    start, end, _ = spans[0]
    return question[:start] + new_text + question[end:]


@dataclass
class _Item:
    kind: str  # metric family
    record: dict
    request: Request
    level: float = 0.0


def build_items(records: Sequence[dict], load: Callable[[dict], Image.Image], seed: int = 0,
                noise: bool = True) -> list[_Item]:
    items: list[_Item] = []
    for idx, rec in enumerate(records):
        task = rec.get("task")
        key = rec["id"]
        loader = (lambda r=rec: load(r))
        q = _question(rec)
        items.append(_Item(task, rec, Request(loader, key, q)))
        region = rec.get("region") or {}
        if noise and task == "region_recognition" and region.get("kind") == "box":
            w, h = rec["width"], rec["height"]
            items.append(_Item("noise", rec, Request(loader, key, q), 0.0))
            for s in NOISE_LEVELS:
                rng = np.random.default_rng([seed, idx, int(round(s * 1000))])
                nb = noisy_box(region["pixels"], s, w, h, rng)
                text = referring.box(*nb, w, h).text()
                items.append(_Item("noise", rec, Request(loader, key, _replace_region(q, text)), s))
    return items


def score(items: Sequence[_Item], answers: Sequence[str], bins: int | None = None) -> dict:
    """Metrics of `answers` (one per item). `bins`: the answering model's chatspot-loc-v1 bins, if it speaks it."""
    hits: dict[str, list[bool]] = {}
    halluc: list[bool] = []

    def add(name: str, ok: bool) -> None:
        hits.setdefault(name, []).append(bool(ok))

    for it, ans in zip(items, answers):
        rec, tgt = it.record, it.record.get("target") or {}
        objs = rec.get("objects") or []
        if it.kind == "region_recognition":
            o = objs[tgt["object"]]
            ok = names(ans, o["color"], o["shape"])
            add("region_recognition", ok)
            other = any(names(ans, p["color"], p["shape"]) for j, p in enumerate(objs)
                        if j != tgt["object"] and "color" in p and p.get("shape") != "text"
                        and (p["color"], p["shape"]) != (o["color"], o["shape"]))
            halluc.append(other and not ok)
        elif it.kind == "noise":
            o = objs[tgt["object"]]
            add(f"noise_{it.level:.1f}", names(ans, o["color"], o["shape"]))
        elif it.kind == "point_qa":
            value = tgt.get("answer") or objs[tgt["object"]][tgt["attribute"]]
            add("point_qa", contains_word(ans, value))
        elif it.kind == "region_ocr":
            add("region_ocr", ocr_match(ans, tgt.get("answer") or objs[tgt["object"]]["text"]))
        elif it.kind == "grounding":
            add("grounding", grounding_hit(ans, objs[tgt["object"]]["box"], rec["width"], rec["height"], bins))
        elif it.kind == "region_relation":
            add("region_relation", contains_word(ans, str(tgt.get("answer", ""))))
        elif it.kind == "counting":
            add("counting", contains_word(ans, str(tgt.get("answer", ""))))
    mean = lambda v: float(np.mean(v)) if v else None  # noqa: E731
    metrics = {k: mean(hits.get(k, [])) for k in METRIC_KEYS if k != "hallucination"}
    metrics["hallucination"] = mean(halluc)
    metrics = {k: metrics[k] for k in METRIC_KEYS}
    extra = {k: mean(v) for k, v in hits.items() if k not in METRIC_KEYS}
    counts = {k: len(v) for k, v in hits.items()}
    return {"metrics": metrics, "extra_metrics": extra, "counts": counts}


def evaluate(answerer: Answerer, records: Sequence[dict], load: Callable[[dict], Image.Image], seed: int = 0,
             progress: Callable[[int, int], None] | None = None, chunk: int = 64, noise: bool = True) -> dict:
    """SPEC-6 result dict: {"n", "metrics", ...} with extra diagnostics (`extra_metrics`, `counts`, `samples`)."""
    items = build_items(records, load, seed, noise)
    answers: list[str] = []
    for i in range(0, len(items), chunk):
        answers += answerer.answer([it.request for it in items[i:i + chunk]])
        if progress:
            progress(min(i + chunk, len(items)), len(items))
    fmt = getattr(answerer, "referring", None)  # the model's referring format decodes its grounding answers
    result = {"n": len(records), **score(items, answers, fmt.bins if fmt is not None else None)}
    result["answers"] = answers  # every answer, in item order: parity between two answerers is a list compare
    result["samples"] = [{"id": it.record["id"], "kind": it.kind, "level": it.level, "question": it.request.question,
                          "answer": a, "label": it.record["conversations"][1]["value"]}
                         for it, a in list(zip(items, answers))[:50]]
    return result
