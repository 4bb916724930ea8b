"""A small low-level llama.cpp driver (llama-cpp-python's C API) for checking exported GGUF files.

It feeds a sequence made of SEGMENTS: a list of token ids, or a float32 `[n, n_embd]` array of embeddings
(image or region embeddings) that take the place of tokens. One `llama_batch` holds tokens OR embeddings,
never both, so each segment is its own batch (split further at `n_batch`), with positions continuing
across segments in the one sequence 0:

    batch = llama_batch_init(n, 0, 1)          # tokens:     batch.token[i] = id
    batch = llama_batch_init(n, n_embd, 1)     # embeddings: memmove(batch.embd, rows, n * n_embd * 4)
    batch.pos[i] = n_past + i; batch.n_seq_id[i] = 1; batch.seq_id[i][0] = 0; batch.logits[i] = 0/1
    batch.n_tokens = n; llama_decode(ctx, batch); llama_batch_free(batch)

Parity settings: F32 KV cache (`type_k = type_v = GGML_TYPE_F32`), flash attention disabled, logits
requested per position through `batch.logits`. The runtime has its own engine; this is the reference recipe.

Threads: llama.cpp's CPU backend uses OpenMP; next to torch (which bundles its own libgomp) both runtimes'
spinning threads fight over 2 cores. `chatspot_edge/__init__.py` sets `OMP_WAIT_POLICY=PASSIVE` first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np

Segment = Union[Sequence[int], np.ndarray]


class LlamaCheck:
    """One model + one context (sequence 0), driven by segments; built on the runtime's `LlamaModel`.
    `vocab_only=True` loads only the tokenizer."""

    def __init__(self, path: str | Path, n_ctx: int = 512, n_batch: int = 512, n_threads: int = 2,
                 f32_kv: bool = True, vocab_only: bool = False):
        from chatspot_edge.runtime.llama import LlamaModel

        try:
            self.llm = LlamaModel(path, n_ctx=n_ctx, threads=n_threads, n_seq_max=1, f32_kv=f32_kv, flash_attn=False,
                                  n_batch=n_batch, vocab_only=vocab_only)
        except Exception as e:  # noqa: BLE001 - a checker reports what failed to load
            raise RuntimeError(f"llama.cpp could not load {path} ({e})") from None
        self.n_vocab, self.n_embd = int(self.llm.n_vocab), int(self.llm.n_embd)
        self.n_past = 0

    def tokenize(self, text: str, special: bool = True, add_bos: bool = False) -> list[int]:
        return self.llm.tokenize(text, parse_special=special, add_bos=add_bos)

    def detokenize(self, ids: Sequence[int], special: bool = True) -> str:
        return self.llm.detokenize(list(ids), special=special)

    def reset(self) -> None:
        self.llm.reset()
        self.n_past = 0

    def feed(self, segments: Iterable[Segment], logits: str = "last") -> np.ndarray:
        """Append segments to the sequence. logits: "all" -> `[T, n_vocab]` for every fed position,
        "last" -> `[n_vocab]` of the last position."""
        segs = [s for s in segments if len(s) > 0]
        rows: list[np.ndarray] = []
        for k, seg in enumerate(segs):
            last = k == len(segs) - 1
            collect = rows if logits == "all" else None
            if isinstance(seg, np.ndarray) and seg.ndim == 2:
                self.n_past = self.llm.decode_embeddings(seg, 0, self.n_past, logits_last=last, all_logits=collect)
            else:
                self.n_past = self.llm.decode_tokens([int(t) for t in seg], 0, self.n_past, logits_last=last,
                                                     all_logits=collect)
        if logits == "all":
            return np.concatenate(rows, 0)
        return self.llm.logits().copy()

    def greedy(self, segments: Iterable[Segment], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """Reset, prefill `segments`, then greedy-decode up to `max_new_tokens` ids (a stop id ends it, excluded)."""
        self.reset()
        last = self.feed(segments, logits="last")
        out: list[int] = []
        for step in range(max_new_tokens):
            t = int(np.argmax(last))
            if t in stop_ids:
                break
            out.append(t)
            if step < max_new_tokens - 1:
                last = self.feed([[t]], logits="last")
        return out

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> "LlamaCheck":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def split_segments(ids: Sequence[int], replace: dict[int, np.ndarray]) -> list[Segment]:
    """Cut a prompt's ids into token runs and embedding rows: each id in `replace` (e.g. the N `<image>` ids,
    or `<region>`) takes the next row of its array, in order. Returns segments for `LlamaCheck.feed`."""
    cursor = {k: 0 for k in replace}
    segs: list[Segment] = []
    run: list[int] = []
    emb: list[np.ndarray] = []
    for t in ids:
        if t in replace:
            if run:
                segs.append(run)
                run = []
            emb.append(replace[t][cursor[t]])
            cursor[t] += 1
        else:
            if emb:
                segs.append(np.stack(emb).astype(np.float32))
                emb = []
            run.append(int(t))
    if run:
        segs.append(run)
    if emb:
        segs.append(np.stack(emb).astype(np.float32))
    for k, arr in replace.items():
        if cursor[k] != len(arr):
            raise ValueError(f"{cursor[k]} placeholders of id {k} for {len(arr)} embedding rows")
    return segs
