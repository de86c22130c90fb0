"""An operator's stop of a backend that is still starting takes effect at once: the start is
abandoned (it used to hold the group's lock, and so the stop, for up to startup_timeout), its
waiters fail, and nothing but the operator starts the backend again."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.errors import BackendUnavailable
from gateway.supervisor import State
from tests.helpers import alive
from tests.supervisor.conftest import MakeSupervisor
from tests.supervisor.support import fake, until

pytestmark = pytest.mark.timeout(120)

# A big model: loading takes a minute, and startup_timeout allows it.
SLOW_START = {"startup_timeout": "60s", "env": {"FAKE_LOAD_SECONDS": "60"}}


async def test_a_stop_abandons_an_on_demand_start_at_once(supervise: MakeSupervisor) -> None:
    sup = await supervise(fake("big", start="on_demand", **SLOW_START))
    backend, proc = sup.backends["big"], sup.backends["big"].process
    assert proc is not None
    waiter = asyncio.create_task(sup.ensure_ready([backend], 90, model="m"))
    assert await until(lambda: backend.state is State.STARTING and proc.pid is not None, 10)
    pid = proc.pid
    assert pid is not None
    started = time.monotonic()
    await asyncio.wait_for(sup.operate(backend, "stop"), 15)
    assert time.monotonic() - started < 10
    assert backend.state is State.STOPPED and backend.held
    assert await until(lambda: not alive(pid), 5)
    with pytest.raises(BackendUnavailable, match="big is stopped"):
        await asyncio.wait_for(waiter, 5)
    # Held: the next request does not start it again.
    with pytest.raises(BackendUnavailable):
        await asyncio.wait_for(sup.ensure_ready([backend], 5, model="m"), 2)
    assert backend.state is State.STOPPED and proc.starts == 1


async def test_a_stop_of_a_starting_group_member_frees_the_group_at_once(supervise: MakeSupervisor) -> None:
    sup = await supervise(fake("small", group="gpu"), fake("big", group="gpu", **SLOW_START))
    small, big = sup.backends["small"], sup.backends["big"]
    assert small.ready and big.state is State.STOPPED and big.process is not None
    waiter = asyncio.create_task(sup.ensure_ready([big], 90))
    assert await until(lambda: big.state is State.STARTING, 10)
    assert small.state is State.STOPPED  # swapped out first
    await asyncio.wait_for(sup.operate(big, "stop"), 15)
    with pytest.raises(BackendUnavailable):
        await asyncio.wait_for(waiter, 5)
    # The group's lock is free: a request for the other member brings it back now.
    await asyncio.wait_for(sup.ensure_ready([small], 20), 25)
    assert small.ready and big.state is State.STOPPED and big.held and big.process.starts == 1


async def test_a_member_stopped_while_its_group_drains_for_it_is_not_started(supervise: MakeSupervisor) -> None:
    sup = await supervise(fake("a", group="g"), fake("b", group="g"))
    a, b = sup.backends["a"], sup.backends["b"]
    assert a.ready and b.process is not None
    a.inflight = 1  # a request in flight on a: the swap to b waits for it, holding the group's lock
    swap = asyncio.create_task(sup.ensure_ready([b], 20))
    assert await until(lambda: a.draining, 5)
    stop = sup.operate(b, "stop")  # b is stopped still; the stop waits for the lock
    await asyncio.sleep(0.2)
    a.inflight = 0
    await asyncio.wait_for(stop, 10)
    with pytest.raises(BackendUnavailable):
        await asyncio.wait_for(swap, 10)
    assert b.state is State.STOPPED and b.held and b.process.starts == 0
