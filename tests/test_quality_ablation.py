"""The issue-17 ablation tool: variant definitions and the report built from what each variant wrote."""

import json

import pytest

from chatspot_edge.benchmarks.quality_ablation import (BASELINE, CHANGES, collect, describe_variant, markdown,
                                                      variant_options)


def test_variants_add_changes_to_the_first_design():
    assert variant_options("baseline") == json.loads(json.dumps(BASELINE))
    assert variant_options("loc")["referring"] == "loc" and variant_options("loc")["bins"] == 32
    pos = variant_options("position_2d")["design"]
    assert pos["position_2d"] is True and pos["region_crop"] == "resized"  # the rest of the design untouched
    everything = variant_options("all")
    assert everything["design"]["position_2d"] and everything["design"]["region_crop"] == "original"
    assert everything["turns"] == 8 and everything["embeddings"] == "added"
    assert variant_options("all-loc")["referring"] == "text" and variant_options("all-loc")["turns"] == 8
    with pytest.raises(SystemExit):
        variant_options("nonsense")
    assert set(CHANGES) >= {"position_2d", "loc", "crop"}
    assert describe_variant("all-loc") == "all but: " + CHANGES["loc"][0]
    assert describe_variant("crop") == CHANGES["crop"][0] and describe_variant("baseline") == "first design"


def test_report_reads_what_each_variant_wrote(tmp_path):
    metrics = {"region_recognition": 0.25, "point_qa": 0.5, "region_ocr": 0.0, "grounding": 0.0,
               "region_relation": 0.4, "counting": 0.3, "hallucination": 0.05}
    d = tmp_path / "baseline"
    d.mkdir()
    (d / "eval-q4km-int8.json").write_text(json.dumps({"metrics": metrics, "extra_metrics": {"noise_0.2": 0.2}}))
    (d / "eval-torch.json").write_text(json.dumps({"metrics": {**metrics, "region_recognition": 0.26}}))
    (d / "train.json").write_text(json.dumps({"steps": 108, "stage1_steps": 60, "batch_size": 8, "seconds": 600}))
    rows = collect(tmp_path, ["baseline", "all"])
    assert rows[0]["bundle"]["noise_0.2"] == 0.2 and "bundle" not in rows[1]
    table = markdown(rows)
    assert "| first design | 864 x 1 | 25.0 | 50.0 | 0.0 | 0.0 | 40.0 | 30.0 | 20.0 | 5.0 | 26.0 / 50.0 |" in table
    assert "| all changes (the default) |  |" in table
