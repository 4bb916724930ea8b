"""Runtime sessions: `Session.reset` forgets the conversation and keeps the image; the encoded-image cache is a
bounded LRU keyed by the pixels' content."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from chatspot_edge.runtime import Engine

BOX = (10, 20, 100, 90)


@pytest.fixture(scope="module")
def engine(spread_bundle):
    eng = Engine.load(spread_bundle, threads=2, f32_kv=True, max_sessions=2)
    yield eng
    eng.close()


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (120, 200, 3), dtype=np.uint8))


def test_reset_forgets_the_conversation_and_keeps_the_image(engine):
    img = _image(0)
    ask = lambda s, q, **r: s.ask(q, max_tokens=8, stream=False, **r)  # noqa: E731
    fresh = engine.session(img, history=True)
    alone = ask(fresh, "And now?", box=BOX)
    n_fresh = fresh.timings.n_prompt  # [system + image] prefix + the question
    fresh.close()
    s = engine.session(img, history=True)
    ask(s, "What is this?", box=BOX)
    with_history = ask(s, "And now?", box=BOX)
    assert with_history != alone  # the conversation changes the answer, so forgetting it shows
    prefix = s._prefix_len
    s.reset()
    assert s.turns == [] and s._len == prefix
    assert ask(s, "And now?", box=BOX) == alone
    t = s.timings
    assert t.vision_ms == 0.0 and t.n_prompt == n_fresh - prefix  # the image's KV prefix was kept, not prefilled
    assert [turn.answer for turn in s.turns] == [alone]
    s.close()


def test_reset_of_a_parked_session(spread_bundle):
    """A session reset while parked (its slot given to another) answers on its return as a fresh one would."""
    eng = Engine.load(spread_bundle, threads=2, f32_kv=True, max_sessions=1)
    try:
        img = _image(0)
        ask = lambda s, q, **r: s.ask(q, max_tokens=8, stream=False, **r)  # noqa: E731
        alone = ask(eng.session(img, history=True), "And now?", box=BOX)
        s = eng.session(img, history=True)
        ask(s, "What is this?", box=BOX)
        ask(eng.session(_image(1), history=True), "What is this?", box=BOX)  # takes the only slot: s is parked
        assert s._slot is None and s._saved is not None
        s.reset()
        assert ask(s, "And now?", box=BOX) == alone
    finally:
        eng.close()


def test_image_cache_is_a_bounded_lru_keyed_by_content(spread_bundle):
    eng = Engine.load(spread_bundle, threads=2, image_cache=2, max_sessions=1)
    try:
        a, b, c = (eng.pixels(_image(i))[0] for i in range(3))
        emb = lambda px: eng.image_embeddings(px)[:2]  # noqa: E731 - (embeddings, from the cache?)
        ea, hit = emb(a)
        assert not hit and not emb(b)[1]
        again, hit = emb(a.copy())  # another array with the same pixels
        assert hit and np.array_equal(again, ea)
        assert not emb(c)[1]  # a, c kept; b (least recently used) evicted
        assert list(eng._embeds) and len(eng._embeds) == 2
        assert emb(a)[1] and not emb(b)[1]
        tweaked = a.copy()
        tweaked[0, 0, 0] ^= 1  # one pixel, one bit: another image
        e_tweaked, hit = emb(tweaked)
        assert not hit and not np.array_equal(e_tweaked, ea)
        # what the cache returns is what the vision graph computes
        np.testing.assert_array_equal(eng.image_embeddings(a)[0], np.asarray(eng.vision(a))[0])
        # sessions go through it: a second session on the same image does not encode it again
        s = eng.session(_image(7))
        s.ask("What?", max_tokens=1, stream=False)
        assert s.timings.image_cached is False and s.timings.vision_ms > 0
        s.close()
        s = eng.session(_image(7))
        s.ask("What?", max_tokens=1, stream=False)
        assert s.timings.image_cached is True and s.timings.vision_ms == 0.0
        s.close()
    finally:
        eng.close()


def test_a_stop_string_ends_the_answer_and_is_never_streamed(engine, monkeypatch):
    s = engine.session(_image(1))
    full = s.ask("Describe the image.", max_tokens=12, stream=False)
    k = len(full) // 2
    stop = full[k:k + 4]  # a piece of the answer's middle becomes the stop string
    assert len(stop) == 4 and full.find(stop) == k and s.timings.n_generated == 12
    monkeypatch.setattr(engine, "stop", ("<|im_end|>", stop))
    pieces = list(s.ask("Describe the image.", max_tokens=12))
    assert "".join(pieces) == full[:k]  # nothing of the stop string, not even its first characters, was sent
    assert s.timings.n_generated < 12  # generation ended there
