"""Where does grounding fail: finding the object, or writing its box? A diagnostic for issue 17.

For the grounding questions of a split ("Locate the purple circle." -> a box), through a chatspot-loc-v1
checkpoint in PyTorch:

- **teacher-forced coordinates**: at each of the answer's four `<loc_k>` tokens (x1, y1, x2, y2), the model's
  argmax given the TRUE earlier tokens: exact bin, within one bin, mean |error| in bins. x1 is the search (the
  model must find the object from its description); x2 / y2 given x1 / y1 are reading an object it has been
  pointed at.
- **the best constant bin** per coordinate (in hindsight, over the same questions): the score of a model that
  knows where objects tend to be and nothing else.
- **does a head find the object**: at the position that predicts x1, the attention mass each head puts on the
  cells of the target box, renormalized over the image tokens (`train.ground_attn`; uniform attention puts the
  cells' share there); the supervised heads (`SUPERVISED_HEADS` of `supervised_layers`) are what `adapt --ground-attn` trains.
- **greedy answers**: grounding accuracy (IoU >= 0.5) and where each answer box's centre falls: in the target
  object, in another object of the image, or on no object.

  python -m chatspot_edge.benchmarks.grounding_probe CKPT --data DIR [--split test] [--max-items N] [--out JSON]

Measured on the hour-trained mini (docs/results.md, session 12): x2 / y2 within one bin 53-55% given the true
x1 / y1, x1 within one bin 15%, what the best constant bin gets (16% in hindsight on the test answers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from chatspot_edge import referring
from chatspot_edge.errors import InputError
from chatspot_edge.model.chatspot import ChatSpotModel

COORDS = ("x1", "y1", "x2", "y2")


@torch.no_grad()
def teacher_forced(model: ChatSpotModel, tok, records: list[dict], data: Path, autocast: bool = False,
                   batch_size: int = 16, attention: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, true) bins `[n, 4]` at the answer's four loc positions, each prediction given the true earlier
    answer tokens; -1 where the argmax is not a loc token. The records are collated as training collates them
    (`train.adapt.Batches`: the answer as the model learnt it, padding, crops). `attention`: a list that receives,
    per record, the attention mass `[L, H]` every head of every layer puts on the answer box's cells
    (`train.ground_attn.cell_mask`) at the position that predicts x1, renormalized over the image tokens, and
    the share of the image's cells those are (what uniform attention puts there)."""
    from chatspot_edge.model.loc_tokens import loc_token_ids
    from chatspot_edge.model.processor import Processor
    from chatspot_edge.train.adapt import BATCH_META, Batches
    from chatspot_edge.train.ground_attn import (attention_inputs, box_answer_queries, cell_mask, image_attention,
                                                 image_positions)

    locs = loc_token_ids(model)
    batches = Batches(records, data, Processor(tok, model.config), model.config.vision.image_size, seed=0,
                      max_tokens=1 << 20)
    out = np.full((len(records), 4), -1, dtype=np.int64)
    truth = np.full((len(records), 4), -1, dtype=np.int64)
    filled = np.zeros(len(records), dtype=np.int64)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    n_layers = len(model.llm.get_decoder().layers)
    for start in range(0, len(records), batch_size):
        batch = batches.collate(list(range(start, min(start + batch_size, len(records)))))
        with ctx, attention_inputs(model, list(range(n_layers)) if attention is not None else []) as seen:
            o = model(**{k: v for k, v in batch.items() if k not in BATCH_META})
        if attention is not None:
            qb, qt, boxes = box_answer_queries(batch["labels"], model)
            qb, qt, boxes = qb[::4], qt[::4], boxes[::4]  # the position that predicts x1: the search
            cells = cell_mask(boxes, tuple(model.config.vision.grid))
            img_pos = image_positions(batch["input_ids"], model)[qb]
            heads = tuple(range(model.config.text["num_attention_heads"]))
            mass = torch.stack([(image_attention(model, seen, i, qb, qt, img_pos, heads).exp() * cells[:, None]).sum(-1)
                                for i in range(n_layers)], dim=1)  # [G, L, H]
            attention.extend((m.numpy(), float(c.float().mean())) for m, c in zip(mass, cells))
        targets = batch["labels"][:, 1:]
        select = targets != -100
        rows = select.nonzero()[:, 0] + start  # the record of each answer position, in the logits' order
        for n, t, p in zip(rows.tolist(), targets[select].tolist(), o.logits.float().argmax(-1).tolist()):
            if t in locs and filled[n] < 4:
                out[n, filled[n]] = p - locs.start if p in locs else -1
                truth[n, filled[n]] = t - locs.start
                filled[n] += 1
    bad = np.flatnonzero(filled != 4)
    if bad.size:
        raise InputError(f"{records[bad[0]]['id']}: the answer is not one box of four loc tokens")
    return out, truth


def best_constant(truth: np.ndarray, bins: int) -> list[dict]:
    """Per coordinate, the bin whose +-1 neighbourhood holds most targets, and its exact / within-one rates."""
    res = []
    for c in range(truth.shape[1]):
        within = [float((np.abs(truth[:, c] - b) <= 1).mean()) for b in range(bins)]
        b = int(np.argmax(within))
        res.append({"bin": b, "exact": float((truth[:, c] == b).mean()), "within1": within[b]})
    return res


def centre_in(answer_box, record: dict) -> str:
    """"target", "other" (another object of the image) or "none": where an answer box's centre falls."""
    cx, cy = (answer_box[0] + answer_box[2]) / 2, (answer_box[1] + answer_box[3]) / 2
    w, h = record["width"], record["height"]
    hit = [k for k, o in enumerate(record["objects"])
           if o["box"][0] / w <= cx <= o["box"][2] / w and o["box"][1] / h <= cy <= o["box"][3] / h]
    return "target" if record["target"]["object"] in hit else ("other" if hit else "none")


def probe(model: ChatSpotModel, tok, data: Path, split: str = "test", max_items: int | None = None,
          autocast: bool = False) -> dict:
    from chatspot_edge.data import load_image, load_split
    from chatspot_edge.evaluation.answerers import TorchAnswerer
    from chatspot_edge.evaluation.protocol import evaluate

    fmt = model.config.referring_format
    if not fmt.is_loc:
        raise InputError(f"the model speaks {fmt.name}: teacher-forced coordinates need chatspot-loc-v1 (one token "
                         "per coordinate)")
    records = [r for r in load_split(data, split) if r.get("task") == "grounding"][:max_items]
    if not records:
        raise InputError(f"{data}: no grounding questions in the {split} split")
    attention: list = []
    pred, truth = teacher_forced(model, tok, records, data, autocast, attention=attention)
    mass = np.stack([m for m, _ in attention])  # [n, L, H]
    from chatspot_edge.train.ground_attn import SUPERVISED_HEADS, supervised_layers

    sup, head = supervised_layers(mass.shape[1]), list(SUPERVISED_HEADS)
    find = {"uniform": float(np.mean([u for _, u in attention])),
            "best_head_per_layer": [round(float(x), 4) for x in mass.mean(0).max(-1)],
            "head0_per_layer": [round(float(x), 4) for x in mass.mean(0)[:, 0]],
            "supervised_heads": float(mass[:, sup][:, :, head].mean()),
            "supervised_heads_over_half": float((mass[:, sup][:, :, head] > 0.5).mean())}
    err = np.abs(pred - truth)
    forced = {c: {"exact": float((err[:, i] == 0).mean()), "within1": float(((err[:, i] <= 1) & (pred[:, i] >= 0)).mean()),
                  "mean_abs_bins": float(err[pred[:, i] >= 0, i].mean()) if (pred[:, i] >= 0).any() else None}
              for i, c in enumerate(COORDS)}
    answerer = TorchAnswerer(model, tok, batch_size=16, autocast=torch.bfloat16 if autocast else None)
    result = evaluate(answerer, records, lambda r: load_image(data, r), noise=False)  # one item per record
    answers = result["answers"]
    where = {"target": 0, "other": 0, "none": 0, "no box": 0}
    for r, a in zip(records, answers):
        boxes = [g for g in referring.parse_regions(a, fmt.bins) if g.kind == "box"]
        where[centre_in(boxes[0].coords, r) if boxes else "no box"] += 1
    return {"items": len(records), "bins": fmt.bins, "teacher_forced": forced,
            "best_constant": dict(zip(COORDS, best_constant(truth, fmt.bins))),
            "attention_on_target_at_x1": find,
            "grounding": result["metrics"]["grounding"], "answer_centre_in": where, "answers": answers}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-items", type=int, default=None)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (as eval does on CPUs with bf16 matrix units)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from chatspot_edge.files import atomic_write_text
    from chatspot_edge.model.checkpoint import load_checkpoint

    try:
        model, tok = load_checkpoint(args.checkpoint)
        model.eval()
        res = probe(model, tok, args.data, args.split, args.max_items, args.bf16)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps({k: v for k, v in res.items() if k != "answers"}, indent=1)
    print(text)
    if args.out:
        atomic_write_text(args.out, json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
