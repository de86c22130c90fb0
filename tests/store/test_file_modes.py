"""The embedded store's files are its user's alone (gateway/store/sqlite.py, make_private): a data
directory the gateway creates is 0700, its database files 0600, whatever the umask lets through."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.store.sqlite import SQLiteStore
from tests.conftest import StartGateway
from tests.helpers import free_port
from tests.store.conftest import make_key


@pytest.fixture(autouse=True)
def open_umask() -> Iterator[None]:
    """The common default: without explicit modes every file would be 0644 and every directory 0755."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def database_files(db: Path) -> list[Path]:
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]


async def test_a_new_store_is_private(tmp_path: Path) -> None:
    db = tmp_path / "data" / "gateway.db"
    store = SQLiteStore(db)
    await store.open()
    try:
        await store.create_key(make_key())
        assert mode(db.parent) == 0o700
        assert {f.name: mode(f) for f in database_files(db)} == {f.name: 0o600 for f in database_files(db)}
    finally:
        await store.close()


async def test_an_operators_directory_keeps_its_mode_and_an_old_database_is_made_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o750)
    db = data / "gateway.db"
    # As an older gateway left it, killed while open: every file 0644, the -wal and -shm still there.
    left_over = sqlite3.connect(db)
    left_over.execute("PRAGMA journal_mode=WAL")
    with left_over:
        left_over.execute("CREATE TABLE before (x)")
    assert [mode(f) for f in database_files(db)] == [0o644] * 3
    store = SQLiteStore(db)
    await store.open()
    try:
        assert mode(data) == 0o750
        assert [mode(f) for f in database_files(db)] == [0o600] * 3
    finally:
        await store.close()
        left_over.close()


def test_a_gateway_makes_its_data_dir_private(start_gateway: StartGateway) -> None:
    dead = {"name": "away", "runtime": "openai", "url": f"http://127.0.0.1:{free_port()}", "serves": ["m"]}
    gateway = start_gateway({"backends": [dead]}, ready=False)
    data = gateway.directory / "data"
    assert mode(data) == 0o700 and mode(data / "logs") == 0o700  # the backends' output
    for file in [*database_files(data / "gateway.db"), data / "gateway.lock"]:
        assert mode(file) == 0o600, file
