"""The environment every child of the supervisor starts with: the gateway's, minus its secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import parse
from gateway.supervisor.oneshot import child_env, gateway_secrets


def test_child_env_drops_the_gateways_variables_and_every_secret_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", "adm-1")
    monkeypatch.setenv("GATEWAY_CONFIG", "/etc/gateway.yaml")
    monkeypatch.setenv("ADMIN_FROM_VAULT", "adm-2")  # a `${VAR}` of any name
    monkeypatch.setenv("HF_TOKEN", "hf-1")
    monkeypatch.setenv("CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setenv("EMPTY", "")
    env = child_env({"LLAMA_API_KEY": "adm-2", "GATEWAY_MODE": "operator's"}, {"adm-2", ""})
    assert "GATEWAY_ADMIN_KEY" not in env and "GATEWAY_CONFIG" not in env and "ADMIN_FROM_VAULT" not in env
    assert env["HF_TOKEN"] == "hf-1" and env["CUDA_HOME"] == "/usr/local/cuda" and "PATH" in env
    assert env["EMPTY"] == ""  # an unset secret hides nothing
    # What the launch sets is the child's own, even a secret's value or a GATEWAY_ name.
    assert env["LLAMA_API_KEY"] == "adm-2" and env["GATEWAY_MODE"] == "operator's"


def test_gateway_secrets_are_every_secret_in_the_config(tmp_path: Path) -> None:
    raw = {
        "admin": {"key": "${ADMIN}"}, "metrics": {"token": "${METRICS}"}, "store": {"url": "redis://:pw@r:6379/0"},
        "backends": [
            {"name": "a", "runtime": "vllm", "model": "m", "api_key": "${VLLM_KEY}"},
            {"name": "b", "runtime": "openai", "url": "http://10.0.0.5:8000", "serves": ["x"], "api_key": "remote"},
            {"name": "c", "runtime": "ollama", "model": "llama3.2:1b"},
        ],
    }
    config = parse(raw, base_dir=tmp_path, env={"ADMIN": "adm-0123456789abcdef", "METRICS": "met", "VLLM_KEY": "vk"})
    assert gateway_secrets(config) == {"adm-0123456789abcdef", "met", "redis://:pw@r:6379/0", "vk", "remote"}
    assert gateway_secrets(parse({"backends": raw["backends"][2:]}, base_dir=tmp_path, env={})) == frozenset()
