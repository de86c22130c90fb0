"""Usage accounting per key and model: added in memory on the request path, flushed in batches.

A request adds to a dict (no I/O); a background task writes the batch about once a second with
atomic increments, and once more at shutdown. A failed flush keeps its batch and sends it again,
as it was and under the same id, before any newer counts: the store may have applied the failed
try without our hearing so, and the id lets it apply the batch at most once. So a store outage
delays usage but neither loses nor doubles it (bounded: past MAX_PENDING rows the oldest hour of
the newer counts is dropped, and the log and gateway_usage_dropped_requests_total say so: alert
GatewayUsageDropped). At shutdown the flush is tried for up to
FINAL_FLUSH_TIMEOUT (a force quit, which skips the lifespan shutdown, has its own shorter bound:
gateway/cli.py); what is still not stored then is lost, and the log says how much. While flushes
fail, gateway_usage_unsaved_requests says how many requests are held (alert GatewayUsageNotStored).
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway import metrics
from gateway.store.base import Store, UsageBatch, UsageDelta, UsageKey, hour_of, new_batch_id

log = logging.getLogger("gateway.usage")

FLUSH_INTERVAL = 1.0
MAX_PENDING = 100_000
FINAL_FLUSH_TIMEOUT = 5.0  # shutdown waits this long at most for the store
FINAL_FLUSH_RETRY_DELAY = 0.5
REPEAT_FAILURE_AFTER = 60.0  # seconds between log lines of one store outage


class UsageRecorder:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: dict[UsageKey, UsageDelta] = {}  # not yet in a batch
        self._last_used: dict[str, float] = {}
        self._outgoing: UsageBatch | None = None  # sent, or being sent, until the store confirms it
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.stopped = False  # the final flush has begun (the lifespan's, or a force quit's)
        self._failing_since: float | None = None  # flushes fail since then (monotonic)
        self._last_said = 0.0

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

    async def stop(self, timeout: float | None = None) -> None:
        """The final flush: tried for up to `timeout` (FINAL_FLUSH_TIMEOUT); what the store has not
        taken by then is lost."""
        timeout = FINAL_FLUSH_TIMEOUT if timeout is None else timeout
        self.stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            async with asyncio.timeout(timeout):
                while not await self.flush():
                    await asyncio.sleep(FINAL_FLUSH_RETRY_DELAY)
        except TimeoutError:
            pass
        self._report_lost(timeout)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            # Shielded: stop() cancels this task, and a batch cancelled on its way to the store
            # would leave its outcome unknown for no reason. stop()'s own flush waits for it on
            # the lock instead.
            await asyncio.shield(self.flush())

    async def flush(self) -> bool:
        """Send what is held to the store; True when all of it is stored."""
        async with self._lock:
            try:
                if self._outgoing is not None:  # the batch that failed goes first, as it was
                    await self._store.add_usage(self._outgoing)
                    self._outgoing = None
                if self._pending or self._last_used:
                    self._outgoing = self._seal_pending()
                    await self._store.add_usage(self._outgoing)
                    self._outgoing = None
            except Exception as exc:  # noqa: BLE001 - keep the counts and retry next time
                self._failed(exc)
                self._drop_oldest_hour_past_max()
                metrics.usage_unsaved.set(sum(d.requests for d in self._held()))
                return False
            metrics.usage_unsaved.set(0)
            if self._failing_since is not None:
                log.warning("usage flush works again after %.0f s; everything held is stored",
                            time.monotonic() - self._failing_since)
                self._failing_since = None
            return True

    def _failed(self, exc: Exception) -> None:
        """Said once when flushes start failing, then once a minute while they go on: a flush a
        second would fill the log of a Redis outage with the same line."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = self._last_said = now
            log.warning("usage flush failed (%s); %d rows kept for retry", exc, len(self._held()))
        elif now - self._last_said >= REPEAT_FAILURE_AFTER:
            self._last_said = now
            log.warning("usage flush still failing after %.0f s (%s); %d rows kept for retry",
                        now - self._failing_since, exc, len(self._held()))

    def _seal_pending(self) -> UsageBatch:
        """The counts so far as one batch, under an id it keeps until the store takes it."""
        batch = UsageBatch(new_batch_id(), self._pending, self._last_used)
        self._pending, self._last_used = {}, {}
        return batch

    def _drop_oldest_hour_past_max(self) -> None:
        if len(self._pending) <= MAX_PENDING:
            return
        oldest = min(row[0] for row in self._pending)
        dropped = [row for row in self._pending if row[0] == oldest]
        requests = sum(self._pending.pop(row).requests for row in dropped)
        metrics.usage_dropped.inc(requests)
        log.error("usage backlog over %d rows: dropped %d rows of hour %d (%d requests)", MAX_PENDING, len(dropped),
                  oldest, requests)

    def _report_lost(self, timeout: float) -> None:
        lost = sum(self._held(), UsageDelta())
        if lost != UsageDelta():
            log.error("usage lost at shutdown: the store did not take %d requests, %d prompt tokens and "
                      "%d completion tokens (%d errors) within %g s", lost.requests, lost.prompt_tokens,
                      lost.completion_tokens, lost.errors, timeout)

    def _held(self) -> list[UsageDelta]:
        """Every row not yet stored: the outgoing batch's and the newer ones."""
        outgoing = self._outgoing.deltas if self._outgoing is not None else {}
        return [*outgoing.values(), *self._pending.values()]
