"""The drift check of an inference-log window against the served version's reference, and the
decision to retrain on it: real flight rows, no server."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from pipelines.artifacts import REFERENCE_FILE
from pipelines.data.replay import month_batch
from pipelines.monitoring.check import check_window, read_window, recent_reports, report_folder
from pipelines.monitoring.drift import DriftCheckError
from pipelines.monitoring.trigger import decide
from pipelines.serving import repository
from pipelines.serving.client import log_dir, write_log

HOUR = datetime(2026, 3, 1, 5, tzinfo=timezone.utc)


def serve_reference(config, reference: pd.DataFrame) -> int:
    """A served version whose reference sample is ``reference`` (no model needed for the check)."""
    file = config.home / REFERENCE_FILE
    reference[[f.name for f in config.dataset.features]].to_parquet(file, index=False)
    version = repository.add_version(config.model_dir, {REFERENCE_FILE: file}, {"model": config.model.name})
    repository.write_model_config(config.model_dir, repository.model_config(config.model_dir, config.serving, config.dataset, version))
    return version


def log_requests(config, rows: pd.DataFrame, served_at: datetime, version: int = 1) -> None:
    write_log(config, rows.assign(prediction=np.float32(0.3)), version, served_at, request_ids=rows["flight_id"].astype(str).tolist())


@pytest.fixture
def served(project):
    serve_reference(project, month_batch("2013-01", 4000))
    return project


def test_a_later_season_drifts_and_the_same_season_does_not(served):
    log_requests(served, month_batch("2013-01", 3000, seed=1), HOUR - timedelta(minutes=30))
    # a summer window large enough for the calibrated check to tell the season from chance
    log_requests(served, month_batch("2013-07", 10000), HOUR + timedelta(minutes=30))

    winter = check_window(served, HOUR - timedelta(hours=1), HOUR)
    summer = check_window(served, HOUR, HOUR + timedelta(hours=1))

    assert winter["status"] == summer["status"] == "checked"
    assert (winter["rows"]["current"], summer["rows"]["current"]) == (3000, 10000)  # each window only its own rows
    assert not winter["dataset_drift"] and summer["dataset_drift"]
    assert summer["share"] >= served.monitoring.drift_share > winter["share"]
    assert "dest" in summer["drifted_columns"] and "month" not in [c["column"] for c in summer["columns"]]  # excluded
    assert summer["versions_seen"] == [1]
    folder = report_folder(served.monitoring, served.served_model, HOUR + timedelta(hours=1))
    assert json.loads((folder / "summary.json").read_text()) == summer
    assert "dest" in (folder / "report.html").read_text()
    assert [r["window"]["end"] for r in recent_reports(served.monitoring, served.served_model)] == [summer["window"]["end"], winter["window"]["end"]]
    prom = (served.path(served.metrics.textfile_dir) / "drift.prom").read_text()
    assert 'flywheel_drift_detected{model="flights_delay",project="flights"} 1.0' in prom
    assert 'flywheel_drift_column_drifted{column="dest",method="jensenshannon",model="flights_delay",project="flights"} 1.0' in prom


def test_a_window_larger_than_the_check_needs_is_sampled_with_every_version_named(served):
    # Given a window of 4,000 requests from two versions, and a check that reads at most 16 times
    # the reference's rows (monitoring.reference_rows 100: 1,600)
    from pipelines.monitoring.check import WINDOW_SAMPLE

    small = served.model_copy(update={"monitoring": served.monitoring.model_copy(update={"reference_rows": 100})})
    log_requests(small, month_batch("2013-01", 3000, seed=1), HOUR - timedelta(minutes=30))
    log_requests(small, month_batch("2013-01", 1000, seed=2), HOUR - timedelta(minutes=20), version=2)

    first = check_window(small, HOUR - timedelta(hours=1), HOUR)
    again = check_window(small, HOUR - timedelta(hours=1), HOUR)

    # Then it tests a sample of that many, says how large the window was, names both versions,
    # and a rerun of the window draws the same sample
    assert first["rows"] == {"reference": 4000, "current": WINDOW_SAMPLE * 100, "window": 4000}
    assert first["versions_seen"] == [1, 2]
    assert [c["score"] for c in first["columns"]] == [c["score"] for c in again["columns"]]


def test_a_rerun_of_a_window_replaces_its_report_and_leaves_nothing_half_written(served):
    log_requests(served, month_batch("2013-07", 1000), HOUR - timedelta(minutes=10))
    first = check_window(served, HOUR - timedelta(hours=1), HOUR)
    log_requests(served, month_batch("2013-08", 1000), HOUR - timedelta(minutes=5))

    second = check_window(served, HOUR - timedelta(hours=1), HOUR)

    assert (first["rows"]["current"], second["rows"]["current"]) == (1000, 2000)
    root = report_folder(served.monitoring, served.served_model, HOUR).parent
    assert [p.name for p in root.iterdir()] == [report_folder(served.monitoring, served.served_model, HOUR).name]  # no partial or replaced folder
    assert json.loads((report_folder(served.monitoring, served.served_model, HOUR) / "summary.json").read_text())["rows"]["current"] == 2000


def test_too_few_requests_or_no_served_version_give_no_verdict_and_no_report(project):
    unserved = check_window(project, HOUR - timedelta(hours=1), HOUR)
    assert (unserved["status"], unserved["reason"]) == ("skipped", "no version serves yet")
    serve_reference(project, month_batch("2013-01", 2000))
    log_requests(project, month_batch("2013-07", 100), HOUR - timedelta(minutes=1))

    summary = check_window(project, HOUR - timedelta(hours=1), HOUR)

    assert summary["status"] == "skipped" and summary["reason"].startswith("100 requests logged in the window, fewer than monitoring.min_rows=500")
    assert not (project.home / "reports/drift").exists()


def test_a_served_version_without_its_reference_is_an_error_that_names_the_file(project):
    (project.model_dir / "4").mkdir(parents=True)  # a version published before reference samples existed
    repository.write_model_config(project.model_dir, repository.model_config(project.model_dir, project.serving, project.dataset, 4))
    log_requests(project, month_batch("2013-07", 600), HOUR - timedelta(minutes=1))

    with pytest.raises(DriftCheckError, match=r"flights_delay/4/reference.parquet: missing; the served version 4 has no reference"):
        check_window(project, HOUR - timedelta(hours=1), HOUR)


def test_the_window_reads_only_its_hour_across_a_day_partition(project):
    midnight = datetime(2026, 3, 2, tzinfo=timezone.utc)
    rows = month_batch("2013-02", 30)
    log_requests(project, rows.iloc[:10], midnight - timedelta(minutes=20))
    log_requests(project, rows.iloc[10:20], midnight + timedelta(minutes=20))
    log_requests(project, rows.iloc[20:], midnight + timedelta(hours=1))  # the next window

    window = read_window(log_dir(project.serving, project.served_model), midnight - timedelta(minutes=30), midnight + timedelta(minutes=30))

    assert sorted(window["request_id"]) == sorted(rows["flight_id"].astype(str).iloc[:20])
    assert sorted(p.name for p in (project.home / "inference_log/flights_delay").iterdir()) == ["date=2026-03-01", "date=2026-03-02"]


DRIFTED = {"status": "checked", "dataset_drift": True, "share": 0.5, "drift_share": 0.3, "drifted_columns": ["dest", "distance"]}
NOW = datetime(2026, 3, 1, 12, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("summary", "changes", "trigger", "reason"),
    [
        (DRIFTED, {}, True, "drift: dest, distance (share 0.50)"),
        ({**DRIFTED, "dataset_drift": False, "share": 0.12}, {}, False, "no drift: share 0.12 below 0.30"),
        ({"status": "skipped", "reason": "no version serves yet"}, {}, False, "no verdict: no version serves yet"),
        (DRIFTED, {"retrains_active": 1}, False, "a retrain is already queued or running"),
        (DRIFTED, {"last_trigger_at": NOW - timedelta(hours=23)}, False, "within the 24 h cooldown"),
        (DRIFTED, {"last_trigger_at": NOW - timedelta(hours=25)}, True, "drift: dest, distance"),
        (DRIFTED, {"run_type": "backfill"}, False, "a backfill reports, it does not retrain"),
    ],
)
def test_drift_starts_a_retrain_only_outside_cooldown_and_when_none_runs(summary, changes, trigger, reason):
    arguments = {"last_trigger_at": None, "retrains_active": 0, "run_type": "scheduled", "now": NOW, "cooldown_hours": 24, **changes}

    decision = decide(summary, **arguments)

    assert decision["trigger"] is trigger and reason in decision["reason"]
