"""One contract, run against every store: what admins create and what clients use survives."""

from __future__ import annotations

import asyncio
import time

from gateway.store.base import Store, UsageDelta, hour_of
from tests.store.conftest import OpenStore, make_key


async def test_create_get_and_list(store: Store) -> None:
    first, second = make_key("key_1", created_at=1.0), make_key("key_2", created_at=2.0, models=None)
    await store.create_key(second)
    await store.create_key(first)
    assert await store.get_key("key_1") == first
    assert await store.get_key("missing") is None
    assert [k.id for k in await store.all_keys()] == ["key_1", "key_2"]  # oldest first


async def test_put_replaces_the_record(store: Store) -> None:
    key = make_key()
    await store.create_key(key)
    revoked = key.updated(revoked_at=time.time(), rpm=None)
    await store.put_key(revoked)
    assert await store.get_key(key.id) == revoked
    assert not revoked.usable(time.time())


async def test_change_feed_names_changed_keys(store: Store) -> None:
    changes = store.key_changes()
    assert await asyncio.wait_for(anext(changes), 5) is None  # first: "load everything"
    await store.create_key(make_key("key_9"))
    assert await asyncio.wait_for(anext(changes), 5) == "key_9"
    await store.put_key(make_key("key_9", name="bob"))
    assert await asyncio.wait_for(anext(changes), 5) == "key_9"
    await changes.aclose()


async def test_usage_adds_exactly_under_concurrency(store: Store) -> None:
    hour = hour_of(time.time())
    row = (hour, "key_1", "m")

    async def add_one() -> None:
        await store.add_usage({row: UsageDelta(1, 10, 5, 0)}, {"key_1": time.time()})

    await asyncio.gather(*(add_one() for _ in range(50)))
    await store.add_usage({row: UsageDelta(2, 0, 0, 2), (hour, "key_2", "m"): UsageDelta(1, 1, 1, 0)}, {})
    rows = dict(await store.usage(hour, hour + 3600))
    assert rows[row] == UsageDelta(52, 500, 250, 2)
    assert rows[(hour, "key_2", "m")] == UsageDelta(1, 1, 1, 0)
    assert await store.usage(hour + 3600, hour + 7200) == []
    assert "key_1" in await store.last_used()


async def test_last_used_keeps_the_latest(store: Store) -> None:
    await store.add_usage({}, {"key_1": 200.0})
    await store.add_usage({}, {"key_1": 100.0})  # an older flush arriving late
    assert (await store.last_used())["key_1"] == 200.0


async def test_everything_survives_a_reopen(store: Store, open_store: OpenStore) -> None:
    key = make_key()
    hour = hour_of(time.time())
    await store.create_key(key)
    await store.add_usage({(hour, key.id, "m"): UsageDelta(3, 30, 15, 1)}, {key.id: 123.0})
    await store.close()
    fresh = await open_store()
    assert await fresh.get_key(key.id) == key
    assert dict(await fresh.usage(hour, hour + 3600))[(hour, key.id, "m")] == UsageDelta(3, 30, 15, 1)
    assert (await fresh.last_used())[key.id] == 123.0
