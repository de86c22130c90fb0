"""An Ollama attached by URL: the gateway cannot pull into it, so the listed models it lacks are
named (in /admin/backends and the log) and requests for them get a clear 503."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import StartGateway
from tests.helpers import FAKES, free_port, wait_until


@pytest.fixture
def ollama_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "OLLAMA_HOST": f"127.0.0.1:{port}", "OLLAMA_MODELS": str(tmp_path / "models"),
           "FAKE_OLLAMA_INSTALLED": "llama3.2:1b", "FAKE_LOAD_SECONDS": "0"}
    server = subprocess.Popen([sys.executable, str(FAKES / "fake_ollama.py"), "serve"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(url + "/", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(answers, 15), "fake Ollama did not start"
        yield url
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


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
