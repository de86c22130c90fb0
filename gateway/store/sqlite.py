"""The embedded store: one SQLite file in the data directory, stdlib only.

For one gateway process (the single-box default). Every statement runs on one dedicated thread,
so the event loop never blocks on disk and SQLite sees one writer. WAL + synchronous=FULL: a
commit is on disk before it is answered, so a key created, or revoked, stays so across a power
loss too. Usage is flushed about once a second. Usage past `store.usage_retention` is deleted by
the flush, on the same thread, at most once an hour.

The layout is versioned in the file's `user_version` (SCHEMA_VERSION): a gateway opens a file
of an older layout by running MIGRATIONS, and refuses one of a newer layout, which it would
misread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from gateway.config import DEFAULT_USAGE_RETENTION
from gateway.store.base import (BATCH_ID_TTL, ApiKey, KeyChange, PruneSchedule, Store, UsageBatch, UsageDelta,
                                UsageKey, decode_keys, last_expired_hour)

T = TypeVar("T")

log = logging.getLogger("gateway.store")

# Rows one prune deletes at most. It is one transaction on the store's only thread, which every
# other store call waits behind: the first prune after an upgrade may find years of rows, and
# deletes them over a few flushes, a few milliseconds each, rather than in one long transaction.
PRUNE_BATCH = 10_000

# The layout this gateway reads and writes, kept in the file's `user_version`. A change to the
# tables bumps it and adds the step from the one before to MIGRATIONS.
SCHEMA_VERSION = 1

# Layout 1, as every gateway before versioning made it (usage_batches came last: IF NOT EXISTS
# adds it to a file from before then).
SCHEMA_1 = (
    """CREATE TABLE IF NOT EXISTS keys (
        id TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        record TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS usage (
        hour INTEGER NOT NULL,
        key_id TEXT NOT NULL,
        model TEXT NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (hour, key_id, model)
    )""",
    """CREATE TABLE IF NOT EXISTS last_used (
        key_id TEXT PRIMARY KEY,
        at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS usage_batches (
        id TEXT PRIMARY KEY,
        applied_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS usage_batches_applied_at ON usage_batches (applied_at)",
)


def _create_schema_1(db: sqlite3.Connection) -> None:
    for statement in SCHEMA_1:
        db.execute(statement)


# version -> the step to it from the version before, run in order in the transaction that then
# sets user_version. From 0 (a new file, or one an unversioned gateway made) the step is layout 1.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _create_schema_1}


_NOT_USABLE = ("{path} is not a usable SQLite database ({reason}): restore it from a backup, or move it away to "
               "start with an empty store")


class StoreUnusable(RuntimeError):
    """The database file cannot be used as it is: the operator's to fix, said in one line."""


PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def make_private(path: Path) -> None:
    """The database (keys' hashes, usage) readable by the gateway's user only, whatever the umask.

    The modes are set explicitly rather than by narrowing the process umask, which the runtimes
    the gateway spawns would inherit. A data directory this creates is 0700; one that exists is
    left as it is, since an operator who made it (group-readable for a backup job, say) chose its
    mode. The database files are the gateway's own, so they are made 0600 even when they exist
    (one from an older gateway is 0644). SQLite creates -wal and -shm with the mode of the database
    file, so they follow it; the ones left over by a crash are fixed here as well."""
    path.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT, PRIVATE_FILE))  # an empty file is a new database to SQLite
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        # Not the owner (a file another user made, writable through its group): its mode is
        # theirs to set, and SQLite can still use it, so the store opens as it did before.
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.chmod(file, PRIVATE_FILE)


class SQLiteStore(Store):
    def __init__(self, path: Path, *, usage_retention: float = DEFAULT_USAGE_RETENTION,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._usage_retention = usage_retention
        self._prune = PruneSchedule(clock)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._db: sqlite3.Connection | None = None
        self._changes: asyncio.Queue[str | None] = asyncio.Queue()

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self._db is not None
            with self._db:  # one transaction per call
                return fn(self._db)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def open(self) -> None:
        self._db = await asyncio.get_running_loop().run_in_executor(self._executor, self._connect)

    def _connect(self) -> sqlite3.Connection:
        """On the store's thread: the file opened, brought to SCHEMA_VERSION, and said so in the log.
        A file that cannot be used is a StoreUnusable, said in one line (app.CANNOT_START)."""
        existed = self.path.exists()
        db = None
        try:
            make_private(self.path)
            db = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: each commit is fsynced before it is answered (NORMAL waits for a checkpoint, so a
            # power loss could undo a key answered 201, or a revocation). That is one fsync per
            # commit: the usage flush about once a second, and the rare key write.
            db.execute("PRAGMA synchronous=FULL")
            # A damaged page elsewhere than the few a start reads (a disk error, a copy taken
            # mid-write) would otherwise surface later, as every usage flush failing, or one key
            # that cannot be read. quick_check reads every page once: 0.14 s for a 154 MB store in
            # the page cache (1.2M usage rows), plus the disk's time to read it on a cold start.
            problem = db.execute("PRAGMA quick_check(1)").fetchone()[0]
            if problem != "ok":  # (its findings come on several lines: said in one)
                reason = "quick_check: " + " ".join(problem.split())
                raise StoreUnusable(_NOT_USABLE.format(path=self.path, reason=reason))
            had_tables, version, keys = self._migrate(db)
        except BaseException as exc:
            if db is not None:
                db.close()
            if isinstance(exc, (OSError, sqlite3.DatabaseError)):
                raise self._unusable(exc) from exc
            raise
        if not existed:
            # Expected on a first start; on any other, data_dir is not where the keys were.
            log.warning("created a new, empty store at %s", self.path)
        elif not had_tables:
            log.warning("%s was empty: started a new, empty store in it; if it held keys, stop the gateway "
                        "and restore it from a backup", self.path)
        elif version < SCHEMA_VERSION:
            log.info("embedded store %s: schema %d upgraded to %d", self.path, version, SCHEMA_VERSION)
        log.info("embedded store %s: %d keys", self.path, keys)
        return db

    def _migrate(self, db: sqlite3.Connection) -> tuple[bool, int, int]:
        """Runs the migrations the file needs, all in one transaction; returns whether it had tables,
        the schema version it had, and how many keys it holds."""
        with db:
            db.execute("BEGIN IMMEDIATE")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreUnusable(f"{self.path} was written by a newer gateway (schema {version}, this one knows "
                                    f"{SCHEMA_VERSION}): upgrade this one, or restore a backup from before the upgrade")
            had_tables = db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is not None
            for step in range(version + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[step](db)
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            keys = db.execute("SELECT count(*) FROM keys").fetchone()[0]
        return had_tables, version, keys

    def _unusable(self, exc: OSError | sqlite3.DatabaseError) -> StoreUnusable:
        if (getattr(exc, "sqlite_errorname", None) or "").startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
            return StoreUnusable(_NOT_USABLE.format(path=self.path, reason=exc))
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return StoreUnusable(f"cannot open the embedded store {self.path} ({reason}): data_dir must be writable "
                             "by the gateway's user, on a disk with room")

    async def close(self) -> None:
        if self._db is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)

    async def create_key(self, key: ApiKey) -> None:
        record = key.encode()
        await self._run(lambda db: db.execute("INSERT INTO keys (id, created_at, record) VALUES (?, ?, ?)",
                                              (key.id, key.created_at, record)))
        self._changes.put_nowait(key.id)

    async def get_key(self, key_id: str) -> ApiKey | None:
        row = await self._run(lambda db: db.execute("SELECT record FROM keys WHERE id = ?", (key_id,)).fetchone())
        return ApiKey.decode(row[0]) if row else None

    async def modify_key(self, key_id: str, change: KeyChange) -> ApiKey | None:
        def read_change_write(db: sqlite3.Connection) -> tuple[ApiKey | None, bool]:
            # IMMEDIATE: the write lock is taken before the read, so not even another process
            # on the same file writes in between (this process's calls are serial already).
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT record FROM keys WHERE id = ?", (key_id,)).fetchone()
            if row is None:
                return None, False
            current = ApiKey.decode(row[0])  # KeyRecordError rolls the transaction back
            key = change(current)
            if key == current:
                return key, False
            db.execute("UPDATE keys SET record = ? WHERE id = ?", (key.encode(), key_id))
            return key, True

        key, written = await self._run(read_change_write)
        if written:
            self._changes.put_nowait(key_id)
        return key

    async def all_keys(self) -> list[ApiKey]:
        def read(db: sqlite3.Connection) -> list[ApiKey]:
            rows = db.execute("SELECT id, record FROM keys ORDER BY created_at, id").fetchall()
            # Decoded here too, off the event loop: 10,000 records take a tenth of a second.
            return decode_keys(rows)

        return await self._run(read)

    async def key_changes(self) -> AsyncIterator[str | None]:  # type: ignore[override]
        # One process owns the file, so every change was made here: an in-process feed suffices.
        yield None
        while True:
            yield await self._changes.get()

    async def keys_version(self) -> None:
        return None  # the feed above misses nothing

    async def add_usage(self, batch: UsageBatch) -> None:
        rows = [(hour, key_id, model, d.requests, d.prompt_tokens, d.completion_tokens, d.errors)
                for (hour, key_id, model), d in batch.deltas.items()]

        def write(db: sqlite3.Connection) -> None:
            # A caller that stopped waiting (cancelled) leaves the write running on the store's
            # thread, to commit after all: a retry of the batch must then count for nothing.
            now = time.time()
            db.execute("DELETE FROM usage_batches WHERE applied_at < ?", (now - BATCH_ID_TTL,))
            if db.execute("INSERT OR IGNORE INTO usage_batches (id, applied_at) VALUES (?, ?)",
                          (batch.id, now)).rowcount == 0:
                return
            db.executemany(
                """INSERT INTO usage (hour, key_id, model, requests, prompt_tokens, completion_tokens, errors)
                   VALUES (?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (hour, key_id, model) DO UPDATE SET
                     requests = requests + excluded.requests,
                     prompt_tokens = prompt_tokens + excluded.prompt_tokens,
                     completion_tokens = completion_tokens + excluded.completion_tokens,
                     errors = errors + excluded.errors""",
                rows,
            )
            db.executemany(
                """INSERT INTO last_used (key_id, at) VALUES (?, ?)
                   ON CONFLICT (key_id) DO UPDATE SET at = max(at, excluded.at)""",
                list(batch.last_used.items()),
            )

        await self._run(write)
        await self._prune_usage()

    async def _prune_usage(self) -> None:
        """Expired usage goes, when it is time to look (PruneSchedule). A transaction of its own,
        after the flush's: the counts just written stay committed whatever happens here."""
        now = self._prune.due()
        if now is None:
            return
        cutoff = last_expired_hour(now, self._usage_retention)

        def delete(db: sqlite3.Connection) -> int:
            # The oldest rows first, found through the primary key's index (hour leads it).
            return db.execute("DELETE FROM usage WHERE rowid IN (SELECT rowid FROM usage WHERE hour <= ? LIMIT ?)",
                              (cutoff, PRUNE_BATCH)).rowcount

        try:
            deleted = await self._run(delete)
        except sqlite3.Error as exc:
            log.warning("usage retention: deleting expired usage failed (%s); tried again in an hour", exc)
            return
        if deleted >= PRUNE_BATCH:
            self._prune.go_on()
        if deleted:
            log.debug("usage retention: deleted %d rows of usage from hours up to %d", deleted, cutoff)

    async def usage(self, start: float, end: float) -> list[tuple[UsageKey, UsageDelta]]:
        def read(db: sqlite3.Connection) -> list[Any]:
            return db.execute(
                """SELECT hour, key_id, model, requests, prompt_tokens, completion_tokens, errors
                   FROM usage WHERE hour >= ? AND hour < ? ORDER BY hour, key_id, model""",
                (start, end),
            ).fetchall()

        return [((r[0], r[1], r[2]), UsageDelta(*r[3:])) for r in await self._run(read)]

    async def last_used(self) -> dict[str, float]:
        rows = await self._run(lambda db: db.execute("SELECT key_id, at FROM last_used").fetchall())
        return dict(rows)
