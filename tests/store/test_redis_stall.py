"""Usage on a Redis that stalls past the client's timeout (SIGSTOP) and then wakes: a flush the
gateway gave up on may run when Redis wakes, and its retry must not count it again. A Redis of
this test's own: stopping the shared one would stall the other tests."""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from gateway.store.base import UsageDelta, hour_of
from gateway.store.redis import RedisStore
from gateway.usage import UsageRecorder
from tests.conftest import RedisServer


@pytest.fixture
def stalling_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.proc.send_signal(signal.SIGCONT)
    server.kill()


@pytest.fixture
async def store(stalling_redis: RedisServer) -> AsyncIterator[RedisStore]:
    # As the gateway builds its client, with a shorter timeout to keep the test short.
    client = aioredis.Redis.from_url(stalling_redis.url, socket_timeout=0.3, socket_connect_timeout=0.3)
    yield RedisStore(client)
    await client.aclose()


async def test_usage_flushed_across_a_stall_counts_once(stalling_redis: RedisServer, store: RedisStore) -> None:
    recorder = UsageRecorder(store)
    recorder.add("key_1", "m", prompt_tokens=12, completion_tokens=3)
    await recorder.flush()  # connected already, as a gateway that has been running is
    for _ in range(49):
        recorder.add("key_1", "m", prompt_tokens=12, completion_tokens=3)
    stalling_redis.proc.send_signal(signal.SIGSTOP)
    try:
        await recorder.flush()  # times out; Redis holds what it was sent, to run when it wakes
    finally:
        stalling_redis.proc.send_signal(signal.SIGCONT)
    await recorder.flush()  # the retry
    hour = hour_of(time.time())
    assert dict(await store.usage(hour, hour + 3600))[(hour, "key_1", "m")] == UsageDelta(50, 600, 150, 0)


async def test_a_batch_whose_exec_ran_but_went_unanswered_counts_once(
        stalling_redis: RedisServer, store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # The stall starts the moment the MULTI/EXEC is sent: Redis runs it when it wakes, after the
    # gateway gave up on the answer (the narrowest case; above, it stalls before the flush).
    send = Pipeline._execute_transaction
    stalled: list[bool] = []

    async def stall_then_send(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
        if not stalled:
            stalled.append(True)
            stalling_redis.proc.send_signal(signal.SIGSTOP)
        return await send(self, *args, **kwargs)

    recorder = UsageRecorder(store)
    recorder.add("key_1", "m", prompt_tokens=12)
    await recorder.flush()
    monkeypatch.setattr(Pipeline, "_execute_transaction", stall_then_send)
    for _ in range(9):
        recorder.add("key_1", "m", prompt_tokens=12)
    try:
        await recorder.flush()
    finally:
        stalling_redis.proc.send_signal(signal.SIGCONT)
    assert stalled
    await recorder.flush()
    hour = hour_of(time.time())
    assert dict(await store.usage(hour, hour + 3600))[(hour, "key_1", "m")] == UsageDelta(10, 120, 0, 0)
