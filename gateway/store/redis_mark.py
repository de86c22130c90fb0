"""The mark on the gateway's data in Redis, and what it tells: a Redis that lost the data.

A Redis that keeps nothing on disk forgets every key when it restarts, and answers as if there had
never been any; so does one flushed, or a replica promoted empty. Nothing fails: every client just
gets 401. So the first gateway to open the store writes a store id (SET NX), every replica
remembers it, and reads it back where the store already reads on a timer (keys_version): gone or
replaced, Redis lost the data, and each replica says so at ERROR, once, and counts it.

Next to it, the layout version ({p}schema): a gateway refuses to start on a newer layout than it
knows. And at open, a warning for each way this Redis would lose the data unannounced.
"""

from __future__ import annotations

import logging
import math
import secrets
from typing import Any

import redis.asyncio as redis
from redis.exceptions import ResponseError

from gateway import metrics
from gateway.keyspace import Keyspace

log = logging.getLogger("gateway.store")

# The version of the layout in gateway/keyspace.py this gateway reads and writes. A gateway that
# changes the layout so that older ones would misread it raises this, and older ones then refuse
# to start on it. Adding a field to a key record needs no new version: older gateways keep the
# fields they do not know (ApiKey.extra).
SCHEMA = 1

NOT_OPENED = object()  # the store id of a mark whose open() has not run: it checks nothing


class StoreMark:
    def __init__(self, client: redis.Redis, keyspace: Keyspace) -> None:
        self.redis = client
        self.ks = keyspace
        self.losses = 0  # times this process found Redis had lost the data
        self._store_id: Any = NOT_OPENED  # as this process last saw it; None: it could not write one
        self._eviction_policy: str | None = None  # Redis's maxmemory-policy, if it said

    async def open(self) -> None:
        """Claims the store (a schema and a store id, where there are none yet), refuses a
        layout newer than this gateway knows, and warns of a Redis that would lose the data.
        A few round trips, at start only."""
        had_data, schema, store_id, proposed = await self._claim()
        if schema is not None and _schema_version(schema) > SCHEMA:
            raise RuntimeError(
                f"Redis (prefix {self.ks.prefix!r}) holds data written by a newer gateway (schema "
                f"{schema.decode(errors='replace')}, this one knows {SCHEMA}): run that version or later, "
                f"or give this gateway its own Redis or prefix")
        self._store_id = store_id
        if store_id is not None and store_id == proposed and not had_data:
            # A first start looks like this, and so does a replica started after Redis lost the
            # data (the replicas that knew it say so at ERROR): this one cannot tell them apart.
            log.warning("Redis holds no gateway data: a new, empty store begins (id %s). On a first start that "
                        "is expected; otherwise Redis lost the gateway's keys and usage, or this is not the Redis "
                        "(or prefix) it used before", store_id)
        await self._check_durability()

    async def seen(self, raw_id: bytes | str | None) -> str | None:
        """The store id as just read; returns it as it now is (written again if it was gone)."""
        store_id = _text(raw_id)
        if self._store_id is NOT_OPENED or (store_id is not None and store_id == self._store_id):
            return store_id
        known, self._store_id = self._store_id, store_id
        if known is not None and store_id is not None and _created(store_id) < _created(known):
            log.warning("Redis holds an older gateway store than before (id %s, where this gateway last saw %s): "
                        "restored from a backup? Its keys are served from now on; whatever was written after that "
                        "backup is not there", store_id, known)
        elif known is not None:
            self.losses += 1
            metrics.store_data_losses.inc()
            causes = "restarted without persistence, flushed, or failed over to an empty replica"
            if self._eviction_policy and self._eviction_policy.startswith("allkeys-"):
                causes += f", or evicted it (maxmemory-policy {self._eviction_policy})"
            log.error("Redis lost the gateway's data (its store id %s is %s: %s): keys, usage and rate windows "
                      "stored there are gone; restore Redis from a backup or re-issue the keys",
                      known, f"replaced by {store_id}" if store_id else "gone", causes)
        if store_id is None:
            # Claimed again, so the next check (and the other replicas) compare against it. A
            # Redis that refuses writes leaves it None, and the next check tries again, silently.
            _, _, self._store_id, _ = await self._claim()
        return self._store_id  # type: ignore[no-any-return]

    async def _claim(self) -> tuple[bool, bytes | None, str | None, str]:
        """Writes the schema and a new store id where they are absent, and reads both back.
        Returns whether there were keys or usage before, the schema, the store id (None if Redis
        refused to write one: full, or a replica), and the id proposed. The id holds its creation
        time by Redis's clock, the one clock every replica shares."""
        seconds, microseconds = await self.redis.time()
        proposed = f"{seconds}.{microseconds:06d}:{secrets.token_hex(8)}"
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(self.ks.keys, self.ks.usage_hours)
            pipe.set(self.ks.schema, SCHEMA, nx=True)
            pipe.set(self.ks.store_id, proposed, nx=True)
            pipe.mget(self.ks.schema, self.ks.store_id)
            had_data, *writes, read = await pipe.execute(raise_on_error=False)
        for answer in (had_data, read):
            if isinstance(answer, Exception):
                raise answer
        refused = next((answer for answer in writes if isinstance(answer, Exception)), None)
        if refused is not None:  # the reads answered: the gateway can serve
            log.warning("Redis refused to write the store's schema and id (%s); written once it takes writes again",
                        refused)
        schema, store_id = read
        return bool(had_data), schema, _text(store_id), proposed

    async def _check_durability(self) -> None:
        """A warning for each way this Redis would lose the data unannounced: it keeps nothing on
        disk, or it evicts keys when full. One round trip; a managed Redis may refuse CONFIG."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.info("persistence")
            pipe.config_get("save")
            pipe.info("memory")
            persistence, save, memory = await pipe.execute(raise_on_error=False)
        for answer in (persistence, save, memory):
            if isinstance(answer, Exception) and not isinstance(answer, ResponseError):
                raise answer
        if isinstance(persistence, ResponseError):
            log.info("Redis refuses INFO persistence (%s): cannot tell whether it keeps the gateway's data on disk",
                     persistence)
        elif not int(persistence.get("aof_enabled", 0)):
            if isinstance(save, ResponseError):
                log.info("Redis keeps no append-only file (appendonly no) and refuses CONFIG GET save (%s), so "
                         "whether it saves snapshots is unknown: without them, a Redis restart loses every API key "
                         "and all usage", save)
            elif not _text(next(iter(save.values()), None)):
                log.warning("Redis keeps the gateway's data in memory only (appendonly no, save \"\"): a restart of "
                            "Redis loses every API key and all usage. Turn on appendonly yes (or snapshots with save)")
        if isinstance(memory, ResponseError):
            log.info("Redis refuses INFO memory (%s): cannot tell whether it evicts the gateway's data", memory)
            return
        policy = _text(memory.get("maxmemory_policy"))
        self._eviction_policy = policy
        if policy and policy != "noeviction":
            what = ("any key, API keys included" if policy.startswith("allkeys-") else
                    "keys that expire: usage hours, rate-limit windows, and the marks that keep a retried usage "
                    "flush from counting twice")
            log.warning("Redis's maxmemory-policy is %s: once full, it deletes %s, silently. Set maxmemory-policy "
                        "noeviction: a full Redis then refuses writes, which the gateway reports", policy, what)


def _text(raw: bytes | str | None) -> str | None:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else raw


def _schema_version(raw: bytes) -> float:
    try:
        return int(raw)
    except ValueError:
        return math.inf  # not a version this gateway wrote: a newer one's


def _created(store_id: str) -> float:
    """When a store id was written; an id not of this gateway's making counts as new."""
    try:
        return float(store_id.split(":", 1)[0])
    except ValueError:
        return math.inf
