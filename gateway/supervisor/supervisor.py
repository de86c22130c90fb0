"""All backends: the managed processes the gateway owns and the attached servers it only watches;
on-demand start, idle stop and exclusive groups.

Every start, swap and idle stop of a backend runs under its group's lock (a backend without a
`group` is a group of one), so they never interleave. A backend on its way down is `draining`:
it is no longer `ready`, so the request path sends it nothing new, and it is stopped only once
its in-flight count is zero. The request path picks a backend and counts it in flight in the same
event-loop step (see api/v1.py), so no request can slip in between the check and the stop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from adapters import Adapter, Health, for_runtime
from gateway import metrics
from gateway.config import BackendConfig, Config
from gateway.errors import BackendUnavailable
from gateway.supervisor.logs import BackendLog
from gateway.supervisor.oneshot import gateway_secrets
from gateway.supervisor.process import KEEPER_MARGIN, RuntimeProcess, StartFailed, State, free_port
from gateway.upstream import auth_headers, read_probe

log = logging.getLogger("gateway.supervisor")

EAGER_WAIT = 15.0  # how long start-up waits for eager backends before serving /health anyway
DRAIN_POLL = 0.05
# After a start, how long the group stays locked for the callers that waited for it to take it
# (without this, two members wanted at once could swap each other out before either served).
HANDOVER = 2.0

__all__ = ["Backend", "Supervisor", "free_port"]


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
        self.draining = False  # on its way down (idle, swap, stop): no new requests
        # Stopped by the operator: no request starts it again (to free a GPU, say) until an
        # operator's start or restart.
        self.held = False
        # Attached servers have no process; their state comes from probes alone.
        self.attached_state = State.STARTING
        self.attached_reason = ""
        # Names in `serves` the runtime says it does not have (Ollama's /api/tags), if it can tell.
        self.missing_models: list[str] = []

    @property
    def managed(self) -> bool:
        return self.config.url is None

    @property
    def on_demand(self) -> bool:
        """A request may start it: `start: on_demand`, or a member of an exclusive group (an eager
        member swapped out comes back the same way)."""
        return self.managed and (self.config.start == "on_demand" or self.config.group is not None)

    @property
    def url(self) -> str:
        if self.config.url is not None:
            return self.config.url.rstrip("/")
        assert self.process is not None and self.process.port is not None
        return self.process.base_url

    @property
    def state(self) -> State:
        return self.process.state if self.process else self.attached_state

    @property
    def reason(self) -> str:
        return self.process.reason if self.process else self.attached_reason

    @property
    def ready(self) -> bool:
        return self.state is State.READY and not self.draining

    @property
    def startable(self) -> bool:
        """Stopped, and the next request for it starts it: not a fault (e.g. for /ready)."""
        return self.on_demand and self.state is State.STOPPED and not self.draining and not self.held

    def describe(self) -> dict[str, object]:
        proc = self.process
        uptime = proc.uptime if proc else None
        restart_in = proc.restart_in if proc else None
        return {
            "name": self.name,
            "runtime": self.config.runtime,
            "serves": list(self.config.serves),
            "managed": self.managed,
            "start": self.config.start if self.managed else None,
            "group": self.config.group,
            "state": self.state.value,
            "reason": self.reason or None,
            "draining": self.draining,
            "url": self.url if (not self.managed or (proc and proc.port)) else None,
            "pid": proc.pid if proc else None,
            "keeper_pid": proc.keeper_pid if proc and proc.pid else None,
            "port": proc.port if proc else None,
            "uptime_seconds": round(uptime, 1) if uptime is not None else None,
            "starts": proc.starts if proc else 0,
            "restarts": proc.restarts if proc else 0,
            "recent_failures": proc.crashes if proc else 0,
            "restart_in_seconds": round(restart_in, 1) if restart_in is not None else None,
            "last_exit": proc.last_exit if proc else None,
            "last_exit_code": proc.exit_code if proc else None,
            "missing_models": self.missing_models or None,
            "inflight": self.inflight,
            "idle_seconds": round(time.monotonic() - self.last_used, 1),
            "slots": self.config.slots,
        }


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.backends: dict[str, Backend] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # name -> the retire of its last incarnation, across reloads: a name's next incarnation
        # starts only once every earlier one is gone, however many reloads came in between.
        self._retiring: dict[str, asyncio.Task[None]] = {}
        self._bringing: dict[str, asyncio.Task[None]] = {}
        self._waiting: collections.Counter[str] = collections.Counter()  # ensure_ready callers per backend
        self._locks: dict[str, asyncio.Lock] = {}
        self._changed = asyncio.Event()
        self._closing = False
        self._probes: aiohttp.ClientSession | None = None
        # Called with a backend's name each time it becomes ready (e.g. routing forgets its failures).
        self.on_ready: list[Callable[[str], None]] = []
        # uvicorn binds it only after start-up, when the backends are already running.
        self._gateway_port = config.server.port
        self._secrets = gateway_secrets(config)  # kept out of every runtime's environment
        log_dir = Path(config.data_dir) / "logs"
        for backend_config in config.backends:
            self.backends[backend_config.name] = Backend(
                backend_config, for_runtime(backend_config.runtime, backend_config), BackendLog(backend_config.name, log_dir)
            )

    # --- life of the supervisor ----------------------------------------------------------

    async def start(self) -> None:
        # Health probes get their own pool: a probe never queues behind user traffic.
        # No cap on connections: with a shared one, backends whose health checks hang held every
        # connection, and a healthy backend's check timed out waiting for one and was restarted.
        self._probes = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
        pending: list[asyncio.Future[Any]] = []
        groups_started: set[str] = set()
        for backend in self.backends.values():
            group = backend.config.group
            eager = backend.config.start == "eager" and (group is None or group not in groups_started)
            if eager and group is not None:
                groups_started.add(group)
            pending += self._adopt(backend, eager=eager)
        if any(b.config.idle_ttl for b in self.backends.values()):
            self._spawn(self._idle_stopper(), "idle-stopper")
        if pending:
            # Most runtimes are ready in seconds, and /ready is exact from the first request on; a
            # big model still loading must not keep /health (the orchestrator's liveness) silent.
            await asyncio.wait(pending, timeout=EAGER_WAIT)

    def _adopt(self, backend: Backend, *, eager: bool) -> list[asyncio.Future[Any]]:
        """Begin watching (attached) or owning (managed) one backend; returns what to wait for."""
        if not backend.managed:
            self._spawn(self._watch_attached(backend), f"{backend.name}-attached")
            return [asyncio.ensure_future(self._probe_attached(backend))]
        backend.process = self._process_for(backend)
        backend.process.run()
        for state in State:  # the gauges start at `stopped`; that is no transition
            metrics.backend_state.labels(backend.name, backend.config.runtime, state.value).set(
                1 if state is State.STOPPED else 0)
        metrics.backend_ready.labels(backend.name, backend.config.runtime).set(0)
        return [self._spawn(self._first_start(backend), f"{backend.name}-first-start")] if eager else []

    async def apply(self, config: Config) -> dict[str, list[str]]:
        """Hot reload: unchanged backends keep running; removed ones leave routing at once, drain
        and stop; new ones start; a changed one drains and stops, then its new self starts (one
        at a time, so a GPU never holds both copies)."""
        wanted = {b.name: b for b in config.backends}
        current = self.backends
        summary: dict[str, list[str]] = {
            "added": [n for n in wanted if n not in current],
            "removed": [n for n in current if n not in wanted],
            "changed": [n for n in current if n in wanted and wanted[n] != current[n].config],
            "unchanged": [n for n in current if n in wanted and wanted[n] == current[n].config],
        }
        self._secrets = gateway_secrets(config)
        log_dir = Path(config.data_dir) / "logs"
        for name in summary["removed"] + summary["changed"]:
            why = "changed by a reload" if name in wanted else "removed by a reload"
            retire = self._spawn(self._retire(current.pop(name), why, after=self._retiring.get(name)),
                                 f"{name}-retire")
            self._retiring[name] = retire
            retire.add_done_callback(lambda task, name=name: self._retiring.get(name) is task
                                     and self._retiring.pop(name))
        for name in summary["added"] + summary["changed"]:
            backend_config = wanted[name]
            backend = Backend(backend_config, for_runtime(backend_config.runtime, backend_config),
                              BackendLog(name, log_dir))
            self.backends[name] = backend
            # (an added name may have been removed by a reload whose retire is still draining)
            self._spawn(self._join(backend, self._retiring.get(name)), f"{name}-join")
        self.backends = {name: self.backends[name] for name in wanted}  # the config's order
        if any(b.config.idle_ttl for b in self.backends.values()) and not any(
                t.get_name() == "idle-stopper" for t in self._tasks):
            self._spawn(self._idle_stopper(), "idle-stopper")
        self._pulse()
        return summary

    async def _retire(self, backend: Backend, reason: str, after: asyncio.Task[None] | None = None) -> None:
        if after is not None:  # an earlier incarnation still going: this one ends after it
            await asyncio.gather(after, return_exceptions=True)
        for task in [t for t in self._tasks if t.get_name() == f"{backend.name}-attached"]:
            task.cancel()
        if backend.process is not None:
            # Bounded by the requests' own timeout (server.request_timeout).
            while backend.inflight > 0:
                await asyncio.sleep(DRAIN_POLL)
            await backend.process.close(timeout=backend.config.stop_timeout + KEEPER_MARGIN + 2, reason=reason)
        backend.log.close()
        successor = self.backends.get(backend.name)  # (the reload has replaced the table by now)
        if successor is None or successor.config.runtime != backend.config.runtime:
            metrics.forget_backend(backend.name, backend.config.runtime, name_too=successor is None)
        else:
            metrics.backend_ready.labels(backend.name, backend.config.runtime).set(0)

    async def _join(self, backend: Backend, predecessor: asyncio.Task[None] | None) -> None:
        if predecessor is not None:
            await asyncio.gather(predecessor, return_exceptions=True)
        if self.backends.get(backend.name) is not backend:
            return  # a later reload replaced or removed it before it started: never started
        # An eager newcomer to an exclusive group waits for a request if a peer holds the GPU.
        busy_group = any(m.state is not State.STOPPED for m in self._members(backend) if m is not backend
                         and m.process is not None)
        pending = self._adopt(backend, eager=backend.config.start == "eager" and not busy_group)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def stop(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(
            b.process.close(timeout=b.config.stop_timeout + KEEPER_MARGIN + 2)
            for b in self.backends.values() if b.process
        ))
        for backend in self.backends.values():
            backend.log.close()
        if self._probes is not None:
            await self._probes.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        # A failed start is no bug: whoever asked for it says so (see _bring_up and operate).
        if not task.cancelled() and (exc := task.exception()) is not None and not isinstance(exc, StartFailed):
            log.error("supervisor task %s failed", task.get_name(), exc_info=exc)

    def _process_for(self, backend: Backend) -> RuntimeProcess:
        assert self._probes is not None

        def on_state(old: State, new: State, reason: str) -> None:
            metrics.backend_transition(backend.name, backend.config.runtime, old.value, new.value)
            if new is State.READY:  # the idle clock starts when it can first be used
                backend.last_used = max(backend.last_used, time.monotonic())
                for listener in self.on_ready:
                    listener(backend.name)
            self._pulse()

        return RuntimeProcess(backend.config, backend.adapter, backend.log, self._probes,
                              inflight=lambda: backend.inflight, on_state=on_state,
                              taken_ports=lambda: self._taken_ports(backend), secrets=lambda: self._secrets)

    def _taken_ports(self, backend: Backend) -> set[int]:
        """The gateway's own port and every port another backend has or was given."""
        taken = {self._gateway_port}
        for other in self.backends.values():
            port = other.config.port or (other.process.port if other.process else None)
            if other is not backend and port:
                taken.add(port)
        return taken

    async def _first_start(self, backend: Backend) -> None:
        assert backend.process is not None
        started = time.monotonic()
        try:
            await backend.process.start()
        except StartFailed as exc:
            # (an operator's stop abandons a start on purpose: no fault)
            log.log(logging.INFO if backend.held else logging.ERROR, "backend %s failed to start: %s",
                    backend.name, exc)
            return
        log.info("backend %s ready on port %s in %.1fs", backend.name, backend.process.port,
                 time.monotonic() - started)

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    # --- what the request path calls ---------------------------------------------------------

    async def ensure_ready(self, backends: Sequence[Backend], timeout: float, *, model: str | None = None) -> None:
        """Return once one of `backends` is ready, starting a stopped on-demand one if none is on
        its way (concurrent callers share one start); raise BackendUnavailable if none can be
        ready within `timeout`, or none ever will (failed, stopped by the operator, unreachable).

        The message names states only: reasons (process output, paths) are for operators."""
        if any(b.ready for b in backends):
            return
        deadline = time.monotonic() + timeout
        self._waiting.update(b.name for b in backends)
        try:
            while True:
                if any(b.ready for b in backends):
                    return
                if self._closing:
                    raise BackendUnavailable("The gateway is shutting down.")
                if not any(self._coming(b) for b in backends):
                    startable = [b for b in backends if b.startable]
                    if not startable:
                        raise BackendUnavailable(_why(model, backends, "is ready"), headers={"retry-after": "1"})
                    self._bring_up(self._pick(startable))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BackendUnavailable(_why(model, backends, f"became ready within {timeout:g}s"),
                                             headers={"retry-after": "1"})
                await self._wait_change(min(remaining, 0.5))
        finally:
            self._waiting.subtract(b.name for b in backends)
            self._pulse()

    def _coming(self, backend: Backend) -> bool:
        """On its way to ready (or to stopped-and-startable) without anybody's help."""
        if backend.name in self._bringing or backend.draining:
            return True
        state, proc = backend.state, backend.process
        if proc is None:
            return state is State.STARTING  # attached: before its first probe
        if state in (State.STARTING, State.UNHEALTHY):
            return True
        if state is State.STOPPING:
            return backend.on_demand
        # Crashed while serving: the restart is worth waiting for. Failing to start is not.
        return state is State.FAILED and proc.restart_at is not None and not proc.failed_while_starting

    def _pick(self, startable: list[Backend]) -> Backend:
        """Prefer a backend whose start needs no swap (its group has nothing running)."""
        for backend in startable:
            if not any(m is not backend and m.state is not State.STOPPED for m in self._members(backend)):
                return backend
        return startable[0]

    def _bring_up(self, backend: Backend) -> asyncio.Task[None]:
        task = self._bringing.get(backend.name)
        if task is None:
            task = self._spawn(self._bring_up_now(backend, manual=False), f"{backend.name}-bring-up")
            self._bringing[backend.name] = task

            def done(t: asyncio.Task[None]) -> None:
                self._bringing.pop(backend.name, None)
                if not t.cancelled() and (exc := t.exception()) is not None:
                    # (an operator's stop abandons a start on purpose: no fault)
                    log.log(logging.INFO if backend.held else logging.WARNING,
                            "backend %s: on-demand start failed: %s", backend.name, exc)
                self._pulse()

            task.add_done_callback(done)
            self._pulse()
        return task

    async def _bring_up_now(self, backend: Backend, *, manual: bool) -> None:
        """Start `backend`, first draining and stopping whatever else runs in its group."""
        assert backend.process is not None
        if manual:
            backend.held = False
        async with self._lock(backend):
            # An operator's stop may have come while this waited for the lock, or while the other
            # members drained: a held backend is started by the operator only.
            if self._closing or (not manual and (backend.ready or backend.held)):
                return
            for other in self._members(backend):
                if other is not backend and other.state is not State.STOPPED:
                    log.info("backend %s: stopping %s first (exclusive group %s)", backend.name, other.name,
                             backend.config.group)
                    await self._drain_and_stop(other, f"made way for {backend.name} (group {backend.config.group})")
            if backend.held and not manual:
                return
            await backend.process.start(manual=manual)
            # Hold the group until the callers that waited for this backend have seen it ready
            # and the first of them reached it (the request path counts a request in flight when
            # it sends it, after admission): a swap back then drains them instead of racing them.
            ready_at = time.monotonic()
            waited = self._waiting[backend.name] > 0
            while backend.ready and time.monotonic() < ready_at + HANDOVER:
                if self._waiting[backend.name] <= 0 and (not waited or backend.last_used > ready_at):
                    break
                await asyncio.sleep(DRAIN_POLL)

    async def _drain_and_stop(self, backend: Backend, reason: str, *, drain: bool = True) -> None:
        assert backend.process is not None
        backend.draining = True
        self._pulse()
        try:
            # Bounded by the requests' own timeout (server.request_timeout).
            while drain and backend.inflight > 0:
                await asyncio.sleep(DRAIN_POLL)
            await backend.process.stop(reason)
        finally:
            backend.draining = False
            self._pulse()

    def _members(self, backend: Backend) -> list[Backend]:
        group = backend.config.group
        if group is None:
            return [backend]
        return [b for b in self.backends.values() if b.config.group == group]

    def _lock(self, backend: Backend) -> asyncio.Lock:
        key = f"group:{backend.config.group}" if backend.config.group else f"backend:{backend.name}"
        return self._locks.setdefault(key, asyncio.Lock())

    # --- idle stop ---------------------------------------------------------------------------

    async def _idle_stopper(self) -> None:
        ttls = [b.config.idle_ttl for b in self.backends.values() if b.config.idle_ttl]
        tick = max(0.1, min(1.0, min(ttls) / 4))
        while True:
            await asyncio.sleep(tick)
            for backend in self.backends.values():
                if self._idle(backend) and not self._lock(backend).locked():
                    self._spawn(self._stop_idle(backend), f"{backend.name}-idle-stop")

    def _idle(self, backend: Backend) -> bool:
        ttl = backend.config.idle_ttl
        return bool(ttl) and backend.process is not None and backend.state is State.READY \
            and not backend.draining and backend.inflight == 0 and backend.name not in self._bringing \
            and time.monotonic() - backend.last_used > ttl  # type: ignore[operator]

    async def _stop_idle(self, backend: Backend) -> None:
        async with self._lock(backend):
            if self._idle(backend):  # a request may have come since the check
                log.info("backend %s: idle for %gs, stopping it", backend.name, backend.config.idle_ttl)
                await self._drain_and_stop(backend, f"idle for {backend.config.idle_ttl:g}s")

    # --- what the admin API calls ----------------------------------------------------------

    def get(self, name: str) -> Backend | None:
        return self.backends.get(name)

    def operate(self, backend: Backend, action: str, *, drain: bool = True) -> asyncio.Task[None]:
        """start | stop | restart by the operator, as a task that outlives the HTTP request.
        A manual start or restart clears the crash history (and unparks a failed backend)."""
        assert backend.process is not None
        if self._closing:
            raise BackendUnavailable("The gateway is shutting down.")
        if action == "start":
            coro = self._bring_up_now(backend, manual=True)
        elif action == "stop":
            coro = self._stop_now(backend, drain)
        else:
            coro = self._restart_now(backend, drain)
        task = self._spawn(coro, f"{backend.name}-{action}")

        def done(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and (exc := t.exception()) is not None:  # also when nobody waited
                log.warning("backend %s: %s by the operator failed: %s", backend.name, action, exc)

        task.add_done_callback(done)
        return task

    async def _stop_now(self, backend: Backend, drain: bool) -> None:
        backend.held = True
        if backend.state is State.STARTING:
            # A start holds the group's lock until the runtime is ready or startup_timeout has
            # passed (minutes for a big model): abandon it now, without the lock. Its waiters get
            # StartFailed, which frees the lock. Nothing is in flight on a runtime not yet ready,
            # and `draining` keeps it so should it become ready before the stop reaches it.
            await self._drain_and_stop(backend, "stopped by the operator", drain=False)
        async with self._lock(backend):
            await self._drain_and_stop(backend, "stopped by the operator", drain=drain)

    async def _restart_now(self, backend: Backend, drain: bool) -> None:
        assert backend.process is not None
        backend.held = False
        if backend.state in (State.STOPPED, State.FAILED):
            await self._bring_up_now(backend, manual=True)
            return
        async with self._lock(backend):
            backend.draining = True
            self._pulse()
            try:
                while drain and backend.inflight > 0:
                    await asyncio.sleep(DRAIN_POLL)
                await backend.process.restart()
            finally:
                backend.draining = False
                self._pulse()

    # --- attached servers --------------------------------------------------------------------

    async def _probe_attached(self, backend: Backend) -> None:
        assert self._probes is not None
        timeout = backend.config.health_timeout
        try:
            async with self._probes.get(backend.url + backend.adapter.health_path, headers=auth_headers(backend.config),
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                health = backend.adapter.health(resp.status, await read_probe(resp))
                detail = f"health check answered {resp.status}"
        except asyncio.TimeoutError:
            health, detail = None, f"no answer to the health check within {timeout:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            health, detail = None, f"unreachable: {type(exc).__name__} {exc}".strip()
        except Exception as exc:  # noqa: BLE001 - an answer the adapter cannot read is not health
            log.exception("backend %s (attached): unreadable health answer", backend.name)
            health, detail = None, f"unreadable health answer: {type(exc).__name__} {exc}".strip()
        new = State.READY if health is Health.READY else State.UNHEALTHY
        if new is not backend.attached_state:
            metrics.backend_transition(backend.name, backend.config.runtime, backend.attached_state.value, new.value)
            log.info("backend %s (attached): %s -> %s%s", backend.name, backend.attached_state.value, new.value,
                     "" if new is State.READY else f" ({detail})")
            backend.attached_state = new
            if new is State.READY:
                await self._check_models(backend)
                for listener in self.on_ready:
                    listener(backend.name)
            self._pulse()
        backend.attached_reason = "" if new is State.READY else detail

    async def _check_models(self, backend: Backend) -> None:
        """An attached server we cannot pull models into: say clearly which listed ones it lacks."""
        path = backend.adapter.models_path
        if path is None or self._probes is None:
            return
        try:
            async with self._probes.get(backend.url + path, headers=auth_headers(backend.config),
                                        timeout=aiohttp.ClientTimeout(total=backend.config.health_timeout)) as resp:
                backend.missing_models = backend.adapter.missing_models(backend.config, resp.status,
                                                                        await read_probe(resp))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.warning("backend %s: cannot list its models (%s)", backend.name, exc)
            return
        if backend.missing_models:
            log.warning("backend %s does not have %s, which the config lists in `serves`; requests for them "
                        "fail until it does (check the names: the runtime's own, as its model list gives them)",
                        backend.name, ", ".join(backend.missing_models))

    async def _watch_attached(self, backend: Backend) -> None:
        while True:
            await asyncio.sleep(backend.config.health_interval)
            try:
                await self._probe_attached(backend)
            except Exception:  # noqa: BLE001 - the watch must outlive a bug, or the state freezes
                log.exception("backend %s (attached): health watch failed", backend.name)


def _why(model: str | None, backends: Sequence[Backend], what: str) -> str:
    states = ", ".join(f"{b.name} is {'draining' if b.draining else b.state.value}" for b in backends)
    subject = f"model `{model}`" if model else "this model"
    return f"No backend for {subject} {what} ({states}). Try again later."
