"""A backend's output: the last lines in memory, everything in a rotating file, live followers."""

from __future__ import annotations

import asyncio
import collections
import logging
import logging.handlers
from pathlib import Path


class BackendLog:
    def __init__(self, name: str, directory: Path, *, keep_lines: int = 2000,
                 file_bytes: int = 10 * 1024**2, file_count: int = 3) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self._followers: set[asyncio.Queue[str]] = set()
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{name}.log"
        # The stdlib's rotating handler: bounded disk use for a process that runs for months.
        self._file = logging.handlers.RotatingFileHandler(
            self.path, maxBytes=file_bytes, backupCount=file_count, encoding="utf-8"
        )
        self._file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))

    def write(self, line: str) -> None:
        line = line.rstrip("\r\n")
        self.lines.append(line)
        self._file.emit(logging.makeLogRecord({"msg": line, "args": None}))
        for queue in self._followers:
            if queue.full():  # a slow follower loses its oldest line, never blocks the pump
                queue.get_nowait()
            queue.put_nowait(line)

    def tail(self, n: int) -> list[str]:
        if n <= 0:
            return []
        return list(self.lines)[-n:]

    def follow(self) -> asyncio.Queue[str]:
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=1000)
        self._followers.add(queue)
        return queue

    def unfollow(self, queue: asyncio.Queue[str]) -> None:
        self._followers.discard(queue)

    def close(self) -> None:
        self._file.close()
