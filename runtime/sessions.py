"""The server's session table: unguessable ids, idle expiry, a cap on how many exist.

A session id is the only key to a session (a capability): `secrets.token_urlsafe(32)` (256 random bits),
returned once to the client that uploaded the image, never listed, never logged in full. The table is keyed
by the id's SHA-256, so a lookup's timing says nothing about the ids that exist. An unknown, expired or
deleted id gets the same answer (404).

The table only holds records; closing a session's model state (llama.cpp) is the caller's job, on the model
thread (`runtime.worker.ModelWorker`).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from chatspot_edge.runtime.engine import Session

ID_BYTES = 32


class TooManySessions(Exception):
    """The table is full; `retry_after` is when the oldest idle session expires (seconds, at least 1)."""

    def __init__(self, limit: int, retry_after: int):
        super().__init__(f"too many open sessions ({limit}); close one (DELETE) or retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class SessionEntry:
    session: Session
    history: bool
    created: float  # time.time()
    last_used: float  # time.monotonic()
    busy: int = 0  # requests in flight (a busy session never expires)
    turns: list[dict[str, Any]] = field(default_factory=list)  # what the client asked and got, for GET


def _key(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", "replace")).digest()


class SessionStore:
    def __init__(self, ttl_s: float = 1800.0, max_sessions: int = 64):
        self.ttl_s, self.max_sessions = ttl_s, max_sessions
        self._entries: dict[bytes, SessionEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, session: Session, history: bool) -> tuple[str, SessionEntry]:
        """A new id for `session` (raises `TooManySessions` when full; expire first)."""
        if len(self._entries) >= self.max_sessions:
            raise TooManySessions(self.max_sessions, self._next_expiry())
        session_id = secrets.token_urlsafe(ID_BYTES)
        entry = SessionEntry(session, history, time.time(), time.monotonic())
        self._entries[_key(session_id)] = entry
        return session_id, entry

    def get(self, session_id: str) -> SessionEntry | None:
        """The entry (its idle clock restarted), or None for an unknown, expired or deleted id."""
        entry = self._entries.get(_key(session_id))
        if entry is not None:
            entry.last_used = time.monotonic()
        return entry

    def pop(self, session_id: str) -> SessionEntry | None:
        return self._entries.pop(_key(session_id), None)

    def expire(self, now: float | None = None) -> list[SessionEntry]:
        """Remove and return the sessions idle for more than `ttl_s` (none with a request in flight)."""
        now = time.monotonic() if now is None else now
        gone = [k for k, e in self._entries.items() if e.busy == 0 and now - e.last_used > self.ttl_s]
        return [self._entries.pop(k) for k in gone]

    def pop_all(self) -> list[SessionEntry]:
        entries, self._entries = list(self._entries.values()), {}
        return entries

    def expires_in(self, entry: SessionEntry) -> float:
        return max(0.0, self.ttl_s - (time.monotonic() - entry.last_used))

    def _next_expiry(self) -> int:
        idle = [self.expires_in(e) for e in self._entries.values() if e.busy == 0]
        return max(1, int(min(idle)) + 1) if idle else max(1, int(self.ttl_s))
