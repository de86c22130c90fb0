"""The gateway's key cache (gateway.auth.KeyCache) on every store: the change feed keeps it
current however long the gateway has been idle, and no key written meanwhile is lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from gateway import auth, keys
from gateway.auth import KeyCache
from gateway.config import AuthConfig, LimitValues
from gateway.errors import AuthenticationFailed
from gateway.store.base import ApiKey, Store
from tests.store.conftest import OpenStore


@pytest.fixture
async def cache(store: Store, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[KeyCache]:
    monkeypatch.setattr(auth, "FULL_RELOAD_INTERVAL", 0.05)  # many idle intervals within a test
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
    monkeypatch.setattr(auth, "FULL_RELOAD_INTERVAL", 30.0)  # so only the feed can bring the key
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
    monkeypatch.setattr(auth, "FULL_RELOAD_INTERVAL", 30.0)
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
