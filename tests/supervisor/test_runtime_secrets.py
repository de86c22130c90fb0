"""What a spawned runtime can see of secrets: its own API key only in its environment (never on
its command line, where `ps` shows it to every local user), and none of the gateway's own."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.supervisor import Backend
from tests.helpers import FAKES
from tests.supervisor.conftest import MakeSupervisor
from tests.supervisor.support import MISBEHAVING, fake

BACKEND_KEY = "sk-backend-0123456789abcdef"
ADMIN_KEY = "adm-gateway-0123456789abcdef"

# Writes its argv and environment to DIR/version.json (the version command) or DIR/runtime.json
# (the runtime), then becomes misbehaving.py, so the backend starts like any other.
RECORDER = """\
import json, os, sys
where = {where!r}
name = "version.json" if "--version" in sys.argv else "runtime.json"
with open(os.path.join(where, name), "w") as f:
    json.dump({{"argv": sys.argv, "env": dict(os.environ)}}, f)
os.execv(sys.executable, [sys.executable, {misbehaving!r}, "--mode", "ok", *sys.argv[1:]])
"""


def recorder(directory: Path) -> list[str]:
    script = directory / "recorder.py"
    script.write_text(RECORDER.format(where=str(directory), misbehaving=MISBEHAVING))
    return [sys.executable, str(script)]


def cmdline(backend: Backend) -> str:
    assert backend.process is not None and backend.process.pid
    return Path(f"/proc/{backend.process.pid}/cmdline").read_text().replace("\0", " ")


def log_text(backend: Backend) -> str:
    return "\n".join(backend.log.tail(2000))


@pytest.fixture
def gateway_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's environment as `make run` leaves it: the admin key exported, and the
    variable a `${VAR}` in the config took the backend's key from."""
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("BACKEND_KEY_SOURCE", BACKEND_KEY)
    monkeypatch.setenv("HF_HOME", "/srv/hf-cache")  # what runtimes need still reaches them


async def test_a_runtime_gets_its_key_in_its_environment_not_on_its_command_line(
        supervise: MakeSupervisor, tmp_path: Path, gateway_env: None) -> None:
    sup = await supervise(fake("keyed", binary=recorder(tmp_path), api_key=BACKEND_KEY))
    backend = sup.backends["keyed"]
    assert backend.ready, backend.describe()
    runtime: dict[str, Any] = json.loads((tmp_path / "runtime.json").read_text())
    assert not any(BACKEND_KEY in arg for arg in runtime["argv"])
    assert BACKEND_KEY not in cmdline(backend)  # what `ps` shows
    assert runtime["env"]["LLAMA_API_KEY"] == BACKEND_KEY  # llama-server's own variable for --api-key
    version: dict[str, Any] = json.loads((tmp_path / "version.json").read_text())
    assert not any(BACKEND_KEY in arg for arg in version["argv"])
    text = log_text(backend)
    assert "[gateway] starting on port" in text and BACKEND_KEY not in text


async def test_a_runtime_and_its_one_shot_commands_get_none_of_the_gateways_secrets(
        supervise: MakeSupervisor, tmp_path: Path, gateway_env: None) -> None:
    sup = await supervise(fake("keyed", binary=recorder(tmp_path), api_key=BACKEND_KEY,
                               env={"OPERATOR_SETTING": "kept"}))
    backend = sup.backends["keyed"]
    assert backend.ready, backend.describe()
    # The runtime, and the version command spawned at the other (one-shot) site.
    for record in ("runtime.json", "version.json"):
        env: dict[str, str] = json.loads((tmp_path / record).read_text())["env"]
        assert "GATEWAY_ADMIN_KEY" not in env and ADMIN_KEY not in env.values(), record
        assert "BACKEND_KEY_SOURCE" not in env, record  # the backend key under a name of the operator's
        assert env["HF_HOME"] == "/srv/hf-cache" and "PATH" in env, record  # the rest still goes
        assert env["OPERATOR_SETTING"] == "kept", record  # and so does the backend's own `env`
    assert ADMIN_KEY not in log_text(backend)


async def test_a_runtime_gets_none_of_the_configs_secrets_whatever_variable_they_came_from(
        supervise: MakeSupervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The config's secrets, as a `${VAR}` would have taken them from variables of any name.
    secrets = {"ADMIN_FROM_VAULT": ADMIN_KEY, "METRICS_TOKEN": "met-0123456789", "REMOTE_KEY": "sk-remote-0123456789"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    remote = {"name": "remote", "runtime": "openai", "url": "http://127.0.0.1:9", "serves": ["x"],
              "api_key": secrets["REMOTE_KEY"]}
    sup = await supervise(fake("keyed", binary=recorder(tmp_path)), remote,
                          admin={"key": ADMIN_KEY}, metrics={"token": secrets["METRICS_TOKEN"]})
    assert sup.backends["keyed"].ready, sup.backends["keyed"].describe()
    for record in ("runtime.json", "version.json"):
        env: dict[str, str] = json.loads((tmp_path / record).read_text())["env"]
        assert not set(secrets) & set(env) and not set(secrets.values()) & set(env.values()), record
        assert "PATH" in env, record


async def test_the_vllm_fake_still_requires_the_key_it_got_from_the_environment(
        supervise: MakeSupervisor, gateway_env: None) -> None:
    sup = await supervise({
        "name": "vllm", "runtime": "vllm", "model": "Qwen/Qwen3-0.6B", "serves": ["qwen3"],
        "binary": [sys.executable, str(FAKES / "fake_vllm.py")], "api_key": BACKEND_KEY,
        "env": {"FAKE_LOAD_SECONDS": "0.2"}, "startup_timeout": "30s", "stop_timeout": "2s",
    })
    backend = sup.backends["vllm"]
    assert backend.ready, backend.describe()
    assert BACKEND_KEY not in cmdline(backend)
    assert BACKEND_KEY not in log_text(backend)
    async with httpx.AsyncClient(base_url=backend.url, timeout=10) as client:
        assert (await client.get("/v1/models")).status_code == 401
        allowed = await client.get("/v1/models", headers={"authorization": f"Bearer {BACKEND_KEY}"})
        assert allowed.status_code == 200


async def test_a_real_llama_server_still_requires_the_key_it_got_from_the_environment(
        supervise: MakeSupervisor, llamacpp_backend: dict[str, Any], gateway_env: None) -> None:
    sup = await supervise({**llamacpp_backend, "name": "real", "api_key": BACKEND_KEY, "embeddings": False})
    backend = sup.backends["real"]
    assert backend.ready, backend.describe()
    assert BACKEND_KEY not in cmdline(backend)
    assert BACKEND_KEY not in log_text(backend) and ADMIN_KEY not in log_text(backend)
    body = {"prompt": "Hi", "max_tokens": 1}
    async with httpx.AsyncClient(base_url=backend.url, timeout=30) as client:
        assert (await client.post("/v1/completions", json=body)).status_code == 401
        allowed = await client.post("/v1/completions", json=body, headers={"authorization": f"Bearer {BACKEND_KEY}"})
        assert allowed.status_code == 200
