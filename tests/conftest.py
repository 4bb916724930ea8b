import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see chatspot_edge/__init__.py

import pytest


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the random tiny preset, built once per test session."""
    from chatspot_edge.model.presets import build_preset

    return build_preset("tiny", seed=0)


@pytest.fixture(scope="session")
def varied_bundle(tmp_path_factory):
    """A tiny f32 bundle whose random weights are large enough that greedy answers vary with image, region and
    question (so a leak between sessions or a wrong region shows up as a different answer)."""
    import torch

    from chatspot_edge.export import export_bundle
    from chatspot_edge.model.checkpoint import save_checkpoint
    from chatspot_edge.model.presets import build_preset

    model, tok = build_preset("tiny", seed=1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name else 0.35))
    d = tmp_path_factory.mktemp("varied")
    save_checkpoint(model, tok, d / "ck")
    return export_bundle(d / "ck", d / "bundle", llm_dtype="f32")


@pytest.fixture(scope="session")
def served(varied_bundle, tmp_path_factory):
    """`chatspot-edge serve varied_bundle` in a subprocess (a queue of 8 so the load test meets its bound)."""
    from chatspot_edge.benchmarks.serve_load import ServerProcess

    log = tmp_path_factory.mktemp("serve") / "server.log"
    with ServerProcess(varied_bundle, ["--threads", "2", "--max-queue", "8"], log=log) as server:
        yield server
