#!/usr/bin/env python
"""GPU reference benchmark, end to end, in one command (under 5 minutes on an H100 / H200):

    python benchmarks/gpu_reference.py OUT_DIR [--preset smol] [--device auto|cuda|cpu] [--tokens 64]

Builds the ChatSpot model of a preset's SHAPE from constants with random weights (SmolLM2-135M llama +
EfficientNet-Lite0 stride 16 -> 7x7 = 49 image tokens + the LLaVA projector 112 -> 576 -> 576), then times
vision + projector, TTFT (vision + prefill + first token) and greedy decode, in fp32 and bf16, eager and
with the static-cache compiled `generate` (CUDA; eager runs first, then static bf16, then static fp32, each
skipped once `--budget` seconds have passed). TF32 is off, so fp32 means fp32. Writes OUT_DIR/gpu_reference.json in the benchmark JSON
format (SPEC section 7: `machine`, `bundle` null, `variants` empty, `reference`), rewritten after every run
so a run cut short still leaves its results; `chatspot-edge bench report` merges it with the edge runs.

Needs only torch + transformers (+ numpy) and this repository, which need not be installed: the
`chatspot_edge.<folder>` packages are mapped onto the repository's folders here. Without
`efficientnet_lite_pytorch` the vision part is skipped (`vision_ms` null, `vision_note` says why);
CHATSPOT_BENCH_NO_VISION=1 forces that.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# the script's own folder on sys.path would shadow top-level modules with this folder's file names
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def _bootstrap() -> str:
    """Make `chatspot_edge.model` / `chatspot_edge.benchmarks` importable; returns how."""
    try:
        import chatspot_edge.benchmarks.reference  # noqa: F401 - installed (pip install -e .)

        return "installed"
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "chatspot_edge" or m.startswith("chatspot_edge.")]:
        del sys.modules[name]
    sys.path.insert(0, str(ROOT))
    import chatspot_edge

    chatspot_edge.__path__.append(str(ROOT))  # chatspot_edge.<folder> -> <repo>/<folder>, as pyproject maps it
    return "repository folders"


def gpu_rates(torch) -> dict:
    """Device memory copy bandwidth and matmul rates of GPU 0 (quick; the bounds of the GPU reference)."""
    out = {}
    dev = torch.device("cuda")
    x = torch.empty(1 << 28, dtype=torch.float32, device=dev)  # 1 GiB
    y = torch.empty_like(x)
    y.copy_(x)
    best = float("inf")
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y.copy_(x)
        e.record()
        torch.cuda.synchronize()
        best = min(best, s.elapsed_time(e) / 1e3)
    out["copy_bandwidth_gbs"] = round(2 * x.nbytes / best / 1e9, 1)
    del x, y
    out["matmul_gflops"] = {}
    for name, dtype, n in (("bf16", torch.bfloat16, 8192), ("fp32", torch.float32, 4096)):
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(3):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            torch.cuda.synchronize()
            best = min(best, s.elapsed_time(e) / 1e3)
        out["matmul_gflops"][name] = round(2 * n ** 3 / best / 1e9, 1)
    out["notes"] = "copy counts read + written bytes (1 GiB fp32); matmul best of 3 (bf16 8192^3, fp32 4096^3, TF32 off)"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--preset", default="smol", choices=("tiny", "mini", "smol"), help="model shape (default smol)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: cuda when available")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens decoded per timed run")
    ap.add_argument("--n-text", type=int, default=55,
                    help="text tokens of the prompt besides the image tokens (the edge cold prompt: ~55 for smol)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--static", dest="static", action="store_true", default=None,
                    help="also time the static-cache generate path (default: on CUDA only)")
    ap.add_argument("--no-static", dest="static", action="store_false")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds after which remaining runs are skipped")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (--device cpu)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    how = _bootstrap()

    import torch

    from chatspot_edge.benchmarks.reference import bench_reference, build_random, shape_config, write_json

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
        torch.backends.cudnn.allow_tf32 = False
    out_path = args.out_dir / "gpu_reference.json"
    try:
        from chatspot_edge.benchmarks.machine import machine_info

        machine = machine_info()
    except ImportError as e:  # numpy absent: the essentials by hand
        import platform

        machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "os": platform.platform(), "python": platform.python_version(), "note": str(e)}
    machine["libraries"] = {**machine.get("libraries", {}), "torch": torch.__version__}
    try:
        import transformers

        machine["libraries"]["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        machine["gpu"] = {"name": p.name, "memory_bytes": int(p.total_memory), "capability": f"{p.major}.{p.minor}",
                          "cuda": torch.version.cuda, "count": torch.cuda.device_count()}
        machine["label"] = f"{p.name} (PyTorch)"
        try:
            machine["gpu_rates"] = gpu_rates(torch)
        except Exception as e:  # noqa: BLE001 - the rates are extras
            machine["gpu_rates"] = {"error": str(e)}
    else:
        machine["label"] = f"{machine.get('cpu', 'CPU')} (PyTorch)"
    machine["imports"] = how
    cfg = shape_config(args.preset)
    model, reason = build_random(cfg)
    info = {"weights": "random-like", "preset": args.preset, "vision_note": reason}
    n_params = model.num_parameters()
    result = {"machine": machine, "bundle": None, "variants": [], "reference": None, "kind": "gpu-reference",
              "preset": args.preset, "parameters": n_params}

    def save(ref):
        result["reference"] = ref
        result["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(out_path, result)

    print(f"gpu_reference: preset {args.preset} ({n_params['total'] / 1e6:.1f} M params), device {device}, "
          f"imports from {how}" + (f"; {reason}" if reason else ""), flush=True)
    ref = bench_reference(model, device=device, dtypes=tuple(d.strip() for d in args.dtypes.split(",") if d.strip()),
                          n_text=args.n_text, new_tokens=args.tokens, repeats=args.repeats, static=args.static,
                          threads=args.threads, info=info, log=lambda s: print(s, flush=True), on_run=save,
                          deadline=t0 + args.budget)
    save(ref)
    print(f"wrote {out_path} ({result['seconds']} s): {ref['dtype']} {ref['path']}: vision "
          f"{ref['vision_ms'] if ref['vision_ms'] is None else round(ref['vision_ms'], 2)} ms, ttft "
          f"{ref['ttft_ms'] and round(ref['ttft_ms'], 2)} ms, decode {ref['decode_tok_s'] and round(ref['decode_tok_s'], 1)} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
