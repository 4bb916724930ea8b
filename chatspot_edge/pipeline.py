"""The whole pipeline end to end (what `make demo` runs): data -> adapt -> eval -> export -> ask -> table.

Each step writes its output atomically and is skipped when that output already exists, so an interrupted
`make demo` picks up where it stopped.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from chatspot_edge.errors import InputError


def _step(name: str) -> None:
    print(f"\n== {name} " + "=" * max(0, 70 - len(name)), file=sys.stderr, flush=True)


def run_pipeline(preset: str = "mini", out: Path = Path("runs/demo"), minutes: float | None = None,
                 n_train: int = 10000, n_test: int = 1000, seed: int = 0) -> dict:
    from chatspot_edge.data import generate, load_image, load_split
    from chatspot_edge.evaluation import evaluate_path
    from chatspot_edge.progress import task_progress
    from chatspot_edge.train.adapt import AdaptOptions, adapt

    if preset not in ("mini", "smol", "tiny"):
        raise InputError(f"unknown preset {preset!r}")
    out = Path(out)
    data, ckpt, bundle = out / "spotworld", out / f"{preset}-ckpt", out / f"{preset}-bundle"
    timings: dict[str, float] = {}

    _step(f"1. SpotWorld data: {n_train} train / {n_test} test")
    t = time.perf_counter()
    with task_progress("spotworld") as progress:
        generate(data, seed=seed, n_train=n_train, n_test=n_test, progress=progress)
    timings["data_s"] = time.perf_counter() - t

    _step(f"2. adapt {preset} (two-stage referring-instruction tuning)")
    t = time.perf_counter()
    if not (ckpt / "config.json").is_file():
        adapt(AdaptOptions(preset=preset, data=data, out=ckpt, minutes=minutes, eval_every=0, resume=True, seed=seed))
    else:
        print(f"{ckpt} exists: skipped", file=sys.stderr)
    timings["adapt_s"] = time.perf_counter() - t

    _step("3. evaluate the checkpoint (SPEC section 6)")
    t = time.perf_counter()
    eval_json = out / f"{preset}-eval.json"
    if not eval_json.is_file():
        evaluate_path(ckpt, data, eval_json)
    result = json.loads(eval_json.read_text())
    timings["eval_s"] = time.perf_counter() - t

    _step("4. one box question on a test image")
    from chatspot_edge.evaluation.answerers import TorchAnswerer
    from chatspot_edge.evaluation.protocol import Request
    from chatspot_edge.model.checkpoint import load_checkpoint

    model, tok = load_checkpoint(ckpt)
    answerer = TorchAnswerer(model, tok)
    tests = [r for r in load_split(data, "test") if r.get("task") == "region_recognition"
             and (r.get("region") or {}).get("kind") == "box"][:5]
    answers = answerer.answer([Request(lambda r=r: load_image(data, r), r["id"], r["conversations"][0]["value"])
                               for r in tests])
    rows = [(r["id"], r["conversations"][0]["value"].split("\n", 1)[1], a, r["conversations"][1]["value"])
            for r, a in zip(tests, answers)]

    bundle_info = None
    try:
        from chatspot_edge.export import export_bundle
    except ImportError:
        export_bundle = None
    if export_bundle is not None:
        _step("5. export the bundle (GGUF + ONNX)")
        t = time.perf_counter()
        if not (bundle / "manifest.json").is_file():
            export_bundle(ckpt, bundle)
        timings["export_s"] = time.perf_counter() - t
        manifest = json.loads((bundle / "manifest.json").read_text())
        bundle_info = {name: f["bytes"] for name, f in manifest["files"].items()}

    _print_table(preset, result, rows, timings, bundle_info)
    return {"eval": result, "timings": timings}


def _print_table(preset: str, result: dict, rows: list, timings: dict, bundle_info: dict | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    t = Table(title=f"{preset}: box questions on test images (torch checkpoint, greedy)")
    for c in ("id", "question", "answer", "label"):
        t.add_column(c)
    for r in rows:
        t.add_row(*r)
    console.print(t)
    m = Table(title=f"{preset}: SpotWorld test metrics (n={result['n']})")
    m.add_column("metric")
    m.add_column("value", justify="right")
    for k, v in {**result["metrics"], **result.get("extra_metrics", {})}.items():
        m.add_row(k, "-" if v is None else f"{100 * v:.1f}%")
    console.print(m)
    s = Table(title="time per stage")
    s.add_column("stage")
    s.add_column("seconds", justify="right")
    for k, v in timings.items():
        s.add_row(k, f"{v:.1f}")
    if bundle_info:
        for name, size in bundle_info.items():
            s.add_row(f"bundle file {name}", f"{size / 1e6:.1f} MB")
    console.print(s)
