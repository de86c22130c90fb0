"""Opening the embedded store: durable commits, a versioned layout, a file it cannot use said in one
line, and what it found said in the log."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from pathlib import Path

import pytest

from gateway.store.sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteStore, StoreUnusable
from tests.helpers import GatewayProcess, free_port
from tests.store.conftest import make_key

# Nothing listens there: these gateways never get past their start.
BACKENDS = [{"name": "b", "runtime": "openai", "url": f"http://127.0.0.1:{free_port()}", "serves": ["m"]}]

# The layout every gateway before versioning made: no user_version, and no usage_batches table in
# the oldest ones.
UNVERSIONED = """
CREATE TABLE keys (id TEXT PRIMARY KEY, created_at REAL NOT NULL, record TEXT NOT NULL);
CREATE TABLE usage (hour INTEGER NOT NULL, key_id TEXT NOT NULL, model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0, errors INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, key_id, model));
CREATE TABLE last_used (key_id TEXT PRIMARY KEY, at REAL NOT NULL);
"""


def user_version(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


async def a_store_with_keys(db: Path, n: int) -> None:
    store = SQLiteStore(db)
    await store.open()
    for i in range(n):
        await store.create_key(make_key(f"key_{i}"))
    await store.close()


async def test_every_commit_is_fsynced(tmp_path: Path) -> None:
    # What is at stake (a key answered 201, or a revocation, lost to a power cut) cannot be
    # produced in a test without cutting the power: what can be checked is that the setting that
    # prevents it is the one in force on the store's own connection.
    store = SQLiteStore(tmp_path / "gateway.db")
    await store.open()
    try:
        modes = await store._run(lambda db: (db.execute("PRAGMA journal_mode").fetchone()[0],
                                             db.execute("PRAGMA synchronous").fetchone()[0]))
        assert modes == ("wal", 2)  # 2 is FULL: NORMAL (1) syncs a WAL commit only at the next checkpoint
    finally:
        await store.close()


async def test_a_new_store_is_stamped_with_its_schema_version(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    await a_store_with_keys(db, 1)
    assert SCHEMA_VERSION == 1 and sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION + 1))
    assert user_version(db) == SCHEMA_VERSION


async def test_a_store_an_unversioned_gateway_made_is_stamped_and_keeps_its_keys(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    with sqlite3.connect(db) as old:
        old.executescript(UNVERSIONED)
        key = make_key("key_old")
        old.execute("INSERT INTO keys VALUES (?, ?, ?)", (key.id, key.created_at, json.dumps(key.to_record())))
    old.close()
    assert user_version(db) == 0
    store = SQLiteStore(db)
    await store.open()
    try:
        assert [k.id for k in await store.all_keys()] == ["key_old"]
        await store.create_key(make_key("key_new"))
    finally:
        await store.close()
    assert user_version(db) == SCHEMA_VERSION
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert {"keys", "usage", "last_used", "usage_batches"} <= tables


async def test_a_store_a_newer_gateway_wrote_is_refused_untouched(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    await a_store_with_keys(db, 2)
    with sqlite3.connect(db) as newer:
        newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer.close()
    before = db.read_bytes()
    store = SQLiteStore(db)
    with pytest.raises(StoreUnusable) as refused:
        await store.open()
    await store.close()
    assert str(refused.value) == (
        f"{db} was written by a newer gateway (schema {SCHEMA_VERSION + 1}, this one knows {SCHEMA_VERSION}): "
        "upgrade this one, or restore a backup from before the upgrade")
    assert db.read_bytes() == before and user_version(db) == SCHEMA_VERSION + 1


def random_bytes(db: Path) -> None:
    db.write_bytes(os.urandom(8192))


async def truncated_to_half(db: Path) -> None:
    await a_store_with_keys(db, 300)
    os.truncate(db, db.stat().st_size // 2)


@pytest.mark.parametrize("damage", ["random bytes", "truncated to half"])
async def test_a_damaged_file_is_refused_in_one_line_saying_what_to_do(tmp_path: Path, damage: str) -> None:
    db = tmp_path / "gateway.db"
    if damage == "random bytes":
        random_bytes(db)
        reason = "file is not a database"
    else:
        await truncated_to_half(db)
        reason = "database disk image is malformed"
    store = SQLiteStore(db)
    with pytest.raises(StoreUnusable) as refused:
        await store.open()
    await store.close()
    assert str(refused.value) == (f"{db} is not a usable SQLite database ({reason}): restore it from a backup, "
                                  "or move it away to start with an empty store")


async def a_damaged_usage_page(db: Path) -> None:
    """A store whose keys read fine and one page of its usage table is garbage (a disk error)."""
    await a_store_with_keys(db, 3)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        with conn:
            conn.executemany("INSERT INTO usage (hour, key_id, model) VALUES (?, ?, ?)",
                             [(hour, "key_1", "m") for hour in range(3000)])
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'usage'").fetchone()[0]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    with open(db, "r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(b"\xff" * 64)


async def test_a_damaged_page_the_start_would_not_read_is_found_at_open(tmp_path: Path) -> None:
    # The keys and the schema read fine, so nothing would fail until the first usage flush.
    db = tmp_path / "gateway.db"
    await a_damaged_usage_page(db)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*) FROM keys").fetchone()[0] == 3
    store = SQLiteStore(db)
    with pytest.raises(StoreUnusable) as refused:
        await store.open()
    await store.close()
    assert str(refused.value).startswith(f"{db} is not a usable SQLite database (quick_check: ")
    assert str(refused.value).endswith("): restore it from a backup, or move it away to start with an empty store")
    assert "\n" not in str(refused.value)  # said in one line (SQLite writes its findings on several)


async def test_the_log_says_what_the_store_holds(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "gateway.db"
    caplog.set_level(logging.INFO, "gateway.store")
    await a_store_with_keys(db, 3)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", f"created a new, empty store at {db}"), ("INFO", f"embedded store {db}: 0 keys")]
    caplog.clear()
    await a_store_with_keys(db, 0)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("INFO", f"embedded store {db}: 3 keys")]


async def test_an_empty_file_is_opened_as_a_new_store_with_a_warning(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "gateway.db"
    db.touch()  # as a restore that went wrong, or a full disk, can leave it
    caplog.set_level(logging.INFO, "gateway.store")
    await a_store_with_keys(db, 0)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", f"{db} was empty: started a new, empty store in it; if it held keys, stop the gateway "
                    "and restore it from a backup"),
        ("INFO", f"embedded store {db}: 0 keys")]


# --- through a real gateway: one line, exit code 3, as every start failure ---------------------

async def newer_schema(db: Path) -> None:
    await a_store_with_keys(db, 1)
    with contextlib.closing(sqlite3.connect(db)) as newer:
        newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")


@pytest.mark.parametrize("damage, said", [
    pytest.param("random bytes", "data/gateway.db is not a usable SQLite database (file is not a database): restore it",
                 id="random bytes"),
    pytest.param("truncated to half",
                 "data/gateway.db is not a usable SQLite database (database disk image is malformed)",
                 id="truncated to half"),
    pytest.param("a damaged page", "data/gateway.db is not a usable SQLite database (quick_check: ",
                 id="a damaged page"),
    pytest.param("newer schema",
                 f"data/gateway.db was written by a newer gateway (schema {SCHEMA_VERSION + 1}, this one knows",
                 id="newer schema"),
    pytest.param("data_dir is a file", "The gateway cannot start: {data} (File exists): data_dir must be a directory "
                 "the gateway's user can write", id="data_dir is a file"),
    pytest.param("logs is a file", "The gateway cannot start: {data}/logs (File exists): data_dir must be a directory",
                 id="logs is a file"),
])
async def test_a_start_on_an_unusable_store_says_so_in_one_line(tmp_path: Path, damage: str, said: str) -> None:
    # (As root a read-only data_dir cannot be made with chmod; a file where a directory must be
    # fails the same mkdir with an OSError.)
    data = tmp_path / "data"
    if damage == "data_dir is a file":
        data.touch()
    else:
        data.mkdir()
    db = data / "gateway.db"
    if damage == "random bytes":
        random_bytes(db)
    elif damage == "truncated to half":
        await truncated_to_half(db)
    elif damage == "a damaged page":
        await a_damaged_usage_page(db)
    elif damage == "newer schema":
        await newer_schema(db)
    elif damage == "logs is a file":
        (data / "logs").touch()
    gateway = GatewayProcess({"backends": BACKENDS}, tmp_path)
    try:
        assert gateway.proc.wait(60) == 3, gateway.log()
        log = gateway.log()
        assert said.format(data=data) in log, log
        assert "Traceback" not in log and "ExceptionGroup" not in log, log
    finally:
        gateway.stop()
