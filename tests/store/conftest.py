"""The stores under test: every store test runs against SQLite and against a real Redis."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.store.base import ApiKey, Store, hash_secret
from gateway.store.redis import RedisStore
from gateway.store.sqlite import SQLiteStore
from tests.conftest import RedisServer

OpenStore = Callable[..., Awaitable[Store]]  # keyword options go to the store (usage_retention, clock)


@pytest.fixture(params=["sqlite", "redis"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Opens store objects on one set of data; a second one is the store after a restart."""
    opened: list[Store] = []
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None

    async def open_one(**options: Any) -> Store:
        s: Store = (RedisStore(aioredis.Redis.from_url(redis_url), **options) if redis_url
                    else SQLiteStore(tmp_path / "gateway.db", **options))
        await s.open()
        opened.append(s)
        return s

    yield open_one
    for s in opened:
        await s.close()
        if isinstance(s, RedisStore):
            await s.redis.aclose()


@pytest.fixture
async def store(open_store: OpenStore) -> Store:
    return await open_store()


def make_key(key_id: str = "key_1", **changes: object) -> ApiKey:
    now = time.time()
    fields = dict(id=key_id, name="alice", hash=hash_secret("sk-gw-" + key_id), prefix="sk-gw-abcdef",
                  created_at=now, updated_at=now, models=["m"], rpm=10, metadata={"team": "a"})
    fields.update(changes)
    return ApiKey(**fields)  # type: ignore[arg-type]


async def overwrite_record(store: Store, key_id: str, raw: str) -> None:
    """Puts `raw` where the store keeps that key's record, as another gateway version (or a hand
    in redis-cli or sqlite3) would."""
    if isinstance(store, RedisStore):
        await store.redis.set(store.ks.key(key_id), raw)
    else:
        assert isinstance(store, SQLiteStore)
        with sqlite3.connect(store.path) as db:
            assert db.execute("UPDATE keys SET record = ? WHERE id = ?", (raw, key_id)).rowcount == 1


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's alone, for tests that kill, restart or reconfigure it."""
    server = RedisServer(tmp_path)
    yield server
    server.kill()
