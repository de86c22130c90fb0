"""Admission: may this request run now, on which backend slot, and if not, how long may it wait?

    acquire(ticket) -> Lease          granted now, or after a fair, bounded wait in the queue
    Lease.settle(tokens)              the real token count replaces the estimate (refund or debt)
    Lease.move(backends) -> name      failover: give up this slot, take one on another backend
    Lease.release(tokens)             the request is over: settled (if tokens given) and its slot
                                      and concurrency freed, in one step

Both implementations (memory: one process; redis: every replica on one Redis) follow the same
rules, checked by one contract suite (tests/admission/):
  - per key: `rpm` requests and `tpm` tokens in any 60-second window (a sliding log, so a fresh
    key may spend its whole minute at once but never more in any window), `max_concurrency`;
  - per backend: never more requests at once than its `slots`;
  - which backend: the router's pick (the first candidate) whenever it has a free slot, else
    the free one least loaded against its `slots * weight`, ties in the router's order;
  - the queue: at most `max_depth` waiting, `max_per_key` of them for one key, each for at most
    its `max_wait`; across keys
    start-time fair queuing weighted by token cost (a key with a backlog cannot starve a key
    that sends one request); within a key by priority, then arrival; a key blocked only by its
    own rate limit is skipped, not waited behind.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

WINDOW = 60.0  # seconds: the window of rpm and tpm


@dataclass(frozen=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    priority: int = 0


@dataclass(frozen=True)
class Slot:
    """A backend the request may run on, with its capacity and its routing weight."""

    backend: str
    slots: int
    weight: float = 1.0


@dataclass(frozen=True)
class Ticket:
    key_id: str
    limits: Limits
    model: str
    backends: Sequence[Slot]  # the candidates in the router's order: the first is its pick
    cost: int  # estimated tokens: prompt plus the completion budget
    max_wait: float  # seconds this request may wait in the queue


@dataclass
class Usage:
    """What the key has left, for the x-ratelimit-* headers."""

    rpm: int | None = None
    rpm_remaining: int | None = None
    rpm_reset: float = 0.0  # seconds until one more request fits
    tpm: int | None = None
    tpm_remaining: int | None = None
    tpm_reset: float = 0.0

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.rpm is not None:
            out["x-ratelimit-limit-requests"] = str(self.rpm)
            out["x-ratelimit-remaining-requests"] = str(max(0, self.rpm_remaining or 0))
            out["x-ratelimit-reset-requests"] = duration(self.rpm_reset)
        if self.tpm is not None:
            out["x-ratelimit-limit-tokens"] = str(self.tpm)
            out["x-ratelimit-remaining-tokens"] = str(max(0, self.tpm_remaining or 0))
            out["x-ratelimit-reset-tokens"] = duration(self.tpm_reset)
        policies = [f'"rpm";q={self.rpm};w={int(WINDOW)}' if self.rpm is not None else "",
                    f'"tpm";q={self.tpm};w={int(WINDOW)}' if self.tpm is not None else ""]
        if any(policies):
            # The IETF draft's structured headers (draft-ietf-httpapi-ratelimit-headers).
            out["ratelimit-policy"] = ", ".join(p for p in policies if p)
            parts = []
            if self.rpm is not None:
                parts.append(f'"rpm";r={max(0, self.rpm_remaining or 0)};t={int(self.rpm_reset + 0.999)}')
            if self.tpm is not None:
                parts.append(f'"tpm";r={max(0, self.tpm_remaining or 0)};t={int(self.tpm_reset + 0.999)}')
            out["ratelimit"] = ", ".join(parts)
        return out


def duration(seconds: float) -> str:
    """OpenAI's reset format: `6m0s`, `1s`, `12ms`."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, int(seconds * 1000))}ms"
    whole = int(seconds + 0.999)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass
class Lease:
    backend: str
    usage: Usage = field(default_factory=Usage)
    waited: float = 0.0

    async def settle(self, tokens: int) -> None:  # noqa: B027 - overridden where it matters
        """Replace the estimate with the real total tokens."""

    async def move(self, backends: Sequence[Slot]) -> str:
        """Failover: free this slot and take a free one among `backends` (chosen as a ticket's
        are: the first when free), or raise."""
        raise NotImplementedError

    async def release(self, tokens: int | None = None) -> None:  # noqa: B027
        """Free the slot and concurrency; with `tokens`, settle first in the same step. On Redis
        the release is gathered and rides along with the replica's next acquire (at most
        RELEASE_GATHER later), so returning does not mean Redis has seen it yet."""


Disconnected = Callable[[], Awaitable[object]]


class Admission(abc.ABC):
    mode: str = "memory"

    async def start(self) -> None:  # noqa: B027
        pass

    async def stop(self) -> None:  # noqa: B027
        pass

    @abc.abstractmethod
    async def acquire(self, ticket: Ticket, disconnected: Disconnected | None = None) -> Lease:
        """A granted lease, or RateLimited (429) / BackendUnavailable (503). `disconnected`, if
        given, is awaited only while the request waits: when it returns, the request leaves
        the queue."""

    def describe(self) -> dict[str, object]:
        return {"mode": self.mode}
