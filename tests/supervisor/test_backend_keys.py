"""A backend with an `api_key` gets it on the gateway's own requests too (health probes, model
lists, load reports), not only on the requests the gateway forwards: a runtime started with a key
answers 401 without it, which a probe reads as broken, and such a backend never took traffic."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web

from adapters import for_runtime
from adapters.base import Health
from gateway.config import parse
from gateway.loadwatch import LoadWatch
from gateway.supervisor import State
from gateway.supervisor.logs import BackendLog
from gateway.supervisor.process import RuntimeProcess
from tests.helpers import FAKES, free_port, server_by_hand
from tests.supervisor.conftest import MakeSupervisor
from tests.supervisor.support import until

BACKEND_KEY = "sk-backend-0123456789abcdef"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
KeyedServer = Callable[[dict[str, Handler]], Awaitable[str]]


@pytest.fixture
async def keyed_server() -> AsyncIterator[KeyedServer]:
    """Servers answering the given paths only to BACKEND_KEY, 401 `{"error":"Unauthorized"}` (as
    vLLM) to anyone else: a runtime, or the auth proxy in front of one, that guards every path."""
    runners: list[web.AppRunner] = []

    @web.middleware
    async def require_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {BACKEND_KEY}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    async def serve(routes: dict[str, Handler]) -> str:
        app = web.Application(middlewares=[require_key])
        for path, handler in routes.items():
            app.router.add_get(path, handler)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}"

    yield serve
    for runner in runners:
        await runner.cleanup()


async def test_an_attached_server_that_guards_its_models_list_with_a_key_becomes_ready_with_it(
        supervise: MakeSupervisor, tmp_path: Path) -> None:
    # `runtime: openai` is probed on /v1/models, which vLLM's --api-key guards (its /health does not).
    port = free_port()
    with server_by_hand([sys.executable, str(FAKES / "fake_vllm.py"), "serve", "fake-model", "--host", "127.0.0.1",
                         "--port", str(port), "--served-model-name", "far-model"], f"http://127.0.0.1:{port}",
                        ready_path="/health", env={"FAKE_LOAD_SECONDS": "0.1", "VLLM_API_KEY": BACKEND_KEY},
                        log_path=tmp_path / "vllm.log", what="fake vLLM"):
        attached = {"runtime": "openai", "url": f"http://127.0.0.1:{port}", "serves": ["far-model"],
                    "health_interval": "0.1s"}
        sup = await supervise({"name": "keyed", "api_key": BACKEND_KEY, **attached},
                              {"name": "keyless", **{**attached, "serves": ["other-model"]}})
        keyed, keyless = sup.backends["keyed"], sup.backends["keyless"]
        assert await until(lambda: keyed.ready, 5), keyed.describe()
        # The same server, probed without the key: it really does refuse (the fake is faithful).
        assert await until(lambda: keyless.state is State.UNHEALTHY, 5), keyless.describe()
        assert "health check answered 401" in keyless.reason


async def test_an_attached_ollama_behind_a_key_is_ready_and_its_missing_models_are_read_with_it(
        supervise: MakeSupervisor, keyed_server: KeyedServer) -> None:
    # Ollama has no key of its own: one guarded by a key runs behind an auth proxy, every path.
    async def running(_: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def tags(_: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": "llama3.2:1b", "model": "llama3.2:1b"}]})

    url = await keyed_server({"/": running, "/api/tags": tags})
    sup = await supervise({"name": "proxied", "runtime": "ollama", "url": url, "api_key": BACKEND_KEY,
                           "serves": ["llama3.2:1b", "qwen2.5:0.5b"], "health_interval": "0.1s"})
    backend = sup.backends["proxied"]
    assert await until(lambda: backend.ready, 5), backend.describe()
    # Read without the key, the list's 401 would say every served model is missing.
    assert backend.missing_models == ["qwen2.5:0.5b"]


async def test_a_managed_runtimes_health_probe_sends_its_key(keyed_server: KeyedServer, tmp_path: Path) -> None:
    # llama-server and vLLM leave /health open, but a runtime (or build) that guards it must not
    # read as broken for want of the key the gateway holds.
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    url = await keyed_server({"/health": health})
    config = parse({"data_dir": str(tmp_path / "data"), "backends": [
        {"name": "keyed", "runtime": "llamacpp", "model": "/nonexistent/fake.gguf", "serves": ["m"],
         "api_key": BACKEND_KEY}]}, base_dir=tmp_path, env={}).backends[0]
    async with ClientSession() as probes:
        process = RuntimeProcess(config, for_runtime("llamacpp", config), BackendLog("keyed", tmp_path), probes)
        process.port = int(url.rsplit(":", 1)[1])
        assert await process.probe(2.0) == (Health.READY, "health check answered 200")


async def test_a_keyed_llama_servers_load_report_is_read_with_its_key(
        supervise: MakeSupervisor, llamacpp_backend: dict[str, Any]) -> None:
    # llama-server's key guards /slots, where its load is read; only /health stays open.
    sup = await supervise({**llamacpp_backend, "name": "real", "api_key": BACKEND_KEY, "embeddings": False})
    backend = sup.backends["real"]
    assert backend.ready, backend.describe()
    watch = LoadWatch([backend], interval=0.1)
    await watch.start()
    try:
        assert await until(lambda: "real" in watch.loads, 5), "no load report from the keyed llama-server"
        assert watch.loads["real"].running == 0
    finally:
        await watch.stop()
