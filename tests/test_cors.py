"""CORS for browser clients (gateway/cors.py): off unless `server.cors_origins` names origins;
then the preflights, Litestar's routes and the OpenAI POSTs that skip Litestar all answer an
allowed origin, and only it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import ConfigError, parse
from gateway.cors import cors_config, with_cors
from tests.api.test_v1_accounting import CHAT, runtime_serving
from tests.conftest import StartGateway

UI = "https://chat.example.com"
DEAD = {"name": "b", "runtime": "openai", "url": "http://127.0.0.1:9", "serves": ["m"]}


async def _start_headers(origins: list[str], origin: bytes | None) -> dict[bytes, bytes]:
    config = cors_config(origins)
    assert config is not None
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"headers": [(b"origin", origin)] if origin is not None else []}
    wrapped = with_cors(config, scope, send)
    await wrapped({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await wrapped({"type": "http.response.body", "body": b"{}"})
    assert sent[1] == {"type": "http.response.body", "body": b"{}"}
    return dict(sent[0]["headers"])


async def test_an_allowed_origin_gets_allow_origin_vary_and_the_exposed_headers() -> None:
    headers = await _start_headers([UI], UI.encode())
    assert headers[b"access-control-allow-origin"] == UI.encode() and headers[b"vary"] == b"Origin"
    exposed = headers[b"access-control-expose-headers"].decode().split(", ")
    assert {"x-request-id", "retry-after", "x-ratelimit-remaining-tokens"} <= set(exposed)
    assert headers[b"content-type"] == b"application/json"  # the answer's own headers stay


async def test_other_origins_get_no_allow_origin_and_any_origin_gets_a_star() -> None:
    assert b"access-control-allow-origin" not in await _start_headers([UI], b"https://evil.example")
    assert b"access-control-allow-origin" not in await _start_headers([UI], None)
    wildcard = await _start_headers(["https://*.example.com"], b"https://a.example.com")
    assert wildcard[b"access-control-allow-origin"] == b"https://a.example.com"
    assert (await _start_headers(["*"], b"https://anyone.example"))[b"access-control-allow-origin"] == b"*"


def test_off_by_default_and_origins_are_checked_once() -> None:
    assert parse({"backends": [DEAD]}, base_dir=Path("/srv"), env={}).server.cors_origins == []
    assert cors_config([]) is None
    for bad in ("chat.example.com", "https://chat.example.com/app", "*.example.com"):
        with pytest.raises(ConfigError) as refused:
            parse({"backends": [DEAD], "server": {"cors_origins": [bad]}}, base_dir=Path("/srv"), env={})
        assert "cors_origins" in str(refused.value.problems) and "an origin" in str(refused.value.problems)


@pytest.fixture
def runtime_url() -> Iterator[str]:
    with runtime_serving() as url:
        yield url


def _preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(url, headers={"origin": origin, "access-control-request-method": "POST",
                                       "access-control-request-headers": "authorization, content-type"})


def test_a_browser_client_on_an_allowed_origin_can_call_the_gateway(start_gateway: StartGateway,
                                                                    runtime_url: str) -> None:
    backend = {"name": "b", "runtime": "openai", "url": runtime_url, "serves": ["fast"]}
    gateway = start_gateway({"backends": [backend], "server": {"cors_origins": [UI]}})
    key = gateway.new_key()
    chat_url = gateway.url + "/v1/chat/completions"

    preflight = _preflight(chat_url, UI)
    assert preflight.status_code == 204, preflight.text
    assert preflight.headers["access-control-allow-origin"] == UI
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert _preflight(chat_url, "https://evil.example").status_code == 400

    for streamed in (False, True):  # the hot path, which skips Litestar, answered and streamed
        answer = httpx.post(chat_url, headers={"origin": UI, "authorization": f"Bearer {key}"},
                            json={"model": "fast", "messages": CHAT, "stream": streamed}, timeout=30)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == UI
        assert "x-request-id" in answer.headers["access-control-expose-headers"]
    refused = httpx.post(chat_url, headers={"origin": UI, "authorization": "Bearer nope"},
                         json={"model": "fast", "messages": CHAT})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == UI  # errors too
    models = httpx.get(gateway.url + "/v1/models", headers={"origin": UI, "authorization": f"Bearer {key}"})
    assert models.status_code == 200 and models.headers["access-control-allow-origin"] == UI  # Litestar's routes
    other = httpx.post(chat_url, headers={"origin": "https://evil.example", "authorization": f"Bearer {key}"},
                       json={"model": "fast", "messages": CHAT})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_without_cors_origins_no_answer_carries_cors_headers(start_gateway: StartGateway, runtime_url: str) -> None:
    backend = {"name": "b", "runtime": "openai", "url": runtime_url, "serves": ["fast"]}
    gateway = start_gateway({"backends": [backend]})
    key = gateway.new_key()
    chat_url = gateway.url + "/v1/chat/completions"
    assert "access-control-allow-origin" not in _preflight(chat_url, UI).headers
    answer = httpx.post(chat_url, headers={"origin": UI, "authorization": f"Bearer {key}"},
                        json={"model": "fast", "messages": CHAT}, timeout=30)
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers
