"""Usage is kept for `store.usage_retention` after its hour ends, then deleted, by every store.

The stores take a clock for when to look and what has expired; Redis expires each hour's hash
on its own clock, so expiry times are checked as times (PEXPIRETIME), never waited for.
"""

from __future__ import annotations

import sqlite3
import time

import pytest

from gateway.store import redis as redis_store
from gateway.store import sqlite as sqlite_store
from gateway.store.base import Store, UsageBatch, UsageDelta, UsageKey, hour_of, new_batch_id
from gateway.store.redis import RedisStore
from gateway.store.sqlite import SQLiteStore
from tests.store.conftest import OpenStore

HOUR, DAY = 3600, 86400
RETENTION = 2 * DAY
FOREVER = 4_000_000_000  # end of a usage() range that takes every hour


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def batch(deltas: dict[UsageKey, UsageDelta], last_used: dict[str, float] | None = None) -> UsageBatch:
    return UsageBatch(new_batch_id(), deltas, last_used or {})


def used(hour: int, requests: int = 1) -> dict[UsageKey, UsageDelta]:
    return {(hour, "key_1", "m"): UsageDelta(requests, 10 * requests, 5 * requests, 0)}


async def listed_hours(store: Store) -> set[int]:
    """The hours the store holds usage for, by its own records: usage() cannot tell, on Redis,
    an hour whose hash has expired but is still in the index from one that is gone."""
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path) as db:  # (WAL: a second reader sees what was committed)
            return {hour for (hour,) in db.execute("SELECT DISTINCT hour FROM usage")}
    assert isinstance(store, RedisStore)
    return {int(hour) for hour in await store.redis.zrange(store.ks.usage_hours, 0, -1)}


async def hash_hours(store: RedisStore) -> set[int]:
    """The hours whose usage hash exists in Redis."""
    names = await store.redis.keys(f"{store.ks.prefix}usage:[0-9]*")
    return {int(name.decode().rsplit(":", 1)[1]) for name in names}


async def test_usage_past_the_retention_is_deleted_and_the_rest_kept(open_store: OpenStore) -> None:
    clock = Clock(time.time())
    store = await open_store(usage_retention=RETENTION, clock=clock)
    now = hour_of(clock.now)
    expired = now - RETENTION - HOUR  # ended RETENTION ago at the latest: gone
    long_expired = now - 30 * DAY
    kept = now - RETENTION + HOUR  # ends within the hour after now: still ours for RETENTION
    await store.add_usage(batch({**used(long_expired), **used(expired), **used(kept, 2), **used(now, 3)}))
    clock.now += HOUR  # the next look for expired usage is due (Redis expired its hashes at once)
    await store.add_usage(batch({}, {"key_1": clock.now}))

    # What the admin usage endpoint reports (it asks the store the same).
    assert await store.usage(0, FOREVER) == [((kept, "key_1", "m"), UsageDelta(2, 20, 10, 0)),
                                             ((now, "key_1", "m"), UsageDelta(3, 30, 15, 0))]
    assert await listed_hours(store) == {kept, now}
    if isinstance(store, RedisStore):
        assert await hash_hours(store) == {kept, now}
        for hour in (kept, now):  # each hour's hash goes when its hour is RETENTION past
            assert await store.redis.pexpiretime(store.ks.usage(hour)) == (hour + HOUR + RETENTION) * 1000


async def test_expired_usage_is_looked_for_at_most_once_an_hour(open_store: OpenStore) -> None:
    clock = Clock(time.time())
    store = await open_store(usage_retention=RETENTION, clock=clock)
    now = hour_of(clock.now)
    await store.add_usage(batch(used(now)))  # the first flush looks (and finds nothing)
    expired = now - RETENTION - 5 * HOUR
    await store.add_usage(batch(used(expired)))  # (as a recorder holding counts for days would)
    clock.now += HOUR - 1
    await store.add_usage(batch(used(now)))
    assert expired in await listed_hours(store)  # not looked for again yet: a flush a second stays cheap
    clock.now += 1
    await store.add_usage(batch(used(now)))
    assert await listed_hours(store) == {now}
    assert await store.usage(0, FOREVER) == [((now, "key_1", "m"), UsageDelta(3, 30, 15, 0))]


async def test_a_long_backlog_of_expired_usage_goes_over_several_flushes(
        open_store: OpenStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # The first look after an upgrade may find years: it deletes a bounded batch per flush,
    # and the next flush goes on (not an hour later).
    monkeypatch.setattr(sqlite_store, "PRUNE_BATCH", 2)
    monkeypatch.setattr(redis_store, "SWEEP_BATCH", 2)
    clock = Clock(time.time())
    now = hour_of(clock.now)
    expired = [now - RETENTION - HOUR * (i + 1) for i in range(5)]
    old = await open_store(usage_retention=100 * DAY, clock=clock)  # before: all of it within retention
    await old.add_usage(batch({row: delta for hour in expired for row, delta in used(hour).items()}))
    store = await open_store(usage_retention=RETENTION, clock=clock)
    for _ in range(3):
        await store.add_usage(batch(used(now)))
    assert await listed_hours(store) == {now}
    if isinstance(store, RedisStore):
        assert await hash_hours(store) == {now}


async def test_redis_deletes_usage_written_before_hours_had_an_expiry(redis_url: str) -> None:
    # An older gateway wrote hashes with no expiry and never trimmed the index. The sweep
    # deletes the expired ones, and the first sweep of a process gives the kept ones the expiry.
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    clock = Clock(time.time())
    store = RedisStore(client, usage_retention=RETENTION, clock=clock)
    now = hour_of(clock.now)
    expired, kept = now - 10 * DAY, now - DAY
    try:
        for hour in (expired, kept):  # as the old add_usage did
            await client.hincrby(store.ks.usage(hour), "key_1|m|requests", 1)
            await client.zadd(store.ks.usage_hours, {str(hour): hour})
        await store.add_usage(batch(used(now)))
        assert await hash_hours(store) == {kept, now}
        assert await listed_hours(store) == {kept, now}
        assert await client.pexpiretime(store.ks.usage(kept)) == (kept + HOUR + RETENTION) * 1000
        assert [row for row, _ in await store.usage(0, FOREVER)] == [(kept, "key_1", "m"), (now, "key_1", "m")]
    finally:
        await client.aclose()


async def test_redis_gives_kept_hours_the_expiry_of_a_longer_retention(redis_url: str) -> None:
    # Set when an hour is written, an expiry would otherwise keep the retention of that time:
    # lengthened for yearly reports, the old hours would still go after the shorter one.
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    now = hour_of(time.time())
    kept = now - DAY
    try:
        before = RedisStore(client, usage_retention=RETENTION)
        await before.add_usage(batch(used(kept)))
        assert await client.pexpiretime(before.ks.usage(kept)) == (kept + HOUR + RETENTION) * 1000
        after = RedisStore(client, usage_retention=400 * DAY)  # restarted with the longer one
        await after.add_usage(batch(used(now)))
        assert await client.pexpiretime(after.ks.usage(kept)) == (kept + HOUR + 400 * DAY) * 1000
    finally:
        await client.aclose()
