"""Do x86 and aarch64 give the same answers? `chatspot-edge ask` (greedy) on x86 and under qemu-aarch64 (arm64
Python user land + arm64 wheels + the cross-built llama.cpp, `make native-arm64`) for a fixed list of point,
box and polygon questions from a SpotWorld test split, per bundle variant.

    python -m chatspot_edge.evaluation.arm64_equality BUNDLE --data DIR --per-kind 4 \\
        --variants Q4_0:int8,Q4_K_M:int8 --out equality.json

Writes JSON (every question, both answers, equal or not) and prints a Markdown table. The seconds each side
took are recorded to size CI, never as phone speed: qemu translates every instruction.

`--diagnose` traces every differing answer through the runtime on both sides (`evaluation.answer_trace`: the
pixels, crops, image and region embeddings, the logits before each token) and says where they part: which stages
are bit-identical, how far the logits are apart, at which token the greedy choice differs and how close x86's
top two were there; and, for scale, how far x86's own logits move when its image embeddings change by one part
in 10^7 (a rounding-sized change).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from chatspot_edge.arm64 import ARCHES, DEFAULT_ARCH, Arm64, source_tree
from chatspot_edge.errors import InputError

KINDS = ("point", "box", "polygon")
_BOX = re.compile(r"<box>\[[^\]]*\]</box>")


def questions(data: Path, per_kind: int, split: str = "test") -> list[dict[str, Any]]:
    """The first `per_kind` records of each region kind: question text with the region as {region}, pixels."""
    path = Path(data) / f"{split}.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: no such file (a SpotWorld folder has {split}.jsonl)")
    out: list[dict[str, Any]] = []
    count = dict.fromkeys(KINDS, 0)
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            region = rec.get("region") or {}
            kind = region.get("kind")
            if kind not in count or count[kind] >= per_kind:
                continue
            text = rec["conversations"][0]["value"].replace("<image>", "").strip()
            if len(_BOX.findall(text)) != 1:
                continue
            count[kind] += 1
            out.append({"id": rec["id"], "image": str(Path(data) / rec["image"]), "kind": kind,
                        "question": _BOX.sub("{region}", text),
                        "region": ",".join(f"{v:g}" for v in region["pixels"]), "reference": rec["conversations"][1]["value"]})
            if all(c >= per_kind for c in count.values()):
                break
    return out


def _ask_args(bundle: Path, q: dict, llm: str, vision: str, max_tokens: int, threads: int) -> list[str]:
    return ["-m", "chatspot_edge.cli", "ask", str(bundle), q["image"], q["question"], f"--{q['kind']}", q["region"],
            "--llm", llm, "--vision", vision, "--max-tokens", str(max_tokens), "--threads", str(threads)]


def run(bundle: Path, data: Path, variants: list[tuple[str, str]], per_kind: int = 4, max_tokens: int = 32,
        threads: int = 2, arch: str = DEFAULT_ARCH, log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    parts = Arm64.locate(arch)
    if parts is None:
        raise InputError(f"the aarch64 pieces for {arch} are not built: run `make native-arm64`")
    qs = questions(data, per_kind)
    rows = []
    with tempfile.TemporaryDirectory() as src:
        env = parts.env(source_tree(Path(src)))
        for llm, vision in variants:
            for q in qs:
                args = _ask_args(bundle, q, llm, vision, max_tokens, threads)
                t = time.perf_counter()
                x86 = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
                t_x86 = time.perf_counter() - t
                t = time.perf_counter()
                arm = subprocess.run(parts.python(args), env=env, capture_output=True, text=True, timeout=1800)
                t_arm = time.perf_counter() - t
                for side, r in (("x86", x86), ("aarch64", arm)):
                    if r.returncode != 0:
                        raise RuntimeError(f"{side} ask failed ({q['id']}, {llm}:{vision}): {r.stderr.strip()[-500:]}")
                row = {**q, "llm": llm, "vision": vision, "x86": x86.stdout.strip(), "aarch64": arm.stdout.strip(),
                       "equal": x86.stdout == arm.stdout, "x86_s": round(t_x86, 2), "qemu_s": round(t_arm, 2)}
                rows.append(row)
                log(f"{llm}:{vision} {q['kind']:>7} {q['id']}: {'equal' if row['equal'] else 'DIFFERENT'} "
                    f"({row['x86']!r}{'' if row['equal'] else ' vs ' + repr(row['aarch64'])})")
    return {"bundle": str(bundle), "data": str(data), "arch": arch, "qemu_cpu": ARCHES[arch],
            "build": parts.info()["build"], "settings": {"per_kind": per_kind, "max_tokens": max_tokens,
                                                         "threads": threads, "temperature": 0.0},
            "equal": sum(r["equal"] for r in rows), "n": len(rows), "rows": rows,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def diagnose(result: dict, arch: str = DEFAULT_ARCH, perturb: float = 1e-7,
             log=lambda s: print(s, file=sys.stderr, flush=True)) -> None:
    """Adds `diagnosis` to every differing row of `result` (see the module docstring)."""
    from chatspot_edge.evaluation.answer_trace import compare
    from chatspot_edge.referring import parse_numbers

    parts = Arm64.locate(arch)
    bundle = result["bundle"]
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as src:
        env = parts.env(source_tree(Path(src)))
        for i, r in enumerate(x for x in result["rows"] if not x["equal"]):
            q = json.dumps([r["question"], r["kind"], parse_numbers(r["region"], r["kind"])])  # as `ask --KIND` reads it
            traces = {}
            for side, extra in (("x86", []), ("aarch64", []), ("x86_perturbed", ["--perturb", str(perturb)])):
                out = Path(tmp) / f"{i}-{side}.npz"
                args = ["-m", "chatspot_edge.evaluation.answer_trace", bundle, r["image"], q, str(out), "--llm", r["llm"],
                        "--vision", r["vision"], "--max-tokens", str(result["settings"]["max_tokens"]),
                        "--threads", str(result["settings"]["threads"]), *extra]
                cmd = parts.python(args) if side == "aarch64" else [sys.executable, *args]
                p = subprocess.run(cmd, env=env if side == "aarch64" else None, capture_output=True, text=True,
                                   timeout=1800)
                if p.returncode != 0:
                    raise RuntimeError(f"{side} trace failed ({r['id']}): {p.stderr.strip()[-500:]}")
                with np.load(out) as z:
                    traces[side] = {k: z[k] for k in z.files}
            r["diagnosis"] = {"cross_isa": compare(traces["x86"], traces["aarch64"]),
                              "x86_perturbed": {"eps": perturb, **compare(traces["x86"], traces["x86_perturbed"])}}
            d = r["diagnosis"]["cross_isa"]
            log(f"{r['llm']}:{r['vision']} {r['id']}: diverges at token {d['diverging_step']} (x86 top-2 margin "
                f"{d.get('top2_margin_at_divergence', float('nan')):.3f}), logits apart by {d['logit_max_abs_diff']:.3f}")


def diagnosis_markdown(result: dict) -> str:
    rows = [r for r in result["rows"] if "diagnosis" in r]
    if not rows:
        return ""
    out = ["| variant | record | bit-identical stages | image embeds rel. diff | logits apart (max) | diverges at token | "
           "x86 top-2 margin there | x86 vs x86 with embeds x (1 + 1e-7 noise): logits apart |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        d, p = r["diagnosis"]["cross_isa"], r["diagnosis"]["x86_perturbed"]
        same = ", ".join(k for k, v in d["stages"].items() if v["identical"]) or "none"
        emb = d["stages"].get("image_embeds", {}).get("rel_to_spread", float("nan"))
        margin = d.get("top2_margin_at_divergence")
        out.append(f"| {r['llm']} + {r['vision']} | {r['id']} | {same} | {emb:.1e} | {d['logit_max_abs_diff']:.3f} | "
                   f"{d['diverging_step']} | {'-' if margin is None else f'{margin:.3f}'} | {p['logit_max_abs_diff']:.3f} |")
    return "\n".join(out)


def markdown(result: dict) -> str:
    out = [f"{result['equal']} of {result['n']} answers identical (x86 vs aarch64 under qemu -cpu "
           f"{result['qemu_cpu']}, build -march={result['arch']}, greedy, {result['settings']['max_tokens']} tokens max)",
           "", "| variant | kind | record | question | x86 answer | aarch64 answer | equal |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        q = r["question"].replace("|", "\\|")
        out.append(f"| {r['llm']} + {r['vision']} | {r['kind']} | {r['id']} | {q} | {r['x86']} | "
                   f"{'same' if r['equal'] else r['aarch64']} | {'yes' if r['equal'] else 'NO'} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chatspot_edge.evaluation.arm64_equality", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--data", type=Path, required=True, help="SpotWorld folder (its test split's questions)")
    p.add_argument("--variants", default="Q4_0:int8,Q4_K_M:int8", help="LLM:VISION,...")
    p.add_argument("--per-kind", type=int, default=4, help="questions per region kind (point, box, polygon)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arch", default=DEFAULT_ARCH, choices=list(ARCHES))
    p.add_argument("--out", type=Path, required=True, help="JSON with every answer")
    p.add_argument("--diagnose", action="store_true", help="trace every differing answer on both sides (see above)")
    p.add_argument("--from-json", type=Path, help="diagnose an earlier run's JSON instead of asking again")
    a = p.parse_args(argv)
    try:
        from chatspot_edge.export.manifest import split_variant_pair

        variants = [(llm, vis or "default") for llm, vis in map(split_variant_pair, a.variants.split(",")) if llm]
        result = (json.loads(a.from_json.read_text()) if a.from_json
                  else run(a.bundle, a.data, variants, a.per_kind, a.max_tokens, a.threads, a.arch))
        if a.diagnose:
            diagnose(result, a.arch)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from chatspot_edge.files import atomic_write_text

    atomic_write_text(a.out, json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    if a.diagnose:
        print("\n" + diagnosis_markdown(result))
    return 0 if result["equal"] == result["n"] else 1


if __name__ == "__main__":
    sys.exit(main())
