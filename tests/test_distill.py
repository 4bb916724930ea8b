"""distill: the pruned student's shapes and block mapping (it computes exactly what the teacher computes with
the pruned parts removed), importance finds dead blocks / channels / groups, the exported student runs in
llama.cpp like torch, the distillation loss, the teacher cache, and a tiny run killed and resumed."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from chatspot_edge.model.preprocess import region_crops
from chatspot_edge.train.adapt import BATCH_META
from safetensors.torch import load_file

from chatspot_edge.data import generate
from chatspot_edge.errors import InputError
from chatspot_edge.model.checkpoint import load_checkpoint, save_checkpoint
from chatspot_edge.model.presets import build_preset
from chatspot_edge.model.processor import Processor
from chatspot_edge.model.prune import LlamaShape, PrunePlan, non_embedding_params, student_from_teacher
from chatspot_edge.train.prune import Importance, _Skip, choose_plan, measure_importance


@pytest.fixture(scope="module")
def spot(tmp_path_factory):
    d = tmp_path_factory.mktemp("spot") / "sw"
    generate(d, seed=5, n_train=40, n_test=8, workers=1)
    return d


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny teacher with weights scaled up from the random init, so logits and activations are far from zero
    (exactness checks then mean something) and its answer distributions are peaked."""
    model, tok = build_preset("tiny", seed=0)
    with torch.no_grad():
        for n, p in model.llm.named_parameters():
            if p.ndim == 2 and "embed" not in n:
                p.mul_(4.0)
    path = save_checkpoint(model, tok, tmp_path_factory.mktemp("teacher") / "ckpt")
    return path


def _sample(model, tok, data: Path, n: int = 2) -> dict:
    from chatspot_edge.data import load_split
    from chatspot_edge.train.adapt import Batches

    recs = load_split(data, "train")
    b = Batches(recs, data, Processor(tok, model.config), model.config.vision.image_size, seed=0, max_tokens=320)
    batch = b.collate(list(range(n)))
    for k in BATCH_META:
        batch.pop(k, None)
    return batch


def test_plan_sizes_budget_and_shapes(teacher):
    model, _ = load_checkpoint(teacher)
    shape = LlamaShape.of(model.llm.config)
    assert shape.non_embedding_params() == non_embedding_params(model.llm) == 74048
    L = shape.n_layers
    imp = Importance(n_samples=1, n_tokens=1, loss=1.0, skip_loss=[1.5, 1.2], block_influence=[0.3, 0.1],
                     ffn=[list(np.linspace(0, 1, shape.ffn)), list(np.linspace(1, 0, shape.ffn))],
                     groups=[[0.2, 0.1], [0.1, 0.2]])
    plan = choose_plan(imp, shape)  # default: half the parameters at most
    student = student_from_teacher(model, plan)
    s = LlamaShape.of(student.llm.config)
    assert non_embedding_params(student.llm) == s.non_embedding_params() <= 0.5 * shape.non_embedding_params()
    assert plan.blocks == [0]  # the block whose removal costs more loss stays
    assert s.ffn == len(plan.ffn_channels[0]) and s.ffn % 16 == 0
    assert plan.ffn_channels[0] == list(range(shape.ffn - s.ffn, shape.ffn))  # the most important channels of block 0
    # ShortGPT's block influence ranks the blocks the same way here; the width options
    assert choose_plan(imp, shape, depth_metric="bi").blocks == [0]
    plan = choose_plan(imp, shape, keep_blocks=[1], ffn_ratio=0.25, kv_groups=1)
    assert plan.blocks == [1] and plan.kv_groups == [[1]] and len(plan.ffn_channels[0]) == 32
    s = plan.student_shape(shape)
    assert (s.n_layers, s.n_head, s.n_head_kv, s.head_dim, s.ffn) == (1, 2, 1, 16, 32)
    student = student_from_teacher(model, plan)
    c = student.llm.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == \
        (1, 2, 1, 16, 32)
    assert type(student.llm).__name__ == "LlamaForCausalLM"
    with pytest.raises(InputError, match="budget"):
        choose_plan(imp, shape, keep_blocks=L, ffn_ratio=1.0)
    with pytest.raises(InputError):
        choose_plan(imp, shape, keep_blocks=[1, 0])
    # non-LLM parts are the teacher's, unchanged
    t_state, s_state = model.state_dict(), student.state_dict()
    rest = [k for k in t_state if not k.startswith("llm.")]
    assert rest and all(torch.equal(t_state[k], s_state[k]) for k in rest)
    assert torch.equal(s_state["llm.model.embed_tokens.weight"], t_state["llm.model.embed_tokens.weight"])


def test_student_is_the_teacher_with_pruned_parts_removed(teacher, spot):
    """Block mapping: the student (teacher block 1, a subset of its FFN channels, GQA group 1) computes what the
    teacher computes with block 0 skipped, the other channels' down-projection columns and the other group's
    output-projection columns zeroed: same logits on an image + region sample."""
    model, tok = load_checkpoint(teacher)
    shape = LlamaShape.of(model.llm.config)
    keep_ch = list(range(3, shape.ffn, 3))[:40]
    plan = PrunePlan(blocks=[1], ffn_channels=[keep_ch], kv_groups=[[1]])
    student = student_from_teacher(model, plan)
    blk = student.llm.model.layers[0]
    t_blk = model.llm.model.layers[1]
    hd, g = shape.head_dim, shape.group_size
    q_rows = [h * hd + i for h in range(g, 2 * g) for i in range(hd)]
    assert torch.equal(blk.self_attn.q_proj.weight, t_blk.self_attn.q_proj.weight[q_rows])
    assert torch.equal(blk.self_attn.k_proj.weight, t_blk.self_attn.k_proj.weight[hd:2 * hd])
    assert torch.equal(blk.self_attn.o_proj.weight, t_blk.self_attn.o_proj.weight[:, q_rows])
    assert torch.equal(blk.mlp.down_proj.weight, t_blk.mlp.down_proj.weight[:, keep_ch])
    assert torch.equal(blk.input_layernorm.weight, t_blk.input_layernorm.weight)

    masked = copy.deepcopy(model)
    with torch.no_grad():
        mb = masked.llm.model.layers[1]
        drop = [c for c in range(shape.ffn) if c not in keep_ch]
        mb.mlp.down_proj.weight[:, drop] = 0
        mb.self_attn.o_proj.weight[:, [c for c in range(shape.n_head * hd) if c not in q_rows]] = 0
    masked.llm.model.layers[0] = _Skip()
    batch = _sample(model, tok, spot)
    with torch.no_grad():
        ref = masked(**{k: v for k, v in batch.items() if k != "labels"}).logits
        got = student(**{k: v for k, v in batch.items() if k != "labels"}).logits
        full = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    valid = batch["attention_mask"].bool()
    assert (got[valid] - ref[valid]).abs().max() < 1e-4 * max(1.0, float(ref[valid].abs().max()))
    assert (full[valid] - ref[valid]).abs().max() > 1e-2  # pruning did change the model
    # keeping everything gives the teacher back exactly
    same = student_from_teacher(model, PrunePlan.identity(shape))
    with torch.no_grad():
        again = same(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.equal(again, full)


def test_importance_finds_dead_blocks_channels_and_groups(teacher, spot):
    model, tok = load_checkpoint(teacher)
    shape = LlamaShape.of(model.llm.config)
    hd, g = shape.head_dim, shape.group_size
    dead_ch = list(range(0, 40))
    with torch.no_grad():
        b0 = model.llm.model.layers[0]  # block 0 adds nothing: its attention and FFN outputs are zero
        b0.self_attn.o_proj.weight.zero_()
        b0.mlp.down_proj.weight.zero_()
        b1 = model.llm.model.layers[1]
        b1.mlp.down_proj.weight[:, dead_ch] = 0
        b1.self_attn.o_proj.weight[:, : g * hd] = 0  # the query heads of key/value head 0
    batches = [_sample(model, tok, spot, 4)]
    imp = measure_importance(model, batches, "loss")
    assert imp.n_samples == 4 and imp.n_tokens == int(batches[0]["attention_mask"].sum())
    assert abs(imp.skip_loss[0] - imp.loss) < 1e-3 * imp.loss  # skipping a dead block changes nothing
    # a live block changes the loss when skipped (up or down: a random tiny model's loss is near ln(vocab))
    assert abs(imp.skip_loss[1] - imp.loss) > 1e-3
    assert imp.block_influence[0] < 1e-3 < imp.block_influence[1]
    assert max(imp.ffn[1][c] for c in dead_ch) == 0 and min(imp.ffn[1][40:]) > 0
    assert imp.groups[1][0] == 0 < imp.groups[1][1]
    # the planner keeps the live block (by block influence: on random weights the sign of a skip's loss change
    # says nothing, skipping the live block 1 lowered this model's loss)
    plan = choose_plan(imp, shape, keep_blocks=1, ffn_ratio=0.5, kv_groups=1, depth_metric="bi")
    assert plan.blocks == [1] and plan.kv_groups == [[1]]
    assert not set(plan.ffn_channels[0]) & set(dead_ch)


def test_kd_loss_top_k_cache_is_the_full_kl_when_k_covers_the_vocabulary():
    import torch.nn.functional as F

    from chatspot_edge.train.distill import kd_token_loss, per_sample_mean

    torch.manual_seed(0)
    s, t = torch.randn(6, 50, requires_grad=True), 3 * torch.randn(6, 50)
    for T in (1.0, 2.0):
        full = kd_token_loss(s, T, teacher_logits=t)
        logp = F.log_softmax(t / T, -1)
        top = torch.topk(logp, 50, -1)
        assert torch.allclose(kd_token_loss(s, T, topk_logp=top.values, topk_indices=top.indices), full, atol=1e-5)
        top = torch.topk(logp, 5, -1)
        part = kd_token_loss(s, T, topk_logp=top.values, topk_indices=top.indices)
        assert (part <= full + 1e-5).all() and (part > 0).all()  # k + 1 outcomes: a lower bound, not zero
        assert (full >= 0).all()
    assert torch.allclose(kd_token_loss(t, 2.0, teacher_logits=t), torch.zeros(6), atol=1e-5)
    full.sum().backward()
    assert s.grad.abs().sum() > 0
    labels = torch.tensor([[-100, 5, 6, 7, -100], [-100, -100, -100, 9, -100]])  # 3 + 1 answer tokens
    vals = torch.tensor([1.0, 1.0, 1.0, 5.0])
    assert float(per_sample_mean(vals, labels, True)) == pytest.approx(3.0)  # (1 + 5) / 2: samples weigh alike
    assert float(per_sample_mean(vals, labels, False)) == pytest.approx(2.0)


def test_teacher_cache_holds_the_teachers_top_k(teacher, spot, tmp_path):
    from chatspot_edge.data import load_split
    from chatspot_edge.train.adapt import Batches
    from chatspot_edge.train.distill import TeacherCache, cache_key

    model, tok = load_checkpoint(teacher)
    recs = load_split(spot, "train")
    b = Batches(recs, spot, Processor(tok, model.config), model.config.vision.image_size, seed=0, max_tokens=320)
    key = cache_key(teacher, spot, 320, 2.0)
    cache = TeacherCache(tmp_path / "c", 8, key)
    want = [3, 1, 7, 12, 30]
    cache.build(model, b, want, max_mb=1, batch_size=2, precision="fp32")
    assert sorted(cache.cached_records()) == sorted(want)
    files = list((tmp_path / "c").iterdir())
    assert {f.suffix for f in files} == {".json", ".safetensors"}
    cache.build(model, b, want[:3], max_mb=1)  # nothing new to build
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted(f.name for f in files)
    cache.load()
    values, ids = cache.lookup([7, 1])
    batch = b.collate([7, 1])
    for k in BATCH_META:
        batch.pop(k, None)
    with torch.no_grad():
        logits = model(**batch).logits.float()
    ref = torch.topk(torch.log_softmax(logits / 2.0, -1), 8, -1)
    assert values.shape == ids.shape == (logits.shape[0], 8)
    assert (ids[:, 0] == ref.indices[:, 0]).float().mean() > 0.9  # (padding differs: near-ties may swap)
    assert torch.allclose(values, ref.values, atol=1e-2)  # float16 on disk
    with pytest.raises(InputError, match="another teacher"):
        TeacherCache(tmp_path / "c", 8, dict(key, temperature=1.0))
    with pytest.raises(InputError, match="cache-max-mb"):
        TeacherCache(tmp_path / "d", 8, key).build(model, b, list(range(40)), max_mb=0.001)


@pytest.mark.llama
def test_exported_student_matches_torch_in_llama_cpp(teacher, spot, tmp_path):
    """A student with fewer blocks, FFN channels and GQA groups (head_dim != hidden / heads) exports through the
    unchanged exporter; llama.cpp's logits on an image + region prompt (embeddings injected) equal torch's."""
    from chatspot_edge.export import export_bundle, verify_bundle
    from chatspot_edge.export.llama_check import LlamaCheck, split_segments

    model, tok = load_checkpoint(teacher)
    shape = LlamaShape.of(model.llm.config)
    plan = PrunePlan(blocks=[1], ffn_channels=[list(range(0, shape.ffn, 2))], kv_groups=[[0]])
    student = student_from_teacher(model, plan)
    ckpt = save_checkpoint(student, tok, tmp_path / "student")
    bundle = export_bundle(ckpt, tmp_path / "bundle", llm_dtype="f32")
    manifest = verify_bundle(bundle)
    assert manifest["model"]["llm"]["n_layer"] == 1 and manifest["model"]["llm"]["n_head"] == 2
    student, _ = load_checkpoint(ckpt)
    proc = Processor(tok, student.config)
    enc = proc.encode_prompt("What is in <box>[0.100,0.200,0.450,0.610]</box>?")
    h, w = student.config.vision.image_size
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, h, w, 3), dtype=np.uint8))
    boxes = torch.tensor(enc.boxes, dtype=torch.float32)
    bb = torch.zeros(len(enc.boxes), dtype=torch.long)
    with torch.no_grad():
        emb = student.encode_image(img)
        crops = torch.from_numpy(region_crops(img[0].numpy(), enc.boxes, student.config.region_crop_size))
        reg = student.encode_regions(emb, boxes, bb, img, crops).numpy()
        ref = student(torch.tensor([enc.ids]), pixels=img, boxes=boxes, box_batch=bb, crops=crops).logits[0].numpy()
        ref_gen = student.generate([enc.ids], img, [enc.boxes], max_new_tokens=6, crops=crops)[0]
    segs = split_segments(enc.ids, {student.config.image_token_id: emb[0].numpy(), student.config.region_token_id: reg})
    with LlamaCheck(bundle / manifest["llm"]["file"], n_ctx=256) as lc:
        got = lc.feed(segs, logits="all")
        gen = lc.greedy(segs, 6)
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    assert gen == ref_gen


def _distill(data: Path, teacher: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "chatspot_edge.cli", "distill", "--teacher", str(teacher), "--data", str(data),
           "--out", str(out), "--steps", "8", "--batch-size", "4", "--save-every", "3", "--calib-samples", "8", *extra]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)


def test_distill_kill_and_resume_matches_uninterrupted(spot, teacher, tmp_path):
    full = _distill(spot, teacher, tmp_path / "full", "--hidden-weight", "0.5")
    assert full.returncode == 0, full.stderr[-2000:]
    assert json.loads((tmp_path / "full.pruned" / "prune.json").read_text())["summary"]["ratio"] <= 0.5
    killed = _distill(spot, teacher, tmp_path / "run", "--hidden-weight", "0.5", env={"CHATSPOT_KILL_AT_STEP": "6"})
    assert killed.returncode == -9
    assert not (tmp_path / "run").exists() and (tmp_path / "run.pruned" / "prune.json").is_file()
    resumed = _distill(spot, teacher, tmp_path / "run", "--hidden-weight", "0.5", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "exists: reused" in resumed.stderr and "resumed from" in resumed.stderr
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    init = load_file(str(tmp_path / "full.pruned" / "model.safetensors"))
    assert not torch.equal(a["llm.model.layers.0.mlp.up_proj.weight"], init["llm.model.layers.0.mlp.up_proj.weight"])
    assert all(torch.equal(a[k], init[k]) for k in a if k.startswith("vision."))  # frozen
    prov = json.loads((tmp_path / "full" / "config.json").read_text())["provenance"]
    assert prov["distill"]["block_map"] == json.loads((tmp_path / "full.pruned" / "prune.json").read_text())["block_map"]
    assert prov["adapt"]["objective"]["kd_weight"] == 1.0 and prov["adapt"]["objective"]["hidden_weight"] == 0.5
    log = json.loads((tmp_path / "full" / "training_log.json").read_text())["losses"]
    assert len(log) == 8 and all(x[0] == 2 for x in log)
    # the cross-entropy-only baseline from the same pruned student, and through the cache
    ce = _distill(spot, teacher, tmp_path / "ce", "--student", str(tmp_path / "full.pruned"), "--kd-weight", "0",
                  "--steps", "2")
    assert ce.returncode == 0, ce.stderr[-2000:]
    assert json.loads((tmp_path / "ce" / "config.json").read_text())["provenance"]["adapt"]["objective"]["objective"] \
        == "answer cross-entropy"
    cached = _distill(spot, teacher, tmp_path / "kc", "--student", str(tmp_path / "full.pruned"),
                      "--teacher-cache", str(tmp_path / "cache"), "--top-k", "16", "--steps", "2")
    assert cached.returncode == 0, cached.stderr[-2000:]
    assert "teacher cache" in cached.stderr and list((tmp_path / "cache").glob("chunk-*.safetensors"))


def test_bad_inputs_exit_2(spot, teacher, tmp_path):
    r = _distill(spot, tmp_path / "missing", tmp_path / "x")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:")
    r = _distill(spot, teacher, tmp_path / "x", "--keep-blocks", "2", "--ffn-ratio", "1")
    assert r.returncode == 2 and "budget" in r.stderr and not (tmp_path / "x").exists()


DDP_WORKER = r'''
import hashlib, os, sys
from pathlib import Path
from chatspot_edge.train.distill import DistillOptions, distill
res = distill(DistillOptions(teacher=Path(sys.argv[1]), data=Path(sys.argv[2]), out=Path(sys.argv[3]), steps=3,
                             batch_size=4, save_every=0, calib_samples=8, hidden_weight=0.5, quiet=True))
h = hashlib.sha256()
for n, p in sorted(res["model"].named_parameters()):
    h.update(n.encode()); h.update(p.detach().float().numpy().tobytes())
Path(sys.argv[3] + f".rank{os.environ['RANK']}").write_text(h.hexdigest())
'''


@pytest.mark.slow
def test_distill_under_torchrun_keeps_replicas_identical(spot, teacher, tmp_path):
    """DDP (2 CPU processes): rank 0 prunes while rank 1 waits for it; both train the same student."""
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(teacher), str(spot), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert Path(str(out) + ".rank0").read_text() == Path(str(out) + ".rank1").read_text()
    assert (out / "model.safetensors").is_file() and (tmp_path / "ddp.pruned" / "prune.json").is_file()


def test_a_llava_teacher_prunes_to_a_checkpoint_of_ours(tmp_path):
    """A Hugging Face LLaVA folder (CLIP tower, Llama LLM without an explicit head_dim) is a teacher too: the
    student keeps its tower and projector, and saves / loads as our checkpoint."""
    from tests.test_llava_import import _tiny_llava

    _, folder = _tiny_llava(tmp_path, "clip", "default", -2)
    teacher, tok = load_checkpoint(folder)
    shape = LlamaShape.of(teacher.llm.config)
    plan = PrunePlan(blocks=[0], ffn_channels=[list(range(0, shape.ffn, 2))], kv_groups=[[1]])
    student = student_from_teacher(teacher, plan)
    ckpt = save_checkpoint(student, tok, tmp_path / "student")
    again, _ = load_checkpoint(ckpt)
    assert again.llm.config.num_hidden_layers == 1 and again.llm.config.head_dim == shape.head_dim == 12
    t, s = teacher.state_dict(), again.state_dict()
    assert all(torch.equal(t[k], s[k]) for k in t if k.startswith(("vision.", "projector.")))
    proc = Processor(tok, again.config)
    enc = proc.encode_prompt("What is in <box>[0.100,0.200,0.450,0.610]</box>?")
    pixels = torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.isfinite(again(torch.tensor([enc.ids]), pixels=pixels).logits).all()


def test_hidden_state_matching_on_samples_of_independent_turns(teacher, spot):
    """Samples of independent turns (mini's default: a 4D attention mask) go through hidden-state matching: its
    distance is taken over the real positions of every turn (padding left out): 0 for a student equal to the
    teacher, and for another student the mean over those positions of 1 - cosine, block by block."""
    import torch.nn.functional as F

    from chatspot_edge.data import load_split
    from chatspot_edge.train.adapt import Batches
    from chatspot_edge.train.distill import DistillObjective

    model, tok = load_checkpoint(teacher)
    recs = load_split(spot, "train")[:3]
    recs[1] = dict(recs[1], conversations=recs[1]["conversations"][:2])  # one turn: a shorter, padded sample
    b = Batches(recs, spot, Processor(tok, model.config), model.config.vision.image_size, seed=0, max_tokens=320,
                turns=3)
    batch = b.collate([0, 1, 2])
    assert batch["attention_mask"].dim() == 4 and not batch["token_mask"].all()  # turns apart; one sample padded
    objective = DistillObjective(model, kd_weight=0.0, ce_weight=1.0, hidden_weight=1.0, block_map=[0, 1])
    with torch.no_grad():
        features = model.vision(batch["pixels"])
        _, parts = objective(copy.deepcopy(model), features, batch)
        assert parts["hid"] == pytest.approx(0.0, abs=1e-5)
        student = copy.deepcopy(model)
        for p in student.llm.model.layers[0].parameters():
            p.add_(0.05 * torch.randn_like(p))
        _, parts = objective(student, features, batch)
        outs = {}
        for name, m in (("s", student), ("t", model)):
            hooks = [m.llm.model.layers[i].register_forward_hook(
                lambda mod, a, o, i=i, name=name: outs.__setitem__((name, i), o)) for i in (0, 1)]
            fields = {k: v for k, v in batch.items() if k not in BATCH_META}
            m(image_embeds=m.project(features), **fields)
            for h in hooks:
                h.remove()
    valid = batch["token_mask"].bool()
    want = sum(1 - F.cosine_similarity(outs["s", i][valid], outs["t", i][valid], dim=-1).mean() for i in (0, 1)) / 2
    assert parts["hid"] > 1e-4 and parts["hid"] == pytest.approx(float(want), rel=1e-4)
