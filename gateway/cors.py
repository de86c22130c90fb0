"""CORS, for OpenAI clients that run in a browser and call the gateway from another origin
(web UIs in their client-side mode). Off unless `server.cors_origins` names origins.

Litestar's CORSConfig decides everything: its middleware answers the preflights and marks the
answers of Litestar's routes; `with_cors` marks the OpenAI POSTs, which skip Litestar
(gateway.app.FrontDoor), with the same config's headers, as Litestar's middleware would.
"""

from __future__ import annotations

from typing import Any

from litestar.config.cors import CORSConfig

# What a browser client may read of an answer besides the CORS-safelisted headers: the request
# id to report, and when to come back (the official SDKs read these).
EXPOSED = [
    "x-request-id", "retry-after", "retry-after-ms",
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
]


def cors_config(origins: list[str]) -> CORSConfig | None:
    if not origins:
        return None
    return CORSConfig(
        allow_origins=origins,
        allow_methods=["GET", "HEAD", "POST", "PATCH", "DELETE", "OPTIONS"],
        # Keys travel as a bearer token, never as a cookie: no credentials mode.
        allow_headers=["*"],
        allow_credentials=False,
        expose_headers=EXPOSED,
        max_age=600,
    )


def with_cors(config: CORSConfig, scope: Any, send: Any) -> Any:
    """`send`, adding the CORS headers to the answer of a request from an allowed origin."""
    origin = next((value for name, value in scope["headers"] if name == b"origin"), None)
    if origin is None:
        return send
    headers = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in config.simple_headers.items()]
    if not config.is_allow_all_origins:
        if not config.is_origin_allowed(origin.decode("latin-1")):
            return send  # no allow-origin: the browser keeps the answer from the page
        headers += [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]

    async def send_with_cors(message: Any) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *headers]}
        await send(message)

    return send_with_cors
