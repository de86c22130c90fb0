"""One-shot runtime commands (version probes, `ollama pull`) whose output the operator should see.

They run through `subprocess-tee`, which tees every line to a writer we give it: here, the
backend's log (ring, file, live followers). subprocess-tee is synchronous and has no timeout, so
each command runs in a worker thread, wrapped in the keeper (see keeper.py), which enforces the
time bound, dies with the gateway, and stops the command when the gateway closes the keeper's
stdin, which is how a cancelled start (stop, shutdown) cancels a running pull.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shlex
import signal
import sys
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from subprocess_tee import run

from adapters.base import Launch
from gateway.supervisor.logs import BackendLog

if TYPE_CHECKING:
    from gateway.config import Config

KEEPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keeper.py")
# Few threads: one-shot commands are rare (a start, a pull) and mostly wait.
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="oneshot")
GATEWAY_PREFIX = "GATEWAY_"  # the gateway's own variables (GATEWAY_ADMIN_KEY, GATEWAY_CONFIG, ...)


def keeper_argv(argv: list[str], *, grace: float, timeout: float | None = None, stop_on_eof: bool = False) -> list[str]:
    """`argv` run under the keeper. `-I -S`: no site, no PYTHON* variables; the keeper needs only
    the standard library, and starts in a few tens of milliseconds."""
    out = [sys.executable, "-I", "-S", KEEPER, "--grace", f"{grace:g}", "--parent", str(os.getpid())]
    if timeout:
        out += ["--timeout", f"{timeout:g}"]
    if stop_on_eof:
        out.append("--stop-on-eof")
    return [*out, "--", *argv]


def gateway_secrets(config: Config) -> frozenset[str]:
    """Every secret in the config: the admin key, the metrics token, each backend's API key,
    and the store's URL (a Redis URL may carry a password)."""
    values = [config.admin.key, config.metrics.token, config.store.url, *(b.api_key for b in config.backends)]
    return frozenset(v for v in values if v)


def child_env(launch_env: Mapping[str, str], secrets: Collection[str] = ()) -> dict[str, str]:
    """The environment of a runtime or one-shot command: the gateway's own minus its secrets,
    then `launch_env` (the adapter's variables and the backend's `env`) as it is.

    Why filter: a runtime is someone else's program. Whatever it is given, it and everything it
    spawns may print (into the backend log, served at /admin/backends/NAME/logs) or pass on. The
    gateway's environment holds its own secrets: `make run` exports GATEWAY_ADMIN_KEY, and a
    `${VAR}` in the config takes a secret from a variable of any name; `secrets` are those values.
    The rest (PATH, HOME, CUDA_*, HF_*, OLLAMA_*, ...) is what runtimes need, so it goes through.
    `launch_env` is not filtered: it is what this child is meant to have, its own API key too.
    """
    hidden = {value for value in secrets if value}
    inherited = {name: value for name, value in os.environ.items()
                 if not name.startswith(GATEWAY_PREFIX) and value not in hidden}
    return {**inherited, **launch_env}


class _LogWriter:
    """A file-like sink for subprocess-tee's `print(line, file=...)`, called from its thread:
    whole lines are handed to the event loop, which owns the log."""

    def __init__(self, loop: asyncio.AbstractEventLoop, log: BackendLog) -> None:
        self._loop, self._log, self._partial = loop, log, ""

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self._loop.call_soon_threadsafe(self._log.write, line)
        return len(text)

    def flush(self) -> None:
        pass


def _run(argv: list[str], env: dict[str, str], stdin: int, writer: _LogWriter) -> tuple[int, str]:
    try:
        result = run(argv, env=env, stdin=stdin, stdout=writer, stderr=writer, tee=True)
        return result.returncode, ""
    except Exception as exc:  # noqa: BLE001 - reported in the log; a one-shot never breaks a start
        return -1, f"{type(exc).__name__}: {exc}"


async def run_logged(launch: Launch, log: BackendLog, *, what: str, timeout: float,
                     secrets: Collection[str] = ()) -> int:
    """Run one command to completion with its output in `log`; returns its exit status (-1 when
    it could not run). Cancelling this coroutine stops the command. `secrets`: see child_env."""
    loop = asyncio.get_running_loop()
    env = child_env(launch.env, secrets)
    log.write(f"[gateway] {what}: {shlex.join(launch.argv)}")  # no secrets: version and pull take none
    read_end, write_end = os.pipe()  # the keeper's stdin; closing write_end stops the command
    writer = _LogWriter(loop, log)
    try:
        job = _POOL.submit(_run, keeper_argv(launch.argv, grace=5, timeout=timeout, stop_on_eof=True),
                           env, read_end, writer)
    except RuntimeError:  # the interpreter is shutting down
        os.close(read_end)
        os.close(write_end)
        raise
    job.add_done_callback(lambda _: os.close(read_end))  # only once the thread no longer needs it
    try:
        code, error = await asyncio.wrap_future(job)
    except asyncio.CancelledError:
        log.write(f"[gateway] {what}: cancelled")
        raise
    finally:
        os.close(write_end)
    if error:
        log.write(f"[gateway] {what} could not run: {error}")
    else:
        log.write(f"[gateway] {what} exited with status {code}")
    return code


def describe_status(code: Any) -> str:
    """A keeper's or runtime's exit status in words."""
    if code is None:
        return "an unknown status"
    if code < 0:
        return f"signal {_signame(-code)}"
    if code > 128:
        return f"status {code} (signal {_signame(code - 128)})"
    return f"status {code}"


def _signame(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)

