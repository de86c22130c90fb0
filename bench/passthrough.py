"""The issue's "minimal Litestar passthrough, aiohttp client": the bench's control row.

A bare relay on the gateway's own stack (Litestar on uvicorn + uvloop + httptools, one aiohttp
client session): POST /v1/chat/completions is forwarded to the upstream as bytes, the answer comes
back as bytes, a streamed answer relayed a socket read at a time. No auth, no admission, no routing,
no metrics, no usage accounting. What it costs is the floor any Python gateway on this stack pays;
bench/run.py measures it beside the gateway, against issue 9's reference upstream, so the gateway's
ratios can be read against what the stack alone reaches on this machine.

A streamed answer is recognised by the upstream's `Content-Type: text/event-stream`, not by looking
for `"stream":true` in the request body, so any spelling of the body works (bench/chat.lua's,
bench/loadgen.py's, httpx's); the upstream's status code is passed on.

    PASSTHROUGH_UPSTREAM   the upstream's base URL (default http://127.0.0.1:9100)

Run (what bench/run.py does):
    PASSTHROUGH_UPSTREAM=http://127.0.0.1:9100 python -m uvicorn passthrough:app --app-dir bench \
        --loop uvloop --http httptools --no-access-log --log-level warning --port 9200
"""

import os
from collections.abc import AsyncIterator

import aiohttp
from litestar import Litestar, Request, get, post
from litestar.response import Response, Stream

UPSTREAM = os.environ.get("PASSTHROUGH_UPSTREAM", "http://127.0.0.1:9100").rstrip("/") + "/v1/chat/completions"
HEADERS = {"content-type": "application/json"}
session: aiohttp.ClientSession | None = None


async def start() -> None:
    global session
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


async def stop() -> None:
    if session is not None:
        await session.close()


@get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}  # for bench/run.py's readiness check; not on the measured path


@post("/v1/chat/completions")
async def chat(request: Request) -> Response | Stream:
    body = await request.body()
    resp = await session.post(UPSTREAM, data=body, headers=HEADERS)
    if resp.content_type == "text/event-stream":
        async def relay() -> AsyncIterator[bytes]:
            try:
                async for piece in resp.content.iter_any():
                    yield piece
            finally:
                resp.release()

        return Stream(relay(), status_code=resp.status, media_type="text/event-stream")
    data = await resp.read()
    return Response(data, status_code=resp.status, media_type=resp.content_type or "application/json")


app = Litestar([chat, health], on_startup=[start], on_shutdown=[stop], openapi_config=None)
