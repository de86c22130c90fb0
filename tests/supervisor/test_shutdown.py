"""Stopping the gateway, politely or not, leaves no runtime process behind."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from tests.conftest import StartGateway
from tests.helpers import alive, descendants, wait_until


def _runtime_pids(gateway_pid: int) -> list[int]:
    return descendants(gateway_pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_no_llama_server_outlives_the_gateway(start_gateway: StartGateway, llamacpp_backend: dict[str, Any],
                                              sig: signal.Signals) -> None:
    gateway = start_gateway({"backends": [llamacpp_backend]})
    pids = _runtime_pids(gateway.proc.pid)
    assert pids, "the gateway should have spawned llama-server"
    assert any("llama-server" in open(f"/proc/{p}/cmdline").read() for p in pids)

    gateway.proc.send_signal(sig)
    gateway.proc.wait(30)
    assert wait_until(lambda: not any(alive(p) for p in pids), timeout=15), \
        f"still alive after {sig.name}: {[p for p in pids if alive(p)]}"
