"""`gateway keys ...` drives the admin API of a running gateway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from tests.conftest import StartGateway
from tests.helpers import ADMIN_KEY, ROOT, free_port


def cli(gateway_url: str, *args: str, admin_key: str | None = ADMIN_KEY) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_ADMIN_KEY"}
    if admin_key:
        env["GATEWAY_ADMIN_KEY"] = admin_key
    return subprocess.run([sys.executable, "-m", "gateway", "keys", "--url", gateway_url, *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


def test_keys_cli_round_trip(start_gateway: StartGateway) -> None:
    config: dict[str, Any] = {"backends": [{"name": "b", "runtime": "openai", "url": f"http://127.0.0.1:{free_port()}",
                                            "serves": ["m1"]}]}
    gateway = start_gateway(config, ready=False)
    created = cli(gateway.url, "--json", "create", "--name", "ci-bot", "--models", "m1", "--rpm", "30",
                  "--expires-in", "30d", "--metadata", '{"team": "infra"}')
    assert created.returncode == 0, created.stderr
    data = json.loads(created.stdout)
    assert data["key"].startswith("sk-gw-") and data["rpm"] == 30 and data["metadata"] == {"team": "infra"}

    table = cli(gateway.url, "list")
    assert table.returncode == 0 and "ci-bot" in table.stdout and data["id"] in table.stdout
    assert data["key"] not in table.stdout

    updated = cli(gateway.url, "--json", "update", data["id"], "--rpm", "60")
    assert json.loads(updated.stdout)["rpm"] == 60
    rotated = cli(gateway.url, "rotate", data["id"], "--grace-period", "1h")
    assert rotated.returncode == 0 and "shown this once" in rotated.stdout
    revoked = cli(gateway.url, "--json", "revoke", data["id"])
    assert json.loads(revoked.stdout)["status"] == "revoked"
    shown = cli(gateway.url, "show", data["id"])
    assert "revoked" in shown.stdout

    missing = cli(gateway.url, "show", "key_nope")
    assert missing.returncode == 1 and "404" in missing.stderr
    no_admin = cli(gateway.url, "list", admin_key=None)
    assert no_admin.returncode == 2 and "GATEWAY_ADMIN_KEY" in no_admin.stderr
    wrong = cli(gateway.url, "list", admin_key="wrong")
    assert wrong.returncode == 1 and "401" in wrong.stderr
