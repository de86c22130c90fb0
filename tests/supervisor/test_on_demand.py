"""Supervisor.ensure_ready in-process, against real fake runtimes: on-demand start shared by
concurrent callers, idle stop, exclusive groups that never cut off a request in flight."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest

from gateway.errors import BackendUnavailable
from gateway.supervisor import Backend, State
from tests.helpers import alive
from tests.supervisor.conftest import MakeSupervisor
from tests.supervisor.support import fake, until

pytestmark = pytest.mark.timeout(120)


async def test_twenty_concurrent_callers_share_one_start(supervise: MakeSupervisor) -> None:
    sup = await supervise(fake("lazy", start="on_demand"))
    backend = sup.backends["lazy"]
    assert backend.state is State.STOPPED and backend.startable and not backend.ready
    await asyncio.wait_for(asyncio.gather(*(sup.ensure_ready([backend], 10) for _ in range(20))), 15)
    assert backend.ready
    assert backend.process is not None and backend.process.starts == 1
    await sup.ensure_ready([backend], 1)  # ready already: returns at once, starts nothing
    assert backend.process.starts == 1


async def test_idle_ttl_stops_it_and_the_next_caller_starts_it_again(supervise: MakeSupervisor) -> None:
    sup = await supervise(fake("nap", start="on_demand", idle_ttl="0.6s"))
    backend = sup.backends["nap"]
    await sup.ensure_ready([backend], 10)
    assert backend.process is not None
    pid = backend.process.pid
    assert pid is not None
    # in use (as the request path counts it): not stopped however long it takes
    backend.inflight, backend.last_used = 1, time.monotonic()
    await asyncio.sleep(1.0)
    assert backend.ready
    backend.inflight, backend.last_used = 0, time.monotonic()
    started = time.monotonic()
    assert await until(lambda: backend.state is State.STOPPED, 5)
    assert 0.6 <= time.monotonic() - started < 4
    assert "idle for 0.6s" in backend.reason and backend.startable
    assert not alive(pid)
    await sup.ensure_ready([backend], 10)
    assert backend.ready and backend.process.starts == 2


async def test_failed_or_unstartable_backends_raise_at_once(supervise: MakeSupervisor) -> None:
    sup = await supervise(fake("broken", "exit", crash_limit=1), fake("eager-stopped"))
    broken, stopped = sup.backends["broken"], sup.backends["eager-stopped"]
    await sup.operate(stopped, "stop")  # an eager backend the operator stopped: no request starts it
    assert await until(lambda: broken.state is State.FAILED, 5)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        await sup.ensure_ready([broken, stopped], 20, model="m")
    assert time.monotonic() - started < 1.5
    assert "`m`" in info.value.message and "eager-stopped is stopped" in info.value.message
    assert "failed to load model" not in info.value.message  # reasons are for operators


async def test_an_on_demand_backend_the_operator_stopped_stays_stopped(supervise: MakeSupervisor) -> None:
    # The audit's case: an operator stopping an on-demand model to free its GPU saw the next
    # request start it again.
    sup = await supervise(fake("lazy", start="on_demand"))
    backend = sup.backends["lazy"]
    await sup.ensure_ready([backend], 10)
    await sup.operate(backend, "stop")
    assert backend.state is State.STOPPED
    with pytest.raises(BackendUnavailable):
        await sup.ensure_ready([backend], 5, model="m")
    assert backend.state is State.STOPPED and backend.process.starts == 1
    await sup.operate(backend, "start")  # the operator's start lifts it: requests start it again
    assert backend.ready
    await sup.operate(backend, "stop")
    await sup.operate(backend, "restart")
    assert backend.ready and not backend.held


async def test_a_start_slower_than_the_timeout_raises_and_goes_on(supervise: MakeSupervisor) -> None:
    sup = await supervise(fake("sluggish", start="on_demand", env={"FAKE_LOAD_SECONDS": "1.5"}))
    backend = sup.backends["sluggish"]
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="became ready within 0.5s"):
        await sup.ensure_ready([backend], 0.5, model="m")
    assert 0.5 <= time.monotonic() - started < 1.5
    await sup.ensure_ready([backend], 10)  # the same start, still on its way
    assert backend.process is not None and backend.process.starts == 1


async def test_no_wait_at_all_raises_at_once_and_the_start_goes_on(supervise: MakeSupervisor) -> None:
    # queue.max_wait: 0: the request that finds the backend stopped is refused at once; the start
    # it asked for goes on, for the requests after it.
    sup = await supervise(fake("lazy", start="on_demand"))
    backend = sup.backends["lazy"]
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="became ready within 0s"):
        await sup.ensure_ready([backend], 0, model="m")
    assert time.monotonic() - started < 0.5
    assert await until(lambda: backend.ready, 10)
    assert backend.process is not None and backend.process.starts == 1


async def test_a_crash_while_serving_is_waited_for(supervise: MakeSupervisor) -> None:
    sup = await supervise(fake("phoenix", restart_backoff="0.3s"))
    backend = sup.backends["phoenix"]
    assert backend.process is not None and backend.process.pid
    os.kill(backend.process.pid, signal.SIGKILL)
    assert await until(lambda: backend.state is State.FAILED, 5)
    await sup.ensure_ready([backend], 10)
    assert backend.ready and backend.process.restarts == 1


async def _stream(backend: Backend, session: aiohttp.ClientSession, events: list[tuple[float, str]]) -> list[str]:
    """One streamed chat request to `backend`, counted in flight the way the request path does."""
    backend.inflight += 1
    backend.last_used = time.monotonic()
    pieces: list[str] = []
    try:
        body = {"model": "x", "messages": [{"role": "user", "content": "tell me"}], "stream": True}
        async with session.post(backend.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            async for raw in resp.content:
                line = raw.decode().strip()
                if line.startswith("data:"):
                    pieces.append(line[5:].strip())
                    if len(pieces) == 2:
                        events.append((time.monotonic(), "first chunks"))
        events.append((time.monotonic(), "stream done"))
        return pieces
    finally:
        backend.inflight -= 1
        backend.last_used = time.monotonic()


async def test_exclusive_group_swap_drains_the_running_member_first(supervise: MakeSupervisor) -> None:
    slow = {"FAKE_TOKEN_DELAY": "0.05", "FAKE_OUTPUT_WORDS": "30"}
    sup = await supervise(fake("a", group="gpu0", env=slow), fake("b", group="gpu0", env=slow))
    a, b = sup.backends["a"], sup.backends["b"]
    assert a.ready and b.state is State.STOPPED  # eager members of one group: only the first runs
    events: list[tuple[float, str]] = []
    async with aiohttp.ClientSession() as session:
        streaming = asyncio.create_task(_stream(a, session, events))
        assert await until(lambda: bool(events), 5)
        await sup.ensure_ready([b], 20)
        events.append((time.monotonic(), "b ready"))
        pieces = await streaming
    order = [what for _, what in sorted(events)]
    assert order == ["first chunks", "stream done", "b ready"], order
    assert pieces[-1] == "[DONE]" and len(pieces) >= 30  # every chunk arrived, then the end
    assert a.state is State.STOPPED and "made way for b" in a.reason
    assert b.ready and a.process is not None and a.process.starts == 1


async def test_a_draining_member_takes_no_new_requests(supervise: MakeSupervisor) -> None:
    sup = await supervise(fake("a", group="g"), fake("b", group="g"))
    a, b = sup.backends["a"], sup.backends["b"]
    a.inflight = 1  # a request in flight on a
    swap = asyncio.create_task(sup.ensure_ready([b], 20))
    assert await until(lambda: a.draining, 5)
    assert not a.ready and a.state is State.READY  # still serving what it has, but routed nothing new
    waiter = asyncio.create_task(sup.ensure_ready([a], 20))  # a request for a meanwhile waits
    await asyncio.sleep(0.3)
    assert not swap.done() and not waiter.done()
    a.inflight = 0
    await asyncio.wait_for(swap, 10)
    b.last_used = time.monotonic()  # the waiting request reaches b (the request path does this)
    # the waiter for a swaps back once b is up (b is idle: nothing to drain)
    await asyncio.wait_for(waiter, 10)
    assert a.ready and b.state is State.STOPPED

