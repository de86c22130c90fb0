"""gateway/protocol.py: a request's head is bounded (431, connection closed); a large body after a
small head, and a head near the bound, still pass."""

from __future__ import annotations

import socket
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

    near = _raw(gateway.url, MAX_HEAD - 1024)  # big, but within the bound
    assert near.startswith(b"HTTP/1.1 200 "), near[:200]

    # The bound is on the head only: a body far larger than it passes (here to a 400 about its JSON).
    body = b"[" + b"1," * (2 * MAX_HEAD) + b"1]"
    answer_for_body = httpx.post(f"{gateway.url}/v1/chat/completions", content=body, timeout=30,
                                 headers={"authorization": f"Bearer {gateway.new_key()}",
                                          "content-type": "application/json"})
    assert answer_for_body.status_code == 400, answer_for_body.text
