"""Keys and usage storage: embedded SQLite by default, Redis when `store.url` says so."""

from __future__ import annotations

from gateway.config import Config
from gateway.store.base import ApiKey, Store, UsageDelta


def open_store(config: Config, redis_client=None) -> Store:  # type: ignore[no-untyped-def]
    if config.store.url:
        from gateway.store.redis import RedisStore

        assert redis_client is not None, "a Redis store needs the shared Redis client"
        return RedisStore(redis_client, usage_retention=config.store.usage_retention)
    from gateway.store.sqlite import SQLiteStore

    return SQLiteStore(config.data_dir / "gateway.db", usage_retention=config.store.usage_retention)


__all__ = ["ApiKey", "Store", "UsageDelta", "open_store"]
