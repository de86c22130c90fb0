"""The front door: OpenAI POSTs straight to their handler, everything else to Litestar, and the
handler's failures answered exactly as Litestar's exception handler answers them."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from gateway import app as app_module
from gateway.app import FrontDoor
from gateway.errors import ModelNotFound, RateLimited


class Inner:
    """Stands in for the Litestar app: records what reached it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.calls.append((scope.get("method", ""), scope.get("path", "")))


async def _call(door: FrontDoor, method: str, path: str) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and any(m["type"] == "http.response.start" for m in sent):
            raise RuntimeError("Expected ASGI message 'http.response.body'")  # what uvicorn does
        sent.append(message)

    await door(_scope(method, path), receive, send)
    return sent


def _scope(method: str, path: str) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "headers": []}


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What the hot handler was called with; it raises whatever the test puts in `raises`."""
    calls: list[Any] = []

    async def serve(scope: dict[str, Any], receive: Any, send: Any, endpoint: str) -> None:
        calls.append((endpoint, scope["app"]))
        if getattr(serve, "started", False):
            await send({"type": "http.response.start", "status": 200, "headers": []})
        if getattr(serve, "raises", None) is not None:
            raise serve.raises  # type: ignore[attr-defined]

    monkeypatch.setattr(app_module.v1, "serve", serve)
    calls.append(serve)
    return calls


async def test_openai_posts_skip_litestar_and_the_rest_reaches_it(served: list[Any]) -> None:
    inner = Inner()
    door = FrontDoor(inner)  # type: ignore[arg-type]
    for path, endpoint in (("/v1/chat/completions", "chat"), ("/v1/completions", "completions"),
                           ("/v1/embeddings", "embeddings")):
        assert await _call(door, "POST", path) == []
        assert served[-1] == (endpoint, inner)  # the handler finds the gateway through scope["app"]
    await _call(door, "GET", "/v1/chat/completions")  # 405 and OPTIONS stay Litestar's routes
    await _call(door, "POST", "/v1/models")
    await door({"type": "lifespan"}, None, None)
    assert inner.calls == [("GET", "/v1/chat/completions"), ("POST", "/v1/models"), ("", "")]


async def test_a_gateway_error_is_the_openai_error_with_its_status_and_headers(served: list[Any]) -> None:
    served[0].raises = RateLimited("Slow down.", retry_after=3)
    sent = await _call(FrontDoor(Inner()), "POST", "/v1/chat/completions")  # type: ignore[arg-type]
    start, body = sent
    assert start["status"] == 429
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"retry-after"] == b"3"
    assert int(headers[b"content-length"]) == len(body["body"])
    assert json.loads(body["body"])["error"]["code"] == "rate_limit_exceeded"

    served[0].raises = ModelNotFound("nope")
    start, body = await _call(FrontDoor(Inner()), "POST", "/v1/embeddings")  # type: ignore[arg-type]
    assert start["status"] == 404
    assert json.loads(body["body"])["error"]["code"] == "model_not_found"


async def test_a_bug_is_a_logged_500_that_says_nothing_of_the_code(served: list[Any],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    served[0].raises = KeyError("secret detail")
    with caplog.at_level(logging.ERROR, logger="gateway"):
        start, body = await _call(FrontDoor(Inner()), "POST", "/v1/completions")  # type: ignore[arg-type]
    assert start["status"] == 500
    error = json.loads(body["body"])["error"]
    assert error["code"] == "internal_error" and "secret" not in error["message"]
    assert any("unhandled error on POST /v1/completions" in r.message and r.exc_info for r in caplog.records)


async def test_a_failure_after_the_answer_began_goes_to_the_server(served: list[Any]) -> None:
    served[0].started = True
    served[0].raises = KeyError("late")
    with pytest.raises(KeyError):  # uvicorn then closes the connection: a half answer is never "completed"
        await _call(FrontDoor(Inner()), "POST", "/v1/chat/completions")  # type: ignore[arg-type]
