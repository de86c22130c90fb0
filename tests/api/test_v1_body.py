"""Reading a request's body (gateway.api.v1.Exchange.body): whole, bounded in size; a client that
leaves while sending is heard. (The bound in time is the server protocol's: tests/test_protocol.py.)"""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any

import httpx
import pytest

from gateway.api import v1
from gateway.errors import BodyTooLarge, ClientClosedRequest, UnsupportedEncoding
from tests.conftest import StartGateway
from tests.helpers import free_port


def exchange(*messages: dict[str, Any], length: int | None = None,
             encoding: bytes | None = None) -> v1.Exchange:
    """An exchange whose client sends `messages`, then nothing more (it stalls)."""
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()  # a client that stopped sending
        raise AssertionError

    headers = [(b"content-length", str(length).encode())] if length is not None else []
    if encoding is not None:
        headers.append((b"content-encoding", encoding))
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


async def test_a_compressed_body_is_refused_as_unsupported_before_it_is_read() -> None:
    # Not inflated: max_body would bound only the compressed size (a zip bomb).
    for encoding in (b"gzip", b"br", b"deflate, gzip"):
        with pytest.raises(UnsupportedEncoding) as refused:
            await exchange(part(gzip.compress(b"{}"), False), encoding=encoding).body(100)
        assert refused.value.status == 415 and refused.value.headers == {"accept-encoding": "identity"}
    assert await exchange(part(b"{}", False), encoding=b"Identity").body(100) == b"{}"


def test_a_gzip_body_gets_the_openai_415(start_gateway: StartGateway) -> None:
    backend = {"name": "b", "runtime": "openai", "url": f"http://127.0.0.1:{free_port()}", "serves": ["m"]}
    gateway = start_gateway({"backends": [backend]}, ready=False)
    body = gzip.compress(json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode())
    refused = httpx.post(gateway.url + "/v1/chat/completions", content=body, timeout=30, headers={
        "authorization": f"Bearer {gateway.new_key()}", "content-type": "application/json",
        "content-encoding": "gzip"})
    assert refused.status_code == 415 and refused.headers["accept-encoding"] == "identity"
    assert refused.json()["error"]["code"] == "unsupported_content_encoding"
    assert "x-request-id" in refused.headers
    # Counted where the dashboard's refusals panel reads (it was counted nowhere).
    scraped = httpx.get(gateway.url + "/metrics", timeout=30).text
    assert 'gateway_rejected_total{reason="unsupported_encoding"} 1.0' in scraped.splitlines()
