"""A backend that is down answers 503 in the OpenAI shape; /ready says which, the admin API why."""

from __future__ import annotations

import sys

import httpx

from tests.conftest import StartGateway
from tests.helpers import free_port


def test_failed_and_unreachable_backends_give_503(start_gateway: StartGateway) -> None:
    dead_port = free_port()  # nothing listens here
    gateway = start_gateway({
        "backends": [
            # A managed runtime that exits at once: a failed start.
            {"name": "broken", "runtime": "llamacpp", "model": "/nonexistent.gguf", "serves": ["broken-model"],
             "binary": [sys.executable, "-c", "import sys; print('error: failed to load model'); sys.exit(1)"],
             "startup_timeout": "10s"},
            {"name": "away", "runtime": "openai", "url": f"http://127.0.0.1:{dead_port}", "serves": ["away-model"]},
        ],
    }, ready=False)
    ready = httpx.get(gateway.url + "/ready")
    assert ready.status_code == 503
    assert ready.json()["backends"] == {"broken": {"state": "failed"}, "away": {"state": "unhealthy"}}
    # The runtime's output (argv, model path) is for operators: on the admin API, not on /ready.
    for detail in ("failed to load model", "nonexistent.gguf", str(dead_port)):
        assert detail not in ready.text
    broken = gateway.admin("GET", "/admin/backends/broken").json()
    assert broken["state"] == "failed" and "failed to load model" in broken["reason"]

    key = gateway.new_key()
    for model in ("broken-model", "away-model"):
        r = httpx.post(gateway.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                       json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503, r.text
        assert r.headers.get("retry-after") == "1"  # an SDK retries after it, not at once
        error = r.json()["error"]
        assert error["code"] == "backend_unavailable" and error["type"] == "server_error"
        assert f"`{model}`" in error["message"]
        assert "failed to load model" not in error["message"]  # operators' details stay on the admin API
