"""What only the in-process admission has: it forgets keys once nothing of theirs can count any
more, without forgetting a limit, and its dispatch looks only at keys with something queued.

Time is moved on by a clock that runs with the real one plus jumps (the admission's `clock`), so a
window passes at once while the event loop's timers still see real time go by.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gateway.admission import memory
from gateway.admission.memory import MemoryAdmission, _Key
from gateway.errors import RateLimited
from tests.admission.test_contract import ticket


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def jump(self, seconds: float) -> None:
        self.offset += seconds


async def drain(admission: MemoryAdmission, key: str, keys: int) -> None:
    """Ordinary traffic from one key: each acquire and release forgets up to a batch of keys."""
    for _ in range(keys // memory._PRUNE_BATCH + 2):
        await (await admission.acquire(ticket(key))).release()


async def test_keys_are_forgotten_once_their_window_has_passed() -> None:
    clock = Clock()
    admission = MemoryAdmission(max_depth=100, clock=clock, window=60)
    for i in range(2000):  # each made requests a minute ago and went quiet
        lease = await admission.acquire(ticket(f"gone{i}", rpm=100, tpm=10_000))
        await lease.release(tokens=5)
    assert len(admission._keys) == 2000
    clock.jump(61)
    await drain(admission, "probe", 2000)
    assert list(admission._keys) == ["probe"]
    held = await admission.acquire(ticket("probe"))
    clock.jump(61)
    await held.release()  # the last release, once its own window passed, leaves nothing behind
    assert not admission._keys and not admission._backlogged


async def test_a_key_inside_its_window_stays_limited_while_others_go() -> None:
    clock = Clock()
    window = 2.0
    admission = MemoryAdmission(max_depth=100, clock=clock, window=window)
    for i in range(1000):
        await (await admission.acquire(ticket(f"gone{i}"))).release()
    clock.jump(1.0)
    await (await admission.acquire(ticket("limited", rpm=1))).release()  # its window ends 2 s from here
    clock.jump(1.5)  # the others' windows have passed; "limited" has about 0.5 s of its own left
    await drain(admission, "probe", 1000)
    assert set(admission._keys) == {"limited", "probe"}
    with pytest.raises(RateLimited) as info:  # refused as before, telling the real wait
        await admission.acquire(ticket("limited", rpm=1, max_wait=0))
    assert 0.2 < info.value.retry_after <= 0.5
    assert info.value.headers["x-ratelimit-remaining-requests"] == "0"
    # queued as before: granted by the timer when its window frees, not before
    asked = time.monotonic()
    lease = await asyncio.wait_for(admission.acquire(ticket("limited", rpm=1, max_wait=5)), 5)
    assert time.monotonic() - asked > 0.2 and lease.waited > 0.2
    assert lease.usage.rpm_remaining == 0
    await lease.release()


async def test_a_limited_key_at_the_front_keeps_its_state() -> None:
    """The oldest key still inside its window stops the pruning walk and keeps its log."""
    clock = Clock()
    admission = MemoryAdmission(max_depth=100, clock=clock, window=60)
    lease = await admission.acquire(ticket("limited", cost=90, tpm=100))
    await lease.release(tokens=90)
    clock.jump(30)
    for i in range(200):
        await (await admission.acquire(ticket(f"other{i}"))).release()
    assert next(iter(admission._keys)) == "limited"
    with pytest.raises(RateLimited) as info:
        await admission.acquire(ticket("limited", cost=20, tpm=100, max_wait=0))
    assert 29 < info.value.retry_after <= 30
    assert admission._keys["limited"].token_sum == 90
    clock.jump(61)  # now every window has passed: it goes, and comes back as a fresh key
    await drain(admission, "probe", 201)
    assert list(admission._keys) == ["probe"]
    again = await admission.acquire(ticket("limited", cost=20, tpm=100, max_wait=0))
    assert again.usage.tpm_remaining == 80
    await again.release()


async def test_busy_keys_are_never_forgotten() -> None:
    clock = Clock()
    admission = MemoryAdmission(max_depth=100, clock=clock, window=1)
    running = await admission.acquire(ticket("running", backends=(("b1", 1),)))
    queued = asyncio.create_task(admission.acquire(ticket("queued", backends=(("b1", 1),), max_wait=5)))
    await asyncio.sleep(0.05)
    clock.jump(10)  # both long past their windows (one never had a grant), but busy
    await drain(admission, "probe", 10)
    assert {"running", "queued"} <= set(admission._keys) and list(admission._backlogged) == ["queued"]
    await running.release()
    lease = await asyncio.wait_for(queued, 2)
    assert lease.backend == "b1" and not admission._backlogged
    await lease.release()


class _Watched(_Key):
    """An idle key that counts how often admission looks at its queue."""

    looks = 0

    @property  # type: ignore[override]
    def queue(self) -> Any:
        _Watched.looks += 1
        return self.__dict__["queue"]

    @queue.setter
    def queue(self, value: Any) -> None:
        self.__dict__["queue"] = value


async def test_dispatch_with_thousands_of_idle_keys_grants_the_one_queued() -> None:
    admission = MemoryAdmission(max_depth=100)  # a real minute: the idle keys all stay
    for i in range(5000):
        await (await admission.acquire(ticket(f"idle{i}", rpm=10))).release()
    for i in range(5000):
        admission._keys[f"idle{i}"].__class__ = _Watched
    _Watched.looks = 0
    holder = await admission.acquire(ticket("holder", backends=(("b1", 1),)))
    waiting = asyncio.create_task(admission.acquire(ticket("waiting", backends=(("b1", 1),), max_wait=5)))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await holder.release()
    lease = await asyncio.wait_for(waiting, 2)
    assert lease.backend == "b1" and lease.waited > 0
    await lease.release()
    # Every dispatch used to look at all 5000 idle keys; now none of them is looked at.
    assert _Watched.looks < 10, _Watched.looks
    assert not admission._backlogged and admission._waiting == 0 and len(admission._keys) == 5002
