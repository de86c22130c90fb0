"""A Redis that answers but refuses every write: out of memory under noeviction (OOM), or a
replica after a failover (READONLY). Both are outages to the gateway (the admission's circuit
opens, the admin API answers 503), not errors with a traceback. A Redis of this test's own:
reconfiguring the shared one would break the other tests."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway.store.base import UsageBatch, UsageDelta, hour_of, new_batch_id
from gateway.store.redis import OUTAGE, RedisStore
from tests.conftest import RedisServer
from tests.helpers import free_port
from tests.store.conftest import make_key


@pytest.fixture
async def store(own_redis: RedisServer) -> AsyncIterator[RedisStore]:
    client = aioredis.Redis.from_url(own_redis.url, socket_timeout=2.0, socket_connect_timeout=2.0)
    yield RedisStore(client, usage_retention=86400)
    await client.aclose()


def usage_batch(hour: int) -> UsageBatch:
    return UsageBatch(new_batch_id(), {(hour, "key_1", "m"): UsageDelta(1, 10, 5, 0)}, {})


async def test_out_of_memory_is_an_outage_and_the_sweep_still_frees_memory(store: RedisStore) -> None:
    client, now = store.redis, hour_of(time.time())
    expired = now - 10 * 86400
    # Expired usage with no expiry of its own (written by an older gateway), the kind that fills a Redis.
    await client.hset(store.ks.usage(expired), mapping={f"key_{i}|m|requests": i for i in range(1000)})
    await client.zadd(store.ks.usage_hours, {str(expired): expired})
    await client.config_set("maxmemory-policy", "noeviction")
    await client.config_set("maxmemory", "1")
    try:
        with pytest.raises(OUTAGE):
            await store.add_usage(usage_batch(now))
        with pytest.raises(OUTAGE):
            await store.create_key(make_key())
        assert not await client.exists(store.ks.usage(expired))  # deleted first: deleting is allowed
    finally:
        await client.config_set("maxmemory", "0")
    await store.add_usage(usage_batch(now))  # the usage recorder's retry, once there is room
    assert await store.usage(now, now + 3600) == [((now, "key_1", "m"), UsageDelta(1, 10, 5, 0))]


async def test_a_replica_after_a_failover_is_an_outage_and_the_next_write_connects_again(store: RedisStore) -> None:
    client, now = store.redis, hour_of(time.time())
    await store.create_key(make_key())
    connection = await client.client_id()
    await client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a primary that is not there
    try:
        with pytest.raises(OUTAGE):
            await store.add_usage(usage_batch(now))
        with pytest.raises(OUTAGE):
            await store.modify_key("key_1", lambda k: k.updated(name="bob"))
        # An error reply leaves a connection open, to the replica still: dropped, so the next
        # write reaches whatever the address leads to now (the new primary).
        assert await client.client_id() != connection
    finally:
        await client.execute_command("REPLICAOF", "NO", "ONE")
    await store.add_usage(usage_batch(now))
    assert await store.usage(now, now + 3600) == [((now, "key_1", "m"), UsageDelta(1, 10, 5, 0))]
