"""An embedded store that cannot write (disk full, read-only) while the gateway runs: the admin API
answers 503 with retry-after and the reason, changing nothing, rather than 500 with a traceback;
and the usage it cannot store is counted in gateway_usage_unsaved_requests."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import metrics
from gateway.app import Gateway, create_app
from gateway.config import parse
from tests.helpers import ADMIN_KEY, error_of, free_port

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    """The gateway's whole app in this process, so the test can reach its store's connection
    (run here, on the main thread: its lifespan installs a signal handler), and a client for it."""
    config = parse({"admin": {"key": ADMIN_KEY}, "data_dir": str(tmp_path / "data"),
                    "backends": [{"name": "b", "runtime": "openai", "url": f"http://127.0.0.1:{free_port()}",
                                  "serves": ["m"]}]}, base_dir=tmp_path)
    door = create_app(config)
    gateway = door.app.state.gateway
    async with gateway.lifespan(door.app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=door), base_url="http://gateway") as client:
            yield gateway, client


def disk_full(gateway: Gateway) -> Any:
    """The store's file may grow no more: SQLite then fails a write that needs a new page with
    SQLITE_FULL, as on a full disk."""

    def cap(db: sqlite3.Connection) -> None:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")

    return gateway.store._run(cap)  # type: ignore[attr-defined]


def read_only(gateway: Gateway) -> Any:
    """Every write fails with SQLITE_READONLY, as on a file system remounted read-only."""
    return gateway.store._run(lambda db: db.execute("PRAGMA query_only = 1"))  # type: ignore[attr-defined]


# Records too big for the pages a full file has left.
BIG = {"name": "x" * 200, "metadata": {"note": "y" * 8000}}


@pytest.mark.parametrize(("failure", "reason", "writes"), [
    (disk_full, "database or disk is full", ["create", "update"]),
    (read_only, "attempt to write a readonly database", ["create", "update", "rotate", "revoke"]),
], ids=["disk full", "read-only"])
async def test_admin_writes_the_store_cannot_make_answer_503_and_change_nothing(
        running: tuple[Gateway, httpx.AsyncClient], caplog: pytest.LogCaptureFixture, failure: Any, reason: str,
        writes: list[str]) -> None:
    gateway, client = running
    created = (await client.post("/admin/keys", json={"name": "before"}, headers=ADMIN)).json()
    await failure(gateway)
    requests = {"create": ("POST", "/admin/keys", BIG), "update": ("PATCH", f"/admin/keys/{created['id']}", BIG),
                "rotate": ("POST", f"/admin/keys/{created['id']}/rotate", {}),
                "revoke": ("DELETE", f"/admin/keys/{created['id']}", None)}
    for write in writes:
        method, path, body = requests[write]
        response = await client.request(method, path, json=body, headers=ADMIN)
        error = error_of(response, 503)
        assert (error["type"], error["code"]) == ("server_error", "backend_unavailable"), error
        assert error["message"] == f"The key store cannot write: {reason}. Nothing was changed; try again later."
        assert int(response.headers["retry-after"]) >= 1
    assert "Traceback" not in caplog.text and "unhandled error" not in caplog.text
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.admin"] == [
        f"{write}_key: the key store cannot write ({reason})" for write in writes]
    listed = (await client.get("/admin/keys", params={"status": "all"}, headers=ADMIN)).json()["data"]
    assert [(k["id"], k["name"], k["status"], k["prefix"]) for k in listed] == [
        (created["id"], "before", "active", created["prefix"])]
    models = await client.get("/v1/models", headers={"authorization": f"Bearer {created['key']}"})
    assert models.status_code == 200  # not revoked, not rotated: the gateway's cache agrees with the store


async def test_usage_the_store_cannot_write_is_counted_until_it_can(
        running: tuple[Gateway, httpx.AsyncClient], caplog: pytest.LogCaptureFixture) -> None:
    gateway, _ = running
    await disk_full(gateway)
    for _ in range(3):
        gateway.usage.add("key_1", "m" * 3000, prompt_tokens=5)  # rows too big for the pages left
    caplog.set_level(logging.WARNING, "gateway.usage")
    assert await gateway.usage.flush() is False
    assert "database or disk is full" in caplog.text
    assert metrics.REGISTRY.get_sample_value("gateway_usage_unsaved_requests") == 3
    gateway.usage.add("key_1", "m")
    assert await gateway.usage.flush() is False
    assert metrics.REGISTRY.get_sample_value("gateway_usage_unsaved_requests") == 4
    await gateway.store._run(lambda db: db.execute("PRAGMA max_page_count = 1073741823"))  # type: ignore[attr-defined]
    assert await gateway.usage.flush() is True
    assert metrics.REGISTRY.get_sample_value("gateway_usage_unsaved_requests") == 0


async def test_a_key_whose_stored_record_is_damaged_is_a_500_saying_so_and_the_others_list(
        running: tuple[Gateway, httpx.AsyncClient], caplog: pytest.LogCaptureFixture) -> None:
    gateway, client = running
    damaged = (await client.post("/admin/keys", json={"name": "damaged"}, headers=ADMIN)).json()
    fine = (await client.post("/admin/keys", json={"name": "fine"}, headers=ADMIN)).json()
    await gateway.store._run(lambda db: db.execute(  # type: ignore[attr-defined]
        "UPDATE keys SET record = '{not json' WHERE id = ?", (damaged["id"],)))
    for method, path in (("GET", f"/admin/keys/{damaged['id']}"), ("PATCH", f"/admin/keys/{damaged['id']}"),
                         ("DELETE", f"/admin/keys/{damaged['id']}")):
        response = await client.request(method, path, json={"name": "x"} if method == "PATCH" else None, headers=ADMIN)
        error = error_of(response, 500)
        assert "stored record cannot be read" in error["message"] and "nothing was changed" in error["message"]
        assert (error["type"], error["code"]) == ("server_error", "key_record_unreadable")
    listed = (await client.get("/admin/keys", headers=ADMIN)).json()["data"]
    assert [k["id"] for k in listed] == [fine["id"]]  # left out, with an ERROR naming it
    assert any(damaged["id"] in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert "Traceback" not in caplog.text
