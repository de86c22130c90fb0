"""Model groups through real gateway processes: load spreads by free slots, a killed backend
costs no request that had not started streaming and rejoins, and reloads drop nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import StartGateway
from tests.helpers import FAKES, GatewayProcess, error_of, wait_until


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


# --- replicas that misbehave: stall, hang, answer slowly, refuse ---------------------------------

class _Replica(BaseHTTPRequestHandler):
    """An attached OpenAI server serving `m`, behaving as its server's `behaviour` says: `delay`
    (seconds before it answers), `stall` ("first": a stream's headers, then nothing; "mid": two
    chunks, then nothing), `status` (+ `retry_after`): refuse with it, `hang_up`: close the
    connection without an answer, `sick`: fail the health probe."""

    protocol_version = "HTTP/1.1"
    server: _ReplicaServer

    def do_GET(self) -> None:  # the health probe (/v1/models)
        if self.server.behaviour.get("sick"):
            self._json(503, {"error": {"message": "sick", "type": "server_error"}})
            return
        self._json(200, {"object": "list", "data": [{"id": "m", "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        behaviour = self.server.behaviour
        self.server.requests += 1
        if behaviour.get("hang_up"):
            self.close_connection = True
            return
        if self.server.gone.wait(behaviour.get("delay", 0)):
            return
        if "status" in behaviour:
            self._json(behaviour["status"], {"error": {"message": "busy", "type": "rate_limit_error"}},
                       {"retry-after": str(behaviour.get("retry_after", 1))})
            return
        if not body.get("stream"):
            self._json(200, {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": self.server.name},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        for i in range(4):
            if (behaviour.get("stall") == "first" and i == 0) or (behaviour.get("stall") == "mid" and i == 2):
                self.server.gone.wait(60)
                return
            self._chunk({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                         "choices": [{"index": 0, "delta": {"content": f"{self.server.name}{i} "},
                                      "finish_reason": "stop" if i == 3 else None}]})
        self._chunk("[DONE]")
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, payload: Any) -> None:
        data = b"data: " + (payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()) + b"\n\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"content-type": "application/json", "content-length": str(len(payload)),
                            **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


class _ReplicaServer(ThreadingHTTPServer):
    block_on_close = False

    def __init__(self, name: str, behaviour: dict[str, Any]) -> None:
        super().__init__(("127.0.0.1", 0), _Replica)
        self.name, self.behaviour, self.requests = name, behaviour, 0
        self.gone = threading.Event()  # set: every waiting handler returns at once

    def stop(self) -> None:
        """As a killed replica: nothing listens any more (answers on their way still finish)."""
        self.shutdown()
        self.server_close()


@contextlib.contextmanager
def replicas(**behaviours: dict[str, Any]) -> Iterator[dict[str, _ReplicaServer]]:
    servers = {name: _ReplicaServer(name, behaviour) for name, behaviour in behaviours.items()}
    for server in servers.values():
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield servers
    finally:
        for server in servers.values():
            server.gone.set()
            with contextlib.suppress(OSError):
                server.stop()


def attached(servers: dict[str, _ReplicaServer], **extra: Any) -> list[dict[str, Any]]:
    return [{"name": name, "runtime": "openai", "url": f"http://127.0.0.1:{server.server_port}", "serves": ["m"],
             "health_interval": "0.3s", **extra} for name, server in servers.items()]


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _series(gateway: GatewayProcess, name: str) -> dict[str, float]:
    """A metric's non-zero series on the gateway's /metrics: their labels as written -> value."""
    series = {}
    for line in httpx.get(gateway.url + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            if float(value):
                series[labels] = float(value)
    return series


def test_a_request_that_fails_over_is_counted_once_under_the_backend_that_answered(
        start_gateway: StartGateway) -> None:
    """The client saw one answer: counted per attempt, a failover nobody noticed would page the 5xx
    alert. A request every backend failed is counted once, under the last one tried."""
    with replicas(bad={"status": 500}, good={}) as servers:
        gateway = start_gateway({"backends": attached(servers)})
        with gateway.http(gateway.new_key()) as client:
            on_bad = _session_for("bad", ["good"])
            for _ in range(3):
                r = client.post("/v1/chat/completions", json=CHAT, headers={"x-session-id": on_bad})
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "good", r.text
            assert _series(gateway, "gateway_requests_total") == {
                'backend="good",endpoint="chat",model="m",status="2xx"': 3.0}
            assert _series(gateway, "gateway_upstream_errors_total") == {
                'backend="bad",kind="status"': float(servers["bad"].requests)}
            servers["good"].behaviour.update(status=502)
            r = client.post("/v1/chat/completions", json=CHAT, headers={"x-session-id": on_bad})
            assert r.status_code == 502, r.text
            failed = {k: v for k, v in _series(gateway, "gateway_requests_total").items() if 'status="5xx"' in k}
            assert len(failed) == 1 and list(failed.values()) == [1.0] and 'backend="none"' not in next(iter(failed))


def test_a_503_after_failing_over_across_every_backend_is_no_rejection(start_gateway: StartGateway) -> None:
    """gateway_rejected_total counts requests turned away before any backend: "none is ready" still
    is one. A request every backend failed is counted in gateway_requests_total, its failures in
    gateway_upstream_errors_total; it used to be counted a rejection too."""
    with replicas(a={"hang_up": True}, b={"hang_up": True}) as servers:
        gateway = start_gateway({"backends": attached(servers, health_failures=1), "queue": {"max_wait": "1s"}})
        with gateway.http(gateway.new_key()) as client:
            r = client.post("/v1/chat/completions", json=CHAT)
            assert error_of(r, 503)["code"] == "backend_unavailable"
            assert servers["a"].requests and servers["b"].requests  # both were tried
            assert _series(gateway, "gateway_rejected_total") == {}
            failed = _series(gateway, "gateway_requests_total")
            assert list(failed.values()) == [1.0] and 'status="5xx"' in next(iter(failed)), failed
            assert set(_series(gateway, "gateway_upstream_errors_total")) == {
                'backend="a",kind="connect"', 'backend="b",kind="connect"'}

            for server in servers.values():
                server.behaviour["sick"] = True
            assert wait_until(lambda: all(gateway.admin("GET", f"/admin/backends/{name}").json()["state"] != "ready"
                                          for name in servers), 10)
            r = client.post("/v1/chat/completions", json=CHAT)
            assert error_of(r, 503)["code"] == "backend_unavailable"
            assert _series(gateway, "gateway_rejected_total") == {'reason="unavailable"': 1.0}


def test_a_queue_wait_of_0_refuses_at_once_what_cannot_be_admitted_now(start_gateway: StartGateway) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with replicas(slow={"delay": 3.0}) as servers:
        gateway = start_gateway({"backends": attached(servers, slots=1), "queue": {"max_wait": 0}})
        with gateway.http(gateway.new_key()) as client, ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.post, "/v1/chat/completions", json=CHAT)
            assert wait_until(lambda: servers["slow"].requests == 1, 5)  # it holds the one slot
            r = client.post("/v1/chat/completions", json=CHAT)
            assert not first.done()  # refused while the slot was taken, not after it came free
            assert error_of(r, 503)["code"] == "backend_unavailable" and r.headers["retry-after"] == "1"
            assert first.result().status_code == 200
        assert _series(gateway, "gateway_rate_limited_total") == {'model="m",reason="capacity"': 1.0}


def test_a_stream_silent_before_its_first_chunk_fails_over_and_one_stalling_mid_way_is_cut(
        start_gateway: StartGateway) -> None:
    with replicas(hung={"stall": "first"}, fine={}, stalling={"stall": "mid"}) as servers:
        gateway = start_gateway({"backends": attached(servers), "server": {"request_timeout": "60s"},
                                 "models": {"overrides": {"m": {"stream_idle_timeout": "1s"}}}})
        seen = {"failed over": False, "cut": False}
        fine_session = None
        with gateway.http(gateway.new_key()) as client:
            # Sessions spread over the replicas (x-session-id affinity) until each case was seen.
            for session in map(str, range(60)):
                hung_before, started = servers["hung"].requests, time.monotonic()
                r = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers={"x-session-id": session})
                took = time.monotonic() - started
                assert r.status_code == 200, r.text
                events = [line.removeprefix("data: ") for line in r.text.splitlines() if line]
                assert events[-1] == "[DONE]"
                if "stalling1" in r.text:  # two chunks, then 1 s of silence: cut with an error event
                    assert json.loads(events[-2])["error"]["message"] == "The backend sent nothing for 1s."
                    assert 1 <= took < 10, took
                    seen["cut"] = True
                else:
                    assert "fine3" in r.text and "error" not in r.text, r.text
                    if servers["hung"].requests > hung_before:  # failed over after 1 s, not 60
                        assert 1 <= took < 10, took
                        seen["failed over"] = True
                    else:
                        fine_session = session
                if all(seen.values()) and fine_session is not None:
                    break
            assert all(seen.values()) and fine_session is not None, seen
            # A non-streamed answer may take longer than the stream bound: it sends nothing until done.
            servers["fine"].behaviour["delay"] = 1.5
            r = client.post("/v1/chat/completions", json=CHAT, headers={"x-session-id": fine_session})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fine", r.text


def _session_for(backend: str, others: list[str]) -> str:
    """An affinity value that hashes to `backend` first."""
    from gateway.routing import _rendezvous

    return next(s for s in map(str, range(1000))
                if all(_rendezvous(s, backend, 1.0) > _rendezvous(s, o, 1.0) for o in others))


def test_a_request_granted_a_replica_that_died_in_the_queue_goes_to_a_ready_one(
        start_gateway: StartGateway) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with replicas(a={"delay": 1.5}, b={"delay": 3.0}) as servers:
        gateway = start_gateway({"backends": attached(servers, slots=1, health_failures=1),
                                 "queue": {"max_wait": "15s"}})
        on_a, on_b = _session_for("a", ["b"]), _session_for("b", ["a"])
        with gateway.http(gateway.new_key()) as client, ThreadPoolExecutor(3) as pool:
            def chat(session: str) -> httpx.Response:
                return client.post("/v1/chat/completions", json=CHAT, headers={"x-session-id": session})

            first = pool.submit(chat, on_a)
            time.sleep(0.1)
            second = pool.submit(chat, on_b)
            time.sleep(0.1)
            queued = pool.submit(chat, on_a)  # both slots taken: it waits, for a's or b's
            time.sleep(0.1)
            servers["a"].stop()  # killed: its answer on the way still comes; nothing listens any more
            assert wait_until(lambda: gateway.admin("GET", "/admin/backends/a").json()["state"] != "ready", 5)
            assert first.result().status_code == 200 and second.result().status_code == 200
            # Granted a's slot (free first) though a is dead: b, ready, answers it.
            r = queued.result()
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "b"
            assert servers["a"].requests == 1


def test_a_timeout_fails_over_within_the_requests_one_deadline_not_a_new_one(start_gateway: StartGateway) -> None:
    with replicas(a={"delay": 4}, b={"delay": 4}) as servers:
        gateway = start_gateway({"backends": attached(servers), "server": {"request_timeout": "1.5s"}})
        with gateway.http(gateway.new_key()) as client:
            started = time.monotonic()
            r = client.post("/v1/chat/completions", json=CHAT)
            took = time.monotonic() - started
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout", r.text
        assert took < 10, took  # (a hang bound; what tells one budget from two is the count below)
        assert servers["a"].requests + servers["b"].requests == 1  # one generation, not one per replica


def test_a_replica_out_of_capacity_hands_the_request_to_another_and_sits_out_its_wait(
        start_gateway: StartGateway) -> None:
    with replicas(busy={"status": 429, "retry_after": 120}, idle={}) as servers:
        gateway = start_gateway({"backends": attached(servers)})
        with gateway.http(gateway.new_key()) as client:
            on_busy = _session_for("busy", ["idle"])
            for _ in range(5):
                r = client.post("/v1/chat/completions", json=CHAT, headers={"x-session-id": on_busy})
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "idle", r.text
            assert servers["busy"].requests == 1  # asked once, then left alone for its wait (at most routing.cooldown)
            # Five requests, five answers from `idle`; the busy replica's 429 is its upstream error.
            counted = _series(gateway, "gateway_requests_total")
            assert counted == {'backend="idle",endpoint="chat",model="m",status="2xx"': 5.0}, counted
            assert _series(gateway, "gateway_upstream_errors_total")['backend="busy",kind="status"'] == 1.0
            # The last candidate's 429 reaches the client, with its wait.
            servers["idle"].behaviour.update(status=429, retry_after=7)
            r = client.post("/v1/chat/completions", json=CHAT, headers={"x-session-id": on_busy})
            assert (r.status_code, r.headers.get("retry-after")) == (429, "7"), r.text
