"""The shared store: keys and usage in Redis, for several gateway replicas.

Usage counts are HINCRBY on one hash per hour, so concurrent replicas add without losing
counts; a marker per batch id keeps a retried batch from counting twice. Each hour's hash
expires `store.usage_retention` after the hour ends, and an hourly sweep takes expired hours out
of the index (with their hashes, for those written before there was an expiry). A key changes
under WATCH (read, change, write, or again if another replica wrote meanwhile). Key changes are
published on a channel; every replica's auth cache reloads the key it names, so a revocation is
seen everywhere within milliseconds. A counter moved by every key write lets a replica find out
whether the channel lost one.

A Redis that keeps nothing on disk forgets every key when it restarts, and answers as if there
had never been any: the store reads its mark (gateway/store/redis_mark.py) with that counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import redis.asyncio as redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config import DEFAULT_USAGE_RETENTION
from gateway.keyspace import Keyspace
from gateway.store.base import (BATCH_ID_TTL, USAGE_FIELDS, ApiKey, KeyChange, PruneSchedule, Store, UsageBatch,
                                UsageDelta, UsageKey, decode_keys, last_expired_hour, usage_expires_at)
from gateway.store.redis_mark import StoreMark

log = logging.getLogger("gateway.store")

# What a Redis that cannot serve looks like to its callers: unreachable or silent, or answering
# but refusing every write: out of memory under `maxmemory-policy noeviction` (OOM), or a replica
# (READONLY: the server this connection reaches was demoted by a failover; redis-py's Sentinel
# client reads it as a lost connection too). Those two refuse before changing anything (a MULTI
# is aborted whole; a script fails at its first write, never midway), so a caller may treat
# them as it treats a refused connection. Any other error reply (a script's bug) is not one.
# The admission's circuit opens on these, and the admin API answers them with a 503.
OUTAGE = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError, OutOfMemoryError, ReadOnlyError)

# Expired hours one sweep deletes at most; more go on at the next flush. UNLINK frees a hash in
# Redis's background thread, so a sweep costs Redis little, but the first one after an upgrade
# may find years of hours, and one command for all of them would hold Redis that much longer.
SWEEP_BATCH = 100
STAMP_BATCH = 1000  # PEXPIREATs per pipeline when the kept hours get their expiry


class RedisStore(Store):
    def __init__(self, client: redis.Redis, keyspace: Keyspace | None = None, *,
                 usage_retention: float = DEFAULT_USAGE_RETENTION, clock: Callable[[], float] = time.time) -> None:
        self.redis = client
        self.ks = keyspace or Keyspace()
        self._usage_retention = usage_retention
        self._sweep = PruneSchedule(clock)
        self._kept_hours_stamped = False
        self.mark = StoreMark(client, self.ks)

    async def open(self) -> None:
        await self.mark.open()

    @property
    def data_losses(self) -> int:  # type: ignore[override]
        return self.mark.losses

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[None]:
        """Around every write. READONLY: a failover made the server these pooled connections
        reach a replica. They would keep reaching it (an error reply does not close a
        connection), so the idle ones are dropped: the next write connects again, to whatever
        the address reaches now (the new primary, once DNS or the Service follows it)."""
        try:
            yield
        except ReadOnlyError:
            await self.redis.connection_pool.disconnect(inuse_connections=False)
            raise

    async def create_key(self, key: ApiKey) -> None:
        async with self._writing(), self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.ks.key(key.id), key.encode())
            pipe.zadd(self.ks.keys, {key.id: key.created_at})
            pipe.incr(self.ks.keys_version)
            pipe.publish(self.ks.keys_changed, key.id)
            await pipe.execute()

    async def get_key(self, key_id: str) -> ApiKey | None:
        raw = await self.redis.get(self.ks.key(key_id))
        return ApiKey.decode(raw) if raw else None

    async def modify_key(self, key_id: str, change: KeyChange) -> ApiKey | None:
        record = self.ks.key(key_id)

        async def read_change_write(pipe: Pipeline) -> ApiKey | None:
            raw = await pipe.get(record)
            if not raw:
                return None
            current = ApiKey.decode(raw)
            key = change(current)
            pipe.multi()
            if key != current:
                pipe.set(record, key.encode())
                pipe.incr(self.ks.keys_version)
                pipe.publish(self.ks.keys_changed, key_id)
            return key

        # EXEC fails if the record changed after the WATCH; transaction() then runs it all again.
        async with self._writing():
            return await self.redis.transaction(read_change_write, record, value_from_callable=True)

    async def all_keys(self) -> list[ApiKey]:
        ids = await self.redis.zrange(self.ks.keys, 0, -1)
        if not ids:
            return []
        key_ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
        raws = await self.redis.mget([self.ks.key(i) for i in key_ids])
        # Decoded in a thread: 10,000 records take a tenth of a second the event loop must not wait.
        return await asyncio.to_thread(decode_keys, zip(key_ids, raws))

    async def key_changes(self) -> AsyncIterator[str | None]:  # type: ignore[override]
        """Pub/sub messages; after any disconnect, None first (messages may have been missed)."""
        lost = False  # said once per outage: a resubscribe a second would fill the log of one
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.ks.keys_changed)
                if lost:
                    log.warning("key change feed back")
                    lost = False
                yield None
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    _stop_if_cancelled()
                    if message and message["type"] == "message":
                        data = message["data"]
                        yield data.decode() if isinstance(data, bytes) else data
            except (RedisError, OSError) as exc:
                _stop_if_cancelled()
                log.log(logging.DEBUG if lost else logging.WARNING, "key change feed lost (%s); resubscribing", exc)
                lost = True
                await asyncio.sleep(1.0)
            finally:
                try:
                    await pubsub.aclose()
                except (RedisError, OSError):
                    pass

    async def keys_version(self) -> tuple[str | None, int]:
        """Pub/sub drops messages a subscriber misses, and a subscription can die silently: the
        counter every key write increments, in the write's own MULTI, shows what the feed lost.
        Absent (every key was written before there was a counter) it reads as 0, so the first
        write after an upgrade still shows as a change.

        With it, in the same round trip, the store id (StoreMark): read every
        KEYS_VERSION_INTERVAL and at every reload of the key cache (after a reconnect, first of
        all), so a Redis that lost the data is found within a second of its restart, and a flush
        within the interval. The id is part of the version: the keys of another store are a
        change, whatever the counter says."""
        raw_version, raw_id = await self.redis.mget(self.ks.keys_version, self.ks.store_id)
        return await self.mark.seen(raw_id), int(raw_version) if raw_version else 0

    async def add_usage(self, batch: UsageBatch) -> None:
        marker = self.ks.usage_batch(batch.id)
        hours = sorted({hour for hour, _, _ in batch.deltas})

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
            for hour in hours:
                # Every flush into an hour sets the same absolute time, so setting it each time
                # costs one O(1) command and needs no "is it set yet" round trip. A time already
                # past deletes the hash at once: usage is never kept past the retention.
                pipe.pexpireat(self.ks.usage(hour), self._usage_expiry_ms(hour))
                pipe.zadd(self.ks.usage_hours, {str(hour): hour})
            if batch.last_used:
                pipe.zadd(self.ks.last_used, batch.last_used, gt=True)

        async with self._writing():
            # First: it only deletes, which a Redis at maxmemory (noeviction) still allows, and
            # may make room for the increments it refuses.
            await self._sweep_expired_usage()
            # Every try WATCHes the marker before it looks. Of two tries whose EXECs both reach
            # Redis (one timed out while Redis stalled, yet ran when it woke), the later fails:
            # the earlier set the marker. transaction() then runs that one again, and it finds the marker.
            await self.redis.transaction(apply_once, marker)

    def _usage_expiry_ms(self, hour: int) -> int:
        return int(usage_expires_at(hour, self._usage_retention) * 1000)

    async def _sweep_expired_usage(self) -> None:
        """At most once an hour per replica (PruneSchedule): expired hours leave the index, and
        their hashes go too. Most are gone already, by their expiry; the sweep is for those
        with none (written by a gateway from before this change), and it keeps the index from
        growing for ever. The first sweep of a process also gives every hour still kept the
        expiry the current retention gives it."""
        now = self._sweep.due()
        if now is None:
            return
        try:
            if await self._delete_expired_hours(now) >= SWEEP_BATCH:
                self._sweep.go_on()
            if not self._kept_hours_stamped:
                await self._stamp_kept_hours(now)
                self._kept_hours_stamped = True
        except OUTAGE:
            self._sweep.go_on()  # the flush fails too; both are tried again together
            raise
        except RedisError as exc:  # (an ACL that forbids UNLINK, say): usage is still flushed
            log.warning("usage retention: the sweep of expired usage failed (%s); tried again in an hour", exc)

    async def _delete_expired_hours(self, now: float) -> int:
        cutoff = last_expired_hour(now, self._usage_retention)
        expired = await self.redis.zrangebyscore(self.ks.usage_hours, "-inf", cutoff, start=0, num=SWEEP_BATCH)
        if expired:
            # ZREM of exactly the hours whose hashes go, not ZREMRANGEBYSCORE: with a batch
            # limit, a range would also unlist hours whose hash stays (one with no expiry would
            # then be in Redis for ever, and in no report). Not a MULTI: out of memory, Redis
            # refuses every command queued in one, deletions too. In order on one connection
            # instead: cut off between the two, the index lists an hour whose hash is gone (the
            # next sweep unlists it), never the reverse.
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.unlink(*(self.ks.usage(int(hour)) for hour in expired))
                pipe.zrem(self.ks.usage_hours, *expired)
                await pipe.execute()
            log.debug("usage retention: deleted %d expired hours of usage", len(expired))
        return len(expired)

    async def _stamp_kept_hours(self, now: float) -> None:
        """The expiry of an hour is set when usage is added to it, so hours written before this
        change have none, and hours written under a shorter retention than the current one
        would expire early. Once per process (a retention change needs a restart), for the
        hours still kept; idempotent, so replicas starting together do no harm."""
        cutoff = last_expired_hour(now, self._usage_retention)
        kept = [int(hour) for hour in await self.redis.zrangebyscore(self.ks.usage_hours, f"({cutoff}", "+inf")]
        for start in range(0, len(kept), STAMP_BATCH):
            async with self.redis.pipeline(transaction=False) as pipe:
                for hour in kept[start:start + STAMP_BATCH]:
                    pipe.pexpireat(self.ks.usage(hour), self._usage_expiry_ms(hour))
                await pipe.execute()

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


def _stop_if_cancelled() -> None:
    """Ends the key feed if it was cancelled and redis-py swallowed the cancellation: a read under
    its own timeout turns a cancellation that lands as the timeout fires into "no message", and
    the feed would read on for ever (a test of a Redis restart hung in its shutdown until
    pytest-timeout, 300 s, its event loop waking every 5 s: the read's timeout)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
