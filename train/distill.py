"""distill: prune a trained ChatSpot model's LLM into a student at most half its size and recover it by
knowledge distillation, in adapt's training loop (resumable, bf16, DDP / FSDP under torchrun, progress, ETA).

    chatspot-edge distill --teacher CKPT --data DIR --out CKPT [--keep-blocks N|LIST] [--ffn-ratio R]
                          [--minutes M | --steps S] [--resume]

1. Prune (`train.prune`, `model.prune`): importance of the teacher's blocks, FFN channels and GQA groups on
   `--calib-samples` training records; the plan keeps the most important within `--max-params` (default 0.5)
   of the teacher's non-embedding LLM parameters. The pruned student (no recovery; a baseline) is written to
   `OUT.pruned/` with `prune.json` (importance, plan, block map, sizes); `--student CKPT` starts from an
   existing pruned student instead (the baselines share one).
2. Recover (`DistillObjective` in `train.adapt.adapt`): on answer tokens,
       loss = ce_weight * CE(labels) + kd_weight * T^2 * KL(teacher_T || student_T)
              + hidden_weight * mean_i (1 - cos(h_student_i, h_teacher_map(i)))
   with the teacher's logits computed on the fly, or read from a top-k cache (`--teacher-cache DIR`,
   `TeacherCache`: built once for the records the run draws, bounded by `--cache-max-mb`, safetensors). The
   hidden-state term matches each student block's output to its teacher block's (the block map) over prompt
   and answer tokens. `--kd-weight 0` is the cross-entropy-only baseline at the same budget.

The student is a plain `LlamaForCausalLM` checkpoint with the teacher's vision encoder, projector, region
encoder and tokenizer: export, quantize, runtime and bench take it unchanged.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from chatspot_edge.errors import InputError
from chatspot_edge.files import atomic_write_text, file_sha256
from chatspot_edge.model.chatspot import IGNORE_INDEX, ChatSpotModel
from chatspot_edge.train.adapt import (BATCH_META, PRESET_DEFAULTS, AdaptOptions, AnswerLoss, Batches, adapt, init_distributed,
                                      resolve_precision)

PRUNE_FILE = "prune.json"
CACHE_FORMAT = "chatspot-edge-teacher-cache/1"


@dataclass
class DistillOptions:
    teacher: Path
    data: Path
    out: Path
    student: Path | None = None  # start from this pruned student (a checkpoint) instead of pruning the teacher
    keep_blocks: str | None = None  # "N" or "0,3,7,..." (teacher blocks)
    ffn_ratio: float | None = None
    kv_groups: int | None = None  # key/value heads (GQA groups) kept per block; default all
    max_params: float = 0.5  # student / teacher non-embedding LLM parameters
    depth_metric: str = "loss"  # "loss" (skip-one-block answer loss) or "bi" (ShortGPT block influence)
    calib_samples: int = 64
    minutes: float | None = None
    steps: int | None = None
    batch_size: int | None = None
    grad_accum: int = 1
    lr_llm: float | None = None  # default: the teacher preset's adapt LR
    lr_proj: float | None = None  # projector + region encoder (trained already); default: lr_llm
    temperature: float = 2.0
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    hidden_weight: float = 0.0
    region_align: float = 0.0
    teacher_cache: Path | None = None
    top_k: int = 32
    cache_max_mb: float = 2048.0
    eval_every: int = 0
    eval_samples: int = 200
    save_every: int = 100
    resume: bool = False
    fsdp: bool = False
    seed: int = 0
    max_tokens: int = 320
    precision: str = "auto"  # autocast of training, importance and cache: bf16 / fp32 / auto (adapt's rule)
    device: str | None = None  # cpu, cuda or auto (adapt's --device); under torchrun: the rank's device
    quiet: bool = False


def _log(opts: DistillOptions, msg: str) -> None:
    if not opts.quiet and int(os.environ.get("RANK", "0")) == 0:
        print(msg, file=sys.stderr, flush=True)


def pruned_path(out: Path) -> Path:
    return out.with_name(out.name + ".pruned")


# ---------------------------------------------------------------------------------------------------------
# the objective


def per_sample_mean(token_values: torch.Tensor, labels: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """Mean of per-answer-token values `[M]` (answer positions in (sample, position) order, as the model
    selects them from `labels[:, 1:]`), within each sample first when `per_sample` (as the CE is)."""
    select = labels[:, 1:] != IGNORE_INDEX
    if not per_sample:
        return token_values.mean()
    B = labels.shape[0]
    sample = torch.arange(B, device=labels.device)[:, None].expand_as(select)[select]
    counts = torch.bincount(sample, minlength=B).clamp(min=1)
    per = torch.zeros(B, device=labels.device).index_add_(0, sample, token_values.float()) / counts
    return per[select.any(1)].mean()


def kd_token_loss(student_logits: torch.Tensor, temperature: float, teacher_logits: torch.Tensor | None = None,
                  topk_logp: torch.Tensor | None = None, topk_indices: torch.Tensor | None = None) -> torch.Tensor:
    """Forward KL(teacher_T || student_T) per answer position, times T^2 (Hinton et al.: keeps the gradient
    scale of the soft term independent of T). The teacher is given as full logits `[M, V]`, or as its top-k
    log-probabilities AT TEMPERATURE T `[M, k]` + their vocabulary ids `[M, k]` (the cache): then the KL is
    taken over k + 1 outcomes, the top k and "any other token" (the teacher's remaining mass against the
    student's), which equals the full KL when the teacher's tail is empty and is never above it. Returns `[M]`,
    float32."""
    T = float(temperature)
    logq = F.log_softmax(student_logits.float() / T, dim=-1)
    if teacher_logits is not None:
        logp = F.log_softmax(teacher_logits.float() / T, dim=-1)
        return (logp.exp() * (logp - logq)).sum(-1) * (T * T)
    idx = topk_indices.long()
    logp = topk_logp.float()
    logq_k = torch.gather(logq, 1, idx)
    logq_rest = torch.logsumexp(logq.scatter(1, idx, float("-inf")), dim=-1)
    p_k = logp.exp()
    p_rest = (1 - p_k.sum(-1)).clamp(min=0)
    has_rest = (p_rest > 0) & torch.isfinite(logq_rest)  # k = V: no other token (p_rest is rounding)
    rest = torch.where(has_rest, p_rest * (torch.log(p_rest.clamp(min=1e-30)) - logq_rest.clamp(min=-1e30)),
                       torch.zeros_like(p_rest))
    return ((p_k * (logp - logq_k)).sum(-1) + rest) * (T * T)


class _Capture:
    """Forward hooks that keep the outputs of some decoder blocks (hidden-state matching)."""

    def __init__(self, layers, which: list[int]):
        self.out: dict[int, torch.Tensor] = {}
        self.handles = [layers[i].register_forward_hook(self._hook(i)) for i in which]

    def _hook(self, i):
        def hook(module, args, output):
            self.out[i] = output
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class DistillObjective(AnswerLoss):
    """The distillation loss for adapt's loop (see the module docstring). `teacher`: the full model (frozen,
    eval; None when everything it gives comes from `cache`); `block_map[i]`: the teacher block of student
    block i (hidden-state matching)."""

    def __init__(self, teacher: ChatSpotModel | None, temperature: float = 2.0, kd_weight: float = 1.0,
                 ce_weight: float = 1.0, hidden_weight: float = 0.0, block_map: list[int] | None = None,
                 per_sample: bool = True, region_align: float = 0.0, cache: "TeacherCache | None" = None):
        super().__init__(per_sample, region_align)
        self.teacher, self.cache = teacher, cache
        self.temperature, self.kd_weight, self.ce_weight, self.hidden_weight = temperature, kd_weight, ce_weight, hidden_weight
        self.block_map = block_map
        if hidden_weight > 0 and (teacher is None or block_map is None):
            raise InputError("hidden-state matching needs the teacher on the fly and the block map (prune.json)")
        if kd_weight > 0 and teacher is None and cache is None:
            raise InputError("distillation needs the teacher or its logits cache")
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def to(self, device) -> "DistillObjective":
        if self.teacher is not None:
            self.teacher.to(device)
        return self

    def __call__(self, model: ChatSpotModel, features: torch.Tensor, batch: dict,
                 region_share: float = 1.0) -> tuple[torch.Tensor, dict]:
        need_teacher_run = self.hidden_weight > 0 or (self.kd_weight > 0 and self.cache is None)
        s_cap = _Capture(model.llm.model.layers, list(range(len(self.block_map)))) if self.hidden_weight > 0 else None
        try:
            out = self.output(model, features, batch, region_share)
        finally:
            if s_cap is not None:
                s_cap.close()
        parts = {"ce": float(out.loss.detach())}
        loss = self.ce_weight * out.loss if self.ce_weight else 0.0 * out.loss
        t_logits, t_cap = None, None
        if need_teacher_run:
            t_cap = _Capture(self.teacher.llm.model.layers, sorted(set(self.block_map))) if self.hidden_weight > 0 else None
            try:
                with torch.no_grad():
                    fields = {k: v for k, v in batch.items() if k not in BATCH_META}
                    t_logits = self.teacher(per_sample=self.per_sample, **fields).logits
            finally:
                if t_cap is not None:
                    t_cap.close()
        if self.kd_weight > 0:
            if self.cache is not None:
                values, ids = self.cache.lookup(batch["index"].tolist(), device=out.logits.device)
                if values.shape[0] != out.logits.shape[0]:
                    raise InputError(f"teacher cache: {values.shape[0]} answer positions cached for this batch, "
                                     f"the model has {out.logits.shape[0]} (stale cache? rebuild it)")
                tok = kd_token_loss(out.logits, self.temperature, topk_logp=values, topk_indices=ids)
            else:
                tok = kd_token_loss(out.logits, self.temperature, teacher_logits=t_logits)
            kd = per_sample_mean(tok, batch["labels"], self.per_sample)
            loss = loss + self.kd_weight * kd
            parts["kd"] = float(kd.detach())
        if self.hidden_weight > 0:
            # the real (non-padding) positions: the 2D attention mask, or for samples of independent turns (whose
            # attention mask is 4D, `train.adapt.turn_masks`) the padding mask collated beside it
            valid = batch.get("token_mask", batch["attention_mask"]).bool()
            dist = [1 - F.cosine_similarity(s_cap.out[i][valid].float(), t_cap.out[t][valid].float(), dim=-1).mean()
                    for i, t in enumerate(self.block_map)]
            hid = torch.stack(dist).mean()
            loss = loss + self.hidden_weight * hid
            parts["hid"] = float(hid.detach())
        return loss, parts

    def describe(self) -> dict:
        return {"objective": "distillation" if (self.kd_weight or self.hidden_weight) else "answer cross-entropy",
                "ce_weight": self.ce_weight, "kd_weight": self.kd_weight, "temperature": self.temperature,
                "hidden_weight": self.hidden_weight, "per_sample": self.per_sample, "region_align": self.region_align,
                "teacher_logits": ("cache top-%d" % self.cache.k) if self.cache is not None else "on the fly"}


# ---------------------------------------------------------------------------------------------------------
# the teacher's logits, cached


class TeacherCache:
    """The teacher's top-k logits at the answer positions of training records, on disk.

    A folder: `cache.json` (format, k, and the key: teacher weights and config sha256, training data sha256,
    max tokens, temperature) and chunks `chunk-RRRRRRRR.safetensors` (R: the chunk's first record) holding
    `records` int64 `[n]`, `offsets` int64 `[n + 1]` (answer positions of record j: offsets[j]..offsets[j+1]),
    `values` float16 `[M, k]` (the teacher's log-probabilities at the key's temperature, its k most likely
    tokens) and `indices` int32 `[M, k]`. Each chunk is written
    atomically, so a build picks up where it stopped; a cache whose key differs is refused."""

    CHUNK = 256

    def __init__(self, folder: Path, k: int, key: dict):
        self.folder, self.k, self.key = Path(folder), int(k), key
        self._index: dict[int, tuple[int, int, int]] = {}  # record -> (chunk, start, end)
        self._values: list[torch.Tensor] = []
        self._ids: list[torch.Tensor] = []
        meta = self.folder / "cache.json"
        if meta.is_file():
            saved = json.loads(meta.read_text())
            if saved.get("format") != CACHE_FORMAT or saved.get("key") != key or int(saved.get("top_k", -1)) != self.k:
                raise InputError(f"{self.folder}: a teacher cache for another teacher, data or top-k "
                                 f"(use another folder, or delete it)")

    def chunks(self) -> list[Path]:
        return sorted(self.folder.glob("chunk-*.safetensors"))

    def cached_records(self) -> set[int]:
        done: set[int] = set()
        for c in self.chunks():
            done.update(load_file(str(c))["records"].tolist())
        return done

    def bytes_on_disk(self) -> int:
        return sum(c.stat().st_size for c in self.chunks())

    @torch.no_grad()
    def build(self, teacher: ChatSpotModel, batches: Batches, records: list[int], max_mb: float,
              batch_size: int = 16, rank: int = 0, world: int = 1, precision: str = "auto", log=None) -> None:
        """Cache `records` (positions in the training split) not cached yet; refuses (InputError) when the
        cache would exceed `max_mb`. Under torchrun each rank builds every world-th chunk."""
        todo = sorted(set(records) - self.cached_records())
        if not todo:
            return
        per_pos = self.k * (2 + 4)
        n_pos = sum(sum(1 for t in batches.proc.encode_conversation(batches.records[r]["conversations"]).labels[1:
                        batches.max_tokens] if t != IGNORE_INDEX) for r in todo)
        need = self.bytes_on_disk() + n_pos * per_pos + len(todo) * 16
        if need > max_mb * 2 ** 20:
            raise InputError(f"teacher cache: {need / 2 ** 20:.0f} MB for {len(todo)} more records exceeds "
                             f"--cache-max-mb {max_mb:g} (a smaller --top-k, fewer steps, or the teacher on the fly)")
        self.folder.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            atomic_write_text(self.folder / "cache.json", json.dumps(
                {"format": CACHE_FORMAT, "top_k": self.k, "key": self.key}, indent=2) + "\n")
        teacher.eval()
        device = next(teacher.parameters()).device
        bf16 = resolve_precision(str(device), precision) == "bf16"
        chunks = [todo[i:i + self.CHUNK] for i in range(0, len(todo), self.CHUNK)]
        t0 = time.perf_counter()
        for c, recs in enumerate(chunks):
            if c % world != rank:
                continue
            offsets, values, ids = [0], [], []
            for i in range(0, len(recs), batch_size):
                b = batches.collate(recs[i:i + batch_size])
                for k in BATCH_META:
                    b.pop(k, None)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = teacher(per_sample=True, **{k: v.to(device) for k, v in b.items()}).logits
                logp = F.log_softmax(logits.float() / float(self.key["temperature"]), dim=-1)
                top = torch.topk(logp, self.k, dim=-1)
                values.append(top.values.half().cpu())
                ids.append(top.indices.int().cpu())
                counts = (b["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
                for n in counts:
                    offsets.append(offsets[-1] + int(n))
            name = self.folder / f"chunk-{recs[0]:08d}.safetensors"  # records are in one chunk only: unique
            tmp = name.with_suffix(".tmp")
            save_file({"records": torch.tensor(recs, dtype=torch.long), "offsets": torch.tensor(offsets),
                       "values": torch.cat(values), "indices": torch.cat(ids)}, str(tmp))
            os.replace(tmp, name)
            if log:
                done = min(len(todo), (c + 1) * self.CHUNK)
                rate = done / max(1e-9, time.perf_counter() - t0)
                log(f"teacher cache: {done}/{len(todo)} records ({rate:.1f}/s, ETA {(len(todo) - done) / rate:.0f}s)")

    def load(self) -> None:
        """Read every chunk into memory (bounded by the build's --cache-max-mb)."""
        self._index.clear()
        self._values, self._ids = [], []
        for j, c in enumerate(self.chunks()):
            t = load_file(str(c))
            self._values.append(t["values"])
            self._ids.append(t["indices"])
            off = t["offsets"].tolist()
            for n, r in enumerate(t["records"].tolist()):
                self._index[r] = (j, off[n], off[n + 1])

    def lookup(self, records: list[int], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k logits `[M, k]` and ids `[M, k]` of `records`' answer positions, in order."""
        missing = [r for r in records if r not in self._index]
        if missing:
            raise InputError(f"teacher cache: records {missing[:5]} are not cached (rebuild with this run's --steps)")
        spans = [self._index[r] for r in records]
        v = torch.cat([self._values[j][a:b].float() for j, a, b in spans])
        i = torch.cat([self._ids[j][a:b].long() for j, a, b in spans])
        return v.to(device), i.to(device)


def cache_key(teacher_path: Path, data: Path, max_tokens: int, temperature: float) -> dict:
    """What a cache's values depend on: the teacher's weights and config, the training records, truncation,
    the temperature."""
    key = {"teacher_config_sha256": file_sha256(teacher_path / "config.json"),
           "train_sha256": file_sha256(Path(data) / "train.jsonl"), "max_tokens": int(max_tokens),
           "temperature": float(temperature)}
    weights = sorted(teacher_path.glob("*.safetensors"))
    key["teacher_weights_sha256"] = {w.name: file_sha256(w) for w in weights}
    return key


# ---------------------------------------------------------------------------------------------------------
# prune, then recover


def _calibration_batches(model: ChatSpotModel, tok, data: Path, n: int, seed: int, max_tokens: int,
                         batch_size: int = 16) -> list[dict]:
    """`n` training records (a fixed random draw; another seed than training's order) as collated batches."""
    from chatspot_edge.data import load_split
    from chatspot_edge.model.processor import Processor

    records = load_split(data, "train")
    if not records:
        raise InputError(f"{data}: no training records")
    b = Batches(records, data, Processor(tok, model.config), model.config.vision.image_size, seed + 7919, max_tokens)
    idx = b.next_indices(min(n, len(records)))
    out = []
    for i in range(0, len(idx), batch_size):
        batch = b.collate(idx[i:i + batch_size])
        for k in BATCH_META:
            batch.pop(k, None)
        out.append(batch)
    return out


def prune_teacher(opts: DistillOptions, out: Path, device: str = "cpu") -> dict:
    """Measure importance on referring data, choose the plan, write the pruned student to `out` (a checkpoint
    with `prune.json`). Returns prune.json's content."""
    from chatspot_edge.model.checkpoint import load_checkpoint, save_checkpoint
    from chatspot_edge.model.prune import LlamaShape, non_embedding_params, student_from_teacher
    from chatspot_edge.progress import task_progress
    from chatspot_edge.train.prune import choose_plan, measure_importance, parse_keep_blocks, plan_summary

    t0 = time.perf_counter()
    teacher, tok = load_checkpoint(opts.teacher)
    teacher.to(device)
    shape = LlamaShape.of(teacher.llm.config)
    keep = parse_keep_blocks(opts.keep_blocks)
    torch.manual_seed(opts.seed)
    batches = [{k: v.to(device) for k, v in b.items()} for b in
               _calibration_batches(teacher, tok, opts.data, opts.calib_samples, opts.seed, opts.max_tokens)]
    bf16 = resolve_precision(device, opts.precision) == "bf16"
    with task_progress("importance") as progress:
        imp = measure_importance(teacher, batches, opts.depth_metric, autocast=torch.bfloat16 if bf16 else None,
                                 progress=progress)
    plan = choose_plan(imp, shape, keep, opts.ffn_ratio, opts.kv_groups, opts.max_params, opts.depth_metric)
    student = student_from_teacher(teacher.cpu(), plan)
    summary = plan_summary(plan, shape)
    assert summary["non_embedding_params"] == non_embedding_params(student.llm)
    info = {
        "teacher": str(Path(opts.teacher).resolve()),
        "teacher_sha256": {w.name: file_sha256(w) for w in sorted(Path(opts.teacher).glob("*.safetensors"))},
        "data": str(opts.data), "calib_samples": imp.n_samples, "calib_tokens": imp.n_tokens,
        "depth_metric": opts.depth_metric, "max_params": opts.max_params,
        "requested": {"keep_blocks": opts.keep_blocks, "ffn_ratio": opts.ffn_ratio, "kv_groups": opts.kv_groups},
        "summary": summary, "block_map": plan.blocks, "plan": plan.to_dict(), "importance": imp.to_dict(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    student.config.provenance = dict(student.config.provenance, distill={
        k: info[k] for k in ("teacher", "teacher_sha256", "depth_metric", "calib_samples", "summary", "block_map")})
    save_checkpoint(student, tok, out, extra_files={PRUNE_FILE: json.dumps(info, indent=1)})
    return info


def _wait_for(path: Path, seconds: float = 6 * 3600) -> None:
    t = time.monotonic()
    while not path.is_file():
        if time.monotonic() - t > seconds:
            raise RuntimeError(f"timed out waiting for {path}")
        time.sleep(2)


def distill(opts: DistillOptions) -> dict:
    """Prune (or take `--student`), then train the student with `DistillObjective` in adapt's loop; the
    student checkpoint goes to `opts.out`. Returns adapt's summary plus the pruning summary."""
    from chatspot_edge.model.checkpoint import load_checkpoint

    opts.teacher, opts.data, opts.out = Path(opts.teacher), Path(opts.data), Path(opts.out)
    if not (opts.teacher / "config.json").is_file():
        raise InputError(f"{opts.teacher}: not a checkpoint (no config.json)")
    if not (opts.data / "train.jsonl").is_file():
        raise InputError(f"{opts.data}: no train.jsonl")
    if min(opts.kd_weight, opts.ce_weight, opts.hidden_weight) < 0 or opts.temperature <= 0:
        raise InputError("loss weights must be >= 0 and the temperature > 0")
    if opts.kd_weight == opts.ce_weight == opts.hidden_weight == 0:
        raise InputError("all loss weights are 0: nothing to train")
    world, rank, device = init_distributed(opts.device)

    student_path = opts.student
    info = None
    if student_path is None:
        student_path = pruned_path(opts.out)
        done = student_path / PRUNE_FILE
        if not (opts.resume and done.is_file()):
            if rank == 0:
                info = prune_teacher(opts, student_path, device)
                _log(opts, f"pruned: {info['summary']} in {info['seconds']:.0f}s -> {student_path}")
            else:
                _wait_for(done)
        else:
            _log(opts, f"pruned student {student_path} exists: reused (--resume)")
    elif not (Path(student_path) / "config.json").is_file():
        raise InputError(f"--student {student_path}: not a checkpoint")
    student_path = Path(student_path)
    if info is None:
        info = json.loads((student_path / PRUNE_FILE).read_text()) if (student_path / PRUNE_FILE).is_file() else None
    if opts.steps == 0:  # pruning only
        return {"steps": 0, "prune": info, "pruned": student_path}

    cfg_preset = json.loads((student_path / "config.json").read_text()).get("preset")
    preset = cfg_preset if cfg_preset in PRESET_DEFAULTS else "smol"
    lr_llm = opts.lr_llm if opts.lr_llm is not None else PRESET_DEFAULTS[preset]["lr_llm"]
    batch_size = opts.batch_size or PRESET_DEFAULTS[preset]["batch_size"]
    need_teacher = opts.hidden_weight > 0 or (opts.kd_weight > 0 and opts.teacher_cache is None)
    teacher = None
    cache = None
    if opts.kd_weight > 0 and opts.teacher_cache is not None:
        if opts.steps is None:
            raise InputError("--teacher-cache needs --steps (the cache holds the records the run draws)")
        cache = _prepare_cache(opts, batch_size, rank, world, device)
    if need_teacher:
        teacher, _ = load_checkpoint(opts.teacher)
    block_map = info["block_map"] if info else None
    if opts.hidden_weight > 0 and block_map is None:
        raise InputError(f"--hidden-weight: {student_path} has no {PRUNE_FILE} (the block map)")
    objective = DistillObjective(teacher, opts.temperature, opts.kd_weight, opts.ce_weight, opts.hidden_weight,
                                 block_map, per_sample=True, region_align=opts.region_align, cache=cache)
    aopts = AdaptOptions(preset=preset, data=opts.data, out=opts.out, init=student_path, stage1_steps=0,
                         minutes=opts.minutes, steps=opts.steps,
                         batch_size=batch_size, grad_accum=opts.grad_accum, lr_llm=lr_llm,
                         lr_proj=opts.lr_proj if opts.lr_proj is not None else lr_llm,
                         eval_every=opts.eval_every, eval_samples=opts.eval_samples, save_every=opts.save_every,
                         resume=opts.resume, fsdp=opts.fsdp, seed=opts.seed, region_align=opts.region_align,
                         max_tokens=opts.max_tokens, precision=opts.precision, device=opts.device, quiet=opts.quiet)
    result = adapt(aopts, objective=objective)
    result["prune"] = info
    result["pruned"] = student_path
    return result


def _prepare_cache(opts: DistillOptions, batch_size: int, rank: int, world: int, device: str) -> TeacherCache:
    """Build (where missing) and load the teacher's top-k cache for the records this run draws."""
    import torch.distributed as dist

    from chatspot_edge.data import load_split
    from chatspot_edge.model.checkpoint import load_checkpoint
    from chatspot_edge.model.processor import Processor

    cache = TeacherCache(opts.teacher_cache, opts.top_k,
                         cache_key(opts.teacher, opts.data, opts.max_tokens, opts.temperature))
    records = load_split(opts.data, "train")
    teacher, tok = load_checkpoint(opts.teacher)
    teacher.to(device)
    order = Batches(records, opts.data, Processor(tok, teacher.config), teacher.config.vision.image_size, opts.seed,
                    opts.max_tokens)
    needed = order.next_indices(opts.steps * batch_size)
    order.position = 0
    cache.build(teacher, order, needed, opts.cache_max_mb, rank=rank, world=world, precision=opts.precision,
                log=lambda m: _log(opts, m))
    if world > 1:
        dist.barrier()
    del teacher
    cache.load()
    _log(opts, f"teacher cache {opts.teacher_cache}: {len(cache._index)} records, "
               f"{cache.bytes_on_disk() / 2 ** 20:.1f} MB (top-{cache.k})")
    return cache


def options_dict(opts: DistillOptions) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
