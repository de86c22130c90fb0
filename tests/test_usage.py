"""Usage accounting: counts recorded on the request path reach the store, shutdown included."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from gateway import metrics, usage
from gateway.store.base import UsageBatch
from gateway.usage import UsageRecorder


class SlowStore:
    """Takes its time over each write, as a store across a network does."""

    def __init__(self) -> None:
        self.stored = 0
        self.writing = asyncio.Event()

    async def add_usage(self, batch: UsageBatch) -> None:
        self.writing.set()
        await asyncio.sleep(0.05)
        self.stored += sum(d.requests for d in batch.deltas.values())


class HungStore:
    """Never answers, as a Redis stopped in its tracks."""

    async def add_usage(self, batch: UsageBatch) -> None:
        await asyncio.Event().wait()


async def test_a_flush_on_its_way_at_shutdown_is_not_lost(monkeypatch: Any) -> None:
    monkeypatch.setattr(usage, "FLUSH_INTERVAL", 0.01)
    store = SlowStore()
    recorder = UsageRecorder(store)  # type: ignore[arg-type]
    for _ in range(10):
        recorder.add("key_1", "m", prompt_tokens=3, completion_tokens=4)
    await recorder.start()
    await store.writing.wait()  # the background flush is in the middle of its write
    for _ in range(5):
        recorder.add("key_1", "m")  # and more arrives meanwhile
    await recorder.stop()
    assert store.stored == 15


class FlakyStore:
    """Refuses the first `failures` writes (None: every write); remembers each batch it was sent."""

    def __init__(self, failures: int | None) -> None:
        self.failures = failures
        self.sent: list[UsageBatch] = []
        self.stored: dict[str, UsageBatch] = {}

    async def add_usage(self, batch: UsageBatch) -> None:
        self.sent.append(batch)
        if self.failures is None or len(self.sent) <= self.failures:
            raise ConnectionError("store unavailable")
        self.stored[batch.id] = batch

    def requests_stored(self) -> int:
        return sum(d.requests for batch in self.stored.values() for d in batch.deltas.values())


async def test_a_failed_batch_goes_again_as_it_was_before_newer_counts() -> None:
    store = FlakyStore(failures=1)
    recorder = UsageRecorder(store)  # type: ignore[arg-type]
    for _ in range(3):
        recorder.add("key_1", "m", prompt_tokens=2)
    assert await recorder.flush() is False
    recorder.add("key_1", "m")
    assert await recorder.flush() is True
    failed, retried, newer = store.sent
    # Same id and contents: if the failed try was in fact applied, the store refuses the retry whole.
    assert retried == failed and sum(d.requests for d in failed.deltas.values()) == 3
    assert newer.id != failed.id and sum(d.requests for d in newer.deltas.values()) == 1
    assert "key_1" in newer.last_used


async def test_the_final_flush_is_retried_at_shutdown(monkeypatch: Any) -> None:
    monkeypatch.setattr(usage, "FINAL_FLUSH_RETRY_DELAY", 0.01)
    store = FlakyStore(failures=3)
    recorder = UsageRecorder(store)  # type: ignore[arg-type]
    recorder.add("key_1", "m", prompt_tokens=3)
    await recorder.stop()
    assert store.requests_stored() == 1


@pytest.mark.parametrize("store", [FlakyStore(failures=None), HungStore()], ids=["failing", "hung"])
async def test_usage_the_store_never_takes_is_reported_lost(monkeypatch: Any, caplog: Any, store: Any) -> None:
    monkeypatch.setattr(usage, "FINAL_FLUSH_TIMEOUT", 0.3)
    monkeypatch.setattr(usage, "FINAL_FLUSH_RETRY_DELAY", 0.01)
    recorder = UsageRecorder(store)
    for _ in range(7):
        recorder.add("key_1", "m", prompt_tokens=10, completion_tokens=5)
    started = time.monotonic()
    await recorder.stop()
    assert time.monotonic() - started < 1.0  # shutdown is not held up for long
    lost = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(lost) == 1
    assert "7 requests, 70 prompt tokens and 35 completion tokens" in lost[0].getMessage()


def unsaved() -> float | None:
    return metrics.REGISTRY.get_sample_value("gateway_usage_unsaved_requests")


async def test_requests_the_store_has_not_taken_are_exported_until_it_takes_them() -> None:
    store = FlakyStore(failures=2)
    recorder = UsageRecorder(store)  # type: ignore[arg-type]
    for _ in range(3):
        recorder.add("key_1", "m", prompt_tokens=2)
    assert await recorder.flush() is False
    assert unsaved() == 3
    recorder.add("key_2", "m")
    assert await recorder.flush() is False  # the held batch failed again; the newer request waits behind it
    assert unsaved() == 4
    assert await recorder.flush() is True
    assert unsaved() == 0
    # Traffic between two flushes that succeed is not "unsaved": a busy, healthy replica stays at 0.
    recorder.add("key_1", "m")
    assert unsaved() == 0
    assert await recorder.flush() is True and unsaved() == 0


async def test_a_store_outage_is_logged_once_a_minute_not_once_a_flush(monkeypatch: Any, caplog: Any) -> None:
    clock = [1000.0]
    monkeypatch.setattr(usage.time, "monotonic", lambda: clock[0])
    store = FlakyStore(failures=70)
    recorder = UsageRecorder(store)  # type: ignore[arg-type]
    recorder.add("key_1", "m")
    caplog.set_level(logging.WARNING, logger="gateway.usage")
    for _ in range(70):  # a flush a second for 70 s
        assert await recorder.flush() is False
        clock[0] += 1
    assert await recorder.flush() is True
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 3, said
    assert said[0].startswith("usage flush failed") and said[1].startswith("usage flush still failing after 60 s")
    assert said[2] == "usage flush works again after 70 s; everything held is stored"


def dropped() -> float:
    return metrics.REGISTRY.get_sample_value("gateway_usage_dropped_requests_total") or 0.0


async def test_usage_dropped_past_max_pending_is_counted_for_an_alert(monkeypatch: Any) -> None:
    # Past MAX_PENDING rows the oldest hour of the newer counts goes for good: only the log said so.
    monkeypatch.setattr(usage, "MAX_PENDING", 3)
    clock = [10 * 3600.0]
    monkeypatch.setattr(usage.time, "time", lambda: clock[0])
    recorder = UsageRecorder(FlakyStore(failures=None))  # type: ignore[arg-type]
    recorder.add("key_0", "m")
    assert await recorder.flush() is False  # the batch on its way: kept whole, never dropped
    before = dropped()
    for key, requests in (("key_1", 2), ("key_2", 3)):
        for _ in range(requests):
            recorder.add(key, "m")
    clock[0] += 3600  # the next hour: four rows now, one more than MAX_PENDING
    recorder.add("key_1", "m")
    recorder.add("key_2", "m")
    assert await recorder.flush() is False
    assert dropped() - before == 5  # the requests of the oldest hour's two rows
    assert unsaved() == 3  # the batch on its way, and the newer hour's two
