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
# The on-call page of each alert's `url` (a path under the UI's base URL, the external label
# flywheel_ui), and the gauge whose value names the window to highlight, if any.
TIMELINE, MODELS = "timeline", "models"
PAGES = {
    "FlywheelDriftDetected": (TIMELINE, "flywheel_drift_window_end_timestamp_seconds"),
    "FlywheelInputsMissing": (TIMELINE, "flywheel_drift_window_end_timestamp_seconds"),
    "FlywheelDriftCheckStale": (TIMELINE, None),
    "FlywheelPerformanceDegraded": (TIMELINE, "flywheel_performance_window_end_timestamp_seconds"),
    "FlywheelValidationFailures": (TIMELINE, None),
    "FlywheelGateRejectionsInARow": (MODELS, None),
    "FlywheelPublishFailed": (MODELS, None),
    "FlywheelCanaryErrors": (MODELS, None),
    "FlywheelCanaryLatency": (MODELS, None),
    "FlywheelCanaryWorse": (MODELS, None),
}
UI = "{{ $externalLabels.flywheel_ui }}"

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


def runbook_anchors() -> set[str]:
    """GitHub's anchor of each heading of the runbook: lower case, punctuation dropped, spaces to hyphens."""
    headings = [line.lstrip("#").strip() for line in RUNBOOK.read_text().splitlines() if re.match(r"#{2,4} ", line)]
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_every_runbook_url_names_a_section_of_the_runbook():
    anchors = runbook_anchors()
    linked = {rule["annotations"]["runbook_url"].removeprefix("docs/oncall.md#") for rule in rules()}

    assert set(ALERTS.values()) <= anchors, set(ALERTS.values()) - anchors
    assert linked <= anchors, linked - anchors
    # and the runbook's own links between sections land too
    internal = set(re.findall(r"\]\(#([\w-]+)\)", RUNBOOK.read_text()))
    assert internal <= anchors, internal - anchors


def url_pattern(alert: str) -> re.Pattern[str]:
    """What ``alert``'s ``url`` expands to under promtool (its external label empty: a path):
    the project's page, with ``?window=<report folder>`` where the alert's page has a window and
    its gauge was pushed, or the index for a series without a project label."""
    page, window = PAGES[alert]
    query = r"(\?window=\d{8}T\d{6}Z)?" if window else ""
    return re.compile(rf"/flywheel/projects(/\w+/{page}{query})?")


def test_every_alert_has_a_url_to_its_page_under_the_ui_label_with_the_window_that_fired():
    other = {TIMELINE: MODELS, MODELS: TIMELINE}
    for rule in rules():
        name, url = rule["alert"], rule["annotations"]["url"]
        page, window = PAGES[name]
        assert UI in url and f"/{page}" in url and f"/{other[page]}" not in url, (name, url)
        # an alert without a project label opens the index of the projects
        assert f"{UI}/flywheel/projects{{{{ end }}}}" in url or f"{UI}/flywheel/projects{{{{ with $labels.project }}}}" in url, (name, url)
        if window:
            # the window is the same project's and model's gauge, formatted as its report folder is named
            assert f"printf \"{window}{{project='%s',model='%s'}}\" . $labels.model | query" in url, (name, url)
            assert '?window={{ (. | first | value | toTime).Format "20060102T150405Z" }}' in url, (name, url)
        else:
            assert "window" not in url, (name, url)


def test_the_promtool_tests_assert_each_alerts_url_in_its_form_with_and_without_a_project():
    expanded: dict[str, list[tuple[dict, str]]] = {alert: [] for alert in ALERTS}
    for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            for alert in case["exp_alerts"]:
                expanded[case["alertname"]].append((alert["exp_labels"], alert["exp_annotations"]["url"]))
    for name, urls in expanded.items():
        page, window = PAGES[name]
        assert urls, f"{name}: no url asserted in {UNIT_TESTS.name}"
        for labels, url in urls:
            assert url_pattern(name).fullmatch(url), (name, url)
            if "project" in labels:
                assert url.startswith(f"/flywheel/projects/{labels['project']}/{page}"), (name, labels, url)
            else:
                assert url == "/flywheel/projects", (name, labels, url)
        if window:  # the window that fired is asserted, not only its absence
            assert any("?window=" in url for _, url in urls), (name, urls)
    # the index for an alert without a project label, in the window form and in a plain one
    assert any("project" not in labels for labels, _ in expanded["FlywheelDriftDetected"])
    assert any("project" not in labels for labels, _ in expanded["FlywheelGateRejectionsInARow"])
