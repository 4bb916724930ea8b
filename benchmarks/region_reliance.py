"""Does the LLM use the region embedding and the image? A diagnostic for issue 17's start-up plateau.

For the test questions of one task (SpotWorld's region recognition by default), through a checkpoint in PyTorch:

- **reliance**: the answer loss (nats per answer token, teacher-forced) with the true inputs, with each question's
  region embeddings replaced by another question's (the batch's region embeddings rolled by one), and with its
  image tokens replaced by another question's image (its own region embeddings kept). The increase is what the
  answers owe to the region and to the image; 0 means the LLM ignores them, whatever the region encoder carries
  (`reader_probe` measures that side).
- **attention** from the answer-predicting positions (not the `<region>` positions themselves) to the `<region>`
  positions, the image positions and the first position, per LLM layer: the mean over heads and the head that
  attends most to the region.
- **geometry** of what the LLM is given: the mean norm, and the share of the mean squared norm that is the mean
  vector (`shared`: 1.0 when every vector is alike, ~0 for centred ones), of the region embeddings, the image
  embeddings and (a fixed sample of) the base vocabulary's token embeddings. After RMSNorm the LLM sees
  directions, so a region embedding that is mostly a shared vector tells it little, however much a standardized
  linear probe can still read off it.

  python -m chatspot_edge.benchmarks.region_reliance CKPT --data DIR [--task region_recognition]
      [--max-items 128] [--split test] [--out JSON]

Run it with `OMP_NUM_THREADS=1` beside a training run (see `reader_probe`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chatspot_edge.model.chatspot import IGNORE_INDEX, ChatSpotModel


def shared_share(x: torch.Tensor) -> float | None:
    """`||mean(x)||^2 / mean(||x||^2)` over the rows of `x` `[N, d]`: 1.0 when every row is the same vector, about 0
    for rows centred on 0; None for all-zero rows."""
    x = x.float()
    energy = float(x.pow(2).sum(-1).mean())
    return round(float(x.mean(0).pow(2).sum()) / energy, 4) if energy > 0 else None


def _geometry(x: torch.Tensor) -> dict:
    return {"norm": round(float(x.float().norm(dim=-1).mean()), 3), "shared": shared_share(x)}


def _answer_nats(model: ChatSpotModel, hidden: torch.Tensor, labels: torch.Tensor) -> float:
    """Summed cross-entropy (nats) of the answer tokens (`labels` != IGNORE_INDEX) from the LLM's last hidden
    states `[B, T, d]` of a teacher-forced pass."""
    logits, targets, select = model.answer_logits(hidden, labels)
    return float(F.cross_entropy(logits.float(), targets[select], reduction="sum"))


def _attention(model: ChatSpotModel, emb: torch.Tensor, batch: dict) -> tuple[list[dict], torch.Tensor]:
    """Per layer: attention mass from the answer-predicting positions to the region / image / first positions, summed
    over the batch per head (`*_sum`) with the query count; and the pass's last hidden states."""
    cfg = model.config
    llm_cfg = model.llm.config
    impl = llm_cfg._attn_implementation
    llm_cfg._attn_implementation = "eager"  # attention weights are not materialized by SDPA
    try:
        out = model.llm.get_decoder()(inputs_embeds=emb, attention_mask=batch["attention_mask"],
                                      output_attentions=True)
    finally:
        llm_cfg._attn_implementation = impl
    ids = batch["input_ids"]
    region, image = ids == cfg.region_token_id, ids == cfg.image_token_id
    query = torch.zeros_like(region)
    query[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
    query &= ~region
    rows = []
    for a in out.attentions:  # [B, H, T, T]
        q = query[:, None, :].expand(-1, a.shape[1], -1)  # [B, H, T]
        mass = {name: (a * keys[:, None, None, :].to(a.dtype)).sum(-1)[q].reshape(-1, a.shape[1]).float()
                for name, keys in (("region", region), ("image", image))}
        mass["first"] = a[..., 0][q].reshape(-1, a.shape[1]).float()
        rows.append({"queries": int(query.sum()), **{f"{k}_sum": v.sum(0) for k, v in mass.items()}})
    return rows, out.last_hidden_state


@torch.no_grad()
def reliance(model: ChatSpotModel, tok, records: list[dict], data_dir: Path, batch_size: int = 16,
             log=print) -> dict:
    """The figures above for `records` (at least 2: each question borrows another's region and image)."""
    from chatspot_edge.model.processor import Processor
    from chatspot_edge.train.adapt import Batches

    if len(records) < 2:
        raise ValueError("reliance needs at least 2 questions (each borrows another's region and image)")
    if model.region is None:
        raise ValueError("this model has no region embedding")
    model.eval()
    cfg = model.config
    batches = Batches(records, data_dir, Processor(tok, cfg), cfg.vision.image_size, 0, 4096)
    # batches of at least 2 questions, sizes within one of each other
    groups = np.array_split(np.arange(len(records)), max(1, len(records) // max(2, batch_size)))
    nats = {"true": 0.0, "region_swapped": 0.0, "image_swapped": 0.0}
    n_tokens, regions, images, layers = 0, [], [], None
    t0 = time.perf_counter()
    for g in groups:
        batch = batches.collate(g.tolist())
        image_embeds = model.encode_image(batch["pixels"])
        emb, region = model.embed(batch["input_ids"], image_embeds, batch["boxes"], batch["box_batch"],
                                  batch["pixels"], batch.get("crops"), return_regions=True,
                                  box_segment=batch.get("box_segment"))
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        rmask = (ids == cfg.region_token_id).unsqueeze(-1)
        imask = (ids == cfg.image_token_id).unsqueeze(-1)
        swapped_region = emb.masked_scatter(rmask, region.roll(1, 0).to(emb.dtype))
        swapped_image = emb.masked_scatter(imask, image_embeds.roll(1, 0).to(emb.dtype))
        att, hidden = _attention(model, emb, batch)  # one pass on the true inputs: attention and answer loss
        nats["true"] += _answer_nats(model, hidden, labels)
        for name, e in (("region_swapped", swapped_region), ("image_swapped", swapped_image)):
            nats[name] += _answer_nats(model, model.llm.get_decoder()(inputs_embeds=e, attention_mask=mask)
                                       .last_hidden_state, labels)
        n_tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
        regions.append(region.float())
        images.append(image_embeds.float().reshape(-1, image_embeds.shape[-1]))
        layers = att if layers is None else [{k: a[k] + b[k] for k in a} for a, b in zip(layers, att)]
    log(f"{len(records)} questions, {n_tokens} answer tokens in {time.perf_counter() - t0:.0f} s")
    per_token = {k: round(v / n_tokens, 4) for k, v in nats.items()}
    attention = []
    for li, a in enumerate(layers):
        n = a["queries"] * a["region_sum"].numel()  # query positions x heads
        attention.append({"layer": li,
                          "region_mean": round(float(a["region_sum"].sum()) / n, 4),
                          "region_max_head": round(float(a["region_sum"].max()) / a["queries"], 4),
                          "image_mean": round(float(a["image_sum"].sum()) / n, 4),
                          "first_mean": round(float(a["first_sum"].sum()) / n, 4)})
    table = model.llm.get_input_embeddings().weight
    sample = torch.randperm(cfg.image_token_id, generator=torch.Generator().manual_seed(0))[:4096]
    return {"items": len(records), "answer_tokens": n_tokens, "answer_nats": per_token,
            "region_reliance_nats": round(per_token["region_swapped"] - per_token["true"], 4),
            "image_reliance_nats": round(per_token["image_swapped"] - per_token["true"], 4),
            "attention": attention,
            "geometry": {"region": _geometry(torch.cat(regions)), "image": _geometry(torch.cat(images)),
                         "token": _geometry(table[sample])}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--task", default="region_recognition")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-items", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    from chatspot_edge.data import load_split
    from chatspot_edge.files import atomic_write_text
    from chatspot_edge.model.checkpoint import load_checkpoint

    model, tok = load_checkpoint(args.checkpoint)
    records = [r for r in load_split(args.data, args.split) if r.get("task") == args.task][: args.max_items]
    if len(records) < 2:
        raise SystemExit(f"{args.data}: {len(records)} {args.split} questions of task {args.task!r}: need 2 or more")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    result = {"checkpoint": str(args.checkpoint), "data": str(args.data), "task": args.task,
              **reliance(model, tok, records, args.data, args.batch_size, log)}
    n = result["answer_nats"]
    log(f"answer nats/token: true {n['true']:.3f}, region swapped {n['region_swapped']:.3f} "
        f"({result['region_reliance_nats']:+.3f}), image swapped {n['image_swapped']:.3f} "
        f"({result['image_reliance_nats']:+.3f}); shared share: region {result['geometry']['region']['shared']}, "
        f"image {result['geometry']['image']['shared']}, tokens {result['geometry']['token']['shared']}")
    for a in result["attention"]:
        log(f"layer {a['layer']}: attention to region {a['region_mean']:.3f} (top head {a['region_max_head']:.3f}), "
            f"image {a['image_mean']:.3f}, first {a['first_mean']:.3f}")
    text = json.dumps(result, indent=1)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
