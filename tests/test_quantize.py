"""Quantize stage: variants in the manifest with checksums, atomic and idempotent updates, fallback report,
KL against torch, and the quality report (tiny preset)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chatspot_edge.errors import BundleError, InputError
from chatspot_edge.export import export_bundle, verify_bundle
from chatspot_edge.files import file_sha256
from chatspot_edge.model.checkpoint import save_checkpoint
from chatspot_edge.model.presets import build_preset
from chatspot_edge.quantize import quality_report, quantize_bundle
from chatspot_edge.quantize import variants as variants_mod
from chatspot_edge.quantize.llm import gguf_summary, gguf_tensors, quantize_gguf
from chatspot_edge.runtime import Engine

FAST = dict(calib=4, n_eval_images=4, timing_runs=2, log=lambda s: None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    model, tok = build_preset("tiny")
    ckpt = save_checkpoint(model, tok, d / "ck")
    return export_bundle(ckpt, d / "exported", llm_dtype="f32")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _snapshot(bundle: Path) -> dict[str, str]:
    return {p.relative_to(bundle).as_posix(): file_sha256(p) for p in sorted(bundle.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def quantized(exported, tmp_path_factory):
    b = _copy(exported, tmp_path_factory.mktemp("qb") / "bundle")
    summary = quantize_bundle(b, llm="q8_0,q4_0", vision="fp16,int8", **FAST)
    return b, summary


def test_variants_in_manifest(quantized):
    b, summary = quantized
    m = verify_bundle(b)
    assert set(m["llm_variants"]) == {"Q8_0", "Q4_0"} and set(m["vision_variants"]) == {"fp16", "int8"}
    assert sorted(summary["added"]) == sorted(["Q8_0", "Q4_0", "fp16", "int8"])
    for key, e in m["llm_variants"].items():
        assert e["quant"] == key and e["file"] == f"llm-{key.lower()}.gguf"
        assert e["n_embd"] == m["llm"]["n_embd"] and e["n_ctx"] == m["llm"]["n_ctx"]
        assert e["bytes"] == m["files"][e["file"]]["bytes"] < m["files"][m["llm"]["file"]]["bytes"]
        assert 4 < e["bits_per_weight"] < 9
        assert isinstance(e["fallback_tensors"], dict)
    assert m["llm_variants"]["Q4_0"]["bits_per_weight"] < m["llm_variants"]["Q8_0"]["bits_per_weight"]
    for key, e in m["vision_variants"].items():
        assert e["precision"] == key and e["file"] in m["files"] and e["cosine_mean"] > 0.99
    assert m["vision_variants"]["int8"]["method"] in ("static-qdq-per-channel", "dynamic")
    assert set(m["vision_variants"]["int8"]["candidates"]) == {"static-qdq-per-channel", "dynamic"}
    rg = m["vision_variants"]["int8"]["region_graph"]  # the int8 variant brings its own int8 region graph
    assert rg["file"] == "region-int8.onnx" and rg["bytes"] == m["files"][rg["file"]]["bytes"]
    assert rg["bytes"] < m["files"][m["referring"]["graph"]]["bytes"] and rg["cosine_min"] > 0.999
    assert "region_graph" not in m["vision_variants"]["fp16"]
    # the defaults stay full precision
    assert m["llm"]["quant"] == "F32" and m["vision"]["precision"] == "fp32" and m["vision"]["file"] == "vision.onnx"
    fb = m["llm_variants"]["Q4_0"]["fallback_tensors"]  # tied embedding / output: llama.cpp gives it more bits
    assert all(isinstance(v, str) and v != "Q4_0" for v in fb.values())
    assert set(fb) == set(summary["fallbacks"]["Q4_0"])


def test_engine_loads_variants_and_answers(quantized):
    from chatspot_edge.errors import InputError
    from chatspot_edge.evaluation import make_answerer
    from chatspot_edge.export.manifest import find_variant

    b, _ = quantized
    m = verify_bundle(b)
    assert find_variant(m, "llm", None)[1] is m["llm"]  # no name: the default entry
    assert find_variant(m, "llm", "default")[1] is m["llm"]
    assert find_variant(m, "llm", "q8_0")[1]["file"] == "llm-q8_0.gguf"  # tags are case-insensitive
    assert find_variant(m, "vision", "INT8")[1] is m["vision_variants"]["int8"]
    with pytest.raises(InputError, match=r"has: .*Q8_0, Q4_0"):
        find_variant(m, "llm", "q2_k")
    answerer = make_answerer(b, llm="Q4_0", vision="int8")  # `chatspot-edge eval BUNDLE --llm --vision`
    try:
        assert answerer.engine.llm.path.name == "llm-q4_0.gguf"
        assert answerer.engine.region.path.name == "region-int8.onnx"
    finally:
        answerer.engine.close()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    for llm, vision in (("Q8_0", "int8"), ("Q4_0", "fp16")):
        engine = Engine.load(b, threads=2, llm=llm, vision=vision)
        try:
            answer = engine.session(img).ask("What is this?", box=(2, 2, 30, 30), max_tokens=4, stream=False)
            assert isinstance(answer, str)
        finally:
            engine.close()


def test_tampering_detected(quantized, tmp_path):
    b = _copy(quantized[0], tmp_path / "t")
    p = b / "llm-q4_0.gguf"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        verify_bundle(b)
    b2 = _copy(quantized[0], tmp_path / "t2")
    (b2 / "vision-int8.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        verify_bundle(b2)


def test_rerun_is_noop_and_force_rebuilds(quantized, tmp_path):
    b = _copy(quantized[0], tmp_path / "r")
    before = _snapshot(b)
    ino = b.stat().st_ino
    s = quantize_bundle(b, llm="Q8_0,q4_0", vision="int8,fp16", **FAST)
    assert s["added"] == [] and sorted(s["skipped"]) == sorted(["Q8_0", "Q4_0", "int8", "fp16"])
    assert _snapshot(b) == before and b.stat().st_ino == ino  # not even swapped
    s = quantize_bundle(b, llm="q4_0", force=True, **FAST)
    assert s["added"] == ["Q4_0"]
    m = verify_bundle(b)
    assert set(m["llm_variants"]) == {"Q8_0", "Q4_0"} and set(m["vision_variants"]) == {"fp16", "int8"}
    assert _snapshot(quantized[0])["manifest.json"] == before["manifest.json"]  # hard links did not leak


@pytest.mark.parametrize("where", ["vision", "llm"])
def test_interrupted_quantize_leaves_bundle_unchanged(exported, tmp_path, monkeypatch, where):
    b = _copy(exported, tmp_path / "i" / "bundle")
    before = _snapshot(b)
    if where == "vision":  # after both LLM variants were written into the new folder
        def interrupted(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(variants_mod, "to_fp16", interrupted)
        exc = KeyboardInterrupt
    else:  # the second LLM variant fails
        calls = []

        def flaky(src, dst, quant, threads=None, overrides=()):
            calls.append(quant)
            if len(calls) == 2:
                Path(dst).write_bytes(b"half")
                raise RuntimeError("simulated llama.cpp failure")
            return quantize_gguf(src, dst, quant, threads, overrides)

        monkeypatch.setattr(variants_mod, "quantize_gguf", flaky)
        exc = RuntimeError
    with pytest.raises(exc):
        quantize_bundle(b, llm="q8_0,q4_0", vision="fp16", **FAST)
    assert _snapshot(b) == before
    verify_bundle(b)
    assert sorted(p.name for p in b.parent.iterdir()) == ["bundle"]  # no temporary folders left


def test_fallback_report(exported, tmp_path):
    # hidden size 64: k-quants need rows of 256, so llama.cpp stores these tensors with other types
    dst = tmp_path / "k.gguf"
    quantize_gguf(exported / "llm-f32.gguf", dst, "Q4_K_M", threads=2)
    s = gguf_summary(dst, "Q4_K_M")
    fb = s["fallbacks"]
    assert isinstance(fb, dict) and fb
    assert "blk.0.attn_q.weight" in fb
    for name, v in fb.items():
        assert v["type"] != "Q4_K" and v["requested"] == "Q4_K"
        assert "not a multiple" in v["reason"] and v["row"] % 256
    assert "blk.0.attn_norm.weight" not in fb  # 1-D tensors are F32 by design, not fallbacks


def test_bad_names_rejected(exported):
    with pytest.raises(InputError, match="unknown LLM quantization"):
        quantize_bundle(exported, llm="q9_9", **FAST)
    with pytest.raises(InputError, match="unknown vision precision"):
        quantize_bundle(exported, vision="int4", **FAST)
    with pytest.raises(InputError, match="nothing to quantize"):
        quantize_bundle(exported, **FAST)


@pytest.fixture(scope="module")
def report(quantized, tmp_path_factory):
    b = _copy(quantized[0], tmp_path_factory.mktemp("rep") / "bundle")
    out = b.parent / "report"
    r = quality_report(b, out, limit=3, timing_runs=2, best=1, sensitivity=True, log=lambda s: None)
    return b, out, r


def test_report_files_and_keys(report):
    b, out, r = report
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "pareto_size.png", "pareto_latency.png"}
    for png in ("pareto_size.png", "pareto_latency.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    j = json.loads((out / "report.json").read_text())
    assert {"llm", "vision", "combinations", "targets", "recommended", "kl_reference", "definitions"} <= set(j)
    assert set(j["llm"]) == {"F32", "Q8_0", "Q4_0"} and set(j["vision"]) == {"fp32", "fp16", "int8"}
    for v in j["llm"].values():
        assert {"bytes", "bits_per_weight", "kl_mean", "kl_p99", "top1"} <= set(v)
    combos = {(c["llm"], c["vision"]) for c in j["combinations"]}
    assert {("F32", "fp32"), ("Q8_0", "fp32"), ("Q4_0", "fp32")} <= combos
    assert any(v == "int8" for _, v in combos) and any(v == "fp16" for _, v in combos)
    llm_file = {k: e["file"] for k, e in {"F32": {"file": "llm-f32.gguf"}, **verify_bundle(b)["llm_variants"]}.items()}
    vis_file = {"fp32": "vision.onnx", "fp16": "vision-fp16.onnx", "int8": "vision-int8.onnx"}
    for c in j["combinations"]:
        assert set(c["metrics"]) >= {"region_recognition", "point_qa", "hallucination"}
        region = "region-int8.onnx" if c["vision"] == "int8" else "region.onnx"  # the pair's own region graph
        # the files a device needs for the pair, as they are on disk (the manifest as it was before the report
        # recorded its recommendation in it)
        want = {f: (b / f).stat().st_size for f in (llm_file[c["llm"]], vis_file[c["vision"]], region)}
        manifest = c["files"].pop("manifest.json")
        assert c["files"] == want and 0 < manifest <= (b / "manifest.json").stat().st_size
        assert c["total_bytes"] == sum(want.values()) + manifest
    assert {t["name"] for t in j["targets"]} >= {"Q8_0 top-1 agreement", "int8 vision speedup vs fp32 ONNX"}
    md = (out / "report.md").read_text()
    assert "| variant |" in md and "Recommended default" in md


def test_kl_against_torch(report):
    _, _, r = report
    assert r["llm"]["F32"]["kl_mean"] < 1e-4 and r["llm"]["F32"]["top1"] == 1.0
    assert r["llm"]["Q4_0"]["kl_mean"] > 0 and r["llm"]["Q4_0"]["kl_mean"] > 10 * r["llm"]["F32"]["kl_mean"]
    assert r["kl_reference"]["positions"] > 0


def test_report_sensitivity(report):
    _, _, r = report
    llm = r["diagnosis"]["llm_sensitivity"]  # tiny: 2 blocks, the embedding, each matrix kind
    kinds = {f"all {k}" for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert {g["group"] for g in llm} == {"blk.0", "blk.1", "token_embd+output"} | kinds
    assert all(g["kl_mean"] >= 0 for g in llm) and llm[0]["kl_mean"] >= llm[-1]["kl_mean"]
    vis = r["diagnosis"]["vision_sensitivity"]
    assert vis and all(0 < v["cosine_mean"] <= 1.0 + 1e-6 for v in vis)


def test_kl_skipped_without_checkpoint(quantized):
    from chatspot_edge.quantize.report import _kl_context

    m = verify_bundle(quantized[0])
    m["model"] = {**m["model"], "provenance": {}}
    ctx = _kl_context(quantized[0], m, [], None, None, 1, 1, lambda s: None)
    assert ctx["examples"] is None and "KL skipped" in ctx["info"]["skipped"]


def test_report_records_recommendation(report):
    b, _, r = report
    m = verify_bundle(b)
    assert m["recommended"] == r["recommended"]
    assert m["recommended"]["llm"] in ("F32", "Q8_0", "Q4_0") and m["recommended"]["vision"] in ("fp32", "fp16", "int8")
    assert m["llm"]["quant"] == "F32" and m["vision"]["precision"] == "fp32"  # defaults untouched


def test_report_refuses_foreign_folder(quantized, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not a quantization report"):
        quality_report(quantized[0], tmp_path, limit=1, log=lambda s: None)


def test_cli_errors(exported, monkeypatch, capsys):
    from chatspot_edge import cli

    for args, msg in ((["quantize", str(exported)], "nothing to do"),
                      (["quantize", str(exported), "--llm", "q4_x"], "unknown LLM quantization")):
        monkeypatch.setattr(sys, "argv", ["chatspot-edge", *args])
        with pytest.raises(SystemExit) as e:
            cli.main()
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_kl_stats_separates_near_ties():
    from chatspot_edge.quantize.kl import kl_stats

    ref = np.log(np.array([[0.50, 0.45, 0.05], [0.90, 0.05, 0.05]]))  # a near-tie, then a clear position
    flipped = np.log(np.array([[0.45, 0.50, 0.05], [0.90, 0.05, 0.05]]))  # the near-tie's argmax flips
    s = kl_stats([ref], [flipped])
    assert s["n_positions"] == 2 and s["near_ties"] == 1
    assert s["top1"] == 0.5 and s["top1_clear"] == 1.0 and 0 < s["kl_mean"] < 0.01
    wrong = np.log(np.array([[0.50, 0.45, 0.05], [0.05, 0.90, 0.05]]))
    assert kl_stats([ref], [wrong])["top1_clear"] == 0.0


def test_recipe_overrides_tensor_types(exported, tmp_path):
    from chatspot_edge.quantize.llm import llm_file_name, llm_recipe

    r = llm_recipe("q4_0:ffn_down=q8_0:attn_v=f16")
    assert r.name == "Q4_0:ffn_down=Q8_0:attn_v=F16" and r.overrides == (("ffn_down", "Q8_0"), ("attn_v", "F16"))
    assert llm_file_name(r.name) == "llm-q4_0-ffn_down-q8_0-attn_v-f16.gguf"
    for bad, msg in (("q4_0:ffn_down", "PATTERN=TYPE"), ("q4_0:ffn_down=q9", "not a ggml weight type"),
                     ("q4_0:ffn_(down=q8_0", "not a regular expression"), ("q9_9:ffn_down=q8_0", "unknown LLM")):
        with pytest.raises(InputError, match=msg):
            llm_recipe(bad)

    b = _copy(exported, tmp_path / "bundle")
    summary = quantize_bundle(b, llm="q4_0,q4_0:ffn_down=q8_0", **FAST)
    m = verify_bundle(b)
    assert summary["added"] == ["Q4_0", "Q4_0:ffn_down=Q8_0"]
    e = m["llm_variants"]["Q4_0:ffn_down=Q8_0"]
    assert e["file"] == "llm-q4_0-ffn_down-q8_0.gguf" and e["type"] == "Q4_0" and e["overrides"] == {"ffn_down": "Q8_0"}
    plain = {t["name"]: t["type"] for t in gguf_tensors(b / "llm-q4_0.gguf")}
    mixed = {t["name"]: t["type"] for t in gguf_tensors(b / e["file"])}
    assert {k for k in mixed if mixed[k] != plain[k]} == {k for k in plain if ".ffn_down." in k}
    assert {mixed[k] for k in mixed if ".ffn_down." in k} == {"Q8_0"} and plain["blk.0.ffn_down.weight"] == "Q4_0"
    fb = summary["fallbacks"]["Q4_0:ffn_down=Q8_0"]
    assert fb["blk.1.ffn_down.weight"]["reason"].startswith("override Q8_0")
    assert b.joinpath(e["file"]).stat().st_size > b.joinpath("llm-q4_0.gguf").stat().st_size
    engine = Engine.load(b, llm="q4_0:ffn_down=q8_0", threads=1)  # the variant by its name, any case
    assert engine.llm.path.name == e["file"]
    assert isinstance(engine.session(Image.new("RGB", (40, 40))).ask("What is {region}?", point=(3, 3),
                                                                       max_tokens=3, stream=False), str)
    # "LLM[:VISION]" pairs (bench --variants, arm64_equality --variants) with a recipe's colons in the LLM name
    from chatspot_edge.benchmarks.bench import resolve_variants
    from chatspot_edge.export.manifest import split_variant_pair

    assert split_variant_pair("Q4_K_M:int8") == ("Q4_K_M", "int8")
    assert split_variant_pair("Q4_K_M:ffn_down=Q6_K") == ("Q4_K_M:ffn_down=Q6_K", None)
    assert split_variant_pair("Q4_K_M:ffn_down=Q6_K:int8") == ("Q4_K_M:ffn_down=Q6_K", "int8")
    assert split_variant_pair("Q4_0") == ("Q4_0", None)
    (v,) = resolve_variants(m, "Q4_0:ffn_down=Q8_0:default")
    assert v["llm_file"] == e["file"] and v["llm"] == "Q4_0:ffn_down=Q8_0" and v["vision_file"] == m["vision"]["file"]
