"""`gateway keys ...` drives the admin API of a running gateway."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import StartGateway
from tests.helpers import ADMIN_KEY, ROOT, free_port, serving


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


class _NotTheGateway(SimpleHTTPRequestHandler):
    """`python -m http.server` where the gateway should be (GET: a 404 page, POST: a 501 page), or with
    `page_status` set a proxy answering every request with an HTML page of its own."""

    page_status: int | None = None
    seen: list[str] = []

    def do_GET(self) -> None:
        self.seen.append(f"GET {self.path}")
        self._proxy_page() if self.page_status else super().do_GET()

    def do_POST(self) -> None:  # PATCH and DELETE too
        self.seen.append(f"{self.command} {self.path}")
        self._proxy_page() if self.page_status else self.send_error(501, f"Unsupported method ('{self.command}')")

    do_PATCH = do_DELETE = do_POST

    def _proxy_page(self) -> None:
        page = b"<html>\n<head><title>Bad Gateway</title></head>\n<body>" + b"<p>upstream down</p>\n" * 40 + b"</body></html>"
        self.send_response(self.page_status or 200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def not_the_gateway(tmp_path: Path) -> Iterator[tuple[str, type[_NotTheGateway]]]:
    handler = type("Handler", (_NotTheGateway,), {"seen": [], "page_status": None})
    with serving(functools.partial(handler, directory=str(tmp_path))) as url:
        yield url, handler


def assert_one_error_line(result: subprocess.CompletedProcess[str], status: int) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {status} from http://127.0.0.1:") and "not an answer of the gateway's admin API" in line
    assert len(line) < 400  # the page shortened, not all of it


def test_a_plain_http_server_at_the_url_is_one_error_line_not_a_traceback(
        not_the_gateway: tuple[str, type[_NotTheGateway]]) -> None:
    url, _ = not_the_gateway
    listed = cli(url, "list")
    assert_one_error_line(listed, 404)
    assert "Error response" in listed.stderr  # what came back, as far as one line shows it
    assert_one_error_line(cli(url, "create", "--name", "ci-bot"), 501)


@pytest.mark.parametrize("status", [502, 200])
def test_a_proxys_html_page_is_one_error_line_with_its_status(not_the_gateway: tuple[str, type[_NotTheGateway]],
                                                              status: int) -> None:
    url, handler = not_the_gateway
    handler.page_status = status
    for verb in (["list"], ["show", "key_x"], ["revoke", "key_x"], ["--json", "create", "--name", "ci-bot"]):
        result = cli(url, *verb)
        assert_one_error_line(result, status)
        assert result.stderr.rstrip().endswith("...") and "Bad Gateway" in result.stderr


@pytest.mark.parametrize("verb", [["create", "--name", "ci-bot"], ["update", "key_x"]])
@pytest.mark.parametrize("models", ["", " , ", ","], ids=["empty", "a comma and spaces", "a comma"])
def test_models_that_name_no_model_are_refused_before_anything_is_sent(
        not_the_gateway: tuple[str, type[_NotTheGateway]], verb: list[str], models: str) -> None:
    url, handler = not_the_gateway
    refused = cli(url, *verb, "--models", models)
    assert refused.returncode == 2 and "argument --models: names no model" in refused.stderr, refused.stderr
    assert "leave --models out for all models" in refused.stderr and "--all-models" in refused.stderr
    assert handler.seen == []  # the admin API would have stored `[]`: a key that may use no model


def test_all_models_lifts_a_keys_model_list(start_gateway: StartGateway) -> None:
    config: dict[str, Any] = {"backends": [{"name": "b", "runtime": "openai", "url": f"http://127.0.0.1:{free_port()}",
                                            "serves": ["m1"]}]}
    gateway = start_gateway(config, ready=False)
    created = json.loads(cli(gateway.url, "--json", "create", "--name", "ci-bot", "--models", "m1, ").stdout)
    assert created["models"] == ["m1"]
    lifted = cli(gateway.url, "--json", "update", created["id"], "--all-models")
    assert lifted.returncode == 0, lifted.stderr
    assert json.loads(lifted.stdout)["models"] is None  # every model, as a key created without --models
    both = cli(gateway.url, "update", created["id"], "--models", "m1", "--all-models")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    assert gateway.admin("GET", f"/admin/keys/{created['id']}").json()["models"] is None


def test_a_key_for_no_model_lists_as_none_not_as_all_models(start_gateway: StartGateway) -> None:
    config: dict[str, Any] = {"backends": [{"name": "b", "runtime": "openai", "url": f"http://127.0.0.1:{free_port()}",
                                            "serves": ["m1"]}]}
    gateway = start_gateway(config, ready=False)
    gateway.new_key(name="no-model", models=[])  # the admin API takes `[]` (the CLI no longer sends it)
    gateway.new_key(name="every-model")
    rows = {line.split()[1]: line.split() for line in cli(gateway.url, "list").stdout.splitlines()[1:-1]}
    assert rows["no-model"][4] == "(none)" and rows["every-model"][4] == "-"
