"""`chatspot-edge ask` (one streamed answer) and `chatspot-edge chat` (a REPL on one image)."""

from __future__ import annotations

import sys
from pathlib import Path

from chatspot_edge import referring
from chatspot_edge.errors import InputError
from chatspot_edge.runtime.engine import Engine, Session

CHAT_HELP = """commands:
  /point X,Y            refer to a point (pixels of the original image); text after it is asked at once
  /box X1,Y1,X2,Y2      refer to a box
  /polygon X1,Y1,...    refer to a polygon or scribble (3+ points)
  /clear                questions without a region from now on
  /image PATH           switch to another image (new session)
  /reset                forget the conversation (the image stays encoded)
  /history              show the conversation
  /quit                 leave (or Ctrl-D)
a plain line asks about the current region, if one is set"""


def region_kwargs(point: str | None, box: str | None, polygon: str | None) -> dict:
    out = {}
    for kind, text in (("point", point), ("box", box), ("polygon", polygon)):
        if text is not None:
            out[kind] = referring.parse_numbers(text, f"--{kind}")
    return out


def _timing_line(s: Session) -> str:
    t = s.timings
    plan = s.engine.thread_plan
    cached = " (image cached)" if t.image_cached else ""
    return (f"[vision {t.vision_ms:.1f} ms{cached} | prompt {t.n_prompt} tok, TTFT {t.ttft_ms:.1f} ms | "
            f"{t.n_generated} tok at {t.decode_tok_s:.1f} tok/s | overhead {t.overhead_ms:.2f} ms | "
            f"threads {plan.prefill} prefill / {plan.decode} decode ({plan.source}) | "
            f"context {t.n_context}/{s.engine.llm.n_ctx}]")


def _context_notes(s: Session) -> None:
    """One line on stderr when the answer stopped at the end of the context, or history was dropped."""
    t = s.timings
    if t.turns_dropped:
        print(f"note: the {t.turns_dropped} oldest turn{'s' if t.turns_dropped > 1 else ''} left the context "
              f"({len(s.context_turns) - 1} earlier turn{'s' if len(s.context_turns) != 2 else ''} kept)", file=sys.stderr)
    if t.stop_reason == "context":
        print(f"note: the answer stopped at the end of the context ({s.engine.llm.n_ctx} positions)", file=sys.stderr)


def ask(bundle: Path, image: Path, question: str, point: str | None, box: str | None, polygon: str | None,
        clip: bool, max_tokens: int, temperature: float, threads: int | None, llm: str | None, vision: str | None,
        timings: bool, decode_threads: int | None = None) -> None:
    regions = region_kwargs(point, box, polygon)
    engine = Engine.load(bundle, threads=threads, decode_threads=decode_threads, llm=llm, vision=vision, max_sessions=1)
    session = engine.session(image)
    for piece in session.ask(question, clip=clip, max_tokens=max_tokens, temperature=temperature, **regions):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _context_notes(session)
    if timings:
        print(_timing_line(session), file=sys.stderr)


def chat(bundle: Path, image: Path, threads: int | None, llm: str | None, vision: str | None, max_tokens: int,
         decode_threads: int | None = None) -> None:
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    engine = Engine.load(bundle, threads=threads, decode_threads=decode_threads, llm=llm, vision=vision,
                         max_sessions=2)
    session = engine.session(image, history=True)
    region: dict = {}
    print(f"chatspot-edge chat on {image} ({session.width}x{session.height}); /help for commands", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            break
        if not line:
            continue
        try:
            if line.startswith("/"):
                cmd, _, rest = line.partition(" ")
                if cmd in ("/quit", "/exit"):
                    break
                if cmd == "/help":
                    print(CHAT_HELP)
                    continue
                if cmd == "/reset":
                    session.reset()
                    region = {}
                    print("(conversation cleared)", file=sys.stderr)
                    continue
                if cmd == "/clear":
                    region = {}
                    continue
                if cmd == "/history":
                    kept = len(session.turns) - len(session.context_turns)
                    for i, t in enumerate(session.turns):
                        mark = "  (out of context)" if i < kept else ""
                        print(f"Q: {t.question}{mark}\nA: {t.answer}")
                    continue
                if cmd == "/image":
                    new = engine.session(rest.strip(), history=True)
                    session.close()
                    session, region = new, {}
                    print(f"(image {rest.strip()}: {session.width}x{session.height})", file=sys.stderr)
                    continue
                if cmd in ("/point", "/box", "/polygon"):
                    coords, _, question = rest.strip().partition(" ")
                    kind = cmd[1:]
                    values = referring.parse_numbers(coords, cmd)
                    session.region_text(**{kind: values})  # validate now
                    region = {kind: values}
                    if not question.strip():
                        print(f"(region set: {kind} {coords})", file=sys.stderr)
                        continue
                    line = question.strip()
                else:
                    raise InputError(f"unknown command {cmd} (/help lists them)")
            for piece in session.ask(line, max_tokens=max_tokens, **region):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            _context_notes(session)
            print(_timing_line(session), file=sys.stderr)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
