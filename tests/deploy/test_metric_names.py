"""Every metric the dashboard and the alerts read is one the gateway defines, under the name
prometheus-client really exposes (`_total` for counters, `_bucket/_sum/_count` for histograms)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary

from gateway.metrics import REGISTRY
from tests.deploy.names import (
    alert_exprs,
    alert_test_series,
    dashboard,
    dashboard_queries,
    exposed_names,
    metric_names,
    variable_queries,
)

EXPOSED = exposed_names(REGISTRY)


def unknown(sources: dict[str, str]) -> dict[str, list[str]]:
    missing = {}
    for where, promql in sources.items():
        names = sorted(n for n in metric_names(promql) if n not in EXPOSED)
        if names:
            missing[where] = names
    return missing


def test_the_registry_is_the_gateways() -> None:
    # Guards the checks below against an empty or wrong registry, which would make them vacuous.
    assert {"gateway_requests_total", "gateway_request_duration_seconds_bucket", "gateway_backend_ready",
            "gateway_queue_depth", "gateway_key_tokens_total"} <= EXPOSED.keys()
    assert "gateway_requests" not in EXPOSED and "gateway_request_duration_seconds" not in EXPOSED


def test_dashboard_queries_only_defined_metrics() -> None:
    board = dashboard()
    sources = {**dashboard_queries(board), **variable_queries(board)}
    queried = set().union(*(metric_names(q) for q in sources.values()))
    assert len(queried) >= 15, f"the dashboard reads suspiciously few metrics: {sorted(queried)}"
    assert unknown(sources) == {}


def test_alerts_query_only_defined_metrics() -> None:
    exprs = alert_exprs()
    assert {"GatewayBackendDown", "GatewayBackendCrashLoop", "GatewayQueueSaturated", "GatewayHighErrorRatio",
            "GatewayRedisDown", "GatewayUsageNotStored", "GatewayUsageDropped", "GatewayStoreLostData"} <= {
        where.split("/")[1] for where in exprs}
    assert unknown(exprs) == {}


def test_alert_unit_tests_feed_real_metric_names() -> None:
    # A test series under a misspelt name would make an alert test pass for the wrong reason.
    assert unknown(alert_test_series()) == {}


def test_every_gateway_metric_is_on_the_dashboard() -> None:
    board = dashboard()
    sources = {**dashboard_queries(board), **variable_queries(board)}
    shown = {EXPOSED[n] for q in sources.values() for n in metric_names(q) if n in EXPOSED}
    missing = sorted({family for family in EXPOSED.values()} - shown)
    assert missing == [], f"gateway/metrics.py defines metrics no dashboard panel shows: {missing}; " \
                          "add a panel to deploy/grafana/dashboard.json"


# --- the checker itself -----------------------------------------------------------------------

@pytest.mark.parametrize("promql, names", [
    ('sum by (model) (rate(gateway_requests_total{job="gateway", model=~"$model"}[5m]))', {"gateway_requests_total"}),
    ('histogram_quantile(0.95, sum by (le) (rate(gateway_request_duration_seconds_bucket[5m])))',
     {"gateway_request_duration_seconds_bucket"}),
    ('gateway_redis_up == 0 and on (instance) gateway_admission_mode{mode="redis"}',
     {"gateway_redis_up", "gateway_admission_mode"}),
    ('label_replace(up, "x", "gateway_not_a_metric", "", "")', set()),   # a string, not a name
    ('label_values(gateway_backend_ready{instance=~"$instance"}, backend)', {"gateway_backend_ready"}),
    ('my_gateway_thing + gateway_x:rate5m', {"gateway_x:rate5m"}),
])
def test_metric_names_are_found_in_promql(promql: str, names: set[str]) -> None:
    assert metric_names(promql) == names


def test_suffix_rules_follow_prometheus_client() -> None:
    registry = CollectorRegistry()
    Counter("gateway_c_total", "c", ["a"], registry=registry)
    Counter("gateway_d", "d", registry=registry)
    Gauge("gateway_g", "g", ["a"], registry=registry)
    Histogram("gateway_h_seconds", "h", ["a"], registry=registry)
    Summary("gateway_s_seconds", "s", registry=registry)
    assert exposed_names(registry) == {
        "gateway_c_total": "gateway_c", "gateway_d_total": "gateway_d", "gateway_g": "gateway_g",
        "gateway_h_seconds_bucket": "gateway_h_seconds", "gateway_h_seconds_sum": "gateway_h_seconds",
        "gateway_h_seconds_count": "gateway_h_seconds", "gateway_s_seconds": "gateway_s_seconds",
        "gateway_s_seconds_sum": "gateway_s_seconds", "gateway_s_seconds_count": "gateway_s_seconds",
    }


@pytest.mark.parametrize("wrong", [
    "gateway_requests",                      # a counter without _total
    "gateway_request_duration_seconds",      # a histogram without _bucket/_sum/_count
    "gateway_requests_total_bucket",         # a counter read as a histogram
    "gateway_queue_depth_total",             # a gauge read as a counter
    "gateway_request_duration_seconds_created",
    "gateway_no_such_metric_total",
])
def test_a_wrong_name_is_reported(wrong: str) -> None:
    assert unknown({"panel": f'sum(rate({wrong}{{model="x"}}[5m]))'}) == {"panel": [wrong]}
