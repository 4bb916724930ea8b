"""`make demo`'s path end to end on the tiny preset: data, adapt, eval, export, runtime eval, quantize + report,
benchmark. Each stage has its own tests; this one checks that they still fit together."""

import json

import pytest

from chatspot_edge.evaluation import METRIC_KEYS
from chatspot_edge.export.manifest import verify_bundle
from chatspot_edge.pipeline import run_pipeline


@pytest.mark.slow
def test_pipeline_runs_every_stage_on_tiny(tmp_path):
    out = tmp_path / "demo"
    r = run_pipeline("tiny", out, minutes=0.05, n_train=48, n_test=16)
    assert set(r["checkpoint_eval"]) == set(r["bundle_eval"]) == set(METRIC_KEYS)
    assert 0.0 <= r["parity"] <= 1.0
    m = verify_bundle(out / "tiny-bundle")  # every checksum, variants included
    assert {"Q8_0", "Q4_K_M", "Q4_0"} <= set(m["llm_variants"]) and {"fp16", "int8"} <= set(m["vision_variants"])
    assert m["recommended"]["llm"] and m["recommended"]["vision"]
    report = json.loads((out / "tiny-quant-report" / "report.json").read_text())
    assert report["combinations"] and report["targets"]
    bench = json.loads((out / "tiny-bench.json").read_text())
    assert len(bench["variants"]) >= 4 and bench["machine"]
    for k in ("adapt", "eval_checkpoint", "export", "eval_bundle", "quantize", "quant_report", "bench", "distill",
              "eval_student", "export_student", "bench_student"):
        assert r["timings"][k] > 0, k
    # the distilled student: at most half the LLM's non-embedding parameters, exported with Q4_K_M, benchmarked
    assert r["distill"]["prune"]["ratio"] <= 0.5 and set(r["distill"]["metrics"]) == set(METRIC_KEYS)
    assert "Q4_K_M" in verify_bundle(out / "tiny-student-bundle")["llm_variants"]
    assert r["distill"]["bench"]["student"]["decode_tok_s"] > 0
    # a second run reuses what exists (the checkpoint is not retrained)
    again = run_pipeline("tiny", out, minutes=0.05, n_train=48, n_test=16)
    assert "adapt" not in again["timings"] and "distill" not in again["timings"]
