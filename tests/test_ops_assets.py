"""The operations assets in tools/: the Prometheus alert rules and the Grafana
dashboard. Both load and have the structure their tools expect, and every series an
expression names is one a real server exports (scraped after a small workload), with
labels it has. With promtool on the PATH (Debian's prometheus package; .ci/run installs
it) the rules are also checked and unit-tested by promtool, and every dashboard query is
parsed by it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BrokerProcess
from test_ops_metrics import scrape

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "tools" / "alerts" / "nodi-rules.yml"
RULES_TEST = ROOT / "tools" / "alerts" / "nodi-rules-test.yml"
DASHBOARD = ROOT / "tools" / "grafana" / "nodi-dashboard.json"
PROMTOOL = shutil.which("promtool")
# Labels Prometheus itself attaches to every scraped series.
TARGET_LABELS = {"instance", "job"}
# A series name with its selector, a label matcher inside it, a by/without clause.
METRIC = re.compile(r"\b(nodi_[a-z0-9_]+)\b(\{[^}]*\})?")
LABEL_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
DURATION = re.compile(r"^\d+[smhdwy]$")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, set[str]]:
    """sample name -> label names, from a real server after a workload that makes every
    kind of series appear (produce, fetch, a committed group offset, an error)."""
    from nodi.broker import Client
    from nodi.broker.client.errors import UnknownTopic

    broker = BrokerProcess(str(tmp_path_factory.mktemp("assets") / "data"), metrics=True).start()
    try:
        with Client(broker.address, timeout_ms=30_000) as client:
            client.create_topic("orders")
            client.create_topic("orders.dlq")
            for _ in range(3):
                client.produce("orders", b"x", partition=0, acks="durable")
            client.produce("orders.dlq", b"dead", partition=0)
            client.fetch("orders", 0, 0)
            client.commit_offsets("billing", {("orders", 0): 1})
            with pytest.raises(UnknownTopic):
                client.produce("missing", b"x", partition=0)
        samples = scrape(broker.metrics_port)
    finally:
        broker.stop()
    return {name: set().union(*(set(labels) for labels, _ in series)) for name, series in samples.items()}


def _check_expression(expression: str, exported: dict[str, set[str]], where: str) -> None:
    """Every nodi_ series `expression` names is exported, and so is every label it
    matches on or groups by."""
    found = METRIC.findall(expression)
    assert found, f"{where}: no nodi_ series in {expression!r}"
    used_labels: set[str] = set()
    for name, selector in found:
        assert name in exported, f"{where}: {name} is not exported by the server"
        labels = {label for label, _ in LABEL_MATCHER.findall(selector)}
        unknown = labels - exported[name] - TARGET_LABELS
        assert not unknown, f"{where}: {name} has no labels {sorted(unknown)}"
        used_labels |= exported[name]
    for grouping in GROUPING.findall(expression):
        for label in filter(None, (part.strip() for part in grouping.split(","))):
            assert label in used_labels | TARGET_LABELS | {"le"}, f"{where}: grouping by unknown label {label}"


# ---------------------------------------------------------------------------
# Alert rules


def _rules() -> list[dict]:
    document = yaml.safe_load(RULES.read_text())
    assert isinstance(document, dict) and list(document) == ["groups"]
    rules = []
    for group in document["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["name"] and group["rules"]
        rules.extend(group["rules"])
    return rules


def test_alert_rules_structure():
    rules = _rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    required = {
        "NodiConsumerLagGrowing",
        "NodiDeadLetterGrowing",
        "NodiFsyncLatencyHigh",
        "NodiDiskNearlyFull",
        "NodiPartitionReadOnly",
    }
    assert required <= set(names)
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        assert DURATION.match(rule.get("for", "0m")), rule
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert rule["expr"].count("(") == rule["expr"].count(")")


def test_alert_rules_name_exported_series(exported):
    for rule in _rules():
        _check_expression(rule["expr"], exported, rule["alert"])
    dead_letter = next(rule for rule in _rules() if rule["alert"] == "NodiDeadLetterGrowing")
    assert re.search(r'topic=~"[^"]*\\\\\.dlq"', dead_letter["expr"])


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_checks_and_unit_tests_the_rules():
    checked = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [PROMTOOL, "test", "rules", RULES_TEST.name], cwd=RULES_TEST.parent, capture_output=True, text=True, timeout=120
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_rules_unit_tests_cover_every_alert():
    document = yaml.safe_load(RULES_TEST.read_text())
    tested = {case["alertname"] for test in document["tests"] for case in test["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in _rules()}
    firing = {case["alertname"] for test in document["tests"] for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert {
        "NodiConsumerLagGrowing",
        "NodiDeadLetterGrowing",
        "NodiFsyncLatencyHigh",
        "NodiDiskNearlyFull",
        "NodiPartitionReadOnly",
    } <= firing


# ---------------------------------------------------------------------------
# Dashboard


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _targets(dashboard: dict):
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def _concrete(expression: str) -> str:
    """A dashboard query with Grafana's variables filled in, as Prometheus gets it."""
    return expression.replace("$__rate_interval", "5m").replace("$instance", ".*").replace("$topic", ".*")


def test_dashboard_structure():
    dashboard = _dashboard()
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len(graphs) >= 15
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid) and 0 <= grid["x"] and grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat", "gauge") and panel["title"]
        assert panel["datasource"]["type"] == "prometheus"
        references = [target["refId"] for target in panel["targets"]]
        assert references and len(references) == len(set(references))
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    used = " ".join(target["expr"] for _, target in _targets(dashboard))
    for name in re.findall(r"\$([a-z_]+)", used):
        assert name == "__rate_interval" or name in variables, f"undefined dashboard variable ${name}"
    series = " ".join(METRIC.sub(r"\1", target["expr"]) for _, target in _targets(dashboard))
    for needed in (
        "nodi_messages_in_total",
        "nodi_bytes_out_total",
        "nodi_produce_latency_seconds_bucket",
        "nodi_fetch_latency_seconds_bucket",
        "nodi_fsync_latency_seconds_bucket",
        "nodi_group_commit_appends",
        "nodi_consumer_lag",
        "nodi_log_segments",
        "nodi_connections",
        "nodi_errors_total",
        "nodi_disk_free_bytes",
    ):
        assert needed in series, f"the dashboard shows no {needed}"


def test_dashboard_queries_name_exported_series(exported):
    dashboard = _dashboard()
    for panel, target in _targets(dashboard):
        _check_expression(_concrete(target["expr"]), exported, f"panel {panel['title']!r}")
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            _check_expression(variable["definition"], exported, f"variable {variable['name']}")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_parses_every_dashboard_query(tmp_path):
    """Each query, as a recording rule, through promtool's PromQL parser."""
    rules = [
        {"record": f"dashboard:panel_{panel['id']}_{target['refId']}", "expr": _concrete(target["expr"])}
        for panel, target in _targets(_dashboard())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
