"""serve: the HTTP API of a real `chatspot-edge serve` process on a tiny bundle.

Answers are compared with the runtime asked directly in this process (greedy, same bundle and threads), so a
wrong region, a leak between sessions or a broken KV state shows up as a different answer. Also: the model
thread's queue bound and deadlines, image validation as the runtime does it, limits, Host / Origin guards,
session isolation and expiry, the OpenAI-style route, and 50 concurrent requests from 10 clients.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from chatspot_edge.benchmarks.serve_load import (ClientWork, ServeClient, ServerProcess, isolation_violations,
                                                 run_load)
from chatspot_edge.errors import InputError
from chatspot_edge.model.preprocess import load_image
from chatspot_edge.runtime import Engine
from chatspot_edge.runtime.worker import Busy, ModelWorker, Timeout

pytestmark = pytest.mark.timeout(600)


def png(seed: int, size=(200, 120)) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def engine(varied_bundle):
    """The runtime in this process: what each question gets alone."""
    e = Engine.load(varied_bundle, threads=2)
    yield e
    e.close()


def alone(engine, image: bytes, question: str, region: dict | None = None, max_tokens: int = 16,
          before: tuple = ()) -> str:
    """The answer on a fresh session (with `before`: earlier (question, region) turns of a history session)."""
    s = engine.session(image, history=bool(before))
    for q, r in before:
        s.ask(q, max_tokens=max_tokens, stream=False, **(r or {}))
    out = s.ask(question, max_tokens=max_tokens, stream=False, **(region or {}))
    s.close()
    return out


@pytest.fixture(scope="module")
def client(served):
    return ServeClient(served.url)


def new_session(client, image: bytes, history: bool = False) -> dict:
    status, info = client.upload(image, history=history)
    assert status == 201, info
    return info


# -- API ------------------------------------------------------------------------------------------------------
def test_openapi_schema_describes_the_api(client):
    status, schema = client.json("GET", "/openapi.json")
    assert status == 200
    paths = schema["paths"]
    for p in ("/api/info", "/api/sessions", "/api/sessions/{session_id}", "/api/sessions/{session_id}/ask",
              "/api/sessions/{session_id}/reset", "/api/sessions/{session_id}/timings", "/v1/chat/completions",
              "/v1/models"):
        assert p in paths, p
    comps = schema["components"]["schemas"]
    assert {"point", "box", "polygon", "question", "max_tokens", "stream"} <= set(comps["AskRequest"]["properties"])
    assert "region" in comps["ChatCompletionRequest"]["properties"]
    assert "text/event-stream" in paths["/api/sessions/{session_id}/ask"]["post"]["responses"]["200"]["content"]
    # no docs pages: they would load their scripts from a CDN
    assert client.request("GET", "/docs")[0] == 404


def test_ask_streams_the_runtime_answer_and_reuses_the_prefix(client, engine):
    img = png(1)
    s = new_session(client, img)
    assert (s["width"], s["height"]) == (200, 120) and len(s["session_id"]) >= 43
    sid = s["session_id"]
    cases = [("What is this?", {"box": [10, 20, 100, 90]}),
             ("Which color is it?", {"point": [50, 60]}),
             ("Describe {region} please.", {"polygon": [[10, 10], [150, 20], [80, 100]]}),
             ("Describe the image.", {})]
    got = []
    for q, region in cases:
        a = client.ask(sid, q, region, max_tokens=16)
        assert a.status == 200, a.error
        assert a.n_events > 1  # streamed piece by piece
        assert a.text == alone(engine, img, q, region), (q, region)
        got.append(a)
    assert len({a.text for a in got}) == len(got)  # the regions change the answers: the check is not vacuous
    first, follow = got[0].timings, got[1].timings
    assert not first["prefix_reused"] and follow["prefix_reused"]
    assert first["vision_ms"] > 0 and follow["vision_ms"] == 0
    assert follow["n_prompt"] < first["n_prompt"]  # a follow-up prefills only its question
    status, info = client.json("GET", f"/api/sessions/{sid}")
    assert status == 200 and [t["answer"] for t in info["turns"]] == [a.text for a in got]
    assert info["turns"][0]["region"] == {"kind": "box", "coords": [10, 20, 100, 90]}
    status, timings = client.json("GET", f"/api/sessions/{sid}/timings")
    assert status == 200 and timings == got[-1].timings
    # not streamed: the same answer as one JSON
    b = client.ask(sid, "What is this?", {"box": [10, 20, 100, 90]}, max_tokens=16, stream=False)
    assert b.status == 200 and b.text == got[0].text


def test_bad_questions_and_regions_get_clear_errors(client):
    sid = new_session(client, png(2))["session_id"]
    a = client.ask(sid, "What?", {"box": [10, 20, 300, 90]})
    assert a.status == 400 and "outside the image" in a.error
    a = client.ask(sid, "What?", {"box": [10, 20, 300, 90]}, clip=True)
    assert a.status == 200
    a = client.ask(sid, "What?", {"box": [10, 20, 100, 90], "point": [3, 4]})
    assert a.status == 400 and "one region" in a.error
    a = client.ask(sid, "What?", {"polygon": [[1, 1], [5, 5]]})
    assert a.status == 400
    a = client.ask(sid, "What?", {"point": [float("nan"), 3]})
    assert a.status in (400, 422)
    a = client.ask(sid, "What?", max_tokens=100_000)
    assert a.status == 400 and "max_tokens" in a.error
    status, body = client.json("POST", f"/api/sessions/{sid}/ask", {"question": ""})
    assert status == 422


def test_images_are_validated_exactly_as_the_runtime_does(client):
    good = png(3)
    bad = {"text": b"not an image at all", "truncated": good[: len(good) // 2], "one byte": b"\x89"}
    for name, data in bad.items():
        with pytest.raises(InputError) as runtime_error:
            load_image(data)
        status, info = client.upload(data)
        assert status == 400, name
        same = lambda m: re.sub(r"0x[0-9a-f]+", "0x?", m)  # noqa: E731 - Pillow names a BytesIO by its address
        assert same(info["detail"]) == same(str(runtime_error.value)), name
    assert client.upload(b"")[0] == 400
    # EXIF orientation is applied as the runtime does: a 200x120 JPEG tagged "rotate 90" is 120x200
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(io.BytesIO(good)).save(buf, "JPEG", exif=exif)
    status, info = client.upload(buf.getvalue())
    assert status == 201 and (info["width"], info["height"]) == load_image(buf.getvalue()).size == (120, 200)


def test_host_and_origin_guards(client, served):
    port = served.url.rsplit(":", 1)[1]
    status, _, body = client.request("GET", "/api/info", headers={"Host": "evil.example"})
    assert status == 400 and b"Host" in body  # DNS rebinding
    status, _, _ = client.request("GET", "/api/info", headers={"Host": f"localhost:{port}"})
    assert status == 200
    status, _, body = client.request("POST", "/api/sessions", b"x", headers={"Origin": "http://evil.example"})
    assert status == 403  # another site's page posting to this server
    status, _, body = client.request("POST", "/api/sessions", b"x", headers={"Origin": "null"})
    assert status == 403  # ... or a sandboxed frame / local file
    status, _, _ = client.request("GET", "/api/info", headers={"Origin": f"http://127.0.0.1:{port}"})
    assert status == 200


def test_page_and_its_files_are_served_with_a_strict_policy(client):
    status, headers, body = client.request("GET", "/")
    assert status == 200 and b"<canvas" in body
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    for path in ("/static/app.js", "/static/style.css"):
        status, _, body = client.request("GET", path)
        assert status == 200 and len(body) > 500
    # the page fetches nothing from elsewhere
    text = "".join(client.request("GET", p)[2].decode() for p in ("/", "/static/app.js", "/static/style.css"))
    assert not re.search(r"https?://", text)
    # no path from a client reaches the file system outside the page's folder
    for path in ("/static/../server.py", "/static/%2e%2e/server.py", "/static/..%2fserver.py"):
        assert client.request("GET", path)[0] == 404


def test_history_session_and_reset_even_when_parked(client, engine):
    img = png(4)
    sid = new_session(client, img, history=True)["session_id"]
    q1, r1 = "What is this?", {"box": [10, 20, 100, 90]}
    q2, r2 = "And here?", {"point": [150, 40]}
    assert client.ask(sid, q1, r1, max_tokens=16).text == alone(engine, img, q1, r1)
    assert client.ask(sid, q2, r2, max_tokens=16).text == alone(engine, img, q2, r2, before=[(q1, r1)])
    # park this session's KV state: other sessions take every sequence slot of the engine
    for k in range(6):
        other = new_session(client, png(100 + k))["session_id"]
        assert client.ask(other, "What is this?", {"point": [5, 5]}).status == 200
    status, info = client.json("POST", f"/api/sessions/{sid}/reset")
    assert status == 200 and info["turns"] == []
    assert client.ask(sid, q2, r2, max_tokens=16).text == alone(engine, img, q2, r2)  # fresh, no stale KV tail
    assert client.ask(sid, q1, r1, max_tokens=16).text == alone(engine, img, q1, r1, before=[(q2, r2)])


def test_a_stream_stopped_midway_leaves_the_session_usable(client, served, engine):
    img = png(5)
    sid = new_session(client, img, history=True)["session_id"]
    _, before = client.json("GET", "/api/info")
    conn = client._conn()
    conn.request("POST", f"/api/sessions/{sid}/ask", body=json.dumps(
        {"question": "Tell me everything.", "max_tokens": 500}).encode(), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"event: token")
    conn.close()  # the client goes away mid-answer
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, info = client.json("GET", "/api/info")
        if info["queue"]["streams_stopped"] > before["queue"]["streams_stopped"]:
            break
        time.sleep(0.05)
    assert info["queue"]["streams_stopped"] > before["queue"]["streams_stopped"]
    q, region = "What is this?", {"box": [10, 20, 100, 90]}
    assert client.ask(sid, q, region, max_tokens=16).text == alone(engine, img, q, region)
    _, s = client.json("GET", f"/api/sessions/{sid}")
    assert [t["question"] for t in s["turns"]] == [q]  # the cut-off answer is not part of the conversation


def test_openai_chat_completions(client, engine):
    img = png(6)
    url = "data:image/png;base64," + base64.b64encode(img).decode()
    q, region = "What is this?", {"box": [10, 20, 100, 90]}
    req = {"model": "anything", "max_tokens": 16, "region": region,
           "messages": [{"role": "system", "content": "ignored"},
                        {"role": "user", "content": [{"type": "text", "text": q},
                                                     {"type": "image_url", "image_url": {"url": url}}]}]}
    status, r = client.json("POST", "/v1/chat/completions", req)
    assert status == 200, r
    assert r["object"] == "chat.completion" and r["choices"][0]["message"]["role"] == "assistant"
    assert r["choices"][0]["message"]["content"] == alone(engine, img, q, region)
    assert r["usage"]["completion_tokens"] == r["timings"]["n_generated"]
    # streamed in OpenAI's chunk format; the image given in an earlier turn; the region where {region} says
    q2, r2 = "Is {region} red?", {"point": [60, 50]}
    req2 = {"stream": True, "stream_options": {"include_usage": True}, "max_tokens": 16, "region": r2,
            "messages": [req["messages"][1], {"role": "assistant", "content": "..."}, {"role": "user", "content": q2}]}
    status, headers, body = client.request("POST", "/v1/chat/completions", req2)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e[len("data: "):] for e in body.decode().split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == alone(engine, img, q2, r2)
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) > 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    # errors in OpenAI's shape; never a URL fetched or a file read for a client
    for content, what in (([{"type": "text", "text": q}], "no image"),
                          ([{"type": "text", "text": q}, {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}], "data URL"),
                          ([{"type": "text", "text": q}, {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}], "data URL"),
                          ([{"type": "text", "text": q}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}], "base64")):
        status, r = client.json("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": content}]})
        assert status == 400 and r["error"]["type"] == "invalid_request_error" and what in r["error"]["message"]
    status, r = client.json("POST", "/v1/chat/completions", {**req, "region": {"box": [0, 0, 999, 5]}})
    assert status == 400 and "outside" in r["error"]["message"]
    status, r = client.json("GET", "/v1/models")
    assert status == 200 and r["data"][0]["object"] == "model"


def test_50_concurrent_requests_from_10_clients(client, served, engine):
    """Every answer under load equals the answer alone; the queue bound is met (503 + Retry-After, retried);
    no client can read, ask, reset or delete another's session."""
    rng = np.random.default_rng(7)
    kinds = ["box", "point", "polygon", "box", "none"]
    work = []
    for c in range(10):
        w, h = int(rng.integers(120, 320)), int(rng.integers(90, 240))
        reqs = []
        for j, kind in enumerate(kinds):
            x1, y1 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            x2, y2 = int(rng.integers(x1 + 10, w)), int(rng.integers(y1 + 10, h))
            region = {"box": {"box": [x1, y1, x2, y2]}, "point": {"point": [x2, y2]},
                      "polygon": {"polygon": [[x1, y2], [x2, y2], [(x1 + x2) // 2, y1]]}, "none": {}}[kind]
            reqs.append((["What is this?", "Describe {region}.", "Which color?", "Where is it?", "What is here?"][j], region))
        work.append(ClientWork(png(1000 + c, (w, h)), reqs))
    result = run_load(served.url, work, max_tokens=12)
    assert result["requests"] == 50 and result["ok"] == 50, result["errors"]
    assert result["rejections"] > 0  # 50 at once against a queue of 8: the bound held, clients retried
    for w in work:
        for (q, region), a in zip(w.requests, w.answers):
            assert a.text == alone(engine, w.image, q, region, max_tokens=12), (q, region)
    assert isolation_violations(served.url, work) == []
    # each client's record holds its own questions only
    for w in work:
        status, info = client.json("GET", f"/api/sessions/{w.session_id}")
        assert status == 200 and sorted(t["question"] for t in info["turns"]) == sorted(q for q, _ in w.requests)
    # the server never wrote a whole session id to its log
    log = served.log()
    assert "/api/sessions/" in log and not any(w.session_id in log for w in work)


def test_a_full_queue_answers_503_with_retry_after(served):
    c = ServeClient(served.url)
    sid = new_session(c, png(8))["session_id"]
    results = []

    def fire():
        results.append(c.ask(sid, "Tell me a long story.", max_tokens=200))

    threads = [threading.Thread(target=fire) for _ in range(14)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    busy = [a for a in results if a.status == 503]
    assert busy and all(a.retry_after and a.retry_after >= 1 for a in busy)
    assert all(a.status in (200, 503) for a in results)


def test_limits_expiry_and_session_cap(varied_bundle, tmp_path):
    args = ["--max-upload-mb", "0.05", "--session-ttl", "1", "--max-sessions", "2", "--threads", "2"]
    with ServerProcess(varied_bundle, args, log=tmp_path / "strict.log") as server:
        c = ServeClient(server.url)
        big = png(9, (300, 300))  # ~270 KB of noise, over 0.05 MiB
        status, info = c.upload(big)
        assert status == 413 and "limit" in info["detail"]
        status, _, body = c.request("POST", "/api/sessions", b"x" * (2 << 20),
                                    {"Content-Type": "application/octet-stream"})
        assert status == 413  # refused before the body is read
        url = "data:image/png;base64," + base64.b64encode(big).decode()
        status, r = c.json("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]}]})
        assert status == 413 and "limit" in r["error"]["message"]
        small = png(10, (40, 30))
        a = c.upload(small)[1]["session_id"]
        c.upload(small)
        status, headers, body = c.request("POST", "/api/sessions", *_multipart(small))
        assert status == 503 and int(headers["retry-after"]) >= 1 and b"too many" in body
        time.sleep(2.6)  # idle expiry (1 s) + the sweeper's period
        assert c.json("GET", f"/api/sessions/{a}")[0] == 404
        assert c.upload(small)[0] == 201


def _multipart(data: bytes) -> tuple[bytes, dict]:
    b = "xyzboundary"
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a\"\r\n\r\n").encode() + data + \
        f"\r\n--{b}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={b}"}


def test_cli_needs_a_flag_for_a_non_loopback_host(varied_bundle, tmp_path):
    r = subprocess.run([sys.executable, "-m", "chatspot_edge.cli", "serve", str(varied_bundle), "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--allow-remote" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with ServerProcess(varied_bundle, ["--host", "0.0.0.0", "--allow-remote"], log=tmp_path / "remote.log") as s:
        assert "WARNING" in s.log() and "no authentication" in s.log()
    r = subprocess.run([sys.executable, "-m", "chatspot_edge.cli", "serve", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:")


# -- the model thread ----------------------------------------------------------------------------------------
def test_worker_bounds_its_queue_and_keeps_deadlines():
    async def main():
        w = ModelWorker(max_queue=1, timeout_s=0.6)
        w.start()
        try:
            slow = asyncio.ensure_future(w.run(lambda: time.sleep(0.3) or "slow"))
            await asyncio.sleep(0.05)  # running
            queued = asyncio.ensure_future(w.run(lambda: "queued"))
            await asyncio.sleep(0.01)
            with pytest.raises(Busy) as busy:
                await w.run(lambda: "rejected")
            assert busy.value.retry_after >= 1
            assert await slow == "slow" and await queued == "queued"

            # a stream past its deadline is stopped between pieces and repaired (on_stop), its caller told
            stopped = []

            def pieces():
                for i in range(100):
                    time.sleep(0.02)
                    yield i

            got = []
            with pytest.raises(Timeout) as t:
                async for p in w.stream(pieces, on_stop=lambda: stopped.append(True)):
                    got.append(p)
            assert t.value.started and 5 < len(got) < 100
            await asyncio.sleep(0.1)
            assert stopped == [True]

            # a job whose deadline passes in the queue never runs
            ran = []
            blocker = asyncio.ensure_future(w.run(lambda: time.sleep(0.5), timeout_s=5))
            await asyncio.sleep(0.05)
            with pytest.raises(Timeout) as t:
                await w.run(lambda: ran.append(1), timeout_s=0.2)
            assert not t.value.started
            await blocker
            await asyncio.sleep(0.05)
            assert ran == []

            # a consumer that leaves stops the stream
            stopped.clear()
            agen = w.stream(pieces, on_stop=lambda: stopped.append(True), timeout_s=10)
            assert await agen.__anext__() == 0
            await agen.aclose()
            await asyncio.sleep(0.2)
            assert stopped == [True] and w.stopped == 2

            # errors reach the caller
            with pytest.raises(InputError):
                await w.run(lambda: (_ for _ in ()).throw(InputError("bad")))
        finally:
            w.stop()

    asyncio.run(main())
