"""Config validation: every problem listed as `path.to.field: reason`, exit status 2, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import ConfigError, load, parse, warnings
from tests.helpers import ROOT, free_port

LLAMA = {"name": "a", "runtime": "llamacpp", "model": "m.gguf"}

BROKEN: list[tuple[str, Any, list[str]]] = [
    ("empty", {}, ["backends: required"]),
    ("no backends", {"backends": []}, ["backends: needs at least 1 item(s)"]),
    ("backends not a list", {"backends": "x"}, ["backends: input should be a valid list"]),
    ("neither model nor url", {"backends": [{"name": "a", "runtime": "llamacpp"}]},
     ["backends[0]: set exactly one of `model` (a managed process) or `url` (an attached server)"]),
    ("unknown runtime", {"backends": [{"name": "a", "runtime": "tgi", "url": "http://x"}]},
     ["backends[0].runtime: input should be 'llamacpp', 'vllm', 'ollama' or 'openai'"]),
    ("several field errors at once",
     {"backends": [{**LLAMA, "slots": 0, "port": 70000, "colour": "red"}]},
     ["backends[0].port: input should be less than or equal to 65535",
      "backends[0].slots: input should be greater than or equal to 1",
      "backends[0].colour: unknown field"]),
    ("bad url", {"backends": [{"name": "a", "runtime": "openai", "url": "localhost:80", "serves": ["x"]}]},
     ["backends[0].url: 'localhost:80' is not an http:// or https:// URL"]),
    ("bad url with a password", {"backends": [{"name": "a", "runtime": "openai", "url": "ftp://me:s3cret@h",
                                               "serves": ["x"]}]},
     ["backends[0].url: 'ftp://***@h' is not an http:// or https:// URL"]),
    ("bad scalars",
     {"server": {"port": "eighty", "max_body": "lots", "request_timeout": "forever"}, "backends": [LLAMA]},
     ["server.port: input should be a valid integer, unable to parse string as an integer",
      "server.max_body: expected a size such as 1048576, '16MiB' or '512KB'",
      "server.request_timeout: expected a duration such as 30, '30s', '5m' or '250ms'"]),
    ("cross-field",
     {"backends": [LLAMA, {**LLAMA, "model": "n.gguf", "url": "http://h:1"}],
      "models": {"aliases": {"m": "zzz"}}},
     ["backends[1].name: duplicate backend name 'a' (also backends[0])",
      "backends[1]: set exactly one of `model` (a managed process) or `url` (an attached server)",
      "models.aliases.m: already a served model name",
      "models.aliases.m: target 'zzz' is not served by any backend"]),
    ("unset variable", {"backends": [{**LLAMA, "model": "${NOPE}"}]},
     ["backends[0].model: environment variable NOPE is not set"]),
    ("attached without serves", {"backends": [{"name": "a", "runtime": "openai", "url": "http://h:1"}]},
     ["backends[0].serves: required for an attached backend (the model names it answers)"]),
    ("names and types",
     {"backends": [{**LLAMA, "name": "a b", "args": "-ngl 99", "env": {"A": 1}}]},
     ["backends[0].name: 'a b' is not a backend name (letters, digits and . _ -, starting with a letter or digit)",
      "backends[0].args: input should be a valid list",
      "backends[0].env.A: input should be a valid string"]),
    ("openai runtime spawned", {"backends": [{"name": "a", "runtime": "openai", "model": "x"}]},
     ["backends[0].url: required for runtime 'openai' (the gateway cannot spawn it)"]),
    ("attached with process fields",
     {"backends": [{"name": "a", "runtime": "vllm", "url": "http://h:1", "serves": ["x"], "port": 9000,
                    "args": ["--x"]}]},
     ["backends[0].port: only for a managed backend, not with `url`",
      "backends[0]: `args` and `env` are only for a managed backend, not with `url`"]),
    ("top level not a mapping", ["backends"], ["(top level): expected a mapping of sections"]),
    ("usage retention under a day", {"store": {"usage_retention": "23h"}, "backends": [LLAMA]},
     ["store.usage_retention: expected a duration from '1d' to '36500d' (100 years)"]),
    ("usage retention past a century", {"store": {"usage_retention": float("inf")}, "backends": [LLAMA]},
     ["store.usage_retention: expected a duration from '1d' to '36500d' (100 years)"]),
    ("urls a server cannot be reached at",
     {"backends": [{"name": f"u{i}", "runtime": "openai", "url": url, "serves": [f"m{i}"]} for i, url in enumerate(
         ["http://h:99999", "http://h:abc", "http://h:1?x=1", "http://h:1/v1", "https://h/openai/v1/", "http://h:0"])]},
     ["backends[0].url: 'http://h:99999' is not a usable URL (Port out of range 0-65535)",
      "backends[1].url: 'http://h:abc' is not a usable URL (Port could not be cast to integer value as 'abc')",
      "backends[2].url: 'http://h:1?x=1': a base URL takes no query or fragment (the gateway appends the paths)",
      "backends[3].url: 'http://h:1/v1': leave out the trailing /v1, the gateway appends /v1/... itself "
      "(an OpenAI SDK's base_url has it; a backend's url does not)",
      "backends[4].url: 'https://h/openai/v1/': leave out the trailing /v1, the gateway appends /v1/... itself "
      "(an OpenAI SDK's base_url has it; a backend's url does not)",
      "backends[5].url: 'http://h:0': port 0 is not a port a server listens on"]),
    ("credentials twice", {"backends": [{"name": "a", "runtime": "openai", "url": "http://me:pw@h:1", "serves": ["m"],
                                         "api_key": "sk-1"}]},
     ["backends[0]: give the backend's credentials once, as `api_key` or as the url's user:password"]),
    ("a name served twice by one backend", {"backends": [{**LLAMA, "serves": ["m", "n", "m"]}]},
     ["backends[0].serves: 'm' listed more than once"]),
    ("keys off on the network", {"auth": {"required": False}, "server": {"host": "0.0.0.0"}, "backends": [LLAMA]},
     ["server.host: auth.required is false, so the gateway only binds a loopback address, not 0.0.0.0; "
      "set auth.allow_public_without_keys: true to serve every client on the network without keys"]),
    ("one port twice",
     {"server": {"port": 9000}, "backends": [{**LLAMA, "port": 9000}, {**LLAMA, "name": "b", "port": 9001},
                                             {**LLAMA, "name": "c", "port": 9001}]},
     ["backends[0].port: 9000 is already server.port", "backends[2].port: 9001 is already backends[1].port"]),
]


@pytest.mark.parametrize(("document", "expected"), [(d, e) for _, d, e in BROKEN], ids=[n for n, _, _ in BROKEN])
def test_broken_config_lists_every_problem(document: Any, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse(document, base_dir=Path("/srv"), env={})
    assert info.value.problems == expected


def test_defaults_and_derived_values() -> None:
    config = parse({"backends": [LLAMA, {"name": "b", "runtime": "vllm", "model": "Qwen/Qwen2.5-7B"}]},
                   base_dir=Path("/srv/gw"), env={})
    assert (config.server.host, config.server.port, config.server.max_body) == ("127.0.0.1", 8080, 16 * 1024**2)
    assert config.data_dir == Path("/srv/gw/data")
    llama, vllm = config.backends
    assert llama.model == "/srv/gw/m.gguf"  # relative to the config file
    assert llama.serves == ["m"] and vllm.serves == ["Qwen/Qwen2.5-7B"]
    assert llama.slots == 1 and llama.startup_timeout == 120.0
    assert config.store.usage_retention == 400 * 86400  # longer than a year: yearly reports still work


def test_units_and_interpolation() -> None:
    config = parse({
        "data_dir": "${DATA:-/var/lib/gw}",
        "server": {"max_body": "1MiB", "request_timeout": "5m", "connect_timeout": "250ms", "port": "${PORT}"},
        "admin": {"key": "${ADMIN_KEY}"},
        "store": {"usage_retention": "30d"},
        "backends": [LLAMA],
    }, base_dir=Path("/srv"), env={"PORT": "9090", "ADMIN_KEY": "s3cret-s3cret-s3cret"})
    assert config.data_dir == Path("/var/lib/gw")
    assert config.server.port == 9090 and config.server.max_body == 1024**2
    assert config.server.request_timeout == 300.0 and config.server.connect_timeout == 0.25
    assert config.store.usage_retention == 30 * 86400
    assert config.admin.key == "s3cret-s3cret-s3cret"


def test_a_streams_silence_is_bounded_server_wide_and_per_model() -> None:
    config = parse({"backends": [LLAMA], "models": {"overrides": {"m": {"stream_idle_timeout": "90s"}}}},
                   base_dir=Path("/srv"), env={})
    assert config.server.stream_idle_timeout == 300.0  # a big prompt's prefill on CPU, before the first chunk
    assert config.models.overrides["m"].stream_idle_timeout == 90.0
    with pytest.raises(ConfigError) as caught:
        parse({"server": {"stream_idle_timeout": 0}, "backends": [LLAMA]}, base_dir=Path("/srv"), env={})
    assert caught.value.problems == ["server.stream_idle_timeout: input should be greater than 0"]


def test_a_queue_wait_of_0_means_no_queue() -> None:
    # An operator's "do not queue: refuse at once what cannot be admitted now"; it was refused.
    assert parse({"queue": {"max_wait": 0}, "backends": [LLAMA]}, base_dir=Path("/srv"), env={}).queue.max_wait == 0
    assert parse({"queue": {"max_wait": "0s"}, "backends": [LLAMA]}, base_dir=Path("/srv"), env={}).queue.max_wait == 0
    with pytest.raises(ConfigError) as caught:
        parse({"queue": {"max_wait": -1}, "backends": [LLAMA]}, base_dir=Path("/srv"), env={})
    assert caught.value.problems == ["queue.max_wait: input should be greater than or equal to 0"]


def test_a_short_admin_key_is_refused_and_not_shown() -> None:
    # It opens the whole admin API: "admin" would be guessed. Empty still means the admin API is off.
    with pytest.raises(ConfigError) as caught:
        parse({"admin": {"key": "${ADMIN_KEY}"}, "backends": [LLAMA]}, base_dir=Path("/srv"),
              env={"ADMIN_KEY": "hunter2-admin"})
    assert caught.value.problems == [
        "admin.key: too short: an admin key needs at least 16 characters (generate one: openssl rand -hex 32)"]
    assert "hunter2" not in str(caught.value)
    for key in ("a" * 16, ""):
        assert parse({"admin": {"key": key}, "backends": [LLAMA]}, base_dir=Path("/srv"), env={}).admin.key == key


def test_default_limits_are_bounded_as_a_keys_own() -> None:
    with pytest.raises(ConfigError) as info:
        parse({"limits": {"default": {"rpm": 2**31, "tpm": 0}}, "backends": [LLAMA]}, base_dir=Path("/srv"), env={})
    assert [p.split(":")[0] for p in info.value.problems] == ["limits.default.rpm", "limits.default.tpm"]
    config = parse({"limits": {"default": {"rpm": 2**31 - 1}}, "backends": [LLAMA]}, base_dir=Path("/srv"), env={})
    assert config.limits.default.rpm == 2**31 - 1


def test_load_reports_yaml_syntax_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("backends:\n  - name: a\n   runtime: x\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{path}: not valid YAML (line 3, column 4)")


def test_load_refuses_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    # A SIGHUP reload of such a file used to end in an exception nobody logged.
    path = tmp_path / "gateway.yaml"
    path.write_bytes("backends: []\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert "not UTF-8" in info.value.problems[0]


def test_example_config_is_valid() -> None:
    config = load(ROOT / "config.example.yaml", env={})
    assert config.backends[0].serves == ["gemma3-270m"]
    assert config.models.aliases == {"gpt-4o-mini": "gemma3-270m"}


@pytest.mark.parametrize("command", ["check", "serve"])
def test_cli_exits_2_with_every_problem_and_no_traceback(tmp_path: Path, command: str) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"backends": [{**LLAMA, "slots": 0, "colour": "red"}]}))
    result = subprocess.run([sys.executable, "-m", "gateway", command, "--config", str(path)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2
    assert "backends[0].slots: input should be greater than or equal to 1" in result.stderr
    assert "backends[0].colour: unknown field" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_check_prints_resolved_backends(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "gateway", "check", "--config", str(ROOT / "config.example.yaml")],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "gemma-cpu" in result.stdout and "gpt-4o-mini -> gemma3-270m (alias)" in result.stdout


def test_cli_needs_a_config() -> None:
    result = subprocess.run([sys.executable, "-m", "gateway", "check"], capture_output=True, text=True, timeout=60,
                            cwd=ROOT, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and "GATEWAY_CONFIG" in result.stderr


def test_serve_refuses_a_port_override_that_a_backend_has(tmp_path: Path) -> None:
    # The file is fine (8080 is free of backends); `--port` makes the clash, so serve checks again.
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "backends": [{**LLAMA, "port": 9123}]}))
    refused = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", "9123"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert refused.returncode == 2 and "port 9123 is also backend a's fixed port" in refused.stderr


def test_a_key_given_twice_is_an_error_not_the_last_one_winning(tmp_path: Path) -> None:
    # YAML's own rule (the last wins) dropped the whole first `server:` section without a word.
    path = tmp_path / "gateway.yaml"
    path.write_text("server:\n  port: 9001\nbackends:\n  - {name: a, runtime: llamacpp, model: m.gguf}\n"
                    "server:\n  host: 0.0.0.0\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.problems == [f"{path}: not valid YAML (line 5, column 1): duplicate key 'server'"]


def test_merged_keys_may_be_overridden_beside_the_merge(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("backends:\n  - &llama {name: a, runtime: llamacpp, model: m.gguf, slots: 2}\n"
                    "  - <<: *llama\n    name: b\n    slots: 4\n")
    assert [(b.name, b.slots) for b in load(path).backends] == [("a", 2), ("b", 4)]


def test_a_relative_binary_is_relative_to_the_config_file_a_bare_name_is_a_command() -> None:
    config = parse({"backends": [{**LLAMA, "binary": "bin/llama-server"}, {**LLAMA, "name": "b", "binary": "llama-server"},
                                 {**LLAMA, "name": "c", "binary": ["./py", "x.py"]}]}, base_dir=Path("/srv/gw"), env={})
    assert [b.binary for b in config.backends] == ["/srv/gw/bin/llama-server", "llama-server", ["/srv/gw/py", "x.py"]]


def test_what_validates_but_will_not_work_is_warned_about(tmp_path: Path) -> None:
    model = tmp_path / "there.gguf"
    model.write_bytes(b"GGUF")
    config = parse({"backends": [{**LLAMA, "model": str(model), "binary": "/bin/sh"},
                                 {**LLAMA, "name": "b", "model": "gone.gguf", "binary": "nowhere/llama-server"}]},
                   base_dir=tmp_path, env={})
    assert warnings(config) == [
        f"backends[1] (b).model: {tmp_path}/gone.gguf is not a readable file; the backend will fail to start",
        f"backends[1] (b).binary: {tmp_path}/nowhere/llama-server is not an executable file (nor a command on PATH)",
        "admin.key is not set: the admin API (keys, usage, reload) answers 403, so no API key can be issued "
        "and, with auth.required, no client can be served"]
    keyed = parse({"admin": {"key": "k" * 16}, "backends": [{**LLAMA, "model": str(model), "binary": "/bin/sh"}]},
                  base_dir=tmp_path, env={})
    assert warnings(keyed) == []


def test_cli_check_says_what_will_not_work_and_still_passes(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"backends": [{**LLAMA, "model": "gone.gguf"}]}))
    result = subprocess.run([sys.executable, "-m", "gateway", "check", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert f"warning: backends[0] (a).model: {tmp_path}/gone.gguf is not a readable file" in result.stderr
    assert "admin API: off (admin.key unset)" in result.stdout and "store:    embedded" in result.stdout


def test_serve_refuses_a_port_that_is_not_one(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "backends": [LLAMA]}))
    refused = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", "99999"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert refused.returncode == 2 and "'99999' is not a port (0-65535)" in refused.stderr


def test_serve_on_a_port_in_use_says_so_before_starting_any_backend(tmp_path: Path) -> None:
    # uvicorn binds after the lifespan: a model loaded, then the exit, then (systemd) again.
    marker = tmp_path / "started"
    backend = {**LLAMA, "binary": [sys.executable, "-c", f"open({str(marker)!r}, 'w'); import time; time.sleep(60)"]}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "backends": [backend]}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port)],
                                 capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert refused.returncode == 3, refused.stderr
    assert f"cannot listen on 127.0.0.1:{port} (server.host, server.port): Address already in use" in refused.stderr
    assert not marker.exists()
    # What it would have served is in the log before that, for the operator reading it.
    assert f"store: embedded (SQLite, {tmp_path}/data/gateway.db); admin API off" in refused.stderr
    assert "backend a (llamacpp) serves m: managed, model" in refused.stderr


def test_serve_says_where_it_listens(tmp_path: Path) -> None:
    # uvicorn, given the socket serve binds early, no longer says it.
    port = free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "backends": [
        {"name": "f", "runtime": "openai", "url": "http://127.0.0.1:9", "serves": ["m"]}]}))
    with subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port)],
                          stderr=subprocess.PIPE, text=True, cwd=ROOT) as served:
        try:
            said = ""
            for line in served.stderr:  # (bounded: the test's timeout)
                said += line
                if "listening on" in line:
                    break
            assert f"listening on http://127.0.0.1:{port} (answering once started)" in said
        finally:
            served.terminate()
