"""Key lifecycle: issue, update, rotate, revoke. The plaintext secret exists only in the return
value of `issue` and `rotate`, which the admin API sends once and nothing stores or logs."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from gateway.errors import InvalidRequest, NotFound
from gateway.store.base import ApiKey, KeyChange, Store, hash_secret, new_key_id, new_secret

PREFIX_CHARS = 12  # "sk-gw-" and six characters of the secret: enough to tell keys apart
# The times the admin API takes and shows: from the epoch to the last second RFC 3339 can write.
EARLIEST = 0.0  # 1970-01-01T00:00:00Z
LATEST = 253402300799.0  # 9999-12-31T23:59:59Z


class KeyNotFound(NotFound):
    code = "key_not_found"


async def issue(store: Store, fields: dict[str, Any]) -> tuple[ApiKey, str]:
    secret = new_secret()
    now = time.time()
    key = ApiKey(id=new_key_id(), name=fields.pop("name"), hash=hash_secret(secret), prefix=secret[:PREFIX_CHARS],
                 created_at=now, updated_at=now, **fields)
    await store.create_key(key)
    return key, secret


async def fetch(store: Store, key_id: str) -> ApiKey:
    key = await store.get_key(key_id)
    if key is None:
        raise _not_found(key_id)
    return key


async def update(store: Store, key_id: str, fields: dict[str, Any]) -> ApiKey:
    def change(key: ApiKey) -> ApiKey:
        _refuse_revoked(key)
        return key.updated(**fields)

    return await _modify(store, key_id, change)


async def revoke(store: Store, key_id: str) -> ApiKey:
    revoked_at = time.time()

    def change(key: ApiKey) -> ApiKey:
        return key if key.revoked_at is not None else key.updated(revoked_at=revoked_at)

    return await _modify(store, key_id, change)


async def rotate(store: Store, key_id: str, grace_seconds: float) -> tuple[ApiKey, str]:
    """A new secret for the same id and settings; the old one works for `grace_seconds` more."""
    secret = new_secret()
    new_hash = hash_secret(secret)
    now = time.time()

    def change(key: ApiKey) -> ApiKey:
        _refuse_revoked(key)
        if key.hash == new_hash:
            # This rotation is in already: a try whose answer was lost (Redis retries after a
            # dropped connection). Again, it would make the new secret its own previous one.
            return key
        return key.updated(hash=new_hash, prefix=secret[:PREFIX_CHARS],
                           previous_hash=key.hash if grace_seconds > 0 else None,
                           previous_expires_at=now + grace_seconds if grace_seconds > 0 else None)

    return await _modify(store, key_id, change), secret


async def _modify(store: Store, key_id: str, change: KeyChange) -> ApiKey:
    # In the store, as one step: a change made from a copy read earlier would undo whatever
    # was written meanwhile (a revocation, a rotation).
    key = await store.modify_key(key_id, change)
    if key is None:
        raise _not_found(key_id)
    return key


def _not_found(key_id: str) -> KeyNotFound:
    return KeyNotFound(f"No API key with id `{key_id}`.", param="id")


def _refuse_revoked(key: ApiKey) -> None:
    if key.revoked_at is not None:
        raise InvalidRequest(f"The key `{key.id}` is revoked; issue a new one.", code="key_revoked")


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    # Clamped, never refused: a record stored before the admin API bounded its times (an expiry
    # of 1e20) must still list, and past 9999 reads as "never" just as well. NaN shows as LATEST.
    if not EARLIEST <= timestamp <= LATEST:
        timestamp = EARLIEST if timestamp < EARLIEST else LATEST
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def public(key: ApiKey, last_used: float | None = None) -> dict[str, Any]:
    """What the admin API shows of a key: never the hash, never the secret."""
    now = time.time()
    status = ("revoked" if key.revoked_at is not None
              else "expired" if key.expires_at is not None and key.expires_at <= now else "active")
    return {
        "id": key.id, "object": "api_key", "name": key.name, "prefix": key.prefix, "status": status,
        "models": key.models, "rpm": key.rpm, "tpm": key.tpm, "max_concurrency": key.max_concurrency,
        "priority": key.priority, "metadata": key.metadata,
        "created_at": iso(key.created_at), "updated_at": iso(key.updated_at), "expires_at": iso(key.expires_at),
        "revoked_at": iso(key.revoked_at), "last_used_at": iso(last_used),
        "previous_key_expires_at": iso(key.previous_expires_at) if key.previous_expires_at and
        key.previous_expires_at > now else None,
    }
