"""Admission in one process: the embedded default, and a Redis replica's fallback for its share.

All state lives on the event loop, so every decision is atomic without locks. Waiters are woken
by the event that can admit them (a release, a refund, or a timer at the moment a rate window
frees up), never by polling.

Keys are forgotten once nothing of theirs is left that could still count: see `_prune`.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway import metrics
from gateway.admission.base import WINDOW, Admission, Disconnected, Lease, Slot, Ticket, Usage
from gateway.errors import BackendUnavailable, ClientClosedRequest, RateLimited


@dataclass(frozen=True)
class _Scaled:
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None


@dataclass
class _Key:
    requests: deque[float] = field(default_factory=deque)  # grant times within the window
    tokens: deque[list[object]] = field(default_factory=deque)  # [time, lease id, amount]
    token_sum: int = 0
    running: int = 0
    vtime: float = 0.0  # start-time fair queuing: service received, in token cost
    queue: list[_Waiter] = field(default_factory=list)  # sorted by (-priority, arrival)
    seen: int = 0  # creation order: breaks vtime ties between keys, first seen first


@dataclass(eq=False)
class _Waiter:
    ticket: Ticket
    order: tuple[int, int]
    future: asyncio.Future[MemoryLease]
    enqueued: float
    blocked: str = "capacity"  # what held it last: rpm, tpm, concurrency or capacity

    def __lt__(self, other: _Waiter) -> bool:
        return self.order < other.order


@dataclass(eq=False)
class _Mover:
    """A lease failing over, waiting for a slot on another backend (keeps its current one meanwhile)."""

    lease: MemoryLease
    backends: list[Slot]
    future: asyncio.Future[str]


class MemoryLease(Lease):
    def __init__(self, owner: MemoryAdmission, key_id: str, lease_id: int, backend: str, usage: Usage,
                 waited: float, max_wait: float = 0.0) -> None:
        super().__init__(backend=backend, usage=usage, waited=waited)
        self._owner, self._key_id, self._id = owner, key_id, lease_id
        self._max_wait = max_wait  # how long a failover may wait for a slot
        self._released = False

    async def settle(self, tokens: int) -> None:
        self._owner._settle(self._key_id, self._id, tokens)

    async def move(self, backends: Sequence[Slot]) -> str:
        return await self._owner._move(self, backends)

    async def release(self, tokens: int | None = None) -> None:
        if not self._released:
            self._released = True
            if tokens is not None:  # the release below dispatches once for both
                self._owner._settle(self._key_id, self._id, tokens, dispatch=False)
            self._owner._release(self._key_id, self.backend)


# The most keys one call to `_prune` looks at: the work any one request pays for forgetting keys
# stays constant, and still outpaces the at most one key each request can add.
_PRUNE_BATCH = 64


def _fair_order(item: tuple[str, _Key]) -> tuple[float, int]:
    return item[1].vtime, item[1].seen


class MemoryAdmission(Admission):
    mode = "memory"

    def __init__(self, *, max_depth: int, max_per_key: int | None = None, clock: Callable[[], float] = time.monotonic,
                 share: float = 1.0, window: float = WINDOW) -> None:
        self._max_depth = max_depth
        self._max_per_key = max_depth if max_per_key is None else max_per_key
        self._window = window
        self._clock = clock
        # A Redis replica in `local` fallback enforces its share of each limit (1 / replicas).
        self._share = share
        # key id -> its state, least recently asked for first (see `_prune`).
        self._keys: OrderedDict[str, _Key] = OrderedDict()
        self._backlogged: dict[str, _Key] = {}  # the keys with a non-empty queue: all `_dispatch` looks at
        self._seen = itertools.count()
        self._prune_at = 0.0  # no key can be forgotten before then (the front key's window ends)
        self._used: dict[str, int] = defaultdict(int)  # backend -> slots taken
        self._waiting = 0
        self._movers: list[_Mover] = []  # failovers waiting for a slot: served before new requests
        self._vnow = 0.0
        self._ids = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None

    # --- the request's side ------------------------------------------------------------------

    async def start(self) -> None:
        show_mode("memory", redis_up=None)

    async def acquire(self, ticket: Ticket, disconnected: Disconnected | None = None) -> Lease:
        limits = self._scaled(ticket)
        if limits.tpm is not None and ticket.cost > limits.tpm:
            raise too_large(ticket, limits.tpm)
        now = self._clock()
        if now >= self._prune_at:
            self._prune(now)
        key = self._keys.get(ticket.key_id)
        if key is None:
            key = self._keys[ticket.key_id] = _Key(seen=next(self._seen))
        else:
            self._keys.move_to_end(ticket.key_id)
        if self._waiting == 0:  # nobody queued: the common, uncontended case
            if self._blocked(key, ticket, now) is None and (backend := self._free_slot(ticket.backends)):
                return self._grant(key, ticket, backend, now, waited=0.0)
        if self._waiting >= self._max_depth:
            raise self._refusal(ticket, key, "queue_full", now)
        if ticket.max_wait <= 0:
            raise self._refusal(ticket, key, self._blocked(key, ticket, now) or "capacity", now)
        if len(key.queue) >= self._max_per_key:
            raise self._refusal(ticket, key, "key_queue_full", now)
        if self._blocked(key, ticket, now) == "rpm" and self._retry_after(key, ticket, "rpm", now) > ticket.max_wait:
            # Its key's window frees later than it may wait: told now, with the real wait, rather
            # than after max_wait in a queue place. (Only rpm: a grant never leaves the window
            # early, where tokens can come back before their time when a request settles.)
            raise self._refusal(ticket, key, "rpm", now)
        waiter = _Waiter(ticket, (-ticket.limits.priority, next(self._ids)),
                         asyncio.get_running_loop().create_future(), now)
        if not key.queue:
            key.vtime = max(key.vtime, self._vnow)  # a newly backlogged key starts at "now"
            self._backlogged[ticket.key_id] = key
        bisect.insort(key.queue, waiter)
        self._waiting += 1
        metrics.queue_depth.labels(ticket.model).inc()
        admitted = False
        try:
            self._dispatch()
            if not waiter.future.done():
                await self._wait(waiter, disconnected)
            lease = waiter.future.result()
            metrics.queue_wait.labels(ticket.model, "admitted").observe(lease.waited)
            admitted = True
            return lease
        except asyncio.TimeoutError:
            metrics.queue_wait.labels(ticket.model, "timeout").observe(self._clock() - now)
            # What holds it now: only the head of a key's queue has its `blocked` kept current.
            now = self._clock()
            reason = self._blocked(key, ticket, now) or waiter.blocked
            raise self._refusal(ticket, key, reason, now, timed_out=True) from None
        finally:
            if waiter in key.queue:
                self._unqueue(ticket.key_id, key, waiter)
            elif not admitted and waiter.future.done():
                # Granted in the same instant the wait ended (timeout or a client that left):
                # the slot goes back at once, never leaked.
                await waiter.future.result().release()

    async def _wait(self, waiter: _Waiter, disconnected: Disconnected | None) -> None:
        wait = asyncio.shield(waiter.future)
        if disconnected is None:
            await asyncio.wait_for(wait, waiter.ticket.max_wait)
            return
        watcher = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({wait, watcher}, timeout=waiter.ticket.max_wait,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if watcher in done and not waiter.future.done():
            raise ClientClosedRequest("The client disconnected while queued.")
        if not done:
            raise asyncio.TimeoutError

    # --- decisions -----------------------------------------------------------------------------

    def _scaled(self, ticket: Ticket) -> _Scaled:
        limits = ticket.limits
        if self._share >= 1.0:
            return _Scaled(limits.rpm, limits.tpm, limits.max_concurrency)
        return _Scaled(*(None if v is None else max(1, int(v * self._share))
                         for v in (limits.rpm, limits.tpm, limits.max_concurrency)))

    def _prune(self, now: float) -> None:
        """Forget keys that have nothing left that could count. Why: keys come and go (rotated,
        revoked, one-off), and a key kept for good holds its state and the grant log of its last
        busy minute for good, so memory would grow with every key ever seen.

        A key goes only with an empty queue, nothing running, and every grant and token cost of
        its log out of the window: then `_blocked`, `_usage` and `_retry_after` would see exactly
        what a new key shows, so no limit is lost. What it forgets beyond that is its fairness
        lead: at most its last request's cost, from a whole window ago; it restarts at "now",
        as a newly backlogged key does.

        `_keys` is ordered by the last acquire, so the keys that can go are found at the front:
        a front key still inside its window stops the walk until its window ends (`_prune_at`:
        a hint that may come up to a window late when the front changes, never early, as every
        drop checks the key itself). A busy front key goes to the back. At most _PRUNE_BATCH
        steps."""
        keys, edge = self._keys, now - self._window
        for _ in range(min(_PRUNE_BATCH, len(keys))):
            key_id = next(iter(keys))
            key = keys[key_id]
            # Its newest grant: `_grant` logs each grant's time and cost at the same instant and
            # `_trim` drops both at the same edge, so this one time says whether anything still counts.
            last = key.requests[-1] if key.requests else edge
            if last > edge:
                self._prune_at = last + self._window
                return  # still inside its window: it keeps its state
            if key.queue or key.running:
                keys.move_to_end(key_id)
            else:
                del keys[key_id]

    def _trim(self, key: _Key, now: float) -> None:
        edge = now - self._window
        while key.requests and key.requests[0] <= edge:
            key.requests.popleft()
        while key.tokens and key.tokens[0][0] <= edge:  # type: ignore[operator]
            key.token_sum -= key.tokens.popleft()[2]  # type: ignore[operator]

    def _blocked(self, key: _Key, ticket: Ticket, now: float) -> str | None:
        """What stops this key from starting `ticket` now (None: nothing)."""
        limits = self._scaled(ticket)
        self._trim(key, now)
        if limits.rpm is not None and len(key.requests) >= limits.rpm:
            return "rpm"
        if limits.tpm is not None and key.token_sum + ticket.cost > limits.tpm:
            return "tpm"
        if limits.max_concurrency is not None and key.running >= limits.max_concurrency:
            return "concurrency"
        return None

    def _free_slot(self, backends: Sequence[Slot]) -> str | None:
        """The router's pick (the first) when it has a free slot: its order carries the session's
        affinity and the weights. Else the free backend least loaded against `slots * weight`,
        ties in the router's order. (free_slot in lib.lua is the same rule.)"""
        best, best_load = None, math.inf
        for i, slot in enumerate(backends):
            # A replica in `local` fallback keeps to its share of each backend too.
            capacity = slot.slots if self._share >= 1.0 else max(1, int(slot.slots * self._share))
            used = self._used[slot.backend]
            if used >= capacity:
                continue
            if i == 0:
                return slot.backend
            load = used / (capacity * slot.weight)
            if load < best_load:
                best, best_load = slot.backend, load
        return best

    def _grant(self, key: _Key, ticket: Ticket, backend: str, now: float, waited: float) -> MemoryLease:
        lease_id = next(self._ids)
        key.requests.append(now)
        key.tokens.append([now, lease_id, ticket.cost])
        key.token_sum += ticket.cost
        key.running += 1
        self._used[backend] += 1
        start = max(key.vtime, self._vnow)
        self._vnow = start
        key.vtime = start + max(ticket.cost, 1)
        return MemoryLease(self, ticket.key_id, lease_id, backend, self._usage(key, ticket, now), waited,
                           ticket.max_wait)

    def _dispatch(self) -> None:
        """Grant every waiter that can run now, fairest first; then set a timer for the moment
        a rate window will let the next one in. Failovers first: they were admitted already."""
        if not self._waiting and not self._movers:  # the common case: nobody to hand a slot to
            self._cancel_timer()
            return
        for mover in list(self._movers):
            backend = self._free_slot(mover.backends)
            if backend is not None:
                self._movers.remove(mover)
                self._swap(mover.lease, backend)
                mover.future.set_result(backend)
        now = self._clock()
        while True:
            granted = False
            for key_id, key in sorted(self._backlogged.items(), key=_fair_order):
                for waiter in key.queue:
                    reason = self._blocked(key, waiter.ticket, now)
                    if reason is not None:
                        waiter.blocked = reason
                        break  # the key's own limit holds every one of its requests
                    backend = self._free_slot(waiter.ticket.backends)
                    if backend is None:
                        waiter.blocked = "capacity"
                        continue  # another of its requests may be for a backend with room
                    self._unqueue(key_id, key, waiter)
                    waiter.future.set_result(self._grant(key, waiter.ticket, backend, now, now - waiter.enqueued))
                    granted = True
                    break
                if granted:
                    break
            if not granted:
                break
        self._arm_timer(now)

    def _unqueue(self, key_id: str, key: _Key, waiter: _Waiter) -> None:
        """A waiter leaves its key's queue, granted or not; a key left with none is no longer backlogged."""
        key.queue.remove(waiter)
        if not key.queue:
            del self._backlogged[key_id]
        self._waiting -= 1
        metrics.queue_depth.labels(waiter.ticket.model).dec()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm_timer(self, now: float) -> None:
        self._cancel_timer()
        wake = [key for key in self._backlogged.values() if key.queue[0].blocked in ("rpm", "tpm")]
        times = [k.requests[0] + self._window for k in wake if k.requests]
        times += [k.tokens[0][0] + self._window for k in wake if k.tokens]  # type: ignore[operator]
        if times:
            delay = max(0.0, min(times) - now) + 0.001  # type: ignore[type-var]
            self._timer = asyncio.get_running_loop().call_later(delay, self._dispatch)

    def _usage(self, key: _Key, ticket: Ticket, now: float) -> Usage:
        limits = self._scaled(ticket)
        usage = Usage(rpm=limits.rpm, tpm=limits.tpm)
        if limits.rpm is not None:
            usage.rpm_remaining = limits.rpm - len(key.requests)
            usage.rpm_reset = key.requests[0] + self._window - now if key.requests else 0.0
        if limits.tpm is not None:
            usage.tpm_remaining = limits.tpm - key.token_sum
            usage.tpm_reset = key.tokens[0][0] + self._window - now if key.tokens else 0.0  # type: ignore[operator]
        return usage

    def _retry_after(self, key: _Key, ticket: Ticket, reason: str, now: float) -> float:
        """The real time until this request could pass its rate limit."""
        limits = self._scaled(ticket)
        if reason == "rpm" and limits.rpm is not None and len(key.requests) >= limits.rpm:
            return key.requests[len(key.requests) - limits.rpm] + self._window - now
        if reason == "tpm" and limits.tpm is not None:
            excess = key.token_sum + ticket.cost - limits.tpm
            for at, _, amount in key.tokens:
                excess -= amount  # type: ignore[operator]
                if excess <= 0:
                    return at + self._window - now  # type: ignore[operator]
        return 1.0

    def _refusal(self, ticket: Ticket, key: _Key, reason: str, now: float, timed_out: bool = False) -> Exception:
        usage = self._usage(key, ticket, now) if reason != "capacity" else Usage()
        return refusal(ticket, reason, usage, self._retry_after(key, ticket, reason, now), timed_out=timed_out)

    # --- the lease's side ------------------------------------------------------------------

    def _release(self, key_id: str, backend: str) -> None:
        self._keys[key_id].running -= 1  # a key with something running is never pruned
        self._used[backend] -= 1
        if (now := self._clock()) >= self._prune_at:
            self._prune(now)
        self._dispatch()

    def _settle(self, key_id: str, lease_id: int, tokens: int, *, dispatch: bool = True) -> None:
        key = self._keys.get(key_id)
        if key is not None:  # None: settled after its release, its key since forgotten (none of it counted)
            for entry in reversed(key.tokens):
                if entry[1] == lease_id:
                    key.token_sum += tokens - entry[2]  # type: ignore[operator]
                    entry[2] = tokens
                    break
        if dispatch:
            self._dispatch()

    async def _move(self, lease: MemoryLease, backends: Sequence[Slot]) -> str:
        """Failover: a free slot among `backends` at once, else wait for one (before any new
        request) up to the request's max_wait, keeping the current slot meanwhile."""
        others = [b for b in backends if b.backend != lease.backend]
        backend = self._free_slot(others)
        if backend is not None:
            self._swap(lease, backend)
            self._dispatch()
            return backend
        mover = _Mover(lease, others, asyncio.get_running_loop().create_future())
        self._movers.append(mover)
        try:
            await asyncio.wait_for(asyncio.shield(mover.future), lease._max_wait)
        except asyncio.TimeoutError:
            pass
        finally:
            if mover in self._movers:
                self._movers.remove(mover)
        if mover.future.done():  # moved, possibly in the very instant the wait ran out
            return lease.backend
        raise BackendUnavailable("No other backend had a free slot for this request in time.")

    def _swap(self, lease: MemoryLease, backend: str) -> None:
        self._used[lease.backend] -= 1
        self._used[backend] += 1
        lease.backend = backend


# --- shared with the Redis implementation ------------------------------------------------------

MODES = ("memory", "redis", "local", "fail_closed")


def show_mode(mode: str, redis_up: bool | None) -> None:
    """The admission mode in force, and whether the shared Redis answers, for the dashboards."""
    for name in MODES:
        metrics.admission_mode.labels(name).set(1 if name == mode else 0)
    if redis_up is not None:
        metrics.redis_up.set(1 if redis_up else 0)


def too_large(ticket: Ticket, tpm: int) -> RateLimited:
    metrics.rate_limited.labels(ticket.model, "too_large").inc()
    # No retry-after: no wait lets it pass, and an SDK told to wait a minute would, twice.
    return RateLimited(
        f"This request needs about {ticket.cost} tokens, more than the key's limit of {tpm} "
        "tokens per minute; lower max_tokens or ask for a higher limit.", retry_after=None, kind="tokens")


def refusal(ticket: Ticket, reason: str, usage: Usage, retry_after: float, *, timed_out: bool = False) -> Exception:
    """The error for a request admission turns away: 503 when backends stayed busy, else 429
    telling the real time until it could pass, with the key's x-ratelimit-* headers."""
    if reason == "capacity":
        metrics.rate_limited.labels(ticket.model, "capacity").inc()
        busy = BackendUnavailable(
            f"Every backend for `{ticket.model}` is busy and the request waited its limit; try again shortly.",
            headers={"retry-after": "1"})
        busy.rejection = False  # counted just above, as a refusal
        return busy
    label = "queue_timeout" if timed_out else reason
    metrics.rate_limited.labels(ticket.model, label).inc()
    message = {
        "queue_full": "The gateway's queue is full; try again shortly.",
        "key_queue_full": "This key already has as many requests waiting as one key may (queue.max_per_key); "
                          "try again shortly.",
        "rpm": f"Rate limit reached: {usage.rpm} requests per minute for this key.",
        "tpm": f"Rate limit reached: {usage.tpm} tokens per minute for this key.",
        "concurrency": "Too many requests in flight for this key.",
    }.get(reason, "Rate limit reached.")
    if timed_out:
        message += f" The request waited {ticket.max_wait:g}s in the queue."
    return RateLimited(message, retry_after=retry_after, kind="tokens" if reason == "tpm" else "requests",
                       headers=usage.headers())
