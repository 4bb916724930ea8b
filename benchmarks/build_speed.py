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
With `--rounds R` every (GGUF, threads) pair is measured R times, the builds interleaved and their order rotated
each round, so a slow minute of a shared machine falls on every build instead of one: the summary gives each
build's median over rounds, its ratio to the fastest build's median, and its paired ratio to the first build
(median of the per-round ratios: the figure that decides "within 5%" on a noisy machine).
Time it on an otherwise idle machine: the figures are only as quiet as it.
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
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds over the builds (see above)")
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
    for r in range(a.rounds):
        for t in threads:
            for typ, gguf in ggufs:
                order = builds[r % len(builds):] + builds[: r % len(builds)]  # rotate: no build always goes first
                for name, bin_dir in order:
                    row = {"build": name, "dir": str(bin_dir), "type": typ, "threads": t, "round": r,
                           "llama_bench_args": a.llama_bench_args,
                           **_llama_bench(bin_dir, gguf, t, a.repetitions, a.n_prompt, a.n_gen,
                                          a.llama_bench_args.split())}
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

    summary = summarize(rows, [n for n, _ in builds])
    atomic_write_text(a.out, json.dumps({"created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                         "argv": sys.argv, "rounds": a.rounds, "rows": rows, "summary": summary},
                                        indent=1) + "\n")
    print(markdown(summary))
    return 0


METRICS = (("llama-bench", "pp_tok_s"), ("llama-bench", "tg_tok_s"), ("runtime", "pp_tok_s"), ("runtime", "tg_tok_s"))


def _metric(row: dict, source: str, key: str) -> float | None:
    v = row.get(key) if source == "llama-bench" else (row.get("runtime") or {}).get(key)
    return float(v) if v is not None else None


def summarize(rows: list[dict], builds: list[str]) -> list[dict]:
    """Per (GGUF type, threads, build): for each metric the median over rounds, the ratio of that median to the
    fastest build's, and the paired ratio to `builds[0]` (the median over rounds of this build / builds[0] in the
    same round). Rows of the wheel's runtime (no llama-bench) are left out."""
    out = []
    keys = sorted({(r["type"], r["threads"]) for r in rows if "round" in r}, key=lambda k: (k[1], k[0]))
    for typ, t in keys:
        sel = [r for r in rows if r.get("type") == typ and r.get("threads") == t and "round" in r]
        med = {}
        for b in builds:
            for src, key in METRICS:
                vals = [v for r in sel if r["build"] == b and (v := _metric(r, src, key)) is not None]
                med[b, src, key] = statistics.median(vals) if vals else None
        for b in builds:
            row = {"type": typ, "threads": t, "build": b, "rounds": len([r for r in sel if r["build"] == b])}
            for src, key in METRICS:
                name = f"{'lb' if src == 'llama-bench' else 'rt'}_{key[:2]}"
                m = med[b, src, key]
                if m is None:
                    continue
                best = max(v for bb in builds if (v := med[bb, src, key]) is not None)
                paired = []
                for r0 in (r for r in sel if r["build"] == builds[0]):
                    mine = [r for r in sel if r["build"] == b and r["round"] == r0["round"]]
                    v0, v1 = _metric(r0, src, key), _metric(mine[0], src, key) if mine else None
                    if v0 and v1:
                        paired.append(v1 / v0)
                row[name] = round(m, 1)
                row[f"{name}_vs_fastest"] = round(m / best, 3)
                row[f"{name}_paired_vs_{builds[0]}"] = round(statistics.median(paired), 3) if paired else None
            out.append(row)
    return out


def markdown(summary: list[dict]) -> str:
    """The summary as a Markdown table: medians over rounds (tok/s) and each one's share of the fastest build's."""
    cols = [("lb_pp", "llama-bench pp"), ("lb_tg", "llama-bench tg"), ("rt_pp", "runtime pp"), ("rt_tg", "runtime tg")]
    lines = ["| GGUF | threads | build | rounds | " + " | ".join(c for _, c in cols) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in cols) + " |"]
    for r in summary:
        cells = [f"{r[k]} ({100 * r[k + '_vs_fastest']:.0f}%)" if k in r else "-" for k, _ in cols]
        lines.append(f"| {r['type']} | {r['threads']} | {r['build']} | {r['rounds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
