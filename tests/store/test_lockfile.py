"""One gateway per embedded store (gateway/store/lockfile.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.store.lockfile import DataDirInUse, exclusive
from tests.conftest import StartGateway
from tests.helpers import GatewayProcess, free_port


def test_a_second_holder_is_refused_and_the_lock_ends_with_its_holder(tmp_path: Path) -> None:
    lock = tmp_path / "data" / "gateway.lock"
    with exclusive(lock):
        with pytest.raises(DataDirInUse, match=f"pid {os.getpid()}"):
            with exclusive(lock):
                pass
    with exclusive(lock):  # released: taken again at once
        pass


def test_a_second_gateway_on_the_same_embedded_store_refuses_to_start(start_gateway: StartGateway,
                                                                     tmp_path: Path) -> None:
    config = {"backends": [{"name": "away", "runtime": "openai", "url": f"http://127.0.0.1:{free_port()}",
                            "serves": ["m"]}]}
    first = start_gateway(config, ready=False)
    second = GatewayProcess({**config, "data_dir": str(first.directory / "data")}, tmp_path)
    try:
        assert second.proc.wait(60) != 0
        assert "The gateway cannot start: Another gateway" in second.log()
        assert "Traceback" not in second.log()  # the operator's to fix: said in one line
    finally:
        second.stop()
    assert first.admin("GET", "/admin/keys").status_code == 200  # the first serves on
