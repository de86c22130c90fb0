"""Backend configs for the misbehaving fake runtime, with timings small enough for fast tests,
and small async helpers."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any

from gateway import metrics
from tests.helpers import FAKES

MISBEHAVING = str(FAKES / "misbehaving.py")


def fake(name: str, mode: str = "ok", *, pid_file: str | None = None, env: dict[str, str] | None = None,
         **overrides: Any) -> dict[str, Any]:
    """A managed `llamacpp` backend whose binary is misbehaving.py (it ignores llama-server's flags)."""
    binary = [sys.executable, MISBEHAVING, "--mode", mode]
    if pid_file:
        binary += ["--pid-file", pid_file]
    return {
        "name": name, "runtime": "llamacpp", "model": "/nonexistent/fake.gguf", "serves": [f"{name}-model"],
        "binary": binary,
        "env": {"FAKE_LOAD_SECONDS": "0.2", **(env or {})},
        "startup_timeout": "5s", "stop_timeout": "1s",
        "health_interval": "0.2s", "health_timeout": "0.3s", "health_failures": 2,
        "restart_backoff": "0.1s", "restart_backoff_max": "0.4s", "crash_limit": 3, "crash_window": "60s",
        **overrides,
    }


async def until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll `predicate` on the event loop until true or `timeout` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


def counter(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0
