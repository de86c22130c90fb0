"""An Ollama attached by URL: the gateway cannot pull into it, so the listed models it lacks are
named (in /admin/backends and the log) and requests for them get a clear 503."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import StartGateway
from tests.helpers import FAKES, free_port, server_by_hand


@pytest.fixture
def ollama_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    with server_by_hand(
        [sys.executable, str(FAKES / "fake_ollama.py"), "serve"], f"http://127.0.0.1:{port}", ready_path="/",
        what="fake Ollama", timeout=15,
        env={"OLLAMA_HOST": f"127.0.0.1:{port}", "OLLAMA_MODELS": str(tmp_path / "models"),
             "FAKE_OLLAMA_INSTALLED": "llama3.2:1b", "FAKE_LOAD_SECONDS": "0"},
    ) as url:
        yield url


def test_missing_models_are_named(start_gateway: StartGateway, ollama_url: str) -> None:
    gateway = start_gateway({"backends": [{"name": "box", "runtime": "ollama", "url": ollama_url,
                                           "serves": ["llama3.2:1b", "qwen2.5:0.5b"]}]})
    info = gateway.admin("GET", "/admin/backends/box").json()
    assert info["state"] == "ready" and info["missing_models"] == ["qwen2.5:0.5b"]
    assert "does not have qwen2.5:0.5b" in gateway.log()
    key = gateway.new_key()
    r = httpx.post(gateway.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                   json={"model": "qwen2.5:0.5b", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_installed"
    ok = httpx.post(gateway.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                    json={"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200
