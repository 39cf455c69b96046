"""The alert rules are valid Prometheus 2 rules, and promtool's unit tests of them
(``alerts_test.yml``: each alert fires on the right series, after its ``for``, and stays
silent otherwise) pass."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO

RULES = REPO / "pipelines/monitoring/prometheus/alerts.yml"
UNIT_TESTS = REPO / "tests/monitoring/alerts_test.yml"
RUNBOOK = REPO / "docs/oncall.md"
ALERTS = {
    "FlywheelDriftDetected": "drift-detected",
    "FlywheelDriftCheckStale": "drift-check-stale",
    "FlywheelInputsMissing": "inputs-missing",
    "FlywheelPerformanceDegraded": "performance-degraded",
    "FlywheelValidationFailures": "validation-failures",
    "FlywheelGateRejectionsInARow": "gate-rejections-in-a-row",
    "FlywheelPublishFailed": "publish-failed",
    "FlywheelCanaryErrors": "canary-errors",
    "FlywheelCanaryLatency": "canary-latency",
    "FlywheelCanaryWorse": "canary-worse",
}
ROLLBACK_ALERTS = {"FlywheelCanaryErrors", "FlywheelCanaryLatency", "FlywheelCanaryWorse"}

promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus; `make install` installs it)"
)


def rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    assert [group["name"] for group in groups] == ["flywheel", "rollout"]
    return [rule for group in groups for rule in group["rules"]]


@promtool
def test_promtool_accepts_the_rules_without_lint_findings():
    checked = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout


@promtool
def test_each_alert_fires_on_its_series_and_stays_silent_otherwise():
    tested = subprocess.run(["promtool", "test", "rules", str(UNIT_TESTS)], capture_output=True, text=True, timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    covered = {case["alertname"] for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"] for case in test.get("alert_rule_test", [])}
    assert covered == set(ALERTS)


def test_every_alert_has_a_for_a_severity_and_annotations_naming_the_model_and_its_runbook():
    assert {rule["alert"] for rule in rules()} == set(ALERTS)
    for rule in rules():
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        annotations = rule["annotations"]
        assert "$labels.model" in annotations["summary"] and "$labels.model" in annotations["description"], rule["alert"]
        assert annotations["runbook_url"] == f"docs/oncall.md#{ALERTS[rule['alert']]}"
        # the alert receiver rolls back exactly the alerts labelled so, and needs their project
        assert (rule["labels"].get("action") == "rollback") == (rule["alert"] in ROLLBACK_ALERTS), rule["alert"]
        if rule["alert"] in ROLLBACK_ALERTS:
            assert "project" in rule["expr"] and "model" in rule["expr"], rule["alert"]


def test_every_runbook_url_names_a_section_of_the_runbook():
    # GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens
    anchors = {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-") for line in RUNBOOK.read_text().splitlines() if line.startswith("## ")}

    assert set(ALERTS.values()) <= anchors, set(ALERTS.values()) - anchors
