"""The admission's Lua scripts, run with EVALSHA on a Redis connection of their own, pipelined.

A script call through redis-py (Script -> execute_command -> the pool, the retry wrapper, an
asyncio StreamReader) costs the gateway 296k instructions; the same call written here and read
with the same parser (hiredis) costs 41k (bench/README.md). Admission makes one or two such
calls a request, more than the rest of the request costs, so its scripts run here; everything
else on Redis (the listener's BLMPOP, the probe, the start-up checks, the store) stays on redis-py.

Redis answers a connection's commands in the order they came, so every call is a future in a
queue and calls need not wait for each other. What redis-py did for these calls is done here
too:
- the connection is set up from redis-py's own arguments for the URL (host, port, the TLS
  context for rediss://), then AUTH and SELECT as the URL says;
- an error reply becomes redis-py's exception for it (its parser's table), so the admission's
  outage handling reads it as before; a script Redis no longer has (a restart, SCRIPT FLUSH) is
  loaded again and the call made once more;
- every call is bounded: a reply not come within `timeout` gives the connection up, and every
  call still on it fails with a TimeoutError, as does a call on a connection that fails or
  closes, with ConnectionError; the next call makes a new one. A caller that stops waiting
  (its request went away) leaves its place in the queue, and its reply is skipped when it comes.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError


class Scripts:
    def __init__(self, pool: ConnectionPool, sources: dict[str, str], *, timeout: float,
                 connect_timeout: float) -> None:
        self._pool = pool
        self._sources = {name: source.encode() for name, source in sources.items()}
        self._shas = {name: hashlib.sha1(source).hexdigest().encode() for name, source in self._sources.items()}
        self._timeout, self._connect_timeout = timeout, connect_timeout
        self._line: _Line | None = None
        self._connecting: asyncio.Task[_Line] | None = None

    async def load(self) -> None:
        """Every script into Redis's script cache, so EVALSHA finds it."""
        line = await self._connected()
        for source in self._sources.values():
            await line.call(_command(b"SCRIPT", b"LOAD", source))

    async def run(self, name: str, args: Sequence[Any]) -> Any:
        line = self._line
        if line is None or line.closed:
            line = await self._connected()
        command = _command(b"EVALSHA", self._shas[name], b"0", *args)
        try:
            return await line.call(command)
        except NoScriptError:
            await line.call(_command(b"SCRIPT", b"LOAD", self._sources[name]))
            return await line.call(command)

    def drop(self) -> None:
        """Give the connection up (after an outage it may be dead without knowing): the next
        call makes a new one."""
        if self._line is not None:
            self._line.close(RedisConnectionError("The admission's Redis connection was dropped."))

    def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        self.drop()

    async def _connected(self) -> _Line:
        if self._line is not None and not self._line.closed:
            return self._line
        if self._connecting is None:  # one connection made for all the calls that need it now
            self._connecting = asyncio.create_task(self._connect())
            self._connecting.add_done_callback(self._made)
        return await asyncio.shield(self._connecting)  # (a caller that gives up does not stop it)

    def _made(self, connecting: asyncio.Task[_Line]) -> None:
        self._connecting = None
        if not connecting.cancelled() and connecting.exception() is None:  # (retrieved: never "unretrieved")
            self._line = connecting.result()

    async def _connect(self) -> _Line:
        kwargs = self._pool.connection_kwargs
        # redis-py's arguments for the URL: host and port, and for rediss:// the TLS context it
        # builds from the URL's ssl_* options.
        where = self._pool.make_connection()._connection_arguments()  # type: ignore[attr-defined]
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            _, line = await loop.create_connection(lambda: _Line(loop, self._timeout), **where)
            try:
                if kwargs.get("password"):
                    user = [kwargs["username"]] if kwargs.get("username") else []
                    await line.call(_command(b"AUTH", *user, kwargs["password"]))
                if kwargs.get("db"):
                    await line.call(_command(b"SELECT", kwargs["db"]))
            except BaseException:
                line.close(RedisConnectionError("The admission's Redis connection could not be set up."))
                raise
        return line


class _Line(asyncio.Protocol):
    """One connection: commands written as they come, replies handed to the calls in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop, self._timeout = loop, timeout
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(protocolError=InvalidResponse, replyError=BaseParser.parse_error)
        self._calls: deque[tuple[asyncio.Future[Any], float]] = deque()  # (its answer, when it was sent)
        self._watch: asyncio.TimerHandle | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(RedisConnectionError(f"The admission's Redis connection closed ({exc or 'by the server'})."))

    def call(self, command: bytes) -> asyncio.Future[Any]:
        if self.closed:
            raise RedisConnectionError("The admission's Redis connection is closed.")
        answer = self._loop.create_future()
        if not self._calls:
            self._watch = self._loop.call_later(self._timeout, self._overdue)
        self._calls.append((answer, self._loop.time()))
        self._transport.write(command)  # type: ignore[union-attr]
        return answer

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                answer, _ = self._calls.popleft()
                if answer.done():
                    continue  # its caller stopped waiting
                if isinstance(reply, Exception):  # an error reply (parse_error made it redis-py's)
                    answer.set_exception(reply)
                else:
                    answer.set_result(reply)
        except (InvalidResponse, IndexError) as exc:  # not RESP, or a reply nobody asked for
            self.close(RedisConnectionError(f"The admission's Redis connection broke: {exc!r}"))
            return
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
            if self._calls:  # the oldest call still waiting sets the bound now
                self._watch = self._loop.call_at(self._calls[0][1] + self._timeout, self._overdue)

    def _overdue(self) -> None:
        self._watch = None
        self.close(TimeoutError(f"Redis did not answer the admission within {self._timeout:g}s."))

    def close(self, error: BaseException) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self.closed = True
        while self._calls:
            answer, _ = self._calls.popleft()
            if not answer.done():
                answer.set_exception(error)
        if self._transport is not None:
            self._transport.close()


def _command(*parts: Any) -> bytes:
    """A command in RESP, its arguments written as redis-py writes them (numbers by repr)."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        if type(part) is not bytes:
            if isinstance(part, str):
                part = part.encode()
            elif isinstance(part, (int, float)) and not isinstance(part, bool):
                part = repr(part).encode()
            else:
                raise TypeError(f"a script argument of type {type(part).__name__}")
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)
