"""The alert rules, the example scrape config and the Grafana dashboard shipyard ships, checked
with Prometheus's own validator (``promtool``) and against the metrics shipyard really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from shipyard.server.app import create_app
from shipyard.settings import Settings
from tests.monitoring.conftest import (
    DASHBOARD,
    REPLICA_METRICS,
    RULES,
    RULES_TEST,
    SCRAPE_CONFIG,
    SERVER_METRICS,
)
from tests.server.conftest import TestClient

PROMETHEUS_METRICS = {"up"}  # written by Prometheus for every target

# Grafana's variables, replaced by what they stand for when the expressions are parsed.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$project": ".*",
    "$deployment": ".*",
}
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan",
}  # fmt: skip


def _promtool(
    promtool: str, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def _rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _panels(_dashboard()) for t in p["targets"]]


def _substituted(expr: str) -> str:
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"an unknown Grafana variable in {expr!r}"
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions, keywords,
    label names (inside ``{}`` or ``by (...)``), strings or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        name = match[0]
        following = text[match.end() :].lstrip()
        if following.startswith("(") or name.lower() in PROMQL_WORDS:
            continue
        if re.fullmatch(r"\d+[smhdwy]", name) or re.fullmatch(r"e\d+", name):
            continue
        names.add(name)
    return names


# --- promtool: the rules, their unit tests, the config ------------------------------------------


def test_the_rules_pass_promtool_check(promtool: str) -> None:
    result = _promtool(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rule_exprs())} rules found" in result.stdout


def test_the_rules_unit_tests_pass(promtool: str) -> None:
    result = _promtool(promtool, "test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert alerts - firing == set(), "alerts without a unit test that makes them fire"
    assert firing - alerts == set(), "unit tests of alerts that do not exist"


@pytest.mark.parametrize(
    ("alert", "broken", "healthy"),
    [
        # an error ratio threshold so high nothing alerts: the broken deployment goes unnoticed
        (
            "ShipyardHighErrorRatio",
            "(shipyard_serving_requests_total[5m]))\n          > 0.05",
            "(shipyard_serving_requests_total[5m]))\n          > 0.5",
        ),
        # a replica-down rule that never matches a failed scrape
        (
            "ShipyardReplicaDown",
            'up{job="shipyard-replica"} == 0',
            'up{job="shipyard-replica"} == 2',
        ),
        # an error ratio that counts every request as an error: the healthy deployment alerts too
        (
            "ShipyardHighErrorRatio",
            'shipyard_serving_requests_total{code=~"5.."}',
            'shipyard_serving_requests_total{code=~".*"}',
        ),
    ],
)
def test_the_unit_tests_catch_a_broken_rule(
    promtool: str, tmp_path: Path, alert: str, broken: str, healthy: str
) -> None:
    """The unit tests are not vacuous: a rule that misses the failure, or fires on a healthy
    deployment, fails them."""
    text = RULES.read_text()
    assert text.count(broken) == 1, broken
    (tmp_path / RULES.name).write_text(text.replace(broken, healthy))
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    result = _promtool(promtool, "test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert result.returncode != 0, result.stdout
    assert f"alertname: {alert}" in result.stdout + result.stderr


def test_the_example_scrape_config_passes_promtool_check(promtool: str, tmp_path: Path) -> None:
    for source in (SCRAPE_CONFIG, RULES):
        shutil.copy(source, tmp_path / source.name)
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    (job,) = config["scrape_configs"]
    assert job["honor_labels"] is True  # the replicas' own labels win over exported_*
    (sd,) = job["http_sd_configs"]
    assert sd["url"].endswith("/api/v1/prometheus/targets")
    token = sd["authorization"]["credentials_file"]
    assert job["authorization"]["credentials_file"] == token
    (tmp_path / token).write_text("shp_example\n")
    result = _promtool(promtool, "check", "config", SCRAPE_CONFIG.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_a_config_without_its_token_file_is_refused(promtool: str, tmp_path: Path) -> None:
    """The check is real: promtool refuses what Prometheus would refuse to start with."""
    for source in (SCRAPE_CONFIG, RULES):
        shutil.copy(source, tmp_path / source.name)
    result = _promtool(promtool, "check", "config", SCRAPE_CONFIG.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "shipyard.token" in result.stdout + result.stderr


# --- the dashboard -------------------------------------------------------------------------------


def test_the_dashboard_is_a_well_formed_grafana_dashboard() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "shipyard-serving" and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
    for panel in _panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
    titles = " ".join(p["title"].lower() for p in _panels(dashboard))
    for topic in ("requests per second", "p99", "error ratio", "shed", "batch", "in-flight",
                  "cpu", "memory"):  # fmt: skip
        assert topic in titles, topic


def test_every_dashboard_expression_passes_promtool(promtool: str, tmp_path: Path) -> None:
    exprs = _dashboard_exprs() + [
        v["query"]["query"].removeprefix("label_values(").rsplit(",", 1)[0]
        for v in _dashboard()["templating"]["list"]
        if v["type"] == "query"
    ]
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": _substituted(expr)}
        for i, expr in enumerate(exprs)
    ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _promtool(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr

    # and the check is real: a broken expression is refused
    rules.append({"record": "dashboard:broken", "expr": "sum by (deployment (up)"})
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert _promtool(promtool, "check", "rules", str(path)).returncode != 0


def test_every_metric_used_is_one_shipyard_exports() -> None:
    used = set().union(*(metric_names(e) for e in _rule_exprs() + _dashboard_exprs()))
    assert used, "no metric names found"
    unknown = used - REPLICA_METRICS - SERVER_METRICS - PROMETHEUS_METRICS
    assert unknown == set(), f"the rules or dashboard read metrics nobody exports: {unknown}"
    # and each exported metric the contract names is used somewhere
    assert used >= REPLICA_METRICS | SERVER_METRICS, (REPLICA_METRICS | SERVER_METRICS) - used


def test_metric_names_are_found_in_an_expression() -> None:
    expr = (
        'sum by (project, deployment) (rate(shipyard_serving_requests_total{code=~"5.."}[5m])) '
        '/ on (deployment) group_left max(up{job="x"} == 1) > 0.05 unless absent(foo_bar)'
    )
    assert metric_names(expr) == {"shipyard_serving_requests_total", "up", "foo_bar"}


def test_the_server_exports_every_metric_the_rules_read_from_it(settings: Settings) -> None:
    app = create_app(settings, auth=False, scheduler=False)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        text = client.get("/metrics").text
    samples = {
        (sample.name, frozenset(sample.labels))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    names = {name for name, _ in samples}
    assert names >= SERVER_METRICS, SERVER_METRICS - names
    requests = {labels for name, labels in samples if name == "shipyard_http_requests_total"}
    assert requests == {frozenset({"method", "route", "code"})}
