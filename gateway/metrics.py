"""Every Prometheus collector, and small helpers the request path calls. A sink: imports nothing
from the rest of the gateway.

The gateway runs one process per replica (one event loop does all the I/O), so the default
registry is exact; scale out with more replicas, each scraped on its own.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

REGISTRY = CollectorRegistry(auto_describe=True)
# The process's memory, CPU, open files and start time (process_*): a leak or a restart over
# months shows on these first. Read at scrape time only.
ProcessCollector(registry=REGISTRY)

# LLM latencies run from milliseconds (an error, a cached prompt) to minutes (long generations).
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_TOKEN_GAP = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class RequestStats(Collector):
    """The numbers every request updates, kept as plain ints and floats and turned into metric
    families only when scraped.

    A prometheus_client Counter or Histogram takes a lock and runs Python checks on every update;
    the six updates of a request were 4 % of its instructions (bench/count.py, bench/README.md).
    Everything here runs on the event loop's thread, scrapes included, so no lock is needed. The
    exposition is what the Counters, Histograms and Gauge gave (tests/test_metrics.py compares).
    """

    def __init__(self) -> None:
        self._inflight: dict[str, int] = {}
        self._requests: dict[tuple[str, str, str, str], list[float]] = {}  # labels -> [count, created]
        self._prompt: dict[tuple[str], list[float]] = {}
        self._completion: dict[tuple[str], list[float]] = {}
        self._durations: dict[tuple[str, str], list[float]] = {}  # labels -> bucket counts, sum, created
        self._ttft: dict[tuple[str], list[float]] = {}
        self._gaps: dict[tuple[str], list[float]] = {}

    def attempt_started(self, backend: str) -> None:
        self._inflight[backend] = self._inflight.get(backend, 0) + 1

    def attempt_ended(self, backend: str) -> None:
        self._inflight[backend] -= 1

    def forget_backend(self, backend: str) -> None:
        """A backend a reload removed: its series go (an attempt still running keeps its count)."""
        if not self._inflight.get(backend):
            self._inflight.pop(backend, None)
        for labels in [labels for labels in self._requests if labels[1] == backend]:
            del self._requests[labels]

    def answered(self, model: str, backend: str, endpoint: str, status_class: str) -> None:
        _count(self._requests, (model, backend, endpoint, status_class), 1)

    def duration(self, model: str, endpoint: str, seconds: float) -> None:
        _observe(self._durations, (model, endpoint), _LATENCY, seconds)

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        _count(self._prompt, (model,), prompt)
        _count(self._completion, (model,), completion)

    def first_token(self, model: str, seconds: float) -> None:
        _observe(self._ttft, (model,), _LATENCY, seconds)

    def token_gap(self, model: str, seconds: float) -> None:
        _observe(self._gaps, (model,), _TOKEN_GAP, seconds)

    def collect(self) -> Iterable[Metric]:
        yield _counter("gateway_requests", "Requests answered, by public model, backend, endpoint and status class.",
                       ["model", "backend", "endpoint", "status"], self._requests)
        yield _histogram("gateway_request_duration_seconds", "Time from request received to last byte sent.",
                         ["model", "endpoint"], _LATENCY, self._durations)
        yield _histogram("gateway_time_to_first_token_seconds",
                         "Time from request received to the first content chunk sent.", ["model"], _LATENCY, self._ttft)
        yield _histogram("gateway_inter_token_latency_seconds",
                         "Mean gap between streamed chunks, one observation per stream.", ["model"], _TOKEN_GAP,
                         self._gaps)
        yield _counter("gateway_prompt_tokens", "Prompt tokens, as the runtime counted them.", ["model"],
                       self._prompt)
        yield _counter("gateway_completion_tokens", "Completion tokens, as the runtime counted them.", ["model"],
                       self._completion)
        inflight = GaugeMetricFamily("gateway_inflight_requests", "Requests being served upstream now.",
                                     labels=["backend"])
        for backend, n in self._inflight.items():
            inflight.add_metric([backend], n)
        yield inflight


def _count(series: dict[Any, list[float]], labels: Any, n: float) -> None:
    counter = series.get(labels)
    if counter is None:
        counter = series[labels] = [0, time.time()]  # the count, the series' creation time
    counter[0] += n


def _observe(series: dict[Any, list[float]], labels: Any, bounds: tuple[float, ...], value: float) -> None:
    counts = series.get(labels)
    if counts is None:
        # a count per bucket (the last +Inf), the sum, the series' creation time
        counts = series[labels] = [0.0] * (len(bounds) + 2) + [time.time()]
    counts[bisect.bisect_left(bounds, value)] += 1  # the first bucket whose upper bound is >= value
    counts[-2] += value


def _counter(name: str, documentation: str, labels: list[str],
             series: dict[Any, list[float]]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, (count, created) in series.items():
        family.add_metric(list(values), count, created=created)
    return family


def _histogram(name: str, documentation: str, labels: list[str], bounds: tuple[float, ...],
               series: dict[Any, list[float]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for values, counts in series.items():
        cumulative, buckets = 0.0, []
        for bound, n in zip((*bounds, math.inf), counts):
            cumulative += n
            buckets.append((floatToGoString(bound), cumulative))
        family.add_metric(list(values), buckets, counts[-2])
        # As prometheus_client's Histogram has it (HistogramMetricFamily takes no creation time).
        family.samples.append(Sample(name + "_created", dict(zip(labels, values)), counts[-1]))
    return family


REQUESTS = RequestStats()
REGISTRY.register(REQUESTS)

upstream_errors = Counter(
    "gateway_upstream_errors_total",
    "Failures talking to a backend, by kind (connect, timeout, status: a 5xx or 429, stream).",
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
queue_wait = Histogram("gateway_queue_wait_seconds",
                       "Time a request that had to queue waited for admission, by outcome (admitted, timeout); "
                       "requests admitted at once are not observed.",
                       ["model", "outcome"], buckets=_LATENCY, registry=REGISTRY)
rate_limited = Counter(
    "gateway_rate_limited_total",
    "Requests refused by admission, by reason (rpm, tpm, concurrency, queue_full, key_queue_full, queue_timeout, too_large, capacity).",
    ["model", "reason"], registry=REGISTRY,
)
rejected = Counter(
    "gateway_rejected_total",
    "Requests refused before reaching a backend, by reason (auth, invalid, model_not_found, method, too_large, "
    "unsupported_encoding, unavailable, read_timeout); admission's refusals are in gateway_rate_limited_total only.",
    ["reason"], registry=REGISTRY,
)
admission_mode = Gauge("gateway_admission_mode", "1 for the admission mode in force (redis, local, fail_closed, memory).",
                       ["mode"], registry=REGISTRY)
redis_up = Gauge("gateway_redis_up", "1 while the shared Redis answers, 0 while the circuit is open (0 also with no Redis: "
                 "gateway_admission_mode tells).", registry=REGISTRY)

# Usage accounting (gateway/usage.py): set at each flush, so 0 on a healthy replica whatever its traffic.
usage_unsaved = Gauge(
    "gateway_usage_unsaved_requests",
    "Requests counted in memory that the store has not taken, as of the last usage flush (about once a second).",
    registry=REGISTRY,
)
usage_dropped = Counter(
    "gateway_usage_dropped_requests_total",
    "Requests whose usage was dropped, never to be stored: while usage flushes failed, the counts held passed "
    "usage.MAX_PENDING rows and their oldest hour went.",
    registry=REGISTRY,
)

# The store (gateway/store/redis_mark.py): a Redis that lost the gateway's data answers as if it
# never had any, and every client gets 401; each replica that finds it so counts it once.
store_data_losses = Counter(
    "gateway_store_data_losses_total",
    "Times this replica found its Redis store had lost the gateway's data (restarted without persistence, "
    "flushed, or failed over to an empty replica): keys, usage and rate windows gone.",
    registry=REGISTRY,
)

# Per key: only with metrics.key_labels, since every key is a label value.
key_requests = Counter("gateway_key_requests_total", "Requests by API key id (metrics.key_labels only).",
                       ["key_id", "model", "status"], registry=REGISTRY)
key_tokens = Counter("gateway_key_tokens_total", "Tokens by API key id and kind (metrics.key_labels only).",
                     ["key_id", "kind"], registry=REGISTRY)

_STATES = ("stopped", "starting", "ready", "unhealthy", "stopping", "failed")
_RESTART_CAUSES = ("crash", "unhealthy")
_UPSTREAM_ERRORS = ("connect", "timeout", "status", "stream")


def backend_known(backend: str, runtime: str, slots: int) -> None:
    """A configured backend's series, its counters at 0 from the start: a counter series born at
    1 shows no increase() for its first event, so a first crash or upstream error would reach
    no panel and no alert."""
    backend_slots.labels(backend).set(slots)
    for cause in _RESTART_CAUSES:
        backend_restarts.labels(backend, runtime, cause)
    for state in _STATES:
        backend_transitions.labels(backend, runtime, state)
    for kind in _UPSTREAM_ERRORS:
        upstream_errors.labels(backend, kind)


def backend_transition(backend: str, runtime: str, old: str, new: str) -> None:
    for state in _STATES:
        backend_state.labels(backend, runtime, state).set(1 if state == new else 0)
    backend_ready.labels(backend, runtime).set(1 if new == "ready" else 0)
    backend_transitions.labels(backend, runtime, new).inc()


def forget_backend(backend: str, runtime: str, *, name_too: bool) -> None:
    """The series of a backend a reload removed (`name_too`), or replaced with one of another
    runtime (only that runtime's): a ghost's last values would stay for ever, and its last
    `ready` 0 would fire GatewayBackendDown for ever (deploy/prometheus/alerts.yml)."""
    for family in (backend_state, backend_ready, backend_transitions, backend_restarts, backend_load):
        family.remove_by_labels({"backend": backend, "runtime": runtime})
    if name_too:
        backend_slots.remove_by_labels({"backend": backend})
        upstream_errors.remove_by_labels({"backend": backend})
        REQUESTS.forget_backend(backend)


def forget_key(key_id: str) -> None:
    """The per-key series (metrics.key_labels) of a key that can make no more requests: revoked
    (for good: a revoked key cannot be changed back), or gone from the store. Every key ever
    used would otherwise stay a series for ever."""
    key_requests.remove_by_labels({"key_id": key_id})
    key_tokens.remove_by_labels({"key_id": key_id})


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
