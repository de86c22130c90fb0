"""A client that stops reading its answer: the watch itself, then a real gateway in front of the
vLLM fake (spawned by the supervisor) with a client whose socket is full."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.sendwatch import SendWatch
from tests.helpers import FAKES, GatewayProcess, wait_until

# --- the watch, on the event loop --------------------------------------------------------------


class Socket:
    """An ASGI send that waits while `room` is clear, as uvicorn's does while the client's socket is full."""

    def __init__(self) -> None:
        self.room = asyncio.Event()
        self.room.set()
        self.sent = 0

    async def send(self, message: Any) -> None:
        await self.room.wait()
        self.sent += 1


async def test_only_a_send_that_waits_past_the_bound_is_cut() -> None:
    watch, sock = SendWatch(timeout=5), Socket()
    outcome: list[str] = []

    async def answer() -> None:
        writer = watch.watch(sock.send, "req-1")
        try:
            for _ in range(3):
                await writer.send({})
                await asyncio.sleep(0.05)  # the runtime thinking between chunks is not the client's fault
            outcome.append("finished")
        except asyncio.CancelledError:
            outcome.append("cut" if writer.stalled else "cancelled")
        finally:
            watch.forget(writer)

    task = asyncio.create_task(answer())
    await asyncio.sleep(0.01)
    watch.check(1000.0)
    watch.check(1100.0)  # long after, but no send is waiting
    await task
    assert outcome == ["finished"] and sock.sent == 3

    sock.room.clear()  # the client stops reading
    task = asyncio.create_task(answer())
    await asyncio.sleep(0.01)
    watch.check(2000.0)  # first seen waiting
    watch.check(2004.0)
    await asyncio.sleep(0.01)
    assert not task.done()
    sock.room.set()  # ...and reads again: the send goes through, the clock starts over
    await asyncio.sleep(0.01)
    sock.room.clear()
    await asyncio.sleep(0.06)
    watch.check(2006.0)  # the next send is waiting: seen for the first time now
    watch.check(2010.0)
    await asyncio.sleep(0.01)
    assert not task.done()
    watch.check(2011.0)  # five seconds in the same send
    await task
    assert outcome == ["finished", "cut"]


# --- a real gateway -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = {
        "server": {"send_timeout": "2s"},
        "backends": [{
            "name": "vllm", "runtime": "vllm", "model": "Qwen/Qwen3-0.6B", "serves": ["talker"],
            "binary": [sys.executable, str(FAKES / "fake_vllm.py")], "slots": 1, "context": 10_000_000,
            # An answer of many megabytes, sent as fast as the connection takes it.
            "env": {"FAKE_TOKEN_DELAY": "0", "FAKE_LOAD_SECONDS": "0.1", "FAKE_OUTPUT_WORDS": "200000"},
        }],
        "queue": {"max_wait": "15s"},
    }
    gateway = GatewayProcess(config, tmp_path_factory.mktemp("sendwatch"))
    try:
        yield gateway.wait_healthy(60)
    finally:
        gateway.stop()


def stuck_client(gateway: GatewayProcess, key: str, path: str, body: dict[str, Any]) -> socket.socket:
    """Sends the request and never reads: a tiny receive buffer fills at once."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gateway.port))
    payload = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n"
                 f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def fake_running(gateway: GatewayProcess) -> int:
    backend = gateway.admin("GET", "/admin/backends").json()["data"][0]
    return int(httpx.get(backend["url"] + "/fake/stats", timeout=5).json()["running"])


def requests_counted(gateway: GatewayProcess, endpoint: str, status: str) -> float:
    line = f'gateway_requests_total{{backend="vllm",endpoint="{endpoint}",model="talker",status="{status}"}} '
    metrics = httpx.get(gateway.url + "/metrics", timeout=10).text
    return next((float(m[len(line):]) for m in metrics.splitlines() if m.startswith(line)), 0.0)


def next_request_waits(gateway: GatewayProcess, key: str) -> float:
    """How long a small request waits for the one slot (answered 200)."""
    started = time.monotonic()
    with gateway.http(key) as client:
        reply = client.post("/v1/chat/completions", json={
            "model": "talker", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi."}]})
    assert reply.status_code == 200, reply.text
    return time.monotonic() - started


def test_a_client_that_stops_reading_a_stream_frees_its_slot(gateway: GatewayProcess) -> None:
    key = gateway.new_key()
    cut_before = requests_counted(gateway, "chat", "4xx")
    stuck = stuck_client(gateway, key, "/v1/chat/completions", {
        "model": "talker", "stream": True, "messages": [{"role": "user", "content": "Talk."}]})
    try:
        # The runtime is generating into the gateway, which stops reading from it once the client is full.
        assert wait_until(lambda: fake_running(gateway) == 1, 20)
        # The one slot is taken until the gateway gives up on the client; then it serves the next request.
        assert next_request_waits(gateway, key) < 30  # the queue's max_wait is 15 s: it was not that
        assert "client took no bytes for" in gateway.log()
        assert wait_until(lambda: fake_running(gateway) == 0, 20)  # the generation was stopped, not left running
        assert requests_counted(gateway, "chat", "4xx") == cut_before + 1  # counted as a client that left (499)
    finally:
        stuck.close()


def test_a_large_json_answer_to_a_client_that_does_not_read_frees_the_slot_at_once(gateway: GatewayProcess) -> None:
    # Not the watch's doing: uvicorn takes the whole answer into its buffer. This pins that down,
    # since the watch leaves JSON answers alone because of it.
    key = gateway.new_key()
    answered_before = requests_counted(gateway, "embeddings", "2xx")
    stuck = stuck_client(gateway, key, "/v1/embeddings",  # 60,000 vectors: about 12 MB of JSON
                         {"model": "talker", "input": [f"text {i}" for i in range(60_000)]})
    try:
        assert wait_until(lambda: requests_counted(gateway, "embeddings", "2xx") == answered_before + 1, 30)
        assert next_request_waits(gateway, key) < 30
    finally:
        stuck.close()


def test_a_slow_reader_is_not_cut(gateway: GatewayProcess) -> None:
    # A client that keeps reading, in bites with pauses, keeps its answer even though the
    # gateway's sends wait for it again and again, for longer than send_timeout in all: the
    # bound is on one send's wait, not on the stream (the clock starting over at each send is
    # pinned exactly by the first test).
    key = gateway.new_key()
    # About 8 MB of events, more than the sockets between hold; read in bites of 512 KiB with
    # short pauses, so each send waits a while (Linux wakes a writer only once a good part of its
    # buffer, megabytes on loopback, was read: a few bites), and none waits near send_timeout,
    # even on a slow machine (with 0.25 s pauses, a 2.4x slower machine saw one cut).
    sock = stuck_client(gateway, key, "/v1/chat/completions", {
        "model": "talker", "stream": True, "max_tokens": 40000, "messages": [{"role": "user", "content": "Talk."}]})
    received = bytearray()
    started = time.monotonic()
    sock.settimeout(0.05)
    try:
        while not received.endswith(b"0\r\n\r\n") and time.monotonic() - started < 60:
            time.sleep(0.12)
            bite = len(received) + 512 * 1024
            while len(received) < bite:
                try:
                    data = sock.recv(64 * 1024)
                except TimeoutError:
                    break
                if not data:
                    break
                received += data
    finally:
        sock.close()
    assert received.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in received
    assert len(received) > 3_000_000
    assert time.monotonic() - started > 2.5  # the answer took more than send_timeout (2 s) and a look to read
