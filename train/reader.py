"""Stage 0 of adapt: reader pre-training of the region's crop view.

The crop view (`model.region.crops`, a small conv net over a 32 x 128 aspect-kept crop of the original image) is
the only path by which the letters inside a region reach the LLM. Trained end to end through the LLM it does not
learn to read: in the 60-minute mini run (~7,700 reading crops among 53k questions) a linear probe on its output
finds the word 8.2% of the time (85 answers), while the same network trained alone as a word classifier reads
84.4% of held-out ones after 32k crops (docs/results.md, "Why OCR stays at 0"). Reading is a vision problem the answer
loss teaches too slowly, so it is taught first, alone:

each reading question's region embedding, read out through the LLM's frozen final norm and tied output head,
should predict its answer's tokens (`ChatSpotModel.region_alignment_loss`, the same objective stages 1-2 add to
the answer loss). Only the crop view trains; no LLM forward runs, so a step costs a conv net over `batch_size`
crops plus one head matmul. With a region encoder from a checkpoint (`--init`, `--warm-start`) the region
embedding is the crop view plus the region encoder's other views (pooled image features, geometry), computed once
and frozen: they carry what the LLM already reads. In a fresh model those views are random projections stage 1
retrains, so the crop view learns alone and no vision forward runs (measured: 10 s of preparation instead of 138 s
for 6,318 questions).

Reading questions are those of `READER_TASKS` (SpotWorld's `region_ocr` and `region_recognition`: the text and
what the region shows), each task an equal share of every batch (reading is the rare one); in data without task
labels, every question about exactly one box. The crops (and frozen views) are computed once (progress shown),
then the crop view trains for `steps` optimizer steps. The stage is short and deterministic for a seed: a run
stopped inside it starts it again on `--resume`; under torchrun every rank runs it alike (same seed, same
weights), before the model is wrapped for DDP.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from chatspot_edge.model.chatspot import IGNORE_INDEX, ChatSpotModel
from chatspot_edge.model.preprocess import region_crops, resize_pixels
from chatspot_edge.referring import parse_regions

# What a region's crop should tell: its text (region_ocr) and what it shows (region_recognition: colour, shape).
# Reading questions alone would turn the crop view, which every region embedding adds, into a word detector and
# break the answers that rely on it (measured: the answer loss of a trained mini jumps from 3.8 to 11.0).
READER_TASKS = ("region_ocr", "region_recognition")
READER_BATCH = 64  # reading questions per step
READER_LR = 1e-3  # AdamW, linear warm-up over 5% of the steps, cosine to 10%


@dataclass(frozen=True)
class ReaderItem:
    """One reading question: the record it comes from, the region's normalized box (x1, y1, x2, y2 of the
    original image) and the answer text."""

    record: int
    box: tuple[float, float, float, float]
    answer: str
    task: str | None = None  # the question's task label, where the record has one


def _pair_tasks(rec: dict, n_pairs: int) -> list[str | None]:
    """The task of each (question, answer) pair of a record: `task` for the first, `turns[k]["task"]` for
    pair k + 1 (SpotWorld version 2); None where the record does not say."""
    turns = rec.get("turns") or []
    return [rec.get("task")] + [turns[k].get("task") if k < len(turns) else None for k in range(n_pairs - 1)]


def reader_items(records: list[dict], tasks: tuple[str, ...] = READER_TASKS) -> list[ReaderItem]:
    """Every reading question of `records` with one box region: pairs labelled with a task in `tasks`, or, in
    records without task labels, every question that refers to exactly one box."""
    items = []
    for i, rec in enumerate(records):
        conv = rec["conversations"]
        pairs = [(conv[k]["value"], conv[k + 1]["value"]) for k in range(0, len(conv) - 1, 2)
                 if conv[k]["from"] == "human" and conv[k + 1]["from"] == "gpt"]
        for (question, answer), task in zip(pairs, _pair_tasks(rec, len(pairs))):
            if task is not None and task not in tasks:
                continue
            regions = parse_regions(question)
            if len(regions) != 1 or regions[0].kind != "box" or not answer.strip():
                continue
            items.append(ReaderItem(i, regions[0].bbox(), answer.strip(), task))
    return items


def reader_inputs(model: ChatSpotModel, records: list[dict], items: list[ReaderItem],
                  load_image: Callable[[dict], object], frozen_views: bool = False,
                  log: Callable[[str], None] = print) -> tuple[np.ndarray, torch.Tensor | None]:
    """What the crop view reads and what it is added to, for each item, one image load (and, with
    `frozen_views`, one vision forward of it resized as training resizes it) per record: the crops, uint8
    `[N, h, w, 4]` of the box in the original image (`load_image(record)`, PIL), and, with `frozen_views`, the
    region embedding less its crop view, float32 `[N, d]` on the CPU: the pooled image features + geometry (else
    None). Runs under `no_grad` in the model's current modes."""
    region = model.region
    device = next(region.parameters()).device
    crop_size = model.config.region_crop_size
    crops = np.zeros((len(items), *crop_size, 4), dtype=np.uint8)
    context = torch.zeros(len(items), region.proj[-1].out_features) if frozen_views else None
    t0, done = time.perf_counter(), 0
    with torch.no_grad():
        for n, (rec_i, ks) in enumerate(_group(items, "record").items()):
            image = load_image(records[rec_i])
            crops[ks] = region_crops(image, [items[k].box for k in ks], crop_size)
            if context is not None:
                x = torch.from_numpy(crops[ks]).to(device)
                pixels = np.array(resize_pixels(image, model.config.vision.image_size))  # writable
                emb = model.encode_image(torch.from_numpy(pixels)[None].to(device))
                boxes = torch.tensor([items[k].box for k in ks], dtype=torch.float32, device=device)
                zeros = torch.zeros(len(ks), dtype=torch.long, device=device)  # one image; each item its own question
                full = model.encode_regions(emb, boxes, zeros, crops=x, box_segment=torch.arange(len(ks), device=device))
                context[ks] = (full - region.crops(x)).float().cpu()
            done += len(ks)
            if (n + 1) % 500 == 0 or done == len(items):
                log(f"reader inputs: {done}/{len(items)} crops{' + frozen views' if context is not None else ''} "
                    f"({time.perf_counter() - t0:.0f} s)")
    return crops, context


def _group(items: list[ReaderItem], field: str) -> dict:
    """Indices of `items` by the value of `field` ("record", "task"), in order of first appearance."""
    groups: dict = {}
    for k, it in enumerate(items):
        groups.setdefault(getattr(it, field), []).append(k)
    return groups


def _balanced_batches(items: list[ReaderItem], batch_size: int, rng: np.random.Generator):
    """Endless index batches with an equal share of each task (items without a label are one group; the
    remainder of `batch_size` goes to the first groups), each group walked in reshuffled epochs: the rare task
    (reading: 5k questions against recognition's 16k in SpotWorld) is seen as often as the common one."""
    groups = _group(items, "task")

    def stream(pool: np.ndarray):
        while True:
            yield from rng.permutation(pool).tolist()

    streams = [stream(np.asarray(g)) for g in groups.values()]
    quota = [batch_size // len(streams) + (j < batch_size % len(streams)) for j in range(len(streams))]
    while True:
        batch = [next(s) for s, q in zip(streams, quota) for _ in range(q)]
        yield np.asarray(batch)


def pretrain_reader(model: ChatSpotModel, tok, records: list[dict], load_image: Callable[[dict], object],
                    frozen_views: bool, steps: int, batch_size: int = READER_BATCH,
                    lr: float = READER_LR, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Train `model.region.crops` for `steps` AdamW steps of `batch_size` reading questions, balanced over their
    tasks (see the module docstring). `load_image(record)`: the original image (PIL); `frozen_views`: the crop
    view learns next to the region encoder's other views, computed once and frozen (a trained region encoder), or
    alone (False: a fresh model, whose other views are random projections stage 1 retrains; no vision forward).
    The rest of the model is left as it was (weights, `requires_grad`, train / eval modes).
    Returns a summary: items, crops seen, seconds, first and last loss, and the share of the last steps'
    questions whose answer's first token is the head's top-1 for the region (`first_token_acc`)."""
    region = model.region
    if steps <= 0 or region is None or region.crop != "original":
        return {"steps": 0, "reason": "no steps" if steps <= 0 else "the model has no crop view"}
    items = reader_items(records)
    if not items:
        return {"steps": 0, "reason": "no reading questions in the data"}
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n_tasks = len({it.task for it in items})
    cap = steps * -(-batch_size // n_tasks)  # the most items of one task the steps can see: bounds the crops' memory
    by_task = _group(items, "task")
    keep = sorted(k for ks in by_task.values()
                  for k in (ks if len(ks) <= cap else rng.choice(ks, cap, replace=False).tolist()))
    items = [items[k] for k in keep]
    device = next(region.parameters()).device

    modes = {m: m.training for m in model.modules()}
    model.eval()
    crops, context = reader_inputs(model, records, items, load_image, frozen_views,
                                   log=lambda m: log(f"stage 0 (reader): {m}"))
    ids = [tok.encode(it.answer, add_special_tokens=False) for it in items]
    targets = torch.full((len(items), max(map(len, ids))), IGNORE_INDEX, dtype=torch.long)
    for k, x in enumerate(ids):
        targets[k, :len(x)] = torch.tensor(x)
    t_prep = time.perf_counter() - t0

    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad = False
    params = list(region.crops.parameters())
    for p in params:
        p.requires_grad = True
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    region.crops.train()
    batches = _balanced_batches(items, batch_size, rng)
    losses, hits, seen = [], [], 0
    t1 = time.perf_counter()
    for step in range(steps):
        idx = next(batches)
        for g in opt.param_groups:  # linear warm-up, cosine decay to 10%
            g["lr"] = lr * (min(1.0, (step + 1) / warm) * (0.55 + 0.45 * math.cos(math.pi * step / steps)))
        r = region.crops(torch.from_numpy(crops[idx]).to(device)).float()
        if context is not None:
            r = r + context[torch.from_numpy(idx)].to(device)
        t = targets[torch.from_numpy(idx)].to(device)
        loss = model.region_alignment_loss(r, torch.arange(len(idx), device=device), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        seen += len(idx)
        if step >= steps - max(1, steps // 10):  # the last tenth: does the head read the answer's first token?
            with torch.no_grad():
                top = model.llm.lm_head(model.llm.get_decoder().norm(r.detach())).argmax(-1)
            hits += (top == t[:, 0]).tolist()
        if (step + 1) % 20 == 0 or step + 1 == steps:
            el = time.perf_counter() - t1
            log(f"stage 0 (reader) step {step + 1}/{steps} loss {np.mean(losses[-20:]):.3f} "
                f"ETA {el / (step + 1) * (steps - step - 1):.0f}s")
    for p, f in flags.items():
        p.requires_grad = f
    for m, training in modes.items():
        m.training = training
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "items": len(items),
            "tasks": {str(t): sum(it.task == t for it in items) for t in sorted(by_task, key=str)},
            "frozen_views": context is not None, "crops_seen": seen,
            "seconds": round(time.perf_counter() - t0, 1), "prepare_seconds": round(t_prep, 1),
            "first_loss": round(float(np.mean(losses[:10])), 4), "last_loss": round(float(np.mean(losses[-10:])), 4),
            "first_token_acc": round(float(np.mean(hits)), 4) if hits else None}
