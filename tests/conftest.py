import os

from chatspot_edge.openmp import share_cores_with_torch

share_cores_with_torch()  # the tests load torch and llama.cpp in one process (see chatspot_edge/openmp.py)

import pytest


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
