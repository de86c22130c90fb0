"""The OpenAI front door. Each handler only puts the steps in order:

    decode -> route -> (per candidate) adapter.request -> upstream.send -> reply or relay stream
                                                                     -> account (metrics, usage)
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
    body = decode_request(endpoint, await request.body())
    route = gateway.models.resolve(body["model"])
    stream = bool(body.get("stream")) and endpoint != "embeddings"

    # Failover before the first byte: a backend that refuses the connection is skipped.
    failure: GatewayError | None = None
    for backend in choose(route):
        upstream_request = backend.adapter.request(endpoint, body, route.served)
        backend.inflight += 1
        metrics.inflight.labels(backend.name).inc()
        try:
            resp = await gateway.upstream.send(backend.url, backend.adapter, upstream_request,
                                               backend=backend.name, headers=_forward_headers(backend))
        except BackendUnavailable as exc:
            _done(backend, route.public, endpoint, exc.status, started)
            failure = exc
            continue
        except GatewayError as exc:
            _done(backend, route.public, endpoint, exc.status, started)
            raise
        if stream:
            outcome = StreamOutcome()
            chunks = relay_stream(resp, backend.adapter, public_model=route.public,
                                  include_usage=wants_usage(body), backend=backend.name, outcome=outcome)
            return Stream(_accounted(chunks, backend, route.public, endpoint, started, outcome),
                          media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            raw = await gateway.upstream.read(resp, backend.name)
            data = backend.adapter.response(endpoint, raw)
        except GatewayError as exc:
            _done(backend, route.public, endpoint, exc.status, started)
            raise
        data["model"] = route.public
        _count_tokens(route.public, data.get("usage"))
        _done(backend, route.public, endpoint, 200, started)
        return Response(encode(data), media_type=JSON)
    assert failure is not None
    raise failure


async def _accounted(chunks: AsyncIterator[bytes], backend: Backend, model: str, endpoint: Endpoint,
                     started: float, outcome: StreamOutcome) -> AsyncIterator[bytes]:
    try:
        async for piece in chunks:
            yield piece
    finally:
        status = outcome.error.status if outcome.error else (200 if outcome.finished else 499)
        _count_tokens(model, outcome.usage)
        if outcome.first_chunk_at is not None:
            metrics.time_to_first_token.labels(model).observe(outcome.first_chunk_at - started)
            if outcome.chunks > 1:
                gap = (time.perf_counter() - outcome.first_chunk_at) / (outcome.chunks - 1)
                metrics.inter_token_latency.labels(model).observe(gap)
        _done(backend, model, endpoint, status, started)


def _done(backend: Backend, model: str, endpoint: Endpoint, status: int, started: float) -> None:
    backend.inflight -= 1
    metrics.inflight.labels(backend.name).dec()
    metrics.requests_total.labels(model, backend.name, endpoint, metrics.status_class(status)).inc()
    metrics.request_duration.labels(model, endpoint).observe(time.perf_counter() - started)


def _count_tokens(model: str, usage: dict[str, Any] | None) -> None:
    if usage:
        metrics.prompt_tokens.labels(model).inc(usage.get("prompt_tokens") or 0)
        metrics.completion_tokens.labels(model).inc(usage.get("completion_tokens") or 0)


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
    data = [{"id": name, "object": "model", "created": gateway.started, "owned_by": owner}
            for name, owner in gateway.models.listing()]
    return Response(encode({"object": "list", "data": data}), media_type=JSON)


@get("/v1/models/{model:path}")
async def get_model(request: Request[Any, Any, Any], model: str) -> Response[Any]:
    gateway: Gateway = request.app.state.gateway
    model = model.lstrip("/")  # model ids may contain slashes (`org/name`)
    owner = dict(gateway.models.listing()).get(model)
    if owner is None:
        raise ModelNotFound(model)
    return Response(encode({"id": model, "object": "model", "created": gateway.started, "owned_by": owner}),
                    media_type=JSON)


ROUTES = [chat_completions, completions, embeddings, list_models, get_model]
