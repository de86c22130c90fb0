"""The request path's HTTP/1.1 client against raw servers: what it sends, connection reuse and
its limits, every way an answer can end or fail, and its bounds on time and memory."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import pathlib
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway import http1, upstream
from tests.helpers import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(handle: Handler) -> tuple[asyncio.AbstractServer, int, list[int]]:
    """A server running `handle` per connection; the list counts the connections made."""
    connections: list[int] = []

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(counted, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], connections


@contextlib.asynccontextmanager
async def _talking_to(handle: Handler) -> AsyncIterator[tuple[http1.Client, int, list[int]]]:
    """A client, and the port of a server running `handle` (_serve), both closed at the end."""
    server, port, connections = await _serve(handle)
    client = http1.Client(connect_timeout=2)
    try:
        yield client, port, connections
    finally:
        client.close()
        server.close()


async def _request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return head, await reader.readexactly(length)


def _reply(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body), extra, body)


async def _echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        _, body = await _request(reader)
        writer.write(_reply(body))
        await writer.drain()


def _to(port: int, path: str = "/v1/x") -> http1.Target:
    return http1.target(f"http://127.0.0.1:{port}{path}")


async def test_the_request_is_a_post_with_its_headers_and_length() -> None:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, body = await _request(reader)
        seen.append(head + body)
        writer.write(_reply(b"{}"))
        await writer.drain()

    async with _talking_to(handle) as (client, port, _):
        resp = await client.post(_to(port, "/v1/chat/completions?x=1"), b'{"a":1}', {"x-request-id": "r1"}, timeout=5)
        assert await resp.read() == b"{}" and resp.status == 200
        resp.release()
    assert seen == [b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n"
                    b"content-type: application/json\r\nx-request-id: r1\r\ncontent-length: 7\r\n\r\n"
                    b'{"a":1}' % port]


def test_targets_name_the_host_as_http_wants_it() -> None:
    assert http1.target("https://example.org/v1/x").head.startswith(b"POST /v1/x HTTP/1.1\r\nhost: example.org\r\n")
    assert http1.target("https://example.org/v1/x").pool_key == ("example.org", 443, True)
    ipv6 = http1.target("http://[::1]:8080/v1/x")
    assert ipv6.pool_key == ("::1", 8080, False) and b"\r\nhost: [::1]:8080\r\n" in ipv6.head
    with pytest.raises(ValueError):
        http1.target("unix:///tmp/socket")


async def test_a_header_with_a_line_break_never_goes_out() -> None:
    client = http1.Client(connect_timeout=2)
    with pytest.raises(ValueError):
        await client.post(_to(9), b"{}", {"authorization": "Bearer x\r\nhost: evil"}, timeout=5)


async def test_one_connection_serves_request_after_request() -> None:
    async with _talking_to(_echo_forever) as (client, port, connections):
        for n in range(5):
            resp = await client.post(_to(port), b'{"n":%d}' % n, {}, timeout=5)
            assert await resp.read() == b'{"n":%d}' % n
            resp.release()
    assert len(connections) == 1


async def test_a_connection_the_server_will_close_is_not_used_again() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(_reply(b"{}", b"connection: close\r\n"))
        await writer.drain()
        await asyncio.sleep(1)  # not closed yet when the next request goes out

    async with _talking_to(handle) as (client, port, connections):
        for _ in range(2):
            resp = await client.post(_to(port), b"{}", {}, timeout=5)
            await resp.read()
            resp.release()
    assert len(connections) == 2


async def test_a_connection_idle_past_the_keepalive_is_not_used_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http1, "KEEPALIVE", 0.2)
    async with _talking_to(_echo_forever) as (client, port, connections):
        for pause in (0, 0.05, 0.4):
            await asyncio.sleep(pause)
            resp = await client.post(_to(port), b"{}", {}, timeout=5)
            await resp.read()
            resp.release()
    assert len(connections) == 2  # reused after 0.05 s, not after 0.4 s


async def _each_answer_on_a_new_connection(answer: bytes, read: str, expected: bytes) -> None:
    """A server that writes `answer` to every request; two requests, each read with `read` to
    `expected` and released: the second must not go on the first one's connection."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await _request(reader)
            writer.write(answer)
            await writer.drain()

    async with _talking_to(handle) as (client, port, connections):
        for _ in range(2):
            resp = await client.post(_to(port), b"{}", {}, timeout=5)
            assert await getattr(resp, read)() == expected
            resp.release()
    assert len(connections) == 2


async def test_an_answer_released_before_its_end_closes_its_connection() -> None:
    await _each_answer_on_a_new_connection(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
                                           "read_any", b"hello")


async def test_a_body_without_length_or_chunks_ends_with_the_connection() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"whole\":")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"true}")
        await writer.drain()

    async with _talking_to(handle) as (client, port, _):
        resp = await client.post(_to(port), b"{}", {}, timeout=5)
        assert await resp.read() == b'{"whole":true}'
        resp.release()


@pytest.mark.parametrize("framing", [b"content-length: 100\r\n\r\n{\"cut", b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"],
                         ids=["content-length", "chunked"])
async def test_an_answer_cut_off_is_an_error_not_a_short_body(framing: bytes) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + framing)
        await writer.drain()

    async with _talking_to(handle) as (client, port, _):
        resp = await client.post(_to(port), b"{}", {}, timeout=5)
        with pytest.raises(http1.CutOff):
            await resp.read()
        resp.release()


async def test_an_answer_that_is_not_http_is_named_so() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async with _talking_to(handle) as (client, port, _):
        with pytest.raises(http1.NotHTTP):
            await client.post(_to(port), b"{}", {}, timeout=5)


async def test_a_server_that_closes_without_answering_dropped_the_request() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)

    async with _talking_to(handle) as (client, port, _):
        with pytest.raises(http1.Dropped) as caught:
            await client.post(_to(port), b"{}", {}, timeout=5)
        assert not caught.value.reset


async def test_nobody_listening_fails_to_connect_with_its_errno() -> None:
    client = http1.Client(connect_timeout=2)
    with pytest.raises(http1.ConnectFailed) as caught:
        await client.post(_to(free_port()), b"{}", {}, timeout=5)
    assert caught.value.errno == errno.ECONNREFUSED


async def test_a_server_that_never_answers_is_bounded_by_the_timeout() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        await asyncio.sleep(30)

    async with _talking_to(handle) as (client, port, _):
        started = asyncio.get_running_loop().time()
        with pytest.raises(http1.DeadlineExceeded):
            await client.post(_to(port), b"{}", {}, timeout=0.3)
    assert asyncio.get_running_loop().time() - started < 5


async def test_the_timeout_bounds_the_body_too() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:  # a token every 50 ms, for ever: never idle, never done
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)

    async with _talking_to(handle) as (client, port, _):
        resp = await client.post(_to(port), b"{}", {}, timeout=0.5, idle=0.2)
        with pytest.raises(http1.DeadlineExceeded):
            while await resp.read_any() is not None:
                pass
        resp.close()


async def test_idle_counts_only_while_the_caller_waits() -> None:
    """A stream whose reader is busy elsewhere (a slow client) is not the server's silence; a
    server quiet while the reader waits is."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await asyncio.sleep(30)

    async with _talking_to(handle) as (client, port, _):
        resp = await client.post(_to(port), b"{}", {}, timeout=10, idle=0.2)
        await asyncio.sleep(0.6)  # busy: three idle bounds pass without a wait
        assert await resp.read_any() == b"first"
        started = asyncio.get_running_loop().time()
        with pytest.raises(http1.IdleTimeout):
            await resp.read_any()
        assert 0.15 < asyncio.get_running_loop().time() - started < 2
        resp.close()


async def test_a_stream_nobody_reads_stops_being_read_and_loses_nothing() -> None:
    total = 8 * http1.HIGH_WATER

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for n in range(total // 1024):
            writer.write(b"400\r\n" + bytes([65 + n % 26]) * 1024 + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with _talking_to(handle) as (client, port, _):
        resp = await client.post(_to(port), b"{}", {}, timeout=10)
        await asyncio.sleep(0.3)
        held = resp._size
        assert resp._conn.paused and held < 2 * http1.HIGH_WATER  # the rest waits in the server
        got = []
        while (piece := await resp.read_any()) is not None:
            got.append(piece)
        body = b"".join(got)
        assert body == b"".join(bytes([65 + n % 26]) * 1024 for n in range(total // 1024))
        resp.release()


async def test_a_urls_user_and_password_go_as_basic_auth_unless_the_request_has_its_own() -> None:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await _request(reader)
            seen.append(next(line for line in head.split(b"\r\n") if line.startswith(b"authorization:")))
            writer.write(_reply(b"{}"))
            await writer.drain()

    async with _talking_to(handle) as (client, port, _):
        to = http1.target(f"http://us%40er:p%3Ass@127.0.0.1:{port}/v1/x")
        for headers in ({}, {"authorization": "Bearer sk-1"}):
            resp = await client.post(to, b"{}", headers, timeout=5)
            await resp.read()
            resp.release()
    assert seen == [b"authorization: Basic dXNAZXI6cDpzcw==", b"authorization: Bearer sk-1"]  # us@er:p:ss


async def test_an_https_backend_is_spoken_to_over_tls(tmp_path: pathlib.Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    server = await asyncio.start_server(_echo_forever, "127.0.0.1", 0, ssl=served)
    port = server.sockets[0].getsockname()[1]
    client = http1.Client(connect_timeout=2)
    to = http1.target(f"https://localhost:{port}/v1/x")
    try:
        with pytest.raises(http1.ConnectFailed) as refused:  # a certificate nobody vouches for is refused
            await client.post(to, b"{}", {}, timeout=5)
        # Said as TLS, not as the OS error its library code would read as (1: "operation not permitted").
        assert refused.value.errno is None and refused.value.tls_reason == "CERTIFICATE_VERIFY_FAILED"
        assert upstream._failure(refused.value) == "could not connect: TLS: certificate verify failed"
        client._tls = ssl.create_default_context(cafile=str(cert))
        resp = await client.post(to, b'{"over":"tls"}', {}, timeout=5)
        assert await resp.read() == b'{"over":"tls"}'
        resp.release()
    finally:
        client.close()
        server.close()


async def test_bytes_after_the_answer_are_not_taken_and_the_connection_is_not_used_again() -> None:
    # One request, two answers: the second is no part of the first.
    await _each_answer_on_a_new_connection(_reply(b'{"first":1}') + _reply(b'{"unasked":2}'), "read", b'{"first":1}')


async def test_the_pool_keeps_no_entry_for_a_port_it_has_no_connection_to(monkeypatch: pytest.MonkeyPatch) -> None:
    # A managed backend gets a new port at each start: months of restarts must not pile up.
    monkeypatch.setattr(http1, "KEEPALIVE", 0.1)
    client = http1.Client(connect_timeout=2)
    for _ in range(3):
        server, port, _ = await _serve(_echo_forever)
        resp = await client.post(_to(port), b"{}", {}, timeout=5)
        await resp.read()
        resp.release()
        server.close()
        await asyncio.sleep(0.2)
        assert client._take((("127.0.0.1", port, False)), asyncio.get_running_loop().time()) is None
    assert client._idle == {}
    client.close()
