"""The shared store: keys and usage in Redis, for several gateway replicas.

Usage counts are HINCRBY on one hash per hour, so concurrent replicas add without losing
counts; a marker per batch id keeps a retried batch from counting twice. A key changes under
WATCH (read, change, write, or again if another replica wrote meanwhile). Key changes are
published on a channel; every replica's auth cache reloads the key it names, so a revocation is
seen everywhere within milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import redis.asyncio as redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.keyspace import Keyspace
from gateway.store.base import (BATCH_ID_TTL, USAGE_FIELDS, ApiKey, KeyChange, Store, UsageBatch, UsageDelta,
                                UsageKey)

log = logging.getLogger("gateway.store")

# What an unreachable or silent Redis looks like to its callers (an error reply is not one): the
# admission's circuit opens on these, and the admin API answers them with a 503.
OUTAGE = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)


class RedisStore(Store):
    def __init__(self, client: redis.Redis, keyspace: Keyspace | None = None) -> None:
        self.redis = client
        self.ks = keyspace or Keyspace()

    async def create_key(self, key: ApiKey) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.ks.key(key.id), json.dumps(key.to_record()))
            pipe.zadd(self.ks.keys, {key.id: key.created_at})
            pipe.publish(self.ks.keys_changed, key.id)
            await pipe.execute()

    async def get_key(self, key_id: str) -> ApiKey | None:
        raw = await self.redis.get(self.ks.key(key_id))
        return ApiKey.from_record(json.loads(raw)) if raw else None

    async def modify_key(self, key_id: str, change: KeyChange) -> ApiKey | None:
        record = self.ks.key(key_id)

        async def read_change_write(pipe: Pipeline) -> ApiKey | None:
            raw = await pipe.get(record)
            if not raw:
                return None
            current = ApiKey.from_record(json.loads(raw))
            key = change(current)
            pipe.multi()
            if key != current:
                pipe.set(record, json.dumps(key.to_record()))
                pipe.publish(self.ks.keys_changed, key_id)
            return key

        # EXEC fails if the record changed after the WATCH; transaction() then runs it all again.
        return await self.redis.transaction(read_change_write, record, value_from_callable=True)

    async def all_keys(self) -> list[ApiKey]:
        ids = await self.redis.zrange(self.ks.keys, 0, -1)
        if not ids:
            return []
        raws = await self.redis.mget([self.ks.key(i.decode() if isinstance(i, bytes) else i) for i in ids])
        return [ApiKey.from_record(json.loads(raw)) for raw in raws if raw]

    async def key_changes(self) -> AsyncIterator[str | None]:  # type: ignore[override]
        """Pub/sub messages; after any disconnect, None first (messages may have been missed)."""
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.ks.keys_changed)
                yield None
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message and message["type"] == "message":
                        data = message["data"]
                        yield data.decode() if isinstance(data, bytes) else data
            except (RedisError, OSError) as exc:
                log.warning("key change feed lost (%s); resubscribing", exc)
                await asyncio.sleep(1.0)
            finally:
                try:
                    await pubsub.aclose()
                except (RedisError, OSError):
                    pass

    async def add_usage(self, batch: UsageBatch) -> None:
        marker = self.ks.usage_batch(batch.id)

        async def apply_once(pipe: Pipeline) -> None:
            if await pipe.exists(marker):
                return  # an earlier try was applied; only its answer was lost
            pipe.multi()
            pipe.set(marker, 1, ex=BATCH_ID_TTL)
            for (hour, key_id, model), delta in batch.deltas.items():
                bucket = self.ks.usage(hour)
                for name in USAGE_FIELDS:
                    value = getattr(delta, name)
                    if value:
                        pipe.hincrby(bucket, f"{key_id}|{model}|{name}", value)
                pipe.zadd(self.ks.usage_hours, {str(hour): hour})
            if batch.last_used:
                pipe.zadd(self.ks.last_used, batch.last_used, gt=True)

        # Every try WATCHes the marker before it looks. Of two tries whose EXECs both reach Redis
        # (one timed out while Redis stalled, yet ran when it woke), the later fails: the earlier
        # set the marker. transaction() then runs that one again, and it finds the marker.
        await self.redis.transaction(apply_once, marker)

    async def usage(self, start: float, end: float) -> list[tuple[UsageKey, UsageDelta]]:
        hours = [int(h) for h in await self.redis.zrangebyscore(self.ks.usage_hours, start, f"({end}")]
        if not hours:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for hour in hours:
                pipe.hgetall(self.ks.usage(hour))
            buckets = await pipe.execute()
        rows: dict[UsageKey, dict[str, int]] = {}
        for hour, bucket in zip(hours, buckets):
            for raw_field, raw_value in bucket.items():
                field = raw_field.decode() if isinstance(raw_field, bytes) else raw_field
                key_id, model, name = field.rsplit("|", 2)
                rows.setdefault((hour, key_id, model), {})[name] = int(raw_value)
        return [(k, UsageDelta(**v)) for k, v in sorted(rows.items())]

    async def last_used(self) -> dict[str, float]:
        pairs = await self.redis.zrange(self.ks.last_used, 0, -1, withscores=True)
        return {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in pairs}
