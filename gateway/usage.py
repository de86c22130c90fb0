"""Usage accounting per key and model: added in memory on the request path, flushed in batches.

A request adds to a dict (no I/O); a background task writes the batch about once a second with
atomic increments, and once more at shutdown. A failed flush keeps its counts for the next try,
so a store outage delays usage but does not lose it (bounded: past MAX_PENDING rows the oldest
hour is dropped, and the log says so).
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.store.base import Store, UsageDelta, UsageKey, hour_of

log = logging.getLogger("gateway.usage")

FLUSH_INTERVAL = 1.0
MAX_PENDING = 100_000


class UsageRecorder:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: dict[UsageKey, UsageDelta] = {}
        self._last_used: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def add(self, key_id: str, model: str, *, prompt_tokens: int = 0, completion_tokens: int = 0,
            error: bool = False) -> None:
        now = time.time()
        row = (hour_of(now), key_id, model)
        delta = UsageDelta(1, prompt_tokens, completion_tokens, 1 if error else 0)
        current = self._pending.get(row)
        self._pending[row] = delta if current is None else current + delta
        self._last_used[key_id] = now

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-flush")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            # Shielded: stop() cancels this task, and a batch cancelled on its way to the store
            # would be lost (or, put back, counted twice if the store had applied it). stop()'s
            # own flush waits for it on the lock instead.
            await asyncio.shield(self.flush())

    async def flush(self) -> None:
        async with self._lock:
            if not self._pending and not self._last_used:
                return
            batch, self._pending = self._pending, {}
            last_used, self._last_used = self._last_used, {}
            try:
                await self._store.add_usage(batch, last_used)
            except Exception as exc:  # noqa: BLE001 - keep the counts and retry next time
                log.warning("usage flush failed (%s); %d rows kept for retry", exc, len(batch))
                for row, delta in batch.items():
                    current = self._pending.get(row)
                    self._pending[row] = delta if current is None else current + delta
                for key_id, at in last_used.items():
                    self._last_used[key_id] = max(at, self._last_used.get(key_id, 0))
                if len(self._pending) > MAX_PENDING:
                    oldest = min(row[0] for row in self._pending)
                    dropped = [row for row in self._pending if row[0] == oldest]
                    for row in dropped:
                        del self._pending[row]
                    log.error("usage backlog over %d rows: dropped %d rows of hour %d", MAX_PENDING,
                              len(dropped), oldest)
