"""`chatspot-edge ask --clip` and the `chat` commands a user types (/box, /history, /reset, /image), on a bundle
whose answers depend on the image and the region (in-process: `cli.main` with argv and stdin)."""

from __future__ import annotations

import sys

import pytest
from PIL import Image

from chatspot_edge import cli
from chatspot_edge.runtime import Engine

RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    for name, color in (("red", RED), ("blue", BLUE)):
        Image.new("RGB", (200, 120), color).save(d / f"{name}.png")
    return d


def _run(monkeypatch, capsys, *args, stdin=None):
    """(exit code, stdout, stderr) of `chatspot-edge ARGS` run in this process."""
    monkeypatch.setattr(sys, "argv", ["chatspot-edge", *map(str, args)])
    if stdin is not None:
        lines = iter(stdin)

        def fake_input(prompt=""):
            try:
                return next(lines)
            except StopIteration:
                raise EOFError from None

        monkeypatch.setattr("builtins.input", fake_input)
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_ask_clip_clips_a_region_across_the_border(spread_bundle, images, monkeypatch, capsys):
    ask = ["ask", spread_bundle, images / "red.png", "What is this?", "--max-tokens", "8", "--threads", "2"]
    code, out, err = _run(monkeypatch, capsys, *ask, "--box", "-5,-5,120,80")
    assert code == 2 and err.startswith("error: box: x=-5 lies outside the image") and "clip" in err and out == ""
    code, clipped, err = _run(monkeypatch, capsys, *ask, "--box", "-5,-5,120,80", "--clip")
    assert code == 0, err
    code, inside, _ = _run(monkeypatch, capsys, *ask, "--box", "0,0,120,80")
    code, elsewhere, _ = _run(monkeypatch, capsys, *ask, "--box", "100,60,190,110")
    assert clipped == inside != elsewhere  # clipped to the image = the box given inside it; the region matters


def test_chat_history_reset_and_image(spread_bundle, images, monkeypatch, capsys):
    red, blue = images / "red.png", images / "blue.png"
    box = dict(box=(10, 20, 100, 90))
    # what the same conversations give through the runtime API
    eng = Engine.load(spread_bundle, threads=2, max_sessions=2)
    s = eng.session(red, history=True)
    a1 = s.ask("What is this?", max_tokens=8, stream=False, **box)
    a2 = s.ask("And now?", max_tokens=8, stream=False, **box)
    turns = [(t.question, t.answer) for t in s.turns]
    without_reset = s.ask("What is this?", max_tokens=8, stream=False, **box)
    on_blue = eng.session(blue, history=True).ask("What is this?", max_tokens=8, stream=False, **box)
    eng.close()
    assert without_reset != a1 and on_blue != a1  # the history and the image change the answer: /reset and /image show

    code, out, err = _run(monkeypatch, capsys, "chat", spread_bundle, red, "--max-tokens", "8", "--threads", "2", stdin=[
        "/box 10,20,100,90 What is this?", "And now?",  # a plain line asks about the current region
        "/history", "/reset", "/history",
        "/box 10,20,100,90 What is this?",  # after /reset: as the first question
        f"/image {blue}", "/history",
        "/box 10,20,100,90 What is this?",  # on the other image, a new conversation
        "/quit"])
    assert code == 0, err
    history = "".join(f"Q: {q}\nA: {a}\n" for q, a in turns)
    assert out == f"{a1}\n{a2}\n{history}{a1}\n{on_blue}\n"
    assert "(conversation cleared)" in err and f"(image {blue}: 200x120)" in err
