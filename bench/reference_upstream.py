# Issue 9's reference upstream: ../shared/bench/fake_openai.py from the project's shared bench
# material, copied here unchanged (only this comment block is added) so that the bench's
# "reference" phase measures against the same yardstick as the table, and its ratios
# compare with the issue's. It is slower per request than bench/fake_upstream.py: it serializes
# each chunk with json.dumps, where fake_upstream.py builds every body once at import. It answers
# /health (and /) but not /stats. bench/run.py starts it as `reference_upstream:app`.
"""Minimal, fast OpenAI-compatible upstream for gateway overhead benchmarks.

Raw ASGI (no framework) so the upstream costs as little CPU as possible.
POST /v1/chat/completions: JSON reply, or SSE with CHUNKS chunks when stream=true.
"""
import json, os, time

CHUNKS = int(os.environ.get("FAKE_CHUNKS", "20"))
MODEL = os.environ.get("FAKE_MODEL", "fake")

def _completion():
    return json.dumps({
        "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello " * 8},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20},
    }).encode()

def _chunk(i, include_usage):
    c = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
         "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}]}
    return b"data: " + json.dumps(c).encode() + b"\n\n"

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"}); return
    path = scope["path"]
    body = b""
    more = True
    while more:
        m = await receive(); body += m.get("body", b""); more = m.get("more_body", False)
    if path.endswith("/models"):
        out = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "fake"}]}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": out}); return
    if path in ("/health", "/"):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"status":"ok"}'}); return
    req = json.loads(body or b"{}")
    if req.get("stream"):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(CHUNKS):
            await send({"type": "http.response.body", "body": _chunk(i, False), "more_body": True})
        fin = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
               "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        tail = b"data: " + json.dumps(fin).encode() + b"\n\n"
        if (req.get("stream_options") or {}).get("include_usage"):
            u = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": MODEL, "choices": [],
                 "usage": {"prompt_tokens": 12, "completion_tokens": CHUNKS, "total_tokens": 12 + CHUNKS}}
            tail += b"data: " + json.dumps(u).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n"}); return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": _completion()})
