"""The upstream pool against a server that closes a kept-alive connection under a request, the
runtime's error answers (and the headers that go with them to the client), and the stream relay
against exact runtime bytes, split across reads."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from http.server import BaseHTTPRequestHandler
from typing import Any

import aiohttp
import httpx
import pytest

from adapters.base import Adapter, UpstreamRequest
from gateway import metrics
from gateway.errors import BackendUnavailable, UpstreamError, UpstreamTimeout
from gateway.upstream import MAX_SENDS, MAX_URLS, StreamOutcome, Upstream, read_probe, relay_stream
from tests.conftest import StartGateway
from tests.helpers import free_port, serving

REPLY = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n"
         b"connection: keep-alive\r\n\r\n{\"ok\":true}")


async def _server(close_after: int | None, reset: bool = False) -> tuple[asyncio.AbstractServer, int, list[int]]:
    """Answers each request on a connection; with `close_after`, a connection that has answered
    that many closes when the next request arrives, without a reply (as a runtime whose idle
    timeout fired while the request was on its way); with `reset`, it resets the connection
    instead (a close with the request unread in its buffer: the client reads ECONNRESET)."""
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
                    if reset:
                        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                                   struct.pack("ii", 1, 0))
                        writer.transport.abort()
                        return
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


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
async def test_a_pooled_connection_closed_under_a_request_is_retried_on_another(reset: bool) -> None:
    server, port, connections = await _server(close_after=1, reset=reset)
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


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
async def test_every_pooled_connection_found_dropped_in_turn_then_a_new_one(reset: bool) -> None:
    """Streams that end together leave several kept-alive connections the runtime then closes:
    each is found dead in turn, and the request goes out on a new one (one retry was not enough:
    make bench's llama-server phase)."""
    server, port, connections = await _server(close_after=1, reset=reset)
    upstream = Upstream(connect_timeout=2, request_timeout=5)
    await upstream.open()
    try:
        assert await asyncio.gather(*(_call(upstream, port) for _ in range(3))) == [b'{"ok":true}'] * 3
        assert len(connections) == 3  # three kept alive, each now dropped on its next request
        assert await _call(upstream, port) == b'{"ok":true}'
        assert connections == [1, 1, 1, 1]
    finally:
        await upstream.close()
        server.close()


@pytest.mark.parametrize(("reset", "failure"), [
    (False, "it closed the connection"),
    (True, "connection error: connection reset by peer"),
], ids=["closed", "reset"])
async def test_a_server_that_keeps_dropping_requests_is_unavailable_after_a_bounded_few(
        reset: bool, failure: str) -> None:
    server, port, connections = await _server(close_after=0, reset=reset)
    upstream = Upstream(connect_timeout=2, request_timeout=5)
    await upstream.open()
    try:
        with pytest.raises(BackendUnavailable) as caught:
            await _call(upstream, port)
        assert len(connections) == MAX_SENDS  # bounded
        assert caught.value.message == f"The backend for this model is unreachable ({failure})."
        assert caught.value.headers["retry-after"] == "1"
    finally:
        await upstream.close()
        server.close()


async def test_a_backend_nobody_listens_on_is_unavailable_in_words_not_class_names() -> None:
    upstream = Upstream(connect_timeout=2, request_timeout=5)
    await upstream.open()
    try:
        with pytest.raises(BackendUnavailable) as caught:
            await _call(upstream, free_port())
    finally:
        await upstream.close()
    # Neither aiohttp's exception class nor the backend's address reaches the client.
    assert caught.value.message == "The backend for this model is unreachable (could not connect: connection refused)."
    assert caught.value.headers["retry-after"] == "1"  # as every 503: an SDK waits, then retries


# --- errors from the runtime -------------------------------------------------------------------


async def _error_server(status: int, headers: dict[str, str], body: dict[str, Any]) -> tuple[asyncio.AbstractServer, int]:
    """Answers every request with one error status, headers and JSON body."""
    payload = json.dumps(body).encode()
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    reply = (f"HTTP/1.1 {status} Error\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n"
             f"{head}connection: close\r\n\r\n").encode() + payload

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _refusal(status: int, headers: dict[str, str], body: dict[str, Any]) -> UpstreamError:
    server, port = await _error_server(status, headers, body)
    upstream = Upstream(connect_timeout=2, request_timeout=5)
    await upstream.open()
    try:
        with pytest.raises(UpstreamError) as caught:
            await _call(upstream, port)
    finally:
        await upstream.close()
        server.close()
    return caught.value


RATE_LIMIT_HEADERS = {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0",
                      "x-ratelimit-reset-requests": "6.5s", "X-RateLimit-Remaining-Tokens": "0"}


async def test_a_429_keeps_its_wait_and_names_its_code() -> None:
    err = await _refusal(429, {"Retry-After": "7", "retry-after-ms": "6500", "x-other": "no",
                               **RATE_LIMIT_HEADERS},
                         {"error": {"message": "slow down", "type": "rate_limit_error"}})
    assert (err.status, err.type, err.code) == (429, "rate_limit_error", "rate_limit_exceeded")
    # The runtime's x-ratelimit-* are about the gateway's allowance there, not the client's key.
    assert err.headers == {"retry-after": "7", "retry-after-ms": "6500"}


async def test_a_503_keeps_its_retry_after_only() -> None:
    err = await _refusal(503, {"retry-after": "9", **RATE_LIMIT_HEADERS}, {"error": "server busy"})
    assert (err.status, err.code, err.headers) == (503, None, {"retry-after": "9"})


async def test_a_429_that_names_its_own_code_keeps_it() -> None:
    err = await _refusal(429, {}, {"error": {"message": "quota", "type": "tokens", "code": "insufficient_quota"}})
    assert (err.status, err.code, err.headers) == (429, "insufficient_quota", {})


@pytest.mark.parametrize(("status", "counted"), [(400, 0), (404, 0), (429, 1), (500, 1), (503, 1)])
async def test_only_the_backends_own_failures_count_as_its_upstream_errors(status: int, counted: int) -> None:
    # A 400 (a prompt past the context, say) is the request's fault: counted as the backend's it
    # would send the operator to a healthy runtime.
    before = metrics.upstream_errors.labels("b", "status")._value.get()
    await _refusal(status, {}, {"error": {"message": "no", "type": "x"}})
    assert metrics.upstream_errors.labels("b", "status")._value.get() - before == counted


async def test_a_header_that_could_not_be_written_back_stays_behind() -> None:
    err = await _refusal(503, {"retry-after": "9" * 200}, {"error": "server busy"})
    assert err.headers == {}


class _RefusingRuntime(BaseHTTPRequestHandler):
    """An OpenAI-speaking runtime that refuses each model its own way (the audit's upstream)."""

    REFUSALS: dict[str, tuple[int, dict[str, str], dict[str, Any]]] = {
        "e429": (429, {"retry-after": "7", **RATE_LIMIT_HEADERS},
                 {"error": {"message": "slow down", "type": "rate_limit_error"}}),
        "e503": (503, {"retry-after": "9"}, {"error": "server busy"}),
        "e400weird": (400, {}, {"error": {"message": "weird", "type": "X", "param": 5, "code": 7}}),
    }

    def do_GET(self) -> None:  # the health probe
        self._answer(200, {}, {"status": "ok"})

    def do_POST(self) -> None:
        model = json.loads(self.rfile.read(int(self.headers["content-length"])))["model"]
        self._answer(*self.REFUSALS[model])

    def _answer(self, status: int, headers: dict[str, str], body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"content-type": "application/json", "content-length": str(len(payload)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


def test_the_client_gets_the_runtimes_wait_and_error_fields_through_the_gateway(start_gateway: StartGateway) -> None:
    with serving(_RefusingRuntime) as url:
        gateway = start_gateway({"backends": [
            {"name": f"refusing-{model}", "runtime": "openai", "url": url,
             "serves": [model]} for model in _RefusingRuntime.REFUSALS]})
        with gateway.http(gateway.new_key()) as client:
            def ask(model: str) -> httpx.Response:
                return client.post("/v1/chat/completions", json={"model": model,
                                                                 "messages": [{"role": "user", "content": "hi"}]})

            r = ask("e429")
            assert (r.status_code, r.headers.get("retry-after")) == (429, "7")
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            assert "x-ratelimit-remaining-requests" not in r.headers  # the runtime's, not the key's
            r = ask("e503")
            assert (r.status_code, r.headers.get("retry-after")) == (503, "9")
            r = ask("e400weird")
            assert r.status_code == 400
            assert (r.json()["error"]["param"], r.json()["error"]["code"]) == ("5", "7")


# --- the stream relay --------------------------------------------------------------------------

USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def event(payload: dict[str, Any] | str, compact: bool = True) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(
        payload, separators=(",", ":") if compact else (", ", ": "))
    return f"data: {text}\n\n".encode()


def chunk(content: str | None, *, model: str = "runtime-name", finish: str | None = None, **extra: Any) -> dict[str, Any]:
    delta = {"content": content} if content is not None else {}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


async def _sse_server(pieces: list[bytes]) -> tuple[asyncio.AbstractServer, int]:
    """Answers one request with `pieces` as HTTP chunks, a moment apart, so each is its own read."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def relayed(pieces: list[bytes], *, include_usage: bool) -> tuple[list[str], StreamOutcome]:
    """What the client gets from an OpenAI-speaking runtime that sends `pieces`, asked for as `alias`."""
    server, port = await _sse_server(pieces)
    upstream = Upstream(connect_timeout=2, request_timeout=10)
    await upstream.open()
    outcome = StreamOutcome()
    try:
        resp = await upstream.send(f"http://127.0.0.1:{port}", Adapter(), UpstreamRequest("/v1/chat/completions", {}),
                                   backend="b", headers={})
        out = [piece async for piece in relay_stream(resp, Adapter(), "chat", public_model="alias",
                                                     include_usage=include_usage, backend="b", outcome=outcome)]
    finally:
        await upstream.close()
        server.close()
    text = b"".join(out).decode()
    assert text.endswith("\n\n")
    return [e.removeprefix("data: ") for e in text[:-2].split("\n\n")], outcome


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "spaced"])
async def test_chunks_keep_all_but_model_and_usage(compact: bool) -> None:
    # As OpenAI sends them once usage is asked: `usage: null` on each chunk, then a usage chunk.
    sent = [chunk("Hel", usage=None), chunk("lo", usage=None), chunk(None, finish="stop", usage=None)]
    tail = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "runtime-name",
            "choices": [], "usage": USAGE}
    stream = b"".join(event(c, compact) for c in sent) + event(tail, compact) + event("[DONE]")
    pieces = [stream[:50], stream[50:51], stream[51:300], stream[300:]]  # split anywhere, mid-event too
    events, outcome = await relayed(pieces, include_usage=False)
    assert events[-1] == "[DONE]" and len(events) == 4  # the usage chunk is kept from a client that did not ask
    for got, want in zip(events[:3], sent):
        want = {**want, "model": "alias"}
        del want["usage"]
        assert json.loads(got) == want
    assert outcome.usage == USAGE and outcome.chunks == 3 and outcome.finished


# A runtime that names the model as the client did and writes usage as OpenAI does: its chunks
# reach the client as it wrote them (spacing kept shows they were not decoded and encoded again).
SAME = "alias"


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "spaced"])
async def test_chunks_that_need_no_change_are_handed_on_as_written(compact: bool) -> None:
    sent = [event(chunk("Hel", model=SAME, usage=None), compact), event(chunk("lo", model=SAME, usage=None), compact),
            event(chunk(None, model=SAME, finish="stop", usage=None), compact)]
    tail = event({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": SAME,
                  "choices": [], "usage": USAGE}, compact)
    stream = b"".join(sent) + tail + event("[DONE]")
    events, outcome = await relayed([stream[:40], stream[40:]], include_usage=True)
    assert [e.encode() for e in events[:3]] == [s[len(b"data: "):-2] for s in sent]
    assert json.loads(events[3]) == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7,
                                     "model": SAME, "choices": [], "usage": USAGE}
    assert events[4] == "[DONE]" and len(events) == 5
    assert outcome.usage == USAGE and outcome.chunks == 3 and outcome.finished


async def test_a_client_that_did_not_ask_for_usage_gets_no_usage_field_on_handed_on_chunks() -> None:
    sent = [chunk("a", model=SAME, usage=None), chunk(None, model=SAME, finish="stop", usage=None)]
    tail = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": SAME,
            "choices": [], "usage": USAGE}
    for compact in (True, False):  # `,"usage":null}` cut from the bytes; spaced, decoded instead
        events, outcome = await relayed([b"".join(event(c, compact) for c in [*sent, tail]) + event("[DONE]")],
                                        include_usage=False)
        assert events[-1] == "[DONE]" and len(events) == 3
        for got, want in zip(events[:2], sent):
            assert json.loads(got) == {k: v for k, v in want.items() if k != "usage"}
        assert outcome.usage == USAGE and outcome.chunks == 2


async def test_chunks_handed_on_and_chunks_changed_mix_in_one_read() -> None:
    # Another model's name, no usage field for a client that asked for it, an empty choices
    # list: each decoded and changed (or dropped), the others handed on, in the order sent.
    empty = chunk(None, model=SAME, usage=None)
    empty["choices"] = []
    sent = [chunk("a", model=SAME, usage=None), chunk("b", model="runtime-name", usage=None), chunk("c", model=SAME),
            empty, chunk(None, model=SAME, finish="stop", usage=USAGE)]
    events, outcome = await relayed([b"".join(event(c) for c in sent) + event("[DONE]")], include_usage=True)
    got = [json.loads(e) for e in events[:-2]]
    assert [g["choices"][0]["delta"].get("content") for g in got] == ["a", "b", "c", None]
    assert all(g["model"] == SAME and g["usage"] is None for g in got)
    assert json.loads(events[-2])["usage"] == USAGE and outcome.chunks == 4


async def test_an_error_in_a_chunk_that_names_the_model_still_ends_the_stream() -> None:
    bad = chunk("x", model=SAME, usage=None, error={"message": "out of memory", "type": "server_error", "code": 500})
    events, outcome = await relayed([event(chunk("a", model=SAME, usage=None)) + event(bad)], include_usage=True)
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "a"
    assert json.loads(events[1])["error"]["message"] == "out of memory" and events[2] == "[DONE]"
    assert outcome.error is not None and not outcome.finished


async def test_the_usage_chunk_is_sent_last_when_asked_for() -> None:
    stream = [event(chunk("Hi")), event(chunk(None, finish="stop")),
              event({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "runtime-name",
                     "choices": [], "usage": USAGE}), event("[DONE]")]
    events, outcome = await relayed(stream, include_usage=True)
    *content, final, done = events
    assert done == "[DONE]" and [json.loads(e)["model"] for e in content] == ["alias", "alias"]
    assert json.loads(final) == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7,
                                 "model": "alias", "choices": [], "usage": USAGE}


async def test_usage_on_the_finish_chunk_is_found_without_a_usage_chunk() -> None:
    # llama.cpp's first way: usage rides on the chunk with finish_reason.
    stream = [event(chunk("Hi")), event(chunk(None, finish="stop", usage=USAGE)), event("[DONE]")]
    events, outcome = await relayed(stream, include_usage=False)
    assert outcome.usage == USAGE
    finish = json.loads(events[1])
    assert "usage" not in finish and finish["model"] == "alias" and finish["choices"][0]["finish_reason"] == "stop"


async def test_a_model_name_with_escapes_is_replaced() -> None:
    stream = [event(chunk("a", model='odd"name')), event(chunk("b", model='odd"name')),
              event(chunk(None, finish="stop", usage=USAGE)), event("[DONE]")]
    events, _ = await relayed(stream, include_usage=False)
    assert [json.loads(e)["model"] for e in events[:-1]] == ["alias"] * 3


async def test_a_chunk_without_a_model_gets_one() -> None:
    bare = chunk("a")
    del bare["model"]
    events, _ = await relayed([event(bare), event(chunk(None, finish="stop", usage=USAGE)), event("[DONE]")],
                              include_usage=False)
    assert json.loads(events[0])["model"] == "alias"


async def test_an_error_event_after_chunks_ends_the_stream_with_it() -> None:
    stream = [event(chunk("a")), event({"error": {"message": "out of memory", "type": "server_error", "code": 500}})]
    events, outcome = await relayed(stream, include_usage=False)
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "a"
    error = json.loads(events[1])["error"]
    assert error["message"] == "out of memory" and events[2] == "[DONE]"
    assert outcome.error is not None and not outcome.finished


async def test_a_token_that_spells_usage_or_error_is_forwarded_as_text() -> None:
    tricky = chunk('{"usage": {"x": 1}, "error": "no"}')
    events, outcome = await relayed([event(tricky), event(chunk(None, finish="stop", usage=USAGE)), event("[DONE]")],
                                    include_usage=False)
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == '{"usage": {"x": 1}, "error": "no"}'
    assert outcome.usage == USAGE and outcome.error is None


async def test_a_null_event_is_no_chunk() -> None:
    # llama-server opens a streamed completion of a prompt list with `data: null`.
    events, outcome = await relayed([event("null"), event(chunk("a")), event(chunk(None, finish="stop", usage=USAGE)),
                                     event("[DONE]")], include_usage=False)
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "a" and len(events) == 3
    assert outcome.finished and outcome.error is None


async def test_every_way_of_writing_an_sse_line_is_read() -> None:
    # CRLF line ends (`[DONE]\r` included), `data:` without its space or with two, comments,
    # `event:` and `id:` fields, and an event split between reads right after `data: `.
    a, b = json.dumps(chunk("a")), json.dumps(chunk("b"))
    c = json.dumps(chunk(None, finish="stop", usage=USAGE))
    stream = (f": ping\r\nevent: message\r\nid: 1\r\ndata: {a}\r\n\r\ndata:{b}\r\n\r\n"
              f"data:  {c}\r\n\r\ndata:  [DONE]\r\n\r\n").encode()
    cut = stream.index(b"data: {") + len(b"data: ")
    events, outcome = await relayed([stream[:cut], stream[cut:]], include_usage=False)
    assert [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1]] == ["a", "b", None]
    assert events[-1] == "[DONE]" and outcome.finished and outcome.usage == USAGE and outcome.error is None


async def test_a_stream_event_that_is_not_a_json_object_is_a_502() -> None:
    for bad in (b"data: {not json\n\n", b"data: [1, 2]\n\n", b"data: 17\n\n"):
        with pytest.raises(UpstreamError) as caught:
            await relayed([bad], include_usage=False)
        assert caught.value.status == 502 and "stream event" in caught.value.message


def test_the_parsed_urls_kept_are_bounded_as_ports_come_and_go() -> None:
    # A managed backend gets a new port each time it starts: months of restarts must not pile up.
    upstream = Upstream(connect_timeout=2, request_timeout=5)
    for port in range(20000, 20000 + 3 * MAX_URLS):
        url = upstream._url(f"http://127.0.0.1:{port}", "/v1/chat/completions")
        assert (url.host, url.port, url.tls) == ("127.0.0.1", port, False)
        assert url.head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n" % port)
    assert len(upstream._urls) <= MAX_URLS
    assert upstream._url("http://127.0.0.1:9", "/v1/models") is upstream._url("http://127.0.0.1:9", "/v1/models")


async def test_a_probe_answer_without_end_is_read_only_up_to_its_bound() -> None:
    # The audit's runtime answered /health 200 with a body that never ends: each health check
    # grew the gateway by a GiB before it timed out.
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(b"10000\r\n" + b"{" * 0x10000 + b"\r\n")
                await writer.drain()
        except (ConnectionError, OSError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/health") as resp:
            body = await asyncio.wait_for(read_probe(resp, limit=1024 * 1024), 30)
        assert len(body) == 1024 * 1024
    finally:
        server.close()


# --- a backend that goes quiet (server.stream_idle_timeout) -------------------------------------

async def _quiet_server(pieces: list[bytes] | None) -> tuple[asyncio.AbstractServer, int]:
    """Answers one request with `pieces` as HTTP chunks, then sends nothing more, the connection
    open (a stalled runtime); with None, not even its headers (a hung one)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
        if pieces is not None:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for piece in pieces:
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        await reader.read()  # until the client gives up and closes
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _quiet_stream(pieces: list[bytes] | None, outcome: StreamOutcome) -> list[bytes]:
    server, port = await _quiet_server(pieces)
    upstream = Upstream(connect_timeout=2, request_timeout=10)
    await upstream.open()
    try:
        resp = await upstream.send(f"http://127.0.0.1:{port}", Adapter(), UpstreamRequest("/v1/chat/completions", {}),
                                   backend="b", headers={}, idle=0.3)
        return [piece async for piece in relay_stream(resp, Adapter(), "chat", public_model="alias",
                                                      include_usage=False, backend="b", outcome=outcome, idle=0.3)]
    finally:
        await upstream.close()
        server.close()


async def test_a_stream_that_stalls_mid_way_ends_with_an_error_event_after_the_idle_bound() -> None:
    outcome = StreamOutcome()
    started = asyncio.get_running_loop().time()
    out = await _quiet_stream([event(chunk("Hel")), event(chunk("lo"))], outcome)
    assert asyncio.get_running_loop().time() - started < 3  # not the request's 10 s
    events = b"".join(out).decode()[:-2].split("\n\n")
    assert [json.loads(e.removeprefix("data: "))["choices"][0]["delta"]["content"] for e in events[:2]] == ["Hel", "lo"]
    assert json.loads(events[2].removeprefix("data: "))["error"]["message"] == "The backend sent nothing for 0.3s."
    assert events[3] == "data: [DONE]"
    assert outcome.error is not None and outcome.error.code == "upstream_timeout" and not outcome.finished


@pytest.mark.parametrize("pieces", [[], None], ids=["after-headers", "no-headers"])
async def test_a_stream_silent_before_its_first_chunk_is_a_timeout_the_caller_may_fail_over(
        pieces: list[bytes] | None) -> None:
    started = asyncio.get_running_loop().time()
    with pytest.raises(UpstreamTimeout) as caught:
        await _quiet_stream(pieces, StreamOutcome())
    assert asyncio.get_running_loop().time() - started < 3
    assert caught.value.message == "The backend sent nothing for 0.3s."


# --- a run of token events handed on whole (SSEDecoder._run) ----------------------------------------

def _run_of(contents: list[str], **extra: Any) -> list[bytes]:
    """Token events as OpenAI and vLLM write them for a client that asked for usage."""
    return [event({**chunk(c, model=SAME), "usage": None, **extra}) for c in contents]


USAGE_CHUNK = event({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": SAME,
                     "choices": [], "usage": USAGE})


@pytest.mark.parametrize("include_usage", [True, False])
def test_a_run_of_token_events_is_handed_on_in_one_piece(include_usage: bool) -> None:
    tokens = _run_of(["Hel", "lo", ' "model":"alias","choices":[{ ', "!"])  # (a token spelling keys is no key)
    decoder = Adapter().decoder("chat")
    decoder.hand_on(SAME, include_usage)
    out: list[Any] = []
    decoder.feed(b"".join(tokens) + USAGE_CHUNK + event("[DONE]"), out)
    run, usage_chunk = out
    expected = b"".join(tokens)
    assert run == (expected if include_usage else expected.replace(b',"usage":null}', b"}"))
    assert decoder.handed_on == 4 and decoder.finished
    assert usage_chunk["usage"] == USAGE and usage_chunk["choices"] == []


async def test_a_run_handed_on_whole_reaches_the_client_counted_and_followed_by_its_usage() -> None:
    tokens = _run_of(["a", "b", "c"])
    for include_usage in (True, False):
        events, outcome = await relayed([b"".join(tokens) + USAGE_CHUNK + event("[DONE]")], include_usage=include_usage)
        got = [json.loads(e) for e in events[:3]]
        assert [g["choices"][0]["delta"]["content"] for g in got] == ["a", "b", "c"]
        assert all(("usage" in g) is include_usage for g in got)
        assert outcome.chunks == 3 and outcome.usage == USAGE and outcome.finished
        if include_usage:
            assert json.loads(events[3]) == json.loads(USAGE_CHUNK[6:]) and events[4] == "[DONE]"
        else:
            assert events[3] == "[DONE]"


@pytest.mark.parametrize(("odd", "content"), [
    (event({**chunk("x", model="runtime-name"), "usage": None}), "x"),  # another model's name: renamed
    (event(chunk("x", model=SAME)), "x"),  # no usage field for a client that asked: given usage null
    (b": ping\n\n" + _run_of(["x"])[0], "x"),  # a comment between events: dropped
    (event({**chunk("x", model=SAME), "usage": None}, compact=False), "x"),  # spaced
    (_run_of(["data: [DONE]"])[0], "data: [DONE]"),  # a token that spells the end marker is a token
], ids=["other model", "no usage", "comment", "spaced", "end marker as text"])
async def test_a_run_that_does_not_add_up_goes_event_by_event(odd: bytes, content: str) -> None:
    tokens = _run_of(["a", "b"])
    events, outcome = await relayed([tokens[0] + odd + tokens[1] + USAGE_CHUNK + event("[DONE]")], include_usage=True)
    got = [json.loads(e) for e in events[:3]]
    assert [g["choices"][0]["delta"]["content"] for g in got] == ["a", content, "b"]
    assert all(g["model"] == SAME and g["usage"] is None for g in got)
    assert outcome.chunks == 3 and outcome.usage == USAGE and outcome.finished and events[-1] == "[DONE]"


async def test_an_error_key_before_usage_in_a_run_ends_the_stream() -> None:
    bad = event({**chunk("x", model=SAME), "error": {"message": "out of memory", "type": "server_error"},
                 "usage": None})
    events, outcome = await relayed([b"".join(_run_of(["a"])) + bad + event("[DONE]")], include_usage=True)
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "a"
    assert json.loads(events[1])["error"]["message"] == "out of memory" and events[2] == "[DONE]"
    assert outcome.error is not None and outcome.chunks == 1
