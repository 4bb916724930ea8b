"""Issue 17's ablation: each referring-quality change alone on the first design, and all together, trained on the
same data for the same samples, measured through the runtime (Q4_K_M LLM + int8 vision bundle).

    python -m chatspot_edge.benchmarks.quality_ablation train  --data DIR --out DIR [--variants a,b] [--steps N ...]
    python -m chatspot_edge.benchmarks.quality_ablation eval   --data DIR --out DIR [--variants a,b] [--limit N]
    python -m chatspot_edge.benchmarks.quality_ablation ttft   --data DIR --out DIR [--variants a,b]
    python -m chatspot_edge.benchmarks.quality_ablation report --out DIR [--md FILE] [--plots DIR]

`train` adapts mini once per variant (fixed step counts: timing-independent, so a shared machine gives the same
checkpoints); `eval` exports each checkpoint, adds the Q4_K_M + int8 variants and evaluates them through the
runtime on the test split (and the checkpoint in PyTorch, for the bundle's parity); `ttft` builds the smol
shape of each variant's design (random weights: latency does not depend on them), quantizes it the same way and
benchmarks cold and follow-up time to first token (run it on a quiet machine); `report` writes the Markdown
table and the plots. Every step skips what is already in OUT, so an interrupted run continues.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from chatspot_edge.files import atomic_write_text

FIRST_DESIGN = dict(position_2d=False, region_crop="resized", region_geometry=False, region_relative=False,
                    relation_words=False, vision_merge="avg")
# The first design and recipe (the project before issue 17), with the training throughput changes that do
# not change the maths left on (fp32 where bf16 is emulated): the baseline every change is added to.
BASELINE = dict(design=FIRST_DESIGN, referring="text", turns=0, embeddings="all", loc_init="mean")
CHANGES = {  # name: (what it changes, the AdaptOptions overrides)
    "position_2d": ("2D cell position in the image tokens", dict(design=dict(position_2d=True))),
    "loc": ("single-token coordinates (chatspot-loc-v1, 32 bins)", dict(referring="loc", bins=32)),
    "crop": ("region crop of the original image (32 x 128, aspect kept)", dict(design=dict(region_crop="original"))),
    "geometry": ("box centre / size in the region embedding", dict(design=dict(region_geometry=True))),
    "relative": ("each region placed relative to its question's first region",
                 dict(design=dict(region_relative=True))),
    "relation_words": ("the relative view writes the relation word's embedding (left, larger, ...), its choice "
                       "trained by the relation-word alignment",
                       dict(design=dict(region_relative=True, relation_words=True))),
    "turns": ("8 independent questions per image (shared prefix)", dict(turns=8)),
    "added_rows": ("train the added tokens' embedding rows only", dict(embeddings="added")),
}
METRIC_LABELS = {"region_recognition": "RR", "point_qa": "point QA", "region_ocr": "OCR", "grounding": "grounding",
                 "region_relation": "relation", "counting": "counting", "noise_0.2": "noise s=0.2",
                 "hallucination": "halluc."}  # every ablation table's metrics, in column order, with their headers
METRICS = tuple(METRIC_LABELS)


def describe_variant(name: str) -> str:
    """What a variant name (see variant_options) changes, in words, for a table row."""
    if name == "baseline":
        return "first design"
    if name == "all":
        return "all changes (the default)"
    if name.startswith("all-") and name[4:] in CHANGES:
        return f"all but: {CHANGES[name[4:]][0]}"
    return CHANGES.get(name, (name,))[0]


def variant_options(name: str) -> dict:
    """AdaptOptions overrides of a variant: "baseline", a change name, "all", or "all-<change>" (all but one)."""
    opts = json.loads(json.dumps(BASELINE))
    if name == "baseline":
        chosen: list[str] = []
    elif name == "all":
        chosen = list(CHANGES)
    elif name.startswith("all-") and name[4:] in CHANGES:
        chosen = [c for c in CHANGES if c != name[4:]]
    elif name in CHANGES:
        chosen = [name]
    else:
        raise SystemExit(f"unknown variant {name!r} (baseline, {', '.join(CHANGES)}, all, all-<change>)")
    for c in chosen:
        for k, v in CHANGES[c][1].items():
            opts[k] = {**opts[k], **v} if isinstance(v, dict) else v
    return opts


def _variants(arg: str | None) -> list[str]:
    return arg.split(",") if arg else ["baseline", *CHANGES, "all"]


def train(data: Path, out: Path, variants: list[str], steps: int, stage1_steps: int, batch_size: int,
          max_tokens: int, seed: int = 0) -> None:
    from chatspot_edge.train.adapt import AdaptOptions, adapt

    for name in variants:
        ckpt = out / name / "ckpt"
        if (ckpt / "config.json").is_file():
            continue
        o = variant_options(name)
        print(f"== train {name}: {o}", file=sys.stderr, flush=True)
        res = adapt(AdaptOptions(preset="mini", data=data, out=ckpt, steps=steps, stage1_steps=stage1_steps,
                                 batch_size=batch_size, max_tokens=max_tokens, seed=seed, save_every=50, resume=True,
                                 **o))
        atomic_write_text(out / name / "train.json", json.dumps(
            {"options": o, "steps": res["steps"], "stage1_steps": stage1_steps, "batch_size": batch_size,
             "seconds": res["seconds"], "losses": res["losses"]}) + "\n")


def evaluate(data: Path, out: Path, variants: list[str], limit: int | None, torch_too: bool = True) -> None:
    from chatspot_edge.evaluation import evaluate_path
    from chatspot_edge.export import export_bundle
    from chatspot_edge.quantize import quantize_bundle

    for name in variants:
        d = out / name
        bundle = d / "bundle"
        if not (bundle / "manifest.json").is_file():
            export_bundle(d / "ckpt", bundle, llm_dtype="f16")
        manifest = json.loads((bundle / "manifest.json").read_text())
        if "Q4_K_M" not in json.dumps(manifest.get("llm_variants") or {}):
            quantize_bundle(bundle, llm="q4_k_m", vision="int8", data=data)
        if not (d / "eval-q4km-int8.json").is_file():
            evaluate_path(bundle, data, d / "eval-q4km-int8.json", limit=limit, llm="Q4_K_M", vision="int8")
        if torch_too and not (d / "eval-torch.json").is_file():
            evaluate_path(d / "ckpt", data, d / "eval-torch.json", limit=limit)


def ttft(data: Path, out: Path, variants: list[str], repeats: int = 5) -> None:
    """Cold and follow-up TTFT of the smol shape of each variant's design (Q4_K_M + int8, 2 threads). Only the
    referring format and the region graph change the prompt and the graphs; position and geometry are
    constants inside the graphs; the training changes leave the shapes alone."""
    from chatspot_edge.benchmarks import run_bench
    from chatspot_edge.export import export_bundle
    from chatspot_edge.model.checkpoint import save_checkpoint
    from chatspot_edge.model.presets import build_preset
    from chatspot_edge.quantize import quantize_bundle
    from chatspot_edge.referring import format_option

    for name in variants:
        d = out / name
        res = d / "ttft-smol.json"
        if res.is_file():
            continue
        o = variant_options(name)
        work = d / "smol-shape"
        shutil.rmtree(work, ignore_errors=True)
        model, tok = build_preset("smol", pretrained=False, design=o["design"],
                                  referring=format_option(o["referring"], o.get("bins")))
        save_checkpoint(model, tok, work / "ckpt")
        export_bundle(work / "ckpt", work / "bundle", llm_dtype="f16")
        quantize_bundle(work / "bundle", llm="q4_k_m", vision="int8", data=data)
        run_bench(work / "bundle", res, variants="Q4_K_M:int8", threads=(2,), repeats=repeats,
                  label=f"smol shape, {name}")
        shutil.rmtree(work, ignore_errors=True)


def _metrics(path: Path) -> dict:
    r = json.loads(path.read_text())
    return {**r["metrics"], **r.get("extra_metrics", {})}


def collect(out: Path, variants: list[str]) -> list[dict]:
    rows = []
    for name in variants:
        d = out / name
        row: dict = {"variant": name, "what": describe_variant(name)}
        if (d / "eval-q4km-int8.json").is_file():
            row["bundle"] = _metrics(d / "eval-q4km-int8.json")
        if (d / "eval-torch.json").is_file():
            row["torch"] = _metrics(d / "eval-torch.json")
        if (d / "train.json").is_file():
            t = json.loads((d / "train.json").read_text())
            row["train"] = {k: t[k] for k in ("steps", "stage1_steps", "batch_size", "seconds")}
            row["train"]["turns"] = max(1, int((t.get("options") or {}).get("turns") or 1))
        if (d / "ttft-smol.json").is_file():
            v = json.loads((d / "ttft-smol.json").read_text())["variants"][0]
            row["ttft"] = {k: v.get(k) for k in ("ttft_cold_ms", "ttft_followup_ms", "bytes")}
        if (d / "bundle" / "manifest.json").is_file():
            m = json.loads((d / "bundle" / "manifest.json").read_text())
            from chatspot_edge.benchmarks.bench import resolve_variants, variant_files

            (v,) = resolve_variants(m, "Q4_K_M:int8")
            row["mini_bundle_bytes"] = sum(variant_files(m, v).values())
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    """Every metric of the Q4_K_M + int8 bundle (%), the checkpoint's own RR / point QA in PyTorch (the bundle's
    parity), the stage-2 samples each variant trained on, smol-shape TTFT and the mini bundle's size."""
    pct = lambda x: "" if x is None else f"{100 * x:.1f}"  # noqa: E731
    head = ("| variant | stage-2 images x questions | " + " | ".join(METRIC_LABELS.values())
            + " | torch RR / point QA | smol cold / follow-up TTFT ms | mini bundle MB |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        b, c, t, tr = r.get("bundle") or {}, r.get("torch") or {}, r.get("ttft") or {}, r.get("train") or {}
        tt = f"{t['ttft_cold_ms']:.0f} / {t['ttft_followup_ms']:.0f}" if t.get("ttft_cold_ms") else ""
        mb = f"{r['mini_bundle_bytes'] / 1e6:.1f}" if r.get("mini_bundle_bytes") else ""
        n = f"{tr['steps'] * tr['batch_size']} x {tr.get('turns', 1)}" if tr.get("steps") else ""
        torch_cell = f"{pct(c.get('region_recognition'))} / {pct(c.get('point_qa'))}" if c else ""
        lines.append(f"| {r['what']} | {n} | " + " | ".join(pct(b.get(k)) for k in METRICS) + f" | {torch_cell} | {tt} | {mb} |")
    return "\n".join(lines)


def plot(rows: list[dict], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    keys = [k for k in METRICS if k not in ("noise_0.2", "hallucination")]
    labels = [METRIC_LABELS[k] for k in keys]
    shown = [r for r in rows if r.get("bundle")]
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=100)
    w = 0.8 / max(1, len(shown))
    for i, r in enumerate(shown):
        ax.bar([j + i * w for j in range(len(keys))], [100 * (r["bundle"].get(k) or 0) for k in keys], w,
               label=r["variant"])
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(keys))], labels)
    ax.set_ylabel("% (test set, Q4_K_M + int8)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    p = folder / "quality-ablation.png"
    fig.savefig(p)
    plt.close(fig)
    return [p]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=("train", "eval", "ttft", "report"))
    ap.add_argument("--data", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--stage1-steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--no-torch", action="store_true", help="eval: skip the checkpoint's own evaluation in PyTorch")
    ap.add_argument("--md", type=Path)
    ap.add_argument("--plots", type=Path)
    a = ap.parse_args(argv)
    variants = _variants(a.variants)
    if a.cmd in ("train", "eval", "ttft") and a.data is None:
        ap.error("--data is required")
    if a.cmd == "train":
        train(a.data, a.out, variants, a.steps, a.stage1_steps, a.batch_size, a.max_tokens)
    elif a.cmd == "eval":
        evaluate(a.data, a.out, variants, a.limit, torch_too=not a.no_torch)
    elif a.cmd == "ttft":
        ttft(a.data, a.out, variants)
    else:
        rows = collect(a.out, variants)
        text = markdown(rows)
        print(text)
        if a.md:
            atomic_write_text(a.md, text + "\n")
        if a.plots:
            for p in plot(rows, a.plots):
                print(f"wrote {p}", file=sys.stderr)
        atomic_write_text(a.out / "ablation.json", json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
