"""The load watch: each backend's own load report, sampled every interval, for routing."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web

from adapters.base import Load
from gateway.loadwatch import LoadWatch


def _load(status: int, body: bytes) -> Load | None:
    if body == b"bug":
        raise KeyError("a parser bug")
    return Load(running=float(body)) if status == 200 else None


def backend(name: str, url: str, load_path: str | None = "/load", api_key: str | None = None) -> Any:
    return SimpleNamespace(name=name, url=url, ready=True, config=SimpleNamespace(runtime="llamacpp", api_key=api_key),
                           adapter=SimpleNamespace(load_path=load_path, load=_load))


@pytest.fixture
async def reports() -> Any:
    """A runtime whose /load answers whatever the test puts in `body` (None: no answer, 500), and
    401 without `key` once the test sets one (as llama-server's /slots under --api-key)."""
    state = SimpleNamespace(body=b"3", url="", key=None)

    async def load(request: web.Request) -> web.Response:
        if state.key is not None and request.headers.get("Authorization") != f"Bearer {state.key}":
            return web.json_response({"error": {"code": 401, "message": "Invalid API Key",
                                                "type": "authentication_error"}}, status=401)
        if state.body is None:
            return web.Response(status=500)
        return web.Response(body=state.body)

    app = web.Application()
    app.router.add_get("/load", load)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    yield state
    await runner.cleanup()


async def until(check: Any, timeout: float = 5.0) -> bool:
    for _ in range(int(timeout / 0.02)):
        if check():
            return True
        await asyncio.sleep(0.02)
    return False


async def test_a_reload_that_adds_a_reporting_backend_gets_it_watched(reports: Any) -> None:
    watch = LoadWatch([backend("plain", "http://127.0.0.1:9", load_path=None)], interval=0.05)
    await watch.start()
    try:
        watch.replace([backend("plain", "http://127.0.0.1:9", load_path=None), backend("v", reports.url)])
        assert await until(lambda: "v" in watch.loads)
        assert watch.loads["v"].running == 3
    finally:
        await watch.stop()


async def test_a_failing_report_is_dropped_and_a_bug_does_not_end_the_watch(reports: Any) -> None:
    watch = LoadWatch([backend("v", reports.url)], interval=0.05)
    await watch.start()
    try:
        assert await until(lambda: "v" in watch.loads)
        reports.body = b"bug"  # the parser raises: logged, the old report dropped, the watch goes on
        assert await until(lambda: "v" not in watch.loads)
        reports.body = b"5"
        assert await until(lambda: "v" in watch.loads and watch.loads["v"].running == 5)
        reports.body = b"not a number"  # ValueError: a failed sample, no stale report kept
        assert await until(lambda: "v" not in watch.loads)
    finally:
        await watch.stop()


def _gauge(backend_name: str) -> dict[str, float]:
    from gateway.metrics import REGISTRY
    return {s.labels["kind"]: s.value for family in REGISTRY.collect() if family.name == "gateway_backend_load"
            for s in family.samples if s.labels["backend"] == backend_name}


async def test_a_report_that_stops_takes_its_gauges_with_it(reports: Any) -> None:
    # A dead runtime's last load must not stay on the dashboard for ever.
    watch = LoadWatch([backend("gone", reports.url)], interval=0.05)
    await watch.start()
    try:
        assert await until(lambda: _gauge("gone") == {"running": 3.0})
        reports.body = None
        assert await until(lambda: "gone" not in watch.loads)
        assert _gauge("gone") == {}
    finally:
        await watch.stop()


async def test_a_backend_with_a_key_is_asked_for_its_load_with_that_key(reports: Any) -> None:
    reports.key = "sk-backend-0123456789"
    watch = LoadWatch([backend("keyed", reports.url, api_key="sk-backend-0123456789"),
                       backend("keyless", reports.url)], interval=0.05)
    await watch.start()
    try:
        assert await until(lambda: "keyed" in watch.loads)
        assert watch.loads["keyed"].running == 3
        assert "keyless" not in watch.loads  # the 401 is no report: the runtime does require the key
    finally:
        await watch.stop()
