"""Liveness, readiness and the Prometheus scrape."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from litestar import HttpMethod, Request, Response, get, route

from gateway import metrics
from gateway.errors import AuthenticationFailed, NotFound
from gateway.openai import encode
from gateway.supervisor import Backend, State

if TYPE_CHECKING:
    from gateway.app import Gateway


# GET and HEAD: load balancers' checks often send HEAD (HAProxy's `option httpchk HEAD`, F5
# monitors); a 405 there takes a healthy replica out. uvicorn writes no body for a HEAD.
PROBE_METHODS = [HttpMethod.GET, HttpMethod.HEAD]


@route("/health", http_method=PROBE_METHODS)
async def health() -> Response[Any]:
    """Liveness: the process answers. Says nothing about backends, so an orchestrator never
    restarts a healthy gateway because a model is still loading."""
    return Response(b'{"status":"ok"}', media_type="application/json")


# What /ready tells of admission. It needs no key, so it answers states only: the admission's
# describe() also has the replica id and its lease and queue counts: operators' detail (the metrics
# have the queue depth and in-flight requests).
PUBLIC_ADMISSION = ("mode", "redis_reachable")


@route("/ready", http_method=PROBE_METHODS)
async def ready(request: Request[Any, Any, Any]) -> Response[Any]:
    """200 once at least one backend takes requests; otherwise 503. The body gives every backend's
    state and nothing more: /ready needs no key, and a backend's reason carries the runtime's last
    output lines (its argv, model paths) or an attached server's address; the admin API
    (/admin/backends) has them. `admission.mode` says how limits are enforced now: `memory` (one
    process), `redis` (shared by every replica), or, while Redis is unreachable, its failure mode
    (`fail_closed` or `local`). A degraded admission does not make the replica unready: it still
    answers, with 503s or with its share of the limits, and taking every replica out of rotation
    would only turn those into connection errors."""
    gateway: Gateway = request.app.state.gateway
    backends = {b.name: {"state": b.state.value} for b in gateway.supervisor.backends.values()}
    is_ready = any(b.ready or _in_its_cycle(b) for b in gateway.supervisor.backends.values())
    admission = {k: v for k, v in gateway.admission.describe().items() if k in PUBLIC_ADMISSION}
    body = {"status": "ready" if is_ready else "not ready", "backends": backends, "admission": admission}
    return Response(encode(body), status_code=200 if is_ready else 503, media_type="application/json")


def _in_its_cycle(backend: Backend) -> bool:
    """An on-demand backend stopped (the next request starts it), starting for a request, or
    stopping after idle: its normal life, not a fault. Counted as one, /ready went 503 at every
    start and idle stop, and a load balancer took the replica out each time."""
    return backend.startable or (backend.on_demand and backend.state in (State.STARTING, State.STOPPING))


@get("/metrics")
async def scrape(request: Request[Any, Any, Any]) -> Response[Any]:
    gateway: Gateway = request.app.state.gateway
    if not gateway.config.metrics.enabled:
        raise NotFound("Metrics are switched off (metrics.enabled: false).")
    token = gateway.config.metrics.token
    if token:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise AuthenticationFailed("The metrics endpoint needs `Authorization: Bearer <metrics token>`.")
    payload, content_type = metrics.render()
    return Response(payload, media_type=content_type)


ROUTES = [health, ready, scrape]
