"""What the gateway hands the server for an answer (the ASGI messages): a stream's end rides on
its last piece, not on a write of its own. (That the head goes out with the body's first write
is the server protocol's: tests/test_protocol.py.)"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.config import parse
from tests.helpers import ADMIN_KEY

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
async def recorded(tmp_path: Path, fake_upstream: str) -> AsyncIterator[tuple[httpx.AsyncClient, list[dict[str, Any]]]]:
    """The gateway's app in this process, in front of the fake upstream (a token a millisecond,
    so a stream comes in several reads), with the messages it sends for /v1/ answers."""
    config = parse({"admin": {"key": ADMIN_KEY}, "data_dir": str(tmp_path / "data"),
                    "backends": [{"name": "b", "runtime": "openai", "url": fake_upstream, "serves": ["fake"]}]},
                   base_dir=tmp_path)
    door = create_app(config)
    messages: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async def record(message: dict[str, Any]) -> None:
            if scope["type"] == "http" and scope["path"].startswith("/v1/"):
                messages.append(message)
            await send(message)

        await door(scope, receive, record)

    async with door.app.state.gateway.lifespan(door.app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway",
                                     timeout=30) as client:
            yield client, messages


async def test_a_stream_s_last_piece_ends_the_answer(recorded: tuple[httpx.AsyncClient, list[dict[str, Any]]]) -> None:
    client, messages = recorded
    key = (await client.post("/admin/keys", json={"name": "writes"}, headers=ADMIN)).json()["key"]
    response = await client.post("/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, json={
        "model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 24, "stream": True})
    assert response.status_code == 200, response.text
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["choices"], events

    start, *bodies = messages
    assert start["type"] == "http.response.start"
    assert all(m["more_body"] for m in bodies[:-1]) and not bodies[-1].get("more_body", False), bodies
    assert all(m["body"] for m in bodies), "no write without bytes"  # the end came with the last event
    assert bodies[-1]["body"].endswith(b"data: [DONE]\n\n"), bodies[-1]
    assert len(bodies) > 1, "the fake's stream came in one read: the test says nothing"
