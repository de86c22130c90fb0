"""The front door: OpenAI POSTs straight to their handler, everything else to Litestar, the
handler's failures answered exactly as Litestar's exception handler answers them, and every
answer with an x-request-id."""

from __future__ import annotations

import json
import logging
import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import app as app_module
from gateway.app import FrontDoor
from gateway.errors import ModelNotFound, RateLimited
from tests.conftest import StartGateway
from tests.helpers import ADMIN_KEY, GatewayProcess, free_port, wait_until
from tests.supervisor.support import fake

GENERATED = re.compile(r"^req_[0-9a-f]{12}[0-9a-f]+$")


class Inner:
    """Stands in for the Litestar app: records what reached it."""

    cors_config = None

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.calls.append((scope.get("method", ""), scope.get("path", "")))


async def _call(door: FrontDoor, method: str, path: str, request_id: bytes | None = None) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and any(m["type"] == "http.response.start" for m in sent):
            raise RuntimeError("Expected ASGI message 'http.response.body'")  # what uvicorn does
        sent.append(message)

    await door(_scope(method, path, request_id), receive, send)
    return sent


def _scope(method: str, path: str, request_id: bytes | None = None) -> dict[str, Any]:
    headers = [(b"x-request-id", request_id)] if request_id is not None else []
    return {"type": "http", "method": method, "path": path, "headers": headers}


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


async def test_a_bug_s_500_carries_the_request_id(served: list[Any], caplog: pytest.LogCaptureFixture) -> None:
    served[0].raises = KeyError("bug")
    with caplog.at_level(logging.ERROR, logger="gateway"):
        start, _ = await _call(FrontDoor(Inner()), "POST", "/v1/chat/completions")  # type: ignore[arg-type]
    generated = dict(start["headers"])[b"x-request-id"].decode()
    assert start["status"] == 500 and GENERATED.match(generated)
    assert [r.request_id for r in caplog.records if r.exc_info] == [generated]  # type: ignore[attr-defined]

    start, _ = await _call(FrontDoor(Inner()), "POST", "/v1/embeddings", b"mine-123")  # type: ignore[arg-type]
    assert start["status"] == 500 and dict(start["headers"])[b"x-request-id"] == b"mine-123"


async def test_litestar_s_answers_get_a_request_id_unless_they_have_one() -> None:
    class Answers(Inner):
        headers: list[tuple[bytes, bytes]] = []

        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            await send({"type": "http.response.body", "body": b""})

    inner = Answers()
    start, body = await _call(FrontDoor(inner), "GET", "/v1/models")  # type: ignore[arg-type]
    assert GENERATED.match(dict(start["headers"])[b"x-request-id"].decode()) and body["body"] == b""
    start, _ = await _call(FrontDoor(inner), "GET", "/v1/models", b"mine-123")  # type: ignore[arg-type]
    assert dict(start["headers"])[b"x-request-id"] == b"mine-123"
    start, _ = await _call(FrontDoor(inner), "GET", "/v1/models", b"not valid!")  # type: ignore[arg-type]
    assert GENERATED.match(dict(start["headers"])[b"x-request-id"].decode())

    inner.headers = [(b"x-request-id", b"set-by-the-handler")]
    start, _ = await _call(FrontDoor(inner), "GET", "/v1/models", b"mine-123")  # type: ignore[arg-type]
    assert start["headers"] == [(b"x-request-id", b"set-by-the-handler")]


def test_every_answer_carries_x_request_id(start_gateway: StartGateway) -> None:
    """The README's promise, on every kind of answer: generated when the client sends none, the
    client's own when it sends one."""
    backend = {"name": "b", "runtime": "openai", "url": f"http://127.0.0.1:{free_port()}", "serves": ["m"]}
    gateway = start_gateway({"backends": [backend]}, ready=False)
    key = gateway.new_key()
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    cases = [  # method, path, key, body, status
        ("POST", "/v1/chat/completions", "nope", chat, 401),
        ("GET", "/v1/chat/completions", key, None, 405),
        ("GET", "/v1/models", key, None, 200),
        ("GET", "/v1/models", "nope", None, 401),
        ("GET", "/v1/models/nope", key, None, 404),
        ("POST", "/v1/responses", key, {}, 404),
        ("POST", "/v1/models", key, None, 405),
        ("GET", "/admin/keys", ADMIN_KEY, None, 200),
        ("GET", "/admin/keys", key, None, 401),
        ("GET", "/admin/backends/nope", ADMIN_KEY, None, 404),
        ("GET", "/health", None, None, 200),
    ]
    wrong = []
    for method, path, secret, body, status in cases:
        headers = {"authorization": f"Bearer {secret}"} if secret else {}
        for sent in (None, "mine-123"):
            response = httpx.request(method, gateway.url + path, json=body, timeout=30,
                                     headers={**headers, **({"x-request-id": sent} if sent else {})})
            assert response.status_code == status, (method, path, response.text)
            got = response.headers.get("x-request-id")
            if not ((got == sent) if sent else GENERATED.match(got or "")):
                wrong.append((method, path, status, sent, got))
    refused = httpx.post(gateway.url + "/v1/models", headers={"authorization": f"Bearer {key}"})
    allow = sorted(refused.headers.get("allow", "").split(", "))  # a 405 says what the path accepts
    assert (wrong, refused.status_code, allow) == ([], 405, ["GET", "OPTIONS"])


def test_a_sighup_while_starting_is_applied_once_started(tmp_path: Path) -> None:
    # An eager backend that takes 3 s to load holds the start-up; SIGHUP's default would kill.
    backend = fake("slow", env={"FAKE_LOAD_SECONDS": "3"}, startup_timeout="20s")
    gateway = GatewayProcess({"backends": [backend], "limits": {"default": {"rpm": 5}}}, tmp_path)
    try:
        assert wait_until(lambda: "Waiting for application startup" in gateway.log(), timeout=30), gateway.log()
        time.sleep(0.5)  # into the lifespan, which waits for the backend
        gateway.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        gateway.proc.send_signal(signal.SIGHUP)  # twice: one reload is enough
        gateway.wait_healthy(60)
        assert wait_until(lambda: "config reloaded on SIGHUP" in gateway.log(), timeout=10), gateway.log()
        assert gateway.log().count("SIGHUP while starting") == 1
        assert gateway.log().count("config reloaded on SIGHUP") == 1
    finally:
        gateway.stop()


def test_a_start_that_cannot_reach_redis_says_so_in_one_line(tmp_path: Path) -> None:
    config = {"store": {"url": f"redis://127.0.0.1:{free_port()}/0"},
              "backends": [{"name": "away", "runtime": "openai", "url": f"http://127.0.0.1:{free_port()}",
                            "serves": ["m"]}]}
    gateway = GatewayProcess(config, tmp_path)
    try:
        assert gateway.proc.wait(60) == 3  # uvicorn's "startup failed"
        assert "The gateway cannot start: Error 111 connecting to 127.0.0.1" in gateway.log()
        assert "Traceback" not in gateway.log()
    finally:
        gateway.stop()
