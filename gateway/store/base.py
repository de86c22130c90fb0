"""Keys and usage: the records, and the interface both stores (SQLite, Redis) implement.

The stores keep what admins created and what clients used; nothing else. The request path
never waits on a store: keys are served from the in-memory cache in `gateway.auth`, and usage is
added in memory and flushed in batches by `gateway.usage`.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Hashable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import msgspec

log = logging.getLogger("gateway.store")

KEY_PREFIX = "sk-gw-"  # recognisable in logs, configs and secret scanners


def hash_secret(secret: str) -> str:
    """SHA-256 of the key. No salt needed: the secret is 256 random bits, so there is no
    dictionary to precompute; the hash only makes a stolen store useless for calling the API."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    hash: str
    prefix: str  # the first characters of the secret, to tell keys apart in listings
    created_at: float
    updated_at: float
    models: list[str] | None = None  # None: every model
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    priority: int = 0
    expires_at: float | None = None
    revoked_at: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # After a rotation the previous secret keeps working until this time.
    previous_hash: str | None = None
    previous_expires_at: float | None = None
    # Fields of the record this version does not know: a newer gateway's, written during a
    # rolling upgrade or before a rollback. Kept, and written back with the record, so that an
    # older replica's change to the key never drops them.
    extra: dict[str, Any] = field(default_factory=dict)

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def hashes(self, now: float) -> list[str]:
        out = [self.hash]
        if self.previous_hash and self.previous_expires_at and self.previous_expires_at > now:
            out.append(self.previous_hash)
        return out

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        return {**record.pop("extra"), **record}

    @classmethod
    def from_record(cls, record: Any) -> ApiKey:
        """The key a stored record describes, its types checked (a record of the wrong shape
        would otherwise fail later, on the request path). KeyRecordError if it is not one."""
        if not isinstance(record, dict):
            raise KeyRecordError(f"a JSON object was expected, not {type(record).__name__}")
        known = {name: value for name, value in record.items() if name in _RECORD_FIELDS}
        try:
            key = msgspec.convert(known, cls)
        except msgspec.ValidationError as exc:
            raise KeyRecordError(str(exc)) from None
        extra = {name: value for name, value in record.items() if name not in _RECORD_FIELDS}
        return replace(key, extra=extra) if extra else key

    @classmethod
    def decode(cls, raw: str | bytes) -> ApiKey:
        """A record as a store keeps it (JSON)."""
        try:
            record = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise KeyRecordError(f"not JSON ({exc})") from None
        return cls.from_record(record)

    def encode(self) -> str:
        return json.dumps(self.to_record())

    def updated(self, **changes: Any) -> ApiKey:
        return replace(self, updated_at=time.time(), **changes)


# What a record holds of this version's fields ("extra" is never one: a newer gateway's field of
# that name would land in `extra`, not replace it).
_RECORD_FIELDS = frozenset(f.name for f in fields(ApiKey)) - {"extra"}


class KeyRecordError(ValueError):
    """A stored key record this gateway cannot read: not JSON, or a field missing or of the wrong type."""


def decode_keys(records: Iterable[tuple[str, str | bytes | None]]) -> list[ApiKey]:
    """The keys of (key id, stored record) pairs, in their order. An absent record is skipped; so
    is one that cannot be read, with an ERROR naming it: one bad record must not keep every
    other key from loading (the auth cache's reload, a new replica's start, the key listing)."""
    out = []
    for key_id, raw in records:
        if raw is None:
            continue
        try:
            out.append(ApiKey.decode(raw))
        except KeyRecordError as exc:
            log_unreadable(key_id, exc)
    return out


def log_unreadable(key_id: str, exc: KeyRecordError) -> None:
    log.error("API key %s left out: its stored record cannot be read (%s). It opens nothing until the record is "
              "fixed or deleted in the store", key_id, exc)


@dataclass(frozen=True)
class UsageDelta:
    """Counts to add for one (hour, key, model)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0

    def __add__(self, other: UsageDelta) -> UsageDelta:
        return UsageDelta(self.requests + other.requests, self.prompt_tokens + other.prompt_tokens,
                          self.completion_tokens + other.completion_tokens, self.errors + other.errors)


UsageKey = tuple[int, str, str]  # (hour as a unix timestamp, key id, model)
USAGE_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "errors")


@dataclass(frozen=True)
class UsageBatch:
    """Counts flushed together, under an id that stays with them across retries: a try whose
    answer was lost (a timeout) may still have been applied, and the id lets the store tell."""

    id: str
    deltas: dict[UsageKey, UsageDelta]
    last_used: dict[str, float]


# How long a store remembers the ids of the batches it applied: far longer than a batch is
# retried, unless the store is out for longer than this.
BATCH_ID_TTL = 6 * 3600


def new_batch_id() -> str:
    return secrets.token_hex(16)


KeyChange = Callable[[ApiKey], ApiKey]


HOUR = 3600


def hour_of(timestamp: float) -> int:
    return int(timestamp // HOUR * HOUR)


# Usage retention, one rule for both stores: an hour's usage is kept whole for `retention` after
# the hour ends, then deleted whole (no report ever sees part of an hour).
def usage_expires_at(hour: int, retention: float) -> float:
    return hour + HOUR + retention


def last_expired_hour(now: float, retention: float) -> float:
    """Hours at or before this have expired at `now` (the inverse of usage_expires_at)."""
    return now - retention - HOUR


# How often a store looks for expired usage: what expires is whole hours, so looking more often
# finds nothing more.
USAGE_PRUNE_INTERVAL = HOUR


class PruneSchedule:
    """When a store next looks for expired usage: at its first flush, then at most once an hour.

    A pass that found more than it may delete at once (the first after an upgrade can find
    years) asks for the next flush to go on, so no single pass holds the store for long. A pass
    that failed counts as done (unless the whole store is away, and the flush fails with it): it
    is tried again in an hour, not at every flush with a warning each second."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._last: float | None = None

    def due(self) -> float | None:
        """The time to prune as of, or None if it is not time yet."""
        now = self._clock()
        # (A clock set back makes it due at once, rather than waiting for the clock to catch up.)
        if self._last is not None and self._last <= now < self._last + USAGE_PRUNE_INTERVAL:
            return None
        self._last = now
        return now

    def go_on(self) -> None:
        self._last = None


class Store(abc.ABC):
    """One interface, two implementations; `tests/store/` runs one contract suite over both."""

    # How many times this process found the store had lost its data (Redis restarted without
    # persistence, flushed, failed over to an empty replica); each is logged at ERROR. For the
    # app to export; a store that cannot lose its data underneath the gateway leaves it at 0.
    data_losses: int = 0

    async def open(self) -> None:  # noqa: B027 - optional hook
        pass

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass

    # --- keys ---
    @abc.abstractmethod
    async def create_key(self, key: ApiKey) -> None: ...

    @abc.abstractmethod
    async def get_key(self, key_id: str) -> ApiKey | None:
        """KeyRecordError if its record cannot be read."""

    @abc.abstractmethod
    async def modify_key(self, key_id: str, change: KeyChange) -> ApiKey | None:
        """Read, change and write one key as one step: no other write lands in between, so a
        revocation answered as done cannot be undone by a concurrent update. Returns the key as it
        now is, or None if there is no such key. `change` returns its argument to write nothing,
        or raises to refuse (the record stays as it was); it may run more than once (on Redis,
        after a concurrent write), so it must have no other effect. KeyRecordError, changing
        nothing, if the record cannot be read."""

    @abc.abstractmethod
    async def all_keys(self) -> list[ApiKey]:
        """Every key, oldest first (the auth cache loads them all at start). A record that cannot
        be read is left out, with an ERROR (decode_keys)."""

    @abc.abstractmethod
    def key_changes(self) -> AsyncIterator[str | None]:
        """Ids of keys changed by any replica; None means "reload everything". The feed starts
        with None, and sends it again after a reconnect (messages may have been missed)."""

    @abc.abstractmethod
    async def keys_version(self) -> Hashable | None:
        """A value that every key write (create, or a modify that writes) changes, and so does
        the store losing its data, for a reader of all_keys to tell later (by comparing it) whether
        it has missed a change the feed lost; None on a store whose feed loses none, where there
        is nothing to look at."""

    # --- usage ---
    @abc.abstractmethod
    async def add_usage(self, batch: UsageBatch) -> None:
        """Add the batch's counts, all or none; totals stay exact when replicas add at once.
        A batch id already applied (in the last few hours) is not applied again."""

    @abc.abstractmethod
    async def usage(self, start: float, end: float) -> list[tuple[UsageKey, UsageDelta]]:
        """Rows with start <= hour < end."""

    @abc.abstractmethod
    async def last_used(self) -> dict[str, float]: ...
