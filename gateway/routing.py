"""Model name -> the backends that may answer it, best first. No I/O: load reports and the
clock come in as arguments, so every rule here is tested without processes.

Best first means: ready and not cooling down; then least loaded, where load is the gateway's own
in-flight count plus what the runtime says is waiting, against `slots * weight` (equal loads, as
when idle: the larger `slots * weight` first). A request that carries the affinity header goes
first to the backend the header hashes to (weighted rendezvous hashing: a backend's share of the
sessions is its weight's share, and one conversation keeps one backend's prompt cache while the
group does not change). Admission grants this first backend whenever it has a free slot.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from adapters.base import Load
from gateway.errors import BackendUnavailable, ModelNotFound


class Routable(Protocol):
    name: str
    inflight: int

    @property
    def ready(self) -> bool: ...

    @property
    def state(self): ...  # noqa: ANN201 - a supervisor State; only its `.value` is read here

    @property
    def config(self): ...  # noqa: ANN201 - BackendConfig: `serves`, `slots`, `weight`, `runtime`


@dataclass(frozen=True)
class Route:
    public: str  # the name the client asked for, echoed in responses
    served: str  # the name the backends serve it under
    backends: tuple[Routable, ...]


class ModelTable:
    def __init__(self, backends: Iterable[Routable], aliases: dict[str, str]) -> None:
        self._served: dict[str, list[Routable]] = {}
        for backend in backends:
            for name in backend.config.serves:
                self._served.setdefault(name, []).append(backend)
        self._aliases = dict(aliases)

    def resolve(self, name: str) -> Route:
        served = self._aliases.get(name, name)
        backends = self._served.get(served)
        if not backends:
            raise ModelNotFound(name)
        return Route(public=name, served=served, backends=tuple(backends))

    def listing(self) -> list[tuple[str, str]]:
        """(public name, owned_by) for every served name and alias."""
        out = [(name, backends[0].config.runtime) for name, backends in self._served.items()]
        out += [(alias, self._served[target][0].config.runtime) for alias, target in self._aliases.items()]
        return out


class Cooldowns:
    """Backends that failed `failures` times within `window` sit out `cooldown` seconds."""

    def __init__(self, failures: int, window: float, cooldown: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._failures, self._window, self._cooldown, self._clock = failures, window, cooldown, clock
        self._recent: dict[str, deque[float]] = {}
        self._until: dict[str, float] = {}

    def failed(self, backend: str) -> None:
        now = self._clock()
        recent = self._recent.setdefault(backend, deque())
        recent.append(now)
        while recent and recent[0] <= now - self._window:
            recent.popleft()
        if len(recent) >= self._failures:
            self._until[backend] = now + self._cooldown
            recent.clear()

    def rest(self, backend: str, seconds: float) -> None:
        """A backend that said when to come back (a 429's retry-after) sits out that long, at most
        `cooldown`: an attached server's wait of an hour must not take a replica out for an hour
        (while it is out of the choice, its peers take the traffic; after, one request asks again)."""
        until = self._clock() + min(seconds, self._cooldown)
        if until > self._until.get(backend, until - 1):
            self._until[backend] = until

    def succeeded(self, backend: str) -> None:
        self._recent.pop(backend, None)

    def reset(self, backend: str) -> None:
        """A backend that (re)became ready starts with a clean slate."""
        self._recent.pop(backend, None)
        self._until.pop(backend, None)

    def cooling(self, backend: str) -> bool:
        until = self._until.get(backend)
        if until is None:
            return False
        if self._clock() >= until:
            del self._until[backend]
            return False
        return True


def choose(route: Route, *, cooldowns: Cooldowns | None = None, loads: Mapping[str, Load] | None = None,
           affinity: str | None = None) -> list[Routable]:
    """Ready backends, best first; BackendUnavailable when none is ready."""
    ready = [b for b in route.backends if b.ready]
    if not ready:
        raise BackendUnavailable(_why_unavailable(route.public, route.backends), headers={"retry-after": "1"})
    if cooldowns is not None:
        # Cooling backends leave the choice while a peer can serve; alone, they are still tried.
        warm = [b for b in ready if not cooldowns.cooling(b.name)]
        ready = warm or ready
    if len(ready) == 1:
        return ready
    loads = loads or {}

    def load(backend: Routable) -> float:
        reported = loads.get(backend.name)
        waiting = reported.waiting or 0.0 if reported else 0.0
        return (backend.inflight + waiting) / (backend.config.slots * backend.config.weight)

    ordered = sorted(ready, key=lambda b: (load(b), -b.config.slots * b.config.weight))
    if affinity:
        sticky = max(ready, key=lambda b: _rendezvous(affinity, b.name, b.config.weight))
        ordered.remove(sticky)
        ordered.insert(0, sticky)
    return ordered


def _rendezvous(key: str, backend: str, weight: float) -> float:
    """Weighted rendezvous score, -weight / ln(u) with u the hash in (0, 1): the highest score wins,
    and a backend wins weight / (sum of weights) of the keys. (weight * hash would give the
    heavier backends more than their share: 5/6 rather than 3/4 for weights 1 and 3.)"""
    digest = hashlib.blake2b(f"{key}\0{backend}".encode(), digest_size=8).digest()
    # 52 bits: (n + 0.5) / 2**52 is exact in a double, strictly between 0 and 1
    u = ((int.from_bytes(digest, "big") >> 12) + 0.5) / 2**52
    return -weight / math.log(u)


def _why_unavailable(model: str, backends: Sequence[Routable]) -> str:
    # States only: the reasons (process output, paths) are for operators, on /ready and /admin.
    states = ", ".join(f"{b.name} is {b.state.value}" for b in backends)
    return f"No backend for model `{model}` is ready ({states}). Try again later."
