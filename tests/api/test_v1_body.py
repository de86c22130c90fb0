"""Reading a request's body (gateway.api.v1.Exchange.body): whole, bounded in size; a client that
leaves while sending is heard. (The bound in time is the server protocol's: tests/test_protocol.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.api import v1
from gateway.errors import BodyTooLarge, ClientClosedRequest


def exchange(*messages: dict[str, Any], length: int | None = None) -> v1.Exchange:
    """An exchange whose client sends `messages`, then nothing more (it stalls)."""
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()  # a client that stopped sending
        raise AssertionError

    headers = [(b"content-length", str(length).encode())] if length is not None else []
    return v1.Exchange({"headers": headers}, receive, None, None)  # type: ignore[arg-type]


def part(body: bytes, more: bool) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


async def test_a_body_in_pieces_is_joined() -> None:
    assert await exchange(part(b"ab", True), part(b"", True), part(b"cd", False)).body(100) == b"abcd"
    assert await exchange(part(b"whole", False)).body(100) == b"whole"


async def test_a_body_over_the_limit_is_refused_as_soon_as_it_is_over() -> None:
    with pytest.raises(BodyTooLarge):
        await exchange(part(b"x" * 60, True), part(b"x" * 60, True)).body(100)  # then it stalls
    with pytest.raises(BodyTooLarge):
        await exchange(part(b"x" * 101, False)).body(100)
    with pytest.raises(BodyTooLarge):
        await exchange(length=101).body(100)


async def test_a_client_that_leaves_while_sending_is_a_499() -> None:
    with pytest.raises(ClientClosedRequest):
        await exchange(part(b"ab", True), {"type": "http.disconnect"}).body(100)
    with pytest.raises(ClientClosedRequest):
        await exchange({"type": "http.disconnect"}).body(100)
