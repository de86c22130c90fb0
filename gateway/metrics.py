"""Every Prometheus collector, and small helpers the request path calls. A sink: imports nothing
from the rest of the gateway.

The gateway runs one process per replica (one event loop does all the I/O), so the default
registry is exact; scale out with more replicas, each scraped on its own.
"""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

# LLM latencies run from milliseconds (an error, a cached prompt) to minutes (long generations).
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_TOKEN_GAP = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)

requests_total = Counter(
    "gateway_requests_total", "Requests answered, by public model, backend, endpoint and status class.",
    ["model", "backend", "endpoint", "status"], registry=REGISTRY,
)
request_duration = Histogram(
    "gateway_request_duration_seconds", "Time from request received to last byte sent.",
    ["model", "endpoint"], buckets=_LATENCY, registry=REGISTRY,
)
time_to_first_token = Histogram(
    "gateway_time_to_first_token_seconds", "Time from request received to the first content chunk sent.",
    ["model"], buckets=_LATENCY, registry=REGISTRY,
)
inter_token_latency = Histogram(
    "gateway_inter_token_latency_seconds", "Mean gap between streamed chunks, one observation per stream.",
    ["model"], buckets=_TOKEN_GAP, registry=REGISTRY,
)
prompt_tokens = Counter("gateway_prompt_tokens_total", "Prompt tokens, as the runtime counted them.",
                        ["model"], registry=REGISTRY)
completion_tokens = Counter("gateway_completion_tokens_total", "Completion tokens, as the runtime counted them.",
                            ["model"], registry=REGISTRY)
inflight = Gauge("gateway_inflight_requests", "Requests being served upstream now.", ["backend"], registry=REGISTRY)
upstream_errors = Counter(
    "gateway_upstream_errors_total",
    "Failures talking to a backend, by kind (connect, timeout, status, stream, protocol).",
    ["backend", "kind"], registry=REGISTRY,
)
backend_state = Gauge("gateway_backend_state", "1 for the state each backend is in, 0 for the others.",
                      ["backend", "runtime", "state"], registry=REGISTRY)
backend_ready = Gauge("gateway_backend_ready", "1 when the backend takes requests.", ["backend", "runtime"],
                      registry=REGISTRY)
backend_transitions = Counter("gateway_backend_transitions_total", "Lifecycle transitions, by target state.",
                              ["backend", "runtime", "state"], registry=REGISTRY)

backend_restarts = Counter("gateway_backend_restarts_total", "Automatic restarts, by cause (crash, unhealthy).",
                           ["backend", "runtime", "cause"], registry=REGISTRY)
backend_slots = Gauge("gateway_backend_slots", "Requests a backend may run at once (its `slots`).", ["backend"],
                      registry=REGISTRY)
backend_load = Gauge(
    "gateway_backend_load",
    "Load the runtime itself reports, under one name for every runtime: kind = running | waiting | kv_cache_usage_ratio.",
    ["backend", "runtime", "kind"], registry=REGISTRY,
)

# Admission: limits and the queue.
queue_depth = Gauge("gateway_queue_depth", "Requests waiting for admission on this replica.", ["model"],
                    registry=REGISTRY)
queue_wait = Histogram("gateway_queue_wait_seconds", "Time a request waited for admission (admitted or not).",
                       ["model", "outcome"], buckets=_LATENCY, registry=REGISTRY)
rate_limited = Counter(
    "gateway_rate_limited_total",
    "Requests refused by admission, by reason (rpm, tpm, concurrency, queue_full, queue_timeout, too_large, capacity).",
    ["model", "reason"], registry=REGISTRY,
)
rejected = Counter(
    "gateway_rejected_total",
    "Requests refused before reaching a backend, by reason (auth, invalid, model_not_found, too_large, unavailable).",
    ["reason"], registry=REGISTRY,
)
admission_mode = Gauge("gateway_admission_mode", "1 for the admission mode in force (redis, local, fail_closed, memory).",
                       ["mode"], registry=REGISTRY)
redis_up = Gauge("gateway_redis_up", "1 while the shared Redis answers, 0 while the circuit is open.", registry=REGISTRY)

# Per key: only with metrics.key_labels, since every key is a label value.
key_requests = Counter("gateway_key_requests_total", "Requests by API key id (metrics.key_labels only).",
                       ["key_id", "model", "status"], registry=REGISTRY)
key_tokens = Counter("gateway_key_tokens_total", "Tokens by API key id and kind (metrics.key_labels only).",
                     ["key_id", "kind"], registry=REGISTRY)

_STATES = ("stopped", "starting", "ready", "unhealthy", "stopping", "failed")


def backend_transition(backend: str, runtime: str, old: str, new: str) -> None:
    for state in _STATES:
        backend_state.labels(backend, runtime, state).set(1 if state == new else 0)
    backend_ready.labels(backend, runtime).set(1 if new == "ready" else 0)
    backend_transitions.labels(backend, runtime, new).inc()


@functools.lru_cache(maxsize=16384)
def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, cached: the request path asks for the same few series on every
    request, and label values are bounded (config names, status classes), so the cache is too."""
    return metric.labels(*labels)


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
