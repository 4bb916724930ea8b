"""Load test of `chatspot-edge serve`: many clients at once, each with its own image and regions.

    python -m chatspot_edge.benchmarks.serve_load BUNDLE --data SPOTWORLD_DIR --out FILE.json \
        [--clients 10 --requests 50 --max-tokens 32 --max-queue 16]

starts `chatspot-edge serve BUNDLE --port 0` in a subprocess, then:

1. each client (its own connections) uploads its image: one session each (SpotWorld test images);
2. all requests go out at once (`requests / clients` per client, each a different region and question, all
   on the client's own session), streamed; a 503 is retried after its Retry-After;
3. the same questions are asked again one at a time, each on a fresh session (the answer "alone"), and every
   answer under load must equal its answer alone (greedy decoding);
4. isolation: a client cannot read, ask, reset or delete another's session with any id but the one it was
   given (ids it did not get: 404).

The JSON has the counts, client-side latency (first submission to last token, retries and queueing
included) and time-to-first-token percentiles, the rejections (503) and timeouts, and any mismatches.
`ServeClient` (standard library only) is also what the tests use to talk to the server.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

import numpy as np

QUESTIONS = {  # SpotWorld's own phrasings, so a trained bundle answers them
    "box": "Describe the object in {region} in detail.",
    "point": "What color is the object at {region}?",
    "polygon": "What shape is at {region}?",
    "box2": "What is in {region}? Answer briefly.",
    "image": "How many objects are in the image?",
}


@dataclass
class Answer:
    status: int
    text: str = ""
    timings: dict | None = None
    finish_reason: str | None = None
    error: str | None = None
    retry_after: int | None = None
    n_events: int = 0  # token events received
    ttft_ms: float | None = None  # client side: request sent -> first token event
    latency_ms: float | None = None  # client side: request sent -> done


class ServeClient:
    """A client of one server (standard library http.client; a new connection per request)."""

    def __init__(self, base_url: str, timeout: float = 600.0, headers: dict[str, str] | None = None):
        u = urlsplit(base_url)
        self.host, self.port, self.timeout = u.hostname, u.port or 80, timeout
        self.headers = dict(headers or {})

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def request(self, method: str, path: str, body: bytes | dict | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        h = {**self.headers, **(headers or {})}
        if isinstance(body, dict):
            body, h["Content-Type"] = json.dumps(body).encode(), "application/json"
        conn = self._conn()
        try:
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body=None, headers=None) -> tuple[int, Any]:
        status, _, data = self.request(method, path, body, headers)
        return status, (json.loads(data) if data else None)

    def upload(self, image: bytes, history: bool = False, filename: str = "image") -> tuple[int, dict]:
        boundary = "chatspot" + secrets.token_hex(12)
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + image + (
                f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"history\"\r\n\r\n"
                f"{'true' if history else 'false'}\r\n--{boundary}--\r\n").encode()
        status, _, data = self.request("POST", "/api/sessions", body,
                                       {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return status, json.loads(data) if data else {}

    def ask(self, session_id: str, question: str, region: dict | None = None, max_tokens: int = 32,
            stream: bool = True, **extra) -> Answer:
        """Ask and read the whole answer; with `stream` the server-sent events are parsed as they come."""
        body = json.dumps({"question": question, **(region or {}), "max_tokens": max_tokens, "stream": stream,
                           **extra}).encode()
        conn = self._conn()
        t0 = time.perf_counter()
        try:
            conn.request("POST", f"/api/sessions/{session_id}/ask", body=body,
                         headers={**self.headers, "Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status != 200:
                data = r.read()
                try:
                    detail = json.loads(data).get("detail")
                except ValueError:
                    detail = data[:200].decode("utf-8", "replace")
                ra = r.getheader("Retry-After")
                return Answer(r.status, error=str(detail), retry_after=int(ra) if ra and ra.isdigit() else None)
            if not stream:
                d = json.loads(r.read())
                return Answer(200, d["answer"], d["timings"], latency_ms=(time.perf_counter() - t0) * 1e3)
            out = Answer(200)
            event, data = "message", ""
            while True:
                line = r.readline()
                if not line:
                    break
                line = line.decode("utf-8").rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data += line[5:].strip()
                elif line == "" and data:
                    msg = json.loads(data)
                    if event == "token":
                        if out.ttft_ms is None:
                            out.ttft_ms = (time.perf_counter() - t0) * 1e3
                        out.n_events += 1
                        out.text += msg["text"]
                    elif event == "done":
                        out.text, out.timings = msg["answer"], msg["timings"]
                        out.finish_reason = msg.get("finish_reason")
                    elif event == "error":
                        out.status, out.error = int(msg.get("status", 500)), msg.get("message")
                    event, data = "message", ""
            out.latency_ms = (time.perf_counter() - t0) * 1e3
            if out.timings is None and out.error is None:
                out.status, out.error = 502, "the stream ended without a done event"
            return out
        finally:
            conn.close()


# -- the load run ----------------------------------------------------------------------------------------
@dataclass
class ClientWork:
    """One client's image (bytes) and its (question, region) requests."""

    image: bytes
    requests: list[tuple[str, dict]]
    session_id: str | None = None
    answers: list[Answer | None] = field(default_factory=list)
    rejections: int = 0


def _ask_retrying(client: ServeClient, work: ClientWork, i: int, max_tokens: int, max_retries: int) -> None:
    question, region = work.requests[i]
    t0 = time.perf_counter()
    for _ in range(max_retries + 1):
        t_try = time.perf_counter()
        a = client.ask(work.session_id, question, region, max_tokens=max_tokens)
        if a.status != 503:
            break
        work.rejections += 1
        time.sleep(a.retry_after or 1)
    # what the client waited, from its first try (retries included)
    a.latency_ms = (time.perf_counter() - t0) * 1e3
    if a.ttft_ms is not None:
        a.ttft_ms += (t_try - t0) * 1e3
    work.answers[i] = a


def run_load(base_url: str, clients: Sequence[ClientWork], max_tokens: int = 32, max_retries: int = 30) -> dict:
    """Upload each client's image, then send every request at once; returns the timing summary."""
    for w in clients:
        status, info = ServeClient(base_url).upload(w.image)
        if status != 201:
            raise RuntimeError(f"upload failed: {status} {info}")
        w.session_id = info["session_id"]
        w.answers = [None] * len(w.requests)
    threads = []
    start = threading.Barrier(sum(len(w.requests) for w in clients) + 1)
    for w in clients:
        client = ServeClient(base_url)
        for i in range(len(w.requests)):
            def go(client=client, w=w, i=i):
                start.wait()
                _ask_retrying(client, w, i, max_tokens, max_retries)
            threads.append(threading.Thread(target=go, daemon=True))
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    answers = [a for w in clients for a in w.answers]
    ok = [a for a in answers if a is not None and a.status == 200]
    lat = [a.latency_ms for a in ok]
    ttft = [a.ttft_ms for a in ok if a.ttft_ms is not None]

    def pct(xs, q):
        return round(float(np.percentile(xs, q)), 1) if xs else None

    return {
        "requests": len(answers), "clients": len(clients), "ok": len(ok),
        "rejections": sum(w.rejections for w in clients),
        "timeouts": sum(1 for a in answers if a is not None and a.status == 504),
        "errors": [f"{a.status}: {a.error}" for a in answers if a is not None and a.status not in (200,)],
        "latency_ms": {"p50": pct(lat, 50), "p95": pct(lat, 95), "max": pct(lat, 100)},
        "ttft_ms": {"p50": pct(ttft, 50), "p95": pct(ttft, 95)},
        "wall_s": round(wall, 2), "answers_per_s": round(len(ok) / wall, 2) if wall > 0 else None,
        "tokens": sum(a.timings["n_generated"] for a in ok),
        "max_tokens": max_tokens,
    }


def answers_alone(base_url: str, clients: Sequence[ClientWork], max_tokens: int) -> list[list[str]]:
    """Every request again, one at a time, each on a fresh session of its image (the server otherwise idle)."""
    c = ServeClient(base_url)
    out = []
    for w in clients:
        row = []
        for question, region in w.requests:
            status, info = c.upload(w.image)
            a = c.ask(info["session_id"], question, region, max_tokens=max_tokens)
            if a.status != 200:
                raise RuntimeError(f"alone: {a.status} {a.error}")
            row.append(a.text)
            c.request("DELETE", f"/api/sessions/{info['session_id']}")
        out.append(row)
    return out


def isolation_violations(base_url: str, clients: Sequence[ClientWork]) -> list[str]:
    """What a client could do to another's session without being given its id (expected: nothing)."""
    bad = []
    intruder = ServeClient(base_url)
    for w in clients:
        sid = w.session_id
        flipped = sid[:-1] + ("A" if sid[-1] != "A" else "B")
        for guess in (flipped, sid[:-4], secrets.token_urlsafe(32), sid.upper() if sid.upper() != sid else sid.lower()):
            for method, path, body in (("GET", f"/api/sessions/{guess}", None),
                                       ("GET", f"/api/sessions/{guess}/timings", None),
                                       ("POST", f"/api/sessions/{guess}/reset", None),
                                       ("POST", f"/api/sessions/{guess}/ask", {"question": "What is this?"}),
                                       ("DELETE", f"/api/sessions/{guess}", None)):
                status, _, _ = intruder.request(method, path, body)
                if status != 404:
                    bad.append(f"{method} {path[:40]}…: {status}")
    status, _, _ = intruder.request("GET", "/api/sessions")
    if status not in (404, 405):
        bad.append(f"GET /api/sessions (a listing): {status}")
    return bad


def spotworld_work(data: Path, n_clients: int, per_client: int) -> list[ClientWork]:
    """Client k: SpotWorld test image k; its requests: a box, a point, a polygon, ... of its objects."""
    records = [json.loads(line) for line in (Path(data) / "test.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("objects")][:n_clients]
    if len(records) < n_clients:
        raise ValueError(f"{data}: only {len(records)} test records with objects")
    work = []
    for r in records:
        reqs = []
        objs = r["objects"]
        for j in range(per_client):
            o = objs[j % len(objs)]["box"]
            cx, cy = (o[0] + o[2]) / 2, (o[1] + o[3]) / 2
            kind = ("box", "point", "polygon", "box2", "image")[j % 5]
            if kind in ("box", "box2"):
                region = {"box": o}
            elif kind == "point":
                region = {"point": [cx, cy]}
            elif kind == "polygon":
                region = {"polygon": [[o[0], o[3]], [cx, o[1]], [o[2], o[3]]]}
            else:
                region = {}
            reqs.append((QUESTIONS[kind], region))
        work.append(ClientWork((Path(data) / r["image"]).read_bytes(), reqs))
    return work


# -- a server in a subprocess ---------------------------------------------------------------------------
class ServerProcess:
    """`chatspot-edge serve BUNDLE --port 0 ARGS...` in a subprocess; `url` once it listens. Use as a context."""

    def __init__(self, bundle: str | Path, args: Sequence[str] = (), log: str | Path | None = None,
                 startup_s: float = 120.0):
        self.cmd = [sys.executable, "-m", "chatspot_edge.cli", "serve", str(bundle), "--port", "0", *args]
        self.log_path = Path(log) if log else None
        self.startup_s = startup_s
        self.url: str | None = None

    def __enter__(self) -> "ServerProcess":
        import tempfile

        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="chatspot-serve-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            m = re.search(r"on (http://\S+?)/ ", text)
            if m and "Application startup complete" in text:
                self.url = m.group(1)
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.__exit__(None, None, None)
        raise RuntimeError(f"server did not start: {self.log_path.read_text(errors='replace')[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from chatspot_edge.files import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--data", type=Path, required=True, help="SpotWorld folder (test.jsonl + images)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.requests % a.clients:
        p.error("--requests must be a multiple of --clients")
    work = spotworld_work(a.data, a.clients, a.requests // a.clients)
    args = ["--max-queue", str(a.max_queue)] + (["--threads", str(a.threads)] if a.threads else [])
    with ServerProcess(a.bundle, args) as server:
        result = run_load(server.url, work, max_tokens=a.max_tokens)
        alone = answers_alone(server.url, work, a.max_tokens)
        violations = isolation_violations(server.url, work)
    mismatches = [{"client": i, "request": j, "under_load": w.answers[j].text, "alone": alone[i][j]}
                  for i, w in enumerate(work) for j in range(len(w.requests))
                  if w.answers[j] is not None and w.answers[j].status == 200 and w.answers[j].text != alone[i][j]]
    from chatspot_edge.benchmarks.machine import machine_info

    result.update(bundle=str(a.bundle), max_queue=a.max_queue, mismatches=mismatches,
                  isolation_violations=violations, machine=machine_info(),
                  date=time.strftime("%Y-%m-%d", time.gmtime()),
                  sample=[{"question": w.requests[0][0], "region": w.requests[0][1], "answer": w.answers[0].text}
                          for w in work[:3] if w.answers[0] is not None])
    atomic_write_text(a.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("requests", "clients", "ok", "rejections", "timeouts", "latency_ms",
                                             "ttft_ms", "wall_s", "answers_per_s")}))
    print(f"mismatches: {len(mismatches)}, isolation violations: {len(violations)}")
    return 0 if not mismatches and not violations and result["ok"] == result["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
