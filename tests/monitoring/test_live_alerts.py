"""The project's real metrics reach a real Prometheus through a real Pushgateway and fire the
repository's alerts: a drift check of a summer hour against a January reference fires
FlywheelDriftDetected and a January hour does not; an ingestion that quarantines a broken
batch fires FlywheelValidationFailures and a clean one does not; a performance window of real
flights whose labels came back shuffled fires FlywheelPerformanceDegraded and one with their
true labels does not.

Prometheus scrapes the Pushgateway every second with ``honor_labels: true`` (as a deployment
must, to keep the pushed job and model labels) and evaluates the rules every second, with the
external label ``flywheel_ui`` of prometheus.yml, so each alert's ``url`` is the full address of
its on-call page (the window that fired, from the gauges really pushed). The rules
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

from pipelines.artifacts import MODEL_FILE, OUTPUT, PERFORMANCE_REFERENCE_FILE, REFERENCE_FILE, REQUEST_ID
from pipelines.config import ProjectConfig
from pipelines.data.ingest import BatchValidationError, ingest_landing
from pipelines.data.replay import land, month_batch
from pipelines.feedback.labels import ingest_feedback, land_feedback
from pipelines.feedback.performance import evaluate_window
from pipelines.monitoring.check import check_window
from pipelines.serving import repository
from pipelines.serving.client import write_log
from tests.conftest import free_ports, make_project
from tests.monitoring.test_alert_rules import RULES

PROMETHEUS, PUSHGATEWAY = "prometheus", "prometheus-pushgateway"
HOUR = datetime(2026, 3, 1, 5, tzinfo=timezone.utc)
# the Airflow UI's base URL, from the compose deployment's Prometheus configuration
UI = yaml.safe_load((RULES.parent / "prometheus.yml").read_text())["global"]["external_labels"]["flywheel_ui"]
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
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "external_labels": {"flywheel_ui": UI}},
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
    write_log(config, rows.assign(prediction=np.float32(0.3)), version, served_at)


@pytest.fixture(scope="module")
def flights_model(tmp_path_factory) -> tuple[Path, Path, pd.DataFrame]:
    """A flights model trained on 3,000 flights of January and February each (3 epochs), its
    performance reference as publish writes it, and the fresh flights of its test split's period
    (February flights from the first test row on that it did not learn from: 6,317) with its
    scores in ``prediction``: the recipe of tests/unit/test_performance.py."""
    from pipelines.data.replay import flights
    from pipelines.data.split import split_paths
    from pipelines.data.versioning import version_split
    from pipelines.evaluation.gate import predict_onnx
    from pipelines.export.onnx import export
    from pipelines.feedback.reference import write_reference
    from pipelines.training.train import train
    from tests.unit.test_split import write_raw

    config = make_project(tmp_path_factory.mktemp("performance") / "project")
    write_raw(config, "2013-01", "2013-02", rows=3000)
    data_version = version_split(config)["data_version"]
    candidate = config.home / train(config, data_version)["candidate"]
    export(config, config.portable(candidate))
    test = split_paths(config.split.output_dir)["test"]
    write_reference(test, config.dataset, candidate / MODEL_FILE, config.performance.seed, candidate)
    raw = pd.read_parquet(config.path(config.dataset.raw_path))
    every = flights()
    first = pd.to_datetime(pd.read_parquet(test, columns=["time_hour"])["time_hour"]).min()
    fresh = every[(every["month"] == 2) & (pd.to_datetime(every["time_hour"]) >= first) & ~every["flight_id"].isin(raw["flight_id"])].reset_index(drop=True)
    scored = fresh.assign(**{OUTPUT: predict_onnx(candidate / MODEL_FILE, fresh).astype(np.float32)})
    return candidate / MODEL_FILE, candidate / PERFORMANCE_REFERENCE_FILE, scored


def serve_model(config: ProjectConfig, model_file: Path, performance_reference: Path) -> int:
    """A served version of ``model_file`` with its performance reference (its lineage has no export
    record: the default threshold, which ROC AUC does not use)."""
    files = {MODEL_FILE: model_file, PERFORMANCE_REFERENCE_FILE: performance_reference}
    version = repository.add_version(config.model_dir, files, {"export": {}})
    repository.write_model_config(config.model_dir, repository.model_config(config.model_dir, config.serving, config.dataset, version))
    return version


def labels_come_back(config: ProjectConfig, flights: pd.DataFrame, truth: np.ndarray, served_at: datetime, version: int, name: str) -> dict:
    """``flights`` (with the served ``prediction``) answered at ``served_at`` under request ids
    ``<name>-<row>``, then their labels ``truth`` landed as ``<name>.csv`` and joined by the feedback
    ingestion an hour later; returns its summary."""
    ids = [f"{name}-{row}" for row in range(len(flights))]
    write_log(config, flights, version, served_at, request_ids=ids)
    source = config.home / f"{name}.csv"
    pd.DataFrame({REQUEST_ID: ids, "label": truth}).to_csv(source, index=False)
    land_feedback(config, source)
    return ingest_feedback(config, now=served_at + timedelta(hours=1))


def test_a_drifted_window_fires_drift_detected_and_a_clean_one_does_not(project, monitoring):
    model = project.model.name
    version = serve_reference(project, month_batch("2013-01", 4000))
    log_requests(project, month_batch("2013-01", 3000, seed=1), HOUR - timedelta(minutes=30), version)  # winter
    log_requests(project, month_batch("2013-07", 10000), HOUR + timedelta(minutes=30), version)  # summer: enough rows to tell from chance

    # Before any verdict, Prometheus has no drift metric at all: the absent() rule fires
    missing = wait_for("FlywheelDriftCheckStale (missing)", lambda: monitoring.firing("FlywheelDriftCheckStale", verdict="missing"), monitoring.logs)
    assert missing["annotations"]["url"] == f"{UI}/flywheel/projects"  # no project to name: the index

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
    # its page: the project's timeline at the window that drifted, named as its report folder
    folder = Path(summer["report"]).parent
    assert alert["annotations"]["url"] == f"{UI}/flywheel/projects/{project.name}/timeline?window={folder.name}"
    assert folder.name == "20260301T060000Z" and folder.is_dir()
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
    assert alert["annotations"]["url"] == f"{UI}/flywheel/projects/{project.name}/timeline"
    rows = monitoring.query(f'flywheel_validation_rows{{model="{model}", result="quarantined"}}')
    assert float(rows[0]["value"][1]) == 3000


def test_a_window_whose_labels_came_back_shuffled_fires_performance_degraded_and_true_labels_do_not(project, monitoring, flights_model):
    model, column = project.model.name, project.dataset.label.column
    model_file, performance_reference, fresh = flights_model
    version = serve_model(project, model_file, performance_reference)
    true_day, shuffled_day = datetime(2026, 3, 2, tzinfo=timezone.utc), datetime(2026, 3, 3, tzinfo=timezone.utc)
    truth = fresh[column].to_numpy()

    # Given the fresh flights served on one day and their true delays back
    joined = labels_come_back(project, fresh, truth, true_day + timedelta(hours=12), version, "true")
    assert joined["labelled"] == len(fresh) and joined["windows"] == [[true_day.isoformat(), (true_day + timedelta(days=1)).isoformat()]]

    # When that day's window is evaluated: the model keeps its test skill
    kept = evaluate_window(project, true_day, true_day + timedelta(days=1))
    assert kept["status"] == "checked" and not kept["degraded"] and kept["label_coverage"] == 1.0

    # Then its realized ROC AUC arrives with the project's, model's and metric's labels, and the rule stays silent
    (realized,) = monitoring.arrived(f'flywheel_performance_realized{{model="{model}"}}')
    assert realized["metric"] == {"__name__": "flywheel_performance_realized", "job": "flywheel_performance", "project": project.name, "model": model, "metric": "roc_auc"}
    assert float(realized["value"][1]) == kept["realized"]["value"]
    (degraded,) = monitoring.query(f'flywheel_performance_degraded{{model="{model}"}}')
    assert degraded["value"][1] == "0"
    seen = time.time()
    monitoring.evaluated_since("FlywheelPerformanceDegraded", seen)
    assert monitoring.alerts("FlywheelPerformanceDegraded") == []

    # When the same flights served the next day get their delays back shuffled among them (labels mis-joined)
    labels_come_back(project, fresh, np.random.default_rng(0).permutation(truth), shuffled_day + timedelta(hours=12), version, "shuffled")
    lost = evaluate_window(project, shuffled_day, shuffled_day + timedelta(days=1))
    assert lost["degraded"] and abs(lost["realized"]["value"] - 0.5) < 0.03  # no skill left

    # Then FlywheelPerformanceDegraded fires for the model and metric, its value the realized ROC AUC
    alert = wait_for("FlywheelPerformanceDegraded firing", lambda: monitoring.firing("FlywheelPerformanceDegraded", model=model), monitoring.logs)
    assert alert["labels"] == {"alertname": "FlywheelPerformanceDegraded", "severity": "warning", "job": "flywheel_performance", "model": model, "project": project.name, "metric": "roc_auc"}
    assert float(alert["value"]) == lost["realized"]["value"]
    # the annotations look up the interval and the test metric of the same push
    (low, high), test = lost["realized"]["interval"], lost["test"]["value"]
    value = lost["realized"]["value"]
    assert alert["annotations"]["summary"] == f"roc_auc of model {model} dropped to {value:.4f} [{low:.4f}, {high:.4f}] against its test {test:.4f}"
    description = alert["annotations"]["description"]
    assert "(100% of the window's requests labelled)" in description and f"reports/performance/{model}/" in description
    assert "ended 2026-03-04 00:00:00 +0000 UTC" in description
    assert alert["annotations"]["runbook_url"] == "docs/oncall.md#performance-degraded"
    assert alert["annotations"]["url"] == f"{UI}/flywheel/projects/{project.name}/timeline?window=20260304T000000Z"  # the shuffled day's end

    # And the true day evaluated again replaces the verdict: resolved
    evaluate_window(project, true_day, true_day + timedelta(days=1))
    wait_for("FlywheelPerformanceDegraded resolved", lambda: not monitoring.alerts("FlywheelPerformanceDegraded"), monitoring.logs)
