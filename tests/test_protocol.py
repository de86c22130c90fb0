"""gateway/protocol.py: a request's head is bounded in size (431, connection closed), and a
request in time (408, connection closed); a large body after a small head, a head near the bound,
a slow body that keeps coming and an idle kept-alive connection still pass. An answer's head goes
out with its body, in one write."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import httpx
from uvicorn.config import Config
from uvicorn.server import ServerState

from gateway.protocol import MAX_HEAD, http_protocol
from tests.conftest import StartGateway


def _raw(url: str, head_pad: int, chunk: int = 16 * 1024) -> bytes:
    """GET /health with `head_pad` bytes of extra headers, written in pieces; whatever comes back."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        sent = 0
        try:
            while sent < head_pad:
                line = b"x-pad-%d: %s\r\n" % (sent, b"a" * min(chunk, head_pad - sent))
                sock.sendall(line)
                sent += len(line)
            sock.sendall(b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-head: the answer is already in the socket
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and b"connection: close" not in answer.lower():
                break  # a normal answer on a kept-alive connection
        return answer


def test_a_head_past_the_bound_is_431_and_the_connection_closes(start_gateway: StartGateway,
                                                                  fake_upstream: str) -> None:
    gateway = start_gateway({"backends": [{"name": "up", "runtime": "openai", "url": fake_upstream,
                                           "serves": ["fake"]}]})
    answer = _raw(gateway.url, 4 * MAX_HEAD)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b'"code":"request_header_fields_too_large"' in answer
    assert 'gateway_rejected_total{reason="too_large"} 1.0' in httpx.get(gateway.url + "/metrics", timeout=10).text

    assert b"x-request-id: req_" in answer  # as every answer of the gateway has one

    near = _raw(gateway.url, MAX_HEAD - 1024)  # big, but within the bound
    assert near.startswith(b"HTTP/1.1 200 "), near[:200]

    # Exactly the bound, however the head is cut into reads: just past it in small pieces, in
    # one burst (the first read), and in a burst after a first small piece.
    for pieces in ([8 * 1024] * 9, [MAX_HEAD + 4096], [100, MAX_HEAD + 4096]):
        answer, _ = _talk(gateway.url, [(piece, 0.05) for piece in _head_in(pieces)])
        assert answer.startswith(b"HTTP/1.1 431 "), (pieces, answer[:200])

    # A head within the bound and a large body in the same read: the body is not the head's.
    chat = b'{"model":"fake","messages":[{"role":"user","content":"hi"}]}' + b" " * (3 * MAX_HEAD)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\nx-pad: %s\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n"
            % (gateway.new_key().encode(), b"a" * (MAX_HEAD - 300), len(chat)))
    answer, _ = _talk(gateway.url, [(head + chat, 0)])
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]

    # The bound is on the head only: a body far larger than it passes (here to a 400 about its JSON).
    body = b"[" + b"1," * (2 * MAX_HEAD) + b"1]"
    answer_for_body = httpx.post(f"{gateway.url}/v1/chat/completions", content=body, timeout=30,
                                 headers={"authorization": f"Bearer {gateway.new_key()}",
                                          "content-type": "application/json"})
    assert answer_for_body.status_code == 400, answer_for_body.text


def _head_in(pieces: list[int]) -> list[bytes]:
    """A GET whose head is the sum of `pieces` bytes, cut into pieces of those sizes."""
    start = b"GET /health HTTP/1.1\r\nhost: x\r\nx-pad: "
    size = sum(pieces)
    head = start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"
    out, at = [], 0
    for n in pieces:
        out.append(head[at:at + n])
        at += n
    return out


def test_a_request_that_is_not_http_gets_an_openai_error(start_gateway: StartGateway, fake_upstream: str) -> None:
    gateway = start_gateway({"backends": [{"name": "up", "runtime": "openai", "url": fake_upstream,
                                           "serves": ["fake"]}]})
    for bad in (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n",
                b"GET /health HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk\x01x\r\n\r\n"):
        answer, _ = _talk(gateway.url, [(bad, 0)])
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"content-type: application/json" in head and b"x-request-id: req_" in head
        assert json.loads(body)["error"]["code"] == "invalid_http_request"
    metrics = httpx.get(gateway.url + "/metrics", timeout=10).text
    assert 'gateway_rejected_total{reason="invalid"} 2.0' in metrics, metrics


def _talk(url: str, sends: list[tuple[bytes, float]], wait: float = 15) -> tuple[bytes, float]:
    """Send each piece, then sleep its pause; read until the server closes. What came back, and
    how long after the last piece the connection closed."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=wait) as sock:
        for data, pause in sends:
            sock.sendall(data)
            time.sleep(pause)
        sent = time.monotonic()
        answer = b""
        while chunk := sock.recv(65536):  # a closed connection ends it; a silent one times out (fails)
            answer += chunk
        return answer, time.monotonic() - sent


CHAT = b'{"model":"fake","messages":[{"role":"user","content":"hi"}],"max_tokens":4}'


def test_a_request_that_stops_coming_is_408_and_the_connection_closes(start_gateway: StartGateway,
                                                                       fake_upstream: str) -> None:
    gateway = start_gateway({"server": {"read_timeout": "1s"},
                             "backends": [{"name": "up", "runtime": "openai", "url": fake_upstream,
                                           "serves": ["fake"]}]})
    auth = b"authorization: Bearer %s\r\n" % gateway.new_key().encode()

    # Half a head.
    answer, closed_after = _talk(gateway.url, [(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n", 0)])
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b'"code":"request_timeout"' in answer and b"connection: close" in answer and b"x-request-id: " in answer
    assert closed_after < 10

    # A whole head, then part of the body it announced.
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n%s" % auth
    answer, _ = _talk(gateway.url, [(head + b"content-length: %d\r\n\r\n" % len(CHAT) + CHAT[:10], 0)])
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]

    # A connection that never sends a byte is closed, with nothing to answer.
    answer, closed_after = _talk(gateway.url, [])
    assert answer == b"" and closed_after < 10

    # Each is counted, for a dashboard to show slow or stalled clients.
    metrics = httpx.get(gateway.url + "/metrics", timeout=10).text
    assert 'gateway_rejected_total{reason="read_timeout"} 2.0' in metrics, metrics

    # A body that keeps coming, pausing less than the bound each time, may take longer in all.
    pieces = [CHAT[i:i + 8] for i in range(0, len(CHAT), 8)]
    slow = [(head + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(CHAT), 0.5),
            *((piece, 0.5) for piece in pieces)]
    assert sum(pause for _, pause in slow) > 3
    answer, _ = _talk(gateway.url, slow)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]

    # So does a kept-alive connection idle between requests: the bound is on a request arriving.
    with httpx.Client(base_url=gateway.url, timeout=30,
                      headers={"authorization": f"Bearer {gateway.new_key()}"}) as client:
        assert client.post("/v1/chat/completions", content=CHAT).status_code == 200
        time.sleep(2)
        assert client.post("/v1/chat/completions", content=CHAT).status_code == 200


# --- One write per answer (HeldHead), on uvicorn's protocol with a transport that records ----------


class _Recording(asyncio.Transport):
    """What the protocol writes, one entry per send (writelines is one send, as on uvloop)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def writelines(self, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        self.writes.append(b"".join(parts))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _answered(app: Any, request: bytes, *, wait: float | None = 0.2,
                    transport: _Recording | None = None) -> _Recording:
    """`request` through the gateway's protocol class to `app`; the transport after `wait` seconds
    (None: one turn of the event loop, the one the app's task first runs in)."""
    protocol_class = http_protocol(read_timeout=10.0)
    config = Config(app=app, http=protocol_class, lifespan="off", log_level="warning")
    config.load()
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={},
                              _loop=asyncio.get_running_loop())
    transport = transport or _Recording()
    protocol.connection_made(transport)
    try:
        protocol.data_received(request)
        await asyncio.sleep(0 if wait is None else wait)
        return transport
    finally:
        protocol.connection_lost(None)


async def _start(send: Any, length: int) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % length)]})


async def test_an_answer_s_head_and_body_go_out_in_one_write() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _start(send, 5)
        await send({"type": "http.response.body", "body": b"hello"})

    transport = await _answered(app, b"POST /v1/x HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
    assert len(transport.writes) == 1, transport.writes
    (answer,) = transport.writes
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nhello"), answer


async def test_a_head_whose_body_is_slow_to_follow_is_written_by_the_end_of_the_turn() -> None:
    seen: list[list[bytes]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _start(send, 5)
        seen.append(list(transport.writes))  # held: the body may follow in this turn
        await asyncio.sleep(0.05)  # (a log followed from the admin API: nothing to send yet)
        seen.append(list(transport.writes))
        await send({"type": "http.response.body", "body": b"hello"})

    transport = _Recording()
    await _answered(app, b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n", transport=transport)
    assert seen[0] == [], seen
    assert len(seen[1]) == 1 and seen[1][0].startswith(b"HTTP/1.1 200 OK\r\n"), seen
    assert transport.writes[1:] == [b"hello"], transport.writes


async def test_a_100_continue_is_not_held() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # the client waits for the 100 before it sends the body
        await _start(send, 2)
        await send({"type": "http.response.body", "body": b"ok"})

    # Looked at in the turn the app first runs in: a held write would come only in the next.
    transport = await _answered(app, b"POST /x HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
                                     b"content-length: 2\r\n\r\n", wait=None)
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"], transport.writes
