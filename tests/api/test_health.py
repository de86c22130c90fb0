"""/health, /ready and /metrics: what an orchestrator and a scraper see."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import yaml

from tests.conftest import StartGateway
from tests.helpers import ROOT, free_port

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


def test_health_is_liveness_and_ready_gives_states_only(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"backends": [DEAD]}, ready=False)
    assert httpx.get(gateway.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(gateway.url + "/ready")
    assert ready.status_code == 503
    # No key needed here, so no reason: it names the attached server's address.
    assert ready.json() == {"status": "not ready", "backends": {"b": {"state": "unhealthy"}},
                            "admission": {"mode": "memory"}}
    assert DEAD["url"].split("//")[1] not in ready.text
    why = gateway.admin("GET", "/admin/backends/b").json()  # the admin API still says why
    assert why["state"] == "unhealthy" and "unreachable" in why["reason"]


def test_keys_off_serves_anonymously_on_loopback_only(start_gateway: StartGateway, tmp_path: Path) -> None:
    config = {"data_dir": str(tmp_path / "data"), "backends": [DEAD], "auth": {"required": False}}
    gateway = start_gateway(config, ready=False)
    assert [m["id"] for m in httpx.get(gateway.url + "/v1/models").json()["data"]] == ["m"]

    path = tmp_path / "open.yaml"
    path.write_text(yaml.safe_dump(config))
    refused = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path), "--host", "0.0.0.0",
                              "--port", str(free_port())], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert refused.returncode == 2
    assert "only binds a loopback address" in refused.stderr and "allow_public_without_keys" in refused.stderr


def test_health_and_ready_answer_head_as_get_without_a_body(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"backends": [DEAD]}, ready=False)
    for path, status in (("/health", 200), ("/ready", 503)):
        got = httpx.get(gateway.url + path)
        head = httpx.head(gateway.url + path)
        assert (got.status_code, head.status_code) == (status, status)
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]
