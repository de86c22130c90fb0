"""Keys and usage: the records, and the interface both stores (SQLite, Redis) implement.

The stores keep what admins created and what clients used; nothing else. The request path
never waits on a store: keys are served from the in-memory cache in `gateway.auth`, and usage is
added in memory and flushed in batches by `gateway.usage`.
"""

from __future__ import annotations

import abc
import hashlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

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

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def hashes(self, now: float) -> list[str]:
        out = [self.hash]
        if self.previous_hash and self.previous_expires_at and self.previous_expires_at > now:
            out.append(self.previous_hash)
        return out

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ApiKey:
        return cls(**record)

    def updated(self, **changes: Any) -> ApiKey:
        return replace(self, updated_at=time.time(), **changes)


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


def hour_of(timestamp: float) -> int:
    return int(timestamp // 3600 * 3600)


class Store(abc.ABC):
    """One interface, two implementations; `tests/store/` runs one contract suite over both."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        pass

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass

    # --- keys ---
    @abc.abstractmethod
    async def create_key(self, key: ApiKey) -> None: ...

    @abc.abstractmethod
    async def get_key(self, key_id: str) -> ApiKey | None: ...

    @abc.abstractmethod
    async def put_key(self, key: ApiKey) -> None:
        """Replace an existing key's record (update, revoke, rotate)."""

    @abc.abstractmethod
    async def all_keys(self) -> list[ApiKey]:
        """Every key, oldest first (the auth cache loads them all at start)."""

    @abc.abstractmethod
    def key_changes(self) -> AsyncIterator[str | None]:
        """Ids of keys changed by any replica; None means "reload everything". The feed starts
        with None, and sends it again after a reconnect (messages may have been missed)."""

    # --- usage ---
    @abc.abstractmethod
    async def add_usage(self, deltas: dict[UsageKey, UsageDelta], last_used: dict[str, float]) -> None:
        """Add the counts atomically per row; totals stay exact when replicas add at once."""

    @abc.abstractmethod
    async def usage(self, start: float, end: float) -> list[tuple[UsageKey, UsageDelta]]:
        """Rows with start <= hour < end."""

    @abc.abstractmethod
    async def last_used(self) -> dict[str, float]: ...
