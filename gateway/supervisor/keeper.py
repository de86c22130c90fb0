"""A tiny parent for one runtime, so that nothing the runtime spawns outlives it or the gateway.

    python keeper.py [--grace S] [--timeout S] [--parent PID] [--stop-on-eof] -- ARGV...

Why a separate process: PR_SET_PDEATHSIG only reaches the gateway's *direct* child, and a process
group can be escaped (`setsid`); vLLM workers and Ollama runners are grandchildren that survive a
SIGKILL of their parent. A gateway killed with SIGKILL can clean nothing up itself, so somebody
else must be alive to do it. The keeper:

  - asks the kernel for SIGTERM when the gateway dies (PR_SET_PDEATHSIG), and checks that the
    gateway did not die before it asked (`--parent`);
  - becomes a child subreaper (PR_SET_CHILD_SUBREAPER): every orphaned descendant of the runtime,
    even one that left the process group, is re-parented to the keeper instead of init; so
    "the keeper has no children left" means "no descendant is alive";
  - runs the runtime as the leader of a new process group (and gives the runtime PDEATHSIG
    SIGKILL, for the case the keeper itself is SIGKILLed);
  - on SIGTERM/SIGINT/SIGHUP, on the gateway's death, on `--timeout`, on EOF of stdin
    (`--stop-on-eof`: the gateway holds the pipe's other end; closing it cancels a one-shot
    command), and when the runtime exits on its own while children remain: SIGTERM to the group and
    to every descendant, SIGKILL to whatever is left after `--grace` seconds;
  - exits once no descendant is left, with the runtime's status (128+N for a signal N).
Its own lines go to stderr prefixed `[keeper]`. Standard library only: it runs with `python -I -S`.
cgroups would be stronger still but need a delegated hierarchy the gateway cannot assume.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
TICK = 0.1  # while stopping; otherwise signals (SIGCHLD too) wake the loop through the wakeup fd
IDLE_TICK = 5.0
KILL_WAIT = 10.0  # after SIGKILL, how long to wait for the kernel before giving up


def say(message: str) -> None:
    try:
        os.write(2, f"[keeper] {message}\n".encode())
    except OSError:  # the gateway (our stderr) is gone; keep cleaning up regardless
        pass


def parse(argv: list[str]) -> tuple[dict[str, float | int | bool], list[str]]:
    opts: dict[str, float | int | bool] = {"grace": 10.0, "timeout": 0.0, "parent": 0, "stop_on_eof": False}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return opts, argv[i + 1:]
        if arg == "--stop-on-eof":
            opts["stop_on_eof"] = True
        elif arg in ("--grace", "--timeout"):
            opts[arg[2:]] = float(argv[i + 1])
            i += 1
        elif arg == "--parent":
            opts["parent"] = int(argv[i + 1])
            i += 1
        else:
            break
        i += 1
    raise SystemExit("usage: keeper.py [--grace S] [--timeout S] [--parent PID] [--stop-on-eof] -- ARGV...")


def descendants(root: int) -> list[int]:
    """Every process below `root`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def main(argv: list[str]) -> int:
    opts, command = parse(argv)
    if not command:
        raise SystemExit("keeper.py: no command given")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if opts["parent"] and os.getppid() != opts["parent"]:
        say("the gateway exited before the runtime started")
        return 1
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        os.setsid()  # already a session leader when the gateway spawned us with start_new_session
    except OSError:
        pass

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    requested: list[str] = []

    def on_stop(signum: int, _frame: object) -> None:
        requested.append(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_stop)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake select() through the wakeup fd

    runtime = os.fork()
    if runtime == 0:
        try:
            os.setpgid(0, 0)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_DFL)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.execvp(command[0], command)
        except BaseException as exc:  # noqa: BLE001 - report and leave; nothing else may run here
            os.write(2, f"cannot execute {command[0]}: {getattr(exc, 'strerror', None) or exc}\n".encode())
        finally:
            os._exit(127)
    try:
        os.setpgid(runtime, runtime)  # also from this side, so the group exists before we signal it
    except OSError:
        pass

    status: int | None = None
    runtime_reaped = False
    started = time.monotonic()
    term_deadline: float | None = None
    kill_deadline: float | None = None
    watch_stdin = bool(opts["stop_on_eof"])
    me = os.getpid()

    def signal_all(sig: int) -> None:
        # The group while its leader is unreaped (its pid cannot be reused until then), and every
        # descendant by pid, which also reaches those that left the group.
        if not runtime_reaped:
            try:
                os.killpg(runtime, sig)
            except OSError:
                pass
        for pid in descendants(me):
            try:
                if not runtime_reaped and os.getpgid(pid) == runtime:
                    continue  # just signalled through the group: a second SIGTERM can cut a clean exit short
                os.kill(pid, sig)
            except OSError:
                pass

    while True:
        # Reap every child: the runtime, and the orphans the subreaper role hands us.
        none_left = False
        while True:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                none_left = True
                break
            if pid == 0:
                break
            if pid == runtime:
                status, runtime_reaped = wstatus, True
        if none_left:
            break
        now = time.monotonic()
        if term_deadline is None:
            why = None
            if requested:
                why = f"received {requested[0]}"
            elif runtime_reaped:
                why = "the runtime exited; stopping what it left behind"
            elif opts["timeout"] and now - started >= float(opts["timeout"]):
                why = f"timed out after {float(opts['timeout']):g}s"
            if why:
                if why.startswith("received") or why.startswith("timed"):
                    say(f"{why}: SIGTERM to the runtime's process group")
                else:
                    say(why)
                signal_all(signal.SIGTERM)
                term_deadline = now + float(opts["grace"])
        elif kill_deadline is None and now >= term_deadline:
            say(f"still running {float(opts['grace']):g}s after SIGTERM: SIGKILL")
            signal_all(signal.SIGKILL)
            kill_deadline = now + KILL_WAIT
        elif kill_deadline is not None:
            if now >= kill_deadline:
                say("descendants survive SIGKILL (uninterruptible?); giving up")
                break
            signal_all(signal.SIGKILL)  # anything forked since the last round
        wait = IDLE_TICK
        if term_deadline is not None:
            wait = TICK
        elif opts["timeout"]:
            wait = min(IDLE_TICK, max(0.0, started + float(opts["timeout"]) - now))
        fds = [wake_r] + ([0] if watch_stdin else [])
        try:
            readable, _, _ = select.select(fds, [], [], wait)
        except InterruptedError:
            readable = []
        if wake_r in readable:
            try:
                os.read(wake_r, 512)
            except BlockingIOError:
                pass
        if 0 in readable:
            try:
                data = os.read(0, 4096)
            except OSError:
                data = b""
            if not data:
                watch_stdin = False
                requested.append("EOF on stdin")

    if status is None:
        return 1
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
