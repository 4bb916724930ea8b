"""The evaluation protocol's answerer for bundles: one runtime session per image, questions in text form."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Sequence

from chatspot_edge.runtime.engine import Engine, Session


class BundleAnswerer:
    def __init__(self, bundle: str | Path | None = None, engine: Engine | None = None, max_new_tokens: int = 40,
                 **engine_options):
        self.engine = engine or Engine.load(bundle, **engine_options)
        self.max_new_tokens = max_new_tokens
        self.referring = self.engine.referring  # the format of its grounding answers
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def _session(self, req) -> Session:
        s = self._sessions.get(req.image_key)
        if s is None:
            s = self.engine.session(req.image())
            self._sessions[req.image_key] = s
            while len(self._sessions) > 8:
                _, old = self._sessions.popitem(last=False)
                old.close()
        self._sessions.move_to_end(req.image_key)
        return s

    def answer(self, requests: Sequence) -> list[str]:
        return [self._session(r).ask_text(r.question, max_tokens=self.max_new_tokens).strip() for r in requests]
