"""Referring-instruction tuning (train-adapt), ChatSpot's two-stage recipe, readable top to bottom.

Stage 1 (alignment): only the projector and the region encoder learn (LR 2e-3; the LLM is frozen), on every
sample, with the answer loss plus the region-text alignment loss: the region embeddings become informative
before the LLM starts to adapt (ChatSpot's stage 1 aligns the projector on image-level data alone; with
that alone the LLM sat on the answer-prior plateau here, ignoring a still-random region embedding).
Stage 2: the vision encoder stays frozen; projector + region encoder (LR 2e-3) and the LLM (LR 3e-4 mini,
2e-4 smol; full fine-tune, or LoRA adapters with --lora) learn on every task. Loss on answer tokens only, bf16 autocast on
CPU, gradient accumulation, warmup + cosine schedule.

Resumable: every `save_every` steps the trainable weights, AdamW moments, RNG states and the data position
are written atomically to `OUT.train-state/` (safetensors + JSON, no pickle); `--resume` continues from it
with the same data order. Under `torchrun` the same script runs DDP (gloo on CPU, nccl on GPU): each rank
takes its share of every global batch and gradients are averaged, so replicas stay identical. `--fsdp`
shards parameters, gradients and optimizer moments instead (FSDP2 `fully_shard`: one unit per decoder
layer, the rest at the root), for models that do not fit one device; the same
batches and the same averaged gradients, so it computes what DDP computes. Checkpoints, resume states and
evaluations then gather the full weights first.

The loss is an objective object the loop calls on each micro-batch (`AnswerLoss` here; distillation plugs
`train.distill.DistillObjective`, which holds the teacher, into the same loop, starting from `init`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from chatspot_edge.errors import InputError
from chatspot_edge.files import atomic_dir
from chatspot_edge.model.chatspot import REGION_ALIGN_KINDS, ChatSpotModel, ChatSpotOutput
from chatspot_edge.model.checkpoint import save_checkpoint
from chatspot_edge.model.position import RELATION_GAIN
from chatspot_edge.model.preprocess import region_crops, resize_pixels
from chatspot_edge.model.processor import Processor
from chatspot_edge.referring import SPECIAL_TOKENS

PRESET_DEFAULTS = {  # batch size, stage-2 minutes, stage-1 steps, LLM LR, projector LR
    "tiny": dict(batch_size=4, minutes=1.0, stage1_steps=2, lr_llm=1e-3, lr_proj=2e-3),
    # mini: training <= 12 min on 2 cores (issue 17): stage 1 ~3 min, stage 2 8 min; 8 independent questions per
    # image on one [system + image] prefix, single-token coordinates (chatspot-loc-v1, 32 bins per axis), the
    # contrastive region-text alignment (docs/results.md, session 10: the LLM starts to read the region)
    "mini": dict(batch_size=8, minutes=8.0, stage1_steps=60, lr_llm=3e-4, lr_proj=2e-3, turns=8, referring="loc",
                 bins=32, region_align_kind="contrastive"),
    "smol": dict(batch_size=16, minutes=60.0, stage1_steps=200, lr_llm=2e-4, lr_proj=2e-3,
                 stage1_steps_warm=40),  # warm-started from a trained mini: its projector is aligned already
}


@dataclass
class AdaptOptions:
    preset: str
    data: Path
    out: Path
    minutes: float | None = None  # stage-2 budget; the step count is fixed after the first timed steps
    steps: int | None = None  # stage-2 optimizer steps (overrides minutes)
    batch_size: int | None = None  # global batch (all ranks together) per optimizer step
    grad_accum: int = 1
    stage1_steps: int | None = None
    reader_steps: int | None = None  # stage 0 (train.reader): steps of reader pre-training of the region crop view
    # before stage 1 (None: the preset's, 0: none)
    eval_every: int = 0
    eval_samples: int = 200
    save_every: int = 100
    resume: bool = False
    lora: bool = False
    fsdp: bool = False  # under torchrun: shard parameters, gradients and AdamW moments (FSDP2) instead of DDP
    seed: int = 0
    vision_pool: int = 2
    region_token: bool = True
    warmup: float = 0.05  # fraction of stage-2 steps
    max_tokens: int | None = None  # longer samples are truncated / lose whole turns (None: the preset's, or 320)
    per_sample_loss: bool = True  # average the loss within each sample first (tasks weigh alike)
    region_align: float = 1.0  # weight of the region-text alignment loss (model.region_alignment_loss)
    region_align_kind: str | None = None  # "absolute", "contrastive" or "both" (None: the preset's)
    cell_align: float | None = None  # weight of the image-cell / word alignment loss (train.cell_align; None: the
    # preset's, 0: off); needs records with SPEC-5 `objects`
    # weight of the relation-word alignment (train.relation_align); None: 1 for a model with relation words, else 0
    relation_align: float | None = None
    ground_attn: float | None = None  # weight of the grounding attention supervision (train.ground_attn: heads look
    # at the cells of a box answer's object; None: the preset's, 0: off); loc models only
    region_placement: str | None = None  # override the preset's: "after_box" or "before_answer"
    init: Path | None = None  # start from an existing checkpoint instead of the preset
    warm_start: Path | None = None  # copy projector, region encoder and added-token rows from this checkpoint
    blocks: str | None = None  # mini: which SmolLM2 blocks to keep, e.g. "0,6,12,18,24,29"
    referring: str | None = None  # referring format: "text" (chatspot-text-v1) or "loc" (chatspot-loc-v1); None: the
    bins: int | None = None  # model's own (a preset: text). bins: loc's N per axis (default referring.DEFAULT_BINS)
    device: str | None = None  # cpu, cuda or auto; None: cpu, or cuda when CHATSPOT_DEVICE=cuda and a GPU is present
    deadline: float | None = None  # wall-clock time (time.time()) by which stage 2 ends, if sooner than `minutes`;
    # a hard end (steps stop at it) in a single-process run only: under torchrun it sets the step count alone
    lr_llm: float | None = None  # override the preset's LLM (transformer blocks) learning rate
    lr_proj: float | None = None  # override the preset's projector + region encoder learning rate
    lr_embed: float | None = None  # learning rate of the (tied) token embeddings; default: lr_llm
    embeddings: str = "added"  # which token-embedding rows train in stage 2: "added" (the added tokens' rows
    # only, see train.added_rows) or "all" (the whole 49k-row tied table)
    precision: str = "auto"  # autocast: "bf16", "fp32", or "auto" (bf16 on a GPU or a CPU with bf16 matrix
    # instructions, fp32 elsewhere: on AVX2-only CPUs bf16 is emulated and slower)
    turns: int | None = None  # > 0: up to this many questions per image per sample, as independent turns on one
    # shared [system + image] prefix (Processor.encode_turns); 0: the conversation as one chat; None: the preset's
    design: dict | None = None  # overrides of model.presets.DESIGN (ablations), e.g. {"position_2d": False}
    loc_init: str | None = None  # chatspot-loc-v1 rows (None: the preset's): "mean" (the mean embedding), "fourier" (smooth in k, fixed
    # random map) or "position" (the image tokens' own 2D position map, set when stage 2 starts; see loc_rows)
    quiet: bool = False


# ---------------------------------------------------------------------------------------------------------
# data: records -> padded batches

class Batches:
    """Deterministic batches over records: epoch e uses a permutation seeded by (seed, e). `position` counts
    samples consumed, so a resumed run draws exactly the batches the uninterrupted run would have."""

    def __init__(self, records: list[dict], data_dir: Path, proc: Processor, image_size, seed: int, max_tokens: int,
                 turns: int = 0, cell_words: dict[str, int] | None = None, relation_words: tuple[str, ...] = ()):
        from chatspot_edge.data import load_image

        self.records, self.data_dir, self.proc = records, data_dir, proc
        self.image_size, self.seed, self.max_tokens = image_size, seed, max_tokens
        self.turns = turns  # > 0: up to this many questions per image as independent turns (encode_turns)
        self.cell_words = cell_words  # word -> token id: collate the image-cell alignment's targets (train.cell_align)
        self.relation_words = relation_words  # collate the relation-word alignment's targets (train.relation_align)
        self.load_image = load_image
        self.position = 0
        self._pixels: dict[str, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

    def next_indices(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            epoch, k = divmod(self.position, len(self.records))
            out.append(int(self._order(epoch)[k]))
            self.position += 1
        return out

    def pixels(self, rec: dict) -> np.ndarray:
        key = rec["image"]
        if key not in self._pixels:
            self._pixels[key] = resize_pixels(self.load_image(self.data_dir, rec), self.image_size)
        return self._pixels[key]

    def crops(self, rec: dict, boxes: list) -> np.ndarray:
        """The region crops of `boxes` (normalized, from the question text) read from the original image."""
        return region_crops(self.load_image(self.data_dir, rec), boxes, self.proc.config.region_crop_size)

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        encs, pix, crops = [], [], []
        cfg = self.proc.config
        want_crops = cfg.region_token and cfg.region_crop == "original"
        for i in indices:
            rec = self.records[i]
            if self.turns:
                enc = self.proc.encode_turns(rec["conversations"], self.turns, self.max_tokens)
            else:
                enc = self.proc.encode_conversation(rec["conversations"])
            if len(enc.ids) > self.max_tokens:  # keep the prompt, truncate the tail (labels included)
                n_regions = enc.ids[: self.max_tokens].count(self.proc.config.region_token_id)
                enc.ids, enc.labels, enc.boxes = enc.ids[: self.max_tokens], enc.labels[: self.max_tokens], enc.boxes[:n_regions]
                if enc.box_segments is not None:
                    enc.box_segments = enc.box_segments[:n_regions]
            encs.append(enc)
            pix.append(self.pixels(rec))
            if want_crops and enc.boxes:
                crops.append(self.crops(rec, enc.boxes))
        T = max(len(e.ids) for e in encs)
        pad = self.proc.config.pad_token_id
        ids = torch.full((len(encs), T), pad, dtype=torch.long)
        labels = torch.full((len(encs), T), -100, dtype=torch.long)
        mask = torch.zeros((len(encs), T), dtype=torch.long)
        for b, e in enumerate(encs):
            ids[b, : len(e.ids)] = torch.tensor(e.ids)
            labels[b, : len(e.ids)] = torch.tensor(e.labels)
            mask[b, : len(e.ids)] = 1
        boxes = torch.tensor([bx for e in encs for bx in e.boxes], dtype=torch.float32).reshape(-1, 4)
        box_batch = torch.tensor([b for b, e in enumerate(encs) for _ in e.boxes], dtype=torch.long)
        out = dict(input_ids=ids, attention_mask=mask, labels=labels, boxes=boxes, box_batch=box_batch,
                   pixels=torch.from_numpy(np.stack(pix)), n_tokens=torch.tensor(sum(len(e.ids) for e in encs)),
                   index=torch.tensor(indices, dtype=torch.long))
        if self.turns:
            out.update(turn_masks(encs, T))
            out["token_mask"] = mask  # the 4D attention mask replaces it; hidden-state matching needs the padding
        elif any(e.boxes for e in encs):  # which question each region belongs to (its relative geometry's reference)
            out["box_segment"] = torch.tensor([k for e in encs for k in e.box_segments], dtype=torch.long)
        if want_crops:
            h, w = cfg.region_crop_size
            out["crops"] = torch.from_numpy(np.concatenate(crops) if crops else np.zeros((0, h, w, 4), np.uint8))
        if self.cell_words:
            from chatspot_edge.train.cell_align import cell_targets

            out["cell_words"], out["cell_targets"] = cell_targets([self.records[i] for i in indices],
                                                                  tuple(cfg.vision.grid), self.cell_words)
        if self.relation_words:
            from chatspot_edge.train.relation_align import region_relation_targets

            word, sign = [], []
            for i, e in zip(indices, encs):
                w, sg = region_relation_targets(self.records[i]["conversations"], e.box_segments or [],
                                                self.relation_words)
                word += w
                sign += sg
            out["relation_word"] = torch.tensor(word, dtype=torch.long)
            out["relation_sign"] = torch.tensor(sign, dtype=torch.long)
        return out


def turn_masks(encs: list, T: int) -> dict[str, torch.Tensor]:
    """Attention mask, positions and turn numbers for samples encoded as independent turns
    (`Processor.encode_turns`, right-padded to T): token i attends to token j <= i of the shared prefix
    (segment 0) or of its own turn, as the runtime's follow-up question attends to the cached [system + image]
    only. Returns `attention_mask` bool `[B, 1, T, T]`, `position_ids` / `segments` `[B, T]`, `box_segment` `[R]`."""
    B = len(encs)
    seg = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    for b, e in enumerate(encs):
        seg[b, : len(e.ids)] = torch.tensor(e.segments)
        pos[b, : len(e.ids)] = torch.tensor(e.positions)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)
    allowed = causal & same & (seg[:, None, :] >= 0)
    allowed |= torch.eye(T, dtype=torch.bool)  # padding rows attend to themselves (no empty softmax)
    box_segment = torch.tensor([k for e in encs for k in (e.box_segments or [])], dtype=torch.long)
    return dict(attention_mask=allowed[:, None], position_ids=pos, segments=seg.clamp(min=0), box_segment=box_segment)


# ---------------------------------------------------------------------------------------------------------
# optimizer state <-> safetensors (no pickle)

def _named_trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def trainable_state(model: torch.nn.Module, opt: torch.optim.Optimizer, sharded: torch.nn.Module | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """(weights, AdamW moments "NAME::exp_avg" / "NAME::exp_avg_sq", AdamW step counts) of the trainable
    parameters, full tensors on the CPU. `sharded`: the FSDP root wrapping `model` (as `.model`); gathering is
    then a collective that every rank must call, and only rank 0 receives the tensors (others get empty dicts)."""
    named = _named_trainable(model)  # tied parameters appear once, so names are unique
    if sharded is None:
        weights = {n: p.detach().cpu().contiguous().clone() for n, p in named}
        moments: dict[str, torch.Tensor] = {}
        steps: dict[str, float] = {}
        for n, p in named:
            st = opt.state.get(p, {})
            if "exp_avg" in st:
                moments[f"{n}::exp_avg"] = st["exp_avg"].cpu().contiguous()
                moments[f"{n}::exp_avg_sq"] = st["exp_avg_sq"].cpu().contiguous()
                steps[n] = float(st["step"])
        return weights, moments, steps
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    msd = _full_state_dict(sharded)
    osd = get_optimizer_state_dict(sharded, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    weights, moments, steps = {}, {}, {}
    for n, _ in named:
        if n in msd:
            weights[n] = msd[n].contiguous()
        st = (osd.get("state") or {}).get(f"model.{n}", {})
        if "exp_avg" in st:
            moments[f"{n}::exp_avg"] = st["exp_avg"].contiguous()
            moments[f"{n}::exp_avg_sq"] = st["exp_avg_sq"].contiguous()
            steps[n] = float(st["step"])
    return weights, moments, steps


def save_train_state(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, meta: dict,
                     state: tuple[dict, dict, dict] | None = None) -> None:
    """Write the resumable state atomically. `state`: `trainable_state(...)` when already gathered (FSDP)."""
    weights, moments, steps = state if state is not None else trainable_state(model, opt)
    with atomic_dir(folder) as tmp:
        save_file(weights, str(tmp / "trainable.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        save_file(moments or {"_empty": torch.zeros(1)}, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        meta = dict(meta, adam_steps=steps, python_random=random.getstate()[1][:1])
        (tmp / "state.json").write_text(json.dumps(meta, indent=2, default=str))


def load_train_state(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                     sharded: torch.nn.Module | None = None) -> dict:
    """Restore weights, AdamW moments and RNG state from `folder` (every rank reads the full tensors; with an
    FSDP root `sharded`, each keeps its shard)."""
    named = dict(_named_trainable(model))
    weights = load_file(str(folder / "trainable.safetensors"))
    if set(weights) != set(named):
        raise InputError(f"{folder}: trainable parameters differ from this run (different options?)")
    meta = json.loads((folder / "state.json").read_text())
    moments = load_file(str(folder / "optimizer.safetensors"))
    if sharded is None:
        with torch.no_grad():
            for n, w in weights.items():
                named[n].copy_(w)
        for n, p in named.items():
            if f"{n}::exp_avg" in moments:
                opt.state[p] = {"step": torch.tensor(meta["adam_steps"][n]),
                                "exp_avg": moments[f"{n}::exp_avg"].clone().to(p.device),
                                "exp_avg_sq": moments[f"{n}::exp_avg_sq"].clone().to(p.device)}
    else:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(sharded, {f"model.{n}": w for n, w in weights.items()}, options=full)
        name_of = {id(p): n for n, p in named.items()}
        osd = {"state": {f"model.{n}": {"step": torch.tensor(meta["adam_steps"][n]),
                                        "exp_avg": moments[f"{n}::exp_avg"], "exp_avg_sq": moments[f"{n}::exp_avg_sq"]}
                         for n in named if f"{n}::exp_avg" in moments},
               "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                 "params": [f"model.{name_of[id(p)]}" for p in g["params"]]} for g in opt.param_groups]}
        set_optimizer_state_dict(sharded, opt, osd, options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["torch"])
    return meta


# ---------------------------------------------------------------------------------------------------------

def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def resolve_precision(device: str, precision: str) -> str:
    """"bf16" or "fp32" for `precision` ("auto": bf16 where the hardware multiplies bf16 natively, a GPU or a
    CPU with AVX-512 BF16 / AMX; fp32 elsewhere: on an AVX2-only CPU (measured on a Zen 3) a bf16 matrix
    product is emulated and runs 5-6x slower than fp32)."""
    if precision == "auto":
        from chatspot_edge.cpu import cpu_features

        native = device.startswith("cuda") or bool({"avx512_bf16", "amx_bf16"} & cpu_features())
        return "bf16" if native else "fp32"
    if precision not in ("bf16", "fp32"):
        raise InputError(f"--precision must be bf16, fp32 or auto, got {precision!r}")
    return precision


def _autocast(device: str, precision: str):
    """The training autocast context for `resolve_precision(device, precision)`."""
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16,
                          enabled=resolve_precision(device, precision) == "bf16")


def _log(opts: AdaptOptions, rank: int, msg: str) -> None:
    if rank == 0 and not opts.quiet:
        print(msg, file=sys.stderr, flush=True)


def _set_trainable(model: ChatSpotModel, stage: int, lora: bool) -> None:
    for p in model.parameters():
        p.requires_grad = False
    for m in (model.projector, model.position, model.region):
        if m is not None:
            for p in m.parameters():
                p.requires_grad = True
    if stage == 2:
        for n, p in model.llm.named_parameters():
            p.requires_grad = ("lora_" in n) if lora else True


def _param_groups(model: ChatSpotModel, lr_llm: float, lr_proj: float, lr_embed: float | None = None) -> list[dict]:
    proj = [p for m in (model.projector, model.position, model.region) if m is not None for p in m.parameters()
            if p.requires_grad]
    table = model.llm.get_input_embeddings()
    emb = table.table.added if hasattr(table, "table") else table.weight  # train.added_rows, or the whole table
    llm = [p for p in model.llm.parameters() if p.requires_grad and p is not emb]
    groups = [{"params": proj, "lr": lr_proj, "base_lr": lr_proj, "weight_decay": 0.0}]
    if llm:
        groups.append({"params": llm, "lr": lr_llm, "base_lr": lr_llm, "weight_decay": 0.0})
    if emb.requires_grad:
        lr = lr_embed if lr_embed is not None else lr_llm
        groups.append({"params": [emb], "lr": lr, "base_lr": lr, "weight_decay": 0.0})
    return groups


LOC_INITS = ("mean", "fourier", "position")
LOC_ROW_SCALE = 0.1  # RMS of a SmolLM2 embedding row around the mean row (0.0995): loc rows vary as much


@torch.no_grad()
def init_loc_rows(model: ChatSpotModel, how: str, added_rows=None) -> None:
    """Set the `<loc_k>` rows (`model.position.loc_rows`) through the loc format's hook: "fourier" (a fixed
    random map) or "position" (the model's 2D position map, so a loc row and the image cells at that
    coordinate start out alike). With `added_rows` active (train.added_rows), its trainable block is set."""
    from chatspot_edge.model.loc_tokens import init_loc_embeddings, loc_token_ids
    from chatspot_edge.model.position import loc_rows

    ids = loc_token_ids(model)
    if added_rows is not None and added_rows.active:
        table = added_rows.table
        mean = table.base.float().mean(0)
        rows = loc_rows(len(ids), mean, LOC_ROW_SCALE, model.position if how == "position" else None)
        table.added[ids.start - table.first: ids.stop - table.first] = rows.to(table.added.dtype)
        return
    emb = model.llm.get_input_embeddings().weight
    mean = emb[: model.config.image_token_id].float().mean(0)
    init_loc_embeddings(model, lambda k, n: loc_rows(n, mean, LOC_ROW_SCALE,
                                                     model.position if how == "position" else None))


def _build_model(opts: AdaptOptions):
    from chatspot_edge.model.checkpoint import load_checkpoint
    from chatspot_edge.model.loc_tokens import set_referring
    from chatspot_edge.model.presets import DESIGN, build_preset
    from chatspot_edge.referring import format_option

    fmt = format_option(opts.referring, opts.bins)
    if opts.init is not None:
        model, tok = load_checkpoint(opts.init)
        if fmt is not None:  # a text-v1 checkpoint learns the loc format: its loc tokens are added here
            set_referring(model, tok, fmt)
        design = opts.design or {}
        if model.region is not None and (design.get("region_relative") or design.get("relation_words")):
            full = {**DESIGN, **design}
            add_relative_geometry(model, tok, words=bool(design.get("relation_words")),
                                  groups=bool(full["relation_groups"]), gain=float(full["relation_gain"]))
        return model, tok
    blocks = tuple(int(b) for b in opts.blocks.split(",")) if opts.blocks else None
    model, tok = build_preset(opts.preset, pretrained=True, vision_pool=opts.vision_pool, seed=opts.seed,
                              blocks=blocks, referring=fmt, design=opts.design)
    if not opts.region_token:
        model.config.region_token = False
        model.region = None
    if opts.region_placement:
        model.config.region_placement = opts.region_placement
    return model, tok


def add_relative_geometry(model: ChatSpotModel, tokenizer, words: bool = False, groups: bool = False,
                          gain: float = RELATION_GAIN) -> None:
    """Give a trained checkpoint's region encoder the relative-geometry view (`--init CKPT --region-relative`),
    and with `words` its relation words (`--relation-words`; one choice per group of `RELATION_GROUPS` with
    `groups`, else one over all; written at the region embedding's scale with `gain` > 0). The view's MLP output
    layer starts at zero, so without words the model computes exactly what it did until the view trains; the
    words start as a uniform choice in each group (what lets every word's choice train), which shifts each region
    embedding by a mix of the rows until it does."""
    from chatspot_edge.model.position import RelativeGeometry
    from chatspot_edge.model.presets import relation_word_config
    from chatspot_edge.model.region import init_relation_words

    ref = next(model.region.parameters())
    old = model.region.relative
    if old is not None and (old.words is not None or not words):
        return
    entries = relation_word_config(words, groups, gain)  # the config entries a preset with these words gets
    view = RelativeGeometry(model.config.hidden_size, n_words=len(entries["region_relation_words"]),
                            groups=entries["region_relation_groups"], gain=entries["region_relation_gain"])
    if old is not None:  # keep the trained view, add the words
        view.mlp.load_state_dict(old.mlp.state_dict())
    model.region.relative = view.to(device=ref.device, dtype=ref.dtype)
    model.config.region_relative = True
    for key, value in entries.items():
        setattr(model.config, key, value)
    if words:
        init_relation_words(model.region, model.llm.get_input_embeddings().weight, tokenizer,
                            entries["region_relation_words"])


def warm_start_from(model: ChatSpotModel, source: Path) -> dict:
    """Copy the projector, the region encoder and the embedding rows of the added tokens (`<image>`, `<box>`,
    `</box>`, `<region>`, and `<loc_k>` when both speak chatspot-loc-v1 with the same bins) from another
    checkpoint with the same vision encoder and hidden size (e.g. a trained mini into smol: both feed SmolLM2's
    embedding space). The LLM blocks stay the preset's. Returns what was copied and the source's training time
    (a warm start's cost counts in the total)."""
    from chatspot_edge.model.checkpoint import load_checkpoint

    src, _ = load_checkpoint(source)
    if src.config.vision != model.config.vision or src.llm.config.hidden_size != model.llm.config.hidden_size:
        raise InputError(f"{source}: vision encoder or hidden size differs from the {model.config.preset} preset")
    copied = []
    with torch.no_grad():
        for name in ("projector", "position", "region"):
            mine, theirs = getattr(model, name), getattr(src, name)
            if mine is None or theirs is None:
                continue
            own = mine.state_dict()  # a relative view of another shape (session 15's one word choice) starts anew
            state = {k: v for k, v in theirs.state_dict().items()
                     if not (k.startswith("relative.") and k in own and own[k].shape != v.shape)}
            missing, unexpected = mine.load_state_dict(state, strict=False)
            if unexpected or any(not k.startswith("relative.") for k in missing):  # only a view the source lacks
                raise InputError(f"{source}: its {name} does not match the {model.config.preset} preset's "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
            copied.append(name)
        emb, src_emb = model.llm.get_input_embeddings().weight, src.llm.get_input_embeddings().weight
        rows = _added_rows(model)
        src_rows = _added_rows(src)
        if model.config.referring_format != src.config.referring_format:  # <loc_k> rows only for the same bins
            rows, src_rows = rows[:len(SPECIAL_TOKENS)], src_rows[:len(SPECIAL_TOKENS)]
        emb[rows] = src_emb[src_rows]
        copied.append(f"embedding rows of {len(rows)} added tokens")
    seconds = (src.config.provenance.get("adapt") or {}).get("train_seconds")
    return {"checkpoint": str(source), "copied": copied, "source_train_seconds": seconds}


def _added_rows(model: ChatSpotModel) -> list[int]:
    """Embedding rows of ChatSpot's added tokens: `<image>`, `<box>`, `</box>`, `<region>`, then `<loc_k>`."""
    from chatspot_edge.model.loc_tokens import loc_token_ids

    c = model.config
    return [c.image_token_id, c.box_start_id, c.box_end_id, c.region_token_id, *loc_token_ids(model)]


# collated fields that describe a micro-batch or feed an auxiliary loss rather than the model's forward
BATCH_META = ("index", "n_tokens", "token_mask", "cell_words", "cell_targets", "relation_word", "relation_sign",
              "relation_share")


class AnswerLoss:
    """The training objective of adapt: cross-entropy on answer tokens (per sample first, `per_sample`), plus
    the region-text alignment loss of `region_align_kind` (model.chatspot.REGION_ALIGN_KINDS) with weight
    `region_align`.

    An objective is what the loop calls for a micro-batch's loss: `objective(model, features, batch) ->
    (loss, parts)`, with `features` the frozen vision encoder's output for `batch["pixels"]` and `batch` the
    collated micro-batch (`index`: the records' positions in the training split); `parts` are floats for the
    progress line. `to(device)` moves whatever it holds besides the model; `describe()` goes into the
    checkpoint's provenance. Other objectives (train.distill.DistillObjective) plug into the same loop."""

    def __init__(self, per_sample: bool = True, region_align: float = 1.0, region_align_kind: str = "absolute",
                 cell_align: float = 0.0, ground_attn: float = 0.0, relation_align: float = 0.0):
        if region_align_kind not in REGION_ALIGN_KINDS:
            raise InputError(f"unknown region alignment {region_align_kind!r} (one of {', '.join(REGION_ALIGN_KINDS)})")
        if not cell_align >= 0:
            raise InputError(f"--cell-align must be >= 0, got {cell_align}")
        self.per_sample, self.region_align, self.region_align_kind = per_sample, region_align, region_align_kind
        self.cell_align = cell_align  # weight of train.cell_align's loss; the batches then carry its targets
        if not ground_attn >= 0:
            raise InputError(f"--ground-attn must be >= 0, got {ground_attn}")
        self.ground_attn = ground_attn  # weight of train.ground_attn's loss (targets read from the labels)
        if not relation_align >= 0:
            raise InputError(f"--relation-align must be >= 0, got {relation_align}")
        self.relation_align = relation_align  # weight of train.relation_align's loss; batches carry its targets

    def to(self, device) -> "AnswerLoss":
        return self

    def output(self, model: ChatSpotModel, features: torch.Tensor, batch: dict,
               region_share: float = 1.0) -> ChatSpotOutput:
        """The model's training forward on the micro-batch: loss, and logits at the answer positions.
        `region_share` scales the alignment weight (the micro-batch's share of the step's regions)."""
        return self._output(model, features, batch, region_share)[0]

    def _output(self, model: ChatSpotModel, features: torch.Tensor, batch: dict,
                region_share: float = 1.0) -> tuple[ChatSpotOutput, dict[str, torch.Tensor]]:
        """(the output, {name: auxiliary loss already in its loss}: "cell" (image-cell alignment), "ground"
        (grounding attention), each when on and the micro-batch has targets for it)."""
        image_embeds = model.project(features)
        fields = {k: v for k, v in batch.items() if k not in BATCH_META}
        parts: dict[str, torch.Tensor] = {}
        with contextlib.ExitStack() as stack:
            seen = None
            if self.ground_attn > 0:
                from chatspot_edge.train.ground_attn import attention_inputs, supervised_layers

                layers = supervised_layers(len(model.llm.get_decoder().layers))
                seen = stack.enter_context(attention_inputs(model, layers))
            out = model(image_embeds=image_embeds, per_sample=self.per_sample,
                        region_align=self.region_align * region_share, region_align_kind=self.region_align_kind,
                        **fields)
        if seen is not None:
            from chatspot_edge.train.ground_attn import grounding_attention_loss

            ground = grounding_attention_loss(model, seen, batch["input_ids"], batch["labels"])
            if ground is not None:
                out.loss = out.loss + self.ground_attn * ground
                parts["ground"] = ground
        cell = None
        if self.cell_align > 0:
            if "cell_words" not in batch:
                raise ValueError("cell_align > 0 needs batches collated with cell_words (Batches(cell_words=...))")
            from chatspot_edge.train.cell_align import cell_alignment_loss

            cell = cell_alignment_loss(model, image_embeds, batch["cell_words"], batch["cell_targets"])
            out.loss = out.loss + self.cell_align * cell
            parts["cell"] = cell
        if self.relation_align > 0:
            if "relation_word" not in batch:
                raise ValueError("relation_align > 0 needs batches collated with relation_words "
                                 "(Batches(relation_words=...))")
            from chatspot_edge.train.relation_align import relation_alignment_loss

            rel = relation_alignment_loss(model, batch["boxes"], batch["box_batch"], batch.get("box_segment"),
                                          batch["relation_word"], batch["relation_sign"])
            if rel is not None:  # weighted by the micro-batch's share of the step's relation targets (the loop)
                out.loss = out.loss + self.relation_align * float(batch.get("relation_share", 1.0)) * rel
                parts["relation"] = rel
        return out, parts

    def __call__(self, model: ChatSpotModel, features: torch.Tensor, batch: dict,
                 region_share: float = 1.0) -> tuple[torch.Tensor, dict]:
        out, parts = self._output(model, features, batch, region_share)
        return out.loss, {k: float(v.detach()) for k, v in parts.items()}

    def describe(self) -> dict:
        return {"objective": "answer cross-entropy", "per_sample": self.per_sample, "region_align": self.region_align,
                "region_align_kind": self.region_align_kind, "cell_align": self.cell_align,
                "ground_attn": self.ground_attn, "relation_align": self.relation_align}


def init_distributed(device_option: str | None = None) -> tuple[int, int, str]:
    """(world size, rank, device). Under torchrun: joins the process group (nccl on GPUs, gloo on CPUs) once;
    a CPU rank takes its share of the cores. Alone: `device_option` (cpu, cuda or auto; see
    `chatspot_edge.devices.resolve_device`), else the CPU, or CUDA with CHATSPOT_DEVICE=cuda."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = "cpu"
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if dist.get_backend() == "nccl":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    elif device_option is not None:
        from chatspot_edge.devices import resolve_device

        device = resolve_device(device_option)
    elif torch.cuda.is_available() and os.environ.get("CHATSPOT_DEVICE", "") == "cuda":
        device = "cuda"
    return world, rank, device


def adapt(opts: AdaptOptions, objective=None) -> dict:
    """Train; write the checkpoint to `opts.out` atomically. Returns a summary (steps, time, losses).
    `objective`: the loss the loop minimizes (default `AnswerLoss` from the options; see `AnswerLoss`)."""
    from chatspot_edge.data import load_split

    if opts.preset not in PRESET_DEFAULTS:
        raise InputError(f"unknown preset {opts.preset!r} (choose from {', '.join(PRESET_DEFAULTS)})")
    d = dict(PRESET_DEFAULTS[opts.preset])
    if opts.lr_llm is not None:
        d["lr_llm"] = opts.lr_llm
    if opts.lr_proj is not None:
        d["lr_proj"] = opts.lr_proj
    batch_size = opts.batch_size or d["batch_size"]
    stage1_steps = d["stage1_steps"] if opts.stage1_steps is None else opts.stage1_steps
    reader_steps = d.get("reader_steps", 0) if opts.reader_steps is None else opts.reader_steps
    if reader_steps and opts.fsdp:
        raise InputError("--reader-steps runs before the model is sharded: not with --fsdp")
    if opts.warm_start is not None and opts.stage1_steps is None:
        stage1_steps = d.get("stage1_steps_warm", stage1_steps)
    minutes = opts.minutes if opts.minutes is not None else d["minutes"]
    # a preset that fixes its stage-2 steps (deterministic in samples) keeps its minutes as a cap: a slower
    # machine trains fewer steps (the schedule is fixed after the first timed steps) rather than overrunning
    steps = opts.steps if opts.steps is not None else (d.get("steps") if opts.minutes is None else None)
    cap_minutes = minutes if (opts.steps is None and steps is not None) else None
    turns = opts.turns if opts.turns is not None else d.get("turns", 0)
    max_tokens = opts.max_tokens if opts.max_tokens is not None else (d.get("max_tokens") or 320)
    if opts.referring is None and opts.bins is None and opts.init is None and d.get("referring"):
        opts = replace(opts, referring=d["referring"], bins=d.get("bins"))
    if opts.loc_init is None:
        opts = replace(opts, loc_init=d.get("loc_init", "mean"))

    world, rank, device = init_distributed(opts.device)
    distributed = world > 1
    if batch_size % (world * opts.grad_accum):
        raise InputError(f"--batch-size {batch_size} must be divisible by world size x grad-accum ({world}x{opts.grad_accum})")
    micro = batch_size // (world * opts.grad_accum)

    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    records = load_split(opts.data, "train")
    if not records:
        raise InputError(f"{opts.data}: no training records")
    model, tok = _build_model(opts)
    warm_start = warm_start_from(model, opts.warm_start) if opts.warm_start is not None else None
    if warm_start:
        _log(opts, rank, f"warm start from {opts.warm_start}: {', '.join(warm_start['copied'])}")
    if opts.loc_init not in LOC_INITS:
        raise InputError(f"--loc-init must be one of {', '.join(LOC_INITS)}, got {opts.loc_init!r}")
    # <loc_k> rows: set here ("fourier") or from the aligned position map when stage 2 starts ("position");
    # rows copied by a warm start (same bins) are kept
    loc_init = opts.loc_init if model.config.referring_format.is_loc and not (
        warm_start and any("loc" in c for c in warm_start["copied"])) and opts.init is None else "mean"
    if loc_init == "fourier":
        init_loc_rows(model, "fourier")
    if opts.lora:
        from peft import LoraConfig, get_peft_model

        model.llm = get_peft_model(model.llm, LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    added_rows = None
    if opts.embeddings == "added":
        if opts.fsdp:
            raise InputError("--fsdp trains the whole embedding table: add --embeddings all")
        from chatspot_edge.train.added_rows import AddedRows

        added_rows = AddedRows(model.llm, model.config.image_token_id)  # added tokens follow the base vocabulary
    elif opts.embeddings != "all":
        raise InputError(f"--embeddings must be 'added' or 'all', got {opts.embeddings!r}")
    model.to(device)
    has_words = model.region is not None and model.region.relative is not None and model.region.relative.words is not None
    if objective is None:
        objective = AnswerLoss(opts.per_sample_loss, opts.region_align,
                               opts.region_align_kind or d.get("region_align_kind", "absolute"),
                               d.get("cell_align", 0.0) if opts.cell_align is None else opts.cell_align,
                               d.get("ground_attn", 0.0) if opts.ground_attn is None else opts.ground_attn,
                               (d.get("relation_align", 1.0 if has_words else 0.0)
                                if opts.relation_align is None else opts.relation_align))
    if getattr(objective, "relation_align", 0) > 0 and not has_words:
        raise InputError("--relation-align trains the relative view's relation words: this model has none "
                         "(add --relation-words)")
    if getattr(objective, "ground_attn", 0) > 0 and not model.config.referring_format.is_loc:
        raise InputError("--ground-attn reads box answers in chatspot-loc-v1: add --referring loc "
                         f"(this model speaks {model.config.referring_format.name})")
    objective.to(device)
    sharded = None
    if opts.fsdp:
        if not distributed:
            raise InputError("--fsdp shards over the processes of torchrun (WORLD_SIZE > 1); run it under torchrun")
        if opts.lora:
            raise InputError("--fsdp with --lora is not supported: LoRA adapters are small enough for DDP")
        sharded = _shard(model, objective)
    proc = Processor(tok, model.config)
    cell_words = None
    if getattr(objective, "cell_align", 0) > 0:
        from chatspot_edge.train.cell_align import word_token_ids

        cell_words = word_token_ids(tok)
    relation_words = model.config.region_relation_words if getattr(objective, "relation_align", 0) > 0 else ()
    data2 = Batches(records, opts.data, proc, model.config.vision.image_size, opts.seed, max_tokens, turns, cell_words,
                    relation_words)
    data1 = Batches(records, opts.data, proc, model.config.vision.image_size, opts.seed + 1, max_tokens, turns,
                    cell_words, relation_words)
    data1._pixels = data2._pixels  # one image cache

    state_dir = opts.out.with_name(opts.out.name + ".train-state")
    meta = {"stage": 1, "step": 0, "total_steps": steps, "pos1": 0, "pos2": 0, "elapsed": 0.0,
            "losses": [], "evals": [], "options": {k: str(v) for k, v in asdict(opts).items()}}
    resumed = False
    if opts.resume and (state_dir / "state.json").is_file():
        saved = json.loads((state_dir / "state.json").read_text())
        _set_trainable(model, saved["stage"], opts.lora)
        opt = torch.optim.AdamW(_param_groups(model, d["lr_llm"], d["lr_proj"], opts.lr_embed), betas=(0.9, 0.95))
        meta = load_train_state(state_dir, model, opt, sharded)
        data1.position, data2.position = meta["pos1"], meta["pos2"]
        resumed = True
        _log(opts, rank, f"resumed from {state_dir}: stage {meta['stage']}, step {meta['step']}")

    autocast = _autocast(device, opts.precision)
    model.vision.eval()  # frozen, BatchNorm in inference mode

    def train_step(data: Batches, opt: torch.optim.Optimizer, factor: float) -> tuple[float, int, dict]:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        global_idx = data.next_indices(batch_size)
        mine = global_idx[rank::world]
        total_loss, n_tok, parts = 0.0, 0, {}
        micro_batches = [data.collate(mine[a * micro:(a + 1) * micro]) for a in range(opts.grad_accum)]
        # The region-text alignment loss is a mean over a micro-batch's regions; weighted by the micro-batch's
        # share of the global batch's regions, the accumulated (and rank-averaged) gradients are those of one
        # mean over all of them, as without accumulation (the answer loss is a mean over samples, and every
        # micro-batch holds the same number of samples). The relation-word alignment, a mean over the regions
        # with a relation target, is weighted the same way by its share of those (`relation_share`).
        n_regions = [int(b["boxes"].shape[0]) for b in micro_batches]
        n_relations = [int((b["relation_sign"] != 0).sum()) if "relation_sign" in b else 0 for b in micro_batches]
        counts = torch.tensor([sum(n_regions), sum(n_relations)], dtype=torch.long, device=device)
        if distributed:
            dist.all_reduce(counts)
        all_regions, all_relations = (int(c) for c in counts)
        for a, micro_batch in enumerate(micro_batches):
            batch = {k: v.to(device) for k, v in micro_batch.items()}
            n_tok += int(batch.pop("n_tokens"))
            region_share = n_regions[a] * opts.grad_accum * world / max(1, all_regions)
            if "relation_sign" in batch:
                batch["relation_share"] = torch.tensor(n_relations[a] * opts.grad_accum * world / max(1, all_relations))
            last = a == opts.grad_accum - 1
            if sharded is not None:
                sharded.set_requires_gradient_sync(last)  # FSDP: reduce-scatter once per optimizer step
            sync = contextlib.nullcontext() if (last or not distributed or sharded is not None) else fwd.no_sync()
            with sync:
                with autocast:
                    loss = fwd(region_share=region_share, **batch)
                (loss / opts.grad_accum).backward()
            total_loss += float(loss.detach()) / opts.grad_accum
            for k, v in (fwd.module if hasattr(fwd, "module") else fwd).parts.items():
                parts[k] = parts.get(k, 0.0) + v / opts.grad_accum
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total_loss, n_tok * world, parts

    def wrap() -> torch.nn.Module:
        """The forward module for the current trainable set (DDP registers its hooks at construction)."""
        if sharded is not None:
            return sharded
        if not distributed:
            return _Forward(model, objective)
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(_Forward(model, objective), find_unused_parameters=True)

    fwd = None
    t_start = time.perf_counter() - meta.get("elapsed", 0.0)

    # ---- stage 0: the crop view learns to read (train.reader) ----------------------------------------------
    if meta["stage"] == 1 and meta["step"] == 0 and not resumed and reader_steps > 0:
        from chatspot_edge.train.reader import READER_BATCH, READER_LR, pretrain_reader

        # a region encoder from a checkpoint (--init, --warm-start): its pooled and geometry views carry what an LLM
        # reads, so the crop view learns next to them; a fresh one's are random projections that stage 1 retrains,
        # so the crop view learns alone (no vision forward)
        trained_views = opts.init is not None or bool(warm_start and "region" in warm_start["copied"])
        meta["reader"] = pretrain_reader(
            model, tok, records, lambda rec: data1.load_image(opts.data, rec),
            trained_views, reader_steps,
            READER_BATCH, READER_LR, opts.seed, log=lambda msg: _log(opts, rank, msg))

    # ---- stage 1: projector alignment ----------------------------------------------------------------------
    if meta["stage"] == 1:
        if not resumed:
            _set_trainable(model, 1, opts.lora)
            opt = torch.optim.AdamW(_param_groups(model, d["lr_llm"], d["lr_proj"], opts.lr_embed), betas=(0.9, 0.95))
        model.train(); model.vision.eval()
        fwd = wrap()
        while meta["step"] < stage1_steps:
            loss, _, _ = train_step(data1, opt, lr_factor(meta["step"], stage1_steps, max(1, stage1_steps // 10)))
            meta["step"] += 1
            meta["losses"].append([1, meta["step"], round(loss, 4)])
            if meta["step"] % 10 == 0 or meta["step"] == stage1_steps:
                _log(opts, rank, f"stage 1 step {meta['step']}/{stage1_steps} loss {loss:.3f}")
        meta.update(stage=2, step=0, pos1=data1.position)
        resumed = False

    # ---- stage 2: projector + LLM on every task ------------------------------------------------------------
    if not resumed:
        if loc_init == "position" and meta["step"] == 0:
            init_loc_rows(model, "position", added_rows)
        _set_trainable(model, 2, opts.lora)
        opt = torch.optim.AdamW(_param_groups(model, d["lr_llm"], d["lr_proj"], opts.lr_embed), betas=(0.9, 0.95))
    model.train(); model.vision.eval()
    fwd = wrap()
    total = meta["total_steps"]
    t2 = time.perf_counter()
    timing_steps = 5
    tokens_seen, t_last, last_print = 0, time.perf_counter(), 0.0
    steps_here, t_step1 = 0, t2  # stage-2 steps of this process; the end of its first (warm-up) step
    while total is None or meta["step"] < total:
        warm = max(1, int(opts.warmup * (total or 1000)))
        loss, n_tok, parts = train_step(data2, opt, lr_factor(meta["step"], total or 1000, warm))
        meta["step"] += 1
        steps_here += 1
        t_step1 = time.perf_counter() if steps_here == 1 else t_step1
        tokens_seen += n_tok
        meta["losses"].append([2, meta["step"], round(loss, 4)])
        capped = cap_minutes is not None and not meta.get("capped") and meta["step"] >= timing_steps and steps_here > 1
        if capped:  # fixed steps under a minutes cap: keep them if they fit, else as many as fit
            now = time.perf_counter()
            per_step = (now - t_step1) / (steps_here - 1)
            left = cap_minutes * 60 - (now - t2)
            if opts.deadline is not None:
                left = min(left, opts.deadline - time.time())
            est = meta["step"] + int(max(0.0, left) / per_step)
            if distributed:
                t = torch.tensor([est], dtype=torch.long)
                dist.broadcast(t, 0)
                est = int(t)
            meta["capped"] = True
            if est < total:
                _log(opts, rank, f"stage 2: {per_step:.2f} s/step: {total} steps do not fit {cap_minutes:g} min; "
                                 f"training {max(timing_steps + 1, est)}")
                total = meta["total_steps"] = max(timing_steps + 1, est)
        if total is None and meta["step"] >= timing_steps and steps_here > 1:  # fix the schedule from the step time
            now = time.perf_counter()
            per_step = (now - t_step1) / (steps_here - 1)  # the first step's warm-up (allocations, kernels) left out
            left = minutes * 60 - (now - t2)
            if opts.deadline is not None:  # stage 2 also ends by this wall-clock time
                left = min(left, opts.deadline - time.time())
            est = meta["step"] + int(max(0.0, left) / per_step)
            if distributed:
                t = torch.tensor([est], dtype=torch.long)
                dist.broadcast(t, 0)
                est = int(t)
            total = meta["total_steps"] = max(timing_steps + 1, est)
            _log(opts, rank, f"stage 2: {per_step:.2f} s/step -> {total} steps in "
                             f"{(now - t2 + max(0.0, left)) / 60:.1f} min")
        now = time.perf_counter()
        if now - last_print > 5 or meta["step"] == total:
            rate = tokens_seen / max(now - t_last, 1e-9)
            eta = (total - meta["step"]) * (now - t2) / max(1, meta["step"]) if total else float("nan")
            shown = "".join(f" {k} {v:.3f}" for k, v in parts.items())
            _log(opts, rank, f"stage 2 step {meta['step']}/{total or '?'} loss {loss:.3f}{shown} "
                             f"{rate:,.0f} tok/s {batch_size * meta['step'] / (now - t2):.1f} samples/s ETA {eta:.0f}s")
            last_print = now
        if (opts.deadline is not None and not distributed and total is not None and timing_steps < meta["step"] < total
                and time.time() > opts.deadline):  # steps slower than the timed ones: the deadline is a hard end
            _log(opts, rank, f"stage 2: deadline reached at step {meta['step']} of {total}: stage 2 ends here")
            meta["deadline_cut"] = [meta["step"], total]
            total = meta["total_steps"] = meta["step"]
        if opts.eval_every and meta["step"] % opts.eval_every == 0:
            plain = gathered_model(model, sharded)  # FSDP: a collective; None on ranks > 0
            if rank == 0:
                acc = quick_eval(plain, tok, opts.data, opts.eval_samples, opts.precision)
                meta["evals"].append({"step": meta["step"], "elapsed_s": round(time.perf_counter() - t_start, 1), **acc})
                _log(opts, rank, f"eval @ {meta['step']}: {acc}")
            model.train(); model.vision.eval()
        if opts.save_every and meta["step"] % opts.save_every == 0 and meta["step"] < (total or 0):
            meta.update(pos1=data1.position, pos2=data2.position, elapsed=time.perf_counter() - t_start)
            state = trainable_state(model, opt, sharded) if sharded is not None else None  # a collective
            if rank == 0:
                save_train_state(state_dir, model, opt, meta, state)
            if distributed:
                dist.barrier()
            if os.environ.get("CHATSPOT_KILL_AT_STEP") == str(meta["step"]):  # fault injection for the resume test
                os.kill(os.getpid(), signal.SIGKILL)

    elapsed = time.perf_counter() - t_start
    stage2_seconds = time.perf_counter() - t2  # this process's stage 2 (a resumed run: since the resume)
    model.eval()
    if added_rows is not None:
        added_rows.merge()  # every rank: the returned model is an ordinary tied embedding again
    if sharded is not None:
        model = gathered_model(model, sharded)  # full weights on rank 0 (a collective)
    if rank == 0:
        if opts.lora:
            model.llm = model.llm.merge_and_unload()
        model.config.provenance = dict(model.config.provenance, adapt={
            "data": str(opts.data), "stage1_steps": stage1_steps, "stage2_steps": meta["step"],
            **({"reader": meta["reader"]} if meta.get("reader") else {}),
            "batch_size": batch_size, "train_seconds": round(elapsed, 1), "lora": opts.lora, "seed": opts.seed,
            "objective": objective.describe(),
            **({"warm_start": warm_start} if warm_start else {})})
        log = {"losses": meta["losses"], "evals": meta["evals"], "train_seconds": elapsed}
        save_checkpoint(model.cpu(), tok, opts.out, extra_files={"training_log.json": json.dumps(log)})
        shutil.rmtree(state_dir, ignore_errors=True)
        _log(opts, rank, f"wrote {opts.out} ({meta['step']} stage-2 steps, {elapsed / 60:.1f} min)")
    if distributed:
        dist.barrier()
    return {"steps": meta["step"], "seconds": elapsed, "stage2_seconds": stage2_seconds, "losses": meta["losses"],
            "evals": meta["evals"], "deadline_cut": meta.get("deadline_cut"), "reader": meta.get("reader"),
            "model": model}


def _shard(model: ChatSpotModel, objective) -> torch.nn.Module:
    """FSDP2: one unit per decoder layer and the root (`_Forward`: vision encoder, projector, region encoder,
    embeddings, final norm, tied head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.llm.model.layers:
        fully_shard(layer)
    return fully_shard(_Forward(model, objective))


def _full_state_dict(sharded: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The FSDP root's full state dict on rank 0's CPU (empty on the others), keyed like `ChatSpotModel`'s
    own state dict (the `_Forward` wrapper's "model." prefix removed). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    msd = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in msd.items()}


def gathered_model(model: ChatSpotModel, sharded: torch.nn.Module | None) -> ChatSpotModel | None:
    """The model with full weights: `model` itself without FSDP; under FSDP a plain copy on rank 0 (None on
    the other ranks), gathered from the shards (every rank must call this)."""
    if sharded is None:
        return model
    msd = _full_state_dict(sharded)
    if dist.get_rank() != 0:
        return None
    plain = ChatSpotModel(model.config)
    missing, unexpected = plain.load_state_dict(msd, strict=False)
    if unexpected or [m for m in missing if m != "llm.lm_head.weight"]:
        raise RuntimeError(f"gathered FSDP state does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if plain.llm.config.tie_word_embeddings:
        plain.llm.tie_weights()
    return plain.eval()


class _Forward(torch.nn.Module):
    """The training forward: the frozen vision encoder without a graph, then the objective (projector + region
    encoder + LLM; `pixels` also feed the region crops). One module, so DDP and FSDP wrap all of it; the
    objective is a plain attribute, so whatever it holds (a teacher) is not wrapped."""

    def __init__(self, model: ChatSpotModel, objective):
        super().__init__()
        self.model = model
        self.objective = objective
        self.parts: dict[str, float] = {}

    def forward(self, pixels: torch.Tensor, region_share: float = 1.0, **batch) -> torch.Tensor:
        """`region_share`: this micro-batch's share of the optimizer step's regions x micro-batches (see the loop):
        the region-text alignment weight is scaled by it."""
        with torch.no_grad():
            features = self.model.vision(pixels)
        loss, self.parts = self.objective(self.model, features, dict(batch, pixels=pixels), region_share)
        region = self.model.region
        if region is not None and batch["boxes"].numel() == 0:
            # no region in this micro-batch: a zero term keeps the region encoder in the graph, so every rank
            # reduces the same gradients (FSDP's reduce-scatter needs that; DDP copes either way, it is built
            # with find_unused_parameters)
            loss = loss + 0.0 * sum(p.sum() for p in region.parameters() if p.requires_grad)
        return loss


def quick_eval(model: ChatSpotModel, tok, data: Path, n: int, precision: str = "auto") -> dict:
    """Every SPEC-6 accuracy (no box noise) + relation and counting on the first `n` test records with a region
    or counting question (the learning curve), on the model's own device (`resolve_precision`'s autocast)."""
    from chatspot_edge.data import load_image, load_split
    from chatspot_edge.evaluation.answerers import TorchAnswerer
    from chatspot_edge.evaluation.protocol import evaluate

    records = [r for r in load_split(data, "test") if r.get("task") != "image_caption"][:n]
    model.eval()
    bf16 = resolve_precision(next(model.parameters()).device.type, precision) == "bf16"
    res = evaluate(TorchAnswerer(model, tok, batch_size=32, autocast=torch.bfloat16 if bf16 else None), records,
                   lambda r: load_image(data, r), noise=False)
    return {k: v for k, v in {**res["metrics"], **res["extra_metrics"]}.items()
            if v is not None and not k.startswith("noise")}
