"""Supervision seen from outside: the gateway as a real subprocess, its admin API, a real
llama-server killed under it, and the gateway itself killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import StartGateway
from tests.helpers import ADMIN_KEY, FAKES, GatewayProcess, alive, descendants, wait_until
from tests.supervisor.support import fake

pytestmark = pytest.mark.timeout(180)


def backends(gateway: GatewayProcess) -> dict[str, dict[str, Any]]:
    response = gateway.admin("GET", "/admin/backends")
    assert response.status_code == 200, response.text
    return {b["name"]: b for b in response.json()["data"]}


def chat(gateway: GatewayProcess, key: str, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                      json={"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4,
                            **extra}, timeout=60)


def test_real_llama_server_killed_with_sigkill_is_restarted(start_gateway: StartGateway,
                                                            llamacpp_backend: dict[str, Any]) -> None:
    gateway = start_gateway({"backends": [{**llamacpp_backend, "restart_backoff": "0.2s",
                                           "health_interval": "1s"}]})
    key = gateway.new_key()
    assert chat(gateway, key, "gemma3-270m").status_code == 200
    before = backends(gateway)["gemma"]
    pid = before["pid"]
    assert before["state"] == "ready" and before["restarts"] == 0
    assert "llama-server" in Path(f"/proc/{pid}/cmdline").read_text()

    # Killed mid-stream: the client's stream ends with an error event, at once, never hangs.
    payloads: list[str] = []
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                      json={"model": "gemma3-270m", "stream": True, "max_tokens": 1000, "ignore_eos": True,
                            "messages": [{"role": "user", "content": "Write a long story."}]},
                      timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                payloads.append(line[5:].strip())
                if len(payloads) == 3:
                    os.kill(pid, signal.SIGKILL)
                    killed = time.monotonic()
    assert time.monotonic() - killed < 10
    assert payloads[-1] == "[DONE]" and "error" in json.loads(payloads[-2]), payloads[-3:]

    assert wait_until(lambda: backends(gateway)["gemma"]["restarts"] == 1
                      and backends(gateway)["gemma"]["state"] == "ready", timeout=60), backends(gateway)
    after = backends(gateway)["gemma"]
    assert after["pid"] != pid and alive(after["pid"]) and not alive(pid)
    assert "SIGKILL" in after["last_exit"]
    reply = chat(gateway, key, "gemma3-270m")
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"]
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'gateway_backend_restarts_total{backend="gemma",cause="crash",runtime="llamacpp"} 1.0' in metrics


@pytest.mark.parametrize("mode", ["grandchild", "escape"])
def test_gateway_sigkill_leaves_no_descendant(start_gateway: StartGateway, tmp_path: Path, mode: str) -> None:
    pid_file = tmp_path / "grandchild.pid"
    gateway = start_gateway({"backends": [fake("tree", mode, pid_file=str(pid_file), stop_timeout="1s")]})
    grandchild = int(pid_file.read_text())
    tree = descendants(gateway.proc.pid)
    assert grandchild in tree and len(tree) >= 3  # keeper, runtime, grandchild
    gateway.proc.send_signal(signal.SIGKILL)
    gateway.proc.wait(10)
    # the keeper notices its parent's death at once; SIGKILL for the deaf after stop_timeout
    assert wait_until(lambda: not any(alive(p) for p in tree), timeout=8), \
        f"alive after the gateway's SIGKILL: {[p for p in tree if alive(p)]}"


def test_gateway_sigkill_leaves_no_vllm_engine_behind(start_gateway: StartGateway) -> None:
    """The fake vLLM's EngineCore child survives a SIGKILL of its server, like the real one."""
    gateway = start_gateway({"backends": [{
        "name": "vllm", "runtime": "vllm", "model": "org/fake-model", "serves": ["fake-model"],
        "binary": [sys.executable, str(FAKES / "fake_vllm.py")], "env": {"FAKE_LOAD_SECONDS": "0.3"},
        "startup_timeout": "20s", "stop_timeout": "2s"}]})
    tree = descendants(gateway.proc.pid)
    assert any("EngineCore" in _cmdline(p) for p in tree), [_cmdline(p) for p in tree]
    gateway.proc.send_signal(signal.SIGKILL)
    gateway.proc.wait(10)
    assert wait_until(lambda: not any(alive(p) for p in tree), timeout=8), \
        f"alive after the gateway's SIGKILL: {[_cmdline(p) for p in tree if alive(p)]}"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def test_a_grandchild_holding_the_pipes_cannot_hang_shutdown(start_gateway: StartGateway, tmp_path: Path) -> None:
    pid_file = tmp_path / "holder.pid"
    gateway = start_gateway({"backends": [fake("holder", "hold_pipes", pid_file=str(pid_file), stop_timeout="1s")]})
    holder = int(pid_file.read_text())
    started = time.monotonic()
    gateway.stop(timeout=15)  # raises unless it exits in time (uvicorn re-raises SIGTERM: status -15)
    assert time.monotonic() - started < 6
    assert wait_until(lambda: not alive(holder), timeout=3)


def test_admin_backends_api(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"backends": [
        fake("good"),
        fake("bad", "exit", crash_limit=1, restart_backoff="0.1s"),
        {"name": "far", "runtime": "openai", "url": "http://127.0.0.1:9", "serves": ["far-model"],
         "health_interval": "1s", "health_timeout": "0.5s"},
    ]}, ready=True)
    url = gateway.url

    # admin key only
    assert httpx.get(url + "/admin/backends").status_code == 401
    key = gateway.new_key()
    assert httpx.get(url + "/admin/backends", headers={"authorization": f"Bearer {key}"}).status_code == 401

    listed = backends(gateway)
    good = listed["good"]
    for field in ("state", "pid", "port", "uptime_seconds", "restarts", "last_exit", "inflight", "reason"):
        assert field in good
    assert good["state"] == "ready" and good["pid"] and good["port"] and good["uptime_seconds"] is not None
    assert listed["far"]["managed"] is False and listed["far"]["state"] == "unhealthy"
    assert wait_until(lambda: backends(gateway)["bad"]["restart_in_seconds"] is None, timeout=10)
    bad = backends(gateway)["bad"]
    assert bad["state"] == "failed" and "crash_limit 1" in bad["reason"] and bad["restarts"] == 1

    missing = gateway.admin("GET", "/admin/backends/nope/logs")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert gateway.admin("POST", "/admin/backends/far/stop").status_code == 400

    # logs: JSON, text
    logs = gateway.admin("GET", "/admin/backends/bad/logs", params={"tail": 50})
    assert logs.status_code == 200
    lines = logs.json()["lines"]
    assert 0 < len(lines) <= 50 and any("failed to load model" in line for line in lines)
    text = gateway.admin("GET", "/admin/backends/good/logs", params={"tail": 3, "format": "text"})
    assert text.headers["content-type"].startswith("text/plain") and len(text.text.splitlines()) == 3
    assert gateway.admin("GET", "/admin/backends/good/logs", params={"tail": "many"}).status_code == 400

    # stop, start, restart
    stopped = gateway.admin("POST", "/admin/backends/good/stop")
    assert stopped.status_code == 200 and stopped.json()["state"] == "stopped", stopped.text
    assert not alive(good["pid"])
    assert chat(gateway, key, "good-model").status_code == 503  # an eager backend the operator stopped
    started = gateway.admin("POST", "/admin/backends/good/start")
    assert started.status_code == 200 and started.json()["state"] == "ready", started.text
    restarted = gateway.admin("POST", "/admin/backends/good/restart")
    body = restarted.json()
    assert restarted.status_code == 200 and body["state"] == "ready" and body["starts"] == 3
    assert body["pid"] != started.json()["pid"]
    assert chat(gateway, key, "good-model").status_code == 200

    # the manual reset of a parked backend: a fresh history, one more attempt (which fails again)
    reset = gateway.admin("POST", "/admin/backends/bad/start")
    assert reset.status_code == 503 and "failed to load model" in reset.json()["error"]["message"]
    assert backends(gateway)["bad"]["recent_failures"] == 1


def test_admin_logs_follow_streams_new_lines(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"backends": [fake("chatty")]})
    seen: list[str] = []
    restart = threading.Timer(0.5, lambda: gateway.admin("POST", "/admin/backends/chatty/restart"))
    with httpx.stream("GET", gateway.url + "/admin/backends/chatty/logs", params={"follow": 1, "tail": 2},
                      headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=20) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        restart.start()
        deadline = time.monotonic() + 15
        for line in response.iter_lines():
            seen.append(line)
            if "starting -> ready" in line and len(seen) > 2 or time.monotonic() > deadline:
                break
    restart.join(20)
    assert len(seen) > 2
    assert any("ready -> stopping (restarting by request)" in line for line in seen), seen
    assert "starting -> ready" in seen[-1]

    # SSE
    with httpx.stream("GET", gateway.url + "/admin/backends/chatty/logs", params={"follow": 1, "tail": 1,
                                                                                 "format": "sse"},
                      headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=20) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        first = next(response.iter_lines())
        assert first.startswith("data: ")
