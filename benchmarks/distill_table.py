"""The distillation figures: teacher, pruned student (no recovery), cross-entropy-only and distilled students at
the same step budget, on every SPEC-6 metric, size and speed; checked against the issue's targets.

    python -m chatspot_edge.benchmarks.distill_table --teacher CKPT --data DIR --work DIR --steps S \\
        [--stages train,eval,export,bench,table] [--limit N] [distill options after --]

Stages (each skips what its outputs already hold, so a stopped run continues where it stopped):
- train:  `chatspot-edge distill` twice from ONE pruned student: WORK/kd (the defaults: KD + CE) then WORK/ce
          (`--kd-weight 0`); the pruned student is WORK/kd.pruned;
- eval:   `chatspot-edge eval` (SPEC section 6, PyTorch) of teacher, pruned, ce and kd on the test split;
- export: bundles of the teacher and the distilled student with a Q4_K_M variant (the pruned and CE-only
          students have the distilled one's shapes, so its size and speed);
- bench:  `chatspot-edge bench BUNDLE --variants Q4_K_M` for both (fresh worker processes; run this stage
          alone on a quiet machine: its timings are the figures);
- table:  WORK/distill-table.md (Markdown table + targets) and WORK/distill-table.json.
Every stage runs the project's own commands in a subprocess, the way their users run them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
from pathlib import Path

from chatspot_edge.files import atomic_write_text

STAGES = ("train", "eval", "export", "bench", "table")
METRICS = ("region_recognition", "point_qa", "region_ocr", "grounding", "noise_0.1", "noise_0.2", "noise_0.3",
           "hallucination")
LOWER_IS_BETTER = ("hallucination",)
VARIANT = "Q4_K_M"


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "chatspot_edge.cli", *args]
    print("+ chatspot-edge " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def models(work: Path, teacher: Path) -> dict[str, Path]:
    return {"teacher": teacher, "pruned": work / "kd.pruned", "ce": work / "ce", "kd": work / "kd"}


def train(teacher: Path, data: Path, work: Path, steps: int, extra: list[str]) -> None:
    common = ["--teacher", str(teacher), "--data", str(data), "--steps", str(steps), "--resume", *extra]
    if not (work / "kd" / "config.json").is_file():
        _cli("distill", "--out", str(work / "kd"), *common)
    if not (work / "ce" / "config.json").is_file():
        _cli("distill", "--out", str(work / "ce"), "--student", str(work / "kd.pruned"), "--kd-weight", "0", *common)


def evaluate(teacher: Path, data: Path, work: Path, limit: int | None) -> None:
    for name, ckpt in models(work, teacher).items():
        out = work / f"eval-{name}.json"
        if not out.is_file():
            _cli("eval", str(ckpt), "--data", str(data), "--out", str(out), *(["--limit", str(limit)] if limit else []))


def export(teacher: Path, data: Path, work: Path) -> None:
    for name, ckpt in (("teacher", teacher), ("kd", work / "kd")):
        bundle = work / f"bundle-{name}"
        if not (bundle / "manifest.json").is_file():
            _cli("export", str(ckpt), "--out", str(bundle))
        _cli("quantize", str(bundle), "--llm", VARIANT.lower(), "--data", str(data))


def bench(work: Path, repeats: int) -> None:
    for name in ("teacher", "kd"):
        out = work / f"bench-{name}.json"
        if not out.is_file():
            _cli("bench", str(work / f"bundle-{name}"), "--out", str(out), "--variants", VARIANT,
                 "--repeats", str(repeats))


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def table(teacher: Path, work: Path) -> dict:
    """The figures and the targets (each with its measured value), from what the other stages wrote."""
    prune = json.loads((work / "kd.pruned" / "prune.json").read_text())
    s = prune["summary"]
    rows = {}
    for name, ckpt in models(work, teacher).items():
        cfg = json.loads((ckpt / "config.json").read_text())
        ev = _load(work / f"eval-{name}.json")
        speed_of = "teacher" if name == "teacher" else "kd"
        b = _load(work / f"bench-{speed_of}.json")
        v = next((x for x in (b or {}).get("variants", []) if x.get("llm") == VARIANT and not x.get("error")), None)
        adapt = (cfg.get("provenance") or {}).get("adapt") or {}
        params = s["teacher_non_embedding_params"] if name == "teacher" else s["non_embedding_params"]
        rows[name] = {
            "llm_non_embedding_params": params,
            "metrics": (ev or {}).get("metrics"), "n": (ev or {}).get("n"),
            "bundle_mb": v["bytes"] / 1e6 if v else None,
            "decode_tok_s": v.get("decode_tok_s") if v else None,
            "ttft_cold_ms": v.get("ttft_cold_ms") if v else None,
            "ttft_followup_ms": v.get("ttft_followup_ms") if v else None,
            "train_steps": adapt.get("stage2_steps") if name in ("ce", "kd") else None,
            "train_seconds": adapt.get("train_seconds") if name != "pruned" else prune.get("seconds"),
        }
    targets = []
    t, kd, ce = rows["teacher"], rows["kd"], rows["ce"]
    targets.append({"name": "student <= 50% of the teacher's non-embedding LLM parameters", "value": s["ratio"],
                    "pass": s["ratio"] <= 0.5})
    if t["metrics"] and kd["metrics"]:
        for k in METRICS:
            tv, sv = t["metrics"].get(k), kd["metrics"].get(k)
            if k in LOWER_IS_BETTER or tv is None or sv is None or tv < 0.5:
                continue
            targets.append({"name": f"{k}: distilled >= 95% of the teacher's ({tv:.1%})", "value": sv / tv,
                            "pass": sv >= 0.95 * tv})
    if kd["metrics"] and ce["metrics"]:
        d = 100 * (kd["metrics"]["region_recognition"] - ce["metrics"]["region_recognition"])
        targets.append({"name": "region recognition: KD - CE-only >= 3 points at equal steps", "value": d,
                        "pass": d >= 3})
    if t["decode_tok_s"] and kd["decode_tok_s"]:
        r = kd["decode_tok_s"] / t["decode_tok_s"]
        targets.append({"name": f"{VARIANT} decode >= 1.7x the teacher's", "value": r, "pass": r >= 1.7})
        r = kd["ttft_cold_ms"] / t["ttft_cold_ms"]
        targets.append({"name": f"{VARIANT} cold TTFT <= 0.6x the teacher's", "value": r, "pass": r <= 0.6})
    machine = ((_load(work / "bench-kd.json") or {}).get("machine") or {})
    if not machine:  # no bench stage: the machine that trained and evaluated (this one)
        from chatspot_edge.benchmarks.machine import machine_label

        machine = {"label": machine_label()}
    result = {"date": _dt.date.today().isoformat(), "machine": machine.get("label") or machine.get("cpu"),
              "teacher": str(teacher), "plan": s, "rows": rows, "targets": targets}
    atomic_write_text(work / "distill-table.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(work / "distill-table.md", markdown(result))
    return result


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(result: dict) -> str:
    s = result["plan"]
    head = ["model", "LLM params (non-emb.)", f"bundle MB ({VARIANT})", *METRICS, "decode tok/s", "cold TTFT ms",
            "follow-up TTFT ms", "training"]
    lines = [f"Teacher `{result['teacher']}`; student: {s['n_layers']} of the teacher's blocks {s['blocks']}, FFN "
             f"{s['ffn']}, {s['n_head']} / {s['n_head_kv']} heads ({s['ratio']:.1%} of the teacher's non-embedding "
             f"LLM parameters). {result['machine']}, {result['date']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = {"teacher": "teacher", "pruned": "pruned, no recovery", "ce": "CE only", "kd": "distilled (KD + CE)"}
    for key, label in names.items():
        r = result["rows"][key]
        m = r["metrics"] or {}
        train = "-"
        if r["train_seconds"] is not None:
            train = f"{r['train_seconds'] / 60:.1f} min" + (f", {r['train_steps']} steps" if r["train_steps"] else "")
            if key == "pruned":
                train = f"importance + pruning {r['train_seconds'] / 60:.1f} min"
        lines.append("| " + " | ".join([label, f"{r['llm_non_embedding_params'] / 1e6:.2f} M", _num(r["bundle_mb"]),
                                         *[_pct(m.get(k)) for k in METRICS], _num(r["decode_tok_s"]),
                                         _num(r["ttft_cold_ms"]), _num(r["ttft_followup_ms"]), train]) + " |")
    lines += ["", "| target | measured | |", "|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['name']} | {t['value']:.3g} | {'met' if t['pass'] else 'MISSED'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps of each student (the same budget)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--limit", type=int, help="evaluate the first N test records only")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("extra", nargs="*", help="options passed to both distill runs (after --)")
    a = ap.parse_args()
    stages = [x for x in a.stages.split(",") if x]
    unknown = set(stages) - set(STAGES)
    if unknown:
        ap.error(f"unknown stages {sorted(unknown)}")
    a.work.mkdir(parents=True, exist_ok=True)
    if "train" in stages:
        train(a.teacher, a.data, a.work, a.steps, a.extra)
    if "eval" in stages:
        evaluate(a.teacher, a.data, a.work, a.limit)
    if "export" in stages:
        export(a.teacher, a.data, a.work)
    if "bench" in stages:
        bench(a.work, a.repeats)
    if "table" in stages:
        print(markdown(table(a.teacher, a.work)))


if __name__ == "__main__":
    main()
