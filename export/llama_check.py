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
spinning threads fight over 2 cores. `OMP_WAIT_POLICY=PASSIVE` (set before torch and llama_cpp load)
removes that; this module sets it for llama.cpp's libgomp if nobody did.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np

Segment = Union[Sequence[int], np.ndarray]

_BACKEND = False


def _init_backend() -> None:
    global _BACKEND
    if not _BACKEND:
        # llama.cpp's OpenMP runtime (system libgomp) must not busy-wait between graph computations: on a
        # 2-core machine its spinning threads starve torch's / onnxruntime's threads and vice versa (a 3 ms
        # greedy step took 3 s next to torch). Read once, when libgomp loads with llama_cpp.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import llama_cpp
        from llama_cpp import _logger

        _logger.set_verbose(False)  # llama.cpp's load logs to stderr otherwise
        llama_cpp.llama_backend_init()
        _BACKEND = True


class LlamaCheck:
    """One model + one context (sequence 0). `vocab_only=True` loads only the tokenizer."""

    def __init__(self, path: str | Path, n_ctx: int = 512, n_batch: int = 512, n_threads: int = 2,
                 f32_kv: bool = True, vocab_only: bool = False):
        _init_backend()  # before the first `import llama_cpp` (sets OMP_WAIT_POLICY)
        import llama_cpp as lc

        self.lc = lc
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.vocab_only = vocab_only
        self.model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(lc.llama_model_n_embd(self.model))
        self.ctx = None
        self.n_past = 0
        if vocab_only:
            return
        cp = lc.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = self.n_batch = min(n_batch, n_ctx)
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if f32_kv:
            cp.type_k = cp.type_v = lc.GGML_TYPE_F32
        cp.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context for {path}")

    # -- tokenizer ----------------------------------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = True, add_bos: bool = False) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (self.lc.llama_token * n_max)()
        n = self.lc.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:
            n_max = -n
            buf = (self.lc.llama_token * n_max)()
            n = self.lc.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:
            raise RuntimeError("llama_tokenize failed")
        return list(buf[:n])

    def detokenize(self, ids: Sequence[int], special: bool = True) -> str:
        arr = (self.lc.llama_token * max(1, len(ids)))(*ids)
        cap = 16 * len(ids) + 16
        out = ctypes.create_string_buffer(cap)
        n = self.lc.llama_detokenize(self.vocab, arr, len(ids), out, cap, False, special)
        if n < 0:
            cap = -n
            out = ctypes.create_string_buffer(cap)
            n = self.lc.llama_detokenize(self.vocab, arr, len(ids), out, cap, False, special)
        return out.raw[:n].decode("utf-8", errors="replace")

    # -- evaluation ---------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def _decode(self, tokens: Sequence[int] | None, embd: np.ndarray | None, want_logits: bool) -> np.ndarray | None:
        lc = self.lc
        n = len(tokens) if tokens is not None else int(embd.shape[0])
        batch = lc.llama_batch_init(n, 0 if embd is None else self.n_embd, 1)
        try:
            if embd is None:
                for i, t in enumerate(tokens):
                    batch.token[i] = int(t)
            else:
                rows = np.ascontiguousarray(embd, dtype=np.float32)
                if rows.shape != (n, self.n_embd):
                    raise ValueError(f"embeddings {rows.shape}, expected [n, {self.n_embd}]")
                ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
            for i in range(n):
                batch.pos[i] = self.n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if want_logits else 0
            batch.n_tokens = n
            rc = lc.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            self.n_past += n
            if not want_logits:
                return None
            out = np.empty((n, self.n_vocab), dtype=np.float32)
            for i in range(n):
                ptr = lc.llama_get_logits_ith(self.ctx, i)
                out[i] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
            return out
        finally:
            lc.llama_batch_free(batch)

    def feed(self, segments: Iterable[Segment], logits: str = "last") -> np.ndarray:
        """Append segments to the sequence. logits: "all" -> `[T, n_vocab]` for every fed position,
        "last" -> `[n_vocab]` of the last position."""
        segs = [s for s in segments if len(s) > 0]
        chunks: list[tuple[Sequence[int] | None, np.ndarray | None]] = []
        for s in segs:
            is_embd = isinstance(s, np.ndarray) and s.ndim == 2
            for a in range(0, len(s), self.n_batch):
                part = s[a:a + self.n_batch]
                chunks.append((None, part) if is_embd else (list(part), None))
        rows = []
        for k, (tok, emb) in enumerate(chunks):
            want = logits == "all" or k == len(chunks) - 1
            r = self._decode(tok, emb, want)
            if r is not None:
                rows.append(r if logits == "all" else r[-1:])
        out = np.concatenate(rows, 0)
        return out if logits == "all" else out[-1]

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
        if self.ctx:
            self.lc.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.lc.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "LlamaCheck":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


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
