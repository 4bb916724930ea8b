"""`chatspot-edge bench BUNDLE`: latency, memory and size of every variant of a bundle (SPEC section 7).

    result = run_bench("bundle/", "bench.json", variants=None, threads=(2,), repeats=5)
    print(format_table(result))

Each (LLM variant, vision variant, thread count) runs in a fresh subprocess (`benchmarks/worker.py`) so its
peak RSS, page cache use and thread pools are its own. Threads: by default ("auto") the runtime's own choice,
measured afresh in the worker (`runtime.threads`, recorded in the machine's cache as users then get it);
`threads=(1, 2)` runs each variant at each fixed count. The raw llama.cpp baseline runs once per GGUF in a
clean process (`benchmarks/raw_llama.py`: no chatspot_edge import, the user's OpenMP settings, every thread
count, the best kept), the way a user of llama.cpp gets it. Every timing is the median of `repeats` runs after
a warm-up, with min / max / p10 / p90 beside it (`<key>_stats`). The machine, its memory bandwidth and matmul
rate, and per-variant roofline bounds (`benchmarks/limits.py`) are recorded too. The JSON is written
atomically, once at the end.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from chatspot_edge.errors import InputError
from chatspot_edge.openmp import runtime_env
from chatspot_edge.export.manifest import find_variant, region_graph, split_variant_pair, variant_entries

DEFAULT_REPEATS = 5
WORKER_TIMEOUT_S = 3600
QUANTIZED_PREFIXES = ("Q", "IQ", "TQ")


# -- variants -------------------------------------------------------------------------------------------------


def resolve_variants(manifest: dict, spec: str | Sequence[str] | None) -> list[dict[str, Any]]:
    """The variants to run: `spec` "LLM[:VISION],..." (names are quant / precision tags, or "default"), or by
    default the default pair plus every LLM variant x (default vision, int8 vision where present)."""
    llms, visions = variant_entries(manifest, "llm"), variant_entries(manifest, "vision")
    pairs: list[tuple[tuple, tuple]] = []
    if spec:
        items = spec.split(",") if isinstance(spec, str) else list(spec)
        for item in (i.strip() for i in items):
            if not item:
                continue
            llm_name, vis_name = split_variant_pair(item)
            pairs.append((find_variant(manifest, "llm", llm_name or None), find_variant(manifest, "vision", vis_name)))
        if not pairs:
            raise InputError(f"--variants {spec!r}: no variant named")
    else:
        vis_choice = [visions[0]] + [v for v in visions[1:] if v[0].lower() == "int8"]
        pairs = [(l, v) for l in llms for v in vis_choice]
    seen, out = set(), []
    for (ln, le, ld), (vn, ve, vd) in pairs:
        if (ln, vn) in seen:
            continue
        seen.add((ln, vn))
        out.append({"llm": str(le.get("quant") or ln), "vision": str(ve.get("precision") or vn),
                    "llm_arg": None if ld else ln, "vision_arg": None if vd else vn,
                    "llm_file": le["file"], "vision_file": ve["file"], "region_file": region_graph(manifest, ve),
                    "default": ld and vd})
    return out


def variant_files(manifest: dict, variant: dict) -> dict[str, int]:
    """{file: bytes} of what this variant needs on the device: its GGUF, its vision graph (with external
    data), the region graph when the model has one, and the manifest."""
    files = manifest.get("files", {})
    names = [variant["llm_file"], variant["vision_file"]] + ([variant["region_file"]] if variant.get("region_file") else [])
    out: dict[str, int] = {}
    for name in names:
        for f, e in files.items():
            if f == name or f.startswith(name + ".") or f.startswith(name.rstrip("/") + "/"):
                out[f] = int(e["bytes"])
    out["manifest.json"] = int(manifest.get("_manifest_bytes", 0))
    return out


# -- statistics -----------------------------------------------------------------------------------------------


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats(xs: Iterable[float]) -> dict[str, float] | None:
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None
    return {"p50": statistics.median(xs), "p10": _quantile(xs, 0.1), "p90": _quantile(xs, 0.9), "min": min(xs),
            "max": max(xs), "n": len(xs)}


def _median(xs) -> float | None:
    s = stats(xs or [])
    return s["p50"] if s else None


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Worker measurements -> the SPEC-7 variant keys (medians) plus `<key>_stats` and the breakdown."""
    out: dict[str, Any] = {}
    timed = {
        "vision_ms": "vision_ms", "ttft_cold_ms": "ttft_cold_ms", "ttft_followup_ms": "ttft_followup_ms",
        "decode_tok_s": "decode_tok_s", "raw_llama_decode_tok_s": "raw_llama_decode_tok_s", "load_ms": "load_ms",
        "suite_ms": "suite_ms", "preprocess_ms": "preprocess_ms", "cold_prefill_ms": "cold_prefill_ms",
        "cold_vision_ms": "cold_vision_ms", "cold_overhead_ms": "cold_overhead_ms",
        "followup_prefill_ms": "followup_prefill_ms",
    }
    for key, src in timed.items():
        s = stats(raw.get(src) or [])
        out[key] = s["p50"] if s else None
        out[f"{key}_stats"] = s
    pre = [n / (ms / 1e3) for n, ms in zip(raw.get("n_prompt_cold", []), raw.get("cold_prefill_ms", [])) if ms > 0]
    s = stats(pre)
    out["prefill_tok_s"] = s["p50"] if s else None
    out["prefill_tok_s_stats"] = s
    fol = [n / (ms / 1e3) for n, ms in zip(raw.get("n_prompt_followup", []), raw.get("followup_prefill_ms", [])) if ms > 0]
    out["followup_prefill_tok_s"] = _median(fol)
    out["n_prompt_cold"] = _median(raw.get("n_prompt_cold"))
    out["n_prompt_followup"] = _median(raw.get("n_prompt_followup"))
    out["peak_rss_mb"] = raw.get("peak_rss_mb")
    for k in ("load_first_ms", "rss_mb_end", "decode_source", "decode_context",
              "suite_questions", "suite_answers_sample", "extra_bufts", "n_ctx", "worker_seconds",
              "thread_plan", "threads_prefill", "threads_decode", "openmp"):
        if k in raw:
            out[k] = raw[k]
    out["suite_tokens"] = _median(raw.get("suite_tokens"))
    if any(raw.get("cold_image_cached") or []):
        out["warning"] = "an image embedding came from the cache during a cold measurement"
    return out


# -- the run --------------------------------------------------------------------------------------------------


def _run_worker(job: dict, log: Callable[[str], None]) -> dict:
    with tempfile.TemporaryDirectory(prefix="chatspot-bench-") as d:
        job = dict(job, out=str(Path(d) / "result.json"))
        (Path(d) / "job.json").write_text(json.dumps(job))
        env = runtime_env()  # the runtime's process: OpenMP as the user set it, nothing chatspot_edge added
        proc = subprocess.run([sys.executable, "-m", "chatspot_edge.benchmarks.worker", str(Path(d) / "job.json")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              timeout=WORKER_TIMEOUT_S)
        for line in proc.stderr.splitlines():
            if line.startswith("bench ["):
                log(line[6:])
        out = Path(job["out"])
        if proc.returncode != 0 or not out.is_file():
            tail = [l for l in proc.stderr.strip().splitlines() if l.strip()][-1:] or [f"exit code {proc.returncode}"]
            raise RuntimeError(f"worker failed (exit {proc.returncode}): {tail[0][:300]}")
        return json.loads(out.read_text())


def _raw_llama(gguf: Path, n_prompt: int, n_ctx: int, n_tokens: int, repeats: int, done: dict,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Plain llama.cpp on `gguf` in a clean process (`benchmarks/raw_llama.py`) at every candidate thread
    count; once per (file, prompt, context) per run. {"error": ...} when it fails."""
    from chatspot_edge.runtime.threads import candidates

    key = (str(gguf), n_prompt, n_ctx)
    if key in done:
        return done[key]
    counts = candidates()
    log(f"bench: raw llama.cpp on {gguf.name} in a clean process, threads {','.join(map(str, counts))}")
    script = Path(__file__).with_name("raw_llama.py")
    with tempfile.TemporaryDirectory(prefix="chatspot-raw-") as d:
        out = Path(d) / "raw.json"
        safe = ["-P"] if sys.version_info >= (3, 11) else []  # not the script's folder first on sys.path
        cmd = [sys.executable, *safe, str(script), str(gguf), "--threads", ",".join(map(str, counts)),
               "--prompt", str(n_prompt), "--tokens", str(n_tokens), "--ctx", str(n_ctx), "--repeats", str(repeats),
               "--out", str(out)]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=runtime_env(),
                                  timeout=WORKER_TIMEOUT_S)
            if proc.returncode != 0 or not out.is_file():
                tail = [l for l in proc.stderr.strip().splitlines() if l.strip()][-1:] or [f"exit code {proc.returncode}"]
                raise RuntimeError(f"raw llama.cpp failed (exit {proc.returncode}): {tail[0][:300]}")
            done[key] = json.loads(out.read_text())
        except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as e:
            log(f"bench: {e}")
            done[key] = {"error": str(e)}
    return done[key]


def _with_raw(entry: dict[str, Any], raw: dict[str, Any]) -> None:
    """The clean-process baseline into a variant's entry: best decode / prefill over thread counts, the ratio."""
    best = raw.get("best") or {}
    entry["raw_llama_decode_tok_s"] = best.get("decode_tok_s")
    entry["raw_llama_prefill_tok_s"] = best.get("prefill_tok_s")
    entry["raw_llama"] = {k: raw.get(k) for k in ("median", "best", "n_prompt", "n_tokens", "n_ctx", "repeats", "env",
                                                  "extra_bufts", "chatspot_edge_imported", "error") if k in raw}
    entry["raw_llama"]["how"] = ("plain llama-cpp-python in a clean process (benchmarks/raw_llama.py): no chatspot_edge "
                                 "import, the environment's OpenMP settings, best of the thread counts")
    if entry.get("decode_tok_s") and entry["raw_llama_decode_tok_s"]:
        entry["decode_vs_raw"] = entry["decode_tok_s"] / entry["raw_llama_decode_tok_s"]


def _threads(threads: int | str | Sequence[int] | None) -> tuple[int | None, ...]:
    """Thread counts to run: (None,) is the runtime's own measured choice ("auto")."""
    if threads is None or threads == "auto":
        return (None,)
    if isinstance(threads, int):
        return (threads,)
    if isinstance(threads, str):
        try:
            vals = tuple(int(t) for t in threads.split(",") if t.strip())
        except ValueError:
            raise InputError(f"--threads {threads!r}: comma-separated positive integers, e.g. 1,2,4") from None
    else:
        vals = tuple(int(t) for t in threads)
    if not vals or min(vals) < 1:
        raise InputError(f"--threads {threads!r}: comma-separated positive integers, e.g. 1,2,4")
    return vals


def run_bench(bundle: str | Path, out_json: str | Path | None, variants: str | Sequence[str] | None = None,
              threads: int | str | Sequence[int] | None = None, repeats: int = DEFAULT_REPEATS,
              reference: str | Path | None = None, device: str = "cpu",
              reference_random_like: str | Path | None = None, max_tokens: int = 24, raw_tokens: int = 32,
              reference_tokens: int = 32, label: str | None = None, measure_machine: bool = True,
              log: Callable[[str], None] | None = None, decode_threads: int | None = None,
              device_class: Any = None) -> dict[str, Any]:
    """Benchmark every requested variant of `bundle`; writes `out_json` (atomically) and returns the result.

    variants: "LLM[:VISION],..." or a list of such (default: see `resolve_variants`); threads: None / "auto"
    (the runtime's measured choice) or thread counts (each variant runs at each; decode too unless
    `decode_threads` is given); reference / reference_random_like: a checkpoint timed in PyTorch on `device`
    (the latter with random weights of its shapes). Raises InputError on bad input (a broken bundle, an
    unknown variant). A variant whose worker fails is kept with an `error` key and null figures.
    device_class: a `benchmarks.profiles.DeviceClass`: its context length is used and the result gets `profile`
    (the class and each variant against its budgets)."""
    from chatspot_edge.export.manifest import verify_bundle
    from chatspot_edge.files import atomic_write_text

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    bundle = Path(bundle)
    if repeats < 1:
        raise InputError(f"--repeats {repeats}: must be at least 1")
    if reference and reference_random_like:
        raise InputError("give --reference or --reference-random-like, not both")
    ref_ckpt = Path(reference or reference_random_like) if (reference or reference_random_like) else None
    if ref_ckpt is not None and not (ref_ckpt / "config.json").is_file():
        raise InputError(f"{ref_ckpt}: not a checkpoint (no config.json)")
    if device not in ("cpu", "cuda", "auto"):
        raise InputError(f"--device {device!r}: cpu, cuda or auto")
    thread_list = _threads(threads)
    if decode_threads is not None and int(decode_threads) < 1:
        raise InputError(f"--decode-threads {decode_threads}: must be at least 1")
    t0 = time.perf_counter()
    manifest = verify_bundle(bundle)  # before any output: a bad bundle is one line on stderr
    manifest["_manifest_bytes"] = (bundle / "manifest.json").stat().st_size
    plan = resolve_variants(manifest, variants)
    from chatspot_edge.runtime.build_guard import check_llama_build

    check_llama_build()  # the workers load llama.cpp: a build for another CPU is one line here, not N crashes

    from chatspot_edge.benchmarks.limits import gguf_stats, onnx_flops, variant_limits
    from chatspot_edge.benchmarks.machine import cpu_count, machine_info, measure_rates

    machine = machine_info(label)
    rate_threads = tuple(sorted({t or cpu_count() for t in thread_list} | ({1} if None in thread_list else set())))
    if measure_machine:
        log("bench: measuring memory bandwidth and matmul rate")
        machine["rates"] = measure_rates(rate_threads)
    rates = machine.get("rates") or {}
    gstats: dict[str, dict] = {}
    raw_runs: dict[tuple, dict] = {}
    llama_bench_runs: dict[tuple, dict] = {}
    vflops: dict[str, float | None] = {}
    results: list[dict[str, Any]] = []
    for v in plan:
        if v["llm_file"] not in gstats:
            gstats[v["llm_file"]] = gguf_stats(bundle / v["llm_file"])
        if v["vision_file"] not in vflops:
            try:
                vflops[v["vision_file"]] = onnx_flops(bundle / v["vision_file"])["flops"] or None
            except Exception:  # noqa: BLE001 - the bound is an extra; a graph onnx cannot parse has none
                vflops[v["vision_file"]] = None
        files = variant_files(manifest, v)
        for t in thread_list:
            log(f"bench: {v['llm']} + vision {v['vision']}, "
                + ("threads: the runtime's measured choice" if t is None else f"{t} thread{'s' if t > 1 else ''}"))
            job = {"bundle": str(bundle.resolve()), "llm": v["llm_arg"], "vision": v["vision_arg"], "threads": t,
                   "decode_threads": decode_threads, "repeats": repeats, "max_tokens": max_tokens,
                   "llm_file": v["llm_file"], "quantized": v["llm"].upper().startswith(QUANTIZED_PREFIXES)}
            if device_class is not None:
                job["n_ctx"] = device_class.n_ctx
            entry: dict[str, Any] = {"llm": v["llm"], "vision": v["vision"], "threads": t}
            try:
                raw = _run_worker(job, log)
                summary = summarize(raw)
                err = None
            except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as e:
                summary, err = {}, str(e)
                log(f"bench: {v['llm']}:{v['vision']} x{t} failed: {err}")
            entry.update({k: summary.get(k) for k in ("vision_ms", "ttft_cold_ms", "ttft_followup_ms", "prefill_tok_s",
                                                      "decode_tok_s", "raw_llama_decode_tok_s", "peak_rss_mb",
                                                      "load_ms")})
            entry["bytes"] = sum(files.values())
            entry.update({k: val for k, val in summary.items() if k not in entry})
            if summary.get("threads_prefill"):  # what the runtime ran with (its choice under "auto")
                entry["threads"], entry["decode_threads"] = summary["threads_prefill"], summary["threads_decode"]
            if not err:
                _with_raw(entry, _raw_llama(bundle / v["llm_file"], int(summary.get("n_prompt_cold") or 64),
                                            int(summary.get("n_ctx") or 2048), raw_tokens, repeats, raw_runs, log))
            entry["files"] = files
            entry["default"] = v["default"]
            entry["llama_bench"] = _llama_bench(bundle / v["llm_file"], int(entry.get("threads") or t or cpu_count()),
                                                llama_bench_runs, log)
            if err:
                entry["error"] = err
            else:
                entry["limits"] = variant_limits(gstats[v["llm_file"]], vflops[v["vision_file"]], rates,
                                                 int(entry.get("threads") or cpu_count()), entry)
            results.append(entry)
    ref = None
    if ref_ckpt is not None:
        ref = _reference(ref_ckpt, bool(reference_random_like), device, results, manifest, reference_tokens,
                         repeats, max(thread_list), log)
    result = {
        "machine": machine,
        "bundle": _bundle_info(bundle, manifest, gstats),
        "variants": results,
        "reference": ref,
        "settings": {"repeats": repeats, "threads": [t or "auto" for t in thread_list],
                     "decode_threads": decode_threads, "max_tokens": max_tokens,
                     "raw_llama_tokens": raw_tokens, "statistic": "median after one warm-up; spreads in *_stats"},
        "seconds": round(time.perf_counter() - t0, 1),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device_class is not None:
        from chatspot_edge.benchmarks.profiles import assess, profile_record

        result["profile"] = {**profile_record(device_class), "assessment": assess(result, device_class)}
    if out_json is not None:
        atomic_write_text(out_json, json.dumps(result, indent=2, default=_json_default) + "\n")
    return result


def _llama_bench(gguf: Path, threads: int, done: dict, log) -> dict[str, Any]:
    """llama-bench's pp128 / tg64 of this GGUF (`make native`'s build, a clean process), once per file and thread
    count; {"skipped": why} without the tools, {"error": ...} when it fails."""
    from chatspot_edge.llama_tools import llama_bench

    key = (str(gguf), threads)
    if key not in done:
        try:
            log(f"bench: llama-bench {gguf.name}, {threads} thread{'s' if threads > 1 else ''}")
            done[key] = llama_bench(gguf, threads=threads)
        except InputError as e:
            done[key] = {"skipped": str(e)}
        except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as e:
            done[key] = {"error": str(e)}
    return done[key]


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _bundle_info(bundle: Path, manifest: dict, gstats: dict) -> dict[str, Any]:
    model = manifest.get("model", {})
    return {"path": str(bundle.resolve()), "name": model.get("name"), "preset": model.get("preset"),
            "parameters": model.get("parameters"), "image": manifest.get("image"),
            "weights": "random-like" if (model.get("provenance", {}).get("training") or {}).get("pretrained") is False
            else None,
            "gguf": {f: {k: v for k, v in s.items() if k != "tensor_bytes_by_type"} | {"by_type": s["tensor_bytes_by_type"]}
                     for f, s in gstats.items()}}


def _reference(ckpt: Path, random_like: bool, device: str, results: list, manifest: dict, new_tokens: int,
               repeats: int, threads: int, log) -> dict[str, Any]:
    from chatspot_edge.benchmarks.reference import bench_reference, load_reference

    n_image = int(manifest["image"]["tokens"])
    n_prompt = next((r.get("n_prompt_cold") for r in results if r.get("n_prompt_cold")), None)
    n_text = int(n_prompt - n_image) if n_prompt else 40
    log(f"bench: PyTorch reference on {device} ({'random-like weights' if random_like else 'checkpoint weights'})")
    model, info = load_reference(ckpt, random_like)
    return bench_reference(model, device=device, n_text=max(n_text, 2), new_tokens=new_tokens, repeats=repeats,
                           threads=threads if device == "cpu" else None, info=info, log=log)


# -- table ----------------------------------------------------------------------------------------------------


def _f(v, digits=1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


TABLE_HEADER = ("| machine | LLM | vision | thr | MB | load ms | vision ms | TTFT cold ms | TTFT follow-up ms "
                "| prefill tok/s | decode tok/s | raw llama tok/s | runtime/raw | peak RSS MB | decode % of bound |")


def threads_cell(v: dict[str, Any]) -> str:
    """"2" when prefill and decode ran with the same count, else "prefill/decode" (e.g. "2/1")."""
    t, d = v.get("threads"), v.get("decode_threads")
    return str(t if t is not None else "") if d in (None, t) else f"{t}/{d}"


def variant_row(machine: str, v: dict[str, Any]) -> str:
    lim = v.get("limits") or {}
    ratio = v.get("decode_vs_raw")
    frac = lim.get("decode_tok_s_fraction")
    cells = [machine, v.get("llm"), v.get("vision"), threads_cell(v), _f((v.get("bytes") or 0) / 1e6),
             _f(v.get("load_ms"), 0), _f(v.get("vision_ms")), _f(v.get("ttft_cold_ms")), _f(v.get("ttft_followup_ms")),
             _f(v.get("prefill_tok_s"), 0), _f(v.get("decode_tok_s")), _f(v.get("raw_llama_decode_tok_s")),
             "-" if ratio is None else f"{ratio:.0%}", _f(v.get("peak_rss_mb"), 0),
             "-" if frac is None else f"{frac:.0%}"]
    if v.get("error"):
        cells[6] = f"failed: {v['error'][:60]}"
    return "| " + " | ".join(str(c) for c in cells) + " |"


def reference_row(machine: str, ref: dict[str, Any]) -> str:
    return (f"| {machine} | PyTorch {ref.get('device')} {ref.get('dtype')} ({ref.get('path', 'eager')}"
            f"{', random-like' if ref.get('weights') == 'random-like' else ''}) | vision {_f(ref.get('vision_ms'), 2)} ms "
            f"| TTFT {_f(ref.get('ttft_ms'), 2)} ms | decode {_f(ref.get('decode_tok_s'))} tok/s |")


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of one benchmark result (the variants, then the reference)."""
    m = (result.get("machine") or {}).get("label") or "this machine"
    lines = [TABLE_HEADER, "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"]
    lines += [variant_row(m, v) for v in result.get("variants") or []]
    ref = result.get("reference")
    if ref:
        lines += ["", "| machine | reference | vision | TTFT | decode |", "|---|---|---|---|---|", reference_row(m, ref)]
    lb = [v for v in result.get("variants") or [] if (v.get("llama_bench") or {}).get("tg_tok_s")]
    if lb:  # llama.cpp's own benchmark of the same GGUF (`make native`), beside the runtime's decode
        lines += ["", "| LLM | thr | llama-bench pp128 tok/s | llama-bench tg64 tok/s | runtime decode tok/s |",
                  "|---|---|---|---|---|"]
        lines += [f"| {v['llm']} | {v.get('threads')} | {_f(v['llama_bench'].get('pp_tok_s'))} "
                  f"| {_f(v['llama_bench'].get('tg_tok_s'))} | {_f(v.get('decode_tok_s'))} |" for v in lb]
    return "\n".join(lines)
