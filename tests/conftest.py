import pytest


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the random tiny preset, built once per test session."""
    from chatspot_edge.model.presets import build_preset

    return build_preset("tiny", seed=0)
