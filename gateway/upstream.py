"""The shared HTTP pool to the backends, and the relay of their answers to the client.

The request path's client is gateway/http1.py, by measurement: in the issue's minimal passthrough
aiohttp served ~7,000 req/s where httpx over its aiohttp transport served ~3,300 and plain httpx
~840, and in the gateway http1 costs under half of aiohttp's instructions per request
(bench/README.md). aiohttp still reads the probes (`read_probe`). One pool for the gateway's
life; connections are kept alive per backend.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec

from adapters.base import Adapter, UpstreamRequest
from gateway import http1, metrics
from gateway.errors import BackendUnavailable, GatewayError, UpstreamError, UpstreamTimeout
from gateway.openai import DONE, Endpoint, encode, sse, usage_object

if TYPE_CHECKING:
    from gateway.config import BackendConfig

log = logging.getLogger("gateway.upstream")
MAX_URLS = 1024  # parsed backend URLs kept (gateway.upstream.Upstream._url)
MAX_SENDS = 8  # tries of one request on connections found dropped (Upstream._post)
DROPPED_AT_ONCE = 1.0  # seconds: a connection dropped later than this had the request in work


class Upstream:
    def __init__(self, *, connect_timeout: float, request_timeout: float) -> None:
        self._total = request_timeout
        self._client = http1.Client(connect_timeout=connect_timeout)
        self._urls: dict[tuple[str, str], http1.Target] = {}

    async def open(self) -> None:
        """(Connections are made as requests need them; kept ones are dropped after KEEPALIVE
        seconds idle, before the runtimes' own keep-alive timeouts can close one under a request.)"""

    async def close(self) -> None:
        self._client.close()

    def _url(self, base_url: str, path: str) -> http1.Target:
        # Parsed once per backend and path rather than on every request.
        url = self._urls.get((base_url, path))
        if url is None:
            if len(self._urls) >= MAX_URLS:
                # A managed backend gets a new port each time it starts: over months of restarts
                # and idle stops the old ones would pile up. Those in use come back at once.
                self._urls.clear()
            url = self._urls[(base_url, path)] = http1.target(base_url + path)
        return url

    async def send(self, base_url: str, adapter: Adapter, request: UpstreamRequest, *, backend: str,
                   headers: dict[str, str], timeout: float | None = None,
                   idle: float | None = None) -> http1.Response:
        """POST the request; a response with an error status is raised as the OpenAI error, with the
        headers the client needs to know when to come back (`_passed_on`).

        `timeout` bounds the whole exchange (the request's time left; else server.request_timeout);
        `idle`, for a stream only, any silence of the backend's, before its headers or between its
        reads: a non-streamed reply legitimately sends nothing until it is done.

        Raises BackendUnavailable when nothing was sent (refused, reset before the answer), so
        the caller may try another backend.
        """
        url, data = self._url(base_url, request.path), encode(request.body)
        try:
            resp = await self._post(url, data, headers, self._total if timeout is None else timeout, idle)
        except http1.IdleTimeout:
            metrics.upstream_errors.labels(backend, "timeout").inc()
            raise UpstreamTimeout(silent(idle)) from None
        except TimeoutError:
            metrics.upstream_errors.labels(backend, "timeout").inc()
            raise UpstreamTimeout("The backend for this model did not answer in time.") from None
        except (http1.HTTPError, OSError) as exc:
            metrics.upstream_errors.labels(backend, "connect").inc()
            failure = _failure(exc)
            # A kind _failure has no words for is logged as it is: the next one can then be named
            # (make bench's llama-server phase had two such 503s, not reproduced since).
            log.log(logging.WARNING if failure == UNNAMED else logging.DEBUG, "backend %s unreachable: %r",
                    backend, exc)
            raise BackendUnavailable(f"The backend for this model is unreachable ({failure}).") from None
        if resp.status >= 400:
            try:
                body = await resp.read()
            except (http1.HTTPError, TimeoutError):
                body = b""
            finally:
                resp.release()
            if resp.status >= 500 or resp.status == 429:  # any other 4xx is the request's fault, not the backend's
                metrics.upstream_errors.labels(backend, "status").inc()
            error = adapter.error(resp.status, body)
            error.headers.update(_passed_on(resp.headers))
            raise error
        return resp

    async def _post(self, url: http1.Target, data: bytes, headers: dict[str, str], timeout: float,
                    idle: float | None) -> http1.Response:
        """The POST, sent again on another connection while the one it went on turns out dropped
        at once. That is nearly always a kept-alive connection the runtime closed (or reset, when
        our request had already reached it) just as the pool handed it out, so the runtime never
        answered: and when two streams end together, the pool may hold several such, each found
        dead in turn (make bench's llama-server phase: 503s after one retry). Not one dropped after
        the runtime had the request a while (it was working on it: the caller fails over), and
        not more than MAX_SENDS times; a runtime that died refuses the new connection at once."""
        for sends in range(1, MAX_SENDS + 1):
            sent_at = time.monotonic()
            try:
                return await self._client.post(url, data, headers, timeout=timeout, idle=idle)
            except http1.Dropped:
                if sends == MAX_SENDS or time.monotonic() - sent_at > DROPPED_AT_ONCE:
                    raise
                timeout -= time.monotonic() - sent_at
        raise AssertionError("unreachable")

    @staticmethod
    async def read(resp: http1.Response, backend: str) -> bytes:
        try:
            return await resp.read()
        except TimeoutError:
            metrics.upstream_errors.labels(backend, "timeout").inc()
            raise UpstreamTimeout("The backend for this model did not finish in time.") from None
        except http1.HTTPError as exc:
            metrics.upstream_errors.labels(backend, "stream").inc()
            log.debug("backend %s failed while answering: %r", backend, exc)
            raise BackendUnavailable(f"The backend failed while answering ({_failure(exc)}).") from None
        finally:
            resp.release()


def auth_headers(config: BackendConfig) -> dict[str, str]:
    """The header a backend with an `api_key` needs, on the requests the gateway forwards and on its
    own (health probes, model lists, load reports): a keyed vLLM guards /v1/*, a keyed llama-server
    all but /health, and a 401 there reads as broken."""
    return {"authorization": f"Bearer {config.api_key}"} if config.api_key else {}


def silent(idle: float | None) -> str:
    """What the client hears of a backend that went quiet for `idle` seconds (a stall, a hang)."""
    return f"The backend sent nothing for {idle:g}s." if idle else "The backend stopped sending."


# A runtime's health, load or model-list answer is small; one without end (a broken or hostile
# runtime) grew the gateway by a GiB per health check before this bound.
PROBE_MAX = 4 * 1024 * 1024


async def read_probe(resp: aiohttp.ClientResponse, limit: int = PROBE_MAX) -> bytes:
    """A probe's answer, cut at `limit` bytes (what is cut reads as an unusable answer)."""
    parts: list[bytes] = []
    size = 0
    async for part in resp.content.iter_any():
        parts.append(part)
        size += len(part)
        if size >= limit:
            resp.close()  # the rest is not read: the connection goes
            break
    return b"".join(parts)[:limit]


# When to come back, as the runtime (or a rate-limited service behind it) said: the official
# SDKs wait that long before they retry, so it must reach the client unchanged.
RETRY_HEADERS = ("retry-after", "retry-after-ms")


def _passed_on(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The headers of an upstream error the client gets too: its retry-after. (Not a 429's
    x-ratelimit-*: those tell the gateway's own allowance at the runtime, not the client key's,
    which the gateway's x-ratelimit-* headers tell.)"""
    passed: dict[str, str] = {}
    for name, value in headers:
        name = name.lower()
        if name in RETRY_HEADERS:
            # Rendered as latin-1 and written as is: anything else from the runtime stays behind.
            if len(value) <= 128 and value.isascii() and value.isprintable():
                passed[name] = value
    return passed


@dataclass
class StreamOutcome:
    """What a finished stream leaves for accounting, filled in as it goes."""

    usage: dict[str, Any] | None = None
    first_chunk_at: float | None = None
    chunks: int = 0
    error: GatewayError | None = None
    finished: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


async def relay_stream(resp: http1.Response, adapter: Adapter, endpoint: Endpoint, *, public_model: str,
                       include_usage: bool, backend: str, outcome: StreamOutcome,
                       idle: float | None = None) -> AsyncIterator[bytes]:
    """The runtime's stream -> OpenAI SSE for the client, one piece per read from the runtime.

    Whatever the socket holds is decoded at once and written as one piece: a burst of chunks
    costs one write to the client, and each read is at least one chunk (the caller awaits the
    first piece to know the stream started). A chunk that already reads as the client must get it
    (its model named as the client did, no usage) is handed on as written, not decoded and
    encoded again: 1,475k -> 1,296k instructions a 20-token stream (bench/count.py). Usage is
    always asked of the runtime; wherever it arrives (on the finish chunk, or in a `choices: []`
    chunk) it is taken out, and sent as one final chunk only if the client asked. A failure
    before the first chunk is raised, so the caller may still answer with an error status or try
    another backend; after it, the stream ends with an error event: never retried, never a hang
    (`idle`: the silence send() allowed, named in the error). A client that goes away closes this
    generator, which closes the upstream connection, which stops the generation.
    """
    decoder = adapter.decoder(endpoint)
    decoder.hand_on(public_model, include_usage)
    last: dict[str, Any] | bytes = {}
    handed_on = 0
    try:
        while True:
            out: list[dict[str, Any] | bytes] = []
            failure: Exception | None = None
            try:
                data = await resp.read_any()
                if data is None:
                    decoder.end(out)  # raises unless a last unterminated line ended the stream
                else:
                    decoder.feed(data, out)
            except (UpstreamError, http1.HTTPError, TimeoutError) as exc:
                failure = exc
            parts: list[bytes] = []
            sent = decoder.handed_on - handed_on  # those in `out` as bytes, handed on as they came
            handed_on = decoder.handed_on
            for chunk in out:
                if type(chunk) is bytes:  # events as the runtime wrote them (decoder.hand_on)
                    parts.append(chunk)
                    last = chunk
                    continue
                usage = chunk.pop("usage", None)
                if usage:
                    outcome.usage = usage
                if not chunk.get("choices"):
                    continue  # the usage-only chunk: re-sent at the end if the client asked
                chunk["model"] = public_model
                if include_usage:
                    chunk["usage"] = None
                parts += (b"data: ", encode(chunk), b"\n\n")
                last = chunk
                sent += 1
            if sent:
                if outcome.first_chunk_at is None:
                    outcome.first_chunk_at = time.perf_counter()
                outcome.chunks += sent
            if failure is not None:
                error = _stream_error(failure, backend, idle)
                if outcome.chunks == 0:
                    raise error from None
                outcome.error = error
                parts += (sse(encode(error.body())), DONE)
                yield b"".join(parts)
                return
            if decoder.finished:
                parts += _ending(outcome, last, public_model, include_usage, backend)
                outcome.finished = True
                yield b"".join(parts)
                return
            if parts:
                yield b"".join(parts)
    finally:
        # Closing (not releasing) an unfinished response drops the connection, which is how the
        # runtime learns to stop generating for a client that left.
        if outcome.finished:
            resp.release()
        else:
            resp.close()


def _stream_error(failure: Exception, backend: str, idle: float | None) -> GatewayError:
    kind = "timeout" if isinstance(failure, TimeoutError) else "stream"
    metrics.upstream_errors.labels(backend, kind).inc()
    if isinstance(failure, UpstreamError):
        return failure
    if isinstance(failure, http1.IdleTimeout):  # send()'s `idle`, not the request's time
        return UpstreamTimeout(silent(idle))
    if kind == "timeout":
        return UpstreamTimeout("The backend did not finish the stream in time.")
    log.debug("backend %s failed mid-stream: %r", backend, failure)
    return BackendUnavailable(f"The backend failed mid-stream ({_failure(failure)}).")


def _failure(exc: BaseException) -> str:
    """What went wrong with the connection, in words a client can act on (the request's log line
    carries it too); the exception itself, with its class and addresses, only at debug."""
    if isinstance(exc, http1.ConnectFailed):
        if exc.tls_reason:
            return f"could not connect: TLS: {exc.tls_reason.replace('_', ' ').lower()}"
        return f"could not connect: {os.strerror(exc.errno).lower()}" if exc.errno else "could not connect"
    if isinstance(exc, http1.Dropped):
        return "connection error: connection reset by peer" if exc.reset else "it closed the connection"
    if isinstance(exc, http1.CutOff):
        return "its answer was cut off"
    if isinstance(exc, http1.NotHTTP):
        return "its answer was not HTTP"
    if isinstance(exc, OSError) and exc.errno:
        return f"connection error: {os.strerror(exc.errno).lower()}"
    return UNNAMED


UNNAMED = "connection error"


def _ending(outcome: StreamOutcome, last: dict[str, Any] | bytes, public_model: str, include_usage: bool,
            backend: str) -> list[bytes]:
    if outcome.usage is None:
        # No runtime generation omits it once asked, but an attached server might: count
        # chunks rather than report nothing, and say so in the log.
        log.warning("backend %s streamed no usage; estimating completion tokens from chunks", backend)
        outcome.usage = usage_object(0, outcome.chunks)
    if not include_usage:
        return [DONE]
    if type(last) is bytes:  # events handed on undecoded: the last one's id is needed now, once per stream
        end_of_previous = last.rfind(b"\n\n", 0, -2)  # (-1: it is the only one)
        last = msgspec.json.decode(last[end_of_previous + 8 if end_of_previous >= 0 else 6:])  # past "data: "
    assert isinstance(last, dict)
    return [sse(encode({
        "id": last.get("id", ""), "object": last.get("object", "chat.completion.chunk"),
        "created": last.get("created", int(time.time())), "model": public_model,
        "choices": [], "usage": outcome.usage,
    })), DONE]
