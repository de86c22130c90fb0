"""The Grafana dashboard: a well-formed schema-39 dashboard whose every query is valid PromQL."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from tests.deploy.names import dashboard, dashboard_queries, panels

DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# What Grafana substitutes before a query reaches Prometheus; the values only need to be valid.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "3h"}


def as_prometheus_sees_it(expr: str, variables: set[str]) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    for name in variables:
        expr = re.sub(rf"\${name}\b", ".*", expr)  # the `All` value of a multi-value variable
    return expr


def test_datasource_and_filter_variables() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("model", "backend", "instance"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"] == DATASOURCE
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"


def test_every_panel_queries_prometheus_through_the_variable() -> None:
    board = dashboard()
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"].strip(), panel["title"]


def test_variables_used_are_defined() -> None:
    board = dashboard()
    defined = {v["name"] for v in board["templating"]["list"]}
    for where, expr in dashboard_queries(board).items():
        used = set(re.findall(r"\$(\w+)", expr)) - {name[1:] for name in GRAFANA_VARIABLES}
        assert used <= defined, f"{where} uses undefined variables {used - defined}"


def test_ids_unique_and_layout_fits_the_grid() -> None:
    board = dashboard()
    all_panels = list(panels(board))
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_covers_what_operators_watch() -> None:
    titles = " | ".join(p["title"].lower() for p in panels(dashboard()))
    for topic in ("requests/s", "p50 / p95 / p99", "time to first token", "inter-token", "tokens/s",
                  "queue depth", "queue wait", "rate-limited", "rejected", "in-flight", "backend state",
                  "restarts", "backend ready", "backend load", "kv cache", "upstream errors", "by key", "redis", "usage not yet stored",
                  "data lost"):
        assert topic in titles, f"no panel about {topic!r}"


def test_every_query_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    # promtool parses each query as a recording rule: a syntax error fails with its position.
    board = dashboard()
    variables = {v["name"] for v in board["templating"]["list"]}
    queries = dashboard_queries(board)
    rules = [{"record": f"dashboard:query_{i}", "expr": as_prometheus_sees_it(expr, variables)}
             for i, expr in enumerate(queries.values())]
    assert all("$" not in r["expr"] for r in rules), [r["expr"] for r in rules if "$" in r["expr"]]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, "\n".join(
        [result.stdout, result.stderr, *(f"query_{i}: {where}" for i, where in enumerate(queries))])
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_percentile_panels_compute_the_percentiles_in_their_title() -> None:
    checked = 0
    for panel in panels(dashboard()):
        named = {int(p) for p in re.findall(r"\bp(\d{2})\b", panel["title"])}
        if not named:
            continue
        computed = {round(float(q) * 100) for t in panel["targets"]
                    for q in re.findall(r"histogram_quantile\(\s*([0-9.]+)", t["expr"])}
        assert computed == named, f"{panel['title']!r} computes p{sorted(computed)}"
        assert {t["legendFormat"].split()[0] for t in panel["targets"]} == {f"p{q}" for q in named}, panel["title"]
        checked += 1
    assert checked >= 5
