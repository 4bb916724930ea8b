"""Does a checkpoint's region embedding carry the word in the region? (issue 17's OCR diagnostic; with `--task
region_recognition`, what the region shows: the plateau diagnostic)

    python -m chatspot_edge.benchmarks.reader_probe CKPT --data DIR --out JSON [--task region_ocr]
        [--attribute shape|color|size] [--epochs 30] [--scratch-epochs 0] [--max-items N]

On the one-box questions of `--task` in DIR's train split (`train.reader.reader_items`; region_ocr: the reading
questions), answers case-folded into classes (those seen at least `MIN_SEEN` times: SpotWorld's 78 words and the
few numbers asked about that often; for region_recognition its phrases, template and all; the rest fall out) or,
with `--attribute`, the attribute of the record's object under the box (SPEC section 5's `objects`, IoU >= 0.5;
the question's template then does not split a class), the first `--max-items` of them if given, the last
`--holdout` items held out (different images from the rest up to a boundary image):
- readout: the share of held-out questions whose answer's first token is the top-1 of the region embedding read
  through the LLM's final norm + tied head (what `region_alignment_loss` and the reader stage train), and the
  share of an answer's distinct tokens among the readout's top k (k = their number: the alignment loss's bag of
  words; recognition answers all start with "a", so this is its figure);
- linear probes (AdamW, standardized features) on the frozen region embedding and on the crop view alone: the
  held-out accuracy says whether the word is in there at all, whatever the LLM does with it;
- `--scratch-epochs N`: the crop view's architecture trained from scratch as a word classifier on the same crops,
  the reference for what the network can read at this crop size (the held-out accuracy after each epoch).
Chance is 1 / classes. Writes JSON (atomic) and prints one line per figure. Beside a training run on a small CPU,
run it with `OMP_NUM_THREADS=1`: two processes spinning 2 threads each on 2 cores took 9x as long per question.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from chatspot_edge.files import atomic_write_text
from chatspot_edge.referring import iou

MIN_SEEN = 5  # an answer is a class if this many reading questions have it


def _fit(x_tr, y_tr, x_te, y_te, epochs: int, lr: float, net: nn.Module, log, name: str, bs: int = 64) -> list[float]:
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-2)
    accs = []
    g = torch.Generator().manual_seed(0)
    for ep in range(epochs):
        net.train()
        perm = torch.randperm(len(y_tr), generator=g)
        for k in range(0, len(perm), bs):
            idx = perm[k:k + bs]
            loss = nn.functional.cross_entropy(net(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            accs.append(round(float((net(x_te).argmax(-1) == y_te).float().mean()), 4))
        log(f"{name}: epoch {ep + 1}/{epochs} ({(ep + 1) * len(y_tr)} crops) held-out accuracy {accs[-1]:.3f}")
    return accs


def _object_attribute(record: dict, box: tuple[float, float, float, float], attribute: str) -> str | None:
    """`attribute` of the record's object that the normalized `box` covers (the best IoU, at least 0.5), or None."""
    w, h = record["width"], record["height"]
    best, value = 0.5, None
    for obj in record.get("objects") or []:
        x1, y1, x2, y2 = obj["box"]
        score = iou(box, (x1 / w, y1 / h, x2 / w, y2 / h))
        if score >= best and obj.get(attribute) is not None:
            best, value = score, str(obj[attribute]).casefold()
    return value


def probe(ckpt: Path, data: Path, epochs: int = 30, scratch_epochs: int = 0, holdout: int = 500,
          task: str = "region_ocr", max_items: int | None = None, attribute: str | None = None, log=print) -> dict:
    from chatspot_edge.data import load_image, load_split
    from chatspot_edge.model.checkpoint import load_checkpoint
    from chatspot_edge.train.reader import reader_inputs, reader_items

    torch.manual_seed(0)
    model, tok = load_checkpoint(ckpt)
    model.eval()
    if model.region is None or model.region.crop != "original":
        raise SystemExit(f"{ckpt}: the model has no crop view (region crop 'original') to probe")
    records = load_split(data, "train")
    items = reader_items(records, tasks=(task,))  # one task's questions, whatever stage 0 trains on
    labels = [_object_attribute(records[it.record], it.box, attribute) if attribute else it.answer.casefold()
              for it in items]
    counts = Counter(a for a in labels if a is not None)
    classes = sorted(a for a, n in counts.items() if n >= MIN_SEEN)
    cls = {a: i for i, a in enumerate(classes)}
    kept = [(it, a) for it, a in zip(items, labels) if a in cls][:max_items]
    items, labels = [it for it, _ in kept], [a for _, a in kept]
    if len(classes) < 2 or len(items) <= holdout + len(classes):
        raise SystemExit(f"{data}: {len(items)} {task} questions in {len(classes)} classes of {MIN_SEEN} or more: "
                         "too few to probe")
    t0 = time.perf_counter()
    crops, context = reader_inputs(model, records, items, lambda rec: load_image(data, rec), frozen_views=True, log=log)
    crops = torch.from_numpy(crops)
    with torch.no_grad():
        view = torch.cat([model.region.crops(crops[k:k + 256]).float() for k in range(0, len(crops), 256)])
        region = context + view  # the region embedding the LLM gets
        answer_ids = [sorted(set(tok.encode(it.answer, add_special_tokens=False))) for it in items]
        first = [tok.encode(it.answer, add_special_tokens=False)[0] for it in items]
        y = torch.tensor([cls[a] for a in labels])
        logits = model.llm.lm_head(model.llm.get_decoder().norm(region))
        top = logits.argmax(-1)
        k_max = max(map(len, answer_ids))
        topk = logits.topk(k_max, dim=-1).indices.tolist()
        bag = [len(set(ids) & set(row[:len(ids)])) / len(ids) for ids, row in zip(answer_ids, topk)]
    log(f"{len(items)} {task} questions, {len(classes)} classes, features in {time.perf_counter() - t0:.0f} s")
    tr, te = slice(0, len(items) - holdout), slice(len(items) - holdout, None)
    result = {"checkpoint": str(ckpt), "data": str(data), "task": task, "attribute": attribute,
              "items": len(items), "classes": len(classes), "holdout": holdout, "chance": round(1 / len(classes), 4),
              "readout_first_token": round(float((top[te] == torch.tensor(first)[te]).float().mean()), 4),
              "readout_answer_tokens": round(sum(bag[te]) / len(bag[te]), 4),
              "region_norm": round(float(region.norm(dim=-1).mean()), 1),
              "crop_view_norm": round(float(view.norm(dim=-1).mean()), 1)}
    log(f"readout (norm + head top-1 = the answer's first token): {result['readout_first_token']:.3f}; "
        f"answer tokens among its top k: {result['readout_answer_tokens']:.3f}")
    for name, feats in (("probe_region_embedding", region), ("probe_crop_view", view)):
        mu, sd = feats[tr].mean(0), feats[tr].std(0) + 1e-6
        z = (feats - mu) / sd
        accs = _fit(z[tr], y[tr], z[te], y[te], epochs, 1e-3, nn.Linear(z.shape[1], len(classes)), lambda m: None, name)
        result[name] = max(accs)
        log(f"{name}: best held-out accuracy {result[name]:.3f} over {epochs} epochs")
    if scratch_epochs:
        net = nn.Sequential(copy.deepcopy(model.region.crops), nn.GELU(),
                            nn.Linear(model.region.proj[-1].out_features, len(classes)))
        for m in net.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        result["scratch"] = _fit(crops[tr], y[tr], crops[te], y[te], scratch_epochs, 1e-3, net, log, "scratch")
        result["scratch_crops_per_epoch"] = len(items) - holdout
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=30, help="linear-probe epochs")
    ap.add_argument("--scratch-epochs", type=int, default=0, help="epochs of the from-scratch reader (0: none)")
    ap.add_argument("--holdout", type=int, default=500, help="last questions held out")
    ap.add_argument("--task", default="region_ocr", help="the questions probed (a SpotWorld task with one box)")
    ap.add_argument("--max-items", type=int, default=None, help="probe the first N questions only")
    ap.add_argument("--attribute", default=None, help="classes: this attribute of the object under the box "
                    "(shape, color, size) instead of the answer")
    a = ap.parse_args(argv)
    res = probe(a.checkpoint, a.data, a.epochs, a.scratch_epochs, a.holdout, a.task, a.max_items, a.attribute)
    atomic_write_text(a.out, json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
