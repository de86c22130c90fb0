"""Model name -> the backends that may answer it, best first. No I/O: load reports and the
clock come in as arguments, so every rule here is tested without processes.

Best first means: ready and not cooling down; then least loaded, where load is the gateway's own
in-flight count plus what the runtime says is waiting, against `slots * weight`. A request that
carries the affinity header goes first to the backend the header hashes to (rendezvous hashing,
so one conversation keeps one backend's prompt cache while the group does not change).
"""

from __future__ import annotations

import hashlib
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

    ordered = sorted(ready, key=load)
    if affinity:
        sticky = max(ready, key=lambda b: _rendezvous(affinity, b.name, b.config.weight))
        ordered.remove(sticky)
        ordered.insert(0, sticky)
    return ordered


def _rendezvous(key: str, backend: str, weight: float) -> float:
    digest = hashlib.blake2b(f"{key}\0{backend}".encode(), digest_size=8).digest()
    return weight * int.from_bytes(digest, "big")


def _why_unavailable(model: str, backends: Sequence[Routable]) -> str:
    # States only: the reasons (process output, paths) are for operators, on /ready and /admin.
    states = ", ".join(f"{b.name} is {b.state.value}" for b in backends)
    return f"No backend for model `{model}` is ready ({states}). Try again later."
