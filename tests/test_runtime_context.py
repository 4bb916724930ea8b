"""Runtime context handling (issue 16): a question that fits is answered, stopping at the end of the context if it
gets there; only a prompt that cannot fit is refused (exit 2); a long chat drops its oldest turns and answers as
a fresh session with the kept turns would; sessions of one engine share the KV cells without running out."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from chatspot_edge.errors import InputError
from chatspot_edge.model.checkpoint import save_checkpoint
from chatspot_edge.model.presets import build_preset
from chatspot_edge.runtime import Engine

SMALL_CTX = 128  # the small-context bundle: a 32-position prefix leaves room for about three short questions
BOX = (10, 20, 100, 90)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model with large random weights (greedy answers vary with the input and rarely end early)."""
    model, tok = build_preset("tiny", seed=2)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name else 0.35))
    d = tmp_path_factory.mktemp("ctx")
    save_checkpoint(model, tok, d / "ck")
    return d / "ck"


@pytest.fixture(scope="module")
def small(checkpoint):
    """A bundle whose LLM context is SMALL_CTX positions (the manifest's n_ctx, as an export for a small model)."""
    from chatspot_edge.export import export_bundle

    return export_bundle(checkpoint, checkpoint.parent / "small", llm_dtype="f32", n_ctx=SMALL_CTX)


def _image(seed=0, size=(200, 120)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "chatspot_edge.cli", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=300)


def _within_context(engine):
    """What llama.cpp holds: each slot's positions are 0..n-1 as the sessions count them, all within n_ctx."""
    total = 0
    for slot, s in enumerate(engine._slots):
        lo, hi = engine.llm.seq_positions(slot)
        held = 0 if hi < 0 else hi + 1
        assert held == (s._len if s is not None else 0) and lo in (-1, 0), (slot, lo, hi)
        total += held
    assert total <= engine.llm.n_ctx
    return total


def test_default_max_tokens_answers_up_to_the_context_end(small):
    engine = Engine.load(small, threads=2, max_sessions=2)
    assert engine.llm.n_ctx == SMALL_CTX
    s = engine.session(_image(0))
    answer = s.ask("What is this?", box=BOX, stream=False)  # default max_tokens (128) > what the context leaves
    t = s.timings
    assert t.stop_reason == "context" and t.n_context == SMALL_CTX and t.n_generated == SMALL_CTX - t.n_prompt + 1
    _within_context(engine)
    # the same answer as in a large context, cut where the small one ends
    big = Engine.load(small, threads=2, n_ctx=1024).session(_image(0))
    longer = big.ask("What is this?", box=BOX, stream=False)
    assert big.timings.stop_reason != "context" and len(longer) > len(answer) > 0 and longer.startswith(answer)
    # a follow-up on the same session still answers: the previous answer's cells are given back
    assert s.ask("What is this?", point=(50, 60), max_tokens=4, stream=False)
    assert s.timings.stop_reason == "max_tokens" and s.timings.n_generated == 4


def test_cli_ask_stops_at_the_context_end_with_a_note_and_refuses_what_cannot_fit(small, tmp_path):
    img = tmp_path / "i.png"
    _image(0).save(img)
    ok = _cli("ask", small, img, "What is this?", "--box", ",".join(map(str, BOX)))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() and "note: the answer stopped at the end of the context (128 positions)" in ok.stderr
    big = _cli("ask", small, img, "word " * 120, "--box", ",".join(map(str, BOX)))
    lines = [l for l in big.stderr.splitlines() if l.strip()]
    assert big.returncode == 2 and len(lines) == 1 and "Traceback" not in big.stderr, big.stderr
    assert lines[0].startswith("error: the question needs") and f"the context holds {SMALL_CTX}" in lines[0]
    engine = Engine.load(small, threads=2)
    s = engine.session(_image(0))
    with pytest.raises(InputError, match="context positions"):
        s.ask("word " * 120, stream=False)
    assert s.ask("What is this?", box=BOX, max_tokens=3, stream=False)  # still usable


def test_chat_in_a_small_context_drops_old_turns_and_goes_on(small, tmp_path):
    img = tmp_path / "i.png"
    _image(1).save(img)
    lines = [f"/box {10 + i},{20 + i},{100 + i},{90 + i} what is it?" for i in range(12)] + ["/history", "/quit"]
    r = _cli("chat", small, img, "--max-tokens", "6", stdin="\n".join(lines) + "\n")
    assert r.returncode == 0 and "error:" not in r.stderr, r.stderr[-2000:]
    assert "oldest turn" in r.stderr and "left the context" in r.stderr
    assert "(out of context)" in r.stdout and r.stdout.count("Q: ") == 12


def test_two_sessions_share_the_cells_one_chatting_long(checkpoint, small):
    engine = Engine.load(small, threads=2, max_sessions=2, n_ctx=256)
    short = engine.session(_image(3))
    first = short.ask("What is this?", box=BOX, max_tokens=12, stream=False)
    held = short._len
    long = engine.session(_image(4), history=True)
    for i in range(40):  # fills the context many times over; the short session's cells are parked, not lost
        long.ask("What is here?", box=(5 + i, 5, 120, 80 + i % 20), max_tokens=10, stream=False)
        _within_context(engine)
        assert long.timings.n_context + (short._len if short._slot is not None else 0) <= 256
    assert short._slot is None and short._saved is not None  # parked to give the long chat its room
    assert short.ask("What is this?", box=BOX, max_tokens=12, stream=False) == first
    assert short._len == held
    _within_context(engine)


def test_200_turn_chat_keeps_answering_and_matches_a_fresh_session(small):
    engine = Engine.load(small, threads=2, max_sessions=2, n_ctx=256)
    chat = engine.session(_image(5), history=True)
    dropped = 0
    fixed = ("Which color is {region}?", dict(point=(60, 40)))
    checks = 0
    for i in range(200):
        answer = chat.ask("What is in {region}?", box=(3 + i % 90, 4 + i % 30, 110 + i % 80, 100 + i % 19),
                          max_tokens=4 + i % 9, stream=False)
        t = chat.timings
        assert t.stop_reason in ("eog", "stop", "max_tokens") and t.n_context <= 256, (i, t)
        assert isinstance(answer, str)
        dropped += t.turns_dropped
        if i in (99, 199):  # a fixed question after the trimming, against a new session with the same kept turns
            got = chat.ask(fixed[0], max_tokens=8, stream=False, **fixed[1])
            kept = chat.context_turns[:-1]  # the turns the fixed question saw
            assert 0 < len(kept) < i
            fresh_engine = Engine.load(small, threads=2, max_sessions=1, n_ctx=256)
            fresh = fresh_engine.session(_image(5), history=True, turns=kept)
            assert fresh.ask(fixed[0], max_tokens=8, stream=False, **fixed[1]) == got
            assert fresh.timings.n_context == chat.timings.n_context
            fresh_engine.close()
            checks += 1
    assert checks == 2 and dropped > 150  # most of the 200 turns left the context on the way
    assert len(chat.turns) == 202 and len(chat.context_turns) < 30
    _within_context(engine)


def test_an_unfinished_answer_leaves_no_trace(small):
    engine = Engine.load(small, threads=2, n_ctx=512)
    chat = engine.session(_image(6), history=True)
    chat.ask("What is this?", box=BOX, max_tokens=5, stream=False)
    n = chat._len
    gen = chat.ask("And this?", point=(40, 40), max_tokens=50)
    next(gen)
    gen.close()  # the consumer stopped reading: the half answer leaves the cache, the turn is not recorded
    assert chat._len == n and len(chat.turns) == 1 and not chat._busy
    again = chat.ask("And this?", point=(40, 40), max_tokens=6, stream=False)
    ref = engine.session(_image(6), history=True)
    ref.ask("What is this?", box=BOX, max_tokens=5, stream=False)
    assert ref.ask("And this?", point=(40, 40), max_tokens=6, stream=False) == again
