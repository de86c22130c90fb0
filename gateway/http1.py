"""The request path's HTTP/1.1 client: kept-alive connections per backend, a JSON POST, and its
answer read whole or as it arrives.

Why not aiohttp here (it stays for probes and load reports, which are not per request): the
gateway is one Python process, so its CPU per request is its throughput, and aiohttp's client
was over half of it. In a client loop against the fast fake upstream aiohttp costs about twice
this client's CPU per request, and per stream more (bench/README.md), because it builds a
request object, a header multidict, a timer context and a StreamReader fed once per HTTP chunk.
The part that must be exactly right, parsing the answer (chunked or not), is httptools, the
llhttp parser uvicorn reads requests with; what is left here is small: the pool, the request's
head, and the bounds on time.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections import deque
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import httptools

HIGH_WATER = 2**16  # bytes of a stream held unread before the socket is no longer read (as aiohttp)
KEEPALIVE = 4.0  # seconds a connection is kept idle: the runtimes close theirs after 5 s


class HTTPError(Exception):
    """The exchange failed; a subclass says how."""


class ConnectFailed(HTTPError):
    """No connection could be made (refused, unreachable, a TLS failure)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        # A TLS failure's errno is the TLS library's code, not an OS error number: its reason says it.
        self.tls_reason: str | None = None
        if isinstance(error, ssl.SSLError):
            self.tls_reason = error.reason or "handshake failed"
        self.errno = None if self.tls_reason else error.errno


class Dropped(HTTPError):
    """The connection closed (or was reset) before any byte of the answer: on a kept-alive
    connection, nearly always one the server closed as the request went out."""

    def __init__(self, reset: bool) -> None:
        super().__init__("connection reset" if reset else "connection closed")
        self.reset = reset


class CutOff(HTTPError):
    """The connection closed part-way through the answer."""


class NotHTTP(HTTPError):
    """The answer is not HTTP/1.x the parser can read."""


class Unasked(HTTPError):
    """The server sent more than the answer to the request (never raised to a caller)."""


class ConnectTimeout(HTTPError, TimeoutError):
    """No connection within the connect timeout."""


class IdleTimeout(HTTPError, TimeoutError):
    """The server sent nothing for the idle bound while an answer was awaited."""


class DeadlineExceeded(HTTPError, TimeoutError):
    """The exchange was not over within its time."""


@dataclass(frozen=True, slots=True)
class Target:
    """A URL made ready to send to: where to connect, and the request's head up to its own headers."""

    host: str
    port: int
    tls: bool
    head: bytes  # b"POST /path HTTP/1.1\r\nhost: ...\r\ncontent-type: application/json\r\n"
    authorization: str | None = None  # the URL's user:password, unless the request has its own

    @property
    def pool_key(self) -> tuple[str, int, bool]:
        return self.host, self.port, self.tls


def target(url: str) -> Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    authority = host if port == (443 if tls else 80) else f"{host}:{port}"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = f"POST {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/json\r\n".encode("ascii")
    authorization = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        authorization = "Basic " + base64.b64encode(credentials).decode("ascii")
    return Target(parts.hostname, port, tls, head, authorization)


def _header_lines(headers: dict[str, str]) -> bytes:
    lines = []
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            # A value that could start a header (or a request) of its own never goes out.
            raise ValueError(f"header {name!r} holds a line break")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("latin-1")


class Response:
    """One answer: `status` and `headers` when the caller gets it, then its body, whole (`read`)
    or as the socket delivers it (`read_any`). `release` hands a finished connection back to the
    pool; `close` drops it (so the server stops generating for an answer nobody will read)."""

    __slots__ = ("status", "headers", "_conn", "_client", "_parts", "_size", "_waiter", "_error", "_complete",
                 "_headers_done", "_whole", "_timer", "_idle", "_idle_timer", "_heard", "_framed", "_done")

    def __init__(self, conn: Connection, client: Client, idle: float | None) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self._conn, self._client = conn, client
        self._parts: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._complete = False
        self._headers_done = False
        self._whole = False  # read(): nothing is paused, the body is wanted whole
        self._framed = False  # Content-Length or chunked: the end is known, not the close
        self._done = False  # released or closed
        self._timer: asyncio.TimerHandle | None = None
        self._idle = idle
        self._idle_timer: asyncio.TimerHandle | None = None
        self._heard = 0.0  # loop time of the last bytes, or of the start of the wait for them

    # --- what the caller reads

    async def read(self) -> bytes:
        """The whole body (the caller then releases it)."""
        self._whole = True
        if self._conn.paused:
            self._conn.resume()
        while not self._complete:
            await self._wait()
        return b"".join(self._parts)

    async def read_any(self) -> bytes | None:
        """The bytes that have arrived since the last call, waiting for some if none; None once the
        body is over."""
        while not self._parts:
            if self._complete:
                return None
            await self._wait()
        parts, self._parts, self._size = self._parts, [], 0
        if self._conn.paused:
            self._conn.resume()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Done with it: a connection whose answer is over goes back to the pool, any other closes."""
        if self._done:
            return
        self._end()
        conn = self._conn
        if self._complete and self._error is None and conn.reusable():
            self._client._put(conn)
        else:
            conn.close()

    def close(self) -> None:
        if self._done:
            return
        self._end()
        self._conn.close()

    # --- how the answer arrives (called by the Connection)

    def _end(self) -> None:
        self._done = True
        self._conn.response = None
        if self._timer is not None:
            self._timer.cancel()
        if self._idle_timer is not None:
            self._idle_timer.cancel()

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        if self._idle is not None:
            self._heard = loop.time()
            if self._idle_timer is None:
                self._idle_timer = loop.call_at(self._heard + self._idle, self._check_idle)
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._error is not None or self._complete:
            return
        self._error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self._conn.close()

    def _on_headers(self, status: int, framed: bool) -> None:
        self.status, self._framed, self._headers_done = status, framed, True
        self._wake()

    def _received(self) -> None:
        """After each socket read (not each HTTP chunk: a read holds a whole stream under load)."""
        if self._size > HIGH_WATER and not self._whole and not self._conn.paused:
            self._conn.pause()  # a client that reads slowly holds the runtime back, not our memory
        if self._idle is not None:
            self._heard = self._conn.loop.time()
        self._wake()

    def _on_complete(self) -> None:
        self._complete = True
        self._wake()

    def _on_lost(self, exc: Exception | None) -> None:
        if self._complete:
            return
        if self._headers_done and not self._framed:
            self._on_complete()  # a body without length nor chunks ends with the connection
        elif not self._headers_done and not self._conn.answered:
            self._fail(Dropped(reset=isinstance(exc, ConnectionResetError)))
        else:
            self._fail(CutOff("the connection closed before the answer was over"))

    def _expire(self) -> None:
        self._fail(DeadlineExceeded("the exchange took longer than its time"))

    def _check_idle(self) -> None:
        """The idle bound: one timer per answer, moved on lazily rather than re-armed per read.
        Silence counts only while the caller waits: a stream paused because its client reads
        slowly is not the runtime's fault."""
        self._idle_timer = None
        if self._done or self._complete or self._error is not None:
            return
        loop = self._conn.loop
        assert self._idle is not None
        waiting = self._waiter is not None and not self._waiter.done()  # (done: woken, not yet resumed)
        if waiting and loop.time() - self._heard >= self._idle:
            self._fail(IdleTimeout(f"nothing for {self._idle:g}s"))
            return
        due = self._heard + self._idle if waiting else loop.time() + self._idle
        self._idle_timer = loop.call_at(due, self._check_idle)


class Connection(asyncio.Protocol):
    """One kept-alive connection; the parser's callbacks go to the answer it carries now."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool_key: tuple[str, int, bool]) -> None:
        self.loop, self.pool_key = loop, pool_key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.closed = False
        self.paused = False
        self.answered = False  # a byte of the current answer came
        self.keep_alive = False  # the last answer, whole, left the connection open for another
        self.idle_since = 0.0
        self._headers: list[tuple[str, str]] = []
        self._framed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is not asyncio's class)

    def data_received(self, data: bytes) -> None:
        self.answered = True
        if self.response is None:
            self.close()  # bytes nobody asked for: whatever the server meant, the connection is unusable
            return
        response = self.response
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if response._complete:  # bytes after the answer: the connection cannot carry another
                self.keep_alive = False
                self.close()
            else:
                response._fail(NotHTTP(f"the answer is not HTTP: {exc}"))
            return
        response._received()

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost tells the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None:
            self.response._on_lost(exc)

    def pause(self) -> None:
        self.paused = True
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        self.paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def reusable(self) -> bool:
        return not self.closed and self.keep_alive

    def send(self, response: Response, request: bytes) -> None:
        self.response, self.answered, self.keep_alive = response, False, False
        assert self.transport is not None
        self.transport.write(request)

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.response is not None and self.response._complete:
            raise Unasked("a second answer to one request")  # stops the parser: nothing of it is taken
        self._headers, self._framed = [], False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))
        lowered = name.lower()
        if lowered == b"content-length" or (lowered == b"transfer-encoding" and b"chunked" in value.lower()):
            self._framed = True

    def on_headers_complete(self) -> None:
        response = self.response
        if response is not None:
            response.headers = self._headers
            response._on_headers(self.parser.get_status_code(), self._framed)

    def on_body(self, body: bytes) -> None:
        # Once per HTTP chunk (a token, from a streaming runtime): as little as can be.
        response = self.response
        response._parts.append(body)  # type: ignore[union-attr]  # (set for as long as bytes are read)
        response._size += len(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        # Read here: llhttp forgets the answer's `connection` header once it is over.
        self.keep_alive = self.parser.should_keep_alive()
        if self.response is not None:
            self.response._on_complete()


class Client:
    """The pool: idle connections per (host, port, tls), newest first; one that has been idle
    longer than KEEPALIVE, or that the server closed, is never used again."""

    def __init__(self, *, connect_timeout: float) -> None:
        self._connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int, bool], deque[Connection]] = {}
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    async def post(self, to: Target, body: bytes, headers: dict[str, str], *, timeout: float | None = None,
                   idle: float | None = None, reuse: bool = True) -> Response:
        """POST `body` (JSON) with `headers`; returns once the answer's status and headers came.
        `timeout` bounds the whole exchange, body included; `idle` any silence of the server's while
        the answer (its head, or the next bytes of its body) is awaited."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        if to.authorization is not None and "authorization" not in headers:
            headers = {**headers, "authorization": to.authorization}
        request = b"%s%scontent-length: %d\r\n\r\n%s" % (to.head, _header_lines(headers), len(body), body)
        conn = self._take(to.pool_key, started) if reuse else None
        if conn is None:
            conn = await self._connect(to, loop, timeout)
        response = Response(conn, self, idle)
        if timeout is not None:
            response._timer = loop.call_at(started + timeout, response._expire)
        conn.send(response, request)
        try:
            while not response._headers_done:
                await response._wait()
        except BaseException:
            response.close()
            raise
        return response

    async def _connect(self, to: Target, loop: asyncio.AbstractEventLoop, timeout: float | None) -> Connection:
        bound = self._connect_timeout if timeout is None else min(timeout, self._connect_timeout)
        tls = None
        if to.tls:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        try:
            async with asyncio.timeout(bound):
                _, conn = await loop.create_connection(lambda: Connection(loop, to.pool_key), to.host, to.port, ssl=tls,
                                                       server_hostname=to.host if tls else None)
        except TimeoutError:
            raise ConnectTimeout(f"no connection within {bound:g}s") from None
        except OSError as exc:
            raise ConnectFailed(exc) from None
        return conn

    def _take(self, key: tuple[str, int, bool], now: float) -> Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < KEEPALIVE:
                return conn
            conn.close()
        if idle is not None:
            # Emptied: a managed backend gets a new port at each start, and over months of
            # restarts the old ports' entries would pile up.
            del self._idle[key]
        return None

    def _put(self, conn: Connection) -> None:
        if self._closed:
            conn.close()
            return
        now = conn.loop.time()
        conn.idle_since = now
        idle = self._idle.setdefault(conn.pool_key, deque())
        # The oldest first: those the server closed, or idle too long, go now rather than pile up.
        while idle and (idle[0].closed or now - idle[0].idle_since >= KEEPALIVE):
            idle.popleft().close()
        idle.append(conn)

    def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
