"""The supervisor in-process, against real fake runtimes (tests/fakes/misbehaving.py): the
lifecycle, crash loops, timeouts, stopping whole process trees, liveness, one-shot commands."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from adapters.base import Launch
from adapters.llamacpp import LlamaCppAdapter
from gateway.supervisor import Backend, State
from gateway.supervisor import process as process_module
from gateway.supervisor.process import ALLOWED, StartFailed
from tests.helpers import alive, descendants, free_port
from tests.supervisor.conftest import MakeSupervisor
from tests.supervisor.support import counter, fake, until


def log_text(backend: Backend) -> str:
    return "\n".join(backend.log.tail(2000))


async def gone(pid: int, timeout: float = 3.0) -> bool:
    return await until(lambda: not alive(pid), timeout)


def read_pid(path: Path) -> int:
    return int(path.read_text().strip())


# --- the table -------------------------------------------------------------------------------


def test_every_state_is_reachable_and_can_end_stopped() -> None:
    reachable, todo = {State.STOPPED}, [State.STOPPED]
    while todo:
        for nxt in ALLOWED[todo.pop()]:
            if nxt not in reachable:
                reachable.add(nxt)
                todo.append(nxt)
    assert reachable == set(State)
    for state in State:  # from anywhere, a stop ends in `stopped`
        assert State.STOPPED in ALLOWED[state] or State.STOPPING in ALLOWED[state] or state is State.STOPPED


# --- starting ----------------------------------------------------------------------------------


async def test_start_ready_and_metrics(supervise: MakeSupervisor) -> None:
    sup = await supervise(fake("plain"))
    backend = sup.backends["plain"]
    assert backend.ready and backend.process is not None
    pid = backend.process.pid
    assert pid and alive(pid) and "misbehaving.py" in Path(f"/proc/{pid}/cmdline").read_text()
    assert counter("gateway_backend_ready", backend="plain", runtime="llamacpp") == 1
    assert counter("gateway_backend_transitions_total", backend="plain", runtime="llamacpp", state="ready") == 1
    info = backend.describe()
    assert info["state"] == "ready" and info["pid"] == pid and info["starts"] == 1 and info["restarts"] == 0
    # the version command ran first, through subprocess-tee, with its output kept in the log
    text = log_text(backend)
    assert text.index("[gateway] version:") < text.index("[gateway] starting on port")
    assert "the following arguments are required: --port" in text  # what `misbehaving.py --version` says


async def test_exit_at_once_is_a_crash_loop_that_parks_with_the_reason(supervise: MakeSupervisor) -> None:
    sup = await supervise(fake("crashy", "exit", crash_limit=4, restart_backoff="0.1s", restart_backoff_max="0.3s"))
    backend = sup.backends["crashy"]
    proc = backend.process
    assert proc is not None
    assert await until(lambda: proc.parked, 20), backend.describe()
    assert proc.starts == 5 and proc.restarts == 4
    assert "failed to load model" in backend.reason and "crash_limit 4" in backend.reason
    assert "/admin/backends/crashy/start" in backend.reason
    # the backoff doubles from restart_backoff and stops at restart_backoff_max
    delays = [line.split("restarting in ")[1].split("s ")[0] for line in backend.log.tail(500)
              if line.startswith("[gateway] starting -> failed") and "restarting in" in line]
    assert delays == ["0.1", "0.2", "0.3", "0.3"]
    assert counter("gateway_backend_restarts_total", backend="crashy", runtime="llamacpp", cause="crash") == 4

    # a parked backend is not waited for
    started = time.monotonic()
    with pytest.raises(Exception, match="crashy is failed"):
        await sup.ensure_ready([backend], timeout=10, model="crashy-model")
    assert time.monotonic() - started < 1

    # the manual reset clears the history: a fresh round of attempts, not an immediate park
    with pytest.raises(StartFailed, match="failed to load model"):
        await sup.operate(backend, "start")
    assert proc.starts == 6 and proc.crashes == 1 and not proc.parked


async def test_never_ready_hits_the_startup_timeout(supervise: MakeSupervisor) -> None:
    started = time.monotonic()
    sup = await supervise(fake("slow", "never_ready", startup_timeout="1s", crash_limit=1))
    backend = sup.backends["slow"]
    assert backend.state is State.FAILED
    assert 1.0 <= time.monotonic() - started < 5
    assert "not ready after 1s (health check answered 503)" in backend.reason
    assert backend.process is not None and backend.process.failed_while_starting


async def test_a_backend_never_gets_the_gateways_port_or_another_backends(
        supervise: MakeSupervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel only knows ports bound now. uvicorn binds the gateway's port after the backends
    # have started, and a backend binds its port a moment after it was picked. Offer exactly those
    # ports first, as the kernel once did in CI, and check that they are passed over.
    gateway_port, shared = free_port(), free_port()
    offered = [gateway_port, shared, gateway_port, shared]

    class Offering(socket.socket):
        def getsockname(self) -> Any:
            return ("127.0.0.1", offered.pop(0)) if offered else super().getsockname()

    monkeypatch.setattr(process_module, "socket", SimpleNamespace(socket=Offering))  # free_port's alone
    sup = await supervise(fake("one"), fake("two"), server={"port": gateway_port})
    ports = [backend.process.port for backend in sup.backends.values() if backend.process]
    assert not offered  # both backends were offered the gateway's port, and `shared`
    assert all(backend.ready for backend in sup.backends.values())
    assert shared in ports and gateway_port not in ports and len(set(ports)) == 2


async def test_missing_binary_parks_at_once(supervise: MakeSupervisor) -> None:
    sup = await supervise({**fake("nobin"), "binary": "/nonexistent/llama-server"})
    backend = sup.backends["nobin"]
    assert backend.state is State.FAILED and backend.process is not None and backend.process.parked
    assert "cannot execute /nonexistent/llama-server" in backend.reason


# --- stopping ------------------------------------------------------------------------------------


async def test_stop_is_prompt_for_a_runtime_that_honours_sigterm(supervise: MakeSupervisor) -> None:
    sup = await supervise(fake("polite", stop_timeout="3s"))
    backend = sup.backends["polite"]
    assert backend.process is not None
    pid, keeper = backend.process.pid, backend.process.keeper_pid
    assert pid and keeper
    started = time.monotonic()
    await sup.operate(backend, "stop")
    assert time.monotonic() - started < 1.5
    assert backend.state is State.STOPPED and not alive(pid) and not alive(keeper)
    assert "SIGKILL" not in log_text(backend)


async def test_ignore_term_gets_sigkill_after_stop_timeout(supervise: MakeSupervisor) -> None:
    sup = await supervise(fake("deaf", "ignore_term", stop_timeout="1.5s"))
    backend = sup.backends["deaf"]
    assert backend.process is not None
    pid = backend.process.pid
    assert pid
    started = time.monotonic()
    await sup.operate(backend, "stop")
    took = time.monotonic() - started
    assert 1.5 <= took < 4.0, took
    assert await gone(pid)
    assert "still running 1.5s after SIGTERM: SIGKILL" in log_text(backend)
    assert "SIGKILL" in (backend.process.last_exit or "")


@pytest.mark.parametrize("mode", ["grandchild", "escape", "hold_pipes"])
async def test_no_grandchild_survives_a_stop(supervise: MakeSupervisor, tmp_path: Path, mode: str) -> None:
    """grandchild: same group; escape: its own session, deaf to SIGTERM; hold_pipes: keeps the
    output pipe open and is deaf to SIGTERM (the stop must not hang on the pipe either)."""
    pid_file = tmp_path / f"{mode}.pid"
    sup = await supervise(fake("parent", mode, pid_file=str(pid_file), stop_timeout="1s"))
    backend = sup.backends["parent"]
    assert backend.ready
    grandchild = read_pid(pid_file)
    assert alive(grandchild)
    started = time.monotonic()
    await sup.operate(backend, "stop")
    assert time.monotonic() - started < 4.0
    assert await gone(grandchild), f"{mode}: grandchild {grandchild} survived"
    assert backend.state is State.STOPPED


# --- crashes and liveness ------------------------------------------------------------------------


async def test_kill_9_of_the_runtime_restarts_it(supervise: MakeSupervisor) -> None:
    sup = await supervise(fake("victim"))
    backend = sup.backends["victim"]
    proc = backend.process
    assert proc is not None and proc.pid
    old = proc.pid
    os.kill(old, signal.SIGKILL)
    assert await until(lambda: backend.state is State.FAILED, 5)
    assert "SIGKILL" in backend.reason and not backend.ready
    assert await until(lambda: backend.ready, 10), backend.describe()
    assert proc.pid != old and proc.restarts == 1
    assert counter("gateway_backend_restarts_total", backend="victim", runtime="llamacpp", cause="crash") == 1


async def test_hung_health_check_is_unhealthy_then_restarted(supervise: MakeSupervisor) -> None:
    sup = await supervise(fake("hangs", "hang_health", env={"FAKE_HEALTHY_SECONDS": "0.5"}))
    backend = sup.backends["hangs"]
    proc = backend.process
    assert proc is not None and backend.ready
    old = proc.pid
    assert await until(lambda: proc.restarts == 1, 10), backend.describe()
    assert counter("gateway_backend_transitions_total", backend="hangs", runtime="llamacpp", state="unhealthy") >= 1
    assert counter("gateway_backend_restarts_total", backend="hangs", runtime="llamacpp", cause="unhealthy") >= 1
    assert "unhealthy: 2 health check(s) in a row failed" in (proc.last_exit or "")
    assert await until(lambda: backend.ready, 5) and proc.pid != old


async def test_a_busy_backend_gets_twice_the_misses(supervise: MakeSupervisor) -> None:
    """With a request in flight, `health_failures` misses only take it out of routing; the restart
    waits for twice as many."""
    sup = await supervise(fake("busy", "hang_health", env={"FAKE_HEALTHY_SECONDS": "0.3"}))
    backend = sup.backends["busy"]
    proc = backend.process
    assert proc is not None and backend.ready
    backend.inflight = 1  # what the request path counts while a request runs
    try:
        assert await until(lambda: backend.state is State.UNHEALTHY, 5)
        assert proc.restarts == 0 and not backend.ready
        assert "in flight" in backend.reason
        assert await until(lambda: proc.restarts == 1, 5)
        assert "4 health check(s) in a row failed" in (proc.last_exit or "")
    finally:
        backend.inflight = 0


async def test_a_saturated_llamacpp_s_503_no_slot_is_not_a_miss(supervise: MakeSupervisor) -> None:
    """A runtime that answers its health check 503 "no slot available" while busy (older
    llama.cpp) is alive and serving: it stays ready and is never restarted for it."""
    sup = await supervise(fake("saturated", "busy_health", startup_timeout="1s", env={"FAKE_HEALTHY_SECONDS": "0.8"}))
    backend = sup.backends["saturated"]
    proc = backend.process
    assert proc is not None and backend.ready
    await asyncio.sleep(1.0)
    _, detail = await proc.probe(1.0)
    assert detail == "health check answered 503"
    await asyncio.sleep(1.5)  # 7 probe intervals, longer than startup_timeout
    assert backend.ready and proc.restarts == 0


async def test_a_ready_backend_loading_again_for_good_is_restarted_after_startup_timeout(
        supervise: MakeSupervisor) -> None:
    """llama-server answers 503 "Loading model" while it loads. A runtime that answers so after it
    was ready is alive (no miss: it is not restarted at `health_failures`) but cannot serve: out
    of routing after `health_failures` such answers, restarted once it has answered so for
    `startup_timeout`. It used to stay ready for good."""
    sup = await supervise(fake("stuck", "stuck_loading", startup_timeout="2s", env={"FAKE_HEALTHY_SECONDS": "0.5"}))
    backend = sup.backends["stuck"]
    proc = backend.process
    assert proc is not None and backend.ready
    old = proc.pid
    assert await until(lambda: backend.state is State.UNHEALTHY, 5), backend.describe()
    unhealthy_at = time.monotonic()
    assert "answered 503 (loading) 2 time(s) in a row" in backend.reason and proc.restarts == 0
    assert await until(lambda: proc.restarts == 1, 10), backend.describe()
    assert time.monotonic() - unhealthy_at > 1.0  # not at the misses' pace (2 x 0.2s), at startup_timeout's
    assert "answered 503 (loading) for" in (proc.last_exit or "")
    assert "longer than startup_timeout 2s" in (proc.last_exit or "")
    assert counter("gateway_backend_restarts_total", backend="stuck", runtime="llamacpp", cause="unhealthy") == 1
    assert await until(lambda: backend.ready, 5) and proc.pid != old


async def test_a_503_while_ready_leaves_routing_until_a_200_which_ends_the_count(
        supervise: MakeSupervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of "loading" answers shorter than `startup_timeout` only keeps requests away; a 200
    brings it back and starts the next run's clock afresh. (The adapter's reading is switched,
    as the fake cannot turn back from loading.)"""
    from adapters.base import Health

    sup = await supervise(fake("flaky", startup_timeout="2s"))
    backend = sup.backends["flaky"]
    proc = backend.process
    assert proc is not None and backend.ready
    loading = True
    reading = backend.adapter.health
    monkeypatch.setattr(backend.adapter, "health",
                        lambda status, body: Health.LOADING if loading else reading(status, body))
    for _ in range(2):  # two runs of 503s, each shorter than startup_timeout, together longer
        loading = True
        assert await until(lambda: backend.state is State.UNHEALTHY, 3), backend.describe()
        await asyncio.sleep(0.9)
        assert backend.state is State.UNHEALTHY and not backend.ready and proc.restarts == 0
        loading = False
        assert await until(lambda: backend.ready, 3), backend.describe()
    assert proc.restarts == 0


# --- one-shot commands -------------------------------------------------------------------------


class _WithSetup(LlamaCppAdapter):
    def __init__(self, backend: Any, setup: list[list[str]]) -> None:
        super().__init__(backend)
        self._setup = setup

    def version_command(self, backend: Any) -> Launch | None:
        return Launch([sys.executable, "-c", "print('fake-runtime version 1.2.3')"])

    def setup_commands(self, backend: Any, base_url: str) -> list[Launch]:
        return [Launch([*argv, base_url]) for argv in self._setup]


async def test_version_and_setup_output_is_kept_in_the_log(supervise: MakeSupervisor) -> None:
    sup = await supervise(fake("setup"), start=False)
    backend = sup.backends["setup"]
    script = "import sys; print('pulling manifest'); print('success', sys.argv[1], flush=True)"
    backend.adapter = _WithSetup(backend.config, [[sys.executable, "-c", script]])
    await sup.start()
    assert backend.ready
    text = log_text(backend)
    assert "fake-runtime version 1.2.3" in text
    assert text.index("fake-runtime version 1.2.3") < text.index("[gateway] starting on port")
    assert text.index("pulling manifest") < text.index("[gateway] starting -> ready")
    assert f"success http://127.0.0.1:{backend.process.port}" in text  # type: ignore[union-attr]
    assert "[gateway] setup exited with status 0" in text


async def test_a_stop_cancels_a_running_setup_command(supervise: MakeSupervisor,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.supervisor.supervisor.EAGER_WAIT", 1.0)  # start-up does not wait for the pull
    sup = await supervise(fake("pulling"), start=False)
    backend = sup.backends["pulling"]
    token = f"setup-sleeper-{os.getpid()}-{time.monotonic_ns()}"
    backend.adapter = _WithSetup(backend.config, [[sys.executable, "-c", "import time; time.sleep(60)", token]])
    await sup.start()
    assert backend.state is State.STARTING and "setup" in backend.reason

    def sleepers() -> list[int]:
        return [p for p in descendants(os.getpid()) if token in _cmdline(p)]

    assert await until(lambda: bool(sleepers()), 5)
    started = time.monotonic()
    await sup.operate(backend, "stop")
    assert time.monotonic() - started < 3
    assert await until(lambda: not sleepers(), 8), "the setup command outlived the stop"
    assert "[gateway] setup: cancelled" in log_text(backend)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


async def test_an_unexpected_error_while_starting_is_a_failed_start_that_is_retried(
        supervise: MakeSupervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    # Out of file descriptors while a port is picked: the start used to stay `starting` for good.
    real_free_port, failures = process_module.free_port, 1

    def no_fds(taken: Any = ()) -> int:
        nonlocal failures
        if failures:
            failures -= 1
            raise OSError(24, "Too many open files")
        return real_free_port(taken)

    monkeypatch.setattr(process_module, "free_port", no_fds)
    sup = await supervise(fake("b1", restart_backoff="0.2s"), start=False)
    await sup.start()
    backend = sup.backends["b1"]
    assert await until(lambda: backend.ready, 15), backend.describe()
    assert failures == 0 and backend.process is not None and backend.process.restarts == 1
    assert "Too many open files" in (backend.process.last_exit or "")


async def test_an_attached_backend_whose_health_answer_cannot_be_read_is_unhealthy_not_frozen(
        supervise: MakeSupervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    from aiohttp import web

    from adapters.base import Adapter, Health

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    broken = True

    def reading(self: Adapter, status: int, body: bytes) -> Health:
        if broken:
            raise KeyError("an adapter bug")
        return Health.READY

    monkeypatch.setattr(Adapter, "health", reading)
    try:
        sup = await supervise({"name": "far", "runtime": "openai", "url": f"http://127.0.0.1:{port}",
                               "serves": ["far-model"], "health_interval": "0.1s"})
        backend = sup.backends["far"]
        assert await until(lambda: backend.state is State.UNHEALTHY, 5), backend.describe()
        assert "unreadable health answer" in backend.reason
        broken = False  # the watch went on: the backend comes back
        assert await until(lambda: backend.ready, 5), backend.describe()
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("per_second", [1, process_module.OUTPUT_LINES_PER_SECOND])
async def test_a_runtime_that_floods_its_output_keeps_a_bounded_share(tmp_path: Path, per_second: int,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The audit's runtime printing as fast as it can stalled every request of the gateway: each
    # line written costs the event loop ~25 us, and one 64 KiB read holds 32k lines. (At 1 a
    # second the last read keeps only its very last line: its last words must still be kept.)
    from gateway.supervisor.logs import MAX_LINE, BackendLog

    monkeypatch.setattr(process_module, "OUTPUT_LINES_PER_SECOND", per_second)
    log = BackendLog("flood", tmp_path)
    reader = asyncio.StreamReader()
    reader.feed_data(b"".join(b"y %d\n" % i for i in range(100_000)) + b"the last words\n")
    reader.feed_data(b"x" * (MAX_LINE + 10) + b"\n")
    reader.feed_eof()
    await process_module.RuntimeProcess._pump_output(SimpleNamespace(log=log), reader)  # type: ignore[arg-type]
    kept = log.tail(5000)
    assert len(kept) <= 2 * per_second + 30  # of 100,000 (the allowance refills as it runs; the last 20 again)
    assert "the last words" in kept  # the latest lines of a read are the ones kept
    assert any(line.startswith("[gateway] ") and "lines of output dropped" in line for line in kept), kept[-3:]
    # A line longer than MAX_LINE is cut in memory, whole in the file.
    assert kept[-1].startswith("x" * MAX_LINE + " [... 10 more characters in flood.log]")
    log.close()
    assert "x" * (MAX_LINE + 10) in (tmp_path / "flood.log").read_text()


async def test_a_fixed_port_another_process_holds_is_not_taken_for_the_backend(supervise: MakeSupervisor) -> None:
    # The audit's case: a server already on the backend's `port:` answered its health check, so
    # the backend was "ready" on a server nobody here started, and requests went there.
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    try:
        sup = await supervise(fake("one", port=port))
        backend = sup.backends["one"]
        assert await until(lambda: backend.state is State.FAILED and "in use" in backend.reason, 10), backend.reason
        assert not backend.ready
    finally:
        squatter.close()
    # Once the port is free, the next try starts it there.
    assert await until(lambda: backend.ready, 20), backend.reason
    assert backend.process is not None and backend.process.port == port
