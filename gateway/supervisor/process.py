"""One runtime process: spawn it, wait until it serves, watch it, stop it and its children.

States and the only transitions allowed between them:

    stopped ──start──> starting ──probe ok──> ready <──probe ok── unhealthy
       ^                  │                    │  └──probe fails──> ┘
       │                  └──exit/timeout──> failed <──exit───────────┘
       └────── stopping <──stop── (starting | ready | unhealthy | failed)

Every change goes through `_enter`, which checks the table, logs it, and tells the listeners.
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
import logging
import os
import signal
import time
from collections.abc import Callable

import aiohttp

from adapters.base import Adapter, Health, Launch
from gateway.supervisor.logs import BackendLog

log = logging.getLogger("gateway.supervisor")


class State(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    STOPPING = "stopping"
    FAILED = "failed"


ALLOWED: dict[State, set[State]] = {
    State.STOPPED: {State.STARTING},
    State.STARTING: {State.READY, State.FAILED, State.STOPPING},
    State.READY: {State.UNHEALTHY, State.FAILED, State.STOPPING},
    State.UNHEALTHY: {State.READY, State.FAILED, State.STOPPING},
    State.STOPPING: {State.STOPPED},
    State.FAILED: {State.STARTING, State.STOPPING, State.STOPPED},
}

PROBE_INTERVAL = 0.25  # while starting; a 270M model is ready in under a second
PROBE_TIMEOUT = 5.0

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: if the gateway dies, even by SIGKILL, the kernel kills this
    child too, so no runtime outlives the gateway that owned it."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class StartFailed(Exception):
    pass


class RuntimeProcess:
    """Owns one OS process (and its process group) running a runtime server on a local port."""

    def __init__(self, name: str, adapter: Adapter, launch: Launch, port: int, log_: BackendLog,
                 probes: aiohttp.ClientSession, *, startup_timeout: float, stop_timeout: float,
                 on_state: Callable[[State, State, str], None] | None = None) -> None:
        self.name = name
        self.adapter = adapter
        self.launch = launch
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = log_
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._probes = probes
        self._on_state = on_state
        self.state = State.STOPPED
        self.reason = ""
        self.pid: int | None = None
        self.started_at: float | None = None
        self.exit_code: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None

    def _enter(self, new: State, reason: str = "") -> None:
        old = self.state
        if new not in ALLOWED[old]:
            raise RuntimeError(f"backend {self.name}: illegal transition {old.value} -> {new.value}")
        self.state, self.reason = new, reason
        log.info("backend %s: %s -> %s%s", self.name, old.value, new.value, f" ({reason})" if reason else "")
        if self._on_state:
            self._on_state(old, new, reason)

    async def start(self) -> None:
        """Spawn and wait until ready; raises StartFailed with the reason (and the process is gone)."""
        self._enter(State.STARTING)
        self.exit_code = None
        env = {**os.environ, **self.launch.env}
        self.log.write(f"[gateway] starting: {' '.join(self.launch.argv)}")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.launch.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: stop kills grandchildren too
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            reason = f"cannot execute {self.launch.argv[0]}: {exc.strerror or exc}"
            self.log.write(f"[gateway] {reason}")
            self._enter(State.FAILED, reason)
            raise StartFailed(reason) from None
        self.pid = self._proc.pid
        self.started_at = time.time()
        self._pump = asyncio.create_task(self._pump_output(self._proc), name=f"{self.name}-output")
        try:
            await self._wait_ready()
        except StartFailed as exc:
            await self._kill()
            self._enter(State.FAILED, str(exc))
            raise
        except asyncio.CancelledError:
            await self._kill()
            self._enter(State.FAILED, "start cancelled")
            raise
        self._enter(State.READY)
        self._watch = asyncio.create_task(self._watch_exit(self._proc), name=f"{self.name}-watch")

    async def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        url = self.base_url + self.adapter.health_path
        last = "no answer yet"
        while True:
            if self._proc.returncode is not None:
                await self._drain_output()
                raise StartFailed(f"exited with status {self._proc.returncode} while starting: {self._last_lines()}")
            health = await self.probe(url)
            if health is Health.READY:
                return
            if health is not None:
                last = f"health check answered {health.value}"
            if time.monotonic() >= deadline:
                raise StartFailed(f"not ready after {self.startup_timeout:g}s ({last}): {self._last_lines()}")
            try:
                await asyncio.wait_for(self._proc.wait(), PROBE_INTERVAL)
            except asyncio.TimeoutError:
                pass

    async def probe(self, url: str | None = None) -> Health | None:
        """One health probe; None when nothing answers (not listening yet, or hung)."""
        try:
            async with self._probes.get(url or self.base_url + self.adapter.health_path,
                                        timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT)) as resp:
                return self.adapter.health(resp.status, await resp.read())
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return None

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        self.exit_code = code
        if self.state in (State.READY, State.UNHEALTHY):
            await self._drain_output()
            self._enter(State.FAILED, f"exited with status {code}: {self._last_lines()}")

    async def stop(self) -> None:
        if self.state in (State.STOPPED, State.STOPPING):
            return
        self._enter(State.STOPPING)
        if self._watch is not None:
            self._watch.cancel()
        await self._kill()
        self._enter(State.STOPPED)

    async def _kill(self) -> None:
        """SIGTERM to the whole group, SIGKILL after the grace period."""
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            self._signal_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.stop_timeout)
            except asyncio.TimeoutError:
                self.log.write(f"[gateway] no exit {self.stop_timeout:g}s after SIGTERM: SIGKILL")
                self._signal_group(proc.pid, signal.SIGKILL)
                await proc.wait()
        # Children that ignored SIGTERM after their parent exited die with the group.
        self._signal_group(proc.pid, signal.SIGKILL)
        self.exit_code = proc.returncode
        await self._drain_output()
        self._proc = None
        self.pid = None

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def _pump_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            self.log.write(line.decode("utf-8", "replace"))

    async def _drain_output(self) -> None:
        """Let the pump read what the process wrote last; a grandchild still holding the pipe
        cannot hang us past a short bound."""
        if self._pump is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._pump), 1.0)
        except asyncio.TimeoutError:
            self._pump.cancel()
        except Exception:  # noqa: BLE001 - the pump only reads; its failure changes nothing here
            pass

    def _last_lines(self, n: int = 5) -> str:
        lines = [line for line in self.log.tail(50) if not line.startswith("[gateway]")]
        return " | ".join(lines[-n:]) or "no output"

    @property
    def uptime(self) -> float | None:
        if self.state is State.READY and self.started_at:
            return time.time() - self.started_at
        return None
