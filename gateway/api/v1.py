"""The OpenAI front door. Each handler only puts the steps in order:

    auth -> decode -> route (+ the key's model list) -> (per candidate) adapter.request
         -> upstream.send -> reply or relay stream -> account (metrics, usage per key)
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from litestar import Request, Response, get, post
from litestar.response import Stream

from gateway import metrics
from gateway.errors import BackendUnavailable, GatewayError, ModelNotFound
from gateway.openai import Endpoint, decode_request, encode, wants_usage
from gateway.routing import choose
from gateway.upstream import StreamOutcome, relay_stream

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.supervisor.supervisor import Backend

JSON = "application/json"
SSE_HEADERS = {
    "cache-control": "no-cache",
    # Reverse proxies (nginx) buffer responses unless told not to, which turns a stream into one late blob.
    "x-accel-buffering": "no",
}


async def _serve(request: Request[Any, Any, Any], endpoint: Endpoint) -> Response[Any]:
    gateway: Gateway = request.app.state.gateway
    started = time.perf_counter()
    principal = gateway.keys.authenticate(request)
    body = decode_request(endpoint, await request.body())
    route = gateway.models.resolve(body["model"])
    principal.check_model(route)
    stream = bool(body.get("stream")) and endpoint != "embeddings"
    account = Accounting(gateway, principal.key_id, route.public, route.served, endpoint, started)

    # Failover before the first byte: a backend that refuses the connection is skipped.
    failure: GatewayError | None = None
    for backend in choose(route):
        upstream_request = backend.adapter.request(endpoint, body, route.served)
        account.begin(backend)
        try:
            resp = await gateway.upstream.send(backend.url, backend.adapter, upstream_request,
                                               backend=backend.name, headers=_forward_headers(backend))
        except BackendUnavailable as exc:
            account.end(exc.status, None)
            failure = exc
            continue
        except GatewayError as exc:
            account.end(exc.status, None)
            raise
        if stream:
            outcome = StreamOutcome()
            chunks = relay_stream(resp, backend.adapter, endpoint, public_model=route.public,
                                  include_usage=wants_usage(body), backend=backend.name, outcome=outcome)
            return Stream(_accounted(chunks, account, outcome), media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            raw = await gateway.upstream.read(resp, backend.name)
            data = backend.adapter.response(endpoint, raw)
        except GatewayError as exc:
            account.end(exc.status, None)
            raise
        data["model"] = route.public
        account.end(200, data.get("usage"))
        return Response(encode(data), media_type=JSON)
    assert failure is not None
    raise failure


class Accounting:
    """Everything recorded about one request once it reaches a backend: in-flight counts,
    metrics, and the key's usage (on success and on failure alike)."""

    __slots__ = ("gateway", "key_id", "model", "served", "endpoint", "started", "backend")

    def __init__(self, gateway: Gateway, key_id: str, model: str, served: str, endpoint: Endpoint,
                 started: float) -> None:
        self.gateway, self.key_id, self.model, self.served = gateway, key_id, model, served
        self.endpoint, self.started = endpoint, started
        self.backend: Backend | None = None

    def begin(self, backend: Backend) -> None:
        self.backend = backend
        backend.last_used = time.monotonic()
        backend.inflight += 1
        metrics.inflight.labels(backend.name).inc()

    def end(self, status: int, usage: dict[str, Any] | None) -> None:
        backend = self.backend
        assert backend is not None
        backend.last_used = time.monotonic()
        backend.inflight -= 1
        metrics.inflight.labels(backend.name).dec()
        metrics.requests_total.labels(self.model, backend.name, self.endpoint, metrics.status_class(status)).inc()
        metrics.request_duration.labels(self.model, self.endpoint).observe(time.perf_counter() - self.started)
        prompt = int(usage.get("prompt_tokens") or 0) if usage else 0
        completion = int(usage.get("completion_tokens") or 0) if usage else 0
        if usage:
            metrics.prompt_tokens.labels(self.model).inc(prompt)
            metrics.completion_tokens.labels(self.model).inc(completion)
        self.gateway.usage.add(self.key_id, self.served, prompt_tokens=prompt, completion_tokens=completion,
                               error=status >= 400)
        if self.gateway.config.metrics.key_labels:
            metrics.key_requests.labels(self.key_id, self.model, metrics.status_class(status)).inc()
            metrics.key_tokens.labels(self.key_id, "prompt").inc(prompt)
            metrics.key_tokens.labels(self.key_id, "completion").inc(completion)


async def _accounted(chunks: AsyncIterator[bytes], account: Accounting, outcome: StreamOutcome) -> AsyncIterator[bytes]:
    try:
        async for piece in chunks:
            yield piece
    finally:
        # 499: the client went away before the end (nginx's convention).
        status = outcome.error.status if outcome.error else (200 if outcome.finished else 499)
        if outcome.first_chunk_at is not None:
            metrics.time_to_first_token.labels(account.model).observe(outcome.first_chunk_at - account.started)
            if outcome.chunks > 1:
                gap = (time.perf_counter() - outcome.first_chunk_at) / (outcome.chunks - 1)
                metrics.inter_token_latency.labels(account.model).observe(gap)
        account.end(status, outcome.usage)


def _forward_headers(backend: Backend) -> dict[str, str]:
    key = backend.config.api_key
    return {"authorization": f"Bearer {key}"} if key else {}


@post("/v1/chat/completions")
async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
    return await _serve(request, "chat")


@post("/v1/completions")
async def completions(request: Request[Any, Any, Any]) -> Response[Any]:
    return await _serve(request, "completions")


@post("/v1/embeddings")
async def embeddings(request: Request[Any, Any, Any]) -> Response[Any]:
    return await _serve(request, "embeddings")


@get("/v1/models")
async def list_models(request: Request[Any, Any, Any]) -> Response[Any]:
    gateway: Gateway = request.app.state.gateway
    principal = gateway.keys.authenticate(request)
    data = [{"id": name, "object": "model", "created": gateway.started, "owned_by": owner}
            for name, owner in gateway.models.listing() if principal.may_use(gateway.models.resolve(name))]
    return Response(encode({"object": "list", "data": data}), media_type=JSON)


@get("/v1/models/{model:path}")
async def get_model(request: Request[Any, Any, Any], model: str) -> Response[Any]:
    gateway: Gateway = request.app.state.gateway
    principal = gateway.keys.authenticate(request)
    model = model.lstrip("/")  # model ids may contain slashes (`org/name`)
    owner = dict(gateway.models.listing()).get(model)
    if owner is None:
        raise ModelNotFound(model)
    principal.check_model(gateway.models.resolve(model))
    return Response(encode({"id": model, "object": "model", "created": gateway.started, "owned_by": owner}),
                    media_type=JSON)


ROUTES = [chat_completions, completions, embeddings, list_models, get_model]
