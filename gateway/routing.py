"""Model name -> the backends that may answer it, best first. Pure: no I/O, no clocks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.errors import BackendUnavailable, ModelNotFound


class Routable(Protocol):
    name: str
    inflight: int

    @property
    def ready(self) -> bool: ...

    @property
    def reason(self) -> str: ...

    @property
    def state(self): ...  # noqa: ANN201 - a supervisor State; only its `.value` is read here

    @property
    def config(self): ...  # noqa: ANN201 - BackendConfig: `serves`, `slots`, `runtime`


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


def choose(route: Route) -> list[Routable]:
    """Ready backends, least loaded first (in-flight requests against slots)."""
    ready = [b for b in route.backends if b.ready]
    if not ready:
        raise BackendUnavailable(_why_unavailable(route.public, route.backends))
    return sorted(ready, key=lambda b: b.inflight / b.config.slots)


def _why_unavailable(model: str, backends: Sequence[Routable]) -> str:
    # States only: the reasons (process output, paths) are for operators, on /ready and /admin.
    states = ", ".join(f"{b.name} is {b.state.value}" for b in backends)
    return f"No backend for model `{model}` is ready ({states}). Try again later."
