"""train-adapt: a tiny run trains and evaluates, a killed run resumes to the same weights, DDP replicas agree."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatspot_edge.data import generate


@pytest.fixture(scope="module")
def spot(tmp_path_factory):
    d = tmp_path_factory.mktemp("spot") / "sw"
    generate(d, seed=3, n_train=48, n_test=24, workers=1)
    return d


def _adapt(data: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "chatspot_edge.cli", "adapt", "--preset", "tiny", "--data", str(data),
           "--out", str(out), "--steps", "8", "--stage1-steps", "2", "--batch-size", "4", "--save-every", "3", *extra]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)


def test_kill_and_resume_matches_uninterrupted(spot, tmp_path):
    cell = ("--cell-align", "0.5")  # with the image-cell alignment: its targets come with the resumed batches too
    full = _adapt(spot, tmp_path / "full", *cell)
    assert full.returncode == 0, full.stderr[-2000:]
    assert " cell " in full.stderr  # its part of the loss is on the progress line
    killed = _adapt(spot, tmp_path / "run", *cell, env={"CHATSPOT_KILL_AT_STEP": "6"})
    assert killed.returncode == -9  # SIGKILL right after the step-6 state was saved
    assert not (tmp_path / "run").exists()  # no half-written checkpoint
    state = json.loads((tmp_path / "run.train-state" / "state.json").read_text())
    assert state["stage"] == 2 and state["step"] == 6
    resumed = _adapt(spot, tmp_path / "run", "--resume", *cell)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    assert not (tmp_path / "run.train-state").exists()
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    objective = json.loads((tmp_path / "run" / "config.json").read_text())["provenance"]["adapt"]["objective"]
    assert objective["cell_align"] == 0.5
    la = json.loads((tmp_path / "full" / "training_log.json").read_text())["losses"]
    lb = json.loads((tmp_path / "run" / "training_log.json").read_text())["losses"]
    assert [x[:2] for x in la] == [x[:2] for x in lb]
    assert all(abs(x[2] - y[2]) < 1e-3 for x, y in zip(la, lb))


def test_adapt_with_grounding_attention(spot, tmp_path):
    """`adapt --ground-attn W` on a loc model: its loss part is on the progress line and in the provenance; a text-v1
    model is refused before training (exit 2, one line)."""
    r = _adapt(spot, tmp_path / "g", "--referring", "loc", "--bins", "8", "--ground-attn", "0.5")
    assert r.returncode == 0, r.stderr[-2000:]
    assert " ground " in r.stderr
    objective = json.loads((tmp_path / "g" / "config.json").read_text())["provenance"]["adapt"]["objective"]
    assert objective["ground_attn"] == 0.5
    bad = _adapt(spot, tmp_path / "t", "--ground-attn", "0.5")
    assert bad.returncode == 2 and "--referring loc" in bad.stderr and not (tmp_path / "t").exists()


def test_adapt_changes_trainable_parts_only_and_evaluates(spot, tmp_path):
    from chatspot_edge.evaluation import evaluate_path
    from chatspot_edge.model.presets import build_preset

    r = _adapt(spot, tmp_path / "ck")
    assert r.returncode == 0, r.stderr[-2000:]
    base, _ = build_preset("tiny", seed=0)
    trained = load_file(str(tmp_path / "ck" / "model.safetensors"))
    ref = base.state_dict()
    # frozen vision encoder unchanged; projector and LLM moved
    assert all(torch.equal(trained[k], ref[k]) for k in trained if k.startswith("vision."))
    assert not torch.equal(trained["projector.linear_1.weight"], ref["projector.linear_1.weight"])
    assert not torch.equal(trained["llm.model.layers.0.mlp.up_proj.weight"], ref["llm.model.layers.0.mlp.up_proj.weight"])
    evaluate_path(tmp_path / "ck", spot, tmp_path / "eval.json", limit=12)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert set(saved["metrics"]) == {"region_recognition", "point_qa", "region_ocr", "grounding",
                                     "noise_0.1", "noise_0.2", "noise_0.3", "hallucination"}
    # the file holds the trained checkpoint's answers on the first 12 test records, and their scores
    from chatspot_edge.data import load_image, load_split
    from chatspot_edge.evaluation.answerers import TorchAnswerer
    from chatspot_edge.evaluation.protocol import build_items, score
    from chatspot_edge.model.checkpoint import load_checkpoint

    records = load_split(spot, "test")[:12]
    items = build_items(records, lambda r: load_image(spot, r))
    answers = TorchAnswerer(*load_checkpoint(tmp_path / "ck")).answer([it.request for it in items])
    assert saved["n"] == 12 and saved["answers"] == answers
    assert saved["metrics"] == score(items, answers)["metrics"]


def test_bad_data_is_exit_2(tmp_path):
    r = _adapt(tmp_path / "missing", tmp_path / "ck")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:")


DDP_WORKER = r'''
import hashlib, json, os, sys
from pathlib import Path
import torch
from chatspot_edge.train.adapt import AdaptOptions, adapt
res = adapt(AdaptOptions(preset="tiny", data=Path(sys.argv[1]), out=Path(sys.argv[2]), steps=3, stage1_steps=1,
                         batch_size=4, save_every=0, quiet=True))
h = hashlib.sha256()
for n, p in sorted(res["model"].named_parameters()):
    h.update(n.encode()); h.update(p.detach().float().numpy().tobytes())
Path(sys.argv[2] + f".rank{os.environ['RANK']}").write_text(h.hexdigest())
'''


def _torchrun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_replicas_identical(spot, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    out = tmp_path / "ddp"
    r = _torchrun(str(worker), str(spot), str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    h0 = Path(str(out) + ".rank0").read_text()
    h1 = Path(str(out) + ".rank1").read_text()
    assert h0 == h1
    assert (out / "model.safetensors").is_file()


def test_warm_start_copies_projector_position_region_and_added_tokens_only(spot, tmp_path):
    from chatspot_edge.errors import InputError
    from chatspot_edge.model.checkpoint import save_checkpoint
    from chatspot_edge.model.presets import build_preset
    from chatspot_edge.train.adapt import warm_start_from

    source, tok = build_preset("tiny", seed=1)
    source.config.provenance = dict(source.config.provenance, adapt={"train_seconds": 12.5})
    save_checkpoint(source, tok, tmp_path / "src")
    model, _ = build_preset("tiny", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = warm_start_from(model, tmp_path / "src")
    assert info["source_train_seconds"] == 12.5 and "projector" in info["copied"]
    after, src = model.state_dict(), source.state_dict()
    first = model.config.image_token_id
    for k, v in after.items():
        if k.startswith(("projector.", "position.", "region.")):  # the image tokens' 2D position map goes along
            assert torch.equal(v, src[k]), k
        elif k.endswith("embed_tokens.weight"):
            assert torch.equal(v[first:], src[k][first:]) and torch.equal(v[:first], before[k][:first])
            assert not torch.equal(v[first:], before[k][first:])
        elif "lm_head" not in k:
            assert torch.equal(v, before[k]), k  # LLM blocks and vision stay the preset's
    r = _adapt(spot, tmp_path / "ws", "--warm-start", str(tmp_path / "src"))
    assert r.returncode == 0, r.stderr[-2000:]
    prov = json.loads((tmp_path / "ws" / "config.json").read_text())["provenance"]["adapt"]["warm_start"]
    assert prov["checkpoint"] == str(tmp_path / "src") and prov["source_train_seconds"] == 12.5
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["vision"]["image_size"] = [96, 96]  # another vision encoder input: its features mean something else
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError):
        warm_start_from(model, tmp_path / "src")


@pytest.mark.slow
def test_fsdp_computes_what_ddp_computes_and_resumes(spot, tmp_path):
    """--fsdp (2 CPU processes, gloo): same batches and averaged gradients as DDP, so the same weights; a run
    killed after its step-4 state and resumed ends where the uninterrupted FSDP run ends."""
    cli = ["-m", "chatspot_edge.cli", "adapt", "--preset", "tiny", "--data", str(spot), "--steps", "6",
           "--stage1-steps", "2", "--batch-size", "4", "--save-every", "2", "--embeddings", "all"]  # FSDP shards all
    ddp = _torchrun(*cli, "--out", str(tmp_path / "ddp"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp = _torchrun(*cli, "--out", str(tmp_path / "fsdp"), "--fsdp")
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    killed = _torchrun(*cli, "--out", str(tmp_path / "run"), "--fsdp", env={"CHATSPOT_KILL_AT_STEP": "4"})
    assert killed.returncode != 0 and not (tmp_path / "run").exists()
    assert json.loads((tmp_path / "run.train-state" / "state.json").read_text())["step"] == 4
    resumed = _torchrun(*cli, "--out", str(tmp_path / "run"), "--fsdp", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    from chatspot_edge.model.presets import build_preset

    a, b, c = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("ddp", "fsdp", "run"))
    assert a.keys() == b.keys() == c.keys()
    init = build_preset("tiny", seed=0)[0].state_dict()
    moved = 0
    for k in a:
        step = float((a[k] - init[k]).abs().max())  # how far training moved this tensor
        moved += step > 1e-3
        for x, y in ((a, b), (b, c)):  # equal up to floating-point reduction order (bf16 autocast)
            diff = float((x[k] - y[k]).abs().max())
            assert diff < 5e-4 and (step < 1e-3 or diff < 0.1 * step), (k, diff, step)
    assert moved > 10  # the runs trained: projector, region encoder and LLM moved
    r = subprocess.run([sys.executable, *cli, "--out", str(tmp_path / "x"), "--fsdp"], capture_output=True, text=True)
    assert r.returncode == 2 and "torchrun" in r.stderr  # --fsdp without torchrun: a clear error


def test_added_rows_train_only_the_added_tokens_and_merge_back():
    """train.added_rows: same outputs as the plain tied table; a step moves the added rows only (no gradient is
    formed for the 49k base rows); merge() writes them back into an ordinary tied embedding."""
    from chatspot_edge.model.presets import build_preset
    from chatspot_edge.train.added_rows import AddedRows

    model, tok = build_preset("tiny", seed=0)
    llm = model.llm
    first = model.config.image_token_id
    ids = torch.tensor([[5, 17, first, first + 2, 300]])
    with torch.no_grad():
        ref = llm(input_ids=ids).logits
    before = llm.get_input_embeddings().weight.detach().clone()
    rows = AddedRows(llm, first)
    with torch.no_grad():
        assert torch.allclose(llm(input_ids=ids).logits, ref, atol=1e-6)
    assert [n for n, p in llm.named_parameters() if "embed" in n or "lm_head" in n] == ["model.embed_tokens.table.added"]
    opt = torch.optim.SGD([rows.parameter], lr=1.0)
    llm(input_ids=ids).logits[0, -1, [first + 1, 7]].sum().backward()  # reaches base row 7 and added row first+1
    opt.step()
    rows.merge()
    after = llm.get_input_embeddings().weight
    assert llm.get_output_embeddings().weight is after  # tied again
    assert torch.equal(after[:first], before[:first])
    assert not torch.equal(after[first:], before[first:])
    rows.merge()  # idempotent
