import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see chatspot_edge/__init__.py

import pytest


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the random tiny preset, built once per test session."""
    from chatspot_edge.model.presets import build_preset

    return build_preset("tiny", seed=0)
