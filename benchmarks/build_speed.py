"""Speed of llama.cpp builds of the same source: llama-bench and the runtime's own decode, per build and GGUF.

    python -m chatspot_edge.benchmarks.build_speed --out speed.json \\
        --build omp=~/.cache/chatspot-edge/native/llama-tools-XXXX/bin --build noomp=/path/to/other/bin \\
        --gguf F16=llm-f16.gguf --gguf Q4_0=llm-q4_0.gguf --threads 1,2 [--llama-bench-args "--repack 0"]

A build is a folder with llama-bench and its llama.cpp libraries (what `make native` writes to native/bin; the
top-level CMakeLists.txt builds any -D variant of it). For each build x GGUF x thread count:
- llama-bench pp `--n-prompt` / tg `--n-gen` (its own mean of `--repetitions` after a warm-up), run as a llama.cpp
  user runs it: a clean process, no OMP_* variables from us;
- the runtime's pp / tg: `runtime.llama.LlamaModel` (the runtime's context settings) loaded from that build's
  libllama (LLAMA_CPP_LIB_PATH) in a child process that imports chatspot_edge as the runtime does (OpenMP as the
  user set it; `--runtime-wait-policy unset` removes OMP_WAIT_POLICY in the child), timed as llama-bench
  times pp / tg (`runtime_decode`); median of `--repetitions` rounds after a warm-up.
Time it under /work/notes/bin/cpu-exclusive (or on an otherwise idle machine): the figures are only as quiet as it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

def runtime_decode(gguf: str, threads: int, repetitions: int, n_prompt: int = 128, n_gen: int = 64) -> dict:
    """The runtime's pp / tg in this process (called in a child with LLAMA_CPP_LIB_PATH set), measured the way
    llama-bench measures them: `n_prompt` tokens in one batch into an empty context, and `n_gen` single-token
    greedy steps from an empty context; medians of `repetitions` rounds after a warm-up round."""
    from chatspot_edge.runtime.llama import LlamaModel

    quantized = not Path(gguf).name.lower().endswith(("f16.gguf", "f32.gguf", "bf16.gguf"))
    m = LlamaModel(gguf, n_ctx=512, threads=threads, n_seq_max=1, quantized=quantized)
    prompt = (m.tokenize("The capital of France is Paris. ") * 64)[:n_prompt]
    pp, tg = [], []
    for _ in range(repetitions + 1):  # the first round warms up
        m.reset()
        t0 = time.perf_counter()
        m.decode_tokens(prompt, seq=0, pos=0)
        pp.append(n_prompt / (time.perf_counter() - t0))
        m.reset()
        tok, t0 = prompt[0], time.perf_counter()
        for pos in range(n_gen):
            m.decode_tokens([tok], seq=0, pos=pos)
            tok = m.greedy()
        tg.append(n_gen / (time.perf_counter() - t0))
    out = {"pp_tok_s": round(statistics.median(pp[1:]), 2), "tg_tok_s": round(statistics.median(tg[1:]), 2),
           "extra_bufts": m.extra_bufts, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    m.close()
    return out


def _llama_bench(bin_dir: Path, gguf: str, threads: int, reps: int, n_prompt: int, n_gen: int, extra: list[str]) -> dict:
    from chatspot_edge.llama_tools import llama_bench

    b = llama_bench(gguf, threads, n_prompt, n_gen, reps, extra, bin_dir=bin_dir)
    return {"pp_tok_s": b["pp_tok_s"], "pp_stdev": b["pp_tok_s_stdev"], "tg_tok_s": b["tg_tok_s"],
            "tg_stdev": b["tg_tok_s_stdev"], "cpu_info": b["build"]["cpu_info"]}


def _runtime_child(bin_dir: Path | None, gguf: str, threads: int, reps: int, wait_policy: str, n_prompt: int = 128,
                   n_gen: int = 64) -> dict:
    """wait_policy: "runtime" (the environment the runtime gets), or "unset" (OpenMP's default: the variable removed
    after importing chatspot_edge, before llama.cpp, hence libgomp, is loaded)."""
    from chatspot_edge.openmp import runtime_env

    env = runtime_env()
    if bin_dir is not None:
        env["LLAMA_CPP_LIB_PATH"] = str(bin_dir)
    unset = "os.environ.pop('OMP_WAIT_POLICY', None); " if wait_policy == "unset" else ""
    code = ("import json, os, chatspot_edge; " + unset + "from chatspot_edge.benchmarks.build_speed import runtime_decode; "
            f"print(json.dumps(runtime_decode({gguf!r}, {threads}, {reps}, {n_prompt}, {n_gen})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="append", required=True, help="NAME=DIR (llama-bench + libraries)")
    ap.add_argument("--gguf", action="append", required=True, help="TYPE=FILE")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--n-prompt", type=int, default=128)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--llama-bench-args", default="", help="extra llama-bench arguments, e.g. '--repack 0'")
    ap.add_argument("--no-runtime", action="store_true", help="llama-bench only")
    ap.add_argument("--runtime-wait-policy", default="runtime",
                    help="comma-separated: runtime (the runtime's environment), unset (OpenMP's default)")
    ap.add_argument("--wheel-runtime", action="store_true", help="also the runtime on the installed wheel's library")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    builds = [(n, Path(d).expanduser()) for n, d in (b.split("=", 1) for b in a.build)]
    ggufs = [tuple(g.split("=", 1)) for g in a.gguf]
    threads = [int(t) for t in a.threads.split(",")]
    rows = []
    for name, bin_dir in builds:
        for t in threads:
            for typ, gguf in ggufs:
                row = {"build": name, "dir": str(bin_dir), "type": typ, "threads": t,
                       "llama_bench_args": a.llama_bench_args,
                       **_llama_bench(bin_dir, gguf, t, a.repetitions, a.n_prompt, a.n_gen, a.llama_bench_args.split())}
                if not a.no_runtime:
                    for wp in a.runtime_wait_policy.split(","):
                        row["runtime" if wp == "runtime" else f"runtime_{wp}"] = _runtime_child(
                            bin_dir, gguf, t, a.repetitions, wp, a.n_prompt, a.n_gen)
                print(json.dumps(row), flush=True)
                rows.append(row)
    if a.wheel_runtime:
        for t in threads:
            for typ, gguf in ggufs:
                row = {"build": "wheel (.venv)", "type": typ, "threads": t}
                for wp in a.runtime_wait_policy.split(","):
                    row["runtime" if wp == "runtime" else f"runtime_{wp}"] = _runtime_child(None, gguf, t, a.repetitions, wp,
                                                                                  a.n_prompt, a.n_gen)
                print(json.dumps(row), flush=True)
                rows.append(row)
    from chatspot_edge.files import atomic_write_text

    atomic_write_text(a.out, json.dumps({"created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                         "argv": sys.argv, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
