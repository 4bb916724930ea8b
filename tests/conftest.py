import os

from chatspot_edge.openmp import share_cores_with_torch

share_cores_with_torch()  # the tests load torch and llama.cpp in one process (see chatspot_edge/openmp.py)

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Property tests must not depend on how fast or busy the machine is: no per-example deadline (hypothesis'
# default of 200 ms fails under load on 2 cores), no "too slow" health check, a fixed number of examples drawn
# the same way on every run (derandomize), and no example database carried between runs.
# HYPOTHESIS_PROFILE=explore draws 20x more, fresh examples each run: for looking for new failures by hand.
settings.register_profile("chatspot", deadline=None, max_examples=100, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("explore", deadline=None, max_examples=2000, database=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "chatspot"))


@pytest.fixture(scope="session", autouse=True)
def _machine_cache(tmp_path_factory):
    """Per-machine caches (the runtime's measured thread counts) go to a temporary folder, not the home's."""
    old = os.environ.get("CHATSPOT_EDGE_CACHE")
    os.environ["CHATSPOT_EDGE_CACHE"] = str(tmp_path_factory.mktemp("machine-cache"))
    yield
    if old is None:
        os.environ.pop("CHATSPOT_EDGE_CACHE", None)
    else:
        os.environ["CHATSPOT_EDGE_CACHE"] = old


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the random tiny preset, built once per test session."""
    from chatspot_edge.model.presets import build_preset

    return build_preset("tiny", seed=0)


@pytest.fixture(scope="session")
def spread():
    """A tiny model whose greedy answers depend on the image and the region, for parity tests.

    The random tiny preset answers the same token whatever the input (its logits are nearly flat), so a path
    that ignored the image or the region would still "agree" with torch. Here the LLM's weights are large
    enough that greedy answers vary, and the projector's and region encoder's output layers are scaled so
    image and region rows have unit RMS, like the token embeddings they sit among."""
    import torch

    from chatspot_edge.model.presets import build_preset

    model, tok = build_preset("tiny", seed=1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name else 0.35))
        pixels = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8, generator=g)
        boxes = torch.tensor([[0.1, 0.2, 0.45, 0.61], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], [0.6, 0.1, 0.9, 0.4]])
        image = model.encode_image(pixels)
        image_scale = 1.0 / float(model.projector(model.vision(pixels)).pow(2).mean().sqrt())  # content, not position
        from chatspot_edge.model.preprocess import batch_region_crops

        crops = torch.from_numpy(batch_region_crops(list(pixels.numpy()), boxes.numpy(), np.arange(4),
                                                    model.config.region_crop_size))  # the pixels stand in for the originals
        region = model.encode_regions(image, boxes, torch.arange(4), pixels, crops)
        region_scale = 1.0 / float(region.pow(2).mean().sqrt())
        reg = model.region  # every view the region embedding sums: context pool, appearance crop, box geometry
        views = [reg.proj[-1], reg.crops.head[-1] if reg.crop == "original" else reg.appearance[-1]]
        views += [reg.geometry.mlp[-1]] if reg.geometry is not None else []
        for layer, s in [(model.projector.linear_2, image_scale)] + [(v, region_scale) for v in views]:
            layer.weight.mul_(s)
            layer.bias.mul_(s)
    return model, tok


@pytest.fixture(scope="session")
def spread_bundle(spread, tmp_path_factory):
    """The `spread` model exported as a bundle (F32 GGUF): runtime answers that depend on image and region."""
    from chatspot_edge.export import export_bundle
    from chatspot_edge.model.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("spread")
    save_checkpoint(*spread, d / "ck")
    return export_bundle(d / "ck", d / "bundle", llm_dtype="f32")


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
