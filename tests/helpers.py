"""Test helpers: free ports, process trees, and a gateway run as a real subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import yaml

ROOT = Path(__file__).resolve().parent.parent
FAKES = ROOT / "tests" / "fakes"
ADMIN_KEY = "test-admin-key-0123456789"


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The error object of an answer that must have `status`."""
    assert response.status_code == status, response.text
    return response.json()["error"]  # type: ignore[no-any-return]


def all_keys(gateway: GatewayProcess) -> list[dict[str, Any]]:
    """Every key the admin API lists, revoked and expired ones too."""
    r = gateway.admin("GET", "/admin/keys", params={"status": "all"})
    assert r.status_code == 200, r.text
    return r.json()["data"]  # type: ignore[no-any-return]


@contextlib.contextmanager
def serving(handler: Any) -> Iterator[str]:
    """An http.server handler (class, or a factory such as functools.partial) served on a free
    port in a thread of its own: its URL, until the block ends."""
    from http.server import ThreadingHTTPServer
    import threading

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, from /proc (no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if alive(child):
                out.append(child)
                todo.append(child)
    return out


@contextlib.contextmanager
def server_by_hand(argv: list[str], url: str, *, ready_path: str, env: dict[str, str] | None = None,
                   log_path: Path | None = None, what: str = "server", timeout: float = 20) -> Iterator[str]:
    """A server the test runs itself (not the gateway's supervisor), in its own session: yields
    `url` once `url + ready_path` answers 200, and kills the whole group after."""
    log = log_path.open("wb") if log_path else None
    proc = subprocess.Popen(argv, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)

    def up() -> bool:
        try:
            return httpx.get(url + ready_path, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(up, timeout), f"{what} did not start"
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if log is not None:
            log.close()


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class GatewayProcess:
    """`python -m gateway serve` on a config written to a temporary directory."""

    def __init__(self, config: dict[str, Any], directory: Path, env: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"data_dir": str(directory / "data"), "admin": {"key": ADMIN_KEY}, **config}
        self.config_path = directory / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = directory / "gateway.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path), "--port", str(self.port)],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )

    def wait_healthy(self, timeout: float = 60, ready: bool = True) -> GatewayProcess:
        path = "/ready" if ready else "/health"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"gateway not {path} after {timeout}s:\n{self.log()}")

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, self.url + path, headers={"authorization": f"Bearer {ADMIN_KEY}"},
                             timeout=30, **kwargs)

    def new_key(self, **fields: Any) -> str:
        """Issue an API key through the admin API; returns the plaintext secret."""
        response = self.admin("POST", "/admin/keys", json={"name": "test", **fields})
        assert response.status_code == 201, response.text
        return str(response.json()["key"])

    def http(self, key: str) -> httpx.Client:
        """A client for the gateway that sends `key` (close it, or use it in `with`)."""
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {key}"}, timeout=60)

    def openai(self, key: str) -> openai.OpenAI:
        """The official SDK on the gateway, with `key`, and no retries hiding a failure."""
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"gateway did not stop within {timeout}s of SIGTERM:\n{self.log()}")
        self._log.close()
        return self.proc.returncode
