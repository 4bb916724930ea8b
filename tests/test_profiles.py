"""Device classes: budgets, the manifest-only estimate (`bench --dry-run`, `inspect --profile`), a benchmark's
variants judged against a class (`bench --profile`, `bench report`)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from chatspot_edge.benchmarks import profiles
from chatspot_edge.errors import InputError

MB = 1_000_000


def _manifest(gguf_mb: float = 50.0, q4_mb: float = 15.0) -> dict:
    """A smol-shaped manifest (30 layers, 9 heads / 3 KV heads, hidden 576) with made-up file sizes."""
    return {
        "model": {"llm": {"n_layer": 30, "n_head": 9, "n_head_kv": 3, "n_vocab": 49156}},
        "llm": {"file": "llm-f16.gguf", "quant": "F16", "n_embd": 576, "n_ctx": 2048},
        "llm_variants": {"Q4_0": {"file": "llm-q4_0.gguf", "quant": "Q4_0", "n_embd": 576, "n_ctx": 2048}},
        "vision": {"file": "vision.onnx", "precision": "fp32"},
        "referring": {"region_token": True, "graph": "region.onnx"},
        "files": {"llm-f16.gguf": {"bytes": int(gguf_mb * MB)}, "llm-q4_0.gguf": {"bytes": int(q4_mb * MB)},
                  "vision.onnx": {"bytes": 4 * MB}, "region.onnx": {"bytes": 6 * MB}},
    }


def test_kv_bytes_is_layers_times_context_times_kv_width():
    # 2 (K and V) x 30 layers x 1024 positions x 3 KV heads x 64 dims x 2 bytes (f16)
    assert profiles.kv_bytes(_manifest(), 1024) == 2 * 30 * 1024 * 3 * 64 * 2


def test_estimate_adds_the_parts_and_uses_the_class_context():
    dev = profiles.profile("phone-4gb")
    e = profiles.estimate(_manifest(), None, None, dev)
    assert e["n_ctx"] == dev.n_ctx == 1024 and e["threads"] == dev.threads
    want = (profiles.RUNTIME_BASE_MB * MB + 50 * MB + profiles.ONNX_MEMORY_FACTOR * 10 * MB
            + profiles.kv_bytes(_manifest(), 1024)) / MB
    assert e["peak_rss_mb_est"] == pytest.approx(want) and e["fits"] and e["why"] == ""
    q = profiles.estimate(_manifest(), "Q4_0", None, dev)  # repacked copy counted for Q4_0
    assert q["repack_mb"] == pytest.approx(15 * profiles.REPACK_SHARE["Q4_0"])
    laptop = profiles.estimate(_manifest(), None, None, profiles.profile("laptop"))
    assert laptop["n_ctx"] == 2048  # capped by the bundle's own n_ctx


def test_a_large_gguf_fails_the_4gb_phone_and_fits_the_8gb_one():
    m = _manifest(gguf_mb=400.0)
    small, large = profiles.profile("phone-4gb"), profiles.profile("phone-8gb")
    e4 = profiles.estimate(m, "F16", "fp32", small)
    assert not e4["fits"] and "mmap budget" in e4["why"] and "peak RSS" in e4["why"]
    assert profiles.estimate(m, "F16", "fp32", large)["fits"]
    rows = [profiles.estimate(m, lv, vv, small) for lv, vv in profiles.variant_pairs(m)]
    lines = profiles.verdicts(rows)
    assert lines == [f"phone-4gb: runs (1 of 2 variant pairs fit; smallest Q4_0 + fp32, "
                     f"~{rows[1]['peak_rss_mb_est']:.0f} MB peak of 512 MB)"]
    none_fit = profiles.verdicts([r for r in rows if not r["fits"]])
    assert none_fit[0].startswith("phone-4gb: does NOT fit (smallest F16 + fp32:")


def test_unknown_class_and_incomplete_manifest_are_input_errors():
    with pytest.raises(InputError, match="unknown device class 'phone-2gb'"):
        profiles.profile("phone-2gb")
    m = copy.deepcopy(_manifest())
    del m["model"]["llm"]["n_layer"]
    with pytest.raises(InputError, match="n_layer"):
        profiles.estimate(m, None, None, profiles.profile("laptop"))


def test_assess_uses_measured_peak_rss():
    result = {"variants": [
        {"llm": "F16", "vision": "fp32", "threads": 2, "n_ctx": 1024, "peak_rss_mb": 600.0,
         "files": {"llm-f16.gguf": 270 * MB, "vision.onnx": 4 * MB}},
        {"llm": "Q4_0", "vision": "int8", "threads": 2, "n_ctx": 1024, "peak_rss_mb": 300.0,
         "files": {"llm-q4_0.gguf": 92 * MB, "vision-int8.onnx": 1 * MB}},
        {"llm": "Q8_0", "vision": "int8", "threads": 2, "peak_rss_mb": None, "error": "crashed",
         "files": {"llm-q8_0.gguf": 145 * MB}},
    ]}
    rows = profiles.assess(result, profiles.profile("phone-4gb"))
    assert [r["fits"] for r in rows] == [False, True, None]
    assert rows[0]["mmap_mb"] == pytest.approx(270.0)
    assert [r["fits"] for r in profiles.assess(result, profiles.profile("phone-8gb"))] == [True, True, None]
    section = profiles.report_section([{**result, "_label": "box"}])
    assert "## Device classes" in section and "| box | phone-4gb | F16 | fp32 | 2 | 1024 | 600 |" in section
    judged = profiles.report_section([{**result, "_label": "box", "profile": {"name": "laptop"}}])
    assert "| box | laptop |" in judged and "| box | phone-4gb |" not in judged  # a --profile run: its own class


@pytest.fixture(scope="module")
def tiny_bundle(tiny, tmp_path_factory):
    from chatspot_edge.export import export_bundle
    from chatspot_edge.model.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("prof")
    save_checkpoint(*tiny, d / "ck")
    return export_bundle(d / "ck", d / "bundle", llm_dtype="f16")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "chatspot_edge.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_dry_run_and_inspect_answer_from_the_manifest(tiny_bundle):
    r = _cli("bench", tiny_bundle, "--dry-run", "--profile", "phone-4gb")
    assert r.returncode == 0, r.stderr
    assert "| phone-4gb | F16 | fp32 | 1024 |" in r.stdout and "phone-4gb: runs (1 of 1 variant pairs fit" in r.stdout
    r = _cli("bench", tiny_bundle, "--dry-run")
    assert r.returncode == 0 and all(f"{n}: runs" in r.stdout for n in profiles.PROFILES)
    r = _cli("inspect", tiny_bundle, "--profile", "phone-8gb")
    assert r.returncode == 0 and "OK: " in r.stdout and "phone-8gb: runs" in r.stdout
    for args in (["--dry-run", "--profile", "watch"], []):  # unknown class; no --out and no --dry-run
        r = _cli("bench", tiny_bundle, *args)
        assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr, r.stderr


def test_bench_profile_sets_threads_and_context_and_records_the_verdict(tiny_bundle, tmp_path, monkeypatch):
    from chatspot_edge.benchmarks import bench

    jobs = []

    def fake_worker(job, log):  # the worker's own measurement is covered by test_bench; here: what it is asked
        jobs.append(job)
        return {"peak_rss_mb": 700.0}

    monkeypatch.setattr(bench, "_run_worker", fake_worker)
    monkeypatch.setattr(bench, "summarize", lambda raw: dict(raw))
    dev = profiles.profile("phone-4gb")
    out = tmp_path / "b.json"
    result = bench.run_bench(tiny_bundle, out, threads=dev.threads, repeats=1, measure_machine=False,
                             device_class=dev, log=lambda s: None)
    assert [(j["threads"], j["n_ctx"]) for j in jobs] == [(2, 1024)]
    saved = json.loads(out.read_text())
    assert saved["profile"]["name"] == "phone-4gb" and saved["profile"]["peak_rss_mb"] == 512
    assert [a["fits"] for a in saved["profile"]["assessment"]] == [False] == [a["fits"] for a in result["profile"]["assessment"]]
