"""The gateway's key cache (gateway.auth.KeyCache) on every store: the change feed keeps it
current however long the gateway has been idle, and no key written meanwhile is lost; one key's
change costs that key's entry, not the whole index; and where the feed can lose a change (Redis
pub/sub), the keys version finds it, while a store whose feed loses none is never read whole
on a timer."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway import auth, keys, metrics
from gateway.auth import KeyCache
from gateway.config import AuthConfig, LimitValues
from gateway.errors import AuthenticationFailed
from gateway.keyspace import Keyspace
from gateway.store.base import ApiKey, Store
from gateway.store.redis import RedisStore
from gateway.store.sqlite import SQLiteStore
from tests.store.conftest import OpenStore, overwrite_record


@pytest.fixture
async def cache(store: Store, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[KeyCache]:
    monkeypatch.setattr(auth, "KEYS_VERSION_INTERVAL", 0.05)  # many idle intervals within a test (Redis)
    key_cache = KeyCache(store, AuthConfig(), LimitValues())
    await key_cache.start()
    yield key_cache
    await key_cache.stop()


async def eventually(check: object, timeout: float = 5.0) -> None:
    """Until `check()` passes (the change feed is asynchronous), or fail with its last error."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()  # type: ignore[operator]
            return
        except (AuthenticationFailed, AssertionError):
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.02)


def refuses(cache: KeyCache, secret: str) -> Callable[[], None]:
    """A check for `eventually`: the cache no longer opens with `secret`."""

    def refused() -> None:
        try:
            cache.authenticate(f"Bearer {secret}")
        except AuthenticationFailed:
            return
        raise AssertionError("the revoked key still opens")

    return refused


async def test_changes_still_arrive_after_the_gateway_sat_idle(store: Store, cache: KeyCache) -> None:
    # Idle for many reload intervals: the wait for the next change timed out each time.
    await asyncio.sleep(0.5)
    key, secret = await keys.issue(store, {"name": "late"})  # through the store only: the feed must tell
    await eventually(lambda: cache.authenticate(f"Bearer {secret}"))
    await asyncio.sleep(0.3)
    await keys.revoke(store, key.id)
    await eventually(refuses(cache, secret))


async def test_a_key_applied_while_the_store_is_read_survives_the_reload(store: Store) -> None:
    cache = KeyCache(store, AuthConfig(), LimitValues())  # not started: the test drives it
    reading, release = asyncio.Event(), asyncio.Event()
    read_all = store.all_keys

    async def slow_all_keys() -> list[ApiKey]:
        snapshot = await read_all()  # read before the key below exists
        reading.set()
        await release.wait()
        return snapshot

    store.all_keys = slow_all_keys  # type: ignore[method-assign]
    reload = asyncio.create_task(cache.reload())
    await reading.wait()
    key, secret = await keys.issue(store, {"name": "new"})
    cache.apply(key)  # what the admin API does before it answers
    release.set()
    await reload
    assert cache.authenticate(f"Bearer {secret}").key_id == key.id


async def test_the_feed_restarts_when_it_ends(open_store: OpenStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await open_store()
    feeds = 0
    real_feed = store.key_changes

    async def short_feed() -> AsyncIterator[str | None]:
        nonlocal feeds
        feeds += 1
        if feeds == 1:
            yield None
            return  # e.g. a store's generator that gave up
        async for item in real_feed():
            yield item

    store.key_changes = short_feed  # type: ignore[method-assign]
    monkeypatch.setattr(auth, "KEYS_VERSION_INTERVAL", 30.0)  # so only the feed can bring the key
    cache = KeyCache(store, AuthConfig(), LimitValues())
    await cache.start()
    try:
        await asyncio.sleep(1.5)  # the restart waits a second
        key, secret = await keys.issue(store, {"name": "after"})
        await eventually(lambda: cache.authenticate(f"Bearer {secret}"))
        assert feeds == 2
    finally:
        await cache.stop()


async def test_a_failed_reload_is_tried_again_soon_not_a_full_interval_later(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # As after a Redis restart: the feed says None (changes may have been missed) and the reload
    # that follows meets a dead connection. A key revoked meanwhile must not open for a minute.
    monkeypatch.setattr(auth, "KEYS_VERSION_INTERVAL", 30.0)
    key, secret = await keys.issue(store, {"name": "to-revoke"})
    read_all, failures = store.all_keys, []
    restarted = asyncio.Event()

    async def failing_once() -> list[ApiKey]:
        if failures:
            raise failures.pop()
        return await read_all()

    async def feed() -> AsyncIterator[str | None]:
        await restarted.wait()
        yield None  # "messages may have been missed"
        await asyncio.Event().wait()  # then quiet

    store.all_keys = failing_once  # type: ignore[method-assign]
    store.key_changes = feed  # type: ignore[method-assign]
    cache = KeyCache(store, AuthConfig(), LimitValues())
    await cache.start()
    try:
        assert cache.authenticate(f"Bearer {secret}").key_id == key.id
        await keys.revoke(store, key.id)  # missed by the feed
        failures.append(ConnectionError("Connection closed by server."))
        restarted.set()
        await eventually(refuses(cache, secret), timeout=3.0)
        assert not failures
    finally:
        await cache.stop()


def count_full_reads(store: Store) -> list[float]:
    """The times the store is read whole from now on (a full reload of the cache)."""
    reads: list[float] = []
    read_all = store.all_keys

    async def counted() -> list[ApiKey]:
        reads.append(time.monotonic())
        return await read_all()

    store.all_keys = counted  # type: ignore[method-assign]
    return reads


async def test_one_key_change_recomputes_that_key_only(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    others = [(await keys.issue(store, {"name": f"other{i}"}))[1] for i in range(50)]
    cache = KeyCache(store, AuthConfig(), LimitValues())  # not started: the test applies what the admin API would
    await cache.reload()
    computed: list[str] = []

    class Counted(auth.Principal):
        def __init__(self, key_id: str, *args: Any, **kwargs: Any) -> None:
            computed.append(key_id)
            super().__init__(key_id, *args, **kwargs)

    monkeypatch.setattr(auth, "Principal", Counted)
    key, secret = await keys.issue(store, {"name": "new"})
    cache.apply(key)
    cache.apply(await keys.update(store, key.id, {"rpm": 5}))
    await cache.refresh(key.id)
    assert computed == [key.id] * 3  # not the 50 others each time
    assert cache.authenticate(f"Bearer {secret}").rpm == 5
    assert all(cache.authenticate(f"Bearer {other}") for other in others)
    cache.set_defaults(LimitValues(rpm=7))  # a config reload: every key that sets no rpm of its own
    assert cache.authenticate(f"Bearer {others[0]}").rpm == 7
    assert cache.authenticate(f"Bearer {secret}").rpm == 5


async def test_a_rotated_out_secret_opens_during_its_grace_only(store: Store) -> None:
    key, first = await keys.issue(store, {"name": "rotating"})
    cache = KeyCache(store, AuthConfig(), LimitValues())
    await cache.reload()
    rotated, second = await keys.rotate(store, key.id, 60)
    cache.apply(rotated)
    assert cache.authenticate(f"Bearer {first}").key_id == cache.authenticate(f"Bearer {second}").key_id == key.id
    rotated, third = await keys.rotate(store, key.id, 0.3)
    cache.apply(rotated)
    refuses(cache, first)()  # two rotations ago: not even the previous secret any more
    cache.authenticate(f"Bearer {second}")
    await asyncio.sleep(0.4)
    refuses(cache, second)()  # its grace period is over
    cache.authenticate(f"Bearer {third}")
    rotated, fourth = await keys.rotate(store, key.id, 0)
    cache.apply(rotated)
    refuses(cache, third)()  # no grace at all
    assert cache.authenticate(f"Bearer {fourth}").key_id == key.id


async def test_a_revoked_or_vanished_key_no_longer_opens(store: Store) -> None:
    revoked, revoked_secret = await keys.issue(store, {"name": "revoked"})
    vanished, vanished_secret = await keys.issue(store, {"name": "vanished"})
    cache = KeyCache(store, AuthConfig(), LimitValues())
    await cache.reload()
    cache.apply(await keys.revoke(store, revoked.id))
    refuses(cache, revoked_secret)()
    cache.authenticate(f"Bearer {vanished_secret}")

    async def nothing(key_id: str) -> None:
        return None

    store.get_key = nothing  # type: ignore[method-assign,assignment]  # as after a Redis flush
    await cache.refresh(vanished.id)  # the feed named it; the store has no such key now
    refuses(cache, vanished_secret)()


async def test_a_key_applied_while_the_index_is_built_survives_the_reload(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    revoked, revoked_secret = await keys.issue(store, {"name": "to-revoke"})
    cache = KeyCache(store, AuthConfig(), LimitValues())
    building, release = threading.Event(), threading.Event()
    build = auth.KeyIndex.build

    def slow_build(keys: list[ApiKey], defaults: LimitValues) -> auth.KeyIndex:
        index = build(keys, defaults)  # from what the store held before the changes below
        building.set()
        release.wait(5.0)
        return index

    monkeypatch.setattr(auth.KeyIndex, "build", staticmethod(slow_build))
    reload = asyncio.create_task(cache.reload())
    assert await asyncio.to_thread(building.wait, 5.0)
    key, secret = await keys.issue(store, {"name": "new"})
    cache.apply(key)
    cache.apply(await keys.revoke(store, revoked.id))
    release.set()
    await reload
    assert cache.authenticate(f"Bearer {secret}").key_id == key.id
    refuses(cache, revoked_secret)()


class Unheard(Keyspace):
    """The gateway's keyspace, but what a store using it publishes goes where no replica
    listens: its writes stand for changes whose pub/sub message was lost."""

    @property
    def keys_changed(self) -> str:
        return f"{self.prefix}keys:changed:unheard"


@pytest.fixture
async def redis_stores(redis_url: str) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """A replica's store, and another replica's whose change messages are lost."""
    client = aioredis.Redis.from_url(redis_url)
    yield RedisStore(client), RedisStore(client, Unheard())
    await client.aclose()


async def test_a_change_whose_message_was_lost_is_found_by_the_keys_version(
        redis_stores: tuple[RedisStore, RedisStore], monkeypatch: pytest.MonkeyPatch) -> None:
    store, unheard = redis_stores
    monkeypatch.setattr(auth, "KEYS_VERSION_INTERVAL", 0.1)
    key, secret = await keys.issue(store, {"name": "lost"})
    reads = count_full_reads(store)
    cache = KeyCache(store, AuthConfig(), LimitValues())
    await cache.start()
    try:
        await eventually(lambda: assert_count(reads, 2))  # at start, and for the feed's first None
        await asyncio.sleep(0.5)  # five checks with nothing written: nothing read
        assert_count(reads, 2)
        await keys.revoke(unheard, key.id)
        await eventually(refuses(cache, secret), timeout=3.0)
        await asyncio.sleep(0.3)
        assert_count(reads, 3)
    finally:
        await cache.stop()


async def test_a_lost_change_is_found_on_data_from_before_the_keys_version(
        redis_stores: tuple[RedisStore, RedisStore], monkeypatch: pytest.MonkeyPatch) -> None:
    # After an upgrade: the keys are there, the counter is not (a gateway from before wrote them).
    store, unheard = redis_stores
    monkeypatch.setattr(auth, "KEYS_VERSION_INTERVAL", 0.1)
    key, secret = await keys.issue(store, {"name": "old"})
    await store.redis.delete(store.ks.keys_version)
    assert (await store.keys_version())[1] == 0  # (store id, counter)
    cache = KeyCache(store, AuthConfig(), LimitValues())
    await cache.start()
    try:
        await keys.revoke(unheard, key.id)
        await eventually(refuses(cache, secret), timeout=3.0)
    finally:
        await cache.stop()


async def test_the_sqlite_store_is_never_read_whole_on_a_timer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its change feed is in-process and misses nothing: a timer would only repeat what it told.
    monkeypatch.setattr(auth, "KEYS_VERSION_INTERVAL", 0.02)
    store = SQLiteStore(tmp_path / "gateway.db")
    await store.open()
    reads = count_full_reads(store)
    cache = KeyCache(store, AuthConfig(), LimitValues())
    await cache.start()
    try:
        await eventually(lambda: assert_count(reads, 2))  # at start, and for the feed's first None
        await asyncio.sleep(0.3)
        key, secret = await keys.issue(store, {"name": "new"})
        await eventually(lambda: cache.authenticate(f"Bearer {secret}"))
        await asyncio.sleep(0.3)
        assert_count(reads, 2)
    finally:
        await cache.stop()
        await store.close()


def assert_count(reads: list[float], expected: int) -> None:
    assert len(reads) == expected, f"the store was read whole {len(reads)} times, not {expected}"


async def test_a_key_whose_record_cannot_be_read_opens_nothing_and_the_others_still_load(
        store: Store) -> None:
    # One bad record (a hand in redis-cli, a bug) used to fail every reload, and every start.
    bad, bad_secret = await keys.issue(store, {"name": "bad"})
    good, good_secret = await keys.issue(store, {"name": "good"})
    cache = KeyCache(store, AuthConfig(), LimitValues())
    await cache.reload()
    await overwrite_record(store, bad.id, json.dumps({**bad.to_record(), "rpm": "ten"}))
    await cache.refresh(bad.id)  # the feed named it
    refuses(cache, bad_secret)()
    assert cache.authenticate(f"Bearer {good_secret}").key_id == good.id
    await cache.reload()
    refuses(cache, bad_secret)()
    assert cache.authenticate(f"Bearer {good_secret}").key_id == good.id


# --- per-key metrics (metrics.key_labels) -------------------------------------------------------

def key_series(key_id: str) -> list[str]:
    """The key's series in gateway_key_requests_total and gateway_key_tokens_total."""
    return [sample.name for family in (metrics.key_requests, metrics.key_tokens) for metric in family.collect()
            for sample in metric.samples if sample.labels["key_id"] == key_id and sample.name.endswith("_total")]


def served(key: ApiKey) -> None:
    """One request of the key, counted as v1.Call counts it with metrics.key_labels."""
    metrics.key_requests.labels(key.id, "m", "2xx").inc()
    metrics.key_tokens.labels(key.id, "prompt").inc(3)
    metrics.key_tokens.labels(key.id, "completion").inc(5)


async def test_a_keys_series_go_when_it_is_revoked_here_or_on_another_replica(store: Store, cache: KeyCache) -> None:
    # A revoked key makes no request again: its series would stay on every scrape for good.
    here, _ = await keys.issue(store, {"name": "revoked here"})
    there, _ = await keys.issue(store, {"name": "revoked on another replica"})
    kept, _ = await keys.issue(store, {"name": "kept"})
    for key in (here, there, kept):
        cache.apply(key)
        served(key)
    assert len(key_series(here.id)) == 3
    cache.apply(await keys.revoke(store, here.id))  # as this replica's admin API does
    assert key_series(here.id) == []
    await keys.revoke(store, there.id)  # through the store only: the change feed tells
    def forgotten() -> None:
        assert key_series(there.id) == []

    await eventually(forgotten)
    assert len(key_series(kept.id)) == 3


async def test_ended_names_revoked_and_gone_keys_not_live_ones_nor_the_anonymous_caller(store: Store) -> None:
    # What a finishing request asks (v1.Call) before it leaves the key's series behind.
    cache = KeyCache(store, AuthConfig(required=False), LimitValues())
    live, _ = await keys.issue(store, {"name": "live"})
    revoked, _ = await keys.issue(store, {"name": "revoked"})
    await cache.reload()
    cache.apply(await keys.revoke(store, revoked.id))
    assert not cache.ended(live.id) and cache.ended(revoked.id) and cache.ended("key_never_issued")
    assert cache.authenticate(None).key_id == "anonymous" and not cache.ended("anonymous")


async def test_a_keys_series_go_when_a_reload_finds_it_revoked_or_gone(store: Store) -> None:
    # What the change feed missed (Redis pub/sub can), the reload finds: revoked, or no longer
    # in the store at all (a Redis that lost its data).
    cache = KeyCache(store, AuthConfig(), LimitValues())  # not started: the test drives it
    revoked, _ = await keys.issue(store, {"name": "revoked"})
    gone, _ = await keys.issue(store, {"name": "gone"})
    kept, _ = await keys.issue(store, {"name": "kept"})
    await cache.reload()
    for key in (revoked, gone, kept):
        served(key)
    await keys.revoke(store, revoked.id)
    read_all = store.all_keys

    async def all_but_gone() -> list[ApiKey]:
        return [key for key in await read_all() if key.id != gone.id]

    store.all_keys = all_but_gone  # type: ignore[method-assign]
    await cache.reload()
    assert key_series(revoked.id) == [] and key_series(gone.id) == []
    assert len(key_series(kept.id)) == 3


async def test_stopping_is_bounded_when_the_feed_swallows_its_cancellation(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # redis-py can turn a cancellation landing as its read's own timeout fires into "no message"
    # and read on; the cache's stop (the gateway's shutdown) must not wait for ever on it.
    swallowed, ended = asyncio.Event(), asyncio.Event()

    async def deaf_feed() -> AsyncIterator[str | None]:
        yield None
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()  # and reads on, for a while (for ever would outlive the test)
        await asyncio.sleep(1.0)
        ended.set()
        yield "never taken"

    monkeypatch.setattr(store, "key_changes", deaf_feed)
    monkeypatch.setattr(auth, "STOP_WAIT", 0.2)
    cache = KeyCache(store, AuthConfig(), LimitValues())
    await cache.start()
    await asyncio.sleep(0.05)  # the feed's first step (None: a reload), then its read
    await asyncio.wait_for(cache.stop(), 30)  # (the hang guard; stop's own bound is auth.STOP_WAIT)
    assert swallowed.is_set() and not ended.is_set()  # stop returned while the feed still read
    await asyncio.wait_for(ended.wait(), 10)


async def test_the_redis_feed_ends_when_cancelled_even_if_its_read_swallowed_it(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RedisStore(aioredis.Redis.from_url(redis_url))
    real_pubsub = store.redis.pubsub

    def deaf_pubsub(**options: Any) -> Any:
        pubsub = real_pubsub(**options)
        real_get = pubsub.get_message

        async def get_message(**read: Any) -> Any:
            try:
                return await real_get(**read)
            except asyncio.CancelledError:
                return None  # as redis-py's read does when the cancellation meets its own timeout

        pubsub.get_message = get_message  # type: ignore[method-assign]
        return pubsub

    monkeypatch.setattr(store.redis, "pubsub", deaf_pubsub)
    await store.open()
    try:
        feed = store.key_changes()
        assert await anext(feed) is None  # subscribed
        step = asyncio.ensure_future(anext(feed))
        await asyncio.sleep(0.05)  # in its read
        step.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(step, 10)  # (not another 5 s read, and another)
    finally:
        await store.close()
        await store.redis.aclose()
