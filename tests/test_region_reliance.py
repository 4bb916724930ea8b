"""The region-reliance diagnostic (benchmarks/region_reliance.py) on tiny checkpoints and a small SpotWorld."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from chatspot_edge.benchmarks.region_reliance import main, shared_share
from chatspot_edge.data import generate
from chatspot_edge.model.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def spotworld(tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "sw"
    generate(out, seed=0, n_train=0, n_test=24, workers=1)  # ~10 region-recognition questions
    return out


def _run(tmp_path, model, tok, data, name: str) -> dict:
    save_checkpoint(model, tok, tmp_path / name)
    out = tmp_path / f"{name}.json"
    assert main([str(tmp_path / name), "--data", str(data), "--out", str(out), "--batch-size", "4"]) == 0
    return json.loads(out.read_text())


def test_a_model_that_reads_the_region_relies_on_it_and_one_that_cannot_does_not(tmp_path, spread, spotworld):
    model, tok = spread  # answers that depend on the image and the region
    r = _run(tmp_path, model, tok, spotworld, "spread")
    assert r["task"] == "region_recognition" and r["items"] >= 4 and r["answer_tokens"] > r["items"]
    assert abs(r["region_reliance_nats"]) > 1e-3 and abs(r["image_reliance_nats"]) > 1e-3
    assert len(r["attention"]) == model.config.text["num_hidden_layers"]
    for a in r["attention"]:
        assert 0 <= a["region_mean"] <= a["region_max_head"] <= 1 and 0 <= a["image_mean"] <= 1
        assert a["region_mean"] + a["image_mean"] + a["first_mean"] <= 1 + 1e-4
    assert all(0 <= g["shared"] <= 1 and g["norm"] > 0 for g in r["geometry"].values())

    blind = copy.deepcopy(model)  # every view of the region embedding ends in a zero layer: all regions are 0
    reg = blind.region
    with torch.no_grad():
        for layer in (reg.proj[-1], reg.crops.head[-1], *([reg.geometry.mlp[-1]] if reg.geometry else []),
                      *([reg.relative.mlp[-1]] if reg.relative else [])):
            layer.weight.zero_()
            layer.bias.zero_()
        if reg.relative is not None and reg.relative.words is not None:
            reg.relative.words.rows.zero_()  # the relation words write zero rows
    r = _run(tmp_path, blind, tok, spotworld, "blind")
    assert r["region_reliance_nats"] == 0.0  # swapping zeros for zeros changes nothing
    assert r["geometry"]["region"] == {"norm": 0.0, "shared": None}
    assert abs(r["image_reliance_nats"]) > 1e-3  # the image still counts


def test_shared_share_is_one_for_identical_rows_and_small_for_centred_ones():
    v = torch.randn(1, 16)
    assert shared_share(v.repeat(5, 1)) == pytest.approx(1.0)
    x = torch.randn(400, 16)
    assert shared_share(x - x.mean(0)) < 1e-6
    assert shared_share(x + 10 * v) > 0.9  # a large common vector dominates
    assert shared_share(torch.zeros(3, 4)) is None


def test_too_few_questions_are_refused(tmp_path, spread, spotworld):
    model, tok = spread
    save_checkpoint(model, tok, tmp_path / "ckpt")
    with pytest.raises(SystemExit, match="need 2 or more"):
        main([str(tmp_path / "ckpt"), "--data", str(spotworld), "--task", "no_such_task"])
