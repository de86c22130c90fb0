"""One admission contract, run against every implementation (in-process memory, and Redis).

Windows are shortened to WINDOW seconds so rate behaviour is observable without minute-long tests.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis

from gateway import metrics
from gateway.admission import Admission, Lease, Limits, MemoryAdmission, Slot, Ticket
from gateway.admission.redis import RedisAdmission
from gateway.app import _rendered
from gateway.errors import BackendUnavailable, ClientClosedRequest, RateLimited

WINDOW = 1.5
MakeAdmission = Callable[..., Awaitable[Admission]]
AdmissionT = TypeVar("AdmissionT", bound=Admission)


class Admissions:
    """The admissions one test builds, all stopped (and their Redis clients closed) after it."""

    def __init__(self) -> None:
        self._made: list[Admission] = []
        self._clients: list[aioredis.Redis] = []

    async def memory(self, max_depth: int = 1000, max_per_key: int | None = None) -> Admission:
        return await self._started(MemoryAdmission(max_depth=max_depth, max_per_key=max_per_key, window=WINDOW))

    async def redis(self, redis_url: str, max_depth: int = 1000, lease_ttl: float = 5.0,
                    **kwargs: Any) -> RedisAdmission:
        client = aioredis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._clients.append(client)
        admission = RedisAdmission(client, max_depth=max_depth, window=WINDOW, lease_ttl=lease_ttl, **kwargs)
        return await self._started(admission)

    async def _started(self, admission: AdmissionT) -> AdmissionT:
        await admission.start()
        self._made.append(admission)
        return admission

    async def close(self) -> None:
        for admission in self._made:
            await admission.stop()
        for client in self._clients:
            await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def make_admission(request: pytest.FixtureRequest) -> AsyncIterator[MakeAdmission]:
    admissions = Admissions()
    if request.param == "memory":
        yield admissions.memory
    else:
        yield functools.partial(admissions.redis, request.getfixturevalue("redis_url"))
    await admissions.close()


def ticket(key: str = "k1", *, backends: tuple[tuple[Any, ...], ...] = (("b1", 4),), cost: int = 10,
           max_wait: float = 5.0, **limits: int) -> Ticket:
    """`backends`: (name, slots) or (name, slots, weight), in the router's order."""
    return Ticket(key_id=key, limits=Limits(**limits), model="m", backends=[Slot(*b) for b in backends],
                  cost=cost, max_wait=max_wait)


async def occupy(admission: Admission, backend: str, n: int) -> list[Lease]:
    """n leases held on `backend` alone (another key's), to load it."""
    return [await admission.acquire(ticket("filler", backends=((backend, 8),))) for _ in range(n)]


async def test_grants_at_once_when_free_and_release_frees(make_admission: MakeAdmission) -> None:
    admission = await make_admission()
    lease = await admission.acquire(ticket(backends=(("b1", 1),)))
    assert lease.backend == "b1" and lease.waited == 0.0
    with pytest.raises(BackendUnavailable):
        await admission.acquire(ticket(backends=(("b1", 1),), max_wait=0.2))
    await lease.release()
    again = await admission.acquire(ticket(backends=(("b1", 1),), max_wait=0.2))
    await again.release()


async def test_least_loaded_backend_is_chosen(make_admission: MakeAdmission) -> None:
    admission = await make_admission()
    backends = (("big", 4), ("small", 1))
    leases = [await admission.acquire(ticket(backends=backends)) for _ in range(5)]
    assert sorted(lease.backend for lease in leases) == ["big"] * 4 + ["small"]
    for lease in leases:
        await lease.release()


async def test_the_routers_pick_is_granted_whenever_it_has_a_free_slot(make_admission: MakeAdmission) -> None:
    # The router put `b` first (a session's affinity, or its weights): `b` gets the request while
    # it has room, though `a` is idler; admission does not re-pick by its own counts.
    admission = await make_admission()
    held = await occupy(admission, "b", 2)
    leases = [await admission.acquire(ticket(backends=(("b", 4, 3.0), ("a", 4, 1.0)))) for _ in range(3)]
    assert [lease.backend for lease in leases] == ["b", "b", "a"]  # b's 4 slots: 2 held, then 2 more
    for lease in held + leases:
        await lease.release()
    # one request at a time: each finds the pick free
    for _ in range(5):
        lease = await admission.acquire(ticket(backends=(("b", 4), ("a", 4))))
        assert lease.backend == "b"
        await lease.release()


async def test_weights_decide_among_the_free_when_the_pick_is_full(make_admission: MakeAdmission) -> None:
    admission = await make_admission()
    held = [*await occupy(admission, "pick", 1), *await occupy(admission, "light", 1),
            *await occupy(admission, "heavy", 2)]
    # light: 1 of 4 slots at weight 1 (1/4); heavy: 2 of 4 slots at weight 3 (2/12): heavy
    lease = await admission.acquire(ticket(backends=(("pick", 1), ("light", 4, 1.0), ("heavy", 4, 3.0))))
    assert lease.backend == "heavy"
    for held_lease in held + [lease]:
        await held_lease.release()


async def test_equal_loads_go_in_the_routers_order(make_admission: MakeAdmission) -> None:
    admission = await make_admission()
    held = await occupy(admission, "pick", 1) + await occupy(admission, "x", 1) + await occupy(admission, "y", 1)
    # x: 1 of 2 slots at weight 2, y: 1 of 4 at weight 1: 1/4 each, so the router's order decides
    leases = [await admission.acquire(ticket(backends=(("pick", 1), ("x", 2, 2.0), ("y", 4, 1.0)))),
              await admission.acquire(ticket(backends=(("pick", 1), ("y", 4, 1.0), ("x", 2, 2.0))))]
    assert [lease.backend for lease in leases] == ["x", "y"]
    for lease in held + leases:
        await lease.release()


async def test_a_queued_request_gets_the_routers_pick_too(make_admission: MakeAdmission) -> None:
    admission = await make_admission()
    running = await admission.acquire(ticket(backends=(("z", 1),), max_concurrency=1))
    held = await occupy(admission, "pick", 3)
    # held back by its key's concurrency, while both backends have room
    waiting = asyncio.create_task(admission.acquire(ticket(backends=(("pick", 4), ("idle", 4)), max_concurrency=1)))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await running.release()
    lease = await asyncio.wait_for(waiting, 2)
    assert lease.backend == "pick"  # its last free slot, though `idle` has all of its own
    for other in held + [lease]:
        await other.release()


async def test_move_prefers_the_first_of_its_candidates(make_admission: MakeAdmission) -> None:
    admission = await make_admission()
    lease = await admission.acquire(ticket(backends=(("failing", 1),)))
    held = await occupy(admission, "next", 1)
    # `next` comes first in the router's order and has room: the failover takes it, not idle `spare`
    assert await lease.move([Slot("failing", 1), Slot("next", 4), Slot("spare", 4)]) == "next"
    for other in held + [lease]:
        await other.release()


async def test_slots_are_never_exceeded(make_admission: MakeAdmission) -> None:
    admission = await make_admission()
    running, peak = 0, 0

    async def one(i: int) -> None:
        nonlocal running, peak
        lease = await admission.acquire(ticket(f"k{i % 5}", backends=(("b1", 3),), max_wait=20))
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        await lease.release()

    await asyncio.gather(*(one(i) for i in range(60)))
    assert peak == 3


async def test_rpm_allows_a_burst_then_holds_the_window(make_admission: MakeAdmission) -> None:
    admission = await make_admission()
    started = time.monotonic()
    for _ in range(3):
        await (await admission.acquire(ticket(rpm=3))).release()
    assert time.monotonic() - started < 0.5  # a fresh key spends its allowance at once
    fourth = await admission.acquire(ticket(rpm=3, max_wait=5))
    assert time.monotonic() - started >= WINDOW * 0.9  # not before the first request left the window
    # the burst left the window together, so only this request counts now
    assert fourth.usage.rpm == 3 and fourth.usage.rpm_remaining == 2
    await fourth.release()


async def test_rate_limited_refusal_tells_the_real_wait(make_admission: MakeAdmission) -> None:
    admission = await make_admission()
    await (await admission.acquire(ticket(rpm=1))).release()
    started = time.monotonic()
    with pytest.raises(RateLimited) as info:
        await admission.acquire(ticket(rpm=1, max_wait=0.2))
    # The window frees later than it may wait: told at once, not after 0.2 s in the queue.
    assert time.monotonic() - started < 0.15
    assert 0.2 < info.value.retry_after <= WINDOW
    assert info.value.headers["x-ratelimit-limit-requests"] == "1"
    assert info.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(info.value.headers["retry-after-ms"]) <= WINDOW * 1000


async def test_tpm_reserves_then_settles_both_ways(make_admission: MakeAdmission) -> None:
    admission = await make_admission()
    first = await admission.acquire(ticket(cost=80, tpm=100))
    with pytest.raises(RateLimited) as info:  # 80 reserved + 30 > 100
        await admission.acquire(ticket(cost=30, tpm=100, max_wait=0.1))
    assert info.value.type == "tokens" and "retry-after" in info.value.headers  # OpenAI's type for a TPM limit
    await first.settle(20)  # refund: it used less than reserved
    second = await admission.acquire(ticket(cost=30, tpm=100, max_wait=0.1))
    await second.settle(70)  # debt: it used more than reserved (20 + 70 = 90 now)
    with pytest.raises(RateLimited):
        await admission.acquire(ticket(cost=20, tpm=100, max_wait=0.1))
    await first.release()
    await second.release()


async def test_request_larger_than_tpm_is_refused_at_once(make_admission: MakeAdmission) -> None:
    admission = await make_admission()
    started = time.monotonic()
    with pytest.raises(RateLimited) as info:
        await admission.acquire(ticket(cost=500, tpm=100, max_wait=5))
    assert time.monotonic() - started < 1.0
    assert "500" in info.value.message and info.value.type == "tokens"
    # No wait would let it pass: nothing tells a client (an SDK sleeps as told, then retries) to wait.
    assert "retry-after" not in info.value.headers and "retry-after-ms" not in info.value.headers


async def test_max_concurrency(make_admission: MakeAdmission) -> None:
    admission = await make_admission()
    a = await admission.acquire(ticket(max_concurrency=1))
    with pytest.raises(RateLimited):
        await admission.acquire(ticket(max_concurrency=1, max_wait=0.1))
    other_key = await admission.acquire(ticket("k2", max_concurrency=1, max_wait=0.1))
    await a.release()
    b = await admission.acquire(ticket(max_concurrency=1, max_wait=0.5))
    for lease in (other_key, b):
        await lease.release()


async def test_queue_depth_is_bounded(make_admission: MakeAdmission) -> None:
    admission = await make_admission(max_depth=2)
    holder = await admission.acquire(ticket(backends=(("b1", 1),)))
    waiting = [asyncio.create_task(admission.acquire(ticket(backends=(("b1", 1),), max_wait=5))) for _ in range(2)]
    await asyncio.sleep(0.2)
    with pytest.raises(RateLimited) as info:
        await admission.acquire(ticket(backends=(("b1", 1),), max_wait=5))
    assert "queue is full" in info.value.message
    await holder.release()
    for task in waiting:
        await (await asyncio.wait_for(task, 5)).release()


async def test_one_key_cannot_take_every_place_in_the_queue(make_admission: MakeAdmission) -> None:
    # The audit's case: a key held by its own rpm sends more; its waiting requests used to fill
    # the whole queue, so another key with no limits on an idle backend got "queue is full".
    admission = await make_admission(max_depth=5, max_per_key=2)
    await (await admission.acquire(ticket("greedy", rpm=1))).release()
    waiting = [asyncio.create_task(admission.acquire(ticket("greedy", rpm=1, max_wait=5))) for _ in range(2)]
    await asyncio.sleep(0.2)
    with pytest.raises(RateLimited) as info:
        await admission.acquire(ticket("greedy", rpm=1, max_wait=5))
    assert "max_per_key" in info.value.message and info.value.headers["retry-after"] == "1"
    other = await asyncio.wait_for(admission.acquire(ticket("other", max_wait=5)), 2)  # still admitted at once
    assert other.waited < 1.0
    await other.release()
    for task in waiting:  # the greedy key's own waiters are untouched: they pass when its window frees
        await (await asyncio.wait_for(task, 5)).release()


async def test_waiting_past_max_wait_for_capacity_is_503(make_admission: MakeAdmission) -> None:
    admission = await make_admission()
    holder = await admission.acquire(ticket(backends=(("b1", 1),)))
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await admission.acquire(ticket(backends=(("b1", 1),), max_wait=0.5))
    assert 0.4 < time.monotonic() - started < 2.0
    await holder.release()


async def test_no_wait_at_all_refuses_at_once_as_a_wait_would(make_admission: MakeAdmission) -> None:
    # queue.max_wait: 0: what cannot be admitted now gets the 503 or 429 a wait ends in, at once.
    admission = await make_admission()
    holder = await admission.acquire(ticket(backends=(("b1", 1),)))
    await (await admission.acquire(ticket("k2", rpm=1, backends=(("b2", 1),), max_wait=0))).release()
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await admission.acquire(ticket(backends=(("b1", 1),), max_wait=0))
    with pytest.raises(RateLimited) as limited:
        await admission.acquire(ticket("k2", rpm=1, backends=(("b2", 1),), max_wait=0))
    assert time.monotonic() - started < 0.5
    assert "1 requests per minute" in limited.value.message and 0 < limited.value.retry_after <= WINDOW
    await holder.release()


def refused_counts() -> tuple[float, float]:
    """(gateway_rate_limited_total{reason="capacity"}, gateway_rejected_total{reason="unavailable"})."""
    value = metrics.REGISTRY.get_sample_value
    return (value("gateway_rate_limited_total", {"model": "m", "reason": "capacity"}) or 0.0,
            value("gateway_rejected_total", {"reason": "unavailable"}) or 0.0)


async def test_a_capacity_refusal_is_counted_once_as_a_refusal(make_admission: MakeAdmission) -> None:
    # Admission counts it in gateway_rate_limited_total; the app, rendering it, counts other 503s
    # on /v1/ as rejections, and used to count this one there too.
    admission = await make_admission()
    holder = await admission.acquire(ticket(backends=(("b1", 1),)))
    before = refused_counts()
    with pytest.raises(BackendUnavailable) as refused:
        await admission.acquire(ticket(backends=(("b1", 1),), max_wait=0.2))
    assert _rendered(refused.value, "POST", "/v1/chat/completions").status == 503
    capacity, unavailable = refused_counts()
    assert (capacity - before[0], unavailable - before[1]) == (1, 0)
    await holder.release()


async def test_priority_orders_a_keys_own_requests(make_admission: MakeAdmission) -> None:
    admission = await make_admission()
    holder = await admission.acquire(ticket(backends=(("b1", 1),)))
    order: list[int] = []

    async def one(priority: int) -> None:
        lease = await admission.acquire(ticket(backends=(("b1", 1),), priority=priority, max_wait=5))
        order.append(priority)
        await lease.release()

    tasks = []
    for priority in (0, 5, 1):
        tasks.append(asyncio.create_task(one(priority)))
        await asyncio.sleep(0.05)  # arrival order 0, 5, 1
    await holder.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == [5, 1, 0]


async def test_a_rate_limited_key_does_not_block_others(make_admission: MakeAdmission) -> None:
    admission = await make_admission()
    await (await admission.acquire(ticket("slow", rpm=1))).release()
    blocked = asyncio.create_task(admission.acquire(ticket("slow", rpm=1, max_wait=5)))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    other = await admission.acquire(ticket("fast", max_wait=5))
    assert time.monotonic() - started < 0.5
    await other.release()
    await (await asyncio.wait_for(blocked, 5)).release()


async def test_light_key_is_not_stuck_behind_a_backlog(make_admission: MakeAdmission) -> None:
    """Start-time fair queuing: 200 queued requests of one key, then 20 of another."""
    admission = await make_admission()
    service = 0.005
    light_waits: list[float] = []

    async def run(key: str, record: list[float] | None) -> None:
        asked = time.monotonic()
        lease = await admission.acquire(ticket(key, backends=(("b1", 1),), max_wait=60))
        if record is not None:
            record.append(time.monotonic() - asked)
        await asyncio.sleep(service)
        await lease.release()

    heavy = [asyncio.create_task(run("heavy", None)) for _ in range(200)]
    await asyncio.sleep(0.2)
    light = [asyncio.create_task(run("light", light_waits)) for _ in range(20)]
    await asyncio.wait_for(asyncio.gather(*light), 30)
    # Behind the backlog it would wait ~200 service times; fair queuing interleaves: the light key's
    # n-th request waits about 2n service times. Its worst wait stays far below the backlog.
    assert max(light_waits) < 200 * service * 0.5, light_waits
    await asyncio.wait_for(asyncio.gather(*heavy), 60)


async def test_disconnect_while_queued_leaves_no_slot_behind(make_admission: MakeAdmission) -> None:
    admission = await make_admission()
    holder = await admission.acquire(ticket(backends=(("b1", 1),)))
    gone = asyncio.Event()
    waiter = asyncio.create_task(admission.acquire(ticket(backends=(("b1", 1),), max_wait=5), gone.wait))
    await asyncio.sleep(0.1)
    gone.set()
    with pytest.raises(ClientClosedRequest):
        await asyncio.wait_for(waiter, 5)
    await holder.release()
    lease = await admission.acquire(ticket(backends=(("b1", 1),), max_wait=0.5))
    await lease.release()


async def test_cancel_racing_a_grant_leaks_nothing(make_admission: MakeAdmission) -> None:
    admission = await make_admission()
    for _ in range(30):
        holder = await admission.acquire(ticket(backends=(("b1", 1),)))
        waiter = asyncio.create_task(admission.acquire(ticket(backends=(("b1", 1),), max_wait=5)))
        await asyncio.sleep(0.01)
        await holder.release()  # grants the waiter ...
        waiter.cancel()  # ... while it is being cancelled
        try:
            lease = await waiter
            await lease.release()
        except asyncio.CancelledError:
            pass
    final = await admission.acquire(ticket(backends=(("b1", 1),), max_wait=1))
    await final.release()


async def test_move_takes_a_slot_on_another_backend(make_admission: MakeAdmission) -> None:
    admission = await make_admission()
    backends = (("a", 1), ("b", 1))
    lease: Lease = await admission.acquire(ticket(backends=backends))
    first = lease.backend
    other = "b" if first == "a" else "a"
    assert await lease.move([Slot(other, 1)]) == other
    # the first backend's slot is free again, the other's is taken
    on_first = await admission.acquire(ticket(backends=((first, 1),), max_wait=0.2))
    with pytest.raises(BackendUnavailable):
        await admission.acquire(ticket(backends=((other, 1),), max_wait=0.2))
    await on_first.release()
    await lease.release()


async def test_failover_waits_for_a_slot_ahead_of_new_requests(make_admission: MakeAdmission) -> None:
    admission = await make_admission()
    failing = await admission.acquire(ticket(backends=(("a", 1),)))
    busy = await admission.acquire(ticket("k2", backends=(("b", 1),)))
    newcomer = asyncio.create_task(admission.acquire(ticket("k3", backends=(("b", 1),), max_wait=5)))
    await asyncio.sleep(0.1)
    moving = asyncio.create_task(failing.move([Slot("b", 1)]))  # its backend died; b is full
    await asyncio.sleep(0.2)
    assert not moving.done()
    await busy.release()
    assert await asyncio.wait_for(moving, 2) == "b" and failing.backend == "b"
    assert not newcomer.done()  # the failover was admitted already: it goes first
    on_a = await admission.acquire(ticket(backends=(("a", 1),), max_wait=0.5))  # a's slot came back
    await failing.release()
    await (await asyncio.wait_for(newcomer, 2)).release()
    await on_a.release()


async def test_failover_without_a_slot_in_time_keeps_its_own(make_admission: MakeAdmission) -> None:
    admission = await make_admission()
    lease = await admission.acquire(ticket(backends=(("a", 1),), max_wait=0.3))
    holder = await admission.acquire(ticket("k2", backends=(("b", 1),)))
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as refused:
        await lease.move([Slot("b", 1)])
    assert refused.value.headers == {"retry-after": "1"}  # as every 503 of the gateway
    assert 0.25 < time.monotonic() - started < 2.0
    assert lease.backend == "a"
    with pytest.raises(BackendUnavailable):  # still held by the lease
        await admission.acquire(ticket(backends=(("a", 1),), max_wait=0.1))
    await lease.release()
    await holder.release()
    for name in ("a", "b"):
        await (await admission.acquire(ticket(backends=((name, 1),), max_wait=0.5))).release()


async def test_release_settles_in_the_same_step(make_admission: MakeAdmission) -> None:
    admission = await make_admission()
    first = await admission.acquire(ticket(cost=80, tpm=100))
    await first.release(tokens=20)  # used 20 of the 80 reserved
    second = await admission.acquire(ticket(cost=70, tpm=100, max_wait=0.1))  # 20 + 70 <= 100
    await second.release(tokens=90)  # debt: 20 + 90 = 110 in the window now
    with pytest.raises(RateLimited):
        await admission.acquire(ticket(cost=1, tpm=100, max_wait=0.1))
