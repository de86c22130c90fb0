"""All backends: the managed processes the gateway owns and the attached servers it only watches."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path

import aiohttp

from adapters import Adapter, Health, for_runtime
from gateway import metrics
from gateway.config import BackendConfig, Config
from gateway.supervisor.logs import BackendLog
from gateway.supervisor.process import RuntimeProcess, StartFailed, State

log = logging.getLogger("gateway.supervisor")

ATTACHED_PROBE_INTERVAL = 5.0


def free_port() -> int:
    # The kernel picks an unused port; the tiny race until the runtime binds it ends, at worst,
    # in a failed start that the supervisor reports.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Backend:
    """One configured backend as the request path sees it: where to send, whether it serves."""

    def __init__(self, config: BackendConfig, adapter: Adapter, log_: BackendLog) -> None:
        self.config = config
        self.name = config.name
        self.adapter = adapter
        self.log = log_
        self.inflight = 0
        self.last_used = time.monotonic()  # set by the request path at each request's start and end
        self.process: RuntimeProcess | None = None
        # Attached servers have no process; their state comes from probes alone.
        self.attached_state = State.STARTING
        self.attached_reason = ""

    @property
    def managed(self) -> bool:
        return self.config.url is None

    @property
    def url(self) -> str:
        if self.config.url is not None:
            return self.config.url.rstrip("/")
        assert self.process is not None
        return self.process.base_url

    @property
    def state(self) -> State:
        return self.process.state if self.process else self.attached_state

    @property
    def reason(self) -> str:
        return self.process.reason if self.process else self.attached_reason

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    def describe(self) -> dict[str, object]:
        proc = self.process
        return {
            "name": self.name,
            "runtime": self.config.runtime,
            "serves": list(self.config.serves),
            "managed": self.managed,
            "state": self.state.value,
            "reason": self.reason or None,
            "url": self.url if (proc or not self.managed) else None,
            "pid": proc.pid if proc else None,
            "port": proc.port if proc else None,
            "uptime_seconds": round(proc.uptime, 1) if proc and proc.uptime else None,
            "last_exit_code": proc.exit_code if proc else None,
            "slots": self.config.slots,
            "inflight": self.inflight,
        }


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.backends: dict[str, Backend] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._probes: aiohttp.ClientSession | None = None
        log_dir = Path(config.data_dir) / "logs"
        for backend_config in config.backends:
            self.backends[backend_config.name] = Backend(
                backend_config, for_runtime(backend_config.runtime), BackendLog(backend_config.name, log_dir)
            )

    async def start(self) -> None:
        # Health probes get their own small pool: a probe never queues behind user traffic.
        self._probes = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16, force_close=True))
        starts = []
        for backend in self.backends.values():
            if backend.managed:
                starts.append(self._start_managed(backend))
            else:
                self._spawn(self._watch_attached(backend), f"{backend.name}-probe")
        await asyncio.gather(*starts)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(b.process.stop() for b in self.backends.values() if b.process))
        for backend in self.backends.values():
            backend.log.close()
        if self._probes is not None:
            await self._probes.close()

    def _spawn(self, coro, name: str) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_managed(self, backend: Backend) -> None:
        assert self._probes is not None
        config = backend.config
        port = config.port or free_port()
        try:
            launch = backend.adapter.launch(config, port)
        except (FileNotFoundError, NotImplementedError) as exc:
            backend.attached_state, backend.attached_reason = State.FAILED, str(exc)
            log.error("backend %s: %s", backend.name, exc)
            return

        def on_state(old: State, new: State, reason: str) -> None:
            metrics.backend_transition(backend.name, config.runtime, old.value, new.value)

        backend.process = RuntimeProcess(
            backend.name, backend.adapter, launch, port, backend.log, self._probes,
            startup_timeout=config.startup_timeout, stop_timeout=config.stop_timeout, on_state=on_state,
        )
        started = time.monotonic()
        try:
            await backend.process.start()
        except StartFailed as exc:
            log.error("backend %s failed to start: %s", backend.name, exc)
            return
        log.info("backend %s ready on port %d in %.1fs", backend.name, port, time.monotonic() - started)

    async def _watch_attached(self, backend: Backend) -> None:
        assert self._probes is not None
        url = backend.url + backend.adapter.health_path
        while True:
            try:
                async with self._probes.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    health = backend.adapter.health(resp.status, await resp.read())
                    detail = f"health check answered {resp.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                health, detail = None, f"unreachable: {type(exc).__name__} {exc}".strip()
            new = State.READY if health is Health.READY else State.UNHEALTHY
            if new is not backend.attached_state:
                metrics.backend_transition(backend.name, backend.config.runtime,
                                           backend.attached_state.value, new.value)
                log.info("backend %s (attached): %s -> %s", backend.name, backend.attached_state.value, new.value)
            backend.attached_state = new
            backend.attached_reason = "" if new is State.READY else detail
            await asyncio.sleep(ATTACHED_PROBE_INTERVAL)
