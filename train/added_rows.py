"""Train only the ADDED rows of the tied token embedding (`<image>`, `<box>`, `</box>`, `<region>`, `<loc_k>`...).

The base vocabulary's 49,152 rows (28.3 M parameters, tied to the output head) are most of the optimizer's
work in a full fine-tune of the small presets: a dense 49,152 x 576 gradient from the embedding lookup and
another from the head, gradient clipping over them and AdamW's read-modify-write of weights and two moments,
every step, for rows that a referring task barely moves. `AddedRows` swaps the LLM's input embedding and
output head for two views of one split table: the base rows frozen (no gradient is ever formed for them),
the added rows a small trainable parameter. `merge()` writes the trained rows back and restores the
original modules, so checkpoints, export and evaluation see an ordinary tied embedding.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Table(nn.Module):
    def __init__(self, weight: torch.Tensor, first: int):
        super().__init__()
        self.first = first
        self.register_buffer("base", weight.detach()[:first], persistent=False)  # a view: no copy
        self.added = nn.Parameter(weight.detach()[first:].clone())


class _Embedding(nn.Module):
    def __init__(self, table: _Table):
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.table
        base = F.embedding(ids.clamp(max=t.first - 1), t.base)
        added = F.embedding((ids - t.first).clamp(min=0), t.added)
        return torch.where((ids >= t.first)[..., None], added.to(base.dtype), base)


class _Head(nn.Module):
    def __init__(self, table: _Table):
        super().__init__()
        self.table = [table]  # not a submodule: the embedding owns the parameter

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        t = self.table[0]
        return torch.cat([F.linear(hidden, t.base.to(hidden.dtype)), F.linear(hidden, t.added.to(hidden.dtype))], -1)


class AddedRows:
    """Context for a training run: `AddedRows(llm, first)` trains rows `first..V-1` only; `.parameter` is
    the trainable `[V - first, d]` block; `merge()` ends it (idempotent)."""

    def __init__(self, llm, first: int):
        emb = llm.get_input_embeddings()
        if not llm.config.tie_word_embeddings:
            raise ValueError("AddedRows expects tied input / output embeddings")
        self.llm, self.first = llm, first
        self.weight = emb.weight
        self.original = (emb, llm.get_output_embeddings())
        self.table = _Table(self.weight, first)
        self.weight.requires_grad = False
        llm.set_input_embeddings(_Embedding(self.table))
        llm.set_output_embeddings(_Head(self.table))
        self.active = True

    @property
    def parameter(self) -> nn.Parameter:
        return self.table.added

    @torch.no_grad()
    def merge(self) -> None:
        """Write the trained rows back into the tied weight and restore the original modules."""
        if not self.active:
            return
        self.weight[self.first:] = self.table.added.to(self.weight.dtype)
        emb, head = self.original
        self.llm.set_input_embeddings(emb)
        self.llm.set_output_embeddings(head)
        self.llm.tie_weights()
        self.active = False
