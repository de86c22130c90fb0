"""The HTTP/1.1 server protocol: uvicorn's httptools one, with bounds on receiving a request.

uvicorn bounds neither the size of a request's head nor the time it takes to arrive when it
parses with httptools. One client, before any key is checked, could make the gateway hold
hundreds of MiB per connection (httptools keeps a header that has not ended in memory; a
security audit grew it by 500 MiB with one connection), or hold connections and their tasks for
ever by sending a request slowly, or half of one, or nothing at all (slowloris). So:

- **size**: past MAX_HEAD bytes of request line and headers, a 431 and the connection closes. A
  read is looked at before it is parsed: one that would take the head past the bound is
  searched for the head's end (its blank line), so the head is measured exactly and a request
  is never refused for the body that follows its head. Reads that stay under the bound cost a
  comparison; the search runs only on the read that crosses it (and on a first read larger
  than the bound, where most of it is a body).
- **malformed** (httptools refuses to parse it): uvicorn's own answer is a text/plain 400; this
  one is an OpenAI error, as every other answer of the gateway.
- **time** (`read_timeout`, nginx's client_header_timeout and client_body_timeout): a new
  connection's first request, and any request's head, must arrive whole within it; a body may
  pause for at most that long between two reads (a large body on a slow uplink may take longer
  in all). Then a 408 and the connection closes; a handler waiting for the body hears that the
  client left. Time the gateway itself takes to read what came (its reading paused while the
  handler is busy) is not the client's and does not count.

One timer per connection, not per request: it looks at the connection every `read_timeout` (or
when the wait under way could end), so a request pays an attribute test or two per read, a clock
read and three method calls, whether its head and body come in one read or two (as httpx and the
OpenAI SDKs write them): bench/count.py, 757.0k -> 760.5k instructions per non-streamed request.

**One write per answer** (`HeldHead`): uvicorn writes an answer's status line and headers the
moment the app starts it, and its body as a second write; uvloop sends each write at once, so
every answer cost two send syscalls and two TCP segments (and two wake-ups of the client). The
head is now held until the body's first write and both go out together: strace counted 3 -> 2
writes per non-streamed request and per stream (the third is the request to the runtime). An
answer whose body is slow to follow (a log followed from the admin API) gets its head by the end
of the event loop's turn.
"""

from __future__ import annotations

from asyncio import AbstractEventLoop, TimerHandle, Transport

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway import metrics
from gateway.api.v1 import request_id
from gateway.errors import GatewayError, HeadTooLarge, InvalidRequest, RequestTimeout

MAX_HEAD = 64 * 1024  # request line and headers; nginx's default allows 32 KiB, gunicorn ~8 KiB per line
LINGER = 2.0  # seconds a refused connection still reads (and drops) what comes before it closes


def http_protocol(read_timeout: float) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for uvicorn's `http=`, with the config's read bound."""
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"read_timeout": read_timeout})


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    read_timeout = 60.0
    _head: int | None = None  # bytes of the head being received; None between heads
    _incomplete = False  # a request has begun and not all of it has arrived
    # When the wait that read_timeout bounds began: the connection (nothing sent yet), the
    # request's first byte (its head), the body's last read (a pause).
    _waiting_since = 0.0
    _watch: TimerHandle | None = None
    _refused = False

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def, override]
        super().connection_made(transport)
        self._waiting_since = self.loop.time()
        self._watch = self.loop.call_later(self.read_timeout, self._look)

    def connection_lost(self, exc: Exception | None) -> None:
        self._watch_cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering after a refusal: what still comes is dropped
        head = self._head
        if head is not None:  # a head that began in an earlier read
            if head + len(data) > MAX_HEAD and _head_size(data, head) > MAX_HEAD:
                self._refuse(HeadTooLarge(TOO_LARGE))
                return
            self._head = head + len(data)
        elif not self._incomplete and len(data) > MAX_HEAD and _head_size(data, 0) > MAX_HEAD:
            self._head = 0  # a head (what _refuse asks), refused before it is parsed
            self._refuse(HeadTooLarge(TOO_LARGE))
            return
        super().data_received(data)
        if self._head is None:
            if self._incomplete:
                self._waiting_since = self.loop.time()  # a body is still coming: its pause starts now
        elif head is None:
            # A head began in this read and goes on in the next: all of this read counts (what
            # came before it in the read, the end of a pipelined request, only makes it stricter).
            self._head = len(data)

    def send_400_response(self, msg: str) -> None:
        """httptools could not parse the request (uvicorn has logged it): an OpenAI error."""
        if self._head is None and not self._incomplete:
            self._head = 0  # in a head (what _refuse asks), not a body
        self._refuse(InvalidRequest("The request is not valid HTTP/1.1.", code="invalid_http_request"))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head = 0
        self._incomplete = True
        self._waiting_since = self.loop.time()

    def on_headers_complete(self) -> None:
        self._head = None
        super().on_headers_complete()
        cycle = self.cycle
        if cycle.scope["method"] != "HEAD":  # (an answer to HEAD has no body to wait for)
            cycle.transport = HeldHead(self.transport, self.loop)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        self._incomplete = False
        super().on_message_complete()

    def _look(self) -> None:
        """The connection's watch: is a wait over its bound? Else look again when it could be."""
        self._watch = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        bounded = self._incomplete or self.cycle is None  # a request under way, or nothing sent yet
        if self.flow.read_paused:
            # The gateway stopped reading (a handler that has not taken the body yet, or a
            # pipelined request waiting its turn): that time is not the client's.
            self._waiting_since = now
        elif bounded and now - self._waiting_since >= self.read_timeout:
            if self._incomplete:
                self._refuse(RequestTimeout(f"The request did not arrive within server.read_timeout "
                                            f"({self.read_timeout:g}s)."))
            else:
                self.transport.close()  # a new connection that sent nothing: no request to answer
            return
        # Between requests there is nothing to bound (uvicorn's keep-alive timeout rules).
        delay = self._waiting_since + self.read_timeout - now if bounded else self.read_timeout
        self._watch = self.loop.call_later(max(delay, 0.01), self._look)

    def _refuse(self, error: GatewayError) -> None:
        """Answer `error` and close; only close if an answer on this connection is under way,
        which a second one would corrupt."""
        if self._head is not None:  # a head: the answer to the request before must be over
            answer = self.cycle is None or self.cycle.response_complete
        else:  # a body: its own request must not have been answered (a handler may answer early)
            answer = not self.cycle.response_started
        self._head = None
        self._incomplete = False
        metrics.rejected.labels(REJECTED[error.status]).inc()  # before any path is known: every one counts
        if not answer:
            self.transport.close()
            return
        body = error.encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"x-request-id: %s\r\nconnection: close\r\n\r\n%s"
                             % (error.status, REASONS[error.status], len(body), request_id(None).encode(), body))
        # A lingering close, as nginx's: closing a socket with bytes still unread resets the
        # connection, and a reset can destroy the answer before the client reads it (a client
        # still sending its oversized head). So this side ends after the answer, what still
        # comes is dropped, and the connection closes when the client closes or after LINGER.
        self._refused = True
        if self.transport.can_write_eof():  # (TCP can; a TLS transport could not)
            self.transport.write_eof()
        self._watch_cancel()
        self._watch = self.loop.call_later(LINGER, self.transport.close)

    def _watch_cancel(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None


class HeldHead:
    """The transport one request's cycle writes its answer through: the answer's head (status
    line and headers) is held until the body's first write, and goes out with it.

    uvicorn's cycle writes, closes and asks is_closing; everything else (reading, flow control)
    is on the connection's own transport. A `100 Continue` (an interim answer, before the head)
    passes at once. A body that does not follow in the same turn of the event loop (an app that
    awaits between the two) does not keep the head: it is written at the end of the turn.

    It holds no reference to the cycle, which holds it: a reference cycle would leave every
    request's cycle, scope and body to the garbage collector (bench/count.py: +23k instructions
    a request, where this saves a send syscall)."""

    __slots__ = ("_transport", "_loop", "_head", "_started")

    def __init__(self, transport: Transport, loop: AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._head: bytes | None = None
        self._started = False  # the head has come (held or written)

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.writelines((head, data))  # one send, no copy of the body
        elif not self._started and data[9] != 49:  # the head: "HTTP/1.1 NNN", not 1NN (interim)
            self._started = True
            self._head = data
            self._loop.call_soon(self._write_head)
        else:
            self._transport.write(data)

    def _write_head(self) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head)

    def close(self) -> None:
        self._write_head()  # (a connection: close answer's last write has already taken it)
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


def _head_size(data: bytes, before: int) -> int:
    """The head's size if it ends in `data`, after `before` bytes of it in earlier reads; else
    all of `data` counts. (A blank line split between two reads is found a byte or two late.)"""
    end = data.find(b"\r\n\r\n")
    return before + (end + 4 if end >= 0 else len(data))


TOO_LARGE = f"The request line and headers are larger than {MAX_HEAD // 1024} KiB."
REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
REJECTED = {400: "invalid", 408: "read_timeout", 431: "too_large"}  # gateway_rejected_total's reason
