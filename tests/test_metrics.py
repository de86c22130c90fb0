"""The per-request metrics (gateway.metrics.RequestStats) expose exactly what prometheus_client's
own Counter, Histogram and Gauge expose for the same updates."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics
from gateway.metrics import RequestStats


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample but the `_created` timestamps (they differ by when each side was updated)."""
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if not s.name.endswith("_created")}


def _families(registry: CollectorRegistry) -> dict[str, tuple[str, str]]:
    text = generate_latest(registry).decode()
    return {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(text)}


def test_the_same_updates_expose_the_same_samples_as_prometheus_client() -> None:
    ours_registry, reference = CollectorRegistry(), CollectorRegistry()
    ours = RequestStats()
    ours_registry.register(ours)
    requests = Counter("gateway_requests_total", "Requests answered, by public model, backend, endpoint and status "
                       "class.", ["model", "backend", "endpoint", "status"], registry=reference)
    duration = Histogram("gateway_request_duration_seconds", "Time from request received to last byte sent.",
                         ["model", "endpoint"], buckets=metrics._LATENCY, registry=reference)
    ttft = Histogram("gateway_time_to_first_token_seconds", "Time from request received to the first content chunk "
                     "sent.", ["model"], buckets=metrics._LATENCY, registry=reference)
    gaps = Histogram("gateway_inter_token_latency_seconds", "Mean gap between streamed chunks, one observation per "
                     "stream.", ["model"], buckets=metrics._TOKEN_GAP, registry=reference)
    prompt = Counter("gateway_prompt_tokens_total", "Prompt tokens, as the runtime counted them.", ["model"],
                     registry=reference)
    completion = Counter("gateway_completion_tokens_total", "Completion tokens, as the runtime counted them.",
                         ["model"], registry=reference)
    inflight = Gauge("gateway_inflight_requests", "Requests being served upstream now.", ["backend"],
                     registry=reference)
    assert _samples(ours_registry) == _samples(reference) == {}  # no series before the first request

    # Values on bucket bounds too: `le` is inclusive.
    for model, backend, endpoint, status, seconds in [
        ("m", "a", "chat", "2xx", 0.005), ("m", "a", "chat", "2xx", 0.0051), ("m", "b", "chat", "5xx", 700.0),
        ("n", "a", "embeddings", "2xx", 0.0), ("m", "a", "chat", "4xx", 1.0), ("m", "a", "chat", "2xx", 2.4),
    ]:
        ours.attempt_started(backend)
        inflight.labels(backend).inc()
        ours.answered(model, backend, endpoint, status)
        requests.labels(model, backend, endpoint, status).inc()
        ours.duration(model, endpoint, seconds)
        duration.labels(model, endpoint).observe(seconds)
        ours.tokens(model, 12, 7)
        prompt.labels(model).inc(12)
        completion.labels(model).inc(7)
    ours.attempt_ended("a")
    inflight.labels("a").dec()
    for model, first, gap in [("m", 0.01, 0.001), ("m", 0.3, 0.0025), ("n", 9.0, 3.0)]:
        ours.first_token(model, first)
        ttft.labels(model).observe(first)
        ours.token_gap(model, gap)
        gaps.labels(model).observe(gap)

    assert _samples(ours_registry) == _samples(reference)
    assert _families(ours_registry) == _families(reference)


def test_counters_keep_their_created_timestamps() -> None:
    registry = CollectorRegistry()
    ours = RequestStats()
    registry.register(ours)
    ours.answered("m", "a", "chat", "2xx")
    names = {s.name for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    assert {"gateway_requests_total", "gateway_requests_created"} <= names


def test_a_second_collector_with_the_same_names_is_refused() -> None:
    # Registration still checks names: the collector is described by collecting it.
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        metrics.REGISTRY.register(RequestStats())
