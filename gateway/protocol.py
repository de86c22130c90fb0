"""The HTTP/1.1 server protocol: uvicorn's httptools one, with a bound on a request's head.

uvicorn puts no limit on the request line and headers when it parses with httptools (its h11
parser has one; `h11_max_incomplete_event_size`), and httptools keeps a header that has not
ended in memory: one client, before any key is checked, could make the gateway hold hundreds of
MiB per connection (a security audit grew it by 500 MiB with one connection). Past MAX_HEAD the
connection gets a 431 and is closed.

The bound costs the hot path an attribute test per socket read and two method calls per request
(bench/count.py: +0.03 % instructions): the head is counted a read at a time, before each read is
parsed, and only while a head is being received. Every byte of a read that arrives while the head
is still incomplete belongs to the head, so a legitimate request is never refused for the body
that follows its head; a head can grow by at most one read past the bound before the refusal.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import HeadTooLarge

MAX_HEAD = 64 * 1024  # request line and headers; nginx's default allows 32 KiB, gunicorn ~8 KiB per line


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    _head: int | None = None  # bytes of the head being received; None between heads

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            if self._head > MAX_HEAD:
                self._refuse()
                return
            self._head += len(data)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head = 0

    def on_headers_complete(self) -> None:
        self._head = None
        super().on_headers_complete()

    def _refuse(self) -> None:
        self._head = None
        body = HeadTooLarge(f"The request line and headers are larger than {MAX_HEAD // 1024} KiB.").encode()
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()
