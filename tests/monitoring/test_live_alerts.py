"""The project's real metrics reach a real Prometheus through a real Pushgateway and fire the
repository's alerts: a drift check of a summer hour against a January reference fires
FlywheelDriftDetected and a January hour does not; an ingestion that quarantines a broken
batch fires FlywheelValidationFailures and a clean one does not.

Prometheus scrapes the Pushgateway every second with ``honor_labels: true`` (as a deployment
must, to keep the pushed job and model labels) and evaluates the rules every second. The rules
are the repository's ``alerts.yml`` with every ``for`` set to 0s, nothing else changed: how
long each alert waits is promtool's unit tests' business (``alerts_test.yml``, simulated time);
what this test proves is that the expressions match the series the code really pushes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines.artifacts import REFERENCE_FILE
from pipelines.config import ProjectConfig
from pipelines.data.ingest import BatchValidationError, ingest_landing
from pipelines.data.replay import land, month_batch
from pipelines.monitoring.check import check_window
from pipelines.serving import repository
from pipelines.serving.client import InferenceLog
from tests.conftest import free_ports, make_project
from tests.monitoring.test_alert_rules import RULES

PROMETHEUS, PUSHGATEWAY = "prometheus", "prometheus-pushgateway"
HOUR = datetime(2026, 3, 1, 5, tzinfo=timezone.utc)
WAIT_S = 60

pytestmark = pytest.mark.skipif(
    shutil.which(PROMETHEUS) is None or shutil.which(PUSHGATEWAY) is None,
    reason=f"{PROMETHEUS} or {PUSHGATEWAY} not installed (Debian packages of the same names; `make install` installs them)",
)


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return json.load(answer)


def wait_for(what: str, probe, logs: list[Path], timeout: float = WAIT_S):
    """``probe()``'s first truthy result; fails saying what did not happen, with the servers' logs."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = probe()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
            pytest.fail(f"{what} not within {timeout}s\n{tails}")
        time.sleep(0.2)


def quick_rules(destination: Path) -> Path:
    """The repository's rules with every ``for`` 0s; anything else differing fails here."""
    document = yaml.safe_load(RULES.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    destination.write_text(yaml.safe_dump(document, sort_keys=False))
    original, quick = yaml.safe_load(RULES.read_text()), yaml.safe_load(destination.read_text())
    for before, after in zip(original["groups"][0]["rules"], quick["groups"][0]["rules"], strict=True):
        assert {k: v for k, v in before.items() if k != "for"} == {k: v for k, v in after.items() if k != "for"}
    return destination


@dataclass
class Monitoring:
    pushgateway: str  # host:port, for metrics.pushgateway
    prometheus: str  # base URL of Prometheus's HTTP API
    logs: list[Path]

    def query(self, promql: str) -> list[dict]:
        return get(f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))["data"]["result"]

    def alerts(self, name: str) -> list[dict]:
        return [a for a in get(f"{self.prometheus}/api/v1/alerts")["data"]["alerts"] if a["labels"]["alertname"] == name]

    def firing(self, name: str, **labels: str) -> dict | None:
        return next((a for a in self.alerts(name) if a["state"] == "firing" and labels.items() <= a["labels"].items()), None)

    def arrived(self, promql: str) -> list[dict]:
        """Wait until ``promql`` has a result in Prometheus."""
        return wait_for(f"a result of {promql}", lambda: self.query(promql), self.logs)

    def evaluated_since(self, name: str, since: float) -> None:
        """Wait until every rule ``name`` was evaluated after ``since`` (epoch seconds)."""

        def evaluated() -> bool:
            groups = get(f"{self.prometheus}/api/v1/rules?type=alert")["data"]["groups"]
            times = [r["lastEvaluation"] for g in groups for r in g["rules"] if r["name"] == name]
            # RFC 3339 with nanoseconds, which fromisoformat does not take; seconds are enough here
            return bool(times) and all(datetime.fromisoformat(re.sub(r"\.\d+", "", t)).timestamp() > since + 1 for t in times)

        wait_for(f"an evaluation of {name}", evaluated, self.logs)


def start(command: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@pytest.fixture
def monitoring(tmp_path: Path):
    """A Pushgateway and a Prometheus scraping it with the quick rules, on loopback ports."""
    gateway_port, prometheus_port = free_ports(2)
    folder = tmp_path / "prometheus"
    folder.mkdir()
    rules = quick_rules(folder / "alerts.yml")
    config = folder / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": [
                    {
                        "job_name": "pushgateway",
                        "honor_labels": True,
                        "static_configs": [{"targets": [f"127.0.0.1:{gateway_port}"]}],
                    }
                ],
            }
        )
    )
    logs = [folder / "pushgateway.log", folder / "prometheus.log"]
    servers = [
        # Debian's build persists to /var/lib/prometheus/pushgateway.data unless told otherwise:
        # this one starts empty and keeps nothing
        start([PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{gateway_port}", "--persistence.file="], logs[0]),
        start(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
            logs[1],
        ),
    ]
    try:
        setup = Monitoring(f"127.0.0.1:{gateway_port}", f"http://127.0.0.1:{prometheus_port}", logs)
        for port in (gateway_port, prometheus_port):
            wait_for(f"127.0.0.1:{port} ready", lambda port=port: urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2).status == 200, logs)
        setup.arrived('up{job="pushgateway"} == 1')  # scraping
        yield setup
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@pytest.fixture
def project(tmp_path: Path, monitoring: Monitoring) -> ProjectConfig:
    return make_project(tmp_path / "project", {"metrics": {"pushgateway": monitoring.pushgateway}})


def serve_reference(config: ProjectConfig, reference: pd.DataFrame) -> int:
    """A served version whose reference sample is ``reference`` (the check needs no model)."""
    file = config.home / REFERENCE_FILE
    reference[[f.name for f in config.dataset.features]].to_parquet(file, index=False)
    version = repository.add_version(config.model_dir, {REFERENCE_FILE: file}, {"model": config.model.name})
    repository.write_model_config(config.model_dir, repository.model_config(config.model_dir, config.serving, config.dataset, version))
    return version


def log_requests(config: ProjectConfig, rows: pd.DataFrame, served_at: datetime, version: int) -> None:
    with InferenceLog(config) as log:
        log.append(rows, np.full(len(rows), 0.3, dtype="float32"), version, served_at=served_at)


def test_a_drifted_window_fires_drift_detected_and_a_clean_one_does_not(project, monitoring):
    model = project.model.name
    version = serve_reference(project, month_batch("2013-01", 4000))
    log_requests(project, month_batch("2013-01", 3000, seed=1), HOUR - timedelta(minutes=30), version)  # winter
    log_requests(project, month_batch("2013-07", 10000), HOUR + timedelta(minutes=30), version)  # summer: enough rows to tell from chance

    # Before any verdict, Prometheus has no drift metric at all: the absent() rule fires
    assert wait_for("FlywheelDriftCheckStale (missing)", lambda: monitoring.firing("FlywheelDriftCheckStale", verdict="missing"), monitoring.logs)

    # Given the check of a winter hour pushed: no drift
    winter = check_window(project, HOUR - timedelta(hours=1), HOUR)
    assert winter["status"] == "checked" and not winter["dataset_drift"]

    # Then the verdict arrives with the model's label, and the rules evaluated on it stay silent
    (share,) = monitoring.arrived(f'flywheel_drift_share{{model="{model}"}}')
    assert share["metric"]["job"] == "flywheel_drift" and float(share["value"][1]) == winter["share"]
    (detected,) = monitoring.query("flywheel_drift_detected")
    assert (detected["metric"]["model"], detected["value"][1]) == (model, "0")
    seen = time.time()
    monitoring.evaluated_since("FlywheelDriftDetected", seen)
    monitoring.evaluated_since("FlywheelDriftCheckStale", seen)
    assert monitoring.alerts("FlywheelDriftDetected") == []
    assert monitoring.alerts("FlywheelDriftCheckStale") == []  # a fresh verdict: neither stale nor missing

    # When the check of a summer hour is pushed: drift
    summer = check_window(project, HOUR, HOUR + timedelta(hours=1))
    assert summer["dataset_drift"]

    # Then FlywheelDriftDetected fires for the model, its value the drifted share
    alert = wait_for("FlywheelDriftDetected firing", lambda: monitoring.firing("FlywheelDriftDetected", model=model), monitoring.logs)
    assert alert["labels"] == {"alertname": "FlywheelDriftDetected", "severity": "warning", "job": "flywheel_drift", "model": model, "project": project.name}
    assert float(alert["value"]) == summer["share"]
    assert alert["annotations"]["summary"] == f"Drift detected for model {model}"
    assert f"reports/drift/{model}/" in alert["annotations"]["description"]
    assert alert["annotations"]["runbook_url"] == "docs/oncall.md#drift-detected"
    assert float(monitoring.query(f'flywheel_drift_detected{{model="{model}"}}')[0]["value"][1]) == 1

    # And a clean verdict again (the winter hour re-checked) resolves it
    check_window(project, HOUR - timedelta(hours=1), HOUR)
    wait_for("FlywheelDriftDetected resolved", lambda: not monitoring.alerts("FlywheelDriftDetected"), monitoring.logs)


def test_a_quarantined_batch_fires_validation_failures_and_a_clean_ingestion_does_not(project, monitoring):
    model = project.model.name

    # Given a night whose batch passes validation
    land(project.dataset, "2013-03", rows=3000)
    summary = ingest_landing(project)
    assert summary["passed"] == ["2013-03.csv"]

    # Then its counts arrive with the model's label, and FlywheelValidationFailures stays silent
    monitoring.arrived(f'flywheel_validation_batches{{model="{model}", result="passed"}} == 1')
    seen = time.time()
    counts = {(r["metric"]["__name__"], r["metric"]["result"]): float(r["value"][1]) for r in monitoring.query('{job="flywheel_validate", __name__=~"flywheel_validation_.*"}')}
    assert counts == {
        ("flywheel_validation_batches", "passed"): 1,
        ("flywheel_validation_batches", "quarantined"): 0,
        ("flywheel_validation_rows", "passed"): 3000,
        ("flywheel_validation_rows", "quarantined"): 0,
    }
    monitoring.evaluated_since("FlywheelValidationFailures", seen)
    assert monitoring.alerts("FlywheelValidationFailures") == []

    # When the next night's batch is broken: quarantined, and the run fails
    land(project.dataset, "2013-04", rows=3000, broken=True)
    with pytest.raises(BatchValidationError):
        ingest_landing(project)

    # Then FlywheelValidationFailures fires for the model, with the number of batches quarantined
    alert = wait_for("FlywheelValidationFailures firing", lambda: monitoring.firing("FlywheelValidationFailures", model=model), monitoring.logs)
    assert alert["labels"] == {
        "alertname": "FlywheelValidationFailures",
        "severity": "critical",
        "job": "flywheel_validate",
        "model": model,
        "project": project.name,
        "result": "quarantined",
    }
    assert float(alert["value"]) == 1
    assert alert["annotations"]["summary"] == f"1 landing batch(es) of {model} quarantined"
    assert alert["annotations"]["runbook_url"] == "docs/oncall.md#validation-failures"
    rows = monitoring.query(f'flywheel_validation_rows{{model="{model}", result="quarantined"}}')
    assert float(rows[0]["value"][1]) == 3000
