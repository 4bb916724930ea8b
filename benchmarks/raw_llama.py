"""Plain llama.cpp on a GGUF, measured the way a user of llama.cpp gets it: the benchmark's raw baseline.

    python benchmarks/raw_llama.py MODEL.gguf --threads 1,2 --prompt 114 --tokens 32 --ctx 2048 --repeats 3 --out OUT.json

Run as a script in its own process (`bench` starts it by file path): nothing of chatspot_edge is imported,
only llama-cpp-python's low-level C bindings, and the process has the environment its caller was started
with (OpenMP settings included; `bench` removes only what chatspot_edge itself set). For each thread count
a fresh context (llama.cpp's default parameters except the thread counts and the context size) prefills a
prompt of `--prompt` tokens in one batch (llama-bench's pp) and then greedy-decodes `--tokens` tokens one
per batch after it (tg at that depth). Thread counts are interleaved round by round after one warm-up round,
so a busy moment of the machine does not land on one count only. The best count for each of prefill and
decode is reported: the baseline is llama.cpp at its own best settings on this machine.

AMX: ggml's AMX matmul segfaults on quantized weights (upstream bug); where the loaded ggml reports AMX and
the model is quantized, weight repacking (extra buffer types) is turned off, as the runtime does.
A build without OpenMP gets persistent ggml thread pools attached to each context, as llama.cpp's own programs
do (else ggml starts and joins threads at every decode): `runtime/ggml_pools.py`, loaded by file path (it
imports nothing of chatspot_edge).

Output JSON: {"threads": {"1": {"prefill_tok_s": [...], "decode_tok_s": [...]}, ...}, "best": {"decode_tok_s",
"decode_threads", "prefill_tok_s", "prefill_threads"}, "n_prompt", "n_tokens", "n_ctx", "env", "system_info",
"llama_cpp", "chatspot_edge_imported"}.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

WAIT_ENV = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "CHATSPOT_EXTRA_BUFTS")


def _quantized(path: str) -> bool:
    """Whether a GGUF's file type is a quantized one, from `general.file_type` (0 F32, 1 F16, 32 BF16)."""
    import llama_cpp as c

    mp = c.llama_model_default_params()
    mp.vocab_only = True
    model = c.llama_model_load_from_file(path.encode(), mp)
    if not model:
        raise SystemExit(f"error: llama.cpp could not load {path}")
    buf = ctypes.create_string_buffer(64)
    n = c.llama_model_meta_val_str(model, b"general.file_type", buf, len(buf))
    c.llama_model_free(model)
    return n >= 0 and buf.value.decode() not in ("0", "1", "32")


def _pools_class():
    """`ThreadPools` of runtime/ggml_pools.py, loaded from its file (no package import)."""
    spec = importlib.util.spec_from_file_location("ggml_pools", Path(__file__).resolve().parent.parent / "runtime" / "ggml_pools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ThreadPools


def measure(path: str, threads: list[int], n_prompt: int, n_tokens: int, n_ctx: int, repeats: int) -> dict:
    import llama_cpp as c

    c.llama_backend_init()
    quiet = c.llama_log_callback(lambda level, text, data: None)
    c.llama_log_set(quiet, ctypes.c_void_p(0))
    system_info = c.llama_print_system_info().decode(errors="replace")
    mp = c.llama_model_default_params()
    mp.n_gpu_layers = 0
    if re.search(r"AMX_INT8\s*=\s*1", system_info) and _quantized(path):
        mp.use_extra_bufts = False
    model = c.llama_model_load_from_file(path.encode(), mp)
    if not model:
        raise SystemExit(f"error: llama.cpp could not load {path}")
    vocab = c.llama_model_get_vocab(model)
    n_vocab = c.llama_vocab_n_tokens(vocab)
    prompt = [300 + (i * 7919) % min(5000, n_vocab - 300) for i in range(n_prompt)]
    openmp = re.search(r"OPENMP\s*=\s*1", system_info) is not None
    pools = []
    contexts = {}
    for t in threads:
        cp = c.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = min(512, n_ctx)
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = t
        ctx = c.llama_init_from_model(model, cp)
        if not ctx:
            raise SystemExit("error: llama.cpp could not create a context")
        contexts[t] = ctx
        if not openmp:
            pools.append(_pools_class()(c, ctx, t, t))
    n_batch = min(512, n_ctx)
    batch = c.llama_batch_init(n_batch, 0, 1)
    sampler = c.llama_sampler_chain_init(c.llama_sampler_chain_default_params())
    c.llama_sampler_chain_add(sampler, c.llama_sampler_init_greedy())

    def run(ctx, tokens: list[int], pos: int) -> int:
        for start in range(0, len(tokens), n_batch):
            chunk = tokens[start:start + n_batch]
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = pos + start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if start + i == len(tokens) - 1 else 0
            batch.n_tokens = len(chunk)
            rc = c.llama_decode(ctx, batch)
            if rc != 0:
                raise SystemExit(f"error: llama_decode returned {rc}")
        return pos + len(tokens)

    out = {str(t): {"prefill_tok_s": [], "decode_tok_s": []} for t in threads}
    try:
        for r in range(repeats + 1):  # round 0 is the warm-up
            for t, ctx in contexts.items():
                c.llama_memory_clear(c.llama_get_memory(ctx), True)
                t0 = time.perf_counter()
                pos = run(ctx, prompt, 0)
                tok = c.llama_sampler_sample(sampler, ctx, -1)
                t_pre = time.perf_counter() - t0
                t0 = time.perf_counter()
                for _ in range(n_tokens):
                    pos = run(ctx, [tok], pos)
                    tok = c.llama_sampler_sample(sampler, ctx, -1)
                t_dec = time.perf_counter() - t0
                if r:
                    out[str(t)]["prefill_tok_s"].append(n_prompt / t_pre)
                    out[str(t)]["decode_tok_s"].append(n_tokens / t_dec)
    finally:
        c.llama_batch_free(batch)
        c.llama_sampler_free(sampler)
        for pool in pools:
            pool.close()
        for ctx in contexts.values():
            c.llama_free(ctx)
        c.llama_model_free(model)
    med = {t: {k: statistics.median(v) for k, v in d.items()} for t, d in out.items()}
    dec = max(med, key=lambda t: med[t]["decode_tok_s"])
    pre = max(med, key=lambda t: med[t]["prefill_tok_s"])
    return {"threads": out, "median": med,
            "best": {"decode_tok_s": med[dec]["decode_tok_s"], "decode_threads": int(dec),
                     "prefill_tok_s": med[pre]["prefill_tok_s"], "prefill_threads": int(pre)},
            "n_prompt": n_prompt, "n_tokens": n_tokens, "n_ctx": n_ctx, "repeats": repeats,
            "extra_bufts": bool(mp.use_extra_bufts), "system_info": system_info, "openmp": openmp,
            "threadpools": bool(pools),
            "llama_cpp": getattr(c, "__version__", None), "env": {k: os.environ[k] for k in WAIT_ENV if k in os.environ},
            "chatspot_edge_imported": any(m == "chatspot_edge" or m.startswith("chatspot_edge.") for m in sys.modules)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("--threads", default=str(os.cpu_count() or 1), help="comma-separated thread counts")
    ap.add_argument("--prompt", type=int, default=114, help="prompt tokens (prefilled in one batch)")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens decoded after the prompt")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    ap.add_argument("--out", help="JSON file to write (default: stdout)")
    a = ap.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",") if t.strip()]
    if not threads or min(threads) < 1 or a.prompt < 1 or a.tokens < 1 or a.repeats < 1 or a.prompt + a.tokens > a.ctx:
        ap.error("thread counts, --prompt, --tokens and --repeats must be positive and prompt + tokens <= ctx")
    res = measure(a.gguf, threads, a.prompt, a.tokens, a.ctx, a.repeats)
    text = json.dumps(res, indent=1)
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, a.out)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
