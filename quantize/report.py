"""Quality report of a bundle's variants: sizes, SPEC-6 accuracy through the runtime, next-token KL against
the torch model, vision embedding cosine and speed, latency; targets, a recommended default, diagnosis.

    quality_report(bundle, out_dir, data=None, checkpoint=None, limit=50)

writes `report.json`, `report.md`, `pareto_size.png` and `pareto_latency.png` into `out_dir` (atomically)
and records `recommended` in the bundle's manifest.

Combinations measured: every LLM (the default full-precision one and each variant) with the fp32 vision
graph, then the best LLM variants (the smallest that keep accuracy and KL, and Q4_K_M) with every other
vision variant. "Total bundle" of a combination = the files a device needs for it: its GGUF, its vision
graph, the region graph (when the model uses region embeddings) and manifest.json.
"""

from __future__ import annotations

import json
import math
import platform
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from chatspot_edge.errors import InputError
from chatspot_edge.export.manifest import MANIFEST, region_graph, verify_bundle, write_manifest
from chatspot_edge.quantize.kl import CLEAR_MARGIN
from chatspot_edge.files import atomic_dir

from chatspot_edge.quantize.llm import (LLM_TYPES, default_threads, gguf_summary, gguf_tensors, n_layers,
                                        quantize_gguf, tensor_errors)

Log = Callable[[str], None]

# the figures (smol): accuracy within 1 point, KL, size, vision speed / cosine, Q8_0 agreement
RR_TOLERANCE = 0.01
KL_MAX = 0.05
TOTAL_MB_MAX = 110.0  # 10^6 bytes
VISION_SPEEDUP_MIN = 1.5
COSINE_MIN = 0.999
Q8_TOP1_MIN = 0.99
ACCURACY_KEY = "region_recognition"
SENSITIVITY_RECORDS = 16  # KL examples per sensitivity GGUF (one per block: keep it cheap)


# -- data ---------------------------------------------------------------------------------------------------------


def _records(data: Path | None, limit: int, seed: int = 0) -> tuple[list[dict], Callable[[dict], Any], str]:
    """Test records + image loader: the dataset folder's test split, or SpotWorld test samples generated in
    memory (seed 0) when no folder is given."""
    if data is not None:
        from chatspot_edge.data import load_image, load_split

        records = load_split(data, "test")[:limit]
        if not records:
            raise InputError(f"{data}: no test records")
        return records, (lambda r: load_image(data, r)), str(data)
    from chatspot_edge.data.spotworld import make_sample

    samples = [make_sample(seed, "test", i) for i in range(limit)]
    images = {s.record["id"]: s.image for s in samples}
    return [s.record for s in samples], (lambda r: images[r["id"]]), f"SpotWorld test split generated in memory (seed {seed})"


# -- runtime accuracy and timings ---------------------------------------------------------------------------------


def _timed_answerer(engine, max_new_tokens: int = 40):
    from chatspot_edge.runtime import BundleAnswerer

    class TimedAnswerer(BundleAnswerer):
        def __init__(self):
            super().__init__(engine=engine, max_new_tokens=max_new_tokens)
            self.timings = []

        def answer(self, requests):
            out = []
            for r in requests:
                s = self._session(r)
                out.append(s.ask_text(r.question, max_tokens=self.max_new_tokens).strip())
                self.timings.append(s.timings)
            return out

    return TimedAnswerer()


def _median(v: Sequence[float]) -> float | None:
    return round(float(statistics.median(v)), 3) if v else None


def _timing_summary(timings) -> dict[str, Any]:
    cold = [t.ttft_ms for t in timings if not t.image_cached and t.vision_ms > 0]
    follow = [t.ttft_ms for t in timings if t.image_cached or t.vision_ms == 0]
    dec = [t.decode_tok_s for t in timings if t.n_generated > 2 and t.decode_ms > 0]
    return {"ttft_cold_ms": _median(cold), "ttft_followup_ms": _median(follow), "decode_tok_s": _median(dec),
            "n_answers": len(timings)}


def _run_eval(bundle: Path, llm: str, vision: str, records, load, threads: int, seed: int) -> dict[str, Any]:
    from chatspot_edge.evaluation import evaluate
    from chatspot_edge.runtime import Engine

    engine = Engine.load(bundle, threads=threads, llm=llm, vision=vision, verify=False)
    try:
        ans = _timed_answerer(engine)
        t = time.perf_counter()
        res = evaluate(ans, records, load, seed=seed)
        out = {"metrics": res["metrics"], "counts": res.get("counts", {}), **_timing_summary(ans.timings),
               "eval_s": round(time.perf_counter() - t, 2)}
    finally:
        engine.close()
    return out


# -- helpers ------------------------------------------------------------------------------------------------------


def _bytes(bundle: Path, manifest: dict, name: str) -> int:
    files = manifest["files"]
    if name in files:
        return int(files[name]["bytes"])
    return sum(int(e["bytes"]) for f, e in files.items() if f.startswith(name.rstrip("/") + "/"))


def _total_bytes(bundle: Path, manifest: dict, llm_entry: dict, vis_entry: dict) -> dict[str, int]:
    parts = {llm_entry["file"]: _bytes(bundle, manifest, llm_entry["file"]),
             vis_entry["file"]: _bytes(bundle, manifest, vis_entry["file"])}
    region = region_graph(manifest, vis_entry)
    if region:
        parts[region] = _bytes(bundle, manifest, region)
    parts[MANIFEST] = (bundle / MANIFEST).stat().st_size
    return parts


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").is_file())):
        raise InputError(f"{out}: exists and is not a quantization report folder (refusing to replace it)")


# -- the report ---------------------------------------------------------------------------------------------------


def quality_report(bundle: str | Path, out: str | Path, data: str | Path | None = None,
                   checkpoint: str | Path | None = None, limit: int = 50, kl_limit: int | None = None,
                   threads: int | None = None, sensitivity: bool = False, recommend: bool = True,
                   timing_runs: int = 20, best: int = 2, seed: int = 0, log: Log = print) -> dict[str, Any]:
    """Measure every variant of `bundle` on `limit` test records (`data`: a SpotWorld / LLaVA-style folder;
    default: SpotWorld test samples generated in memory) and write the report into `out`. KL needs the torch
    checkpoint (`checkpoint`, default: the one the manifest's provenance names) and uses the first `kl_limit`
    records (default min(limit, 64)). `best`: how many LLM variants are also measured with each non-fp32
    vision variant. `sensitivity`: per-layer sensitivity of Q4_K_M (one block quantized at a time) and of the
    int8 vision graph (one layer at a time). `recommend`: record `recommended` in the bundle's manifest."""
    bundle, out = Path(bundle), Path(out)
    data = Path(data) if data is not None else None
    if limit < 1:
        raise InputError("--limit must be at least 1")
    _check_out(out)
    t_start = time.perf_counter()
    manifest = verify_bundle(bundle)
    threads = int(threads or min(2, default_threads()))
    records, load, data_desc = _records(data, limit, seed)
    st = manifest.get("special_tokens") or {}
    region_token = bool(manifest["referring"].get("region_token"))
    base_llm_key = str(manifest["llm"]["quant"])
    llms: dict[str, dict] = {base_llm_key: manifest["llm"], **(manifest.get("llm_variants") or {})}
    visions: dict[str, dict] = {"fp32": manifest["vision"], **(manifest.get("vision_variants") or {})}
    report: dict[str, Any] = {
        "bundle": str(bundle.resolve()), "data": data_desc, "limit": len(records), "threads": threads,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": default_threads()},
        "definitions": {
            "total_bytes": "files a device needs for the combination: its GGUF + its vision graph + region graph "
                           "(when region embeddings are used) + manifest.json; MB = 10^6 bytes",
            "bits_per_weight": "8 x GGUF tensor bytes / parameter count (all tensors)",
            "kl": "teacher-forced next-token KL(torch fp32 || llama.cpp) at the reference answer's positions, "
                  "llama.cpp with F32 KV cache; image / region embeddings from the combination's ONNX graphs",
            "cosine": "per-token cosine of image_embeds vs the fp32 ONNX graph, mean over images (min: worst image)",
            "accuracy": "SPEC-6 metrics through the runtime (Engine + BundleAnswerer, F16 KV cache, greedy)",
            "timings": "medians over the evaluation's answers (Session.timings); cold = first question on an image "
                       "(vision + prefill), noisy on a shared machine",
        },
    }

    # vision: size, speed, cosine on the evaluation images
    from chatspot_edge.model.preprocess import resize_pixels
    from chatspot_edge.quantize.vision import compare

    size = (int(manifest["image"]["height"]), int(manifest["image"]["width"]))
    resize = manifest["image"].get("resize", "bicubic")
    seen, images = set(), []
    for r in records:
        if r["image"] not in seen and len(images) < 16:
            seen.add(r["image"])
            images.append(resize_pixels(load(r), size, resize))
    log(f"vision: {len(visions)} graphs on {len(images)} images")
    vm = compare(bundle / visions["fp32"]["file"], {k: bundle / e["file"] for k, e in visions.items() if k != "fp32"},
                 images, threads, timing_runs)
    report["vision"] = {k: {"file": e["file"], "bytes": _bytes(bundle, manifest, e["file"]),
                            "method": e.get("method"), **vm[k]} for k, e in visions.items()}
    if "candidates" in visions.get("int8", {}):  # both int8 methods, as measured when the variant was built
        report["vision"]["int8"]["candidates"] = visions["int8"]["candidates"]
        report["vision"]["int8"]["why"] = visions["int8"].get("why")
    report["coreml"] = {k: {"file": e["file"], "bytes": _bytes(bundle, manifest, e["file"]),
                            "method": e.get("method"), "note": e.get("note")}
                        for k, e in (manifest.get("coreml_variants") or {}).items()}

    # LLM: sizes, types
    report["llm"] = {}
    for k, e in llms.items():
        base_type = str(e.get("type") or k)  # "Q4_K_M-imatrix" / "Q4_K_M:ffn_down=Q6_K" name their type in `type`
        s = gguf_summary(bundle / e["file"], base_type if base_type in LLM_TYPES else None,
                         tuple((e.get("overrides") or {}).items()))
        report["llm"][k] = {"file": e["file"], "bytes": s["bytes"], "bits_per_weight": s["bits_per_weight"],
                            "parameters": s["parameters"], "tensor_types": s["tensor_types"],
                            "fallback_tensors": len(s.get("fallbacks", {})), "default": k == base_llm_key}

    # KL reference (torch)
    kl_ctx = _kl_context(bundle, manifest, records, load, checkpoint, kl_limit or min(len(records), 64), threads, log)
    report["kl_reference"] = kl_ctx["info"]
    embeds_by_vision: dict[str, list] = {}

    def kl_for(llm_key: str, vis_key: str, gguf: Path | None = None, n: int | None = None) -> dict | None:
        """KL stats of an LLM (or the GGUF `gguf`) with a vision variant, on the first `n` KL examples."""
        if kl_ctx["examples"] is None:
            return None
        from chatspot_edge.quantize.kl import Embedder, variant_kl

        if vis_key not in embeds_by_vision:
            region = bundle / region_graph(manifest, visions[vis_key]) if region_token else None
            emb = Embedder(bundle / visions[vis_key]["file"], region, threads)
            embeds_by_vision[vis_key] = [emb(e) for e in kl_ctx["examples"]]
        n = n or len(kl_ctx["examples"])
        return variant_kl(gguf or bundle / llms[llm_key]["file"], kl_ctx["examples"][:n],
                          embeds_by_vision[vis_key][:n], kl_ctx["reference"][:n], int(st.get("image", -1)),
                          int(st["region"]) if region_token and st.get("region", -1) >= 0 else None, threads)

    for k in llms:
        log(f"KL {k} + fp32 vision")
        kl = kl_for(k, "fp32")
        if kl is not None:
            report["llm"][k].update({f: kl[f] for f in ("kl_mean", "kl_p99", "kl_max", "top1", "n_positions",
                                                         "top1_clear", "near_ties")})

    # combinations: every LLM with fp32 vision, then the best LLMs with each other vision variant
    combos: list[dict] = []

    def run_combo(lk: str, vk: str) -> dict:
        log(f"eval {lk} + {vk} on {len(records)} records")
        parts = _total_bytes(bundle, manifest, llms[lk], visions[vk])
        c = {"llm": lk, "vision": vk, "total_bytes": sum(parts.values()), "files": parts,
             **_run_eval(bundle, lk, vk, records, load, threads, seed)}
        kl = report["llm"][lk] if vk == "fp32" else kl_for(lk, vk)
        if kl is not None:
            c.update({f: kl.get(f) for f in ("kl_mean", "kl_p99", "top1")})
        combos.append(c)
        return c

    for lk in llms:
        run_combo(lk, "fp32")
    base = next(c for c in combos if c["llm"] == base_llm_key and c["vision"] == "fp32")
    best = _best_llms(report, combos, base, base_llm_key, best)
    for vk in visions:
        if vk == "fp32":
            continue
        for lk in best:
            run_combo(lk, vk)
    report["combinations"] = combos
    report["best_llms"] = best

    report["targets"] = _targets(report, combos, base, base_llm_key)
    report["recommended"] = _recommend(report, combos, base, base_llm_key)
    report["diagnosis"] = _diagnose(bundle, manifest, report, llms, kl_ctx, kl_for, sensitivity, threads, log)
    report["seconds"] = round(time.perf_counter() - t_start, 1)

    with atomic_dir(out) as tmp:
        (tmp / "report.json").write_text(json.dumps(_jsonable(report), indent=2) + "\n")
        (tmp / "report.md").write_text(render_markdown(report))
        plot_pareto(report, tmp)
    if recommend:
        m = verify_bundle(bundle)
        m["recommended"] = report["recommended"]
        write_manifest(bundle, m)
        log(f"manifest: recommended {report['recommended']['llm']} + {report['recommended']['vision']}")
    log(f"wrote {out} ({report['seconds']} s)")
    return report


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return x


def _kl_context(bundle: Path, manifest: dict, records, load, checkpoint, n: int, threads: int, log: Log) -> dict:
    ckpt = checkpoint or (manifest["model"].get("provenance") or {}).get("checkpoint")
    if not ckpt or not Path(ckpt).is_dir():
        msg = f"no torch checkpoint ({ckpt or 'none recorded'}): KL skipped (give --checkpoint)"
        log(msg)
        return {"examples": None, "reference": None, "info": {"checkpoint": ckpt, "skipped": msg}}
    import torch

    from chatspot_edge.model.checkpoint import load_checkpoint
    from chatspot_edge.model.processor import Processor
    from chatspot_edge.quantize.kl import build_examples, torch_logprobs

    torch.set_num_threads(threads)
    log(f"KL reference: torch fp32 {ckpt} on {n} records")
    model, tok = load_checkpoint(ckpt)
    size = (int(manifest["image"]["height"]), int(manifest["image"]["width"]))
    examples = build_examples(records[:n], load, Processor(tok, model.config), size,
                              manifest["image"].get("resize", "bicubic"))
    reference = torch_logprobs(model, examples)
    del model
    return {"examples": examples, "reference": reference,
            "info": {"checkpoint": str(ckpt), "records": len(examples),
                     "positions": int(sum(len(e.targets) for e in examples))}}


def _acc(c: dict) -> float | None:
    return (c.get("metrics") or {}).get(ACCURACY_KEY)


def _llm_ok(report: dict, c: dict, base: dict) -> bool:
    kl = report["llm"][c["llm"]].get("kl_mean")
    a, b = _acc(c), _acc(base)
    acc_ok = a is None or b is None or a >= b - RR_TOLERANCE - 1e-9
    return acc_ok and (kl is None or kl <= KL_MAX)


def _best_llms(report: dict, combos: list[dict], base: dict, base_key: str, k: int = 2) -> list[str]:
    fp32 = [c for c in combos if c["vision"] == "fp32" and c["llm"] != base_key]
    ok = sorted([c for c in fp32 if _llm_ok(report, c, base)], key=lambda c: report["llm"][c["llm"]]["bytes"])
    best = [c["llm"] for c in ok[:k]]
    if len(best) < k:  # fill with the most faithful remaining variants
        rest = sorted([c for c in fp32 if c["llm"] not in best],
                      key=lambda c: report["llm"][c["llm"]].get("kl_mean") or 0.0)
        best += [c["llm"] for c in rest[:k - len(best)]]
    if "Q4_K_M" in report["llm"] and "Q4_K_M" not in best:
        best.append("Q4_K_M")
    return best or [base_key]


def _target(name: str, value, op: str, limit, note: str = "") -> dict:
    if value is None:
        return {"name": name, "value": None, "target": f"{op} {limit}", "pass": None, "missed_by": None, "note": note}
    ok = value >= limit if op == ">=" else value <= limit
    missed = 0.0 if ok else (limit - value if op == ">=" else value - limit)
    return {"name": name, "value": value, "target": f"{op} {limit}", "pass": bool(ok),
            "missed_by": None if ok else missed, "note": note}


def _targets(report: dict, combos: list[dict], base: dict, base_key: str) -> list[dict]:
    out = []
    find = lambda lk, vk: next((c for c in combos if c["llm"] == lk and c["vision"] == vk), None)  # noqa: E731
    for k in [k for k in report["llm"] if k == "Q4_K_M" or k.startswith("Q4_K_M:")]:  # and its override recipes
        combo = find(k, "int8")
        if combo is not None and _acc(combo) is not None and _acc(base) is not None:
            out.append(_target(f"{k}+int8 region_recognition vs full precision", _acc(combo), ">=",
                               round(_acc(base) - RR_TOLERANCE, 6),
                               f"full precision ({base_key}+fp32) = {_acc(base):.3f}"))
        out.append(_target(f"{k} mean KL", report["llm"][k].get("kl_mean"), "<=", KL_MAX))
    q4 = find("Q4_K_M", "int8")
    if q4 is not None:
        out.append(_target("Q4_K_M+int8 total bundle MB", q4["total_bytes"] / 1e6, "<=", TOTAL_MB_MAX,
                           " + ".join(f"{k} {v / 1e6:.1f}" for k, v in q4["files"].items())))
    if "int8" in report["vision"]:
        v = report["vision"]["int8"]
        out.append(_target("int8 vision speedup vs fp32 ONNX", v.get("speedup"), ">=", VISION_SPEEDUP_MIN,
                           f"{v.get('ms')} ms vs {report['vision']['fp32'].get('ms')} ms, {report['threads']} threads"))
        out.append(_target("int8 vision embedding cosine (mean)", v.get("cosine_mean"), ">=", COSINE_MIN,
                           f"min over images {v.get('cosine_min')}"))
    if "Q8_0" in report["llm"]:
        q8 = report["llm"]["Q8_0"]
        out.append(_target("Q8_0 top-1 agreement", q8.get("top1"), ">=", Q8_TOP1_MIN,
                           f"{q8.get('n_positions')} positions, {q8.get('near_ties')} of them near-ties (reference "
                           f"top-2 within {CLEAR_MARGIN}); top-1 at the others {_fmt(q8.get('top1_clear'), 4)}"))
    return out


def _recommend(report: dict, combos: list[dict], base: dict, base_key: str) -> dict:
    fp32 = [c for c in combos if c["vision"] == "fp32" and c["llm"] != base_key]
    ok = sorted([c for c in fp32 if _llm_ok(report, c, base)], key=lambda c: report["llm"][c["llm"]]["bytes"])
    if ok:
        llm = ok[0]["llm"]
        r = report["llm"][llm]
        why_llm = (f"{llm}: smallest LLM variant ({r['bytes'] / 1e6:.1f} MB) with {ACCURACY_KEY} within "
                   f"{RR_TOLERANCE * 100:.0f} point of {base_key} ({_fmt(_acc(ok[0]))} vs {_fmt(_acc(base))}) and "
                   f"mean KL {_fmt(r.get('kl_mean'), 4)} <= {KL_MAX}")
    else:
        llm = base_key
        why_llm = (f"{base_key}: no quantized LLM variant kept {ACCURACY_KEY} within {RR_TOLERANCE * 100:.0f} point "
                   f"with mean KL <= {KL_MAX}")
    vis_ok = [(k, v) for k, v in report["vision"].items() if (v.get("cosine_mean") or 0) >= COSINE_MIN]
    vis_ok.sort(key=lambda kv: kv[1].get("ms") or float("inf"))
    vision = vis_ok[0][0] if vis_ok else "fp32"
    v = report["vision"][vision]
    why_vis = (f"{vision}: fastest vision graph ({_fmt(v.get('ms'), 2)} ms) with mean embedding cosine >= {COSINE_MIN}")
    combo = next((c for c in combos if c["llm"] == llm and c["vision"] == vision), None)
    if combo is not None and _acc(combo) is not None and _acc(base) is not None:
        why_vis += f"; together {ACCURACY_KEY} {_acc(combo):.3f} vs {_acc(base):.3f}"
    return {"llm": llm, "vision": vision, "why": f"{why_llm}. {why_vis}.",
            "measured_on": f"{report['limit']} records of {report['data']}"}


def _diagnose(bundle: Path, manifest: dict, report: dict, llms: dict, kl_ctx: dict, kl_for, sensitivity: bool,
              threads: int, log: Log) -> dict:
    """For each missed target: by how much, and which tensors / layers cause it."""
    from chatspot_edge.quantize.variants import source_llm

    out: dict[str, Any] = {}
    missed = [t for t in report["targets"] if t["pass"] is False]
    src = source_llm(manifest)
    llm_missed = any(("Q4_K_M" in t["name"] and "MB" not in t["name"]) or "Q8_0" in t["name"] for t in missed)
    focus = [k for k in ("Q4_K_M", "Q8_0") if k in llms and llm_missed]
    for k in focus:
        errs = tensor_errors(bundle / src["file"], bundle / llms[k]["file"])
        out[f"{k}_tensor_errors"] = errs
    size_missed = [t for t in missed if "MB" in t["name"]]
    if size_missed and "Q4_K_M" in llms:
        by_type: dict[str, int] = {}
        biggest = []
        for t in gguf_tensors(bundle / llms["Q4_K_M"]["file"]):
            by_type[t["type"]] = by_type.get(t["type"], 0) + t["bytes"]
            biggest.append((t["bytes"], t["name"], t["type"]))
        out["Q4_K_M_bytes_by_type"] = dict(sorted(by_type.items(), key=lambda kv: -kv[1]))
        out["Q4_K_M_largest_tensors"] = [{"tensor": n, "type": ty, "bytes": b} for b, n, ty in sorted(biggest)[::-1][:5]]
    if sensitivity:
        target = "Q4_K_M" if "Q4_K_M" in llms else min((k for k in llms if k in LLM_TYPES),
                                                       key=lambda k: report["llm"][k]["bytes"], default=None)
        if target is not None and kl_ctx["examples"] is not None:
            out["llm_sensitivity"] = llm_sensitivity(bundle / src["file"], str(src["quant"]), target, kl_for, threads, log)
        if "int8" in report["vision"]:
            from chatspot_edge.quantize.vision import layer_sensitivity, spotworld_images

            size = (int(manifest["image"]["height"]), int(manifest["image"]["width"]))
            resize = manifest["image"].get("resize", "bicubic")
            work = Path(tempfile.mkdtemp(prefix=".sensitivity-"))
            try:
                out["vision_sensitivity"] = layer_sensitivity(
                    bundle / manifest["vision"]["file"], spotworld_images(16, size, resize, split="train"),
                    spotworld_images(8, size, resize, split="test"), work, threads, log)[:12]
            finally:
                shutil.rmtree(work, ignore_errors=True)
    elif missed:
        out["hint"] = "run with --sensitivity for per-layer sensitivity (one block quantized at a time)"
    return out


def llm_sensitivity(source: Path, source_quant: str, quant: str, kl_for, threads: int, log: Log) -> list[dict]:
    """Mean KL (first SENSITIVITY_RECORDS examples, fp32 vision) when only one group is quantized as `quant`
    (llama.cpp tensor-type overrides keep every other tensor at the source's precision): each block `blk.i`,
    the token embedding / output, and each kind of block matrix across all blocks (`attn_q`, ..., `ffn_down`:
    a kind that loses most everywhere is the one to give more bits with a recipe override). Largest first."""
    keep = source_quant.upper() if source_quant.upper() in ("F32", "F16", "BF16") else "F16"
    tensors = gguf_tensors(source)
    n = n_layers(tensors)
    groups = [(f"blk.{i}", [(rf"^blk\.{j}\.", keep) for j in range(n) if j != i]
               + [(r"^token_embd\.", keep), (r"^output\.", keep)]) for i in range(n)]
    groups.append(("token_embd+output", [(r"^blk\.", keep)]))
    kinds = sorted({m.group(1) for t in tensors if len(t["shape"]) >= 2
                    and (m := re.match(r"^blk\.\d+\.(\w+)\.weight$", t["name"]))})
    for kind in kinds:
        groups.append((f"all {kind}", [(rf"^blk\.\d+\.{other}\.", keep) for other in kinds if other != kind]
                       + [(r"^token_embd\.", keep), (r"^output\.", keep)]))
    work = Path(tempfile.mkdtemp(prefix=".sensitivity-"))
    out = []
    try:
        for k, (name, overrides) in enumerate(groups):
            path = work / "one-group.gguf"
            path.unlink(missing_ok=True)
            quantize_gguf(source, path, quant, threads, overrides)
            kl = kl_for(quant, "fp32", gguf=path, n=SENSITIVITY_RECORDS)
            out.append({"group": name, "kl_mean": kl["kl_mean"], "kl_p99": kl["kl_p99"], "top1": kl["top1"]})
            log(f"  LLM sensitivity {k + 1}/{len(groups)}: only {name} as {quant}: KL {kl['kl_mean']:.5f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.sort(key=lambda r: -(r["kl_mean"] or 0.0))
    return out


# -- output -------------------------------------------------------------------------------------------------------


def render_markdown(r: dict) -> str:
    L = [f"# Quantization report: {Path(r['bundle']).name}", "",
         f"{r['limit']} records of {r['data']}; {r['threads']} threads; {r['machine']['processor']} "
         f"({r['machine']['cpus']} CPUs visible); {r.get('seconds', '-')} s.", ""]
    rec = r["recommended"]
    L += ["## Recommended default", "", f"**LLM {rec['llm']} + vision {rec['vision']}**: {rec['why']}", ""]
    L += ["## Targets", "", "| target | value | needs | pass | missed by | note |", "|---|---|---|---|---|---|"]
    for t in r["targets"]:
        ok = "-" if t["pass"] is None else ("yes" if t["pass"] else "**NO**")
        L.append(f"| {t['name']} | {_fmt(t['value'], 4)} | {t['target']} | {ok} | {_fmt(t['missed_by'], 4)} | {t['note']} |")
    L += ["", "## LLM variants (with fp32 vision)", "",
          "| variant | MB | bits/weight | fallback tensors | KL mean | KL p99 | top-1 | top-1 without near-ties |",
          "|---|---|---|---|---|---|---|---|"]
    for k, v in sorted(r["llm"].items(), key=lambda kv: -kv[1]["bytes"]):
        L.append(f"| {k}{' (default)' if v.get('default') else ''} | {v['bytes'] / 1e6:.1f} | {v['bits_per_weight']:.2f} | "
                 f"{v['fallback_tensors']} | {_fmt(v.get('kl_mean'), 5)} | {_fmt(v.get('kl_p99'), 5)} | {_fmt(v.get('top1'), 4)} | "
                 f"{_fmt(v.get('top1_clear'), 4)} |")
    L += ["", "## Vision variants", "", "| variant | MB | ms | speedup | cosine mean | cosine min | method |",
          "|---|---|---|---|---|---|---|"]
    for k, v in r["vision"].items():
        L.append(f"| {k} | {v['bytes'] / 1e6:.2f} | {_fmt(v.get('ms'), 2)} | {_fmt(v.get('speedup'), 2)} | "
                 f"{_fmt(v.get('cosine_mean'), 5)} | {_fmt(v.get('cosine_min'), 5)} | {v.get('method') or '-'} |")
    cands = r["vision"].get("int8", {}).get("candidates") or {}
    if cands:
        L += ["", f"int8 method: **{r['vision']['int8'].get('method')}** ({r['vision']['int8'].get('why')}); "
                  "both candidates as measured when the variant was built:", "",
              "| int8 method | ms | speedup | cosine mean | cosine min | MB |", "|---|---|---|---|---|---|"]
        for k, c in cands.items():
            L.append(f"| {k} | {_fmt(c.get('ms'), 2)} | {_fmt(c.get('speedup'), 2)} | {_fmt(c.get('cosine_mean'), 5)} | "
                     f"{_fmt(c.get('cosine_min'), 5)} | {c.get('bytes', 0) / 1e6:.2f} |")
    if r.get("coreml"):
        L += ["", "Core ML packages (prediction is macOS-only, not measured here): "
              + ", ".join(f"{k} {v['bytes'] / 1e6:.2f} MB ({v['method']})" for k, v in r["coreml"].items())]
    keys = ["region_recognition", "point_qa", "region_ocr", "grounding", "noise_0.2", "hallucination"]
    L += ["", "## Combinations (SPEC-6 through the runtime)", "",
          "| LLM | vision | total MB | " + " | ".join(keys) + " | KL mean | TTFT cold ms | TTFT follow-up ms | decode tok/s |",
          "|---|---|---|" + "---|" * len(keys) + "---|---|---|---|"]
    for c in r["combinations"]:
        m = c["metrics"]
        L.append(f"| {c['llm']} | {c['vision']} | {c['total_bytes'] / 1e6:.1f} | "
                 + " | ".join(_fmt(m.get(k)) for k in keys)
                 + f" | {_fmt(c.get('kl_mean'), 5)} | {_fmt(c.get('ttft_cold_ms'), 1)} | {_fmt(c.get('ttft_followup_ms'), 1)}"
                 f" | {_fmt(c.get('decode_tok_s'), 1)} |")
    d = r.get("diagnosis") or {}
    if d:
        L += ["", "## Diagnosis", ""]
        for k, v in d.items():
            if k == "hint":
                L.append(f"- {v}")
            elif isinstance(v, list) and v:
                L += [f"### {k}", "", "| " + " | ".join(v[0].keys()) + " |", "|" + "---|" * len(v[0])]
                L += ["| " + " | ".join(_fmt(x, 5) for x in row.values()) + " |" for row in v[:12]]
                L.append("")
            elif isinstance(v, dict):
                L += [f"### {k}", "", ", ".join(f"{a}: {b / 1e6:.1f} MB" if isinstance(b, int) else f"{a}: {b}"
                                                for a, b in v.items()), ""]
    ref = r.get("kl_reference") or {}
    L += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in r["definitions"].items()]
    if ref.get("skipped"):
        L.append(f"- KL: {ref['skipped']}")
    L += ["- Core ML variants (if any) are written and checked on Linux; their prediction needs macOS and is not "
          "measured here.", ""]
    return "\n".join(L)


def _pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (lower x and higher-or-equal y is better), in x order."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -float("inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(r: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = [c for c in r["combinations"] if _acc(c) is not None]
    for fname, xkey, xlabel in (("pareto_size.png", "total_bytes", "total bundle (MB)"),
                                ("pareto_latency.png", "ttft_cold_ms", "time to first token, cold (ms)")):
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
        pts, labels = [], []
        for c in combos:
            x = c.get(xkey)
            if x is None:
                continue
            pts.append((x / 1e6 if xkey == "total_bytes" else x, _acc(c)))
            labels.append(f"{c['llm']}+{c['vision']}")
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=22)
            for p, lab in zip(pts, labels):
                ax.annotate(lab, p, fontsize=7, xytext=(3, 3), textcoords="offset points")
            front = _pareto(pts)
            ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="tab:red",
                    linewidth=1, label="Pareto front")
            ax.legend(fontsize=8, loc="lower right")
        else:
            ax.text(0.5, 0.5, "no measurements", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{ACCURACY_KEY} ({r['limit']} records)")
        ax.set_title(f"{Path(r['bundle']).name}: {'size' if xkey == 'total_bytes' else 'latency'} vs accuracy", fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname)
        plt.close(fig)
