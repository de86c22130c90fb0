"""The HTTP/1.1 server protocol: uvicorn's httptools one, with bounds on receiving a request.

uvicorn bounds neither the size of a request's head nor the time it takes to arrive when it
parses with httptools. One client, before any key is checked, could make the gateway hold
hundreds of MiB per connection (httptools keeps a header that has not ended in memory; a
security audit grew it by 500 MiB with one connection), or hold connections and their tasks for
ever by sending a request slowly, or half of one, or nothing at all (slowloris). So:

- **size**: past MAX_HEAD bytes of request line and headers, a 431 and the connection closes. The
  head is counted a read at a time, before each read is parsed, and only while a head is being
  received. Every byte of a read that arrives while the head is still incomplete belongs to the
  head, so a request is never refused for the body that follows its head; a head can grow by at
  most one read past the bound.
- **time** (`read_timeout`, nginx's client_header_timeout and client_body_timeout): a new
  connection's first request, and any request's head, must arrive whole within it; a body may
  pause for at most that long between two reads (a large body on a slow uplink may take longer
  in all). Then a 408 and the connection closes; a handler waiting for the body hears that the
  client left. Time the gateway itself takes to read what came (its reading paused while the
  handler is busy) is not the client's and does not count.

Costs on the hot path (bench/count.py: +0.03 % instructions for both): an attribute test per
socket read and two method calls per request. A timer is armed only for a new connection and
for a request that one read did not bring whole, which an OpenAI client's rarely is.
"""

from __future__ import annotations

from asyncio import TimerHandle

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import GatewayError, HeadTooLarge, RequestTimeout

MAX_HEAD = 64 * 1024  # request line and headers; nginx's default allows 32 KiB, gunicorn ~8 KiB per line


def http_protocol(read_timeout: float) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for uvicorn's `http=`, with the config's read bound."""
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"read_timeout": read_timeout})


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    read_timeout = 60.0
    _head: int | None = None  # bytes of the head being received; None between heads
    _incomplete = False  # a request has begun and not all of it has arrived
    _timer: TimerHandle | None = None  # armed while a request (or a new connection's first) is awaited
    _last_read = 0.0  # loop time of the last read that left a request incomplete

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def, override]
        super().connection_made(transport)
        self._arm(self.read_timeout)  # a connection that never sends a byte is held no longer either

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            if self._head > MAX_HEAD:
                self._refuse(HeadTooLarge(f"The request line and headers are larger than {MAX_HEAD // 1024} KiB."))
                return
            self._head += len(data)
        super().data_received(data)
        if self._incomplete:  # this read did not bring the rest: the client has read_timeout for it
            self._last_read = self.loop.time()  # (a body's pause is counted from here)
            if self._timer is None and not self.transport.is_closing():
                self._arm(self.read_timeout)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head = 0
        self._incomplete = True

    def on_headers_complete(self) -> None:
        self._head = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._incomplete = False
        if self._timer is not None:
            self._disarm()
        super().on_message_complete()

    def _arm(self, delay: float) -> None:
        self._timer = self.loop.call_later(delay, self._read_timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _read_timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if not self._incomplete:
            # Armed when the connection was made, and no request has begun since: nothing to
            # answer. (Between requests the timer is off, and uvicorn's keep-alive timeout rules.)
            self.transport.close()
            return
        now = self.loop.time()
        if self.flow.read_paused:
            # The gateway stopped reading (a handler that has not taken the body yet, or a
            # pipelined request waiting its turn): that time is not the client's.
            self._last_read = now
            self._arm(self.read_timeout)
            return
        if self._head is None and (waited := now - self._last_read) < self.read_timeout:
            self._arm(self.read_timeout - waited)  # a body bounds only its pauses
            return
        self._refuse(RequestTimeout(f"The request did not arrive within server.read_timeout ({self.read_timeout:g}s)."))

    def _refuse(self, error: GatewayError) -> None:
        """Answer `error` and close; only close if an answer on this connection is under way,
        which a second one would corrupt."""
        if self._head is not None:  # a head: the answer to the request before must be over
            answer = self.cycle is None or self.cycle.response_complete
        else:  # a body: its own request must not have been answered (a handler may answer early)
            answer = not self.cycle.response_started
        self._head = None
        self._incomplete = False
        self._disarm()
        if answer:
            body = error.encode()
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                                 b"connection: close\r\n\r\n%s" % (error.status, REASONS[error.status], len(body), body))
        self.transport.close()


REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
