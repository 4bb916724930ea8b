"""A thin layer over llama.cpp's C API (through llama-cpp-python's ctypes bindings).

What the high-level `llama_cpp.Llama` class lacks and the runtime needs: float embeddings fed at any
position (`llama_batch_init(n, n_embd, 1)` + `batch.embd`; a batch holds tokens OR embeddings), several
sequences in one context with per-sequence KV trimming (`llama_memory_seq_rm`), and saving / restoring one
sequence's state. Positions are explicit everywhere: the caller owns the layout of each sequence.

Before llama.cpp is loaded into the process, `runtime.build_guard.check_llama_build()` checks (in a child process)
that the library was compiled for instruction sets this CPU has; a mismatch is a one-line BuildError (exit 2).

AMX: ggml's AMX matmul segfaults on quantized weights (upstream bug). When the loaded ggml reports AMX and
the model is quantized, the extra (repacking) buffer types are turned off, which avoids those kernels.

Threads: `threads` runs batches of several tokens (prefill, llama.cpp's `n_threads_batch`), `decode_threads`
one-token batches (`n_threads`); `set_threads` changes both on a live context (`runtime.threads` measures which
counts are fastest). A llama.cpp build without OpenMP runs ggml's own thread pool, which llama.cpp starts and
joins at EVERY `llama_decode` unless the context has pools attached: such builds get persistent pools here
(`threadpools`), as llama.cpp's own programs do.
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
from pathlib import Path

import numpy as np

from chatspot_edge.errors import BundleError, InputError
from chatspot_edge.runtime.ggml_pools import ThreadPools

_BACKEND_READY = False
_LOG_CALLBACK = None  # kept referenced: llama.cpp calls it from C


def _log(level, text, user_data):  # noqa: ANN001 - ctypes callback; llama.cpp is quiet unless asked
    if os.environ.get("CHATSPOT_LLAMA_LOG"):
        print(text.decode(errors="replace"), end="")


def init_backend(llama_cpp) -> None:  # noqa: ANN001 - the llama_cpp module
    """`llama_backend_init()`, after loading the CPU backend variants of a portable build.

    A portable build (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS, `make setup PORTABLE=1`) ships one
    libggml-cpu-<variant> per instruction-set level beside libllama and registers none by itself: ggml scores
    each variant against this CPU and loads the best one. Other builds have their CPU backend compiled in."""
    from llama_cpp._ctypes_extensions import load_shared_library

    from chatspot_edge.runtime.build_guard import llama_lib_dir

    lib_dir = llama_lib_dir()
    if lib_dir is not None and any(lib_dir.glob("*ggml-cpu-*")):
        ggml = load_shared_library("ggml", lib_dir)  # the copy libllama linked (same file: not loaded twice)
        ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
        if ggml.ggml_backend_reg_count() == 0:
            ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
            ggml.ggml_backend_load_all_from_path(str(lib_dir).encode())
    llama_cpp.llama_backend_init()


def _lib():
    global _BACKEND_READY, _LOG_CALLBACK
    if not _BACKEND_READY:
        # before this process loads llama.cpp: a build for instructions this CPU lacks would die of SIGILL
        from chatspot_edge.runtime.build_guard import check_llama_build

        check_llama_build()
    import llama_cpp

    if not _BACKEND_READY:
        init_backend(llama_cpp)
        _LOG_CALLBACK = llama_cpp.llama_log_callback(_log)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        _BACKEND_READY = True
    return llama_cpp


def system_info() -> str:
    """ggml's CPU feature report, e.g. 'CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | ...'."""
    llama_cpp = _lib()
    return llama_cpp.llama_print_system_info().decode(errors="replace")


def has_amx() -> bool:
    return re.search(r"AMX_INT8\s*=\s*1", system_info()) is not None


def safe_extra_bufts(quantized: bool) -> bool:
    """Whether to keep llama.cpp's extra buffer types (weight repacking). Off for quantized models when the
    build has AMX kernels (they crash); CHATSPOT_EXTRA_BUFTS=0/1 overrides."""
    env = os.environ.get("CHATSPOT_EXTRA_BUFTS")
    if env in ("0", "1"):
        return env == "1"
    return not (quantized and has_amx())


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file, from its header alone; "" when absent, BundleError when the file
    is not a readable GGUF."""
    from chatspot_edge.runtime.gguf_header import read_gguf_header

    try:
        header = read_gguf_header(path, tensors=False, only=("general.architecture",))
        return str(header.kv.get("general.architecture", ""))
    except (OSError, ValueError, struct.error) as e:
        raise BundleError(f"{path}: unreadable GGUF header ({e})") from None


def uses_openmp() -> bool:
    """Whether the loaded ggml CPU backend runs its threads with OpenMP (`OPENMP = 1` in its feature report)."""
    return re.search(r"OPENMP\s*=\s*1", system_info()) is not None


class LlamaModel:
    """One GGUF model and one context with `n_seq_max` sequences sharing a unified KV cache of `n_ctx` cells."""

    def __init__(self, path: str | Path, n_ctx: int = 2048, threads: int | None = None, n_seq_max: int = 4,
                 quantized: bool = False, f32_kv: bool = False, flash_attn: bool | None = None,
                 use_mmap: bool = True, n_batch: int = 512, vocab_only: bool = False,
                 decode_threads: int | None = None, threadpools: bool | None = None):
        llama_cpp = _lib()
        self._c = llama_cpp
        self.path = Path(path)
        path = Path(path)
        mp = llama_cpp.llama_model_default_params()
        mp.use_mmap = use_mmap
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = safe_extra_bufts(quantized)
        mp.vocab_only = vocab_only
        self.extra_bufts = bool(mp.use_extra_bufts)
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise BundleError(f"{path}: llama.cpp could not load this GGUF")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        self._tok_buf = (llama_cpp.llama_token * 8192)()
        self._piece_buf = ctypes.create_string_buffer(256)
        self.ctx = None
        if vocab_only:  # tokenizer only
            return
        from chatspot_edge.runtime.threads import usable_cpus

        threads = int(threads or usable_cpus())
        decode_threads = int(decode_threads or threads)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = min(n_batch, n_ctx)
        cp.n_ubatch = min(n_batch, n_ctx)
        cp.n_seq_max = n_seq_max
        cp.n_threads = decode_threads
        cp.n_threads_batch = threads
        cp.kv_unified = True
        cp.no_perf = False
        if f32_kv:
            cp.type_k = llama_cpp.GGML_TYPE_F32
            cp.type_v = llama_cpp.GGML_TYPE_F32
        if flash_attn is not None:
            cp.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise BundleError(f"{path}: llama.cpp could not create a context (n_ctx={n_ctx})")
        self.threads = threads  # prefill (multi-token batches)
        self.decode_threads = decode_threads
        self._pools = None
        if threadpools if threadpools is not None else not uses_openmp():
            self._pools = ThreadPools(llama_cpp, self.ctx, decode_threads, threads)
        # llama.cpp rounds the cache up (to 256 cells); positions stay within what was asked (the model's limit)
        self.n_cells = int(llama_cpp.llama_n_ctx(self.ctx))
        self.n_ctx = min(int(n_ctx), self.n_cells)
        self.n_batch = cp.n_batch
        self.n_seq_max = n_seq_max
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self._tok_batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._emb_batch = llama_cpp.llama_batch_init(self.n_batch, self.n_embd, 1)
        self._greedy = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(self._greedy, llama_cpp.llama_sampler_init_greedy())

    # -- threads -----------------------------------------------------------------------------------------
    def set_threads(self, prefill: int, decode: int) -> None:
        """Thread counts for multi-token batches (prefill) and one-token batches (decode) from now on."""
        self._c.llama_set_n_threads(self.ctx, int(decode), int(prefill))
        if self._pools is not None:
            self._pools.set(int(decode), int(prefill))
        self.threads, self.decode_threads = int(prefill), int(decode)

    def thread_counts(self) -> tuple[int, int]:
        """(prefill, decode) as llama.cpp's context holds them."""
        return int(self._c.llama_n_threads_batch(self.ctx)), int(self._c.llama_n_threads(self.ctx))

    # -- text --------------------------------------------------------------------------------------------
    def tokenize(self, text: str, parse_special: bool = True, add_bos: bool = False) -> list[int]:
        data = text.encode("utf-8")
        n = self._c.llama_tokenize(self.vocab, data, len(data), self._tok_buf, len(self._tok_buf), add_bos, parse_special)
        if n < 0:
            buf = (self._c.llama_token * (-n))()
            n = self._c.llama_tokenize(self.vocab, data, len(data), buf, -n, add_bos, parse_special)
            return list(buf[:n])
        return list(self._tok_buf[:n])

    def piece(self, token: int, special: bool = True) -> bytes:
        n = self._c.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._c.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            return buf.raw[:n]
        return self._piece_buf.raw[:n]

    def detokenize(self, ids: list[int], special: bool = True) -> str:
        arr = (self._c.llama_token * max(1, len(ids)))(*ids)
        cap = 16 * len(ids) + 16
        out = ctypes.create_string_buffer(cap)
        n = self._c.llama_detokenize(self.vocab, arr, len(ids), out, cap, False, special)
        if n < 0:
            out = ctypes.create_string_buffer(-n)
            n = self._c.llama_detokenize(self.vocab, arr, len(ids), out, -n, False, special)
        return out.raw[:n].decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._c.llama_vocab_is_eog(self.vocab, token))

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = self._c.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode(errors="replace") if n >= 0 else None

    # -- decoding ----------------------------------------------------------------------------------------
    def _decode(self, batch, what: str) -> None:
        rc = self._c.llama_decode(self.ctx, batch)
        if rc != 0:
            if rc == 1:
                raise InputError(f"llama.cpp: no KV cache space for this {what} (context of {self.n_ctx} is full)")
            raise RuntimeError(f"llama_decode failed ({rc}) on {what}")

    def decode_tokens(self, tokens: list[int], seq: int, pos: int, logits_last: bool = True,
                      all_logits: list | None = None) -> int:
        """Append `tokens` to sequence `seq` at positions pos, pos+1, ...; returns the next position.
        With `all_logits` (a list), the logits `[n, n_vocab]` of every position are appended to it."""
        return self._decode_rows(tokens, None, seq, pos, logits_last, all_logits)

    def decode_embeddings(self, embeds: np.ndarray, seq: int, pos: int, logits_last: bool = False,
                          all_logits: list | None = None) -> int:
        """Append float embeddings `[n, n_embd]` (e.g. image embeddings) to `seq` at pos, pos+1, ..."""
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        if embeds.ndim != 2 or embeds.shape[1] != self.n_embd:
            raise BundleError(f"embeddings of shape {embeds.shape} do not fit the LLM (n_embd={self.n_embd})")
        return self._decode_rows(None, embeds, seq, pos, logits_last, all_logits)

    def _decode_rows(self, tokens, embeds, seq: int, pos: int, logits_last: bool, all_logits: list | None) -> int:
        """One batch per `n_batch` chunk: a llama_batch holds tokens or embeddings, never both."""
        total = len(tokens) if tokens is not None else embeds.shape[0]
        b = self._tok_batch if tokens is not None else self._emb_batch
        for start in range(0, total, self.n_batch):
            n = min(self.n_batch, total - start)
            last = start + n == total
            if tokens is not None:
                for i in range(n):
                    b.token[i] = tokens[start + i]
            else:
                chunk = embeds[start:start + n]
                ctypes.memmove(b.embd, chunk.ctypes.data, chunk.nbytes)
            for i in range(n):
                b.pos[i] = pos + start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = 1 if (all_logits is not None or (logits_last and last and i == n - 1)) else 0
            b.n_tokens = n
            self._decode(b, "text" if tokens is not None else "embedding batch")
            if all_logits is not None:
                all_logits.append(np.stack([np.ctypeslib.as_array(self._c.llama_get_logits_ith(self.ctx, i),
                                                                  shape=(self.n_vocab,)) for i in range(n)]))
        return pos + total

    def logits(self) -> np.ndarray:
        """Logits `[n_vocab]` of the last position that asked for them (a view: copy to keep)."""
        ptr = self._c.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def greedy(self) -> int:
        return int(self._c.llama_sampler_sample(self._greedy, self.ctx, -1))

    def sample(self, temperature: float, rng: np.random.Generator) -> int:
        """Temperature sampling from the last logits (greedy when temperature <= 0)."""
        if temperature <= 0:
            return self.greedy()
        z = self.logits().astype(np.float64) / temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        return int(rng.choice(self.n_vocab, p=p))

    # -- sequences ---------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Clear every sequence."""
        self._c.llama_memory_clear(self.mem, True)

    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> None:
        self._c.llama_memory_seq_rm(self.mem, seq, p0, p1)

    def seq_positions(self, seq: int) -> tuple[int, int]:
        """(smallest, largest) position sequence `seq` holds in the KV cache; (-1, -1) when it holds none."""
        return (int(self._c.llama_memory_seq_pos_min(self.mem, seq)), int(self._c.llama_memory_seq_pos_max(self.mem, seq)))

    def seq_save(self, seq: int) -> bytes:
        n = self._c.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * n)()
        written = self._c.llama_state_seq_get_data(self.ctx, buf, n, seq)
        return bytes(buf[:written])

    def seq_load(self, seq: int, state: bytes) -> None:
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if self._c.llama_state_seq_set_data(self.ctx, buf, len(state), seq) == 0:
            raise RuntimeError("llama.cpp could not restore a saved sequence state")

    def close(self) -> None:
        c = self._c
        if getattr(self, "ctx", None):
            c.llama_batch_free(self._tok_batch)
            c.llama_batch_free(self._emb_batch)
            c.llama_sampler_free(self._greedy)
            if getattr(self, "_pools", None) is not None:
                self._pools.close()
                self._pools = None
            c.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            c.llama_model_free(self.model)
            self.model = None

    def __del__(self):  # noqa: D105
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
