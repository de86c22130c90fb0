"""Model groups through real gateway processes: load spreads by free slots, a killed backend
costs no request that had not started streaming and rejoins, and reloads drop nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import StartGateway
from tests.helpers import FAKES, GatewayProcess, wait_until


def fake_vllm(name: str, serves: list[str], *, slots: int = 4, token_delay: float = 0.002,
              **extra: Any) -> dict[str, Any]:
    """A managed backend running the fake vLLM (the real supervisor spawns it)."""
    return {"name": name, "runtime": "vllm", "model": "fake-model", "serves": serves, "slots": slots,
            "binary": [sys.executable, str(FAKES / "fake_vllm.py")],
            "env": {"FAKE_LOAD_SECONDS": "0.2", "FAKE_TOKEN_DELAY": str(token_delay)},
            "startup_timeout": "20s", "stop_timeout": "3s", "health_interval": "1s",
            "restart_backoff": "0.2s", **extra}


def served_by(gateway: GatewayProcess) -> dict[str, float]:
    """Successful requests per backend, from the gateway's own metrics."""
    counts: dict[str, float] = {}
    for line in httpx.get(gateway.url + "/metrics").text.splitlines():
        if line.startswith("gateway_requests_total{") and 'status="2xx"' in line:
            backend = line.split('backend="')[1].split('"')[0]
            counts[backend] = counts.get(backend, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def backend_pid(gateway: GatewayProcess, name: str) -> int:
    """The runtime's own pid (the keeper's child), from the admin API."""
    info = gateway.admin("GET", f"/admin/backends/{name}").json()
    return int(info["pid"])


async def fire(gateway: GatewayProcess, key: str, n: int, *, concurrency: int, model: str = "m",
               stream: bool = False, max_tokens: int = 8) -> list[int]:
    statuses: list[int] = []
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60,
                                 headers={"authorization": f"Bearer {key}"}) as client:

        async def one(i: int) -> None:
            async with sem:
                body = {"model": model, "messages": [{"role": "user", "content": f"hello {i}"}],
                        "max_tokens": max_tokens, "stream": stream}
                r = await client.post("/v1/chat/completions", json=body)
                if stream and r.status_code == 200:
                    assert "data: [DONE]" in r.text
                    # an error event after the first byte would be a failed request too
                    statuses.append(502 if '"error"' in r.text else 200)
                else:
                    statuses.append(r.status_code)

        await asyncio.gather(*(one(i) for i in range(n)))
    return statuses


async def test_load_spreads_by_free_slots(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"backends": [fake_vllm("fast", ["m"], token_delay=0.001),
                                          fake_vllm("slow", ["m"], token_delay=0.03)]})
    key = gateway.new_key()
    statuses = await fire(gateway, key, 80, concurrency=6, max_tokens=10)
    assert statuses == [200] * 80
    served = served_by(gateway)
    assert served["fast"] + served["slow"] == 80
    assert served["fast"] > 2 * served["slow"], served  # the slow one holds its slots longer


async def test_killed_backend_costs_no_request_and_rejoins(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"backends": [fake_vllm("a", ["m"]), fake_vllm("b", ["m"])]})
    key = gateway.new_key()
    pid = backend_pid(gateway, "a")
    load = asyncio.create_task(fire(gateway, key, 150, concurrency=8, max_tokens=20))
    await asyncio.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    statuses = await asyncio.wait_for(load, 60)
    assert statuses == [200] * 150, sorted(set(statuses))
    assert wait_until(lambda: gateway.admin("GET", "/admin/backends/a").json()["state"] == "ready", 20)
    assert backend_pid(gateway, "a") != pid
    before = served_by(gateway).get("a", 0)
    assert await fire(gateway, key, 40, concurrency=8) == [200] * 40
    assert served_by(gateway)["a"] > before  # it takes requests again


async def test_streams_not_yet_started_fail_over(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"backends": [fake_vllm("a", ["m"]), fake_vllm("b", ["m"])]})
    key = gateway.new_key()
    os.kill(backend_pid(gateway, "a"), signal.SIGKILL)  # before its health probe notices
    statuses = await fire(gateway, key, 20, concurrency=4, stream=True)
    assert statuses == [200] * 20


def test_reload_adds_removes_and_changes_without_dropping_a_request(start_gateway: StartGateway,
                                                                    tmp_path: Path) -> None:
    first = {"backends": [fake_vllm("keep", ["m"], token_delay=0.05), fake_vllm("gone", ["old"])],
             "models": {"aliases": {"alias": "m"}}}
    gateway = start_gateway(first)
    key = gateway.new_key()
    headers = {"authorization": f"Bearer {key}"}
    config = yaml.safe_load(gateway.config_path.read_text())

    # A long stream on `keep` while its slots change: it drains, finishes whole, then restarts.
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=60) as client, \
            client.stream("POST", "/v1/chat/completions",
                          json={"model": "m", "messages": [{"role": "user", "content": "tell me a story"}],
                                "max_tokens": 60, "stream": True}) as streaming:
        assert streaming.status_code == 200
        lines = streaming.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert ghost_series(gateway)  # `gone` has its gauges while configured
        config["backends"] = [fake_vllm("keep", ["m"], slots=2, token_delay=0.05), fake_vllm("new", ["fresh"])]
        gateway.config_path.write_text(yaml.safe_dump(config))
        reloaded = gateway.admin("POST", "/admin/reload")
        assert reloaded.status_code == 200, reloaded.text
        summary = reloaded.json()
        assert (summary["added"], summary["removed"], summary["changed"]) == (["new"], ["gone"], ["keep"])
        rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest)

    def chat(model: str) -> int:
        return httpx.post(gateway.url + "/v1/chat/completions", headers=headers, timeout=30,
                          json={"model": model, "messages": [{"role": "user", "content": "hi"}]}).status_code

    assert wait_until(lambda: chat("fresh") == 200, 20)
    assert wait_until(lambda: chat("alias") == 200, 20)
    assert chat("old") == 404
    assert gateway.admin("GET", "/admin/backends/keep").json()["slots"] == 2
    # The removed backend's series go: its last `ready` 0 would fire GatewayBackendDown for ever.
    assert wait_until(lambda: not ghost_series(gateway), 20), ghost_series(gateway)
    assert 'gateway_backend_ready{backend="new",runtime="vllm"}' in httpx.get(gateway.url + "/metrics").text

    # An invalid file changes nothing and says why; so does a change that needs a restart.
    gateway.config_path.write_text(yaml.safe_dump({**config, "backends": [{"name": "x"}]}))
    refused = gateway.admin("POST", "/admin/reload")
    assert refused.status_code == 400 and "backends[0].runtime: required" in refused.json()["error"]["message"]
    gateway.config_path.write_text(yaml.safe_dump({**config, "store": {"url": "redis://127.0.0.1:1/0"}}))
    refused = gateway.admin("POST", "/admin/reload")
    assert refused.status_code == 400 and "store" in refused.json()["error"]["message"]
    assert chat("fresh") == 200


def test_sighup_reloads(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"backends": [fake_vllm("one", ["m"])]})
    key = gateway.new_key()
    config = yaml.safe_load(gateway.config_path.read_text())
    config["models"] = {"aliases": {"gpt-4o-mini": "m"}}
    gateway.config_path.write_text(yaml.safe_dump(config))
    gateway.proc.send_signal(signal.SIGHUP)
    models = lambda: [m["id"] for m in httpx.get(gateway.url + "/v1/models",  # noqa: E731
                                                  headers={"authorization": f"Bearer {key}"}).json()["data"]]
    assert wait_until(lambda: "gpt-4o-mini" in models(), 10)
    assert gateway.proc.poll() is None
    start = time.monotonic()
    assert wait_until(lambda: "config reloaded on SIGHUP" in gateway.log(), 5)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("header", ["x-session-id"])
async def test_session_affinity_keeps_one_backend(start_gateway: StartGateway, header: str) -> None:
    gateway = start_gateway({"backends": [fake_vllm("a", ["m"]), fake_vllm("b", ["m"]), fake_vllm("c", ["m"])]})
    key = gateway.new_key()
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30,
                                 headers={"authorization": f"Bearer {key}", header: "conversation-42"}) as client:
        for _ in range(12):
            r = await client.post("/v1/chat/completions",
                                  json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
    served = {k: v for k, v in served_by(gateway).items() if v}
    assert len(served) == 1 and sum(served.values()) == 12, served


def test_per_model_overrides(start_gateway: StartGateway) -> None:
    gateway = start_gateway({
        "backends": [fake_vllm("a", ["tuned", "plain"], token_delay=0.05)],
        "models": {"overrides": {"tuned": {"max_body": "2KiB", "request_timeout": "0.5s",
                                           "defaults": {"temperature": 0.2, "top_p": 0.5}}}},
    })
    key = gateway.new_key()
    headers = {"authorization": f"Bearer {key}"}
    port = gateway.admin("GET", "/admin/backends/a").json()["port"]

    def last_request() -> dict[str, Any]:
        return httpx.get(f"http://127.0.0.1:{port}/fake/last_request").json()  # type: ignore[no-any-return]

    def chat(model: str, **extra: Any) -> httpx.Response:
        return httpx.post(gateway.url + "/v1/chat/completions", headers=headers, timeout=30,
                          json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                **extra})

    assert chat("tuned").status_code == 200
    assert (last_request()["temperature"], last_request()["top_p"]) == (0.2, 0.5)  # injected
    assert chat("tuned", temperature=1.5).status_code == 200
    assert last_request()["temperature"] == 1.5  # the client's own value wins
    assert chat("plain").status_code == 200
    assert "temperature" not in last_request()  # other models untouched

    big = chat("tuned", user="x" * 3000)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert chat("plain", user="x" * 3000).status_code == 200  # the server-wide bound still allows it

    slow = chat("tuned", max_tokens=40)  # 40 tokens at 50 ms each: past the 0.5 s override
    assert slow.status_code == 504, slow.text
    assert slow.json()["error"]["code"] == "upstream_timeout"
    assert chat("plain", max_tokens=40).status_code == 200


def ghost_series(gateway: GatewayProcess) -> list[str]:
    """The /metrics lines about the backend named `gone`."""
    text = httpx.get(gateway.url + "/metrics", timeout=10).text
    return [line for line in text.splitlines() if 'backend="gone"' in line and not line.startswith("#")]


def _incarnations(mark: str) -> set[str]:
    """The RELOAD_MARK values of the fake vLLM runtimes alive now that carry `mark`."""
    alive = set()
    for proc in Path("/proc").iterdir():
        try:
            if b"fake_vllm" not in (proc / "cmdline").read_bytes():
                continue
            env = dict(item.split(b"=", 1) for item in (proc / "environ").read_bytes().split(b"\0") if b"=" in item)
        except (OSError, ValueError):
            continue  # not a process, or gone meanwhile
        value = env.get(b"RELOAD_MARK", b"").decode()
        if value.startswith(mark):
            alive.add(value)
    return alive


def test_reloads_in_quick_succession_never_run_two_copies(start_gateway: StartGateway) -> None:
    # The audit's case: a second reload while the first one's change still drains started the
    # newest copy beside the draining one, and left the middle one running, unlisted.
    mark = f"m{os.getpid()}-{time.monotonic_ns()}-"

    def keep(n: int) -> dict[str, Any]:
        backend = fake_vllm("keep", ["m"], token_delay=0.05)
        backend["env"] = {**backend["env"], "RELOAD_MARK": f"{mark}{n}"}
        return backend

    gateway = start_gateway({"backends": [keep(1)]})
    config = yaml.safe_load(gateway.config_path.read_text())
    seen: list[set[str]] = []
    with httpx.Client(base_url=gateway.url, headers={"authorization": f"Bearer {gateway.new_key()}"},
                      timeout=60) as client, \
            client.stream("POST", "/v1/chat/completions",
                          json={"model": "m", "messages": [{"role": "user", "content": "a long one"}],
                                "max_tokens": 40, "stream": True}) as streaming:
        lines = streaming.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        for n in (2, 3):  # the first change is still draining (the stream holds it) when the second comes
            config["backends"] = [keep(n)]
            gateway.config_path.write_text(yaml.safe_dump(config))
            assert gateway.admin("POST", "/admin/reload").status_code == 200
            seen.append(_incarnations(mark))
        for line in lines:
            seen.append(_incarnations(mark))
    deadline = time.monotonic() + 30
    while _incarnations(mark) != {f"{mark}3"}:
        seen.append(_incarnations(mark))
        assert time.monotonic() < deadline, seen[-1]
        time.sleep(0.1)
    time.sleep(1.0)  # nothing else comes up afterwards
    assert _incarnations(mark) == {f"{mark}3"}
    assert all(len(alive) <= 1 for alive in seen), [alive for alive in seen if len(alive) > 1]
    assert wait_until(lambda: gateway.admin("GET", "/admin/backends/keep").json()["state"] == "ready", 20)
