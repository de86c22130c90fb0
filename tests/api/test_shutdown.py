"""A gateway told to stop (SIGTERM): what only waits is answered at once, 503 to retry
elsewhere; what runs finishes within the grace period, or hears why it was cut. Told twice (a
second Ctrl-C, uvicorn's force quit): it quits at once, and still keeps the usage."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.api.test_v1_accounting import CHAT, runtime_serving
from tests.conftest import RedisServer, StartGateway
from tests.helpers import GatewayProcess, wait_until
from tests.supervisor.support import fake


def test_queued_requests_get_a_503_at_once_and_cut_streams_an_error_event(start_gateway: StartGateway,
                                                                         runtime_url: str) -> None:
    gateway = start_gateway({
        "backends": [{"name": "one-slot", "runtime": "openai", "url": runtime_url,
                      "serves": ["long", "fast"], "slots": 1, "stop_timeout": "1s"}],  # grace: 6 s
        "queue": {"max_wait": "60s"}})
    key = gateway.new_key()
    headers = {"authorization": f"Bearer {key}"}
    stream: list[str] = []
    queued: dict[str, Any] = {}

    def read_stream() -> None:
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers=headers, timeout=60,
                          json={"model": "long", "messages": CHAT, "stream": True}) as r:
            stream.extend(line for line in r.iter_lines() if line)

    def wait_in_queue() -> None:
        r = httpx.post(gateway.url + "/v1/chat/completions", headers=headers, timeout=60,
                       json={"model": "fast", "messages": CHAT})
        queued.update(status=r.status_code, headers=r.headers, body=r.text, at=time.monotonic())

    streaming = threading.Thread(target=read_stream)
    streaming.start()
    time.sleep(0.5)  # the stream holds the only slot
    waiting = threading.Thread(target=wait_in_queue)
    waiting.start()
    time.sleep(0.5)
    stopped_at = time.monotonic()
    gateway.proc.send_signal(signal.SIGTERM)
    waiting.join(10)
    assert queued["status"] == 503, queued
    assert queued["at"] - stopped_at < 2.0  # at once, not at the end of the grace period
    assert queued["headers"]["retry-after"] == "1"
    assert "shutting down" in json.loads(queued["body"])["error"]["message"]
    streaming.join(30)
    assert not streaming.is_alive()
    assert stream[-1] == "data: [DONE]", stream[-3:]
    assert "shutting down" in json.loads(stream[-2].removeprefix("data: "))["error"]["message"]
    assert len(stream) < 400  # it was cut, not finished
    assert gateway.proc.wait(30) in (0, -15)


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_a_stream_cut_at_the_end_of_the_grace_period_keeps_its_usage(start_gateway: StartGateway, runtime_url: str,
                                                                     store: str, request: pytest.FixtureRequest) -> None:
    """uvicorn cancels what outlives the grace period and starts the lifespan shutdown at once,
    without waiting for what it cancelled; the final flush must still find the cut stream's usage."""
    config: dict[str, Any] = {"backends": [{"name": "one-slot", "runtime": "openai", "url": runtime_url,
                                            "serves": ["long"], "slots": 1, "stop_timeout": "1s"}]}  # grace: 6 s
    if store == "redis":
        config["store"] = {"url": request.getfixturevalue("redis_url")}
    first = start_gateway(config)
    created = first.admin("POST", "/admin/keys", json={"name": "cut"}).json()
    streaming = _long_stream(first, created["key"])
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(30) in (0, -15)
    streaming.join(10)
    log = first.log()
    assert "timeout graceful shutdown exceeded" in log, log  # the path under test: the stream was cut

    usage = _usage_after_restart(start_gateway, first, config, created["id"])
    assert {"requests": 1, "errors": 1}.items() <= usage.get("long", {}).items(), (usage, log)
    assert usage["long"]["completion_tokens"] > 0


@pytest.fixture
def runtime_url() -> Iterator[str]:
    """The in-test runtime: model "long" streams for 20 s, "fast" answers at once (3 + 2 tokens)."""
    with runtime_serving() as url:
        yield url


def _backend(runtime_url: str) -> dict[str, Any]:
    # Grace period 35 s: longer than any test here waits, so only a force quit ends the stream.
    return {"name": "two-slots", "runtime": "openai", "url": runtime_url, "serves": ["long", "fast"], "slots": 2,
            "stop_timeout": "30s"}


def _long_stream(gateway: GatewayProcess, key: str) -> threading.Thread:
    """A client reading model "long"'s 20 s stream in a thread, returned once its first line came."""
    streamed = threading.Event()

    def read_stream() -> None:
        with contextlib.suppress(httpx.HTTPError), httpx.stream(
                "POST", gateway.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                timeout=60, json={"model": "long", "messages": CHAT, "stream": True}) as r:
            for _ in r.iter_lines():
                streamed.set()

    streaming = threading.Thread(target=read_stream)
    streaming.start()
    assert streamed.wait(10)
    return streaming


def _usage_after_restart(start_gateway: StartGateway, first: GatewayProcess, config: dict[str, Any],
                         key_id: str) -> dict[str, dict[str, Any]]:
    """The key's usage by model, as a new gateway on the same data directory (embedded store) or
    the same Redis reads it."""
    second = start_gateway({**config, "data_dir": str(first.directory / "data")})
    rows = second.admin("GET", "/admin/usage", params={"group_by": "key,model"}).json()["data"]
    return {row["model"]: row for row in rows if row["key"] == key_id}


def _force_quit_during_a_stream(gateway: GatewayProcess, key: str, fast: int,
                                before_the_signals: Callable[[], object] | None = None) -> float:
    """A stream running, `fast` requests finished, then Ctrl-C twice: the seconds the gateway took
    to exit after the second one."""
    streaming = _long_stream(gateway, key)
    # Right before the signals, so the periodic flush (once a second) has not taken them all.
    with gateway.http(key) as client:
        for _ in range(fast):
            assert client.post("/v1/chat/completions", json={"model": "fast", "messages": CHAT}).status_code == 200
    if before_the_signals is not None:
        before_the_signals()
    gateway.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)  # uvicorn waits for the stream now
    quit_at = time.monotonic()
    gateway.proc.send_signal(signal.SIGINT)
    gateway.proc.wait(20)  # generous: a hang, not a slow exit, fails here
    took = time.monotonic() - quit_at
    streaming.join(10)
    assert not streaming.is_alive()
    assert "Application shutdown complete" not in gateway.log()  # the force quit did skip the lifespan
    return took


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_a_second_ctrl_c_quits_at_once_and_keeps_the_usage(start_gateway: StartGateway, runtime_url: str,
                                                           store: str, request: pytest.FixtureRequest) -> None:
    """uvicorn's force quit skips the lifespan shutdown; the usage held in memory (up to a second
    of finished requests) and that of the streams it cuts are still written (gateway/cli.py)."""
    config: dict[str, Any] = {"backends": [_backend(runtime_url)]}
    if store == "redis":
        config["store"] = {"url": request.getfixturevalue("redis_url")}
    first = start_gateway(config)
    created = first.admin("POST", "/admin/keys", json={"name": "force-quit"}).json()
    took = _force_quit_during_a_stream(first, created["key"], fast=5)
    log = first.log()
    assert took < 5, log  # the bounds add up to ~3 s
    assert "usage lost" not in log, log

    usage = _usage_after_restart(start_gateway, first, config, created["id"])
    assert {"requests": 5, "prompt_tokens": 15, "completion_tokens": 10, "errors": 0}.items() <= usage.get(
        "fast", {}).items(), (usage, log)
    # The stream cut by the force quit: one request, an error, its chunks as completion tokens.
    assert {"requests": 1, "errors": 1}.items() <= usage.get("long", {}).items(), (usage, log)
    assert usage["long"]["completion_tokens"] > 0


def test_a_force_quit_with_the_store_gone_says_what_usage_is_lost(start_gateway: StartGateway, runtime_url: str,
                                                                  redis_server: RedisServer, redis_url: str) -> None:
    first = start_gateway({"backends": [_backend(runtime_url)], "store": {"url": redis_url}})
    key = first.new_key()
    took = _force_quit_during_a_stream(first, key, fast=3, before_the_signals=redis_server.kill)
    log = first.log()
    assert took < 5, log  # the store's outage does not hold the exit
    lost = re.search(r"usage lost at shutdown: the store did not take (\d+) requests", log)
    assert lost and int(lost[1]) >= 1, log  # the stream's, at least (the others may have gone before)


def test_a_second_ctrl_c_during_the_lifespan_shutdown_lets_it_finish(start_gateway: StartGateway,
                                                                     runtime_url: str) -> None:
    """uvicorn runs the lifespan shutdown to its end once it has begun, whatever comes then: a
    force quit then has nothing left to do (no second flush into a closed store)."""
    config = {"backends": [
        {"name": "attached", "runtime": "openai", "url": runtime_url, "serves": ["fast"]},
        # Deaf to SIGTERM: the lifespan shutdown waits its stop_timeout for it, then SIGKILLs it.
        fake("deaf", "ignore_term", stop_timeout="4s")]}
    first = start_gateway(config)
    created = first.admin("POST", "/admin/keys", json={"name": "late-force-quit"}).json()
    with first.http(created["key"]) as client:
        for _ in range(3):
            assert client.post("/v1/chat/completions", json={"model": "fast", "messages": CHAT}).status_code == 200
    first.proc.send_signal(signal.SIGINT)
    assert wait_until(lambda: "Waiting for application shutdown." in first.log(), 5), first.log()
    time.sleep(0.5)  # in the 4 s the lifespan waits for the deaf backend
    assert first.proc.poll() is None
    first.proc.send_signal(signal.SIGINT)
    first.proc.wait(20)
    log = first.log()
    assert "Application shutdown complete" in log
    assert "force quit" not in log and "usage lost" not in log, log

    second = start_gateway({**config, "data_dir": str(first.directory / "data")})
    rows = second.admin("GET", "/admin/usage", params={"group_by": "key"}).json()["data"]
    assert {"key": created["id"], "requests": 3}.items() <= next(
        (row for row in rows if row["key"] == created["id"]), {}).items(), (rows, log)
