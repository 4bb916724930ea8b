"""OpenAI-style `/v1/chat/completions` and `/v1/models`, so existing clients can talk to `chatspot-edge serve`.

The image travels as OpenAI's `image_url` content part with a data URL (`data:image/png;base64,...`); other
URLs are refused (the server makes no network calls and reads no files for a client). The region is the
request's `region` extension, `{"point": [x, y]}`, `{"box": [x1, y1, x2, y2]}` or `{"polygon": [[x, y], ...]}`
in pixels of the image (openai-python: `extra_body={"region": {...}}`); a question may also carry regions
already written in the model's own format (`<box>[0.100,0.200,0.450,0.610]</box>`, normalized).

Each request is answered as ONE question about its image: the last user message's text. Earlier turns and
system messages are not part of the prompt (the bundle brings its own system prompt; the runtime has no way
to replay a client-written answer); `/api/sessions` with `history=true` is the multi-turn route. The server
keeps the KV prefix of the last few images, keyed by content, so a follow-up about the same image prefills
only the question. Streaming uses OpenAI's chunk format (`chat.completion.chunk` events, then `[DONE]`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
import time
from collections import OrderedDict
from typing import Annotated, Literal, Union

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from chatspot_edge.errors import InputError
from chatspot_edge.runtime.engine import Engine, Session
from chatspot_edge.runtime.server import SSE_HEADERS, Answers, ApiError, ServeOptions, api_error, sse_event

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


class ImageTooLarge(InputError):
    """The decoded image is over the server's upload limit (413)."""


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str = Field(description="a data URL: data:image/png;base64,...")
    detail: str | None = Field(None, description="accepted and ignored (the model has one input size)")


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class RegionExtension(BaseModel):
    """The region the question is about, in PIXELS of the request's image. At most one of point, box, polygon."""

    point: list[float] | None = Field(None, examples=[[120, 80]])
    box: list[float] | None = Field(None, examples=[[40, 30, 200, 160]])
    polygon: list[float] | list[list[float]] | None = Field(None, examples=[[[10, 10], [150, 20], [80, 100]]])
    clip: bool = False


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request (fields this server does not use, e.g. top_p, are accepted and ignored)
    plus `region`."""

    model_config = ConfigDict(extra="allow")
    model: str | None = Field(None, description="any value: the server serves one model")
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default 0 (greedy)")
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    region: RegionExtension | None = Field(None, description="extension: the region the question is about")


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a base64 (or percent-encoded) data URL; InputError for anything else."""
    m = _DATA_URL.match(url)
    if not m:
        scheme = url.split(":", 1)[0][:20] if ":" in url else "no scheme"
        raise InputError(f"image_url must be a data URL (data:image/...;base64,...), got {scheme!r}: this server "
                         "fetches nothing and reads no files for a client")
    payload = url[m.end():]
    if not m.group("b64"):
        from urllib.parse import unquote_to_bytes

        data = unquote_to_bytes(payload)
    else:
        if len(payload) > max_bytes * 4 // 3 + 8:
            raise ImageTooLarge(f"image is over the {max_bytes / 2**20:g} MiB limit (--max-upload-mb)")
        try:
            data = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
        except (binascii.Error, ValueError) as e:
            raise InputError(f"image_url: invalid base64 ({e})") from None
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image is over the {max_bytes / 2**20:g} MiB limit (--max-upload-mb)")
    if not data:
        raise InputError("image_url: the image is empty")
    return data


def split_messages(messages: list[ChatMessage]) -> tuple[str, str]:
    """(question, image data URL): the last user message's text, and the latest image in the conversation."""
    users = [m for m in messages if m.role == "user"]
    if not users:
        raise InputError("messages: no user message")
    last = users[-1]
    parts = [TextPart(type="text", text=last.content)] if isinstance(last.content, str) else (last.content or [])
    question = "\n".join(p.text for p in parts if isinstance(p, TextPart)).strip()
    if not question:
        raise InputError("messages: the last user message has no text")
    url = None
    for m in reversed(users):
        images = [p for p in (m.content if isinstance(m.content, list) else []) if isinstance(p, ImagePart)]
        if len(images) > 1:
            raise InputError("messages: one image per message (this model answers about one image)")
        if images:
            url = images[0].image_url.url
            break
    if url is None:
        raise InputError("messages: no image (add an image_url part with a data URL)")
    return question, url


def add_openai_routes(app: FastAPI, engine: Engine, answers: Answers, options: ServeOptions, stats: dict) -> None:
    """Add /v1/models and /v1/chat/completions to the server's app (model work through its `answers`)."""
    model_id = str(engine.manifest["model"].get("name") or "chatspot")
    created = int(time.time())
    images: OrderedDict[str, Session] = OrderedDict()  # content hash -> session; touched on the model thread only

    def session_for(data: bytes) -> Session:
        """(model thread) The cached session of this image, or a new one (its image validated by the runtime)."""
        key = hashlib.sha256(data).hexdigest()
        s = images.get(key)
        if s is None:
            s = engine.session(data)
            images[key] = s
            while len(images) > options.v1_image_cache:
                images.popitem(last=False)[1].close()
        images.move_to_end(key)
        return s

    @app.get("/v1/models", tags=["openai"])
    async def list_models():
        """OpenAI's model list: the one model this server runs."""
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "chatspot-edge"}]}

    @app.post("/v1/chat/completions", tags=["openai"],
              responses={200: {"description": "a chat.completion object, or with stream=true server-sent "
                                              "chat.completion.chunk events ending in `data: [DONE]`"}})
    async def chat_completions(req: ChatCompletionRequest):
        """OpenAI-compatible chat completion about the image in the messages and the `region` extension."""
        try:
            question, url = split_messages(req.messages)
            data = decode_data_url(url, options.max_upload_bytes)
        except InputError as e:
            raise ApiError(413 if isinstance(e, ImageTooLarge) else 400, str(e)) from None
        max_tokens = req.max_completion_tokens or req.max_tokens or options.default_max_tokens
        if max_tokens > options.max_tokens:
            raise ApiError(400, f"max_tokens must be 1..{options.max_tokens} (--max-tokens), got {max_tokens}")
        region = req.region.model_dump(exclude={"clip"}, exclude_none=True) if req.region else {}
        clip = bool(req.region and req.region.clip)
        temperature = req.temperature or 0.0
        seed = req.seed or 0
        try:
            pieces = answers.stream(lambda: session_for(data), question, region, clip, max_tokens, temperature,
                                    seed, keep_turns=False)
            first = await anext(pieces)
        except Exception as e:  # noqa: BLE001
            raise api_error(e) from None
        cid = "chatcmpl-" + secrets.token_hex(12)
        now = int(time.time())

        def finish(end) -> tuple[str, dict, dict]:
            timings, reason = end
            # prompt tokens this request prefilled (a cached image prefix is not counted)
            usage = {"prompt_tokens": timings.n_prompt, "completion_tokens": timings.n_generated,
                     "total_tokens": timings.n_prompt + timings.n_generated}
            return reason, usage, timings.model_dump()

        async def items():
            yield first
            async for item in pieces:
                yield item

        if not req.stream:
            text = []
            try:
                async for kind, value in items():
                    if kind == "text":
                        text.append(value)
                    else:
                        reason, usage, timings = finish(value)
            except Exception as e:  # noqa: BLE001
                raise api_error(e) from None
            stats["answers"] += 1
            return {"id": cid, "object": "chat.completion", "created": now, "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                 "finish_reason": reason, "logprobs": None}],
                    "usage": usage, "timings": timings}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict, reason: str | None = None, **extra) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}], **extra}
            return sse_event(None, body)

        async def sse():
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for kind, value in items():
                    if kind == "text":
                        yield chunk({"content": value})
                    else:
                        reason, usage, timings = finish(value)
                        yield chunk({}, reason, timings=timings)
                        if include_usage:
                            yield sse_event(None, {"id": cid, "object": "chat.completion.chunk", "created": now,
                                                   "model": model_id, "choices": [], "usage": usage})
                        stats["answers"] += 1
            except Exception as e:  # noqa: BLE001 - the status line is gone: an error object in the stream
                err = api_error(e)
                stats["timeouts" if err.status == 504 else "errors"] += 1
                kind = "invalid_request_error" if err.status < 500 else "server_error"
                yield sse_event(None, {"error": {"message": err.message, "type": kind, "code": err.status}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers=SSE_HEADERS)
