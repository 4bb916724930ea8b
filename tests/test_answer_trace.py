"""evaluation.answer_trace: one ask traced stage by stage (what the arm64 equality check's --diagnose compares)."""

import numpy as np
from PIL import Image

from chatspot_edge.evaluation.answer_trace import compare, trace


def _image(tmp_path):
    p = tmp_path / "i.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (120, 200, 3), dtype=np.uint8)).save(p)
    return p


def test_trace_records_every_stage_and_is_deterministic(varied_bundle, tmp_path):
    img = _image(tmp_path)
    ans1, t1 = trace(varied_bundle, img, "What is in {region}?", "box", [10, 20, 100, 90], max_tokens=6)
    ans2, t2 = trace(varied_bundle, img, "What is in {region}?", "box", [10, 20, 100, 90], max_tokens=6)
    assert ans1 == ans2
    assert {"pixels", "image_embeds", "region_embeds", "logits"} <= set(t1)
    assert t1["pixels"].dtype == np.uint8 and t1["image_embeds"].ndim == 3
    assert 1 <= len(t1["logits"]) <= 6 and t1["logits"].shape[1] > 100
    c = compare(t1, t2)
    assert all(s["identical"] for s in c["stages"].values())
    assert c["diverging_step"] is None and c["logit_max_abs_diff"] == 0.0


def test_perturbation_moves_only_what_follows_it(varied_bundle, tmp_path):
    img = _image(tmp_path)
    _, base = trace(varied_bundle, img, "What is in {region}?", "box", [10, 20, 100, 90], max_tokens=4)
    _, moved = trace(varied_bundle, img, "What is in {region}?", "box", [10, 20, 100, 90], max_tokens=4, perturb=1e-2)
    c = compare(base, moved)
    assert c["stages"]["pixels"]["identical"]
    assert not c["stages"]["image_embeds"]["identical"]
    assert 0 < c["stages"]["image_embeds"]["rel_to_spread"] < 0.1
    assert c["logit_max_abs_diff"] > 0


def test_compare_finds_the_diverging_token_and_the_margin():
    la = np.array([[0.0, 5.0, 1.0], [2.0, 2.1, 0.0], [0.0, 0.0, 9.0]])
    lb = np.array([[0.0, 5.1, 1.0], [2.2, 2.1, 0.0], [9.0, 0.0, 0.0]])
    c = compare({"logits": la}, {"logits": lb})
    assert c["diverging_step"] == 1
    assert abs(c["top2_margin_at_divergence"] - 0.1) < 1e-9
    assert c["other_choice_rank"] == 1  # the other side's token was this side's runner-up
    assert abs(c["logit_max_abs_diff"] - 0.2) < 1e-9  # steps 0 and 1 only: after the split the prefixes differ
