"""/health, /ready and /metrics: what an orchestrator and a scraper see."""

from __future__ import annotations

import httpx

from tests.conftest import StartGateway
from tests.helpers import free_port

DEAD = {"name": "b", "runtime": "openai", "url": f"http://127.0.0.1:{free_port()}", "serves": ["m"]}


def test_metrics_token_and_switch(start_gateway: StartGateway) -> None:
    guarded = start_gateway({"backends": [DEAD], "metrics": {"token": "scrape-me"}}, ready=False)
    assert httpx.get(guarded.url + "/metrics").status_code == 401
    assert httpx.get(guarded.url + "/metrics", headers={"authorization": "Bearer wrong"}).status_code == 401
    ok = httpx.get(guarded.url + "/metrics", headers={"authorization": "Bearer scrape-me"})
    assert ok.status_code == 200 and "gateway_backend_ready" in ok.text

    off = start_gateway({"backends": [DEAD], "metrics": {"enabled": False}}, ready=False)
    r = httpx.get(off.url + "/metrics")
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("Metrics are switched off")


def test_health_is_liveness_and_ready_says_why(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"backends": [DEAD]}, ready=False)
    assert httpx.get(gateway.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(gateway.url + "/ready")
    assert ready.status_code == 503
    body = ready.json()
    assert body["backends"]["b"]["state"] == "unhealthy" and "unreachable" in body["backends"]["b"]["reason"]
    assert body["admission"]["mode"] == "memory"
