"""One gateway per embedded store: the SQLite store is this process's alone (its key cache and
usage batches are not shared), so a second gateway started on the same data_dir must refuse to
start rather than serve from a copy that drifts (a key revoked on one still opening the other).

An advisory `flock` on a file beside the database: the kernel drops it when the process dies,
however it dies, so a crash never leaves a stale lock behind."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class DataDirInUse(RuntimeError):
    pass


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold `path`'s lock while the block runs; DataDirInUse at once if another process holds it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # private, as the store's (store/sqlite.py)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DataDirInUse(
                f"Another gateway (pid {holder}) uses the embedded store in {path.parent}. It serves "
                "one process only: give this one its own data_dir, or run both on the Redis store "
                "(store.url).") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # (closing releases the lock)
