"""What to prune: importance of a teacher LLM's blocks, FFN channels and GQA groups, measured on referring data,
and the plan (`model.prune.PrunePlan`) that keeps the most important ones within a parameter budget.

Measured with the teacher's own forward (`ChatSpotModel.__call__` with labels: answer-token loss, image and
region embeddings as in training) on calibration batches of training records, through hooks on the LLM's
decoder blocks only, so the image side can change without touching this:
- depth, `loss` (default): the answer loss with each block skipped (its input passed straight on), minus the
  loss of the whole teacher. A block whose removal costs nothing is the first to go.
- depth, `bi`: ShortGPT's block influence, 1 - E[cos(block input, block output)] over the prompt and answer
  tokens (one pass; a block that barely turns the residual stream is removable).
- width, FFN channel j of a block: E|a_j| * ||W_down[:, j]||, the mean size of what the channel adds to the
  residual stream (a_j: the activation entering `down_proj`), over the same tokens;
- width, GQA group g of a block: the sum over its query heads h of E||W_o[:, h] o_h||, what the heads reading
  key/value head g add to the residual stream.
Widths are ranked within each block (every block keeps its own channels and groups, the same number of them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch

from chatspot_edge.errors import InputError
from chatspot_edge.model.chatspot import ChatSpotModel
from chatspot_edge.model.prune import LlamaShape, PrunePlan

DEPTH_METRICS = ("loss", "bi")
DEFAULT_MAX_PARAMS = 0.5  # student non-embedding LLM parameters / the teacher's
DEFAULT_DEPTH = 0.6  # default plan: start from this fraction of the blocks, then fit the FFN width (see auto_shape)


@dataclass
class Importance:
    n_samples: int
    n_tokens: int  # prompt + answer tokens the width / influence statistics average over
    loss: float  # answer loss of the whole teacher on the calibration batches (per-sample mean)
    skip_loss: list[float] | None  # answer loss with block i skipped (depth metric "loss")
    block_influence: list[float]  # 1 - E cos(in, out) per block
    ffn: list[list[float]]  # per block, per FFN channel
    groups: list[list[float]]  # per block, per key/value head (GQA group)

    def depth_scores(self, metric: str) -> list[float]:
        """Higher = more important. "loss": loss increase when the block is skipped; "bi": block influence."""
        if metric == "loss":
            if self.skip_loss is None:
                raise InputError("depth metric 'loss' needs the skip losses (measure with depth_metric='loss')")
            return [s - self.loss for s in self.skip_loss]
        if metric == "bi":
            return list(self.block_influence)
        raise InputError(f"depth metric {metric!r}: choose from {', '.join(DEPTH_METRICS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Importance":
        return cls(**d)


class _Skip(torch.nn.Module):
    """A decoder block replaced by the identity (its input goes straight on)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def _answer_loss(model: ChatSpotModel, batches: list[dict]) -> float:
    total, n = 0.0, 0
    for b in batches:
        out = model(per_sample=True, **b)
        k = int((b["labels"] != -100).any(1).sum())
        total += float(out.loss) * k
        n += k
    return total / max(1, n)


@torch.no_grad()
def measure_importance(model: ChatSpotModel, batches: list[dict], depth_metric: str = "loss",
                       autocast: torch.dtype | None = torch.bfloat16,
                       progress: Callable[[int, int], None] | None = None) -> Importance:
    """Importance of every block, FFN channel and GQA group of `model.llm` on `batches` (collated training
    batches on the model's device: input_ids, attention_mask, labels, pixels, boxes, box_batch, ...).
    `depth_metric` "loss" adds one pass per block (the skip losses); "bi" needs the statistics pass only.
    `autocast`: the dtype of autocast (None: off)."""
    if depth_metric not in DEPTH_METRICS:
        raise InputError(f"depth metric {depth_metric!r}: choose from {', '.join(DEPTH_METRICS)}")
    model.eval()
    llm = model.llm
    layers = llm.model.layers
    shape = LlamaShape.of(llm.config)
    L = shape.n_layers
    ffn_sum = torch.zeros(L, shape.ffn, dtype=torch.float64)
    head_sum = torch.zeros(L, shape.n_head, dtype=torch.float64)
    cos_sum = torch.zeros(L, dtype=torch.float64)
    cos_n = torch.zeros(L, dtype=torch.float64)
    count = [0]
    mask: list[torch.Tensor] = []  # the current batch's valid-token mask [B, T]

    def valid(x: torch.Tensor) -> torch.Tensor:  # [B, T, ...] -> [n_valid, ...] in float32
        return x[mask[0]].float()

    def on_block(i):
        def hook(module, args, output):
            a, b = valid(args[0]), valid(output)
            ok = (a.norm(dim=-1) > 0) & (b.norm(dim=-1) > 0)  # a zero vector has no direction (e.g. a pad row)
            cos_sum[i] += torch.nn.functional.cosine_similarity(a[ok], b[ok], dim=-1).sum().double()
            cos_n[i] += int(ok.sum())
        return hook

    def on_down(i):
        w_norm = layers[i].mlp.down_proj.weight.detach().float().norm(dim=0)  # [ffn]

        def hook(module, args):
            ffn_sum[i] += (valid(args[0]).abs().sum(0) * w_norm).double()
        return hook

    def on_o_proj(i):
        w = layers[i].self_attn.o_proj.weight.detach().float().view(shape.hidden, shape.n_head, shape.head_dim)

        def hook(module, args):
            x = valid(args[0]).view(-1, shape.n_head, shape.head_dim)  # [n, heads, hd]
            contrib = torch.einsum("nhd,ohd->nho", x, w)  # what each head adds to the residual stream
            head_sum[i] += contrib.norm(dim=-1).sum(0).double()
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(on_block(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)))
    kind = next(model.parameters()).device.type
    ctx = lambda: torch.autocast(kind, dtype=autocast or torch.bfloat16, enabled=autocast is not None)  # noqa: E731
    steps = len(batches) * (1 + (L if depth_metric == "loss" else 0))
    done = 0
    total_loss, n_samples = 0.0, 0
    try:
        for b in batches:
            mask[:] = [b["attention_mask"].bool()]
            with ctx():
                out = model(per_sample=True, **b)
            k = int((b["labels"] != -100).any(1).sum())
            total_loss += float(out.loss) * k
            n_samples += k
            count[0] += int(mask[0].sum())
            done += 1
            if progress:
                progress(done, steps)
    finally:
        for h in handles:
            h.remove()
    n = max(1, count[0])
    g = shape.group_size
    groups = (head_sum / n).view(L, shape.n_head_kv, g).sum(-1)
    skip = None
    if depth_metric == "loss":
        skip = []
        for i in range(L):
            kept = layers[i]
            layers[i] = _Skip()
            try:
                with ctx():
                    skip.append(_answer_loss(model, batches))
            finally:
                layers[i] = kept
            done += len(batches)
            if progress:
                progress(done, steps)
    return Importance(n_samples=n_samples, n_tokens=count[0], loss=total_loss / max(1, n_samples), skip_loss=skip,
                      block_influence=(1 - cos_sum / cos_n.clamp(min=1)).tolist(), ffn=(ffn_sum / n).tolist(), groups=groups.tolist())


# ---------------------------------------------------------------------------------------------------------
# the plan

def ffn_unit(shape: LlamaShape) -> int:
    """FFN widths are multiples of this: 256 where the teacher's FFN is (llama.cpp's k-quants pack rows in
    blocks of 256: a pruned `down_proj` then still quantizes to Q4_K instead of falling back), else 16."""
    return 256 if shape.ffn % 256 == 0 and shape.ffn >= 1024 else 16


def _fit_blocks(shape: LlamaShape, budget: int) -> int:
    return min(shape.n_layers, (budget - shape.hidden) // shape.block_params())


def _fit_ffn(shape: LlamaShape, n_blocks: int, budget: int, unit: int) -> int:
    per_block = (budget - shape.hidden) // n_blocks
    rest = shape.replace(ffn=0).block_params()
    per_channel = shape.replace(ffn=1).block_params() - rest
    return min(shape.ffn, (max(0, per_block - rest) // per_channel) // unit * unit)


def auto_shape(teacher: LlamaShape, n_blocks: int | None, ffn: int | None, kv_groups: int,
               max_params: float) -> tuple[int, int]:
    """(blocks, FFN width) for a budget of `max_params` x the teacher's non-embedding parameters, given what
    the caller fixed (None = choose). Neither fixed: start from DEFAULT_DEPTH of the blocks, take the widest
    FFN (in `ffn_unit` steps) that fits, then as many blocks as fit at that width. Raises InputError when
    nothing fits."""
    budget = int(max_params * teacher.non_embedding_params())
    unit = ffn_unit(teacher)
    base = teacher.replace(n_head_kv=kv_groups, n_head=kv_groups * teacher.group_size)
    if n_blocks is not None and ffn is not None:
        return n_blocks, ffn
    if ffn is not None:
        n = _fit_blocks(base.replace(ffn=ffn), budget)
        if n < 1:
            raise InputError(f"no block fits {max_params:.0%} of the teacher at FFN width {ffn}")
        return n, ffn
    n0 = n_blocks if n_blocks is not None else max(1, round(DEFAULT_DEPTH * teacher.n_layers))
    width = _fit_ffn(base, n0, budget, unit)
    if width < unit:
        raise InputError(f"{n0} blocks do not fit {max_params:.0%} of the teacher's parameters at any FFN width")
    if n_blocks is not None:
        return n0, width
    return max(n0, _fit_blocks(base.replace(ffn=width), budget)), width


def _top(scores: Iterable[float], k: int) -> list[int]:
    s = list(scores)
    return sorted(sorted(range(len(s)), key=lambda i: (-s[i], i))[:k])


def choose_plan(imp: Importance, teacher: LlamaShape, keep_blocks: int | list[int] | None = None,
                ffn_ratio: float | None = None, kv_groups: int | None = None,
                max_params: float = DEFAULT_MAX_PARAMS, depth_metric: str = "loss") -> PrunePlan:
    """The plan keeping the most important blocks (by `depth_metric`) and, in each, the most important FFN
    channels and GQA groups. keep_blocks: a count or the exact teacher blocks; ffn_ratio: FFN width as a
    fraction of the teacher's (rounded to `ffn_unit`); kv_groups: key/value heads kept per block. Unset sizes
    are chosen by `auto_shape`; a plan over `max_params` x the teacher's non-embedding parameters is refused."""
    g = teacher.n_head_kv if kv_groups is None else int(kv_groups)
    if not 1 <= g <= teacher.n_head_kv:
        raise InputError(f"--kv-groups {g}: the teacher has {teacher.n_head_kv} key/value heads")
    listed = list(keep_blocks) if isinstance(keep_blocks, (list, tuple)) else None
    n = len(listed) if listed is not None else keep_blocks
    if n is not None and not 1 <= n <= teacher.n_layers:
        raise InputError(f"--keep-blocks {n}: the teacher has {teacher.n_layers} blocks")
    ffn = None
    if ffn_ratio is not None:
        if not 0 < ffn_ratio <= 1:
            raise InputError(f"--ffn-ratio {ffn_ratio}: a fraction in (0, 1]")
        unit = ffn_unit(teacher)
        ffn = min(teacher.ffn, max(unit, int(round(ffn_ratio * teacher.ffn / unit)) * unit))
    n, ffn = auto_shape(teacher, n, ffn, g, max_params)
    if listed is not None:
        if sorted(set(listed)) != listed or not all(0 <= b < teacher.n_layers for b in listed):
            raise InputError(f"--keep-blocks {listed}: distinct increasing block indices within 0..{teacher.n_layers - 1}")
        blocks = listed
    else:
        blocks = _top(imp.depth_scores(depth_metric), n)
    plan = PrunePlan(blocks=blocks, ffn_channels=[_top(imp.ffn[b], ffn) for b in blocks],
                     kv_groups=[_top(imp.groups[b], g) for b in blocks])
    ratio = plan.student_shape(teacher).non_embedding_params() / teacher.non_embedding_params()
    if ratio > max_params + 1e-12:
        raise InputError(f"the plan keeps {ratio:.1%} of the teacher's non-embedding LLM parameters, over the "
                         f"{max_params:.0%} budget (fewer blocks, a smaller --ffn-ratio, or --max-params)")
    return plan


def parse_keep_blocks(text: str | None) -> int | list[int] | None:
    """`--keep-blocks`: "N" (a count) or "0,3,5,..." (the exact teacher blocks)."""
    if text is None or text == "":
        return None
    try:
        if "," in text:
            return [int(x) for x in text.split(",") if x.strip()]
        return int(text)
    except ValueError:
        raise InputError(f"--keep-blocks {text!r}: a count N or a comma-separated list of block indices") from None


def plan_summary(plan: PrunePlan, teacher: LlamaShape) -> dict:
    s = plan.student_shape(teacher)
    return {"blocks": plan.blocks, "n_layers": s.n_layers, "ffn": s.ffn, "n_head": s.n_head, "n_head_kv": s.n_head_kv,
            "non_embedding_params": s.non_embedding_params(),
            "teacher_non_embedding_params": teacher.non_embedding_params(),
            "ratio": round(s.non_embedding_params() / teacher.non_embedding_params(), 4)}

