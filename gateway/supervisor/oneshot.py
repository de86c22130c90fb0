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
from typing import Any

from subprocess_tee import run

from adapters.base import Launch
from gateway.supervisor.logs import BackendLog

KEEPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keeper.py")
# Few threads: one-shot commands are rare (a start, a pull) and mostly wait.
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="oneshot")


def keeper_argv(argv: list[str], *, grace: float, timeout: float | None = None, stop_on_eof: bool = False) -> list[str]:
    """`argv` run under the keeper. `-I -S`: no site, no PYTHON* variables; the keeper needs only
    the standard library, and starts in a few tens of milliseconds."""
    out = [sys.executable, "-I", "-S", KEEPER, "--grace", f"{grace:g}", "--parent", str(os.getpid())]
    if timeout:
        out += ["--timeout", f"{timeout:g}"]
    if stop_on_eof:
        out.append("--stop-on-eof")
    return [*out, "--", *argv]


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


async def run_logged(launch: Launch, log: BackendLog, *, what: str, timeout: float) -> int:
    """Run one command to completion with its output in `log`; returns its exit status (-1 when
    it could not run). Cancelling this coroutine stops the command."""
    loop = asyncio.get_running_loop()
    env = {**os.environ, **launch.env}
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

