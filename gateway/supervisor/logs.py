"""A backend's output: the last lines in memory, everything in a rotating file, live followers."""

from __future__ import annotations

import asyncio
import collections
import logging
import logging.handlers
from pathlib import Path


MAX_LINE = 8 * 1024  # characters of a line kept in memory (the ring, followers); the file has it whole


class BackendLog:
    def __init__(self, name: str, directory: Path, *, keep_lines: int = 2000,
                 file_bytes: int = 10 * 1024**2, file_count: int = 3) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self.written = 0  # lines ever written: a mark to read "everything since" from the ring
        self._followers: set[asyncio.Queue[str | None]] = set()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # a runtime's output may hold anything
        self.path = directory / f"{name}.log"
        # The stdlib's rotating handler: bounded disk use for a process that runs for months.
        self._file = logging.handlers.RotatingFileHandler(
            self.path, maxBytes=file_bytes, backupCount=file_count, encoding="utf-8"
        )
        self._file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))

    def write(self, line: str) -> None:
        line = line.rstrip("\r\n")
        if "\r" in line:  # a progress bar redrawn in place: keep what it shows last
            line = line.rsplit("\r", 1)[1]
        self._file.emit(logging.makeLogRecord({"msg": line, "args": None}))
        if len(line) > MAX_LINE:
            # The ring keeps 2,000 lines: at up to 128 KiB each (a runtime printing without
            # newlines) that was 256 MiB per backend, and as much per follower.
            line = f"{line[:MAX_LINE]} [... {len(line) - MAX_LINE} more characters in {self.path.name}]"
        self.lines.append(line)
        self.written += 1
        for queue in self._followers:
            if queue.full():  # a slow follower loses its oldest line, never blocks the pump
                queue.get_nowait()
            queue.put_nowait(line)

    def tail(self, n: int) -> list[str]:
        if n <= 0:
            return []
        return list(self.lines)[-n:]

    def since(self, mark: int) -> list[str]:
        """The lines written after `written` was `mark` (as many as the ring still holds)."""
        count = min(self.written - mark, len(self.lines))
        return self.tail(count)

    def follow(self) -> asyncio.Queue[str | None]:
        """A queue of every line written from now on; None at the end (the log was closed)."""
        queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=1000)
        self._followers.add(queue)
        return queue

    def unfollow(self, queue: asyncio.Queue[str | None]) -> None:
        self._followers.discard(queue)

    def close(self) -> None:
        for queue in self._followers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)
        self._file.close()
