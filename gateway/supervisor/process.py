"""One runtime process: spawn it (under the keeper), wait until it serves, watch it, restart it,
stop it and everything it spawned.

States and the only transitions allowed between them:

    stopped ──start──> starting ──ready──> ready ──misses──> unhealthy ──answers──> ready
       ^                 │                  │                    │
       │                 └─exit, timeout──> failed <──exit───────┴── (ready too; unhealthy: restart)
       │                                    │  └──backoff over──> starting
       ├──────────── stop ──────────────────┘
       └── stopping <──stop── (starting | ready | unhealthy)

One owner task per process (`_own`) takes typed commands (start, stop, restart) and events (the
process exited, a probe answered, a one-shot command finished) from one queue, so no two
coroutines ever race on a process's state. Every change goes through `_enter`, which checks
ALLOWED, logs the change and tells the supervisor (metrics, waiters).

Readiness: after the spawn, the adapter's `health_path` is probed every PROBE_INTERVAL until the
adapter reads an answer as READY; an exit first, or no READY within `startup_timeout`, is a failed
start whose reason carries the last lines of the output.

Liveness, once ready: one probe every `health_interval`, each bounded by `health_timeout`, on
the supervisor's own small connection pool (a probe never queues behind user traffic).
  - An answer the adapter reads as READY proves the server alive and serving: the misses reset,
    and an `unhealthy` backend is `ready` again.
  - An answer it reads as LOADING (llama.cpp answers 503 "Loading model" while loading) proves the
    server alive but not serving: no miss, yet `health_failures` of them in a row make it
    `unhealthy` (no new requests), and one that keeps answering so is restarted once that lasted
    `startup_timeout`. Only a READY answer ends a run of them. (Older llama.cpp's 503 "no slot
    available", every slot busy, is READY: adapters/llamacpp.py.)
  - No answer within the timeout, a refused connection, or an answer the adapter reads as BROKEN
    (the runtime itself says it cannot serve, e.g. vLLM after its engine died) is a miss.
  - With no request in flight, `health_failures` misses in a row: unhealthy, then restart.
  - With requests in flight the server may just be saturated, so it gets twice the misses:
    at `health_failures` it turns `unhealthy` (no new requests; those in flight go on), and it is
    restarted at 2 x `health_failures`, or at `health_failures` once nothing is in flight.

Crashes: an exit while starting or serving, a start that times out, and an unhealthy restart are
failures. After the n-th failure within `crash_window` the process waits in `failed` for
min(restart_backoff * 2^(n-1), restart_backoff_max) seconds and is started again; once there are
more than `crash_limit` failures within the window it stays parked in `failed` (the reason says
so) until a manual start or restart, which also clears the history.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import os
import shlex
import shutil
import signal
import socket
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

from adapters.base import Adapter, Health, Launch
from gateway import metrics
from gateway.supervisor.logs import BackendLog
from gateway.supervisor.oneshot import child_env, describe_status, keeper_argv, run_logged
from gateway.upstream import auth_headers, read_probe

if TYPE_CHECKING:
    from gateway.config import BackendConfig

log = logging.getLogger("gateway.supervisor")
OUTPUT_LINES_PER_SECOND = 1000  # of a runtime's output kept (log file, ring, followers); see _pump_output


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
    State.FAILED: {State.STARTING, State.STOPPED},
}

PROBE_INTERVAL = 0.25  # while starting; a 270M model is ready in under a second
VERSION_TIMEOUT = 30.0
SETUP_TIMEOUT = 3600.0  # setup commands pull models, which takes a while for big ones
KEEPER_MARGIN = 3.0  # past stop_timeout, the keeper should have SIGKILLed everything itself
DRAIN_BOUND = 1.0  # how long the output of an exited process may keep coming


class StartFailed(Exception):
    pass


def port_is_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:`port` now (SO_REUSEADDR, as servers bind:
    a closed connection still in TIME_WAIT does not count as in use)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(taken: Collection[int] = ()) -> int:
    """A port nothing is bound to now, and not in `taken`.

    The kernel picks an unused port; the tiny race until the runtime binds it ends, at worst, in a
    failed start, retried with a new port. `taken` covers what the kernel cannot know: the gateway's
    own port, which uvicorn binds only after the backends have started, and ports other backends
    were given but have not bound yet. Without it a backend could take the gateway's port.
    """
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            return port
    raise OSError(f"no free port outside {sorted(taken)} after 100 tries")


# --- what the owner task reads from its queue ---------------------------------------------


@dataclass
class _Command:
    kind: str  # start | stop | restart
    manual: bool  # the operator's: clears the crash history, unparks
    reason: str
    reply: asyncio.Future[None]


@dataclass
class _Exited:
    gen: int
    code: int


@dataclass
class _Probed:
    gen: int
    health: Health | None
    detail: str


@dataclass
class _StepDone:
    gen: int
    step: str  # version | setup
    ok: bool


_Event = _Command | _Exited | _Probed | _StepDone


class RuntimeProcess:
    """Owns one runtime (the keeper, the runtime, and all they spawn) on a local port."""

    def __init__(self, config: BackendConfig, adapter: Adapter, log_: BackendLog, probes: aiohttp.ClientSession,
                 *, inflight: Callable[[], int] = lambda: 0,
                 on_state: Callable[[State, State, str], None] | None = None,
                 taken_ports: Callable[[], Collection[int]] = frozenset,
                 secrets: Callable[[], Collection[str]] = frozenset) -> None:
        self.config = config
        self.name = config.name
        self.adapter = adapter
        self.log = log_
        self._probes = probes
        self._inflight = inflight
        self._on_state = on_state
        self._taken_ports = taken_ports  # ports this backend must not be given (see free_port)
        self._secrets = secrets  # the gateway's secrets, kept out of the child's environment (see child_env)
        self.state = State.STOPPED
        self.reason = ""
        self.port: int | None = None
        self.keeper_pid: int | None = None
        self.started_at: float | None = None  # wall clock of the current spawn
        self.starts = 0
        self.restarts = 0
        self.exit_code: int | None = None
        self.last_exit: str | None = None
        self.restart_at: float | None = None  # monotonic; set while waiting out a backoff
        self.failed_while_starting = False
        self._restart_cause = "crash"
        self._crashes: collections.deque[float] = collections.deque()
        self._want = False
        self._gen = 0
        self._inbox: asyncio.Queue[_Event] = asyncio.Queue()
        self._proc: asyncio.subprocess.Process | None = None
        self._runtime_pid: int | None = None
        self._pump: asyncio.Task[None] | None = None
        self._exit_task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._step_task: asyncio.Task[None] | None = None
        self._phase = ""  # while starting: version | spawned | setup
        self._deadline = 0.0
        self._next_probe = 0.0
        self._misses = 0
        self._loadings = 0  # LOADING answers in a row since the last READY one, once ready
        self._loading_since: float | None = None  # when the first of them came
        self._last_probe = "no answer yet"
        self._mark = 0
        self._version_due = True
        self._setup_done = False
        self._start_waiters: list[asyncio.Future[None]] = []
        self._stop_waiters: list[asyncio.Future[None]] = []
        self._owner: asyncio.Task[None] | None = None

    # --- the interface ---------------------------------------------------------------------

    def run(self) -> None:
        self._owner = asyncio.create_task(self._own(), name=f"{self.name}-owner")

    async def start(self, *, manual: bool = False) -> None:
        """Returns once ready; raises StartFailed at the first failed attempt (or if parked)."""
        await self._send("start", manual)

    async def restart(self) -> None:
        """A manual restart: a fresh process (and a clean crash history); returns once ready."""
        await self._send("restart", True)

    async def stop(self, reason: str = "") -> None:
        """Returns once stopped; `reason` is shown while it stays stopped (e.g. idle)."""
        await self._send("stop", False, reason)

    async def close(self, timeout: float, reason: str = "gateway shutting down") -> None:
        """Stop within `timeout`, then end the owner; whatever is left is SIGKILLed. `reason` is
        logged with the stop: a reload retires processes too, and must not read as a shutdown."""
        if self._owner is None:
            return
        try:
            await asyncio.wait_for(self.stop(reason), timeout)
        except (asyncio.TimeoutError, StartFailed):
            log.warning("backend %s did not stop within %gs; killing it", self.name, timeout)
        self._owner.cancel()
        await asyncio.gather(self._owner, return_exceptions=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def parked(self) -> bool:
        return self.state is State.FAILED and self.restart_at is None

    @property
    def crashes(self) -> int:
        self._forget_old_crashes()
        return len(self._crashes)

    @property
    def restart_in(self) -> float | None:
        if self.state is State.FAILED and self.restart_at is not None and self._want:
            return max(0.0, self.restart_at - time.monotonic())
        return None

    @property
    def pid(self) -> int | None:
        """The runtime's pid (the keeper's only child), found in /proc once it exists."""
        if self._proc is None or self._proc.returncode is not None:
            return None
        if self._runtime_pid is None:
            children = _children(self._proc.pid)
            self._runtime_pid = children[0] if children else None
        return self._runtime_pid

    @property
    def uptime(self) -> float | None:
        if self.state in (State.READY, State.UNHEALTHY) and self.started_at:
            return time.time() - self.started_at
        return None

    async def _send(self, kind: str, manual: bool, reason: str = "") -> None:
        if self._owner is None or self._owner.done():
            raise StartFailed("not supervised (the gateway is starting up or shutting down)")
        reply: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait(_Command(kind, manual, reason, reply))
        await reply

    # --- the owner task --------------------------------------------------------------------

    async def _own(self) -> None:
        try:
            while True:
                timeout = self._timer()
                event: _Event | None
                if timeout is not None and timeout <= 0:
                    event = None
                else:
                    try:
                        event = await asyncio.wait_for(self._inbox.get(), timeout)
                    except asyncio.TimeoutError:
                        event = None
                try:
                    await self._handle(event)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a bug here must not leave the process unowned
                    log.exception("backend %s: supervisor error", self.name)
                    await self._after_error(exc)
                    await asyncio.sleep(1.0)
        finally:
            self._hard_kill()
            for task in (self._pump, self._exit_task, self._probe_task, self._step_task):
                if task is not None:
                    task.cancel()
            self._settle(self._start_waiters, StartFailed("the gateway is shutting down"))
            self._settle(self._stop_waiters, None)

    async def _after_error(self, exc: Exception) -> None:
        """An unexpected error cut a start short (out of file descriptors while picking a port,
        an adapter bug): count it as a failed start, so it is retried with back-off or parked
        with the reason, instead of staying `starting` with no timer to move it on."""
        if self.state is not State.STARTING:
            return
        try:
            await self._terminate()
        except Exception:  # noqa: BLE001 - the state must move on regardless
            log.exception("backend %s: could not end the interrupted start", self.name)
        self._crashed(f"supervisor error while starting: {exc}", "crash", while_starting=True)

    def _timer(self) -> float | None:
        """Seconds until the next timed action in the current state; None: only events."""
        now = time.monotonic()
        if self.state is State.STARTING and self._phase == "spawned":
            due = self._deadline if self._probe_task else min(self._deadline, self._next_probe)
            return due - now
        if self.state in (State.READY, State.UNHEALTHY):
            return None if self._probe_task else self._next_probe - now
        if self.state is State.FAILED and self.restart_at is not None and self._want:
            return self.restart_at - now
        return None

    async def _handle(self, event: _Event | None) -> None:
        if event is None:
            await self._on_timer()
        elif isinstance(event, _Command):
            await self._on_command(event)
        elif event.gen != self._gen:
            return  # from a process (or attempt) that is already gone
        elif isinstance(event, _Exited):
            await self._on_exit(event.code)
        elif isinstance(event, _Probed):
            await self._on_probe(event)
        elif isinstance(event, _StepDone):
            await self._on_step(event)

    def _enter(self, new: State, reason: str = "") -> None:
        old = self.state
        if new not in ALLOWED[old]:
            raise RuntimeError(f"backend {self.name}: illegal transition {old.value} -> {new.value}")
        self.state, self.reason = new, reason
        level = logging.WARNING if new in (State.FAILED, State.UNHEALTHY) else logging.INFO
        log.log(level, "backend %s: %s -> %s%s", self.name, old.value, new.value, f" ({reason})" if reason else "")
        self.log.write(f"[gateway] {old.value} -> {new.value}{f' ({reason})' if reason else ''}")
        if self._on_state:
            self._on_state(old, new, reason)

    # --- commands ----------------------------------------------------------------------------

    async def _on_command(self, cmd: _Command) -> None:
        if cmd.kind == "stop":
            self._want = False
            self._stop_waiters.append(cmd.reply)
            await self._go_stopped(cmd.reason)
            return
        self._want = True
        if cmd.manual:
            self._crashes.clear()
            self._version_due = True  # the operator may have upgraded the runtime
        if cmd.kind == "start" and self.state is State.READY:
            self._settle([cmd.reply], None)
            return
        self._start_waiters.append(cmd.reply)
        if cmd.kind == "restart" and self.state in (State.STARTING, State.READY, State.UNHEALTHY):
            await self._go_stopped("restarting by request", settle=False)
        if self.state is State.STOPPED:
            await self._begin_start(None)
        elif self.state is State.FAILED:
            if cmd.manual:
                await self._begin_start(None)
            elif self.restart_at is None:
                self._settle(self._start_waiters, StartFailed(self.reason))
            # else: the backoff runs out and the next attempt answers the waiter

    async def _go_stopped(self, reason: str, *, settle: bool = True) -> None:
        if self.state is State.FAILED:
            self.restart_at = None
            self._enter(State.STOPPED, reason)
        elif self.state in (State.STARTING, State.READY, State.UNHEALTHY):
            self._enter(State.STOPPING, reason)
            started, had_process = time.monotonic(), self._proc is not None
            await self._terminate()
            if had_process:
                self.last_exit = f"stopped{f' ({reason})' if reason else ''}: {describe_status(self.exit_code)} " \
                                 f"after {time.monotonic() - started:.1f}s"
            self._enter(State.STOPPED, reason)
        if settle:
            self._settle(self._stop_waiters, None)
            self._settle(self._start_waiters, StartFailed(f"stopped before it was ready{f' ({reason})' if reason else ''}"))

    # --- starting ----------------------------------------------------------------------------

    async def _begin_start(self, cause: str | None) -> None:
        self._gen += 1
        reason = ""
        if cause is not None:
            self.restarts += 1
            metrics.backend_restarts.labels(self.name, self.config.runtime, cause).inc()
            reason = f"automatic restart {self.restarts} after: {self.last_exit}"
        self.starts += 1
        self.restart_at = None
        self._enter(State.STARTING, reason)
        version = None
        if self._version_due:
            try:
                version = self.adapter.version_command(self.config)
            except Exception as exc:  # noqa: BLE001 - only informative; the spawn reports real problems
                self.log.write(f"[gateway] no version check: {exc}")
        self._version_due = False
        if version is not None:
            self._phase = "version"
            self._step_task = asyncio.create_task(self._run_step(self._gen, "version", [version], VERSION_TIMEOUT))
        else:
            await self._spawn()

    async def _run_step(self, gen: int, step: str, launches: list[Launch], timeout: float) -> None:
        ok = True
        for launch in launches:
            try:
                code = await run_logged(launch, self.log, what=step, timeout=timeout, secrets=self._hidden())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported; a one-shot never breaks the owner
                self.log.write(f"[gateway] {step} failed: {exc}")
                code = -1
            ok = ok and code == 0
        self._inbox.put_nowait(_StepDone(gen, step, ok))

    async def _spawn(self) -> None:
        self.port = self.config.port or free_port(self._taken_ports())
        try:
            launch = self.adapter.launch(self.config, self.port)
            if shutil.which(launch.argv[0]) is None:
                raise FileNotFoundError(f"cannot execute {launch.argv[0]}: not found or not executable")
        except (FileNotFoundError, NotImplementedError, PermissionError, ValueError) as exc:
            self._park(str(exc))  # a retry cannot fix a missing binary or an unusable config
            return
        self._mark = self.log.written
        if self.config.port and not port_is_free(self.config.port):
            # Something else listens there (say, the runtime of a gateway killed a moment ago,
            # still in its stop_timeout): its /health would answer for this backend, and requests
            # would go to a server nobody here started. A failure, retried with back-off.
            self.log.write(f"[gateway] port {self.port} is in use by another process: not starting")
            self._crashed(f"port {self.port} is in use by another process", "crash", while_starting=True)
            return
        self.log.write(f"[gateway] starting on port {self.port}: {shlex.join(_redacted(launch.argv))}")
        try:
            proc = await asyncio.create_subprocess_exec(
                *keeper_argv(launch.argv, grace=self.config.stop_timeout),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=child_env(launch.env, self._hidden()),
                start_new_session=True,  # the keeper's own session: a terminal's ^C reaches only the gateway
            )
        except OSError as exc:
            self._park(f"cannot start the keeper: {exc.strerror or exc}")
            return
        self._proc, self.keeper_pid, self._runtime_pid = proc, proc.pid, None
        self.started_at = time.time()
        self.exit_code = None
        assert proc.stdout is not None
        self._pump = asyncio.create_task(self._pump_output(proc.stdout), name=f"{self.name}-output")
        self._exit_task = asyncio.create_task(self._watch_exit(proc, self._gen), name=f"{self.name}-exit")
        self._phase = "spawned"
        self._deadline = time.monotonic() + self.config.startup_timeout
        self._next_probe = time.monotonic()
        self._last_probe = "no answer yet"

    def _hidden(self) -> set[str]:
        """The secrets no child may inherit: the gateway's, and this backend's own key, which
        reaches the runtime only through the adapter's env (under the variable it reads)."""
        return {*self._secrets(), *([self.config.api_key] if self.config.api_key else [])}

    async def _after_ready_probe(self) -> None:
        if not self._setup_done:
            try:
                launches = self.adapter.setup_commands(self.config, self.base_url)
            except Exception as exc:  # noqa: BLE001
                self.log.write(f"[gateway] no setup commands: {exc}")
                launches = []
            if launches:
                self._phase = "setup"
                self.reason = f"running {len(launches)} setup command(s)"
                self._step_task = asyncio.create_task(self._run_step(self._gen, "setup", launches, SETUP_TIMEOUT))
                return
            self._setup_done = True
        self._become_ready()

    def _become_ready(self) -> None:
        self._phase = ""
        self._misses = self._loadings = 0
        self._loading_since = None
        self._next_probe = time.monotonic() + self.config.health_interval
        self._enter(State.READY)
        self._settle(self._start_waiters, None)

    async def _on_step(self, event: _StepDone) -> None:
        self._step_task = None
        if self.state is not State.STARTING:
            return
        if event.step == "version" and self._phase == "version":
            await self._spawn()
        elif event.step == "setup" and self._phase == "setup":
            self._setup_done = event.ok  # a failed setup is retried at the next start
            self._become_ready()

    # --- timers, probes, exits -----------------------------------------------------------

    async def _on_timer(self) -> None:
        now = time.monotonic()
        if self.state is State.STARTING and self._phase == "spawned":
            if now >= self._deadline:
                reason = f"not ready after {self.config.startup_timeout:g}s ({self._last_probe})"
                self.log.write(f"[gateway] {reason}: stopping it")
                await self._terminate()
                self._crashed(f"{reason}: {self._last_lines()}", "crash", while_starting=True)
            elif self._probe_task is None and now >= self._next_probe:
                self._launch_probe(min(self.config.health_timeout, max(self._deadline - now, 0.1)))
        elif self.state in (State.READY, State.UNHEALTHY):
            if self._probe_task is None and now >= self._next_probe:
                self._launch_probe(self.config.health_timeout)
        elif self.state is State.FAILED and self.restart_at is not None and self._want and now >= self.restart_at:
            await self._begin_start(self._restart_cause)

    def _launch_probe(self, timeout: float) -> None:
        gen = self._gen

        async def probe() -> None:
            health, detail = await self.probe(timeout)
            self._inbox.put_nowait(_Probed(gen, health, detail))

        self._probe_task = asyncio.create_task(probe(), name=f"{self.name}-probe")

    async def probe(self, timeout: float) -> tuple[Health | None, str]:
        """One health probe: the adapter's reading, or None when nothing answered in time."""
        url = self.base_url + self.adapter.health_path
        try:
            async with self._probes.get(url, headers=auth_headers(self.config),
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                body = await read_probe(resp)
                try:
                    health = self.adapter.health(resp.status, body)
                except Exception:  # noqa: BLE001 - an unreadable answer says the server is not right
                    health = Health.BROKEN
                return health, f"health check answered {resp.status}"
        except asyncio.TimeoutError:
            return None, f"no answer to the health check within {timeout:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            return None, f"health check failed: {type(exc).__name__}"

    async def _on_probe(self, event: _Probed) -> None:
        self._probe_task = None
        now = time.monotonic()
        if self.state is State.STARTING and self._phase == "spawned":
            _ = self.pid  # learn the runtime's pid while the keeper has only that one child
            if event.health is Health.READY:
                await self._after_ready_probe()
            else:
                self._last_probe = event.detail
                self._next_probe = now + PROBE_INTERVAL
            return
        if self.state not in (State.READY, State.UNHEALTHY):
            return
        self._next_probe = now + self.config.health_interval
        if event.health is Health.READY:
            self._misses = self._loadings = 0
            self._loading_since = None
            if self.state is State.UNHEALTHY:
                self._enter(State.READY)
                self._settle(self._start_waiters, None)
            return
        if event.health is Health.LOADING:
            await self._on_loading(now, event.detail)
            return
        self._misses += 1
        limit, busy = self.config.health_failures, self._inflight()
        what = f"{self._misses} health check(s) in a row failed, last: {event.detail}"
        if self._misses >= 2 * limit or (self._misses >= limit and not busy):
            await self._restart_unhealthy(what)
        elif self._misses >= limit and self.state is State.READY:
            self._enter(State.UNHEALTHY, f"{what}; {busy} request(s) in flight: no new ones until it answers, "
                                         f"restart after {2 * limit} misses")

    async def _on_loading(self, now: float, detail: str) -> None:
        """A ready runtime that answers "loading" is alive (no miss) but cannot serve. Read as alive
        and nothing more, one that went back to loading for good stayed `ready`: requests were
        sent to it and it was never restarted. So: out of routing after `health_failures` such
        answers in a row (as for misses), and restarted once it has answered so for
        `startup_timeout` (no load may take longer than a start did)."""
        self._misses = 0  # it answered; misses in between do not end the run of LOADING answers
        self._loadings += 1
        if self._loading_since is None:
            self._loading_since = now
        lasted, limit = now - self._loading_since, self.config.startup_timeout
        if lasted >= limit:
            await self._restart_unhealthy(
                f"{detail} (loading) for {lasted:.1f}s, longer than startup_timeout {limit:g}s")
        elif self._loadings >= self.config.health_failures and self.state is State.READY:
            self._enter(State.UNHEALTHY, f"{detail} (loading) {self._loadings} time(s) in a row: no new requests "
                                         f"until it is ready again, restart after {limit:g}s of it")

    async def _restart_unhealthy(self, what: str) -> None:
        if self.state is State.READY:
            self._enter(State.UNHEALTHY, f"{what}; restarting")
        self.log.write(f"[gateway] {what}: restarting it")
        await self._terminate()
        self._crashed(f"unhealthy: {what}", "unhealthy")

    async def _watch_exit(self, proc: asyncio.subprocess.Process, gen: int) -> None:
        code = await proc.wait()
        self._inbox.put_nowait(_Exited(gen, code))

    async def _on_exit(self, code: int) -> None:
        if self.state not in (State.STARTING, State.READY, State.UNHEALTHY):
            return
        starting = self.state is State.STARTING
        await self._terminate()  # the keeper is gone; this collects the output and the tasks
        when = " while starting" if starting else ""
        self._crashed(f"exited with {describe_status(code)}{when}: {self._last_lines()}", "crash",
                      while_starting=starting)

    # --- failures ----------------------------------------------------------------------------

    def _forget_old_crashes(self) -> None:
        horizon = time.monotonic() - self.config.crash_window
        while self._crashes and self._crashes[0] < horizon:
            self._crashes.popleft()

    def _crashed(self, reason: str, cause: str, *, while_starting: bool = False) -> None:
        """The process is gone after a failure: back off and restart, or park."""
        self.last_exit = reason
        self.failed_while_starting = while_starting
        self._crashes.append(time.monotonic())
        self._forget_old_crashes()
        n, limit = len(self._crashes), self.config.crash_limit
        if n > limit:
            self._park(f"{reason}; {n} failures within {self.config.crash_window:g}s (crash_limit {limit}): "
                       f"not restarting until POST /admin/backends/{self.name}/start")
            return
        delay = min(self.config.restart_backoff * 2 ** (n - 1), self.config.restart_backoff_max)
        self.restart_at = time.monotonic() + delay
        self._restart_cause = cause
        self._enter(State.FAILED, f"{reason}; restarting in {delay:g}s (failure {n} of at most {limit} "
                                  f"in {self.config.crash_window:g}s)")
        self._settle(self._start_waiters, StartFailed(self.reason))

    def _park(self, reason: str) -> None:
        self._phase = ""
        self.restart_at = None
        self._enter(State.FAILED, reason)
        self._settle(self._start_waiters, StartFailed(reason))

    @staticmethod
    def _settle(waiters: list[asyncio.Future[None]], error: BaseException | None) -> None:
        for waiter in waiters:
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)
        waiters.clear()

    # --- stopping ----------------------------------------------------------------------------

    async def _terminate(self) -> None:
        """End the current attempt: cancel its probe and one-shot commands; SIGTERM the keeper,
        which passes it to the runtime's group and SIGKILLs what is left after stop_timeout; if
        the keeper itself has not exited shortly after that, SIGKILL it and the runtime's group."""
        self._gen += 1  # from here on, events from this attempt are stale
        self._phase = ""
        for task in (self._probe_task, self._step_task):
            if task is not None:
                task.cancel()
        self._probe_task = self._step_task = None
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            runtime = self.pid
            _signal(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.config.stop_timeout + KEEPER_MARGIN)
            except asyncio.TimeoutError:
                self.log.write("[gateway] the keeper did not exit: SIGKILL")
                if runtime:
                    _signal_group(runtime, signal.SIGKILL)
                _signal_group(proc.pid, signal.SIGKILL)
                try:
                    await asyncio.wait_for(proc.wait(), 5.0)
                except asyncio.TimeoutError:
                    log.error("backend %s: keeper %d survives SIGKILL", self.name, proc.pid)
        self.exit_code = proc.returncode
        await self._drain_output()
        if self._exit_task is not None:
            self._exit_task.cancel()
        self._proc = self._exit_task = self._pump = None
        self._runtime_pid = None

    def _hard_kill(self) -> None:
        """Last resort when the owner ends with a process still up (shutdown past its bound)."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        runtime = self.pid
        if runtime:
            _signal_group(runtime, signal.SIGKILL)
        _signal_group(proc.pid, signal.SIGKILL)

    async def _pump_output(self, stream: asyncio.StreamReader) -> None:
        # Chunks, not readline(): a runtime printing a huge line without a newline must not stop
        # the pump (a full pipe would block the runtime itself).
        # At most OUTPUT_LINES_PER_SECOND lines are kept, the latest of each read: writing a line
        # costs ~25 us on the event loop, and a runtime printing as fast as it can (32k lines in
        # one 64 KiB read) stalled every request of the gateway for seconds. The rest is counted.
        loop = asyncio.get_running_loop()
        allowance, stamp, dropped = float(OUTPUT_LINES_PER_SECOND), loop.time(), 0
        # The last 20 lines, and whether each was written: if some were not, all 20 are written
        # at the end, so the last words of a runtime that floods its output and dies are in its log.
        recent: collections.deque[tuple[bytes, bool]] = collections.deque(maxlen=20)
        partial = b""
        while chunk := await stream.read(65536):
            partial += chunk
            *lines, partial = partial.split(b"\n")
            if len(partial) > 65536:
                lines.append(partial)
                partial = b""
            now = loop.time()
            allowance = min(float(OUTPUT_LINES_PER_SECOND), allowance + (now - stamp) * OUTPUT_LINES_PER_SECOND)
            stamp = now
            keep = min(len(lines), int(allowance))
            allowance -= keep
            dropped += len(lines) - keep
            first_kept = len(lines) - keep
            recent.extend((line, i >= first_kept) for i, line in enumerate(lines[-20:], max(0, len(lines) - 20)))
            if dropped and keep:
                self.log.write(f"[gateway] {dropped} lines of output dropped (more than "
                               f"{OUTPUT_LINES_PER_SECOND} a second)")
                dropped = 0
            for line in lines[len(lines) - keep:]:
                self.log.write(line.decode("utf-8", "replace"))
        if dropped:
            self.log.write(f"[gateway] {dropped} lines of output dropped (more than {OUTPUT_LINES_PER_SECOND} a second)")
        if not all(written for _, written in recent):
            self.log.write(f"[gateway] the last {len(recent)} lines of output, some of them dropped above:")
            for line, _ in recent:
                self.log.write(line.decode("utf-8", "replace"))
        if partial:
            self.log.write(partial.decode("utf-8", "replace"))

    async def _drain_output(self) -> None:
        """Let the pump read what the process wrote last; a process still holding the pipe
        cannot hang us past a short bound."""
        if self._pump is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._pump), DRAIN_BOUND)
        except asyncio.TimeoutError:
            self._pump.cancel()
        except Exception:  # noqa: BLE001 - the pump only reads; its failure changes nothing here
            pass

    def _last_lines(self, n: int = 5) -> str:
        lines = [line[:300] for line in self.log.since(self._mark)
                 if line.strip() and not line.startswith(("[gateway]", "[keeper]"))]
        return " | ".join(lines[-n:]) or "no output"


_SECRET_FLAGS = ("--api-key", "--api_key")


def _redacted(argv: list[str]) -> list[str]:
    """The command line for the log, without an API key the operator's `args` may pass (the
    log is kept on disk and served to admins)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in _SECRET_FLAGS and i + 1 < len(out):
            out[i + 1] = "***"
        elif arg.startswith(tuple(f"{flag}=" for flag in _SECRET_FLAGS)):
            out[i] = arg.split("=", 1)[0] + "=***"
    return out


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except FileNotFoundError:  # a kernel without CONFIG_PROC_CHILDREN: scan /proc
        pass
    except (OSError, ValueError):
        return []
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
