"""A fast fake OpenAI-compatible upstream for the gateway benchmark.

Raw ASGI, no framework: the upstream must cost as little CPU as possible, because on the
benchmark machine it shares the cores with the gateway and the load generator. Every response
body is built once at import; a request costs one small JSON decode (to see `stream` and
`stream_options.include_usage`) and the sends.

    POST /v1/chat/completions   JSON reply, or SSE with FAKE_CHUNKS content chunks when stream=true;
                                with stream_options.include_usage a final `choices: []` usage chunk
    GET  /v1/models             the one model
    GET  /health                {"status":"ok"}
    GET  /stats                 {"inflight", "peak_inflight", "requests", "streams"} (for the harness)

Environment:
    FAKE_MODEL        model id it reports (default "fake")
    FAKE_CHUNKS       content chunks per stream (default 20)
    FAKE_CHUNK_DELAY  seconds between chunks (default 0): a slow stream for the held-connections test
    FAKE_DELAY        seconds before a non-streamed reply or the first chunk (default 0)

Run (what bench/run.py does):
    python -m uvicorn fake_upstream:app --app-dir bench --loop uvloop --http httptools \
        --no-access-log --log-level warning --port 9000
"""

from __future__ import annotations

import asyncio
import json
import os
import time

MODEL = os.environ.get("FAKE_MODEL", "fake")
CHUNKS = int(os.environ.get("FAKE_CHUNKS", "20"))
CHUNK_DELAY = float(os.environ.get("FAKE_CHUNK_DELAY", "0"))
DELAY = float(os.environ.get("FAKE_DELAY", "0"))

_CREATED = int(time.time())
_ID = "chatcmpl-bench0000000000000000"
_PROMPT_TOKENS = 12
_COMPLETION_TOKENS = 8


def _dump(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


_COMPLETION = _dump({
    "id": _ID, "object": "chat.completion", "created": _CREATED, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello " * _COMPLETION_TOKENS},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": _PROMPT_TOKENS, "completion_tokens": _COMPLETION_TOKENS,
              "total_tokens": _PROMPT_TOKENS + _COMPLETION_TOKENS},
})


def _chunk(delta: dict, finish: str | None, with_usage_field: bool) -> bytes:
    chunk: dict = {"id": _ID, "object": "chat.completion.chunk", "created": _CREATED, "model": MODEL,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if with_usage_field:
        chunk["usage"] = None  # OpenAI: every chunk carries usage:null when include_usage is on
    return b"data: " + _dump(chunk) + b"\n\n"


def _chunks(with_usage: bool) -> list[bytes]:
    """The whole stream, one entry per send: the role+first token, the tokens, the finish, the tail."""
    parts = [_chunk({"role": "assistant", "content": "tok "}, None, with_usage)]
    parts += [_chunk({"content": "tok "}, None, with_usage) for _ in range(CHUNKS - 1)]
    tail = _chunk({}, "stop", with_usage)
    if with_usage:
        tail += b"data: " + _dump({
            "id": _ID, "object": "chat.completion.chunk", "created": _CREATED, "model": MODEL, "choices": [],
            "usage": {"prompt_tokens": _PROMPT_TOKENS, "completion_tokens": CHUNKS,
                      "total_tokens": _PROMPT_TOKENS + CHUNKS},
        }) + b"\n\n"
    parts.append(tail + b"data: [DONE]\n\n")
    return parts


_STREAM = {False: _chunks(False), True: _chunks(True)}
_MODELS = _dump({"object": "list", "data": [{"id": MODEL, "object": "model", "created": _CREATED, "owned_by": "fake"}]})
_HEALTH = b'{"status":"ok"}'
_NOT_FOUND = _dump({"error": {"message": "not found", "type": "invalid_request_error", "param": None, "code": None}})
_BAD = _dump({"error": {"message": "body is not JSON", "type": "invalid_request_error", "param": None, "code": None}})

_JSON = b"application/json"
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class _Stats:
    inflight = 0
    peak_inflight = 0
    requests = 0
    streams = 0


async def _reply(send, status: int, body: bytes, content_type: bytes = _JSON) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive) -> bytes:
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body"):
        return body
    parts = [body]
    while message.get("more_body"):
        message = await receive()
        parts.append(message.get("body", b""))
    return b"".join(parts)


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _completions(receive, send) -> None:
    try:
        request = json.loads(await _read_body(receive) or b"{}")
    except ValueError:
        await _reply(send, 400, _BAD)
        return
    _Stats.requests += 1
    _Stats.inflight += 1
    _Stats.peak_inflight = max(_Stats.peak_inflight, _Stats.inflight)
    try:
        if DELAY:
            await asyncio.sleep(DELAY)
        if not request.get("stream"):
            await _reply(send, 200, _COMPLETION)
            return
        _Stats.streams += 1
        options = request.get("stream_options")
        parts = _STREAM[bool(isinstance(options, dict) and options.get("include_usage"))]
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        last = len(parts) - 1
        for i, part in enumerate(parts):
            if CHUNK_DELAY and i:
                await asyncio.sleep(CHUNK_DELAY)
            await send({"type": "http.response.body", "body": part, "more_body": i < last})
    finally:
        _Stats.inflight -= 1


async def app(scope, receive, send) -> None:
    kind = scope["type"]
    if kind == "lifespan":
        await _lifespan(receive, send)
        return
    if kind != "http":
        return
    path = scope["path"]
    if path.endswith("/chat/completions") and scope["method"] == "POST":
        await _completions(receive, send)
    elif path.endswith("/models"):
        await _reply(send, 200, _MODELS)
    elif path in ("/health", "/"):
        await _reply(send, 200, _HEALTH)
    elif path == "/stats":
        await _reply(send, 200, _dump({"inflight": _Stats.inflight, "peak_inflight": _Stats.peak_inflight,
                                       "requests": _Stats.requests, "streams": _Stats.streams}))
    else:
        await _reply(send, 404, _NOT_FOUND)
