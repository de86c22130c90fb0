"""One gateway in front of the three runtimes, shared by the conformance suite: a real
llama-server, the vLLM fake and the Ollama fake, each spawned by the real supervisor."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from tests.helpers import FAKES, GatewayProcess

FAST = {"FAKE_TOKEN_DELAY": "0.001", "FAKE_LOAD_SECONDS": "0.2", "FAKE_MODEL_LOAD_SECONDS": "0.05",
        "FAKE_PULL_SECONDS": "0.05"}


@dataclass(frozen=True)
class Runtime:
    name: str  # the runtime, as `owned_by` shows it
    backend: str  # the backend's name in the config
    served: str  # the model name the backend serves
    alias: str  # a public alias of it: what the tests ask for, so the served name must never leak


RUNTIMES = [
    Runtime("llamacpp", "gemma", "gemma3-270m", "chat-llamacpp"),
    Runtime("vllm", "vllm", "qwen3-0.6b", "chat-vllm"),
    Runtime("ollama", "ollama", "llama3.2:1b", "chat-ollama"),
]
FAKED = [r for r in RUNTIMES if r.name != "llamacpp"]


@pytest.fixture(scope="package")
def runtimes_gateway(tmp_path_factory: pytest.TempPathFactory, llamacpp_backend: dict[str, Any]) -> Iterator[GatewayProcess]:
    models_dir = tmp_path_factory.mktemp("ollama-models")
    config = {
        "backends": [
            llamacpp_backend,
            {"name": "vllm", "runtime": "vllm", "model": "Qwen/Qwen3-0.6B", "serves": ["qwen3-0.6b"],
             "binary": [sys.executable, str(FAKES / "fake_vllm.py")],
             # Without these vLLM refuses tool_choice "auto" (the default when tools are given).
             "args": ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
             "slots": 4, "context": 1024, "env": FAST, "startup_timeout": "30s"},
            {"name": "ollama", "runtime": "ollama", "model": "llama3.2:1b", "serves": ["llama3.2:1b"],
             "binary": [sys.executable, str(FAKES / "fake_ollama.py")],
             "slots": 4, "context": 1024, "startup_timeout": "30s",
             # Installed up front, so the suite does not depend on the setup step's pulls.
             "env": {**FAST, "FAKE_OLLAMA_INSTALLED": "llama3.2:1b", "OLLAMA_MODELS": str(models_dir)}},
        ],
        "models": {"aliases": {r.alias: r.served for r in RUNTIMES}},
    }
    gateway = GatewayProcess(config, tmp_path_factory.mktemp("runtimes_gateway"))
    try:
        yield gateway.wait_healthy(120)
    finally:
        gateway.stop()


@pytest.fixture(scope="package")
def runtimes_key(runtimes_gateway: GatewayProcess) -> str:
    return runtimes_gateway.new_key(name="conformance")


@pytest.fixture(scope="package")
def client(runtimes_gateway: GatewayProcess, runtimes_key: str) -> openai.OpenAI:
    return runtimes_gateway.openai(runtimes_key)


@pytest.fixture(scope="package")
def http(runtimes_gateway: GatewayProcess, runtimes_key: str) -> Iterator[httpx.Client]:
    with runtimes_gateway.http(runtimes_key) as session:
        yield session
