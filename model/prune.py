"""Structured pruning of a ChatSpot model's LLM into a smaller, plain `LlamaForCausalLM` (depth and width).

A `PrunePlan` names what the student keeps of the teacher's LLM:
- `blocks`: the teacher blocks kept, in order (student block i IS teacher block `blocks[i]`: the block map);
- `ffn_channels[i]`: the teacher FFN channels (rows of gate/up, columns of down) student block i keeps;
- `kv_groups[i]`: the GQA groups student block i keeps: key/value head g together with the query heads that
  read it (HF `repeat_kv`: query head h reads key/value head h // (n_head / n_head_kv)), so grouped attention
  stays grouped.
Every kept block keeps the same NUMBER of channels and groups (a plain `LlamaConfig` has one intermediate
size and one head count) but chooses its own. Hidden size, token embeddings, final norm and (tied) head are
the teacher's, so everything outside the LLM (vision encoder, projector, region encoder, tokenizer) is copied
unchanged and the student reads the teacher's input space: this module never looks at the image side.

`non_embedding_params` counts what the issue's size budget counts: the LLM without its token embeddings
(and without an untied output head, the other vocabulary-sized matrix).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chatspot_edge.model.chatspot import ChatSpotModel


@dataclass(frozen=True)
class LlamaShape:
    """The shape of a Llama LLM that decides its parameter count."""

    n_layers: int
    hidden: int
    ffn: int
    n_head: int
    n_head_kv: int
    head_dim: int
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_head // self.n_head_kv

    @classmethod
    def of(cls, cfg: LlamaConfig | dict) -> "LlamaShape":
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        n_head = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return cls(n_layers=int(get("num_hidden_layers")), hidden=hidden, ffn=int(get("intermediate_size")),
                   n_head=n_head, n_head_kv=int(get("num_key_value_heads") or n_head),
                   head_dim=int(get("head_dim") or hidden // n_head),
                   attention_bias=bool(get("attention_bias", False)), mlp_bias=bool(get("mlp_bias", False)))

    def block_params(self) -> int:
        """Parameters of one decoder block (attention, FFN, two RMSNorms)."""
        d, hd = self.hidden, self.head_dim
        q, kv = self.n_head * hd, self.n_head_kv * hd
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv + d if self.attention_bias else 0)
        mlp = 3 * d * self.ffn + (2 * self.ffn + d if self.mlp_bias else 0)
        return attn + mlp + 2 * d

    def non_embedding_params(self) -> int:
        """Blocks + final norm: the LLM without token embeddings and output head."""
        return self.n_layers * self.block_params() + self.hidden

    def replace(self, **kw) -> "LlamaShape":
        return LlamaShape(**{**asdict(self), **kw})


def non_embedding_params(llm: LlamaForCausalLM) -> int:
    """Counted on the module itself: every LLM parameter except the token embeddings and the output head."""
    skip = {id(llm.get_input_embeddings().weight), id(llm.get_output_embeddings().weight)}
    return sum(p.numel() for p in llm.parameters() if id(p) not in skip)


@dataclass
class PrunePlan:
    blocks: list[int]  # teacher block of each student block, increasing
    ffn_channels: list[list[int]]  # per student block: kept teacher FFN channels, increasing
    kv_groups: list[list[int]]  # per student block: kept teacher key/value heads (GQA groups), increasing

    def validate(self, teacher: LlamaShape) -> None:
        """Raise ValueError unless the plan fits `teacher` and gives a uniform (plain Llama) student."""
        n = len(self.blocks)
        if n == 0 or len(self.ffn_channels) != n or len(self.kv_groups) != n:
            raise ValueError("a plan needs at least one block and one channel / group list per kept block")
        if sorted(set(self.blocks)) != list(self.blocks) or not all(0 <= b < teacher.n_layers for b in self.blocks):
            raise ValueError(f"blocks {self.blocks}: distinct, increasing, within 0..{teacher.n_layers - 1}")
        for name, lists, limit in (("ffn_channels", self.ffn_channels, teacher.ffn),
                                   ("kv_groups", self.kv_groups, teacher.n_head_kv)):
            if len({len(x) for x in lists}) != 1 or len(lists[0]) == 0:
                raise ValueError(f"{name}: every kept block keeps the same (non-zero) number")
            for x in lists:
                if sorted(set(x)) != list(x) or not all(0 <= i < limit for i in x):
                    raise ValueError(f"{name}: indices distinct, increasing, within 0..{limit - 1}")

    def student_shape(self, teacher: LlamaShape) -> LlamaShape:
        g = len(self.kv_groups[0])
        return teacher.replace(n_layers=len(self.blocks), ffn=len(self.ffn_channels[0]), n_head_kv=g,
                               n_head=g * teacher.group_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PrunePlan":
        return cls(blocks=[int(b) for b in d["blocks"]], ffn_channels=[[int(c) for c in x] for x in d["ffn_channels"]],
                   kv_groups=[[int(g) for g in x] for x in d["kv_groups"]])

    @classmethod
    def identity(cls, teacher: LlamaShape) -> "PrunePlan":
        """Keep everything (the student equals the teacher)."""
        n = teacher.n_layers
        return cls(list(range(n)), [list(range(teacher.ffn))] * n, [list(range(teacher.n_head_kv))] * n)


def _heads(groups: list[int], group_size: int) -> list[int]:
    """Query heads of the kept key/value heads."""
    return [g * group_size + j for g in groups for j in range(group_size)]


def _rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)], dtype=torch.long)


def prune_llm(llm: LlamaForCausalLM, plan: PrunePlan) -> LlamaForCausalLM:
    """A new `LlamaForCausalLM` holding the kept blocks, channels and GQA groups of `llm` (weights copied, the
    teacher left untouched); embeddings, final norm and head are copied whole."""
    shape = LlamaShape.of(llm.config)
    plan.validate(shape)
    small = plan.student_shape(shape)
    cfg = copy.deepcopy(llm.config)
    cfg.num_hidden_layers, cfg.intermediate_size = small.n_layers, small.ffn
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = small.n_head, small.n_head_kv, small.head_dim
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[b] for b in plan.blocks]
    teacher = llm.state_dict()
    state: dict[str, torch.Tensor] = {}
    for k, v in teacher.items():
        if not k.startswith("model.layers."):
            state[k] = v
    hd = shape.head_dim
    for i, b in enumerate(plan.blocks):
        src, dst = f"model.layers.{b}.", f"model.layers.{i}."
        q_rows = _rows(_heads(plan.kv_groups[i], shape.group_size), hd)
        kv_rows = _rows(plan.kv_groups[i], hd)
        ch = torch.tensor(plan.ffn_channels[i], dtype=torch.long)
        rows = {"self_attn.q_proj": q_rows, "self_attn.k_proj": kv_rows, "self_attn.v_proj": kv_rows,
                "mlp.gate_proj": ch, "mlp.up_proj": ch}
        cols = {"self_attn.o_proj": q_rows, "mlp.down_proj": ch}
        for k, v in teacher.items():
            if not k.startswith(src):
                continue
            name = k[len(src):]
            mod, _, kind = name.rpartition(".")
            if mod in rows:  # output rows (weight [out, in], bias [out])
                v = v.index_select(0, rows[mod])
            elif mod in cols and kind == "weight":  # input columns; the bias lives on the output side
                v = v.index_select(1, cols[mod])
            state[dst + name] = v.clone()
    with torch.device("meta"):
        student = LlamaForCausalLM(cfg)
    student.load_state_dict(state, strict=False, assign=True)
    if getattr(cfg, "tie_word_embeddings", False):
        student.tie_weights()
    leftover = [n for n, p in student.named_parameters() if p.is_meta] + [n for n, b in student.named_buffers() if b.is_meta]
    if leftover:  # non-persistent buffers (rotary inv_freq) are rebuilt, anything else is a bug
        inv = [n for n in leftover if not n.endswith("inv_freq") and not n.endswith("original_inv_freq")]
        if inv:
            raise RuntimeError(f"pruned LLM: no weights for {inv[:4]}")
        student.model.rotary_emb = type(llm.model.rotary_emb)(config=cfg)
    return student.to(next(llm.parameters()).dtype).eval()


def text_config_of(llm: LlamaForCausalLM, base: dict[str, Any]) -> dict[str, Any]:
    """`base` (a checkpoint's `text` dict) with the shape keys of `llm`'s config."""
    c = llm.config
    return dict(base, num_hidden_layers=int(c.num_hidden_layers), intermediate_size=int(c.intermediate_size),
                num_attention_heads=int(c.num_attention_heads), num_key_value_heads=int(c.num_key_value_heads),
                head_dim=int(c.head_dim), **({"layer_types": list(c.layer_types)} if base.get("layer_types") else {}))


def student_from_teacher(teacher: ChatSpotModel, plan: PrunePlan) -> ChatSpotModel:
    """The whole student: the pruned LLM plus copies of every non-LLM part of `teacher` (vision encoder,
    projector, region encoder and whatever else the model holds), with the teacher's config except the LLM
    shape. The tokenizer is the teacher's (same ids)."""
    llm = prune_llm(teacher.llm, plan)
    cfg = copy.deepcopy(teacher.config)
    cfg.text = text_config_of(llm, cfg.text)
    student = ChatSpotModel(cfg, llm=llm)
    rest = {k: v.clone() for k, v in teacher.state_dict().items() if not k.startswith("llm.")}
    missing, unexpected = student.load_state_dict(rest, strict=False)
    missing = [m for m in missing if not m.startswith("llm.")]
    if missing or unexpected:
        raise RuntimeError(f"student does not take the teacher's non-LLM weights: {missing[:3]} {unexpected[:3]}")
    return student.to(next(teacher.parameters()).dtype).eval()
