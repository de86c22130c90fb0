"""A Redis that lost the gateway's data (restarted keeping nothing on disk, flushed, failed over to
an empty replica) answers as if there had never been any keys. The store marks its data with an
id and reads it back with the keys version: every replica says so at ERROR, once, and counts it.
At open the store also claims a layout version, refuses a newer one, and warns of a Redis that
keeps nothing on disk or evicts. A Redis of the test's own where a test restarts or reconfigures it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway import auth, keys, metrics
from gateway.auth import KeyCache
from gateway.config import AuthConfig, LimitValues
from gateway.store.redis import RedisStore
from gateway.store.redis_mark import SCHEMA
from tests.conftest import RedisServer
from tests.store.test_key_cache import eventually, refuses

LOST = "Redis lost the gateway's data"


@pytest.fixture
async def client(own_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(own_redis.url, socket_timeout=2.0, socket_connect_timeout=2.0)
    yield client
    await client.aclose()


def logged(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.getMessage()]


async def test_a_redis_restarted_without_persistence_is_reported_once_and_the_cache_follows_it(
        own_redis: RedisServer, client: aioredis.Redis, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "KEYS_VERSION_INTERVAL", 30.0)  # found by the feed's reconnect, not the timer
    store = RedisStore(client)
    await store.open()
    _, secret = await keys.issue(store, {"name": "alice"})
    cache = KeyCache(store, AuthConfig(), LimitValues())
    counted_before = metrics.REGISTRY.get_sample_value("gateway_store_data_losses_total")
    await cache.start()
    try:
        cache.authenticate(f"Bearer {secret}")
        with caplog.at_level(logging.WARNING, logger="gateway"):
            own_redis.kill()
            own_redis.start()  # empty: it kept nothing on disk
            await eventually(lambda: assert_losses(store, 1), timeout=5.0)
            # The cache follows the store, as every replica does (one started now finds no keys either).
            refuses(cache, secret)()
            assert await client.get(store.ks.schema) == str(SCHEMA).encode()
            marker = await client.get(store.ks.store_id)
            assert marker is not None  # a new store begins: the next loss is found too
            await cache.reload()
            await store.keys_version()
            assert_losses(store, 1)  # one event, said once
            assert len(logged(caplog, logging.ERROR, LOST)) == 1
            # ... and exported, for GatewayStoreLostData (deploy/prometheus/alerts.yml)
            assert metrics.REGISTRY.get_sample_value("gateway_store_data_losses_total") == counted_before + 1
            assert "re-issue the keys" in logged(caplog, logging.ERROR, LOST)[0]
            _, new_secret = await keys.issue(store, {"name": "bob"})
            await eventually(lambda: cache.authenticate(f"Bearer {new_secret}"))
    finally:
        await cache.stop()


def assert_losses(store: RedisStore, expected: int) -> None:
    assert store.data_losses == expected


async def test_a_flush_is_found_by_every_replica_at_its_next_check(
        redis_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "KEYS_VERSION_INTERVAL", 0.05)
    client = aioredis.Redis.from_url(redis_url)
    replicas = [RedisStore(client), RedisStore(client)]
    for replica in replicas:
        await replica.open()
    _, secret = await keys.issue(replicas[0], {"name": "alice"})
    caches = [KeyCache(replica, AuthConfig(), LimitValues()) for replica in replicas]
    for cache in caches:
        await cache.start()
    try:
        with caplog.at_level(logging.WARNING, logger="gateway"):
            await client.flushdb()  # no reconnect: only the periodic check can tell
            for cache, replica in zip(caches, replicas):
                await eventually(refuses(cache, secret), timeout=3.0)
                assert_losses(replica, 1)
            await asyncio.sleep(0.3)  # several more checks: nothing more to say
            assert [replica.data_losses for replica in replicas] == [1, 1]
            assert len(logged(caplog, logging.ERROR, LOST)) == 2  # each replica, once
            # Both claimed the new store and agree on it; the first to find the loss wrote it.
            ids = {(await replica.keys_version())[0] for replica in replicas}
            assert ids == {(await client.get(replicas[0].ks.store_id)).decode()}
    finally:
        for cache in caches:
            await cache.stop()
        await client.aclose()


async def test_an_older_store_restored_from_a_backup_is_not_a_loss(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        store = RedisStore(client)
        await store.open()
        key, _ = await keys.issue(store, {"name": "alice"})
        backup = {name: await client.dump(name) for name in await client.keys("*")}
        with caplog.at_level(logging.WARNING, logger="gateway"):
            await client.flushdb()
            after_loss = await store.keys_version()
            assert_losses(store, 1)
            for name, value in backup.items():  # the operator restores the backup
                await client.restore(name, 0, value, replace=True)
            assert await store.keys_version() != after_loss  # the cache reloads: the keys are back
            assert_losses(store, 1)
            assert len(logged(caplog, logging.ERROR, LOST)) == 1
            assert logged(caplog, logging.WARNING, "restored from a backup")
        assert await store.get_key(key.id) == key
    finally:
        await client.aclose()


async def test_a_first_start_says_a_new_store_begins_and_an_upgrade_does_not(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        with caplog.at_level(logging.WARNING, logger="gateway"):
            first = RedisStore(client)
            await first.open()
            assert len(logged(caplog, logging.WARNING, "a new, empty store begins")) == 1
            second = RedisStore(client)  # another replica: the store is there
            await second.open()
            assert len(logged(caplog, logging.WARNING, "a new, empty store begins")) == 1
            assert (await first.keys_version())[0] == (await second.keys_version())[0] is not None
            # Keys written by a gateway from before the store id: an upgrade, not an empty store.
            await keys.issue(first, {"name": "old"})
            await client.delete(first.ks.store_id, first.ks.schema)
            upgraded = RedisStore(client)
            await upgraded.open()
            assert len(logged(caplog, logging.WARNING, "a new, empty store begins")) == 1
            assert await client.get(first.ks.schema) == str(SCHEMA).encode()
            assert not logged(caplog, logging.ERROR, LOST)
    finally:
        await client.aclose()


@pytest.mark.parametrize("schema", [str(SCHEMA + 1), "v9"])
async def test_a_layout_newer_than_this_gateway_knows_is_refused_at_start(redis_url: str, schema: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        store = RedisStore(client)
        await client.set(store.ks.schema, schema)
        with pytest.raises(RuntimeError, match=rf"written by a newer gateway \(schema {schema}, this one knows {SCHEMA}\)"):
            await store.open()
        assert await client.get(store.ks.schema) == schema.encode()  # left as it was
    finally:
        await client.aclose()


async def test_warnings_at_start_for_a_redis_that_keeps_nothing_on_disk_or_evicts(
        client: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    async def warnings_at_open() -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="gateway"):
            await RedisStore(client).open()
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and "a new, empty store" not in r.getMessage()]

    # The tests' Redis: --save '' --appendonly no.
    (memory_only,) = await warnings_at_open()
    assert "in memory only" in memory_only and "appendonly yes" in memory_only
    await client.config_set("save", "3600 1")
    assert await warnings_at_open() == []
    await client.config_set("maxmemory-policy", "allkeys-lru")
    (evicts,) = await warnings_at_open()
    assert "allkeys-lru" in evicts and "API keys included" in evicts and "noeviction" in evicts
    await client.config_set("maxmemory-policy", "volatile-ttl")
    (evicts,) = await warnings_at_open()
    assert "volatile-ttl" in evicts and "usage hours" in evicts


async def test_a_redis_that_refuses_config_still_opens(own_redis: RedisServer, client: aioredis.Redis,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    # As a managed Redis does: CONFIG is not for its users.
    await client.acl_setuser("gateway", enabled=True, passwords=["+secret"], keys=["*"], channels=["*"],
                             commands=["+@all", "-config"])
    limited = aioredis.Redis.from_url(own_redis.url.replace("redis://", "redis://gateway:secret@"))
    try:
        with caplog.at_level(logging.INFO, logger="gateway"):
            await RedisStore(limited).open()
        assert logged(caplog, logging.INFO, "refuses CONFIG GET save")
    finally:
        await limited.aclose()


async def test_a_redis_refusing_writes_at_start_still_opens_and_gets_its_store_id_later(
        client: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    await client.config_set("maxmemory-policy", "noeviction")
    await client.config_set("maxmemory", "1")  # full: every write is refused, reads answer
    store = RedisStore(client)
    try:
        with caplog.at_level(logging.WARNING, logger="gateway"):
            await store.open()
            assert logged(caplog, logging.WARNING, "refused to write the store's schema and id")
            assert await client.get(store.ks.store_id) is None
    finally:
        await client.config_set("maxmemory", "0")
    with caplog.at_level(logging.WARNING, logger="gateway"):
        store_id, _ = await store.keys_version()  # the next check writes it, and that is no loss
    assert store_id is not None and await client.get(store.ks.store_id) == store_id.encode()
    assert store.data_losses == 0 and not logged(caplog, logging.ERROR, LOST)


async def test_an_outage_of_the_key_feed_is_said_once_and_its_end_once(
        own_redis: RedisServer, client: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    # The feed resubscribes every second: a line each time filled the log of one Redis outage.
    store = RedisStore(client)
    await store.open()
    feed = store.key_changes()
    assert await asyncio.wait_for(anext(feed), 5) is None  # subscribed
    with caplog.at_level(logging.WARNING, logger="gateway"):
        reader = asyncio.ensure_future(anext(feed))
        own_redis.kill()
        await asyncio.sleep(3.5)  # three or four resubscribes fail
        assert len(logged(caplog, logging.WARNING, "key change feed lost")) == 1
        own_redis.start()
        assert await asyncio.wait_for(reader, 10) is None  # subscribed again: messages may have been missed
        assert len(logged(caplog, logging.WARNING, "key change feed back")) == 1
    await feed.aclose()
