"""On-demand start, idle stop and exclusive-group swaps through the gateway's request path.

These need the request path to call `Supervisor.ensure_ready` (gateway/api/v1.py); until it does
they are skipped. The same behaviour is tested in-process in test_on_demand.py."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from typing import Any

import httpx
import pytest

from tests.conftest import StartGateway
from tests.helpers import ROOT, GatewayProcess, wait_until
from tests.supervisor.support import fake

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif("ensure_ready" not in (ROOT / "gateway" / "api" / "v1.py").read_text(),
                       reason="the request path does not call Supervisor.ensure_ready yet"),
]

SLOW = {"FAKE_TOKEN_DELAY": "0.05", "FAKE_OUTPUT_WORDS": "30"}


def state(gateway: GatewayProcess, name: str) -> dict[str, Any]:
    response = gateway.admin("GET", f"/admin/backends/{name}")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def chat(gateway: GatewayProcess, key: str, model: str, timeout: float = 30) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]}, timeout=timeout)


def test_twenty_concurrent_first_requests_start_it_once_and_idle_stops_it(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"backends": [fake("lazy", start="on_demand", idle_ttl="1.5s", slots=4)]}, ready=False)
    assert state(gateway, "lazy")["state"] == "stopped"
    key = gateway.new_key()
    # /ready through the whole cycle (stopped, starting, ready, stopping when idle, stopped):
    # none of it is a fault, so a load balancer must never take the replica out for it.
    readiness: list[int] = []
    watching = threading.Event()

    def watch_ready() -> None:
        while not watching.is_set():
            readiness.append(httpx.get(gateway.url + "/ready", timeout=10).status_code)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_ready, daemon=True)
    watcher.start()
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda _: chat(gateway, key, "lazy-model"), range(20)))
    assert [r.status_code for r in replies] == [200] * 20, [r.text for r in replies if r.status_code != 200][:2]
    info = state(gateway, "lazy")
    assert info["state"] == "ready" and info["starts"] == 1
    assert wait_until(lambda: state(gateway, "lazy")["state"] == "stopped", timeout=8)
    assert "idle for 1.5s" in state(gateway, "lazy")["reason"]
    assert chat(gateway, key, "lazy-model").status_code == 200
    assert state(gateway, "lazy")["starts"] == 2
    watching.set()
    watcher.join(15)
    assert len(readiness) > 20 and set(readiness) == {200}, readiness


def test_exclusive_group_swap_never_cuts_off_a_stream(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"backends": [fake("a", group="gpu", env=SLOW, slots=2),
                                          fake("b", group="gpu", env=SLOW, slots=2)]})
    assert state(gateway, "a")["state"] == "ready" and state(gateway, "b")["state"] == "stopped"
    key = gateway.new_key()
    first_chunk = threading.Event()
    events: list[tuple[float, str]] = []
    events_lock = threading.Lock()
    payloads: list[str] = []

    def note(what: str) -> None:
        with events_lock:
            events.append((time.monotonic(), what))

    def stream_a() -> None:
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                          json={"model": "a-model", "stream": True,
                                "messages": [{"role": "user", "content": "tell me a story"}]},
                          timeout=30) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data:"):
                    payloads.append(line[5:].strip())
                    first_chunk.set()
        note("a done")

    def ask_b() -> httpx.Response:
        assert first_chunk.wait(10)
        note("b asked")
        reply = chat(gateway, key, "b-model")
        note("b answered")
        return reply

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a_future, b_future = pool.submit(stream_a), pool.submit(ask_b)
        a_future.result(60)
        b_reply = b_future.result(60)
    assert b_reply.status_code == 200, b_reply.text
    order = [what for _, what in sorted(events)]
    assert order == ["b asked", "a done", "b answered"], order
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert not any("error" in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert len(text.split()) == 30  # every word of the answer arrived
    assert state(gateway, "a")["state"] == "stopped" and state(gateway, "b")["state"] == "ready"

    # and back: a request for a swaps again
    assert chat(gateway, key, "a-model").status_code == 200
    assert state(gateway, "a")["state"] == "ready" and state(gateway, "b")["state"] == "stopped"


def test_an_operators_stop_of_a_starting_backend_answers_at_once(start_gateway: StartGateway) -> None:
    """POST /admin/backends/{name}/stop while a big model loads for a request: the stop does not
    wait for the load (startup_timeout, here a minute), and the waiting request gets its 503."""
    gateway = start_gateway({"backends": [fake("big", start="on_demand", startup_timeout="60s",
                                               env={"FAKE_LOAD_SECONDS": "60"})]}, ready=False)
    key = gateway.new_key()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        request = pool.submit(chat, gateway, key, "big-model", 90)
        assert wait_until(lambda: state(gateway, "big")["state"] == "starting", timeout=10)
        started = time.monotonic()
        stopped = gateway.admin("POST", "/admin/backends/big/stop?wait=20")
        assert stopped.status_code == 200, stopped.text  # 202: still waiting after 20s
        assert stopped.json()["state"] == "stopped"
        reply = request.result(10)
        assert time.monotonic() - started < 15
    assert reply.status_code == 503, reply.text
    assert state(gateway, "big")["starts"] == 1
