"""Admission shared by every replica through one Redis: the same rules as memory.py (base.py
says them), every decision one atomic Lua script (lua/*.lua) on the Redis server's clock.

    acquire ──acquire.lua──> granted                     one round trip, the common case
                        ├──> refused (429 / 503)
                        └──> queued: a future in `_waiters`, resolved by the grant, which comes
                             - in the reply of any script this replica runs (dispatch grants
                               its own waiters there), or
                             - from the listener: BLMPOP on this replica's notify list
                             plus a local timer at the next moment a window or a lease frees
                   One acquire.lua call is on its way at a time; the acquires that come meanwhile
                   go together in the next (`_send_admissions`): a redis-py call costs the
                   gateway more CPU than the rest of an admission, so under load one call
                   admits many requests, and when quiet each goes at once.
    Lease.settle ──settle.lua──> dispatches the queue
    Lease.release: gathered for up to RELEASE_GATHER, then sent inside the next acquire.lua call,
                   or alone (release.lua, a batch) if none comes; both dispatch the queue
    Lease.move ──move.lua──> a free slot on another backend, or a wait for one ahead of the
                             queue (the request was admitted already), told back like a grant
    waiter timed out, client left, cancelled ──leave.lua──> out of the queue, or a grant won
                             in the same instant goes back
    every lease_ttl/3 ──renew.lua──> every lease and queue entry of this replica, in one call

Redis unreachable: the circuit opens at the first failure; requests then get the failure mode
(`fail_closed`: 503 with retry-after; `local`: a MemoryAdmission holding 1/replicas of every
limit) at once, without waiting on Redis, until the listener's probe (every `probe_interval`)
gets an answer and closes it again. Every Redis wait is bounded by the client's socket timeouts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway import metrics
from gateway.admission import keys
from gateway.admission.base import WINDOW, Admission, Disconnected, Lease, Slot, Ticket, Usage
from gateway.admission.memory import MemoryAdmission, refusal, show_mode, too_large
from gateway.admission.scripts import Scripts
from gateway.errors import BackendUnavailable, ClientClosedRequest
from gateway.store.redis import OUTAGE  # (a script error is a bug, and is not one of these)

log = logging.getLogger("gateway.admission")

LISTEN_BLOCK = 2.0  # seconds one BLMPOP waits for grants
TIMER_SLACK = 0.01  # wake a little after a window frees, so grants close together go in one dispatch
# How long a finished request's release may wait to ride along with this replica's next acquire
# (one round trip instead of two per request while busy); when quiet it goes on its own.
RELEASE_GATHER = 0.002
ADMIT_BATCH = 64  # requests in one acquire.lua call at most
MIN_REDIS = (7, 0)  # BLMPOP (the listener)
CALL_TIMEOUT = 2.0  # seconds a script call may take, when the client given sets no socket timeout
PROBE_TTL_MS = 10_000  # the probe's key is only written to see that Redis takes writes; it goes by itself
SHUTTING_DOWN = "The gateway is shutting down."
SCRIPTS = ("acquire", "release", "settle", "move", "leave", "dispatch", "renew")


@dataclass(frozen=True)
class _Grant:
    kind: str  # "g": a queued request granted; "m": a failover moved to `backend`
    lease: str
    backend: str
    key: str
    requests: int  # in the key's window, this one included
    tokens: int
    reset_ms: int


@dataclass(eq=False)
class _Admission:
    """An acquire waiting for its acquire.lua answer: [status, grant | refusal | []]."""

    entry: str
    ticket: Ticket
    request: str  # acquire.lua's argument for it
    answer: asyncio.Future[list[Any]]


@dataclass(eq=False)
class _Waiter:
    ticket: Ticket
    future: asyncio.Future[_Grant | None]  # None: Redis went away while it waited
    since: float


class RedisLease(Lease):
    def __init__(self, owner: RedisAdmission, lease_id: str, ticket: Ticket, backend: str, usage: Usage,
                 waited: float) -> None:
        super().__init__(backend=backend, usage=usage, waited=waited)
        self._owner, self.id, self.ticket = owner, lease_id, ticket
        self.released = False

    async def settle(self, tokens: int) -> None:
        await self._owner._settle(self, tokens)

    async def move(self, backends: Sequence[Slot]) -> str:
        return await self._owner._move(self, backends)

    async def release(self, tokens: int | None = None) -> None:
        if not self.released:
            self.released = True
            await self._owner._release(self, tokens)


class RedisAdmission(Admission):
    def __init__(self, client: aioredis.Redis, *, max_depth: int, max_per_key: int | None = None,
                 window: float = WINDOW, lease_ttl: float = 10.0, failure_mode: str = "fail_closed",
                 replicas: int = 1, probe_interval: float = 2.0) -> None:
        # The other calls (start-up checks, the probe) run on a client of their own, without a
        # socket timeout: with one, redis-py writes every command under asyncio.wait_for, a task
        # and two more loop turns per call. Each call is bounded by `_bounded` instead.
        connection = client.connection_pool.connection_kwargs
        self._call_timeout = connection.get("socket_timeout") or CALL_TIMEOUT
        self._redis = _own_client(client, None, 4)
        self._max_depth = max_depth
        self._max_per_key = max_depth if max_per_key is None else max_per_key
        self._window = window
        self._ttl = lease_ttl
        self._failure_mode = failure_mode
        self._probe_interval = probe_interval
        self.replica = uuid.uuid4().hex[:12]
        self._head = (int(window * 1000), int(lease_ttl * 1000), self.replica)  # ARGV[1..3] of every script
        self._ids = itertools.count(1)
        lua = resources.files("gateway.admission") / "lua"
        lib = keys.lua_prelude() + (lua / "lib.lua").read_text()
        self._scripts = Scripts(self._redis.connection_pool,
                                {name: lib + (lua / f"{name}.lua").read_text() for name in SCRIPTS},
                                timeout=self._call_timeout,
                                connect_timeout=connection.get("socket_connect_timeout") or CALL_TIMEOUT)
        self._leases: dict[str, RedisLease] = {}  # renewed while they live
        self._waiters: dict[str, _Waiter] = {}  # queue entry -> its waiter, renewed too
        self._movers: dict[str, asyncio.Future[str | None]] = {}  # lease -> its failover's wait
        self._releasing: list[str] = []  # gathered releases: lease, key, backend, tokens ('' unknown)
        self._admitting: list[_Admission] = []  # acquires for the next acquire.lua call
        self._sending = False  # an acquire.lua call is on its way
        self._release_timer: asyncio.TimerHandle | None = None
        # `local` mode: this replica's share of every limit while Redis is away.
        self._fallback = (MemoryAdmission(max_depth=max_depth, max_per_key=max_per_key, share=1.0 / replicas,
                                          window=window)
                          if failure_mode == "local" else None)
        self._up = True
        self._down_since: float | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._blocking: aioredis.Redis | None = None
        self._stopping = False
        self._version_checked = False

    @property  # type: ignore[override]
    def mode(self) -> str:
        return "redis" if self._up else self._failure_mode

    # --- life ----------------------------------------------------------------------------------

    async def start(self) -> None:
        self._blocking = _own_client(self._redis, LISTEN_BLOCK + 3.0, 2)
        try:
            if (old := await self._too_old()) is not None:
                raise RuntimeError(f"The Redis store needs Redis {'.'.join(map(str, MIN_REDIS))} or newer "
                                   f"(for BLMPOP); {self._redis_url()} runs {old}.")
            await self._scripts.load()  # EVALSHA from here on (loaded again if Redis loses them)
        except OUTAGE as exc:
            self._trip(exc)
        show_mode(self.mode, self._up)
        self._loops = [asyncio.create_task(self._listen(), name="admission-listener"),
                       asyncio.create_task(self._renew_loop(), name="admission-renew")]

    async def stop(self) -> None:
        self._stopping = True
        releases = self._take_releases()  # (which also stops the flush timer)
        if releases[0] and self._up:
            await self._send_releases(releases)
        listener, renew = self._loops or (None, None)
        if renew is not None:
            renew.cancel()
        if listener is not None:
            # Woken by a message of its own rather than cancelled: redis-py may hold a cancelled
            # BLMPOP until its reply comes, or swallow the cancellation.
            inbox = keys.key(keys.NOTIFY, self.replica)
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    await self._bounded(pipe.rpush(inbox, "").pexpire(inbox, int(self._ttl * 1000)).execute())
            except OUTAGE:
                pass
            if not (await asyncio.wait([listener], timeout=LISTEN_BLOCK + 1.0))[0]:
                listener.cancel()
                await asyncio.wait([listener], timeout=1.0)
        if self._timer is not None:
            self._timer.cancel()
        self._wake_all()
        if self._tasks:  # leaves and releases under way: let them reach Redis
            await asyncio.wait(self._tasks, timeout=3.0)
        self._scripts.close()
        for client in (self._blocking, self._redis):
            if client is not None:
                try:
                    await asyncio.wait_for(client.aclose(), 2.0)
                except (asyncio.TimeoutError, *OUTAGE):
                    pass

    def describe(self) -> dict[str, object]:
        return {"mode": self.mode, "store": "redis", "redis_reachable": self._up, "failure_mode": self._failure_mode,
                "down_for": round(time.monotonic() - self._down_since, 1) if self._down_since else None,
                "replica": self.replica, "leases": len(self._leases), "waiting": len(self._waiters)}

    # --- the request's side --------------------------------------------------------------------

    async def acquire(self, ticket: Ticket, disconnected: Disconnected | None = None) -> Lease:
        limits = ticket.limits
        if limits.tpm is not None and ticket.cost > limits.tpm:
            raise too_large(ticket, limits.tpm)
        if not self._up:
            return await self._degraded(ticket, disconnected, time.monotonic())
        # Zero-padded: the requests of one acquire call share the server's clock, so within a key
        # and a priority their queue order falls to the entry's name, which must then be arrival.
        entry = f"{self.replica}:{next(self._ids):012x}"
        loop = asyncio.get_running_loop()
        waiter = _Waiter(ticket, loop.create_future(), time.monotonic())
        # Registered before the call: a grant may reach the listener before this reply does.
        self._waiters[entry] = waiter
        request = "\t".join((entry, ticket.key_id, str(max(-100, min(100, limits.priority))),
                             str(max(0, int(ticket.max_wait * 1000))), *map(str, _ticket_args(ticket))))
        admission = _Admission(entry, ticket, request, loop.create_future())
        try:
            if self._sending:  # it goes with the next call, once the one on its way is answered
                self._admitting.append(admission)
                status, answer = await admission.answer
            else:  # nothing is on its way: it goes at once, from this task (no hop to another)
                status, answer = await self._admit_now(admission)
        except OUTAGE:  # the call found Redis away (and opened the circuit)
            self._waiters.pop(entry, None)
            return await self._degraded(ticket, disconnected, waiter.since)
        except asyncio.CancelledError:
            if admission.answer.cancelled():
                self._waiters.pop(entry, None)  # what the call gets for it is given back (_orphan)
            else:
                self._abandon(entry, ticket)  # answered in the same instant
            raise
        except BaseException:
            self._abandon(entry, ticket)
            raise
        if status == "granted":
            return self._lease(ticket, _grant(answer), 0.0)
        if status == "refused":
            raise self._refusal(ticket, answer)
        metrics.queue_depth.labels(ticket.model).inc()
        try:
            return await self._queued(entry, waiter, disconnected)
        finally:
            metrics.queue_depth.labels(ticket.model).dec()

    async def _admit_now(self, admission: _Admission) -> list[Any]:
        self._sending = True
        try:
            await self._admit([admission], inline=True)
        finally:
            self._sending = False
            if self._admitting:  # those that came meanwhile
                self._sending = True
                self._spawn(self._send_admissions())
        return await admission.answer  # answered (or failed) by _admit

    async def _send_admissions(self) -> None:
        """acquire.lua with every acquire that is waiting for it, until none is left."""
        try:
            while self._admitting:
                if not self._up:  # an earlier call found Redis away: the rest take the failure mode
                    for left in self._admitting:
                        _fail(left.answer, RedisConnectionError("Redis is unreachable"))
                    break
                batch = [a for a in self._admitting[:ADMIT_BATCH] if not a.answer.cancelled()]
                del self._admitting[:ADMIT_BATCH]
                if batch:
                    await self._admit(batch)
        finally:
            self._sending = False
            for left in self._admitting:  # only when this task is cancelled (the loop closing)
                _fail(left.answer, BackendUnavailable(SHUTTING_DOWN))
            self._admitting = []

    async def _admit(self, batch: list[_Admission], inline: bool = False) -> None:
        """One acquire.lua call for `batch`; every answer is set, failed or given back (none is
        left pending, except the inline caller's own when it is the one cancelled)."""
        releases = self._take_releases()
        try:
            reply = await self._run("acquire", self._max_depth, self._max_per_key, *releases, len(batch),
                                    *[a.request for a in batch])
        except OUTAGE as exc:
            self._trip(exc)  # the releases are lost with it: those leases expire, unrenewed
            for admission in batch:
                _fail(admission.answer, exc)
            return
        except BaseException as exc:
            self._give_back(releases)  # sent or not: releasing twice is harmless
            cancelled = isinstance(exc, asyncio.CancelledError)
            # The call may have run: leave.lua gives back whatever it got, for each request that
            # left (here) or that is told of the failure (by its own acquire).
            for admission in batch:
                if admission.answer.cancelled():
                    self._abandon(admission.entry, admission.ticket)
                elif not (cancelled and inline):  # the inline caller, cancelled, abandons its own
                    _fail(admission.answer, BackendUnavailable(SHUTTING_DOWN) if cancelled else exc)
            if cancelled:
                raise
            return
        try:
            answers = [[_text(status), answer] for status, answer in reply[2]]
            for admission, (status, _) in zip(batch, answers, strict=True):
                if status != "queued":
                    self._waiters.pop(admission.entry, None)
            self._absorb(reply)
            for admission, answer in zip(batch, answers):
                if admission.answer.cancelled():
                    self._orphan(admission, *answer)
                elif not admission.answer.done():
                    admission.answer.set_result(answer)
        except Exception as exc:  # a reply this code cannot read (a bug): nobody may be left waiting
            log.exception("admission: unreadable acquire reply")
            for admission in batch:
                if admission.answer.cancelled():
                    self._abandon(admission.entry, admission.ticket)
                _fail(admission.answer, exc)

    def _orphan(self, admission: _Admission, status: str, answer: Any) -> None:
        """The request left while its acquire was on the way: what it got goes back."""
        if status == "granted":
            grant = _grant(answer)
            self._spawn(self._release_quietly(grant.lease, grant.key, grant.backend))
        elif status == "queued":
            self._abandon(admission.entry, admission.ticket)

    async def _queued(self, entry: str, waiter: _Waiter, disconnected: Disconnected | None) -> Lease:
        ticket = waiter.ticket
        try:
            outcome = await self._wait(waiter, disconnected)
        except BaseException:  # cancelled: the entry leaves, or its grant goes back, in the background
            self._abandon(entry, ticket)
            raise
        if outcome == "granted":
            self._waiters.pop(entry, None)
            grant = waiter.future.result()
            if grant is None:  # Redis went away while it waited
                return await self._degraded(ticket, disconnected, waiter.since)
            lease = self._lease(ticket, grant, time.monotonic() - waiter.since)
            metrics.queue_wait.labels(ticket.model, "admitted").observe(lease.waited)
            return lease
        # Timed out, or the client left. From here a grant for this entry is not ours to use:
        # leave.lua takes the entry out, or gives back a grant made in the same instant.
        self._waiters.pop(entry, None)
        try:
            left = await self._run("leave", entry, ticket.key_id, *_ticket_args(ticket))
        except OUTAGE as exc:
            self._trip(exc)
            left = None
        except BaseException:
            self._abandon(entry, ticket)
            raise
        if left is not None:
            self._absorb(left)
        if outcome == "disconnected":
            raise ClientClosedRequest("The client disconnected while queued.")
        metrics.queue_wait.labels(ticket.model, "timeout").observe(time.monotonic() - waiter.since)
        if left is None:
            return await self._degraded(ticket, disconnected, waiter.since)
        raise self._refusal(ticket, left[2], timed_out=True)

    async def _wait(self, waiter: _Waiter, disconnected: Disconnected | None) -> str:
        """"granted", "timeout" or "disconnected"."""
        remaining = waiter.ticket.max_wait - (time.monotonic() - waiter.since)
        if waiter.future.done():
            return "granted"
        if remaining <= 0:
            return "timeout"
        watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        try:
            await asyncio.wait([waiter.future] + ([watcher] if watcher else []), timeout=remaining,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            if watcher is not None:
                watcher.cancel()
        if waiter.future.done():
            return "granted"
        return "disconnected" if watcher is not None and watcher.done() and not watcher.cancelled() else "timeout"

    def _abandon(self, entry: str, ticket: Ticket) -> None:
        """A waiter that is gone for good (cancelled): leave.lua in the background, so a grant it
        may already have is released, and the cancellation is not held up."""
        waiter = self._waiters.pop(entry, None)
        if waiter is not None and waiter.future.done() and waiter.future.result() is None:
            return  # Redis is away: the entry expires there by itself
        if self._up:
            self._spawn(self._leave_quietly(entry, ticket))

    async def _leave_quietly(self, entry: str, ticket: Ticket) -> None:
        try:
            self._absorb(await self._run("leave", entry, ticket.key_id, *_ticket_args(ticket)))
        except OUTAGE as exc:
            self._trip(exc)

    async def _degraded(self, ticket: Ticket, disconnected: Disconnected | None, since: float) -> Lease:
        """Redis is away: the configured failure mode, never an unlimited one."""
        if self._fallback is None:
            raise BackendUnavailable(
                "Admission control is unavailable (the gateway cannot reach its Redis); try again shortly.",
                headers={"retry-after": str(max(1, math.ceil(self._probe_interval)))})
        remaining = max(0.0, ticket.max_wait - (time.monotonic() - since))
        return await self._fallback.acquire(dataclasses.replace(ticket, max_wait=remaining), disconnected)

    # --- the lease's side ------------------------------------------------------------------------

    def _lease(self, ticket: Ticket, grant: _Grant, waited: float) -> RedisLease:
        lease = RedisLease(self, grant.lease, ticket, grant.backend, _usage(ticket, grant), waited)
        self._leases[lease.id] = lease
        return lease

    async def _release(self, lease: RedisLease, tokens: int | None = None) -> None:
        self._leases.pop(lease.id, None)  # no longer renewed: if the release is lost, it expires
        if not self._up:
            return  # it expires in Redis within the lease TTL, unrenewed
        self._gather(_release_arg(lease.id, lease.ticket.key_id, lease.backend, tokens))

    def _gather(self, *releases: str) -> None:
        """Releases (lease, key, backend, tokens; tab-separated) to send with the next acquire, or
        alone after RELEASE_GATHER."""
        self._releasing += releases
        if self._release_timer is None:
            self._release_timer = asyncio.get_running_loop().call_later(RELEASE_GATHER, self._flush_releases)

    def _take_releases(self) -> list[Any]:
        """The gathered releases as script arguments: how many, then one each."""
        batch = self._releasing
        if not batch:
            return [0]
        self._releasing = []
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        return [len(batch), *batch]

    def _give_back(self, releases: list[Any]) -> None:
        if releases[0]:
            self._gather(*releases[1:])

    def _flush_releases(self) -> None:
        """No acquire took the releases along in time: they go on their own."""
        self._release_timer = None
        releases = self._take_releases()
        if releases[0] and self._up:
            self._spawn(self._send_releases(releases))

    async def _send_releases(self, releases: list[Any]) -> None:
        try:
            self._absorb(await self._run("release", *releases))
        except OUTAGE as exc:
            self._trip(exc)

    async def _settle(self, lease: RedisLease, tokens: int) -> None:
        if not self._up or lease.released:
            return
        try:
            self._absorb(await self._run("settle", lease.id, lease.ticket.key_id, int(tokens)))
        except OUTAGE as exc:
            self._trip(exc)

    async def _move(self, lease: RedisLease, backends: Sequence[Slot]) -> str:
        """Failover: a free slot among `backends` at once, else wait for one (before any queued
        request) up to the request's max_wait, keeping the current slot meanwhile."""
        degraded = BackendUnavailable("No other backend can be given this request while admission is degraded.")
        if not self._up:
            raise degraded
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._movers[lease.id] = future  # before the call: the move may be told to the listener first
        try:
            reply = await self._run("move", lease.id, lease.ticket.key_id, lease.backend, "move",
                                    *_backend_args(backends))
            if _text(reply[0]) == "moved":
                self._movers.pop(lease.id, None)
                lease.backend = _text(reply[2][0])
                self._absorb(reply)
                return lease.backend
            self._absorb(reply)
            await asyncio.wait([future], timeout=max(0.0, lease.ticket.max_wait))
        except OUTAGE as exc:
            self._movers.pop(lease.id, None)
            self._trip(exc)
            raise degraded from None
        except BaseException:
            self._movers.pop(lease.id, None)
            if self._up:
                self._spawn(self._stop_moving(lease, backends))
            raise
        self._movers.pop(lease.id, None)
        if future.done():
            if future.result() is None:
                raise degraded
            return lease.backend  # `_granted` moved it
        if await self._stop_moving(lease, backends):  # moved in the same instant the wait ran out
            return lease.backend
        raise BackendUnavailable("No other backend had a free slot for this request in time.")

    async def _stop_moving(self, lease: RedisLease, backends: Sequence[Slot]) -> bool:
        try:
            reply = await self._run("move", lease.id, lease.ticket.key_id, lease.backend, "stop",
                                    *_backend_args(backends))
        except OUTAGE as exc:
            self._trip(exc)
            return False
        if _text(reply[0]) != "moved":
            return False
        self._moved(lease.id, _text(reply[2][0]), lease.ticket.key_id)
        return True

    def _moved(self, lease_id: str, backend: str, key: str) -> None:
        lease = self._leases.get(lease_id)
        if lease is not None:
            lease.backend = backend
        elif self._up:  # released meanwhile (a cancelled request): the slot it moved to goes back
            self._spawn(self._release_quietly(lease_id, key, backend))

    # --- replies, grants and the timer -------------------------------------------------------------

    async def _run(self, name: str, *args: Any) -> Any:
        """One script, on the scripts' own connection (gateway/admission/scripts.py), which bounds it."""
        return await self._scripts.run(name, [*self._head, *args])

    async def _too_old(self) -> str | None:
        """The server's version if it is older than MIN_REDIS (checked once it has answered)."""
        if self._version_checked:
            return None
        version = str((await self._bounded(self._redis.info("server"))).get("redis_version", ""))
        parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if len(parts) == 2 and parts < MIN_REDIS:
            return version
        self._version_checked = True  # (an unreadable version is given the benefit of the doubt)
        return None

    def _redis_url(self) -> str:
        kwargs = self._redis.connection_pool.connection_kwargs
        return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}" if "host" in kwargs else "the Redis"

    async def _bounded(self, call: Awaitable[Any]) -> Any:
        """Every call on the scripts' client, which has no socket timeout of its own. Cancelled
        on time out, redis-py drops the connection, so no late reply is read as another's."""
        async with asyncio.timeout(self._call_timeout):
            return await call

    def _absorb(self, reply: list[Any]) -> None:
        """Every dispatching script answers [status, wake ms, extra, grants for this replica]."""
        for message in reply[3]:
            self._granted(_grant(message))
        wake = int(reply[1])
        if self._waiters or self._movers:
            self._arm(wake / 1000 if wake >= 0 else self._ttl)

    def _granted(self, grant: _Grant) -> None:
        if grant.kind == "m":
            self._moved(grant.lease, grant.backend, grant.key)
            mover = self._movers.get(grant.lease)
            if mover is not None and not mover.done():
                mover.set_result(grant.backend)
            return
        waiter = self._waiters.get(grant.lease)
        if waiter is not None and not waiter.future.done():
            waiter.future.set_result(grant)
        elif self._up:
            # Its waiter already left (leave.lua gives this grant back too; releasing twice is harmless).
            self._spawn(self._release_quietly(grant.lease, grant.key, grant.backend))

    def _arm(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        at = loop.time() + delay + TIMER_SLACK
        if self._timer is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, math.inf
        if (self._waiters or self._movers) and self._up:
            self._spawn(self._dispatch())

    async def _release_quietly(self, lease_id: str, key: str, backend: str) -> None:
        try:
            self._absorb(await self._run("release", 1, _release_arg(lease_id, key, backend)))
        except OUTAGE as exc:
            self._trip(exc)

    async def _dispatch(self) -> None:
        try:
            self._absorb(await self._run("dispatch"))
        except OUTAGE as exc:
            self._trip(exc)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            if isinstance(exc, OUTAGE):
                self._trip(exc)
            else:
                log.error("admission background call failed", exc_info=exc)

    # --- the background loops ------------------------------------------------------------------

    async def _listen(self) -> None:
        """Grants for this replica's waiters, pushed by other replicas' dispatches; while the
        circuit is open, the probe that closes it."""
        assert self._blocking is not None
        inbox = keys.key(keys.NOTIFY, self.replica)
        while not self._stopping:
            if not self._up:
                await asyncio.sleep(self._probe_interval)
                await self._drop_idle_connections()  # after an outage they are likely dead
                try:
                    # A write, not PING: a Redis out of memory (noeviction) or demoted to a
                    # replica answers PING but refuses every admission script, so the circuit
                    # would close and open again at every probe.
                    await self._bounded(self._redis.set(keys.key(keys.PROBE, self.replica), b"1", px=PROBE_TTL_MS))
                    if (old := await self._too_old()) is not None:  # down at start: not checked yet
                        log.error("Redis %s answers, but admission needs Redis %s or newer; it stays %s",
                                  old, ".".join(map(str, MIN_REDIS)), self.mode)
                        continue
                except OUTAGE:
                    continue
                except Exception as exc:  # noqa: BLE001 - an error reply (BUSY, NOPERM): still not usable
                    # This task is the only one that closes the circuit: it must outlive any answer.
                    log.warning("Redis answered the probe with an error (%s); admission stays %s", exc, self.mode)
                    continue
                self._recover()
                continue
            try:
                reply = await self._blocking.blmpop(LISTEN_BLOCK, 1, inbox, direction="LEFT", count=256)
            except OUTAGE as exc:
                self._trip(exc)
                continue
            except Exception:
                log.exception("admission listener failed; retrying")
                await asyncio.sleep(1.0)
                continue
            for message in reply[1] if reply else ():
                if message:  # b"": stop() waking it
                    try:
                        self._granted(_grant(message))
                    except Exception:  # noqa: BLE001 - one unreadable message must not end the listener
                        log.exception("admission: unreadable grant message %r", message)

    async def _renew_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._ttl / 3)
            if not self._up or not (self._leases or self._waiters):
                continue
            leases = list(self._leases.values())
            waiting = list(self._waiters.items())
            args: list[Any] = [len(leases)]
            for lease in leases:
                args += [lease.id, lease.backend, lease.ticket.key_id]
            args.append(len(waiting))
            for entry, waiter in waiting:
                args += [entry, waiter.ticket.key_id]
            try:
                reply = await self._run("renew", *args)
                for lost in reply[2]:
                    if _text(lost) in self._movers:
                        continue  # moved a moment ago; the news is on its way
                    lease = self._leases.pop(_text(lost), None)
                    if lease is not None and not lease.released:
                        log.warning("admission lease %s expired in Redis before it was renewed (Redis restarted, "
                                    "or this replica stalled longer than queue.lease_ttl)", lease.id)
                self._absorb(reply)
            except OUTAGE as exc:
                self._trip(exc)
            except Exception:  # noqa: BLE001 - the loop must outlive a failed call or an unreadable reply
                log.exception("admission lease renewal failed")

    # --- the circuit ---------------------------------------------------------------------------

    def _trip(self, exc: BaseException) -> None:
        if not self._up:
            return
        self._up = False
        self._down_since = time.monotonic()
        log.warning("Redis unreachable (%s): admission is %s until it answers again", str(exc) or type(exc).__name__,
                    "limited locally to this replica's share" if self._fallback else "refusing requests (fail_closed)")
        show_mode(self.mode, False)
        self._wake_all()

    def _wake_all(self) -> None:
        """Every local wait ends now, with None: Redis is away (or admission stops)."""
        for future in [w.future for w in self._waiters.values()] + list(self._movers.values()):
            if not future.done():
                future.set_result(None)

    async def _drop_idle_connections(self) -> None:
        assert self._blocking is not None
        self._scripts.drop()
        for pool, in_use in ((self._redis.connection_pool, False), (self._blocking.connection_pool, True)):
            try:
                await pool.disconnect(inuse_connections=in_use)
            except Exception:  # noqa: BLE001 - closing a dead socket may fail; it is gone either way
                pass

    def _recover(self) -> None:
        self._up = True
        log.warning("Redis answers again after %.1fs: admission is shared through Redis",
                    time.monotonic() - (self._down_since or time.monotonic()))
        self._down_since = None
        show_mode(self.mode, True)

    # --- refusals ------------------------------------------------------------------------------

    def _refusal(self, ticket: Ticket, answer: list[Any], timed_out: bool = False) -> Exception:
        reason, requests, tokens, reset_ms, retry_ms = _text(answer[0]), *(int(x) for x in answer[1:5])
        usage = _usage(ticket, _Grant("g", "", "", "", requests, tokens, reset_ms))
        return refusal(ticket, reason, usage, retry_ms / 1000, timed_out=timed_out)


def _fail(answer: asyncio.Future[Any], exc: BaseException) -> None:
    if not answer.done():
        answer.set_exception(exc)


def _own_client(client: aioredis.Redis, socket_timeout: float | None, connections: int) -> aioredis.Redis:
    """A client on the same server with a pool of its own and this socket (read) timeout."""
    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if not k.startswith("orig_")}
    kwargs["socket_timeout"] = socket_timeout
    return aioredis.Redis(connection_pool=type(pool)(connection_class=pool.connection_class,
                                                     max_connections=connections, **kwargs))


def _ticket_args(ticket: Ticket) -> list[Any]:
    limits = ticket.limits
    return [int(ticket.cost), *("" if v is None else int(v) for v in (limits.rpm, limits.tpm, limits.max_concurrency)),
            *_backend_args(ticket.backends)]


def _release_arg(lease: str, key: str, backend: str, tokens: int | None = None) -> str:
    """One release as release_batch (lib.lua) reads it: tokens '' when unknown."""
    return f"{lease}\t{key}\t{backend}\t{'' if tokens is None else int(tokens)}"


def _backend_args(backends: Sequence[Slot]) -> list[Any]:
    """backend, slots, weight per candidate, in the router's order (read_ticket in lib.lua)."""
    return [part for slot in backends for part in (slot.backend, slot.slots, float(slot.weight))]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _grant(raw: Any) -> _Grant:
    """`kind, lease, backend, key, requests, tokens, reset_ms` (a message, or those fields as a list)."""
    parts = [_text(p) for p in raw] if isinstance(raw, list) else _text(raw).split("\t")
    return _Grant(parts[0], parts[1], parts[2], parts[3], *(int(float(x)) for x in parts[4:7]))


def _usage(ticket: Ticket, grant: _Grant) -> Usage:
    limits = ticket.limits
    usage = Usage(rpm=limits.rpm, tpm=limits.tpm)
    reset = max(0.0, grant.reset_ms / 1000)
    if limits.rpm is not None:
        usage.rpm_remaining, usage.rpm_reset = limits.rpm - grant.requests, reset
    if limits.tpm is not None:
        usage.tpm_remaining, usage.tpm_reset = limits.tpm - grant.tokens, reset
    return usage
