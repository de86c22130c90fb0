"""gateway/protocol.py: a request's head is bounded in size (431, connection closed), and a
request in time (408, connection closed); a large body after a small head, a head near the bound,
a slow body that keeps coming and an idle kept-alive connection still pass."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx

from gateway.protocol import MAX_HEAD
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
