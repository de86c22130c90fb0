"""Usage accounting: counts recorded on the request path reach the store, shutdown included."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway import usage
from gateway.store.base import UsageDelta, UsageKey
from gateway.usage import UsageRecorder


class SlowStore:
    """Takes its time over each write, as a store across a network does."""

    def __init__(self) -> None:
        self.stored = 0
        self.writing = asyncio.Event()

    async def add_usage(self, deltas: dict[UsageKey, UsageDelta], last_used: dict[str, float]) -> None:
        self.writing.set()
        await asyncio.sleep(0.05)
        self.stored += sum(d.requests for d in deltas.values())


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
