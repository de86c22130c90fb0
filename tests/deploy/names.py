"""Which metric names the deploy files query, and which ones the gateway can expose.

PromQL is not parsed in full: a metric name is any `gateway_...` word outside a string or a
label matcher's value. Grafana's variables and our label values never start with `gateway_`,
so nothing else matches.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from tests.helpers import ROOT

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"

_NAME = re.compile(r"(?<![A-Za-z0-9_:])(?:gateway|process)_[A-Za-z0-9_:]*")  # (process_*: the process collector)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')

# What prometheus-client writes for each family type (the `_created` series are left out on
# purpose: nothing should query them, and PROMETHEUS_DISABLE_CREATED_SERIES removes them).
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


def exposed_names(registry: CollectorRegistry) -> dict[str, str]:
    """Every sample name the registry can expose -> its family name. Works for labelled
    collectors with no child yet (they have no samples, but their family and type are known)."""
    names: dict[str, str] = {}
    for family in registry.collect():
        for suffix in _SUFFIXES[family.type]:
            names[family.name + suffix] = family.name
    return names


def metric_names(promql: str) -> set[str]:
    """The `gateway_*` and `process_*` metric names a PromQL expression (or a Grafana `label_values(...)`) reads."""
    return set(_NAME.findall(_STRING.sub('""', promql)))


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside a collapsed row


def dashboard_queries(board: dict[str, Any]) -> dict[str, str]:
    """`where -> PromQL` for every panel target (variable queries are in `variable_queries`)."""
    queries = {}
    for panel in panels(board):
        for target in panel.get("targets", []):
            queries[f"panel {panel['id']} {panel['title']!r} target {target['refId']}"] = target["expr"]
    return queries


def variable_queries(board: dict[str, Any]) -> dict[str, str]:
    out = {}
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            out[f"variable ${variable['name']}"] = query["query"] if isinstance(query, dict) else query
    return out


def alert_exprs(path: Path = ALERTS) -> dict[str, str]:
    out = {}
    for group in yaml.safe_load(path.read_text())["groups"]:
        for rule in group["rules"]:
            out[f"{group['name']}/{rule.get('alert') or rule.get('record')}"] = rule["expr"]
    return out


def alert_test_series(path: Path = ALERTS_TEST) -> dict[str, str]:
    out = {}
    for test in yaml.safe_load(path.read_text())["tests"]:
        for series in test.get("input_series", []):
            out[f"test {test['name']!r} series"] = out.get(f"test {test['name']!r} series", "") + " " + series["series"]
    return out
