"""A scrape of a real gateway after real traffic: valid for promtool, counting what was sent,
and carrying every metric the dashboard queries."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import REGISTRY
from tests.deploy.names import dashboard, dashboard_queries, exposed_names, metric_names, variable_queries
from tests.helpers import GatewayProcess

MODEL = "gemma3-270m"
MESSAGES = [{"role": "user", "content": "Name a colour."}]
Samples = list[tuple[str, dict[str, str], float]]


def scrape(gateway: GatewayProcess) -> str:
    response = httpx.get(gateway.url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def samples(text: str) -> Samples:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def total(scraped: Samples, name: str, **labels: str) -> float:
    return sum(value for n, l, value in scraped if n == name and labels.items() <= l.items())


def chat(client: httpx.Client, stream: bool) -> tuple[int, dict[str, int]]:
    """One chat completion; returns its HTTP status and the usage the gateway reported."""
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6}
    if not stream:
        response = client.post("/v1/chat/completions", json=body)
        assert response.is_success, response.text
        return response.status_code, response.json()["usage"]
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    usage = None
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.is_success, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: "):])
                usage = chunk.get("usage") or usage
    assert usage is not None, "the stream ended without its usage chunk"
    return response.status_code, usage


@pytest.fixture(scope="module")
def traffic(llama_gateway: GatewayProcess) -> tuple[Samples, Samples, list[tuple[int, dict[str, int]]], str]:
    """Scrape, send 2 plain and 2 streamed chats, scrape again."""
    key = llama_gateway.new_key(name="deploy-scrape")
    before = samples(scrape(llama_gateway))
    with llama_gateway.http(key) as client:
        usages = [chat(client, stream) for stream in (False, True, False, True)]
    after_text = scrape(llama_gateway)
    return before, samples(after_text), usages, after_text


def delta(traffic: tuple[Samples, Samples, Any, Any]) -> Callable[..., float]:
    before, after = traffic[0], traffic[1]
    return lambda name, **labels: total(after, name, **labels) - total(before, name, **labels)


def test_promtool_check_metrics(promtool: str, traffic: Any) -> None:
    text = traffic[3]
    assert "gateway_requests_total{" in text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stdout + result.stderr


def test_request_counters_match_the_traffic(traffic: Any) -> None:
    change = delta(traffic)
    assert change("gateway_requests_total") == 4
    assert change("gateway_requests_total", model=MODEL, endpoint="chat", status="2xx") == 4
    assert change("gateway_request_duration_seconds_count", model=MODEL, endpoint="chat") == 4
    assert change("gateway_time_to_first_token_seconds_count", model=MODEL) == 2   # the two streams
    assert change("gateway_rate_limited_total") == 0 and change("gateway_rejected_total") == 0


def test_answers_are_200_as_openai(traffic: Any) -> None:
    assert [status for status, _ in traffic[2]] == [200] * 4


def test_token_counters_match_the_usage_reported(traffic: Any) -> None:
    change, usages = delta(traffic), [usage for _, usage in traffic[2]]
    assert all(u["prompt_tokens"] > 0 and u["completion_tokens"] > 0 for u in usages)
    assert change("gateway_prompt_tokens_total", model=MODEL) == sum(u["prompt_tokens"] for u in usages)
    assert change("gateway_completion_tokens_total", model=MODEL) == sum(u["completion_tokens"] for u in usages)


def test_gauges_after_the_traffic(traffic: Any) -> None:
    after = traffic[1]
    assert total(after, "gateway_inflight_requests") == 0
    assert total(after, "gateway_backend_ready", backend="gemma", runtime="llamacpp") == 1
    assert total(after, "gateway_backend_state", backend="gemma", state="ready") == 1
    assert total(after, "gateway_backend_state", backend="gemma") == 1  # exactly one state at a time


def test_every_dashboard_metric_is_in_the_scrape(traffic: Any) -> None:
    # A labelled metric without samples yet still has its # TYPE line: the family is there.
    families = {f.name: f for f in text_string_to_metric_families(traffic[3])}
    exposed = exposed_names(REGISTRY)
    board = dashboard()
    queried = {n for q in {**dashboard_queries(board), **variable_queries(board)}.values() for n in metric_names(q)}
    missing = sorted(n for n in queried if exposed.get(n) not in families)
    assert missing == []
    # What the traffic must have produced samples for, under the names the dashboard uses.
    names = {name for name, _, _ in traffic[1]}
    assert {"gateway_requests_total", "gateway_request_duration_seconds_bucket", "gateway_prompt_tokens_total",
            "gateway_completion_tokens_total", "gateway_time_to_first_token_seconds_bucket",
            "gateway_backend_ready", "gateway_backend_state"} <= names


def test_scraped_names_follow_the_suffix_rules(traffic: Any) -> None:
    # The rule tests/deploy/names.py applies to the registry matches what the gateway really writes.
    exposed = exposed_names(REGISTRY)
    names = {name for name, _, _ in traffic[1] if name.startswith("gateway_")}
    assert names and {n for n in names if not n.endswith("_created")} <= exposed.keys()


def test_rate_limited_counter_matches_the_refusals(llama_gateway: GatewayProcess) -> None:
    # A key allowed 50 tokens a minute asking for up to 200: refused at once, reason too_large.
    key = llama_gateway.new_key(name="deploy-tpm", tpm=50)
    before = samples(scrape(llama_gateway))
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200}
    with llama_gateway.http(key) as client:
        statuses = [client.post("/v1/chat/completions", json=body).status_code for _ in range(3)]
    after = samples(scrape(llama_gateway))
    assert statuses == [429] * 3
    change = delta((before, after, None, None))
    assert change("gateway_rate_limited_total", model=MODEL, reason="too_large") == 3
    assert change("gateway_rate_limited_total") == 3
    assert change("gateway_prompt_tokens_total") == 0 and change("gateway_completion_tokens_total") == 0


def test_counters_are_there_at_zero_before_their_first_event(traffic: Any) -> None:
    # A series born at 1 shows no increase() for its first event: a first crash, restart or
    # upstream error would reach no panel and no alert.
    before = traffic[0]

    def series(name: str, **labels: str) -> list[float]:
        return [value for n, l, value in before if n == name and labels.items() <= l.items()]

    for cause in ("crash", "unhealthy"):
        assert series("gateway_backend_restarts_total", backend="gemma", runtime="llamacpp", cause=cause) == [0.0]
    for kind in ("connect", "timeout", "status", "stream"):
        assert series("gateway_upstream_errors_total", backend="gemma", kind=kind) == [0.0]
    assert series("gateway_backend_transitions_total", backend="gemma", state="failed") == [0.0]

