"""The OpenAI front door. Each handler only puts the steps in order:

    auth -> decode -> route (+ the key's model list; start an on-demand backend if none is ready)
         -> admission (limits, queue, a backend slot) -> adapter.request -> upstream.send
         -> reply, or relay the stream -> finish (usage per key, real tokens to the limiter, metrics)

Failover: a backend that fails before anything reached the client (refused, timed out, a 5xx, a
reply cut off, a stream failing before its first chunk) hands the request to another ready
backend of the same model, within `routing.max_attempts` and the one `request_timeout` of all the
attempts together; after the first byte nothing is retried, nor a reply whose headers came.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from litestar import Request, Response, asgi, get
from litestar.params import FromPath
from litestar.types import Message, Receive, Scope, Send

from adapters.shapes import token_count
from gateway import metrics
from gateway.admission import Lease, Limits, Slot, Ticket
from gateway.auth import Principal
from gateway.config import ModelOverride
from gateway.errors import (
    BackendUnavailable,
    BodyTooLarge,
    ClientClosedRequest,
    GatewayError,
    MethodNotAllowed,
    ModelNotFound,
    UpstreamError,
    UnsupportedEncoding,
    UpstreamTimeout,
)
from gateway.openai import DONE, PATHS, Endpoint, decode_request, encode, sse, wants_usage
from gateway.routing import Route, choose
from gateway.sendwatch import Writer
from gateway.upstream import StreamOutcome, auth_headers, relay_stream

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.supervisor.supervisor import Backend

log = logging.getLogger("gateway.request")

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # Reverse proxies (nginx) buffer responses unless told not to, which turns a stream into one late blob.
    (b"x-accel-buffering", b"no"),
]
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class Exchange:
    """One HTTP exchange on the ASGI level: the few request headers the pipeline reads, and the
    way back. The POST endpoints are raw ASGI handlers because they are the hot path: Litestar's
    request, signature and response layers cost more CPU per request than all of the gateway's
    own steps together (bench/README.md). Their POSTs do not pass through Litestar at all
    (gateway.app.FrontDoor), which also renders their errors."""

    __slots__ = ("receive", "send", "authorization", "request_id", "affinity", "content_length", "content_encoding")

    def __init__(self, scope: Scope, receive: Receive, send: Send, affinity_header: bytes | None) -> None:
        self.receive, self.send = receive, send
        self.authorization: str | None = None
        self.affinity: str | None = None
        self.content_length: int | None = None
        self.content_encoding: str | None = None
        given = None
        for name, value in scope["headers"]:  # names arrive lower-cased (ASGI)
            if name == b"authorization":
                # The first one, as gateway.auth and Litestar's routes read it: a client sending
                # two must get the same answer from every path.
                if self.authorization is None:
                    self.authorization = value.decode("latin-1")
            elif name == b"content-length":
                self.content_length = int(value) if value.isdigit() else None
            elif name == b"x-request-id":
                given = value.decode("latin-1")
            elif name == b"content-encoding":
                self.content_encoding = value.decode("latin-1")
            elif name == affinity_header:
                self.affinity = value.decode("latin-1")
        self.request_id = request_id(given)

    async def body(self, limit: int) -> bytes:
        """The whole body, refused (413) from Content-Length alone or as soon as the bytes read pass
        `limit`: never read whole into memory. (A client that sends it too slowly, or stops
        half-way, is cut by the server protocol, gateway/protocol.py: this hears it leave.)"""
        if self.content_encoding is not None and self.content_encoding.strip().lower() != "identity":
            # Not decompressed here: `max_body` would bound the compressed size only, and a few KiB
            # of gzip can inflate to gigabytes. A 415 naming what is accepted (RFC 7694) rather
            # than the 400 of a body that is not JSON, so the client knows what to change.
            raise UnsupportedEncoding(
                f"Request bodies with Content-Encoding `{self.content_encoding}` are not accepted: "
                "send the JSON uncompressed.", headers={"accept-encoding": "identity"})
        if self.content_length is not None and self.content_length > limit:
            raise BodyTooLarge(TOO_LARGE)
        first = await self.receive()  # most bodies come whole in one message, already read
        if not first.get("more_body") and first["type"] != "http.disconnect":
            if len(first.get("body", b"")) > limit:
                raise BodyTooLarge(TOO_LARGE)
            return first.get("body", b"")
        return await self._rest_of_body(first, limit)

    async def _rest_of_body(self, message: Message, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            if message["type"] == "http.disconnect":
                raise ClientClosedRequest("The client disconnected before sending its request.")
            part = message.get("body", b"")
            size += len(part)
            if size > limit:
                raise BodyTooLarge(TOO_LARGE)
            if not message.get("more_body"):
                return b"".join([*parts, part])
            parts.append(part)
            message = await self.receive()

    async def disconnected(self) -> None:
        """Returns when the client goes away (the body is already read, so nothing else arrives)."""
        while (await self.receive())["type"] != "http.disconnect":
            pass

    async def reply(self, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        await self.send({"type": "http.response.start", "status": 200,
                         "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode()), *headers]})
        await self.send({"type": "http.response.body", "body": body})


TOO_LARGE = "The request body is larger than this gateway accepts (server.max_body)."


# A disconnect is only seen by a task waiting in receive(), which costs 5 % of a fast request's
# CPU (bench/count.py); answers that come sooner than this never start one. One that does start
# sees a client that left earlier at once (uvicorn keeps the disconnect for the next receive).
DEPARTURE_WATCH_AFTER = 0.1


class Departure:
    """Until disarmed, a client that leaves cancels the request's task: one that gives up waiting
    for the runtime's answer frees its slot at once, and closing the upstream request stops the
    generation nobody will read. It watches a stream's writing too (uvicorn drops writes to a
    closed connection silently, so nothing else would tell), until the last chunk is written.
    A task already being cancelled (a stalled client cut by gateway/sendwatch.py, the shutdown)
    is left to that: a second cancel would outlive the one `uncancel`."""

    __slots__ = ("exchange", "task", "watch", "timer", "left")

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.task = asyncio.current_task()
        self.left = False
        self.watch: asyncio.Future[None] | None = None
        self.timer = asyncio.get_running_loop().call_later(DEPARTURE_WATCH_AFTER, self._start_watching)

    def _start_watching(self) -> None:
        if self.task is not None:
            self.watch = asyncio.ensure_future(self.exchange.disconnected())
            self.watch.add_done_callback(self._on_disconnect)

    def _on_disconnect(self, watch: asyncio.Future[None]) -> None:
        if self.task is not None and not watch.cancelled() and not self.task.cancelling():
            self.left = True
            self.task.cancel()

    def disarm(self) -> None:
        self.task = None
        self.timer.cancel()
        if self.watch is not None:
            self.watch.cancel()


async def serve(scope: Scope, receive: Receive, send: Send, endpoint: Endpoint) -> None:
    if scope["method"] != "POST":
        if scope["method"] == "OPTIONS":  # as Litestar answers it for its own routes
            await send({"type": "http.response.start", "status": 204, "headers": [(b"allow", b"OPTIONS, POST")]})
            await send({"type": "http.response.body", "body": b""})
            return
        raise MethodNotAllowed("This path does not accept that HTTP method.", headers={"allow": "OPTIONS, POST"})
    gateway: Gateway = scope["app"].state.gateway
    exchange = Exchange(scope, receive, send, gateway.affinity_header)
    call = Call(gateway, endpoint, exchange.request_id)
    try:
        principal = gateway.keys.authenticate(exchange.authorization)
        raw = await exchange.body(gateway.config.server.max_body)
        body = decode_request(endpoint, raw)
        route = gateway.models.resolve(body["model"])
        principal.check_model(route)
        call.route = route
        call.key_id = principal.key_id
        override = gateway.config.models.overrides.get(route.served)
        if override is not None:
            _apply_override(override, body, raw)
        lease, backends = await _admitted(gateway, exchange, principal, route, endpoint, body, raw)
        call.lease = lease
        await _forward(gateway, exchange, call, lease, backends, endpoint, body, _timeouts(gateway, override))
    except GatewayError as exc:
        exc.headers.setdefault("x-request-id", call.request_id)
        if call.backend is not None or call.tried != "none":
            # It reached a backend: counted as a request, and a backend's failure as an upstream
            # error; not a rejection too (a 503 after failing over across every backend).
            exc.rejection = False
        if call.route is not None:
            await call.finish(exc.status, None, error=exc.message)
        raise  # rendered once, by the app's exception handler, as an OpenAI error
    except BaseException:  # a bug, or cancellation: the lease must still go back
        if call.route is not None:
            await call.finish(500, None)
        raise


async def _admitted(gateway: Gateway, exchange: Exchange, principal: Principal, route: Route, endpoint: Endpoint,
                    body: dict[str, Any], raw: bytes) -> tuple[Lease, list[Backend]]:
    """A backend ready and a slot on it: the lease, and the backends chosen, best first. Waiting
    for either ends at once when the gateway begins to shut down (Gateway.begin_shutdown cancels
    the wait), as a 503 to retry elsewhere."""
    if gateway.closing:
        raise BackendUnavailable(SHUTTING_DOWN, headers={"retry-after": "1"})
    task = asyncio.current_task()
    assert task is not None
    gateway.admitting.add(task)
    try:
        if not any(b.ready for b in route.backends):
            # Starts a stopped on-demand backend (one start shared by concurrent callers) or waits
            # for one on its way; BackendUnavailable when none can be ready within the queue's wait.
            await gateway.supervisor.ensure_ready(route.backends, gateway.config.queue.max_wait, model=route.public)
        backends = choose(route, cooldowns=gateway.cooldowns, loads=gateway.loads.loads, affinity=exchange.affinity)
        lease = await gateway.admission.acquire(_ticket(gateway, principal, route, backends, endpoint, body, raw),
                                                disconnected=exchange.disconnected)
        return lease, backends
    except asyncio.CancelledError:
        if not gateway.closing:
            raise
        task.uncancel()
        raise BackendUnavailable(SHUTTING_DOWN, headers={"retry-after": "1"}) from None
    finally:
        gateway.admitting.discard(task)


SHUTTING_DOWN = "The gateway is shutting down; try again."
NO_TIME_LEFT = "The backend for this model did not answer in time."


def _timeouts(gateway: Gateway, override: ModelOverride | None) -> tuple[float, float]:
    """The request's bounds upstream, the model's own where it has them: (all its attempts
    together, a stream's longest silence)."""
    server = gateway.config.server
    total, idle = server.request_timeout, server.stream_idle_timeout
    if override is not None:
        total = override.request_timeout or total
        idle = override.stream_idle_timeout or idle
    return total, idle


async def _forward(gateway: Gateway, exchange: Exchange, call: Call, lease: Lease, backends: Sequence[Backend],
                   endpoint: Endpoint, body: dict[str, Any], timeouts: tuple[float, float]) -> None:
    assert call.route is not None
    route = call.route
    by_name = {b.name: b for b in backends}
    backend = by_name[lease.backend]
    streaming = bool(body.get("stream")) and endpoint != "embeddings"
    timeout, idle = timeouts
    # One bound for all the attempts together: a failover gets the time left, not a new budget.
    deadline = time.monotonic() + timeout
    tried: list[str] = []
    departure = Departure(exchange)
    relaying = False  # a stream that started: its watch goes on while it is written
    try:
        while True:
            if not backend.ready:
                others = [b for b in backends if b is not backend and b.name not in tried and b.ready]
                if others:
                    # Died (a replica killed) while this request waited for admission, which
                    # knows slots, not readiness: a ready peer takes it, as in a failover.
                    backend = by_name[await lease.move(_slots(others))]
                    continue
                # Stopped or draining (idle stop, group swap) while this request waited for
                # admission, and no peer is ready: bring it back rather than send to a port
                # nobody listens on. Nothing awaits between here and call.attempt(), so the
                # request is in flight before any drain looks again.
                await gateway.supervisor.ensure_ready([backend], gateway.config.queue.max_wait,
                                                      model=route.public)
            left = deadline - time.monotonic()
            if left <= 0:  # spent waiting for a slot or a start
                raise UpstreamTimeout(NO_TIME_LEFT)
            upstream_request = backend.adapter.request(endpoint, body, route.served)
            call.attempt(backend)
            answering = False  # its headers came: it generates this answer now
            try:
                resp = await gateway.upstream.send(backend.url, backend.adapter, upstream_request,
                                                   backend=backend.name, timeout=left,
                                                   idle=idle if streaming else None,
                                                   headers=_upstream_headers(backend, call.request_id))
                if streaming:
                    outcome = StreamOutcome()
                    chunks = relay_stream(resp, backend.adapter, endpoint, public_model=route.public,
                                          include_usage=wants_usage(body), backend=backend.name, outcome=outcome,
                                          idle=idle)
                    # The first piece is read here, so a backend that fails before it is still retried.
                    first = await anext(chunks)
                else:
                    answering = True
                    answer = await gateway.upstream.read(resp, backend.name)
                    data = backend.adapter.response(endpoint, answer, body)
                gateway.cooldowns.succeeded(backend.name)
                relaying = streaming
                break
            except GatewayError as exc:
                if not _retryable(exc):
                    raise
                # Nothing reached the client yet: another backend of the group may take it, in
                # the time left. Not an answer timed out on its way (its headers came): that
                # backend was generating it, and another would only generate it again.
                call.attempt_failed()
                wait = _retry_after(exc)
                if wait is not None:  # its own capacity: it sits out what it asked, its peers go on
                    gateway.cooldowns.rest(backend.name, wait)
                else:
                    gateway.cooldowns.failed(backend.name)
                tried.append(backend.name)
                others = [b for b in backends if b.name not in tried and b.ready]
                if (not others or len(tried) >= gateway.config.routing.max_attempts
                        or time.monotonic() >= deadline or (answering and isinstance(exc, UpstreamTimeout))):
                    raise
                backend = by_name[await lease.move(_slots(others))]
    except asyncio.CancelledError:
        if not departure.left:
            raise
        asyncio.current_task().uncancel()  # type: ignore[union-attr]
        raise ClientClosedRequest("The client disconnected before the answer came.") from None
    finally:
        if not relaying:
            departure.disarm()

    headers = [(b"x-request-id", call.request_id.encode()),
               *((name.encode(), value.encode()) for name, value in lease.usage.headers().items())]
    if streaming:
        await _relay(departure, gateway.sends.watch(exchange.send, call.request_id), call, headers, first, chunks,
                     outcome)
        return
    data["model"] = route.public
    # The answer goes out first: the bookkeeping (and a Redis release) is not the client's wait.
    # Not watched (gateway/sendwatch.py): uvicorn waits for room before a write, never after the
    # last one, so only a client that pipelines requests without reading answers could make it
    # wait, and no OpenAI client pipelines. Watching it would cost 1 % of a request's CPU.
    await exchange.reply(encode(data), headers)
    await call.finish(200, data.get("usage"))


STALLED = "The client took none of the stream for server.send_timeout."


async def _relay(departure: Departure, writer: Writer, call: Call, headers: list[tuple[bytes, bytes]], first: bytes,
                 chunks: AsyncIterator[bytes], outcome: StreamOutcome) -> None:
    """Write the stream. A client that leaves cancels the writing (`departure`, still armed),
    which closes the upstream response, which stops the generation. So does a client that stops
    reading (see gateway/sendwatch.py). The watch is the one the request started with (a task,
    only once the request has lasted DEPARTURE_WATCH_AFTER), not a second one per stream."""
    task = asyncio.current_task()
    assert task is not None
    send = writer.send
    try:
        await send({"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *headers]})
        piece = first
        while not (outcome.finished or outcome.error):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            piece = await anext(chunks)
        # The last piece ends the answer in the same write (uvicorn adds the chunked encoding's
        # end to it), rather than a write of its own: a short answer, whole in the runtime's
        # first read, goes out in one write with its head (gateway/protocol.py).
        departure.disarm()  # the answer is whole: a client leaving now changes nothing
        await send({"type": "http.response.body", "body": piece})
    except asyncio.CancelledError:
        if not (departure.left or writer.stalled):
            if call.gateway.closing and departure.task is not None:
                # Cut by the end of the shutdown's grace period while writing: the client hears
                # why, as from a runtime that failed mid-stream, and knows to retry.
                outcome.error = BackendUnavailable(SHUTTING_DOWN)
                await _last_words(send, outcome.error)
            raise
        task.uncancel()
    finally:
        departure.disarm()
        call.gateway.sends.forget(writer)  # the writing is over: nothing below may be cut
        await chunks.aclose()  # closes the upstream response if the stream did not finish
        # 499: the client went away before the end (nginx's convention).
        left = departure.left or writer.stalled
        status = 499 if left else (outcome.error.status if outcome.error else (200 if outcome.finished else 499))
        if outcome.first_chunk_at is not None:
            model = call.model
            metrics.REQUESTS.first_token(model, outcome.first_chunk_at - call.started)
            if outcome.chunks > 1:
                gap = (time.perf_counter() - outcome.first_chunk_at) / (outcome.chunks - 1)
                metrics.REQUESTS.token_gap(model, gap)
        error = STALLED if writer.stalled else (outcome.error.message if outcome.error else None)
        await call.finish(status, outcome.usage, error=error, produced=outcome.chunks)


async def _last_words(send: Send, error: GatewayError) -> None:
    with contextlib.suppress(Exception, asyncio.CancelledError):
        async with asyncio.timeout(1.0):  # a client that reads nothing more cannot hold the exit
            await send({"type": "http.response.body", "body": sse(encode(error.body())) + DONE})


def _retryable(exc: GatewayError) -> bool:
    """Refused, timed out, a 5xx or a 429 from the runtime (an attached server's own capacity):
    worth another backend; the last one's 429 reaches the client with its retry-after. Any other
    4xx is the request's own fault and would fail anywhere."""
    return isinstance(exc, (BackendUnavailable, UpstreamTimeout)) or (
        isinstance(exc, UpstreamError) and (exc.status >= 500 or exc.status == 429))


def _retry_after(exc: GatewayError) -> float | None:
    """The seconds a runtime's 429 asked for (retry-after-ms, or retry-after in seconds; not an
    HTTP date), else None."""
    if not (isinstance(exc, UpstreamError) and exc.status == 429):
        return None
    ms, seconds = exc.headers.get("retry-after-ms", ""), exc.headers.get("retry-after", "")
    if ms.isdigit():
        return int(ms) / 1000
    return float(seconds) if seconds.isdigit() else None


def _apply_override(override: ModelOverride, body: dict[str, Any], raw: bytes) -> None:
    if override.max_body is not None and len(raw) > override.max_body:
        raise BodyTooLarge(f"The request body is larger than this model accepts ({override.max_body} bytes).")
    for name, value in override.defaults.items():
        body.setdefault(name, value)


class Call:
    """The bookkeeping of one request: the backend it is on, and, once, at its end: metrics,
    the key's usage, the real tokens settled with the limiter, and the lease released."""

    __slots__ = ("gateway", "endpoint", "request_id", "started", "route", "key_id", "lease", "backend", "tried",
                 "finished")

    def __init__(self, gateway: Gateway, endpoint: Endpoint, request_id: str) -> None:
        self.gateway, self.endpoint, self.request_id = gateway, endpoint, request_id
        self.started = time.perf_counter()
        self.route: Route | None = None
        self.key_id = ""
        self.lease: Lease | None = None
        self.backend: Backend | None = None
        self.tried = "none"  # the backend of the last failed attempt: the one a final error names
        self.finished = False

    @property
    def model(self) -> str:
        return self.route.public if self.route else ""

    def attempt(self, backend: Backend) -> None:
        self.backend = backend
        backend.last_used = time.monotonic()
        backend.inflight += 1
        metrics.REQUESTS.attempt_started(backend.name)

    def attempt_failed(self) -> None:
        """The backend failed the request, which goes to another. Not counted as a request: the
        client gets one answer, counted once at the end, or a failover the client never saw
        would page the 5xx alert. The failure itself is in gateway_upstream_errors_total."""
        backend = self.backend
        assert backend is not None
        self._leave(backend)
        self.tried = backend.name
        self.backend = None

    def _leave(self, backend: Backend) -> None:
        backend.last_used = time.monotonic()
        backend.inflight -= 1
        metrics.REQUESTS.attempt_ended(backend.name)

    async def finish(self, status: int, usage: Any, error: str | None = None, produced: int = 0) -> None:
        """`usage` as the runtime reported it (None: it did not); `produced`: the chunks the client
        got from a stream that ended without usage."""
        if self.finished:
            return
        self.finished = True
        tokens: int | None = None  # if the accounting fails (a bug), the estimate stands
        try:
            tokens = self._account(status, usage, error, produced)
        finally:
            if self.lease is not None:  # whatever happened above: a slot is never kept
                await self.lease.release(tokens)

    def _account(self, status: int, usage: Any, error: str | None, produced: int) -> int | None:
        """Metrics, the key's usage and the log line; returns the tokens the limiter settles (None:
        its estimate stands)."""
        model, route = self.model, self.route
        assert route is not None
        backend_name = self.backend.name if self.backend else self.tried
        if self.backend is not None:
            self._leave(self.backend)
        status_class = metrics.status_class(status)
        metrics.REQUESTS.answered(model, backend_name, self.endpoint, status_class)
        metrics.REQUESTS.duration(model, self.endpoint, time.perf_counter() - self.started)
        if not isinstance(usage, dict):
            usage = None
        prompt = token_count(usage.get("prompt_tokens")) if usage else 0
        # A stream cut off before its usage (the client left near the end) still generated:
        # about one token per chunk, counted so the key's usage is not zero.
        completion = token_count(usage.get("completion_tokens")) if usage else produced
        if usage:
            metrics.REQUESTS.tokens(model, prompt, completion)
        self.gateway.usage.add(self.key_id, route.served, prompt_tokens=prompt, completion_tokens=completion,
                               error=status >= 400)
        if status >= 500 or log.isEnabledFor(logging.DEBUG):
            log.log(logging.WARNING if status >= 500 else logging.DEBUG, "request finished", extra={
                "request_id": self.request_id, "key_id": self.key_id, "model": model, "backend": backend_name,
                "endpoint": self.endpoint, "status": status, "prompt_tokens": prompt,
                "completion_tokens": completion, "duration_ms": round((time.perf_counter() - self.started) * 1000, 1),
                **({"error": error} if error else {}),
            })
        if self.gateway.config.metrics.key_labels:
            metrics.key_requests.labels(self.key_id, model, status_class).inc()
            metrics.key_tokens.labels(self.key_id, "prompt").inc(prompt)
            metrics.key_tokens.labels(self.key_id, "completion").inc(completion)
            if self.gateway.keys.ended(self.key_id):  # revoked while it ran: its series went, and go again
                metrics.forget_key(self.key_id)
        # The real tokens replace the estimate. A failure that generated nothing gets its
        # reservation back whole; one that did (a stream the client left) keeps the estimate,
        # or leaving just before the usage chunk would make every answer free.
        if usage:
            return prompt + completion
        return 0 if status >= 400 and not produced else None


MAX_TOKENS = 2**31 - 1  # as openai.PositiveInt: beyond it no runtime takes a count


def _ticket(gateway: Gateway, principal: Principal, route: Route, backends: Sequence[Backend], endpoint: Endpoint,
            body: dict[str, Any], raw: bytes) -> Ticket:
    # A cheap, conservative estimate: ~4 bytes of JSON per prompt token, plus the completion
    # budget. Only fields decode_request checked for this endpoint count: anything else in the
    # body goes to the runtime untouched, and must not shrink the reservation. A runtime's own
    # length field only ever enlarges it (an unlimited n_predict of -1 leaves the default, as a
    # request without max_tokens does: the real count is settled after the answer).
    completion = 0  # embeddings generate nothing
    if endpoint != "embeddings":
        budget = (body.get("max_completion_tokens") if endpoint == "chat" else None) or body.get("max_tokens")
        budget = budget or gateway.config.limits.default_completion_tokens
        for backend in backends:  # a runtime's own length field (llama.cpp's n_predict), if larger
            for name in backend.adapter.length_fields:
                native = body.get(name)
                if type(native) is int and budget < native <= MAX_TOKENS:
                    budget = native
        prompt = body.get("prompt") if endpoint == "completions" else None
        # A list of prompts (texts or token lists; a list of ints is one prompt) is one answer each.
        prompts = sum(1 for p in prompt if not isinstance(p, int)) or 1 if isinstance(prompt, list) else 1
        completion = budget * (body.get("n") or 1) * prompts
    cost = len(raw) // 4 + completion
    return Ticket(
        key_id=principal.key_id,
        limits=Limits(principal.rpm, principal.tpm, principal.max_concurrency, principal.priority),
        model=route.public,
        backends=_slots(backends),
        cost=cost,
        max_wait=gateway.config.queue.max_wait,
    )


def _slots(backends: Sequence[Backend]) -> list[Slot]:
    """What the admission grants among, in the router's order (its first is the router's pick)."""
    return [Slot(b.name, b.config.slots, b.config.weight) for b in backends]


# Random per process, then a counter: unique across replicas without a system call per request.
_ID_PREFIX = "req_" + secrets.token_hex(6)
_ids = itertools.count(1)


def request_id(given: str | None) -> str:
    """The client's x-request-id if it is a sane one (it goes into logs and headers), else a new one."""
    return given if given and _REQUEST_ID.match(given) else f"{_ID_PREFIX}{next(_ids):x}"


def _upstream_headers(backend: Backend, request_id: str) -> dict[str, str]:
    return {"x-request-id": request_id, **auth_headers(backend.config)}


def _handler(endpoint: Endpoint) -> Any:
    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        await serve(scope, receive, send, endpoint)

    return asgi(PATHS[endpoint], name=endpoint, copy_scope=False)(handle)


chat_completions = _handler("chat")
completions = _handler("completions")
embeddings = _handler("embeddings")


@get("/v1/models")
async def list_models(request: Request[Any, Any, Any]) -> Response[Any]:
    gateway: Gateway = request.app.state.gateway
    principal = gateway.keys.authenticate(request.headers.get("authorization"))
    data = [{"id": name, "object": "model", "created": gateway.started, "owned_by": owner}
            for name, owner in gateway.models.listing() if principal.may_use(gateway.models.resolve(name))]
    return Response(encode({"object": "list", "data": data}), media_type="application/json")


@get("/v1/models/{model:path}")
async def get_model(request: Request[Any, Any, Any], model: FromPath[str]) -> Response[Any]:
    gateway: Gateway = request.app.state.gateway
    principal = gateway.keys.authenticate(request.headers.get("authorization"))
    model = model.lstrip("/")  # model ids may contain slashes (`org/name`)
    owner = dict(gateway.models.listing()).get(model)
    if owner is None:
        raise ModelNotFound(model)
    principal.check_model(gateway.models.resolve(model))
    return Response(encode({"id": model, "object": "model", "created": gateway.started, "owned_by": owner}),
                    media_type="application/json")


ROUTES = [chat_completions, completions, embeddings, list_models, get_model]
