"""One contract, run against every store: what admins create and what clients use survives."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time

import pytest

from gateway.store.base import ApiKey, Store, UsageBatch, UsageDelta, UsageKey, hour_of, new_batch_id
from gateway.store.sqlite import SQLiteStore
from tests.store.conftest import OpenStore, make_key, overwrite_record


def batch(deltas: dict[UsageKey, UsageDelta], last_used: dict[str, float] | None = None) -> UsageBatch:
    return UsageBatch(new_batch_id(), deltas, last_used or {})


async def test_create_get_and_list(store: Store) -> None:
    first, second = make_key("key_1", created_at=1.0), make_key("key_2", created_at=2.0, models=None)
    await store.create_key(second)
    await store.create_key(first)
    assert await store.get_key("key_1") == first
    assert await store.get_key("missing") is None
    assert [k.id for k in await store.all_keys()] == ["key_1", "key_2"]  # oldest first


async def test_modify_writes_what_the_change_returns(store: Store) -> None:
    key = make_key()
    await store.create_key(key)
    revoked = await store.modify_key(key.id, lambda k: k.updated(revoked_at=time.time(), rpm=None))
    assert revoked is not None and revoked.rpm is None and not revoked.usable(time.time())
    assert await store.get_key(key.id) == revoked
    assert await store.modify_key("missing", lambda k: k.updated(rpm=1)) is None
    assert await store.get_key("missing") is None


async def test_a_refused_change_leaves_the_record_as_it_was(store: Store) -> None:
    key = make_key()
    await store.create_key(key)

    def refuse(current: ApiKey) -> ApiKey:
        raise ValueError("no")

    with pytest.raises(ValueError):
        await store.modify_key(key.id, refuse)
    assert await store.get_key(key.id) == key
    assert await store.modify_key(key.id, lambda k: k.updated(name="bob")) is not None  # nothing left locked


async def test_concurrent_changes_from_two_stores_all_land(store: Store, open_store: OpenStore) -> None:
    # Two replicas (Redis) or two connections to one file (SQLite): a change made from a stale
    # read would drop the others' increments.
    other = await open_store()
    await store.create_key(make_key(rpm=0))

    def one_more(key: ApiKey) -> ApiKey:
        return key.updated(rpm=(key.rpm or 0) + 1)

    await asyncio.gather(*(s.modify_key("key_1", one_more) for _ in range(25) for s in (store, other)))
    changed = await store.get_key("key_1")
    assert changed is not None and changed.rpm == 50


async def test_change_feed_names_changed_keys(store: Store) -> None:
    changes = store.key_changes()
    assert await asyncio.wait_for(anext(changes), 5) is None  # first: "load everything"
    await store.create_key(make_key("key_9"))
    assert await asyncio.wait_for(anext(changes), 5) == "key_9"
    await store.modify_key("key_9", lambda k: k)  # no change: nothing written, nothing told
    await store.modify_key("key_9", lambda k: dataclasses.replace(k, name="bob"))
    await store.create_key(make_key("key_10"))
    assert await asyncio.wait_for(anext(changes), 5) == "key_9"
    assert await asyncio.wait_for(anext(changes), 5) == "key_10"
    await changes.aclose()


async def test_keys_version_moves_with_every_key_write(store: Store, open_store: OpenStore) -> None:
    # A replica compares it with the version it read before it last loaded every key, to find a
    # change its feed lost; a store whose feed loses none has no version (None, always).
    other = await open_store()  # another replica
    versions = [await store.keys_version()]
    await store.create_key(make_key())
    versions.append(await store.keys_version())
    await other.modify_key("key_1", lambda k: k.updated(rpm=1))
    versions.append(await store.keys_version())
    await store.modify_key("key_1", lambda k: k)  # nothing written
    await store.add_usage(batch({}, {"key_1": 1.0}))  # not a key
    versions.append(await store.keys_version())
    if isinstance(store, SQLiteStore):
        assert versions == [None] * 4
    else:
        assert None not in versions and len(set(versions[:3])) == 3 and versions[3] == versions[2]


async def test_usage_adds_exactly_under_concurrency(store: Store) -> None:
    hour = hour_of(time.time())
    row = (hour, "key_1", "m")

    async def add_one() -> None:
        await store.add_usage(batch({row: UsageDelta(1, 10, 5, 0)}, {"key_1": time.time()}))

    await asyncio.gather(*(add_one() for _ in range(50)))
    await store.add_usage(batch({row: UsageDelta(2, 0, 0, 2), (hour, "key_2", "m"): UsageDelta(1, 1, 1, 0)}))
    rows = dict(await store.usage(hour, hour + 3600))
    assert rows[row] == UsageDelta(52, 500, 250, 2)
    assert rows[(hour, "key_2", "m")] == UsageDelta(1, 1, 1, 0)
    assert await store.usage(hour + 3600, hour + 7200) == []
    assert "key_1" in await store.last_used()


async def test_a_batch_sent_again_counts_once(store: Store, open_store: OpenStore) -> None:
    # A try whose answer was lost (a timeout) may have been applied; its retry, from this replica
    # or after a restart, carries the same id.
    hour = hour_of(time.time())
    row = (hour, "key_1", "m")
    sent = batch({row: UsageDelta(2, 20, 10, 0)}, {"key_1": 100.0})
    await asyncio.gather(store.add_usage(sent), store.add_usage(sent))
    await (await open_store()).add_usage(sent)
    await store.add_usage(batch({row: UsageDelta(1, 1, 1, 1)}))
    assert dict(await store.usage(hour, hour + 3600))[row] == UsageDelta(3, 21, 11, 1)


async def test_last_used_keeps_the_latest(store: Store) -> None:
    await store.add_usage(batch({}, {"key_1": 200.0}))
    await store.add_usage(batch({}, {"key_1": 100.0}))  # an older flush arriving late
    assert (await store.last_used())["key_1"] == 200.0


async def test_everything_survives_a_reopen(store: Store, open_store: OpenStore) -> None:
    key = make_key()
    hour = hour_of(time.time())
    await store.create_key(key)
    await store.add_usage(batch({(hour, key.id, "m"): UsageDelta(3, 30, 15, 1)}, {key.id: 123.0}))
    await store.close()
    fresh = await open_store()
    assert await fresh.get_key(key.id) == key
    assert dict(await fresh.usage(hour, hour + 3600))[(hour, key.id, "m")] == UsageDelta(3, 30, 15, 1)
    assert (await fresh.last_used())[key.id] == 123.0


async def test_a_newer_gateway_s_fields_survive_an_older_one_s_change(store: Store, open_store: OpenStore) -> None:
    # During a rolling upgrade (or after a rollback) a newer replica writes fields this version
    # does not know: this one still reads the key, and its changes keep them.
    key = make_key()
    await store.create_key(key)
    newer = {**key.to_record(), "allowed_ips": ["10.0.0.0/8"], "extra": {"x": 1}}
    await overwrite_record(store, key.id, json.dumps(newer))
    assert [k.id for k in await store.all_keys()] == [key.id]  # a new replica starts
    assert await store.get_key(key.id) is not None
    revoked = await store.modify_key(key.id, lambda k: k.updated(revoked_at=time.time()))
    assert revoked is not None and revoked.revoked_at is not None
    again = await (await open_store()).get_key(key.id)
    assert again == revoked
    assert again.to_record()["allowed_ips"] == ["10.0.0.0/8"] and again.to_record()["extra"] == {"x": 1}


async def test_an_unreadable_record_is_left_out_of_every_key_with_an_error_naming_it(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(1, 4):
        await store.create_key(make_key(f"key_{i}", created_at=float(i)))
    await overwrite_record(store, "key_1", "{not json")
    await overwrite_record(store, "key_3", json.dumps({**make_key("key_3").to_record(), "rpm": "ten"}))
    with caplog.at_level(logging.ERROR, logger="gateway"):
        assert [k.id for k in await store.all_keys()] == ["key_2"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert "key_1" in errors[0] and "not JSON" in errors[0]
    assert "key_3" in errors[1] and "$.rpm" in errors[1]
