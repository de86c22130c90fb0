"""docker-compose, Kubernetes, the Dockerfile and the systemd unit: they parse, the files they
name exist, and the names that tie them together (services, ports, paths, secrets) agree."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import BackendConfig, Config, parse
from tests.deploy.names import DEPLOY
from tests.helpers import ROOT

COMPOSE = DEPLOY / "docker-compose.yml"
KUBERNETES = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "llm-gateway.service"
_REQUIRED_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")  # no `:-default`


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path, for the service's relative bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (COMPOSE.parent / source).resolve()
    return mounts


def gateway_config(text: str, env: dict[str, str]) -> Config:
    return parse(yaml.safe_load(text), base_dir=Path("/etc/gateway"), env=env)


def required_vars(text: str) -> set[str]:
    return set(_REQUIRED_VAR.findall(text))


def config_flag(args: list[str]) -> str:
    return args[args.index("--config") + 1]


# --- docker compose ---------------------------------------------------------------------------

def test_compose_services() -> None:
    services = compose()["services"]
    assert {"gateway", "redis", "prometheus", "grafana"} <= services.keys()


def test_compose_references_files_that_exist() -> None:
    doc = compose()
    gateway = doc["services"]["gateway"]
    context = (COMPOSE.parent / gateway["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / gateway["build"]["dockerfile"]).is_file()
    checked = 0
    for name, service in doc["services"].items():
        for target, source in bind_mounts(service).items():
            if source == ROOT / "models":
                continue  # written by `make install`; test_compose_llama_serves_the_model_make_writes
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
            checked += 1
    assert checked >= 5
    for name, config in doc.get("configs", {}).items():
        if "file" in config:
            assert (COMPOSE.parent / config["file"]).exists(), name


def test_compose_llama_serves_the_model_make_writes() -> None:
    llama = compose()["services"]["llama"]
    model = PurePosixPath(llama["command"][llama["command"].index("-m") + 1])
    host_dir = {t: s for t, s in bind_mounts(llama).items()}[str(model.parent)]
    makefile_model = re.search(r"^MODEL\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert host_dir / model.name == ROOT / makefile_model


def test_compose_gateway_config_is_valid_and_wired() -> None:
    doc = compose()
    gateway = doc["services"]["gateway"]
    mounts = bind_mounts(gateway)
    config_path = config_flag(gateway["command"])
    text = mounts[config_path].read_text()
    env = gateway["environment"]
    assert required_vars(text) <= env.keys(), "the config needs variables compose does not set"
    config = gateway_config(text, {k: "x" * 16 for k in env})  # (an admin key has 16 characters at least)
    assert config.server.host == "0.0.0.0"
    assert any(p.endswith(f":{config.server.port}") for p in gateway["ports"])
    redis = urlsplit(config.store.url or "")
    assert redis.scheme == "redis" and redis.hostname in doc["services"]
    for backend in config.backends:
        if backend.url:
            assert urlsplit(backend.url).hostname in doc["services"], backend.name


def test_compose_prometheus_finds_its_files_and_the_gateway() -> None:
    doc = compose()
    prometheus = doc["services"]["prometheus"]
    config_path = PurePosixPath(next(a.split("=", 1)[1] for a in prometheus["command"]
                                     if a.startswith("--config.file=")))
    mounts = bind_mounts(prometheus)
    prom = yaml.safe_load(mounts[str(config_path)].read_text())
    for rule_file in prom["rule_files"]:
        assert str(config_path.parent / rule_file) in mounts, f"{rule_file} is not mounted next to prometheus.yml"
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "gateway")
    token_target = str(config_path.parent / job["authorization"]["credentials_file"])
    configs = {c["target"]: c["source"] for c in prometheus.get("configs", [])}
    assert token_target in configs and configs[token_target] in doc["configs"]
    port = gateway_config(bind_mounts(doc["services"]["gateway"])["/etc/gateway/config.yaml"].read_text(),
                          {"GATEWAY_ADMIN_KEY": "x" * 16}).server.port
    for sd in job["dns_sd_configs"]:
        assert set(sd["names"]) <= doc["services"].keys() and sd["port"] == port


def test_compose_grafana_provisioning() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = bind_mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [d["type"] for d in datasources] == ["prometheus"] and datasources[0]["isDefault"]
    assert urlsplit(datasources[0]["url"]).hostname in compose()["services"]
    providers = yaml.safe_load((provisioning / "dashboards" / "llm-gateway.yml").read_text())["providers"]
    dashboard_dir = providers[0]["options"]["path"]
    dashboards = {t: s for t, s in mounts.items() if s == DEPLOY / "grafana" / "dashboard.json"}
    assert dashboards and all(str(PurePosixPath(t).parent) == dashboard_dir for t in dashboards)
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] in dashboards


# --- Kubernetes -------------------------------------------------------------------------------

def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path
            docs.append(doc)
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def test_kubernetes_manifests_parse() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in manifests()}
    assert {("Deployment", "llm-gateway"), ("Service", "llm-gateway"), ("ConfigMap", "llm-gateway-config"),
            ("Secret", "llm-gateway"), ("Deployment", "llm-gateway-redis"), ("Service", "llm-gateway-redis"),
            ("ServiceMonitor", "llm-gateway"), ("PrometheusRule", "llm-gateway")} <= kinds
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (KUBERNETES / resource).is_file(), resource


def test_kubernetes_gateway_replicas_on_one_redis() -> None:
    deployment = find("Deployment", "llm-gateway")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in ports

    # The config the pods mount is a valid gateway config, fed by the Secret.
    config_path = PurePosixPath(config_flag(container["args"]))
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    configmap = find("ConfigMap", volume["configMap"]["name"])
    text = configmap["data"][config_path.name]
    secret = find("Secret", container["envFrom"][0]["secretRef"]["name"])
    assert required_vars(text) <= secret["stringData"].keys()
    config = gateway_config(text, dict(secret["stringData"]))
    assert ports["http"] == config.server.port and config.server.host == "0.0.0.0"
    data_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config.data_dir))
    assert data_mount

    # Every replica on the same Redis, through its Service.
    redis = urlsplit(config.store.url or "")
    service = find("Service", redis.hostname or "")
    assert redis.port in [p["port"] for p in service["spec"]["ports"]]
    # With Redis away, each replica enforces limit / queue.replicas: only right if they agree.
    assert config.queue.replicas == deployment["spec"]["replicas"]
    redis_pods = find("Deployment", "llm-gateway-redis")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= redis_pods.items()
    # Enough time to stop: uvicorn's grace is the largest stop_timeout + 5s.
    grace = max(b.stop_timeout for b in config.backends) + 5
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace


def test_kubernetes_service_and_scraping() -> None:
    pod = find("Deployment", "llm-gateway")["spec"]["template"]
    service = find("Service", "llm-gateway")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    monitor = find("ServiceMonitor", "llm-gateway")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    credentials = endpoint["authorization"]["credentials"]
    assert credentials["key"] in find("Secret", credentials["name"])["stringData"]
    assert {"targetLabel": "job", "replacement": "gateway"} in endpoint["relabelings"]


# --- the image --------------------------------------------------------------------------------

def dockerfile_final_stage() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    last_from = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    return lines[last_from:]


def test_dockerfile_entry_point() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    stage = dockerfile_final_stage()
    entry = json.loads(next(line for line in stage if line.startswith("ENTRYPOINT "))[len("ENTRYPOINT "):])
    cmd = json.loads(next(line for line in stage if line.startswith("CMD "))[len("CMD "):])
    argv = entry[entry.index("gateway"):] + cmd
    assert argv == ["gateway", "serve", "--config", "/etc/gateway/config.yaml"]
    assert any(line.startswith("USER ") and "root" not in line for line in stage)
    assert "EXPOSE 8080" in stage
    assert compose()["services"]["gateway"]["command"] == cmd


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Docker's rules: the last matching pattern wins; a pattern matching a directory covers
    everything below it."""
    def regex(pattern: str) -> re.Pattern[str]:
        out = re.escape(pattern.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        return re.compile(out.replace(r"\*", "[^/]*").replace(r"\?", "[^/]") + "$")

    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    allowed = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        if any(regex(pattern.lstrip("!")).match(prefix) for prefix in prefixes):
            allowed = negate
    return allowed


def build_context(patterns: list[str]) -> list[str]:
    """The files `docker build .` sends from the working tree (Docker ignores .gitignore)."""
    negated = [p[1:].strip("/") for p in patterns if p.startswith("!")]
    files = []
    for directory, subdirs, names in os.walk(ROOT):
        here = Path(directory).relative_to(ROOT).as_posix()
        here = "" if here == "." else here + "/"
        # Do not descend where nothing can be let back in (.venv, .git, models ...).
        subdirs[:] = [d for d in subdirs if dockerignore_allows(here + d, patterns)
                      or any(n.startswith(here + d + "/") for n in negated)]
        files += [here + name for name in names if dockerignore_allows(here + name, patterns)]
    return files


def test_image_context_builds_the_gateway(tmp_path: Path) -> None:
    # The files `COPY . .` sees through Dockerfile.dockerignore must build a wheel with the
    # whole gateway, and nothing else.
    patterns = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    context = build_context(patterns)
    assert "pyproject.toml" in context and "gateway/cli.py" in context and "gateway/metrics.py" in context
    assert not [p for p in context if p.split("/")[0] in ("tests", "deploy", "models", "data", "bench", ".venv")]
    for path in context:
        (tmp_path / "ctx" / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path, tmp_path / "ctx" / path)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                             "--wheel-dir", str(tmp_path / "wheels"), str(tmp_path / "ctx")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "wheels").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p for p in context if p.startswith(("gateway/", "adapters/")) and p.endswith((".py", ".lua"))}
    assert expected and expected <= names, sorted(expected - names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "gateway = gateway.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.parametrize("path, allowed", [
    ("pyproject.toml", True), ("gateway/app.py", True), ("gateway/admission/lua/acquire.lua", True),
    ("gateway/__pycache__/app.cpython-311.pyc", False), ("tests/conftest.py", False), (".venv/bin/python", False),
    ("models/gemma.gguf", False), ("deploy/.env", False),
])
def test_dockerignore_matcher(path: str, allowed: bool) -> None:
    patterns = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert dockerignore_allows(path, patterns) is allowed


# --- systemd ----------------------------------------------------------------------------------

def unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",), comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_systemd_unit() -> None:
    service = unit()["Service"]
    assert service["User"] and service["User"] != "root"
    assert service["EnvironmentFile"].startswith("/etc/")
    assert service["Restart"] == "on-failure"
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    assert int(service["LimitNOFILE"]) >= 65536
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    start = service["ExecStart"].split()
    assert start[1:3] == ["serve", "--config"] and start[0].endswith("/gateway")
    assert service["ExecStartPre"].split()[1:] == ["check", "--config", start[3]]
    # The gateway stops its backends itself (each within its stop_timeout; uvicorn's grace is
    # the largest + 5s) before systemd kills what is left.
    default_grace = BackendConfig.model_fields["stop_timeout"].default + 5
    assert seconds(service["TimeoutStopSec"]) >= default_grace + 10
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed: the unit is only checked by test_systemd_unit")
    binary = unit()["Service"]["ExecStart"].split()[0]
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(binary, shutil.which("true") or "/bin/true"))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    ours = [line for line in (result.stdout + result.stderr).splitlines() if UNIT.name in line]
    assert result.returncode == 0 and ours == [], result.stdout + result.stderr
