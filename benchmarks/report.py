"""`chatspot-edge bench report FILE.json ... --out DIR`: merge benchmark results from several machines.

Writes DIR/report.md (machines, every variant, bounds, references, edge vs GPU) and three plots
(matplotlib, Agg backend): `latency_breakdown.png` (vision / prefill / decode of one answer, stacked, per
variant and machine), `speed_vs_size.png` (decode tok/s against bytes on disk, with each machine's
bandwidth bound) and `edge_vs_gpu.png` (how many times slower each CPU variant's TTFT and decode are
than the GPU reference; any PyTorch reference when no CUDA one was given).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chatspot_edge.errors import InputError

PLOTS = ("latency_breakdown.png", "speed_vs_size.png", "edge_vs_gpu.png")
SPEC_KEYS = ("machine", "bundle", "variants", "reference")


def load_results(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Read benchmark JSONs; each gets `_source` (its file name). Raises InputError on a bad file."""
    out = []
    if not paths:
        raise InputError("give at least one benchmark JSON")
    for p in paths:
        p = Path(p)
        try:
            d = json.loads(p.read_text())
        except OSError as e:
            raise InputError(f"{p}: cannot read ({e.strerror or e})") from None
        except ValueError as e:
            raise InputError(f"{p}: not JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(d, dict) or any(k not in d for k in SPEC_KEYS) or not isinstance(d.get("variants"), list):
            raise InputError(f"{p}: not a benchmark JSON (needs {', '.join(SPEC_KEYS)})")
        d["_source"] = p.name
        out.append(d)
    labels: dict[str, int] = {}
    for d in out:  # machines with the same label (two runs on one box) get a suffix
        m = d.setdefault("machine", {}) or {}
        d["machine"] = m
        base = m.get("label") or m.get("cpu") or d["_source"]
        labels[base] = labels.get(base, 0) + 1
        d["_label"] = base if labels[base] == 1 else f"{base} #{labels[base]}"
    return out


def _gpu_reference(results: list[dict]) -> tuple[dict | None, str | None]:
    refs = [(r["reference"], r["_label"]) for r in results if isinstance(r.get("reference"), dict)]
    for ref, label in refs:
        if ref.get("device") == "cuda":
            return ref, label
    return refs[0] if refs else (None, None)


def _answer_tokens(result: dict) -> int:
    return int((result.get("settings") or {}).get("max_tokens") or 24)


def _stages(v: dict, n_tokens: int) -> tuple[float, float, float, float]:
    """(vision, prefill, decode of one answer, other) milliseconds of a cold question."""
    vision = v.get("cold_vision_ms") or v.get("vision_ms") or 0.0
    prefill = v.get("cold_prefill_ms")
    if prefill is None and v.get("prefill_tok_s") and v.get("n_prompt_cold"):
        prefill = v["n_prompt_cold"] / v["prefill_tok_s"] * 1e3
    prefill = prefill or 0.0
    decode = (n_tokens - 1) / v["decode_tok_s"] * 1e3 if v.get("decode_tok_s") else 0.0
    other = max(0.0, (v.get("ttft_cold_ms") or 0.0) - vision - prefill)
    return vision, prefill, decode, other


def _ref_stages(ref: dict, n_tokens: int) -> tuple[float, float, float, float]:
    vision = ref.get("vision_ms") or 0.0
    prefill = max(0.0, (ref.get("ttft_ms") or 0.0) - vision)
    decode = (n_tokens - 1) / ref["decode_tok_s"] * 1e3 if ref.get("decode_tok_s") else 0.0
    return vision, prefill, decode, 0.0


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def _f(v, digits=1) -> str:
    from chatspot_edge.benchmarks.bench import _f as f

    return f(v, digits)


def build_markdown(results: list[dict]) -> str:
    from chatspot_edge.benchmarks.bench import TABLE_HEADER, reference_row, threads_cell, variant_row

    lines = ["# ChatSpot Edge benchmark report", ""]
    lines += ["Medians after a warm-up (spreads in each JSON's `*_stats`). TTFT cold: a new image (resize + "
              "vision + [system + image] prefill + question + first token); follow-up: a new region question "
              "on the same image. runtime/raw: the runtime's decode speed over plain llama.cpp on the same GGUF "
              "(a clean process at its best thread count). thr: threads (prefill/decode when they differ). "
              "Bounds: see `limits.notes` in the JSON.", ""]
    lines += ["## Machines", "", "| machine | source | CPU | cores | memory GB | ggml flags | copy GB/s | matmul GFLOP/s "
              "| load avg |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["machine"]
        rates = m.get("rates") or m.get("gpu_rates") or {}
        mm = rates.get("matmul_gflops") or {}
        mm_txt = ", ".join(f"{t}t: " + "/".join(f"{k} {v:.0f}" for k, v in d.items()) if isinstance(d, dict)
                           else f"{t} {d:.0f}" for t, d in mm.items()) or "-"
        flags = ", ".join(f for f in (m.get("cpu_flags") or []) if f.startswith(("avx512f", "avx512_bf16", "amx", "avx2", "avx_vnni", "neon", "i8mm", "sve"))) or "-"
        mem = m.get("memory_bytes")
        gpu = (m.get("gpu") or {}).get("name")
        lines.append(f"| {r['_label']} | {r['_source']} | {m.get('cpu', '-')}{f' + {gpu}' if gpu else ''} | "
                     f"{m.get('cores', '-')} | {'-' if not mem else f'{mem / 1e9:.0f}'} | {flags} | "
                     f"{_f(rates.get('copy_bandwidth_gbs'))} | {mm_txt} | "
                     f"{', '.join(f'{x:.1f}' for x in m.get('load_avg') or []) or '-'} |")
    lines += ["", "## Variants", "", TABLE_HEADER, "|" + "---|" * (TABLE_HEADER.count(" | ") + 1)]
    for r in results:
        lines += [variant_row(r["_label"], v) for v in r["variants"]]
    lines += ["", "## Measured vs bound", "",
              "| machine | LLM | vision | thr | decode tok/s (bound) | decode | raw llama | prefill tok/s (bound) "
              "| prefill | vision ms (bound) | vision |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for v in r["variants"]:
            lim = v.get("limits") or {}
            lines.append(
                f"| {r['_label']} | {v.get('llm')} | {v.get('vision')} | {threads_cell(v)} | "
                f"{_f(v.get('decode_tok_s'))} ({_f(lim.get('decode_tok_s_bound'))}) | {_pct(lim.get('decode_tok_s_fraction'))} "
                f"| {_pct(lim.get('raw_llama_decode_tok_s_fraction'))} | {_f(v.get('prefill_tok_s'), 0)} "
                f"({_f(lim.get('prefill_tok_s_bound'), 0)}) | {_pct(lim.get('prefill_tok_s_fraction'))} | "
                f"{_f(v.get('vision_ms'), 2)} ({_f(lim.get('vision_ms_bound'), 2)}) | {_pct(lim.get('vision_fraction'))} |")
    refs = [(r["_label"], r["reference"]) for r in results if isinstance(r.get("reference"), dict)]
    if refs:
        lines += ["", "## PyTorch references", "", "| machine | reference | vision | TTFT | decode |",
                  "|---|---|---|---|---|"]
        lines += [reference_row(label, ref) for label, ref in refs]
        lines += ["", "| machine | device | dtype | path | vision ms | TTFT ms | decode tok/s |", "|---|---|---|---|---|---|---|"]
        for label, ref in refs:
            for run in ref.get("runs") or []:
                note = run.get("error") or run.get("skipped")
                lines.append(f"| {label} | {ref.get('device')} | {run.get('dtype')} | {run.get('path')} | "
                             f"{_f(run.get('vision_ms'), 2)} | {_f(run.get('ttft_ms'), 2)} | "
                             f"{_f(run.get('decode_tok_s')) if not note else note[:80]} |")
            if ref.get("vision_note"):
                lines.append(f"| {label} | note: {ref['vision_note']} | | | | | |")
    gpu, gpu_label = _gpu_reference(results)
    if gpu:
        kind = "GPU" if gpu.get("device") == "cuda" else "PyTorch"
        lines += ["", f"## Edge vs {kind} reference ({gpu_label}: {gpu.get('dtype')} {gpu.get('path', '')})", "",
                  f"x slower than the reference (1.0 = as fast). {kind} TTFT {_f(gpu.get('ttft_ms'), 2)} ms, decode "
                  f"{_f(gpu.get('decode_tok_s'))} tok/s.", "",
                  "| machine | LLM | vision | thr | TTFT cold x | decode x |", "|---|---|---|---|---|---|"]
        for r in results:
            for v in r["variants"]:
                t, d = _ratios(v, gpu)
                lines.append(f"| {r['_label']} | {v.get('llm')} | {v.get('vision')} | {threads_cell(v)} | "
                             f"{_f(t, 2)} | {_f(d, 2)} |")
        runs = [run for run in gpu.get("runs") or [] if run.get("decode_tok_s")]
        if runs:  # edge decode against each of the reference's paths (eager and compiled are far apart on a GPU)
            names = [f"{run.get('dtype')} {run.get('path')}" for run in runs]
            lines += ["", f"Edge decode over the {kind} reference's decode, per path (x as fast: 1.0 = as fast, "
                          f"above 1 = faster): " + ", ".join(f"{n} {_f(run['decode_tok_s'])} tok/s"
                                                                for n, run in zip(names, runs)) + ".", "",
                      "| machine | LLM | vision | thr | decode tok/s | " + " | ".join(f"x {n}" for n in names) + " |",
                      "|---|---|---|---|---|" + "---|" * len(runs)]
            for r in results:
                for v in r["variants"]:
                    if not v.get("decode_tok_s"):
                        continue
                    lines.append(f"| {r['_label']} | {v.get('llm')} | {v.get('vision')} | {threads_cell(v)} | "
                                 f"{_f(v['decode_tok_s'])} | "
                                 + " | ".join(_f(v["decode_tok_s"] / run["decode_tok_s"], 2) for run in runs) + " |")
    lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in PLOTS]
    return "\n".join(lines) + "\n"


def _ratios(v: dict, ref: dict) -> tuple[float | None, float | None]:
    t = v["ttft_cold_ms"] / ref["ttft_ms"] if v.get("ttft_cold_ms") and ref.get("ttft_ms") else None
    d = ref["decode_tok_s"] / v["decode_tok_s"] if v.get("decode_tok_s") and ref.get("decode_tok_s") else None
    return t, d


def _short(v: dict) -> str:
    from chatspot_edge.benchmarks.bench import threads_cell

    return f"{v.get('llm')}:{v.get('vision')} x{threads_cell(v) or '?'}"


def make_plots(results: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    # 1. latency breakdown
    bars = []
    for r in results:
        n = _answer_tokens(r)
        for v in r["variants"]:
            if not v.get("error"):
                bars.append((f"{r['_label']}\n{_short(v)}", _stages(v, n)))
        if isinstance(r.get("reference"), dict):
            ref = r["reference"]
            bars.append((f"{r['_label']}\nPyTorch {ref.get('device')} {ref.get('dtype')}", _ref_stages(ref, n)))
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.55 * len(bars) + 1.2)))
    left = [0.0] * len(bars)
    names = ("vision", "prefill", f"decode ({_answer_tokens(results[0]) if results else 24} tokens)", "other (resize, overhead)")
    for i, name in enumerate(names):
        vals = [b[1][i] for b in bars]
        ax.barh(range(len(bars)), vals, left=left, label=name, color=colors[i % len(colors)])
        left = [a + b for a, b in zip(left, vals)]
    ax.set_yticks(range(len(bars)))
    ax.set_yticklabels([b[0] for b in bars], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds (one cold question and its answer)")
    ax.set_title("Latency per stage")
    ax.set_xlim(0, max(left + [1e-3]) * 1.05)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 1.0 / max(len(bars) + 2, 3)), ncol=4)
    fig.tight_layout()
    written.append(_save(fig, out / PLOTS[0], plt))

    # 2. speed vs size
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(results):
        pts = [v for v in r["variants"] if v.get("decode_tok_s") and v.get("bytes")]
        if not pts:
            continue
        c = colors[i % len(colors)]
        ax.scatter([v["bytes"] / 1e6 for v in pts], [v["decode_tok_s"] for v in pts], color=c, label=f"{r['_label']} runtime")
        raw = [v for v in pts if v.get("raw_llama_decode_tok_s")]
        ax.scatter([v["bytes"] / 1e6 for v in raw], [v["raw_llama_decode_tok_s"] for v in raw], facecolors="none",
                   edgecolors=c, label=f"{r['_label']} raw llama.cpp")
        for v in pts:
            ax.annotate(_short(v), (v["bytes"] / 1e6, v["decode_tok_s"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        bw = ((r["machine"].get("rates") or {}).get("copy_bandwidth_gbs") or 0) * 1e9
        if bw:
            xs = sorted({v["bytes"] for v in pts})
            lo, hi = min(xs) * 0.5, max(xs) * 2
            grid = [lo * (hi / lo) ** (k / 20) for k in range(21)]
            ax.plot([x / 1e6 for x in grid], [bw / x for x in grid], ls="--", lw=0.8, color=c,
                    label=f"{r['_label']} bandwidth bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes on disk (MB)")
    ax.set_ylabel("decode tok/s")
    ax.set_title("Decode speed vs size")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)
    fig.tight_layout()
    written.append(_save(fig, out / PLOTS[1], plt))

    # 3. edge vs GPU
    gpu, gpu_label = _gpu_reference(results)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    rows = []
    if gpu:
        for r in results:
            for v in r["variants"]:
                t, d = _ratios(v, gpu)
                if t or d:
                    rows.append((f"{r['_label']}\n{_short(v)}", t or 0.0, d or 0.0))
    if rows:
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], width=0.4, label="TTFT cold (x slower)")
        ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], width=0.4, label="decode (x slower)")
        ax.set_xlim(-0.8, max(len(rows), 3) - 0.2)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r[0] for r in rows], fontsize=6, rotation=30, ha="right")
        ax.axhline(1.0, color="black", lw=0.8)
        if max(max(r[1], r[2]) for r in rows) / max(min(x for r in rows for x in r[1:] if x) or 1, 1e-9) > 20:
            ax.set_yscale("log")
        ax.set_ylabel("edge time / reference time")
        kind = "GPU" if gpu.get("device") == "cuda" else "PyTorch"
        ax.set_title(f"Edge vs {kind} reference ({gpu_label}, {gpu.get('dtype')} {gpu.get('path', '')})", fontsize=9)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no reference in these results", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    fig.tight_layout()
    written.append(_save(fig, out / PLOTS[2], plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    """PNG through a temporary sibling and a rename (a reader never sees half a file)."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=130)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def write_report(paths: list[str | Path], out: str | Path) -> dict[str, Path]:
    """Merge the benchmark JSONs `paths` into `out`/report.md and the plots. Returns {name: path}."""
    from chatspot_edge.files import atomic_write_text

    results = load_results(paths)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    written = {p.name: p for p in make_plots(results, out)}
    md = out / "report.md"
    from chatspot_edge.benchmarks.profiles import report_section

    atomic_write_text(md, build_markdown(results) + report_section(results))
    written["report.md"] = md
    return written
