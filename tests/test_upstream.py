"""The upstream pool against a server that closes a kept-alive connection under a request."""

from __future__ import annotations

import asyncio

import pytest

from adapters.base import Adapter, UpstreamRequest
from gateway.errors import BackendUnavailable
from gateway.upstream import Upstream

REPLY = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n"
         b"connection: keep-alive\r\n\r\n{\"ok\":true}")


async def _server(close_after: int | None) -> tuple[asyncio.AbstractServer, int, list[int]]:
    """Answers each request on a connection; with `close_after`, a connection that has answered
    that many closes when the next request arrives, without a reply (as a runtime whose idle
    timeout fired while the request was on its way)."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(0)
        me = len(connections) - 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                if close_after is not None and connections[me] >= close_after:
                    break
                connections[me] += 1
                writer.write(REPLY)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], connections


async def _call(upstream: Upstream, port: int) -> bytes:
    resp = await upstream.send(f"http://127.0.0.1:{port}", Adapter(), UpstreamRequest("/v1/x", {"a": 1}),
                               backend="b", headers={})
    return await upstream.read(resp, "b")


async def test_a_pooled_connection_closed_under_a_request_is_retried_on_another() -> None:
    server, port, connections = await _server(close_after=1)
    upstream = Upstream(connect_timeout=2, request_timeout=5)
    await upstream.open()
    try:
        assert await _call(upstream, port) == b'{"ok":true}'
        # The pooled connection is reused, closed by the server as the request arrives, and the
        # request succeeds on a second connection.
        assert await _call(upstream, port) == b'{"ok":true}'
        assert connections == [1, 1]
    finally:
        await upstream.close()
        server.close()


async def test_a_server_that_keeps_dropping_requests_is_unavailable() -> None:
    server, port, connections = await _server(close_after=0)
    upstream = Upstream(connect_timeout=2, request_timeout=5)
    await upstream.open()
    try:
        with pytest.raises(BackendUnavailable):
            await _call(upstream, port)
        assert len(connections) == 2  # one retry, not more
    finally:
        await upstream.close()
        server.close()
