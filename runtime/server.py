"""`chatspot-edge serve BUNDLE`: the web page at `/` and an HTTP API (OpenAPI schema at `/openapi.json`).

Two ways in, one engine:

- The page's own routes under `/api`: upload an image (a session), ask about a point / box / polygon in
  image pixels (answers streamed as server-sent events), reset, timings. A session keeps its image encoded
  and its [system + image] KV prefix, so a follow-up question prefills only its own tokens.
- An OpenAI-style `/v1/chat/completions` (image as a data-URL `image_url` part, the region as the `region`
  extension, streaming in OpenAI's chunk format), see `runtime.openai_api` and docs/serve.md.

Safety and load: binds 127.0.0.1 unless told otherwise (another address needs `allow_remote` and prints a
warning); requests must name a loopback Host when bound to loopback and may not come from another origin
(DNS rebinding, cross-site form posts); bodies over the upload limit get 413; images are validated by
the runtime's own loader (`model.preprocess.load_image`, via `Engine.session`); every model call runs on
one thread behind a bounded queue (503 + Retry-After beyond it) with a per-request timeout (504); session
ids are 256-bit random capabilities with an idle expiry; no file-system path ever comes from a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import re
import socket
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

import chatspot_edge
from chatspot_edge.errors import InputError
from chatspot_edge.runtime.engine import Engine, Session, Timings
from chatspot_edge.runtime.sessions import SessionEntry, SessionStore, TooManySessions
from chatspot_edge.runtime.worker import Busy, ModelWorker, Timeout

WEB_DIR = Path(__file__).parent / "web"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
log = logging.getLogger("chatspot_edge.serve")


@dataclass
class ServeOptions:
    """Limits of one server. Defaults suit one person on a laptop."""

    max_queue: int = 16  # model jobs waiting behind the running one; more get 503 + Retry-After
    timeout_s: float = 120.0  # per request, queue wait included; 504 after it (a stream is cut there)
    max_upload_mb: float = 20.0  # image bytes (a data URL's base64 body may be 4/3 of it)
    max_tokens: int = 512  # the most tokens one answer may ask for
    default_max_tokens: int = 128
    session_ttl_s: float = 1800.0  # a session idle this long is closed
    max_sessions: int = 64
    v1_image_cache: int = 8  # /v1 keeps the KV prefix of this many recent images
    loopback_only: bool = True  # Host must name a loopback address (set False when serving another host)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_body_bytes(self) -> int:
        return math.ceil(self.max_upload_bytes * 4 / 3) + (1 << 20)


class ApiError(Exception):
    """An error with an HTTP status; /api answers `{"detail": message}`, /v1 OpenAI's error object."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.headers = {"Retry-After": str(retry_after)} if retry_after else {}


def api_error(e: BaseException) -> ApiError:
    """Map an exception from the model thread or the session table to its HTTP status."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, Busy):
        return ApiError(503, str(e), e.retry_after)
    if isinstance(e, TooManySessions):
        return ApiError(503, str(e), e.retry_after)
    if isinstance(e, Timeout):
        return ApiError(504, str(e))
    if isinstance(e, InputError):
        return ApiError(400, str(e))
    log.error("internal error", exc_info=e)
    return ApiError(500, f"internal error: {type(e).__name__}: {e}")


# -- schema -------------------------------------------------------------------------------------------------
Coords = list[float]
PolygonCoords = list[float] | list[list[float]]


class Region(BaseModel):
    """One region in PIXELS of the original image (x right, y down, origin top-left). Give at most one of
    point, box, polygon. Out-of-image or degenerate regions are refused (400) unless `clip` is true."""

    point: Coords | None = Field(None, description="[x, y]", examples=[[120, 80]])
    box: Coords | None = Field(None, description="[x1, y1, x2, y2], top-left then bottom-right",
                               examples=[[40, 30, 200, 160]])
    polygon: PolygonCoords | None = Field(None, description="3+ points: [[x, y], ...] or flat [x1, y1, x2, y2, ...]",
                                          examples=[[[10, 10], [150, 20], [80, 100]]])
    clip: bool = Field(False, description="clip a region that crosses the image border instead of refusing it")

    def kwargs(self) -> dict:
        return {k: v for k, v in (("point", self.point), ("box", self.box), ("polygon", self.polygon))
                if v is not None}

    def record(self) -> dict | None:
        kw = self.kwargs()
        return {"kind": next(iter(kw)), "coords": next(iter(kw.values()))} if kw else None


class AskRequest(Region):
    question: str = Field(..., min_length=1, max_length=4000,
                          description="the question; `{region}` marks where the region's text goes "
                                      "(default: in front of the question)", examples=["What is this?"])
    max_tokens: int | None = Field(None, ge=1, description="answer length limit in tokens (server default 128)")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0: greedy (deterministic)")
    seed: int = Field(0, description="sampling seed when temperature > 0")
    stream: bool = Field(True, description="server-sent events (token / done / error) instead of one JSON")


class TimingsOut(BaseModel):
    """Milliseconds of one answer as the runtime measured it, plus the server's queue wait."""

    queue_ms: float = Field(description="waiting for the model thread")
    vision_ms: float = Field(description="vision encoder (0 when the image's embeddings were cached)")
    prefill_ms: float
    ttft_ms: float = Field(description="time to first token inside the runtime (queue wait excluded)")
    decode_ms: float
    decode_tok_s: float
    n_prompt: int = Field(description="prompt tokens prefilled for this answer (a reused prefix is not counted)")
    n_generated: int
    image_cached: bool = Field(description="image embeddings came from the engine's cache")
    prefix_reused: bool = Field(description="the [system + image] KV prefix was reused: only the question was prefilled")
    total_ms: float = Field(description="queue wait + answer, on the model thread")


class Turn(BaseModel):
    question: str
    region: dict | None = Field(None, description='{"kind": "point|box|polygon", "coords": [...]} in pixels')
    answer: str
    timings: TimingsOut


class SessionInfo(BaseModel):
    session_id: str = Field(description="the session's key: keep it; it is never listed or shown again")
    width: int = Field(description="original image width in pixels (after EXIF orientation)")
    height: int
    history: bool = Field(description="earlier questions and answers stay in the model's context")
    expires_in_s: float = Field(description="idle time left before the session is closed")
    turns: list[Turn]


class AskResponse(BaseModel):
    answer: str
    turn: int = Field(description="index of this answer in the session's turns")
    timings: TimingsOut


class ServerInfo(BaseModel):
    model: str
    preset: str | None
    llm: str = Field(description="LLM variant (quantization) being served")
    vision: str = Field(description="vision encoder precision")
    image: dict = Field(description="the model's input size and token count")
    referring_format: str
    limits: dict
    queue: dict


def timings_out(t: Timings, queue_ms: float, total_ms: float, prefix_reused: bool) -> TimingsOut:
    d = asdict(t)
    return TimingsOut(queue_ms=round(queue_ms, 3), vision_ms=d["vision_ms"], prefill_ms=d["prefill_ms"],
                      ttft_ms=d["ttft_ms"], decode_ms=d["decode_ms"], decode_tok_s=t.decode_tok_s,
                      n_prompt=d["n_prompt"], n_generated=d["n_generated"], image_cached=d["image_cached"],
                      prefix_reused=prefix_reused, total_ms=round(total_ms, 3))


class Answers:
    """Answers computed on the model thread and streamed to the event loop, for both routes.

    `stream(...)` yields ("text", piece) ... then ("end", (TimingsOut, finish_reason)). A stream stopped early
    (client gone, timeout, error) repairs its session with `forget`."""

    def __init__(self, engine: Engine, worker: ModelWorker):
        self.engine, self.worker = engine, worker
        self._warm: weakref.WeakSet[Session] = weakref.WeakSet()  # prefix in KV since the last forget (model thread)

    def forget(self, session: Session) -> None:
        """(model thread) Back to a fresh conversation on the same image, whatever state the session is in.

        `close()` first: `Session.reset()` alone keeps a parked session's saved KV tail, and an answer cut off
        mid-stream leaves KV positions the session does not know about; both make the next llama_decode fail.
        The image's embeddings stay cached, so the next question re-prefills the prefix only."""
        self._warm.discard(session)
        session.close()
        session.reset()

    def stream(self, get_session: Callable[[], Session], question: str, region: dict, clip: bool, max_tokens: int,
               temperature: float, seed: int, keep_turns: bool) -> AsyncIterator:
        """Submit one answer (raises `Busy` at once when the queue is full). `get_session` runs on the model
        thread; `keep_turns` False drops the engine's record of the answer (no-history sessions)."""
        submitted = time.monotonic()
        asked: list[Session] = []

        def job():
            session = get_session()
            session.region_text(**region, clip=clip)  # validate: nothing has run yet
            asked.append(session)
            start = time.monotonic()
            reused = session in self._warm
            for piece in session.ask(question, clip=clip, max_tokens=max_tokens, temperature=temperature,
                                     seed=seed, stream=True, **region):
                yield "text", piece
            t = session.timings
            self._warm.add(session)
            if not keep_turns:
                # each question stands alone: drop the engine's record of it now (the state the next question
                # would start from anyway), so a long-lived session's memory stays flat
                session.reset()
            out = timings_out(t, (start - submitted) * 1e3, (time.monotonic() - start) * 1e3, reused)
            yield "end", (out, "length" if t.n_generated >= max_tokens else "stop")

        def on_stop():
            if asked:
                self.forget(asked[0])

        return self.worker.stream(job, on_stop=on_stop)


# -- HTTP guards --------------------------------------------------------------------------------------------
def _host_name(host_header: str) -> str:
    """'localhost:8000' -> 'localhost', '[::1]:8000' -> '::1'."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class GuardMiddleware:
    """Pure ASGI: Host / Origin checks, then the body-size limit (the whole body is read, bounded, before the
    app sees it; a bigger one gets 413 without being buffered)."""

    def __init__(self, app, options: ServeOptions):
        self.app, self.options = app, options

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.options.loopback_only and _host_name(host) not in LOOPBACK_NAMES:
            return await _plain(send, scope, 400, f"invalid Host header {host[:100]!r}: this server answers "
                                                  "requests for localhost / 127.0.0.1 / [::1] only")
        origin = headers.get("origin")  # browsers send it on cross-origin requests ("null" from sandboxes, files)
        if origin is not None:
            m = re.match(r"^[a-z][a-z0-9+.-]*://([^/]+)$", origin.lower())
            if not m or m.group(1) != host.lower():
                return await _plain(send, scope, 403, f"cross-origin request from {origin[:100]!r} refused")
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.options.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _plain(send, scope, 413, _too_large(int(declared), self.options))
        body, more = [], True
        size = 0
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _plain(send, scope, 413, _too_large(size, self.options))
            body.append(chunk)
            more = msg.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(body), "more_body": False}]

        async def replay_receive():
            return replay.pop() if replay else await receive()

        return await self.app(scope, replay_receive, send)


def _too_large(size: int, options: ServeOptions) -> str:
    return (f"request body of {size / 2**20:.1f} MiB or more is over the limit (images up to "
            f"{options.max_upload_mb:g} MiB, --max-upload-mb)")


async def _plain(send, scope, status: int, message: str) -> None:
    if scope["path"].startswith("/v1/"):
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    else:
        body = {"detail": message}
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


PAGE_HEADERS = {
    # the page loads nothing from anywhere else, and no other site may frame it
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


# -- the app ------------------------------------------------------------------------------------------------
def create_app(engine: Engine, options: ServeOptions | None = None, llm: str | None = None,
               vision: str | None = None) -> FastAPI:
    """The ASGI app for a loaded engine (`llm` / `vision`: the variant names it was loaded with, for /api/info).
    Model work runs on one `ModelWorker` thread started with the app."""
    from chatspot_edge.export.manifest import find_variant

    options = options or ServeOptions()
    worker = ModelWorker(options.max_queue, options.timeout_s)
    store = SessionStore(options.session_ttl_s, options.max_sessions)
    manifest = engine.manifest
    llm_name, vision_name = find_variant(manifest, "llm", llm)[0], find_variant(manifest, "vision", vision)[0]
    answers = Answers(engine, worker)
    stats = {"answers": 0, "rejected": 0, "timeouts": 0, "errors": 0}
    to_close: list[Session] = []  # expired sessions whose model state awaits the model thread

    async def close_sessions(sessions: list[Session]) -> None:
        to_close.extend(sessions)
        if not to_close:
            return
        batch = list(to_close)
        try:
            await worker.run(lambda: [s.close() for s in batch])
            del to_close[: len(batch)]
        except (Busy, Timeout):
            pass  # next sweep

    async def sweeper() -> None:
        period = max(0.5, min(60.0, options.session_ttl_s / 4))
        while True:
            await asyncio.sleep(period)
            await close_sessions([e.session for e in store.expire()])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        task = asyncio.create_task(sweeper())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(Exception):
                await close_sessions([e.session for e in store.pop_all()])
            worker.stop()

    app = FastAPI(title="ChatSpot Edge", version=chatspot_edge.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # their pages load scripts from a CDN; the schema is enough
                  description="Ask a referring multimodal LLM about a point, box or polygon of your image, "
                              "offline. Regions are in pixels of the original image. The page is at `/`; "
                              "`/v1/chat/completions` follows OpenAI's chat completions with a `region` "
                              "extension (docs/serve.md).")
    app.state.engine, app.state.worker, app.state.store, app.state.options = engine, worker, store, options
    app.state.stats = stats
    app.add_middleware(GuardMiddleware, options=options)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        if e.status == 503:
            stats["rejected"] += 1
        elif e.status == 504:
            stats["timeouts"] += 1
        if request.url.path.startswith("/v1/"):
            kind = "invalid_request_error" if e.status < 500 else "server_error"
            body = {"error": {"message": e.message, "type": kind, "param": None, "code": None}}
        else:
            body = {"detail": e.message}
        return JSONResponse(body, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        if request.url.path.startswith("/v1/"):
            first = e.errors()[0] if e.errors() else {}
            where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
            msg = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
            return JSONResponse({"error": {"message": msg, "type": "invalid_request_error", "param": where or None,
                                           "code": None}}, status_code=400)
        return JSONResponse({"detail": e.errors()}, status_code=422)

    def entry_or_404(session_id: str) -> SessionEntry:
        entry = store.get(session_id)
        if entry is None:
            raise ApiError(404, "no such session (unknown, expired or closed): upload the image again")
        return entry

    def session_info(session_id: str, entry: SessionEntry) -> SessionInfo:
        s = entry.session
        return SessionInfo(session_id=session_id, width=s.width, height=s.height, history=entry.history,
                           expires_in_s=round(store.expires_in(entry), 1), turns=[Turn(**t) for t in entry.turns])

    async def read_upload(image: UploadFile) -> bytes:
        data = await image.read(options.max_upload_bytes + 1)
        if len(data) > options.max_upload_bytes:
            raise ApiError(413, f"image is over the {options.max_upload_mb:g} MiB limit (--max-upload-mb)")
        if not data:
            raise ApiError(400, "the image is empty")
        return data

    def check_max_tokens(n: int | None) -> int:
        n = options.default_max_tokens if n is None else n
        if n < 1 or n > options.max_tokens:
            raise ApiError(400, f"max_tokens must be 1..{options.max_tokens} (--max-tokens), got {n}")
        return n

    # -- page ------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB_DIR / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    # -- /api ------------------------------------------------------------------------------------------
    @app.get("/api/info", response_model=ServerInfo, tags=["api"])
    async def info():
        """The model being served, the server's limits and its queue."""
        m = manifest
        return ServerInfo(
            model=str(m["model"].get("name", "chatspot")), preset=m["model"].get("preset"),
            llm=llm_name, vision=vision_name,
            image={k: m["image"][k] for k in ("width", "height", "tokens")},
            referring_format=m["referring"].get("format", "chatspot-text-v1"),
            limits={"max_upload_bytes": options.max_upload_bytes, "max_tokens": options.max_tokens,
                    "default_max_tokens": options.default_max_tokens, "timeout_s": options.timeout_s,
                    "max_queue": options.max_queue, "session_ttl_s": options.session_ttl_s,
                    "max_sessions": options.max_sessions},
            queue={"waiting": worker.queued, "running": worker.running, "sessions": len(store),
                   "streams_stopped": worker.stopped, **stats})

    @app.post("/api/sessions", response_model=SessionInfo, status_code=201, tags=["api"])
    async def create_session(image: UploadFile = File(..., description="the image file (any format Pillow reads)"),
                             history: bool = Form(False, description="keep earlier questions and answers in context")):
        """Upload an image: a new session on it. The image is validated exactly as the runtime does (corrupt,
        truncated, empty and decompression-bomb files get 400). Keep the returned `session_id`."""
        data = await read_upload(image)
        try:
            session = await worker.run(lambda: engine.session(data, history=history))
        except Exception as e:  # noqa: BLE001
            raise api_error(e) from None
        try:
            sid, entry = store.add(session, history)
        except TooManySessions as e:
            await close_sessions([session])
            raise api_error(e) from None
        return session_info(sid, entry)

    @app.get("/api/sessions/{session_id}", response_model=SessionInfo, tags=["api"])
    async def get_session(session_id: str):
        """The session's image size, its questions, answers and their timings."""
        return session_info(session_id, entry_or_404(session_id))

    @app.get("/api/sessions/{session_id}/timings", response_model=TimingsOut | None, tags=["api"])
    async def get_timings(session_id: str):
        """Timings of the session's last answer (null before the first)."""
        entry = entry_or_404(session_id)
        return entry.turns[-1]["timings"] if entry.turns else None

    @app.post("/api/sessions/{session_id}/reset", response_model=SessionInfo, tags=["api"])
    async def reset_session(session_id: str):
        """Forget the conversation; the image stays (its embeddings cached)."""
        entry = entry_or_404(session_id)
        entry.busy += 1
        try:
            await worker.run(lambda: answers.forget(entry.session))
        except Exception as e:  # noqa: BLE001
            raise api_error(e) from None
        finally:
            entry.busy -= 1
        entry.turns.clear()
        return session_info(session_id, entry)

    @app.delete("/api/sessions/{session_id}", status_code=204, tags=["api"])
    async def delete_session(session_id: str):
        """Close the session now (otherwise it closes after its idle expiry)."""
        entry = store.pop(session_id)
        if entry is None:
            raise ApiError(404, "no such session (unknown, expired or closed)")
        await close_sessions([entry.session])
        return Response(status_code=204)

    @app.post("/api/sessions/{session_id}/ask", tags=["api"], response_model=AskResponse,
              responses={200: {"content": {"text/event-stream": {"schema": {
                  "type": "string", "description": "with stream=true: `event: token` data {\"text\"}, then "
                                                   "`event: done` data {\"answer\", \"turn\", \"timings\"}, or "
                                                   "`event: error` data {\"message\", \"status\"}"}}}},
                         400: {"description": "bad question or region"}, 404: {"description": "no such session"},
                         503: {"description": "queue full (Retry-After)"}, 504: {"description": "timed out"}})
    async def ask(session_id: str, req: AskRequest):
        """Ask about a region (pixels of the original image) or the whole image. Streamed by default."""
        entry = entry_or_404(session_id)
        region = req.kwargs()
        max_tokens = check_max_tokens(req.max_tokens)
        try:
            entry.session.region_text(**region, clip=req.clip)  # validate before queueing (pure, no model)
        except InputError as e:
            raise ApiError(400, str(e)) from None
        entry.busy += 1
        try:
            pieces = answers.stream(lambda: entry.session, req.question, region, req.clip, max_tokens,
                                    req.temperature, req.seed, keep_turns=entry.history)
            first = await anext(pieces)  # queue wait and start-up errors still get a status code
        except BaseException as e:
            entry.busy -= 1
            if isinstance(e, Exception):
                raise api_error(e) from None
            raise

        record = {"question": req.question, "region": req.record()}

        async def events() -> AsyncIterator[tuple[str, Any]]:
            done = False
            try:
                yield first
                async for item in pieces:
                    done = done or item[0] == "end"
                    yield item
            finally:
                entry.busy -= 1
                if not done and entry.history:
                    entry.turns.clear()  # a stopped answer resets the conversation (see Answers.forget)

        if not req.stream:
            text = []
            try:
                async for kind, value in events():
                    if kind == "text":
                        text.append(value)
                    else:
                        timings = value[0]
            except Exception as e:  # noqa: BLE001
                raise api_error(e) from None
            entry.turns.append({**record, "answer": "".join(text), "timings": timings.model_dump()})
            stats["answers"] += 1
            return AskResponse(answer="".join(text), turn=len(entry.turns) - 1, timings=timings)

        async def sse():
            text = []
            try:
                async for kind, value in events():
                    if kind == "text":
                        text.append(value)
                        yield sse_event("token", {"text": value})
                    else:
                        timings = value[0].model_dump()
                        entry.turns.append({**record, "answer": "".join(text), "timings": timings})
                        stats["answers"] += 1
                        yield sse_event("done", {"answer": "".join(text), "turn": len(entry.turns) - 1,
                                                 "finish_reason": value[1], "timings": timings})
            except Exception as e:  # noqa: BLE001 - the status line is gone: report in the stream
                err = api_error(e)
                stats["timeouts" if err.status == 504 else "errors"] += 1
                reset = " (the conversation was reset)" if entry.history else ""
                yield sse_event("error", {"message": err.message + reset, "status": err.status})

        return StreamingResponse(sse(), media_type="text/event-stream", headers=SSE_HEADERS)

    from chatspot_edge.runtime.openai_api import add_openai_routes

    add_openai_routes(app, engine, answers, options, stats)
    return app


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(event: str | None, data: Any) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


# -- the command --------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True when every address `host` resolves to is a loopback address."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as e:
        raise InputError(f"--host {host}: cannot resolve ({e})") from None
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port)."""
    try:
        info = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class _RedactSessionIds(logging.Filter):
    """Access-log lines show the first 6 characters of a session id, never the whole key."""

    _re = re.compile(r"(/api/sessions/[A-Za-z0-9_-]{6})[A-Za-z0-9_-]+")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._re.sub(r"\1…", a) if isinstance(a, str) else a for a in record.args)
        return True


def serve(bundle: Path, host: str = "127.0.0.1", port: int = 8000, allow_remote: bool = False,
          llm: str | None = None, vision: str | None = None, threads: int | None = None,
          options: ServeOptions | None = None) -> None:
    """Load the bundle and serve until interrupted. A non-loopback host needs `allow_remote`."""
    import uvicorn

    options = options or ServeOptions()
    if port < 0 or port > 65535:
        raise InputError(f"--port {port}: must be 0..65535")
    loopback = is_loopback(host)
    if not loopback and not allow_remote:
        raise InputError(f"--host {host} is not a loopback address: anyone who can reach it could use the model "
                         "and upload images (there is no authentication); add --allow-remote if you mean it")
    options.loopback_only = loopback
    # One llama.cpp sequence slot: the session being answered has the KV cache to itself and the others are
    # parked (their KV state saved, then restored when they ask again: for mini 4.6 KB per position, ~0.3 MB
    # for its image prefix).
    # So every answer runs on the same KV layout as it would alone and is identical to its answer alone.
    # With several sequences in llama.cpp's unified cache, cell placement changes the float summation order
    # and greedy answers flip at near-ties (measured on the test bundle: 1 answer in 7 differed).
    engine = Engine.load(bundle, threads=threads, llm=llm, vision=vision, max_sessions=1)
    app = create_app(engine, options, llm=llm, vision=vision)
    sock = bind_socket(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    if not loopback:
        print(f"WARNING: serving on {shown}:{bound}, reachable from other machines; there is no authentication: "
              "anyone who can connect can use the model and upload images", file=sys.stderr)
    print(f"chatspot-edge serve: {bundle} on http://{shown}:{bound}/  (API schema: /openapi.json)", file=sys.stderr,
          flush=True)
    logging.getLogger("uvicorn.access").addFilter(_RedactSessionIds())
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5, limit_concurrency=256,
                            server_header=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        engine.close()
