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
    ckpt_eval = json.loads((out / "tiny-ckpt-eval.json").read_text())
    bundle_eval = json.loads((out / "tiny-bundle-eval.json").read_text())
    assert ckpt_eval["model"] == str(out / "tiny-ckpt") and bundle_eval["model"] == str(out / "tiny-bundle")
    assert ckpt_eval["n"] == bundle_eval["n"] == 16 and list(ckpt_eval["metrics"]) == list(METRIC_KEYS)
    assert r["checkpoint_eval"] == ckpt_eval["metrics"] and r["bundle_eval"] == bundle_eval["metrics"]
    a, b = ckpt_eval["answers"], bundle_eval["answers"]
    assert len(a) == len(b) > 16 and r["parity"] == sum(x == y for x, y in zip(a, b)) / len(a)
    assert r["parity"] >= 0.9  # the bundle answers as the checkpoint does
    m = verify_bundle(out / "tiny-bundle")  # every checksum, variants included
    assert {"Q8_0", "Q4_K_M", "Q4_K_M:ffn_down=Q6_K", "Q4_0"} <= set(m["llm_variants"])
    assert {"fp16", "int8"} <= set(m["vision_variants"])
    shipped = json.loads((out / "tiny-bundle-q4km-ffn-down-q6k-int8-eval.json").read_text())
    assert shipped["n"] == 16 and set(shipped["metrics"]) == set(METRIC_KEYS)
    assert m["recommended"]["llm"] and m["recommended"]["vision"]
    report = json.loads((out / "tiny-quant-report" / "report.json").read_text())
    assert report["combinations"] and report["targets"]
    bench = json.loads((out / "tiny-bench.json").read_text())
    assert len(bench["variants"]) >= 4 and bench["machine"]
    assert set(r["timings"]) == {"data", "adapt", "eval_checkpoint", "export", "eval_bundle", "quantize",
                                 "quant_report", "eval_q4km_int8", "eval_q4km-ffn-down-q6k_int8", "bench",
                                 "distill", "eval_student",
                                 "export_student", "bench_teacher", "bench_student"}  # every stage ran
    # the distilled student: at most half the LLM's non-embedding parameters, exported with Q4_K_M, benchmarked
    assert r["distill"]["prune"]["ratio"] <= 0.5 and set(r["distill"]["metrics"]) == set(METRIC_KEYS)
    assert "Q4_K_M" in verify_bundle(out / "tiny-student-bundle")["llm_variants"]
    assert r["distill"]["bench"]["student"]["decode_tok_s"] > 0
    # a second run reuses what exists: nothing is retrained, re-evaluated, re-exported or re-measured
    again = run_pipeline("tiny", out, minutes=0.05, n_train=48, n_test=16)
    assert set(again["timings"]) == {"data"} and again["parity"] == r["parity"]
