"""A bound on how long a client may leave an answer unread (nginx's `send_timeout`).

uvicorn makes an ASGI `send` wait while the client's socket is full, and has no bound of its
own. A client that stops reading a stream without closing (a stuck script, a suspended machine
whose connection is still up) would hold its backend slot, its admission lease and the runtime's
generation for as long as the connection lives: for a live client that never reads, forever.
Streams only: uvicorn waits for room before a write, never after one, so a JSON answer's last
write returns, and its first could wait only behind an earlier answer on the same connection
still unread, which takes a client that pipelines (no OpenAI client does).

One task looks at every answer being written once a second; a send seen waiting at one look
and still waiting `timeout` seconds later (so between `timeout` and `timeout` + 2 s in all)
gets its handler task cancelled. The cancellation lands inside that send (the handler is
suspended nowhere else while `begun != done`), so the handler catches it there and ends the
request as a client that went away. Sends that do not wait, which is nearly all of them, cost a
wrapper call and two counter increments, and no timer.

What a cut cannot do is close the connection: ASGI gives no handle on it. uvicorn logs
"ASGI callable returned without completing response" and closes the transport, which keeps
the socket until its buffer drains or the client goes; the slot, the lease and the runtime's
generation are free at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from litestar.types import Send

log = logging.getLogger("gateway.request")

CHECK_INTERVAL = 1.0


class Writer:
    """The sends of one answer, counted so a waiting one can be seen from outside."""

    __slots__ = ("_send", "task", "request_id", "begun", "done", "seen", "since", "stalled")

    def __init__(self, send: Send, task: asyncio.Task[Any], request_id: str) -> None:
        self._send, self.task, self.request_id = send, task, request_id
        self.begun = self.done = self.seen = 0
        self.since = 0.0
        self.stalled = False  # set once, by the watch, just before it cancels the task

    async def send(self, message: Any) -> None:
        self.begun += 1
        try:
            await self._send(message)
        finally:  # a send that raised is not waiting either
            self.done += 1


class SendWatch:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._writers: set[Writer] = set()
        self._task: asyncio.Task[None] | None = None

    def watch(self, send: Send, request_id: str) -> Writer:
        task = asyncio.current_task()
        assert task is not None
        writer = Writer(send, task, request_id)
        self._writers.add(writer)
        return writer

    def forget(self, writer: Writer) -> None:
        self._writers.discard(writer)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="send-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            self.check(time.monotonic())

    def check(self, now: float) -> None:
        for writer in self._writers:
            if writer.begun == writer.done or writer.stalled or writer.task.cancelling():
                continue  # not waiting in a send (or already cut, or being cancelled for another reason)
            if writer.begun != writer.seen:  # a send that began waiting since the last look
                writer.seen, writer.since = writer.begun, now
            elif now - writer.since >= self.timeout:
                writer.stalled = True
                log.warning("client took no bytes for over %.0fs (server.send_timeout): answer cut, slot freed",
                            now - writer.since, extra={"request_id": writer.request_id})
                writer.task.cancel()
