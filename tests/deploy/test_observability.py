"""deploy/prometheus (rules, their unit tests, the scrape config) checked with
promtool, and deploy/grafana/korero-dashboard.json checked for shape and for
queries that parse and read metrics the server really exports."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.tools import (
    REPO,
    TARGET_LABELS,
    exported_metric_labels,
    grouping_labels_in,
    label_problems,
    metric_names_in,
    run,
)

PROMETHEUS = REPO / "deploy" / "prometheus"
RULES = PROMETHEUS / "rules.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "korero-dashboard.json"
# What the issue's operations view must cover, as the metrics that show it.
SIGNALS = {
    "time to first token": "korero_time_to_first_token_seconds_bucket",
    "error rate": "korero_turns_total",
    "rate-limit rejections": "korero_rate_limit_rejections_total",
    "Redis errors": "korero_redis_errors_total",
    "PostgreSQL errors": "korero_postgres_errors_total",
    "handoff queue wait": "korero_handoff_wait_seconds_bucket",
}
# Grafana's variables, replaced by what they stand for when promtool parses a query.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*"}


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def _queries() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]


@pytest.mark.needs_binary("promtool")
def test_promtool_accepts_the_rules(tool: Callable[[str], Path]) -> None:
    result = run(tool("promtool"), "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


@pytest.mark.needs_binary("promtool")
def test_the_alert_unit_tests_pass(tool: Callable[[str], Path]) -> None:
    tests = PROMETHEUS / "rules.test.yaml"
    result = run(tool("promtool"), "test", "rules", tests)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    tested = {
        case["alertname"]
        for test in yaml.safe_load(tests.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert len(tested) >= 2
    assert tested <= {a["alert"] for a in _alerts()}


@pytest.mark.needs_binary("promtool")
def test_a_wrong_expectation_fails_the_unit_tests(
    tool: Callable[[str], Path], tmp_path: Path
) -> None:
    # The passing run above counts only if promtool does compare results here.
    tests = yaml.safe_load((PROMETHEUS / "rules.test.yaml").read_text())
    tests["rule_files"] = [str(RULES)]
    first = tests["tests"][0]["alert_rule_test"][-1]["exp_alerts"][0]
    first["exp_labels"]["severity"] = "none"
    broken = tmp_path / "broken.test.yaml"
    broken.write_text(yaml.safe_dump(tests))
    result = run(tool("promtool"), "test", "rules", broken)
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


@pytest.mark.needs_binary("promtool")
def test_promtool_accepts_the_scrape_config(tool: Callable[[str], Path]) -> None:
    result = run(tool("promtool"), "check", "config", PROMETHEUS / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_exported_names_come_from_the_server() -> None:
    exported = exported_metric_labels()
    # Read from telemetry.Metrics, not a list kept here: a renamed metric moves with it.
    assert exported["korero_handoff_wait_seconds_bucket"] == {"le"}
    assert exported["korero_postgres_errors_total"] == {"op"}
    assert exported["korero_turns_total"] == {"outcome", "reason"}
    assert "korero_handoff_queue_wait_seconds_bucket" not in exported
    # The checks below do catch a wrong name or label.
    wrong = "sum by (reason) (rate(korero_postgres_errors_total{reason='x'}[5m]))"
    assert label_problems(wrong, exported) == [
        "korero_postgres_errors_total has no label reason",
        "by (reason) over ['korero_postgres_errors_total']",
    ]
    assert metric_names_in("rate(korero_handoff_queue_wait_seconds_bucket[5m])") - set(
        exported
    ) == {"korero_handoff_queue_wait_seconds_bucket"}


def test_rules_read_only_metrics_and_labels_the_server_exports() -> None:
    exported = exported_metric_labels()
    for rule in _rules():
        name = rule.get("alert") or rule.get("record")
        expr = rule["expr"]
        unknown = metric_names_in(expr) - set(exported)
        assert not unknown, f"{name}: {unknown}"
        problems = label_problems(expr, exported)
        assert not problems, f"{name}: {problems}"
        if "alert" not in rule:
            continue
        # Annotations may only print labels the alert's series carry.
        carried = grouping_labels_in(expr)
        if carried is None:
            carried = set(TARGET_LABELS).union(
                *(exported[m] for m in metric_names_in(expr) if m in exported)
            )
        printed = {
            label
            for text in rule["annotations"].values()
            for label in re.findall(r"\$labels\.(\w+)", text)
        }
        assert printed <= carried, f"{name} prints {printed - carried}"


def test_every_signal_of_the_issue_has_an_alert() -> None:
    recorded = {r["record"]: r["expr"] for r in _rules() if "record" in r}
    read: set[str] = set()
    for alert in _alerts():
        expr = alert["expr"]
        for name, definition in recorded.items():
            if name in expr:
                expr += " " + definition
        read |= metric_names_in(expr)
    for signal, metric in SIGNALS.items():
        assert metric in read, f"no alert on {signal}"


def test_every_alert_is_routable_and_explained() -> None:
    names = [a["alert"] for a in _alerts()]
    assert len(names) == len(set(names))
    for alert in _alerts():
        assert alert["labels"]["severity"] in ("warning", "critical"), alert["alert"]
        assert {"summary", "description", "runbook"} <= set(alert["annotations"]), alert["alert"]
        assert "for" in alert, alert["alert"]


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "korero-overview"
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat"), panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]


def test_panels_do_not_overlap() -> None:
    cells: set[tuple[int, int]] = set()
    for panel in _dashboard()["panels"]:
        g = panel["gridPos"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, panel["title"]
        cells |= mine


def test_dashboard_queries_read_real_metrics_and_cover_the_alerts() -> None:
    exported = exported_metric_labels()
    read: set[str] = set()
    for panel in _dashboard()["panels"]:
        for target in panel.get("targets", []):
            query = target["expr"]
            names = metric_names_in(query)
            read |= names
            unknown = {n for n in names - set(exported) if not n.startswith("envoy_")}
            assert not unknown, f"{query}: {unknown}"
            problems = label_problems(query, exported)
            assert not problems, f"{query}: {problems}"
            # A legend can only name labels the query keeps.
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            if legend:
                kept = grouping_labels_in(query)
                assert kept is not None, panel["title"]
                assert legend <= kept, f"{panel['title']}: {legend}"
    assert set(SIGNALS.values()) <= read
    assert "korero_active_streams" in read


@pytest.mark.needs_binary("promtool")
def test_dashboard_queries_parse(tool: Callable[[str], Path], tmp_path: Path) -> None:
    rules = []
    for n, query in enumerate(_queries()):
        expr = query
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query{n}", "expr": expr})
    as_rules = tmp_path / "dashboard-queries.yaml"
    as_rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(tool("promtool"), "check", "rules", as_rules)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    provider = yaml.safe_load(
        (REPO / "deploy" / "grafana" / "provisioning" / "dashboards" / "korero.yaml").read_text()
    )["providers"][0]
    mounts = compose["services"]["grafana"]["volumes"]
    mounted = [m for m in mounts if m.startswith("./grafana/korero-dashboard.json:")]
    assert mounted
    assert mounted[0].split(":")[1].startswith(provider["options"]["path"] + "/")


@pytest.mark.needs_binary("promtool")
def test_the_kubernetes_scrape_jobs_are_valid_but_for_their_discovery(
    tool: Callable[[str], Path], tmp_path: Path
) -> None:
    # Debian's promtool is built without Kubernetes service discovery, so the
    # jobs are checked with kubernetes_sd_configs swapped for a static target:
    # everything else (relabelling regexes, actions, labels) is promtool's to judge.
    config = yaml.safe_load((PROMETHEUS / "prometheus-kubernetes.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"korero", "envoy"}
    for job in jobs.values():
        (discovery,) = job.pop("kubernetes_sd_configs")
        assert discovery["role"] == "pod"
        job["static_configs"] = [{"targets": ["pod.example:9464"]}]
        targets = {rule.get("target_label") for rule in job["relabel_configs"]}
        assert {"__address__", "namespace", "pod"} <= targets
    config["rule_files"] = [str(RULES)]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    result = run(tool("promtool"), "check", "config", checked)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_adapter_exposes_the_metric_the_hpa_reads() -> None:
    adapter = yaml.safe_load(
        (REPO / "deploy" / "k8s" / "prometheus-adapter-rules.yaml").read_text()
    )
    (rule,) = adapter["rules"]["custom"]
    hpa = yaml.safe_load(
        (REPO / "deploy" / "k8s" / "overlays" / "prod" / "patch-hpa.yaml").read_text()
    )
    (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert rule["name"]["as"] == pods["metric"]["name"]
    assert metric_names_in(rule["seriesQuery"]) == {pods["metric"]["name"]}
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
