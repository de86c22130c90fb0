"""The Prometheus side: alert rules, their unit tests, the scrape config, and the Kubernetes copy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.names import ALERTS, ALERTS_TEST, DEPLOY

PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


def test_alert_rules_check(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_unit_tests_pass(promtool: str) -> None:
    result = run(promtool, "test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_unit_tests_cover_firing_and_quiet_cases() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for test in tests:
        for case in test["alert_rule_test"]:
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert {"GatewayBackendDown", "GatewayBackendCrashLoop", "GatewayHighErrorRatio", "GatewayQueueSaturated",
            "GatewayRedisDown", "GatewayUsageNotStored", "GatewayUsageDropped", "GatewayStoreLostData"} <= fired
    assert {"GatewayBackendDown", "GatewayQueueSaturated", "GatewayUsageNotStored", "GatewayUsageDropped",
            "GatewayStoreLostData"} <= quiet
    alerts = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert alerts <= fired, f"alerts without a test that fires them: {alerts - fired}"


def test_the_unit_tests_catch_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    # The same tests against a GatewayBackendDown that waits 10m instead of 2m must fail.
    broken = ALERTS.read_text().replace("        for: 2m\n", "        for: 10m\n", 1)
    assert broken != ALERTS.read_text()
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")
    result = run(promtool, "test", "rules", str(tmp_path / "alerts_test.yml"))
    assert result.returncode != 0
    assert "GatewayBackendDown" in result.stdout + result.stderr


USAGE_ALERT = """        expr: gateway_usage_unsaved_requests > 0
        for: 5m
"""


@pytest.mark.parametrize("broken", [
    USAGE_ALERT.replace("for: 5m", "for: 1m"),  # would warn about one failed flush
    USAGE_ALERT.replace("> 0", "> 100"),  # would stay quiet while the usage held is small
], ids=["too soon", "too late"])
def test_the_unit_tests_catch_a_broken_usage_alert(promtool: str, tmp_path: Path, broken: str) -> None:
    assert USAGE_ALERT in ALERTS.read_text()
    (tmp_path / "alerts.yml").write_text(ALERTS.read_text().replace(USAGE_ALERT, broken))
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")
    result = run(promtool, "test", "rules", str(tmp_path / "alerts_test.yml"))
    assert result.returncode != 0
    assert "GatewayUsageNotStored" in result.stdout + result.stderr


def test_scrape_config_check(promtool: str, tmp_path: Path) -> None:
    # Checked as deployed: rule files next to it, and the token file compose mounts beside it
    # (promtool insists that credentials files exist).
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    shutil.copy(PROMETHEUS_YML, tmp_path / "prometheus.yml")
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_YML.parent / rule_file).is_file(), f"rule file {rule_file} is not in deploy/prometheus"
        shutil.copy(PROMETHEUS_YML.parent / rule_file, tmp_path / rule_file)
    gateway_jobs = [job for job in config["scrape_configs"] if job["job_name"] == "gateway"]
    assert len(gateway_jobs) == 1, "the alerts match job=\"gateway\""
    job = gateway_jobs[0]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["type"] == "Bearer"
    token_file = job["authorization"]["credentials_file"]
    assert not Path(token_file).is_absolute(), "relative to prometheus.yml, as compose mounts it"
    (tmp_path / token_file).write_text("secret-token\n")
    result = run(promtool, "check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "FAILED" not in result.stdout + result.stderr


def test_prometheusrule_for_kubernetes_equals_alerts_yml() -> None:
    rule = yaml.safe_load((DEPLOY / "kubernetes" / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text()), \
        "deploy/kubernetes/prometheusrule.yaml drifted from deploy/prometheus/alerts.yml"
