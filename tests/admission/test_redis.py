"""What only the Redis admission has: one round trip, replicas sharing limits, leases that expire
when a replica dies, waiting without polling, a keyspace that empties itself, and the circuit
breaker's two failure modes. In one process, several RedisAdmission objects play the replicas."""

from __future__ import annotations

import asyncio
import functools
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError, ResponseError

from gateway import metrics
from gateway.admission import keys
from gateway.admission.redis import RELEASE_GATHER, RedisAdmission
from gateway.errors import BackendUnavailable, RateLimited
from tests.admission.test_contract import WINDOW, Admissions, ticket
from tests.conftest import RedisServer
Make = Callable[..., Awaitable[RedisAdmission]]


@pytest.fixture
async def make(redis_url: str) -> AsyncIterator[Make]:
    admissions = Admissions()
    yield functools.partial(admissions.redis, redis_url)
    await admissions.close()


def count_commands(admission: RedisAdmission) -> list[str]:
    """Every command the admission sends from now on, but the listener's: its scripts (EVALSHA,
    on their own connection) and the rest (on its non-blocking redis-py client)."""
    sent: list[str] = []
    client, scripts = admission._redis, admission._scripts
    command, script = client.execute_command, scripts.run

    async def counting(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]))
        return await command(*args, **options)

    async def counting_script(name: str, args: Any) -> Any:
        sent.append("EVALSHA")
        return await script(name, args)

    client.execute_command = counting  # type: ignore[method-assign]
    scripts.run = counting_script  # type: ignore[method-assign]
    return sent


async def adm_keys(redis_url: str) -> dict[str, int]:
    """gw:adm:* key -> its TTL in ms."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        return {k.decode(): await client.pttl(k) async for k in client.scan_iter(keys.PREFIX + "*")}
    finally:
        await client.aclose()


async def test_uncontended_admission_is_one_round_trip(make: Make) -> None:
    admission = await make(lease_ttl=30)
    sent = count_commands(admission)
    lease = await admission.acquire(ticket(rpm=100, tpm=10_000, max_concurrency=5))
    assert sent == ["EVALSHA"]
    assert lease.usage.rpm_remaining == 99 and lease.usage.tpm_remaining == 10_000 - 10
    await lease.release()


async def test_acquires_that_arrive_together_share_one_round_trip(make: Make, redis_url: str) -> None:
    admission = await make(lease_ttl=30, max_depth=50)
    sent = count_commands(admission)
    tasks = [asyncio.create_task(admission.acquire(ticket(backends=(("b1", 8),)))) for _ in range(20)]
    done, waiting = await asyncio.wait(tasks, timeout=2)
    # The first goes at once, alone; the nineteen that came while it was on its way go together
    # in one more call: eight granted in all, the rest queued, each as if it had asked alone.
    assert sent == ["EVALSHA", "EVALSHA"] and len(done) == 8 and len(waiting) == 12
    for task in done:
        await task.result().release()
    done, waiting = await asyncio.wait(waiting, timeout=2)
    assert len(done) == 8 and len(waiting) == 4
    leases = [task.result() for task in done]
    for lease in leases:
        await lease.release()
    for lease in await asyncio.gather(*waiting):
        await lease.release()
    assert len(sent) < 20, sent


async def test_a_request_that_leaves_while_its_acquire_is_on_the_way_gives_back_what_it_got(
        make: Make, redis_url: str) -> None:
    admission = await make(lease_ttl=30)
    other = aioredis.Redis.from_url(redis_url)
    sent = count_commands(admission)
    try:
        await other.client_pause(400)  # Redis holds every call for 0.4 s
        on_the_way = asyncio.create_task(admission.acquire(ticket(backends=(("b1", 1),))))
        await asyncio.sleep(0.1)
        not_sent_yet = asyncio.create_task(admission.acquire(ticket(backends=(("b1", 1),))))
        await asyncio.sleep(0.1)
        for task in (on_the_way, not_sent_yet):
            task.cancel()
        await asyncio.gather(on_the_way, not_sent_yet, return_exceptions=True)
        # The slot the first call won goes back as soon as its answer comes, not when the lease
        # would expire (30 s); the second acquire was never sent.
        lease = await admission.acquire(ticket(backends=(("b1", 1),), max_wait=2))
        await lease.release()
        assert sent.count("EVALSHA") <= 3, sent  # the first acquire, its release, the last acquire
    finally:
        await other.aclose()
    deadline = time.monotonic() + RELEASE_GATHER + 0.5
    while any(k.split(":")[2] not in ("log", "cost", "vt", "vnow") for k in await adm_keys(redis_url)):
        assert time.monotonic() < deadline, await adm_keys(redis_url)
        await asyncio.sleep(0.02)


async def test_a_request_that_leaves_while_its_batch_is_on_the_way_gets_its_grant_given_back(
        make: Make, redis_url: str) -> None:
    admission = await make(lease_ttl=30)
    held = [asyncio.Event(), asyncio.Event()]  # set when acquire call 1 / 2 reaches the client
    go = [asyncio.Event(), asyncio.Event()]  # when it may go on to Redis
    sent: list[str] = []
    original = admission._scripts.run

    async def gated(name: str, args: Any) -> Any:
        sent.append("EVALSHA")
        if sent.count("EVALSHA") <= 2:
            call = sent.count("EVALSHA") - 1
            held[call].set()
            await go[call].wait()
        return await original(name, args)

    admission._scripts.run = gated  # type: ignore[method-assign]
    two_slots = ticket(backends=(("b1", 2),), max_wait=2)
    first = asyncio.create_task(admission.acquire(two_slots))  # goes at once: call 1
    await held[0].wait()
    batched = asyncio.create_task(admission.acquire(two_slots))  # waits for call 2
    await asyncio.sleep(0)
    go[0].set()
    await held[1].wait()  # call 2, with `batched`, is on its way
    never_sent = asyncio.create_task(admission.acquire(two_slots))  # would go in call 3
    await asyncio.sleep(0)
    batched.cancel()
    never_sent.cancel()
    await asyncio.gather(batched, never_sent, return_exceptions=True)
    go[1].set()
    lease = await first
    # Call 2 granted the second slot to a request that had left: it goes back when the answer
    # comes (not when the lease would expire, 30 s), and call 3 is never made.
    again = await admission.acquire(two_slots)
    assert sent.count("EVALSHA") <= 4, sent  # call 1, call 2, the give-back, the last acquire
    for held_lease in (lease, again):
        await held_lease.release()


async def test_the_requests_of_one_call_keep_their_arrival_order(make: Make) -> None:
    # They share the server's clock in the queue, so the entries' names must sort as they came.
    admission = await make(lease_ttl=30, max_depth=50)
    holder = await admission.acquire(ticket(backends=(("b1", 1),)))
    order: list[int] = []

    async def wait(i: int) -> None:
        lease = await admission.acquire(ticket(backends=(("b1", 1),), max_wait=10))
        order.append(i)
        await asyncio.sleep(0.005)
        await lease.release()

    tasks = [asyncio.create_task(wait(i)) for i in range(20)]  # all queued: one call, then one
    await asyncio.sleep(0.2)
    await holder.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert order == list(range(20))


async def test_replicas_share_limits_and_grants_reach_the_other_replica(make: Make) -> None:
    one, two = await make(), await make()
    assert one.replica != two.replica
    first = await one.acquire(ticket(rpm=3))
    second = await two.acquire(ticket(rpm=3))
    assert second.usage.rpm_remaining == 1  # the window is one, in Redis
    holder = await one.acquire(ticket(backends=(("b2", 1),)))
    waiting = asyncio.create_task(two.acquire(ticket("k2", backends=(("b2", 1),))))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    released = time.monotonic()
    await holder.release()  # one's dispatch grants two's waiter: through two's notify list
    lease = await asyncio.wait_for(waiting, 2)
    assert time.monotonic() - released < 0.5
    third = await one.acquire(ticket(rpm=3, max_wait=0.1))
    with pytest.raises(RateLimited):
        await two.acquire(ticket(rpm=3, max_wait=0.1))
    for each in (first, second, third, lease):
        await each.release()


async def test_a_dead_replicas_slots_and_entries_expire_within_the_ttl(make: Make) -> None:
    ttl = 1.5
    dead, alive = await make(lease_ttl=ttl), await make(lease_ttl=ttl)
    await dead.acquire(ticket(backends=(("b1", 2),)))
    await dead.acquire(ticket(backends=(("b1", 2),)))
    queued = asyncio.create_task(dead.acquire(ticket(backends=(("b1", 2),), max_wait=30)))
    await asyncio.sleep(0.1)
    for task in dead._loops:  # SIGKILL, as far as Redis can tell: nothing is renewed or released again
        task.cancel()
    killed = time.monotonic()
    waiter = asyncio.create_task(alive.acquire(ticket("k2", backends=(("b1", 2),), max_wait=30)))
    lease = await asyncio.wait_for(waiter, ttl + 2)
    assert time.monotonic() - killed <= ttl + 0.5
    assert lease.waited >= ttl * 0.5  # it did wait for the dead replica's leases
    queued.cancel()
    await lease.release()


async def test_waiting_is_not_polling(make: Make) -> None:
    """A waiter held for seconds costs a handful of calls: the timer wakes at the window's edge."""
    admission = await make(lease_ttl=30)
    await (await admission.acquire(ticket(rpm=1))).release()
    sent = count_commands(admission)
    started = time.monotonic()
    lease = await admission.acquire(ticket(rpm=1, max_wait=5))
    assert WINDOW * 0.9 <= time.monotonic() - started < WINDOW + 0.5
    assert len(sent) <= 3, sent  # acquire (queued), the timer's dispatch (granted); never a loop
    await lease.release()


async def test_nothing_is_left_in_redis(make: Make, redis_url: str) -> None:
    ttl = 1.0
    one, two = await make(lease_ttl=ttl, max_depth=50), await make(lease_ttl=ttl, max_depth=50)

    async def use(admission: RedisAdmission, i: int) -> None:
        try:
            lease = await admission.acquire(ticket(f"k{i % 3}", backends=(("b1", 2), ("b2", 1)), max_wait=0.3 + i % 2,
                                                   rpm=30, tpm=2000, max_concurrency=2))
        except (RateLimited, BackendUnavailable):
            return
        await asyncio.sleep(0.01)
        await lease.settle(i % 20)
        await lease.release()

    tasks = [asyncio.create_task(use(one if i % 2 else two, i)) for i in range(80)]
    await asyncio.sleep(0.05)
    tasks[-1].cancel()  # a cancel in the middle of it all
    await asyncio.gather(*tasks, return_exceptions=True)

    async def lasting() -> tuple[dict[str, int], set[str]]:
        left = await adm_keys(redis_url)
        return left, {k for k in left if k.split(":")[2] not in ("log", "cost", "vt", "vnow")}

    # Releases ride along with the next acquire or go on their own after RELEASE_GATHER: allow
    # that and a round trip, far less than the lease TTL an orphan would take.
    deadline = time.monotonic() + RELEASE_GATHER + 0.2
    left, held = await lasting()
    while held and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        left, held = await lasting()
    assert not held, held  # no slot, queue entry or notification outlives its request
    assert all(0 < ms <= (WINDOW + 1) * 1000 for ms in left.values()), left
    await asyncio.sleep(ttl + 0.2)
    assert {k.split(":")[2] for k in await adm_keys(redis_url)} <= {"log", "cost"}
    await asyncio.sleep(WINDOW + 1)
    assert await adm_keys(redis_url) == {}


async def test_the_rate_log_keeps_an_exact_token_sum(make: Make, redis_url: str) -> None:
    admission = await make()
    leases = [await admission.acquire(ticket(cost=100, tpm=1000)) for _ in range(3)]
    await leases[0].settle(40)
    await leases[1].settle(250)
    client = aioredis.Redis.from_url(redis_url)
    cost = keys.key(keys.COST, "k1")
    assert int(await client.hget(cost, "=sum")) == 40 + 250 + 100
    await asyncio.sleep(WINDOW + 0.1)
    fresh = await admission.acquire(ticket(cost=7, tpm=1000))  # the window trims all three, exactly
    assert int(await client.hget(cost, "=sum")) == 7 and fresh.usage.tpm_remaining == 993
    await client.aclose()
    for lease in (*leases, fresh):
        await lease.release()


async def test_fail_closed_refuses_at_once_and_recovers(make: Make, redis_server: RedisServer) -> None:
    admission = await make(probe_interval=0.5)
    await (await admission.acquire(ticket())).release()
    held = await admission.acquire(ticket(backends=(("b1", 1),)))
    queued = asyncio.create_task(admission.acquire(ticket(backends=(("b1", 1),), max_wait=30)))
    await asyncio.sleep(0.1)
    redis_server.kill()
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):  # a waiter does not wait on a dead Redis either
            await asyncio.wait_for(queued, 3)
        assert time.monotonic() - started < 1.0
        for _ in range(3):
            with pytest.raises(BackendUnavailable) as info:
                await admission.acquire(ticket(max_wait=5))
            assert int(info.value.headers["retry-after"]) >= 1
        assert time.monotonic() - started < 1.0  # the open circuit answers without waiting on Redis
        assert admission.describe()["mode"] == "fail_closed" and admission.describe()["redis_reachable"] is False
        assert metrics.redis_up._value.get() == 0
        assert metrics.admission_mode.labels("fail_closed")._value.get() == 1
        await held.release()  # a lease from before the outage goes quietly (it expires in Redis)
    finally:
        redis_server.start()
    deadline = time.monotonic() + 5
    while admission.mode != "redis" and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert admission.mode == "redis" and metrics.redis_up._value.get() == 1
    await (await admission.acquire(ticket(max_wait=1))).release()


async def test_a_redis_that_stops_answering_fails_requests_within_the_bound(
        make: Make, redis_server: RedisServer) -> None:
    # The scripts' client has no socket timeout of its own (see RedisAdmission.__init__): only
    # `_bounded` stands between a silent Redis and a request that waits forever.
    admission = await make(probe_interval=0.5)
    await (await admission.acquire(ticket())).release()
    redis_server.proc.send_signal(signal.SIGSTOP)  # connected, and never answering
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await asyncio.wait_for(admission.acquire(ticket(max_wait=30)), 10)
        assert time.monotonic() - started < 4.0  # the 2 s call bound, not the 10 s guard
        assert admission.mode == "fail_closed"
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 5
    while admission.mode != "redis" and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert admission.mode == "redis"
    await (await admission.acquire(ticket(max_wait=1))).release()


def _pretend_version(admission: RedisAdmission, version: str) -> None:
    real_info = admission._redis.info

    async def info(section: str | None = None, *args: Any, **kwargs: Any) -> Any:
        answer = await real_info(section, *args, **kwargs)
        return {**answer, "redis_version": version} if section == "server" else answer

    admission._redis.info = info  # type: ignore[method-assign]


async def test_a_redis_older_than_7_is_refused_at_start(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, socket_timeout=2.0)
    admission = RedisAdmission(client, max_depth=10)
    _pretend_version(admission, "6.2.14")
    try:
        with pytest.raises(RuntimeError, match=r"needs Redis 7\.0 or newer .* runs 6\.2\.14"):
            await admission.start()
    finally:
        await admission.stop()
        await client.aclose()


async def test_a_redis_older_than_7_found_after_an_outage_keeps_the_circuit_open(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    redis_server.kill()
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=2.0)
    admission = RedisAdmission(client, max_depth=10, probe_interval=0.1)
    try:
        await admission.start()  # Redis is away: the version is checked when it answers
        assert admission.mode == "fail_closed"
        _pretend_version(admission, "6.2.14")
        redis_server.start()
        await asyncio.sleep(1.0)  # several probes
        assert admission.mode == "fail_closed"
        assert any("needs Redis 7.0 or newer" in r.getMessage() for r in caplog.records)
        _pretend_version(admission, "7.2.4")  # upgraded
        deadline = time.monotonic() + 5
        while admission.mode != "redis" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert admission.mode == "redis"
        await (await admission.acquire(ticket(max_wait=1))).release()
    finally:
        await admission.stop()
        await client.aclose()


async def test_local_mode_keeps_to_the_replicas_share(make: Make, redis_server: RedisServer) -> None:
    admission = await make(failure_mode="local", replicas=2, probe_interval=0.5)
    backends = (("b1", 4),)
    await (await admission.acquire(ticket(backends=backends))).release()
    redis_server.kill()
    try:
        for _ in range(3):  # rpm 6 over 2 replicas: 3 here
            lease = await admission.acquire(ticket(backends=backends, rpm=6, max_wait=0.1))
            await lease.release()  # back to the fallback that granted it
        with pytest.raises(RateLimited) as info:
            await admission.acquire(ticket(backends=backends, rpm=6, max_wait=0.1))
        assert info.value.headers["x-ratelimit-limit-requests"] == "3"
        assert admission.describe()["mode"] == "local"
        assert metrics.admission_mode.labels("local")._value.get() == 1
        # and half of each backend's slots: 4 -> 2
        one = await admission.acquire(ticket("k2", backends=backends, max_wait=0.1))
        two = await admission.acquire(ticket("k2", backends=backends, max_wait=0.1))
        with pytest.raises(BackendUnavailable):
            await admission.acquire(ticket("k2", backends=backends, max_wait=0.1))
        await one.release()
        await two.release()
    finally:
        redis_server.start()
    deadline = time.monotonic() + 5
    while admission.mode != "redis" and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert admission.mode == "redis"
    await (await admission.acquire(ticket(backends=backends, max_wait=1))).release()


async def test_the_probe_outlives_an_error_reply_and_closes_the_circuit(make: Make) -> None:
    # A Redis busy with a long script answers with -BUSY: still down, but the probe, the only
    # thing that closes the circuit, must go on (it used to end the listener for good).
    admission = await make(probe_interval=0.1)
    real_set, errors = admission._redis.set, 3

    async def busy_set(*args: Any, **options: Any) -> Any:
        nonlocal errors
        if errors:
            errors -= 1
            raise ResponseError("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSCRIPT.")
        return await real_set(*args, **options)

    admission._redis.set = busy_set  # type: ignore[method-assign]
    admission._trip(ConnectionError("test: Redis went away"))
    assert admission.mode == "fail_closed"
    deadline = time.monotonic() + 5
    while admission.mode != "redis" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert errors == 0 and admission.mode == "redis"
    await (await admission.acquire(ticket(max_wait=1))).release()


async def test_a_redis_that_refuses_writes_keeps_the_circuit_open(make: Make) -> None:
    # Out of memory under noeviction (or demoted to a replica), Redis still answers PING but
    # refuses every admission script: the probe writes, so the circuit does not close (and trip
    # again) at every probe while that lasts.
    admission = await make(probe_interval=0.1)
    real_set, full = admission._redis.set, True

    async def set_while_full(*args: Any, **options: Any) -> Any:
        if full:
            raise OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'.")
        return await real_set(*args, **options)

    admission._redis.set = set_while_full  # type: ignore[method-assign]
    admission._trip(OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'."))
    await asyncio.sleep(0.5)  # five probes
    assert admission.mode == "fail_closed" and await admission._redis.ping()
    full = False
    deadline = time.monotonic() + 5
    while admission.mode != "redis" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert admission.mode == "redis"
    await (await admission.acquire(ticket(max_wait=1))).release()


async def test_an_unreadable_grant_message_does_not_end_the_listener(make: Make, redis_url: str) -> None:
    first = await make()
    second = await make()
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.rpush(keys.key(keys.NOTIFY, first.replica), b"not a grant")
        await asyncio.sleep(0.3)
        # A grant another replica's dispatch sends still arrives.
        held = await second.acquire(ticket(backends=(("b1", 1),)))
        queued = asyncio.create_task(first.acquire(ticket(backends=(("b1", 1),), max_wait=10)))
        await asyncio.sleep(0.2)
        await held.release()
        lease = await asyncio.wait_for(queued, 5)
        await lease.release()
    finally:
        await client.aclose()
