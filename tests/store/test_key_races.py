"""Admin changes to one key at the same moment, on every store: none undoes another. Two store
objects stand for two replicas (Redis) or two connections to one file (SQLite)."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway import keys
from gateway.errors import InvalidRequest
from gateway.store.base import Store, hash_secret
from tests.store.conftest import OpenStore

KEYS = 40


async def test_a_revocation_is_not_undone_by_a_concurrent_update(store: Store, open_store: OpenStore) -> None:
    other = await open_store()
    issued = [(await keys.issue(store, {"name": f"race{i}"}))[0] for i in range(KEYS)]

    async def race(key_id: str) -> None:
        # The update either lands first (then the revocation keeps its rpm) or is refused.
        await asyncio.gather(keys.revoke(store, key_id), keys.update(other, key_id, {"rpm": 77}),
                             return_exceptions=True)

    await asyncio.gather(*(race(key.id) for key in issued))
    for key in issued:
        stored = await store.get_key(key.id)
        assert stored is not None and stored.revoked_at is not None, f"{key.id} is usable again"


async def test_a_rotated_secret_survives_a_concurrent_update(store: Store, open_store: OpenStore) -> None:
    other = await open_store()
    issued = [(await keys.issue(store, {"name": f"race{i}"}))[0] for i in range(KEYS)]

    async def race(key_id: str) -> str:
        (_, secret), _ = await asyncio.gather(keys.rotate(store, key_id, 0), keys.update(other, key_id, {"name": "b"}))
        return secret

    secrets = await asyncio.gather(*(race(key.id) for key in issued))
    for key, secret in zip(issued, secrets):
        stored = await store.get_key(key.id)
        assert stored is not None and stored.name == "b"
        assert stored.hashes(time.time()) == [hash_secret(secret)], f"{key.id}: the rotation was undone"


async def test_a_revoked_key_still_refuses_update_and_rotate(store: Store) -> None:
    key, _ = await keys.issue(store, {"name": "gone"})
    revoked = await keys.revoke(store, key.id)
    assert await keys.revoke(store, key.id) == revoked  # again: the first revocation time stays
    for change in (keys.update(store, key.id, {"rpm": 1}), keys.rotate(store, key.id, 0)):
        with pytest.raises(InvalidRequest) as refused:
            await change
        assert refused.value.code == "key_revoked"
    with pytest.raises(keys.KeyNotFound):
        await keys.revoke(store, "key_nope")
