#!/usr/bin/env python3
"""Instructions the gateway executes per request, counted by callgrind: a measure of the hot
path that the machine's load and clock do not move, for comparing two versions of the code.

`make bench` times everything on a shared 2-core machine, where the same code measured twice can
differ by 2x (bench/README.md). Here the gateway runs under `valgrind --tool=callgrind` with
counting off; the fake upstream and `hey` run natively. After a warm-up, counting is switched on
for a fixed number of requests (non-streamed, then streamed), and the instructions the gateway
process executed are divided by the number of requests. Two runs of the same code agree to
about 0.2 %. Instructions are not time (a cache miss costs more than an add), but a change that
takes out work shows up here at once, and exactly.

    python bench/count.py [--requests 300] [--redis] [--passthrough] [--save]

The full pipeline is counted (key check, admission, routing, the upstream call, metrics, usage),
on the embedded store, and with --redis on a Redis store too; --passthrough counts bench/passthrough.py
first, the stack alone, so the pipeline's own share can be read off. Needs valgrind and hey
(`make bench-deps`).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from run import CHAT, HOST, PY, RESULTS, ROOT, Processes, free_port, log, wait_ready

ADMIN_KEY = "count-admin-" + "0" * 16
BODY = {"model": "fake", "messages": [{"role": "user", "content": "Say hello in eight words."}], "max_tokens": 16}
CONCURRENCY = 4


class Counted:
    """A server under callgrind, counting only while told to: `argv` after the valgrind part."""

    key: str | None = None

    def __init__(self, procs: Processes, work: Path, label: str, argv: list[str],
                 env: dict[str, str] | None = None) -> None:
        self.procs, self.work = procs, work
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.out = work / f"callgrind-{label}"
        self.proc = procs.start(label, [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={self.out}.%p",
            *[arg.replace("{port}", str(self.port)) for arg in argv]], env=env, cwd=ROOT)

    def load(self, requests: int, stream: bool) -> None:
        body = {**BODY, **({"stream": True, "stream_options": {"include_usage": True}} if stream else {})}
        auth = ["-H", f"Authorization: Bearer {self.key}"] if self.key else []
        out = self.procs.run("hey", ["hey", "-n", str(requests), "-c", str(CONCURRENCY), "-m", "POST",
                                     "-T", "application/json", *auth,
                                     "-d", json.dumps(body), self.base + CHAT], timeout=900)
        ok = sum(int(n) for code, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out) if code.startswith("2"))
        if ok != requests:
            raise RuntimeError(f"{requests - ok} of {requests} requests failed:\n{out[-1500:]}")

    def count(self, requests: int, stream: bool) -> float:
        """Instructions per request over `requests` requests."""
        self._control("--zero")
        self._control("--instr=on")
        self.load(requests, stream)
        self._control("--instr=off")
        before = set(self.work.glob(f"{self.out.name}.*"))
        self._control("--dump")
        (dump,) = set(self.work.glob(f"{self.out.name}.*")) - before
        totals = re.search(r"^totals:\s+(\d+)", dump.read_text(errors="replace"), re.M)
        assert totals, f"no totals line in {dump}"
        return int(totals.group(1)) / requests

    def _control(self, flag: str) -> None:
        subprocess.run(["callgrind_control", flag, str(self.proc.pid)], check=True, capture_output=True, timeout=120)


class CountedPassthrough(Counted):
    """bench/passthrough.py (the stack alone: Litestar + aiohttp, no pipeline), for comparison."""

    def __init__(self, procs: Processes, work: Path, upstream: str) -> None:
        super().__init__(procs, work, "passthrough", [
            PY, "-m", "uvicorn", "passthrough:app", "--app-dir",
            str(ROOT / "bench"), "--host", HOST, "--port", "{port}", "--loop", "uvloop", "--http", "httptools",
            "--no-access-log", "--log-level", "warning"], env={"PASSTHROUGH_UPSTREAM": upstream})
        wait_ready(self.base + "/health", self.proc, 300)


class CountedGateway(Counted):
    """The gateway, with a key made through the admin API so the whole pipeline runs."""

    def __init__(self, procs: Processes, work: Path, upstream: str, store_url: str | None) -> None:
        label = "redis" if store_url else "embedded"
        config = {"data_dir": str(work / f"{label}-data"), "admin": {"key": ADMIN_KEY},
                  "backends": [{"name": "fake", "runtime": "openai", "url": upstream, "serves": ["fake"],
                                "slots": 256}],
                  **({"store": {"url": store_url}} if store_url else {})}
        path = work / f"{label}.yaml"
        path.write_text(json.dumps(config))
        super().__init__(procs, work, f"gateway-{label}",
                         [PY, "-m", "gateway", "serve", "--config", str(path), "--port", "{port}"])
        wait_ready(self.base + "/ready", self.proc, 300)  # start-up runs under valgrind too: slow
        reply = httpx.post(self.base + "/admin/keys", json={"name": "count"},
                           headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
        reply.raise_for_status()
        self.key = reply.json()["key"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="counted requests of each kind (default 300)")
    parser.add_argument("--rounds", type=int, default=2, help="counted rounds; the lowest is kept (default 2)")
    parser.add_argument("--redis", action="store_true", help="also on a Redis store (a redis-server of our own)")
    parser.add_argument("--passthrough", action="store_true",
                        help="also bench/passthrough.py, the stack alone (Litestar + aiohttp, no pipeline)")
    parser.add_argument("--save", action="store_true", help="write bench/results/count-latest.json")
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "hey"):
        if not shutil.which(tool):
            print(f"{tool} is not installed: make bench-deps", file=sys.stderr)
            return 2

    work = Path(tempfile.mkdtemp(prefix="gateway-count-"))
    procs = Processes(work)
    results: dict[str, dict[str, float]] = {}
    try:
        upstream = free_port()
        fake = procs.start("fake", [PY, "-m", "uvicorn", "fake_upstream:app", "--app-dir", str(ROOT / "bench"),
                                    "--host", HOST, "--port", str(upstream), "--loop", "uvloop", "--http",
                                    "httptools", "--no-access-log", "--log-level", "warning"])
        wait_ready(f"http://{HOST}:{upstream}/health", fake, 30)
        stores: list[tuple[str, str | None]] = [("embedded", None)]
        if args.passthrough:
            stores.insert(0, ("passthrough", None))
        if args.redis:
            port = free_port()
            procs.start("redis", ["redis-server", "--port", str(port), "--bind", HOST, "--save", "",
                                  "--appendonly", "no"])
            stores.append(("redis", f"redis://{HOST}:{port}/0"))
            time.sleep(0.5)
        for label, store_url in stores:
            log(f"{label}: starting it under callgrind")
            gateway: Counted = (CountedPassthrough(procs, work, f"http://{HOST}:{upstream}") if label == "passthrough"
                                else CountedGateway(procs, work, f"http://{HOST}:{upstream}", store_url))
            gateway.load(200, False)  # warm-up, not counted: imports, first-use caches, the pool
            gateway.load(200, True)
            row: dict[str, float] = {}
            for kind, stream in (("non-streamed", False), ("streamed", True)):
                counts = [gateway.count(args.requests, stream) for _ in range(args.rounds)]
                row[kind] = min(counts)
                log(f"{label}: {kind}: " + ", ".join(f"{c / 1000:,.1f}k" for c in counts) + " instructions per request")
            results[label] = row
            procs.stop(gateway.proc)
    finally:
        procs.stop_all()

    print("\n| server | instructions per non-streamed request | per streamed request (22 chunks) |\n|---|---|---|")
    for label, row in results.items():
        print(f"| {label} | {row['non-streamed'] / 1000:,.1f}k | {row['streamed'] / 1000:,.1f}k |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if args.save:
        out = RESULTS / "count-latest.json"
        out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit,
                                   "requests": args.requests, "instructions_per_request": results}, indent=2) + "\n")
        log(f"written to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
