"""The closed loop of two tabular projects in one real Airflow (scheduler, dag-processor,
api-server, LocalExecutor) and one real Triton: each project's champion comes from its own
nightly schedule and both are served side by side; requests logged from a later season of the
real flights make ``drift__flights`` emit its ``drift_detected`` Asset, and ``retrain__flights``
starts by itself and ends with a gate decision while ``retrain__taxis`` does not run. A window
from the same season triggers nothing; a backfill writes one report a window and retrains
nothing; a rollback of one project leaves the other serving as it was.

Then production closes the loop: requests a plain tritonclient client sends are logged by
Triton, their true labels come back through an Asset event sent to Airflow's REST API,
``feedback__flights`` joins them and ``performance__flights`` finds the window healthy; a window
whose labels are shuffled is found degraded, its ``performance_degraded`` Asset starts
``retrain__flights`` by itself, and the shuffled labels, landed as a production batch, are held
by the label check instead of being trained on.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import pandas as pd
import pytest

from pipelines.artifacts import MODEL_FILE
from pipelines.config import load_deployment
from pipelines.data.replay import land, month_batch
from pipelines.evaluation.gate import NOT_PROMOTED, PROMOTED, predict_onnx
from pipelines.launch.airflow import ADMIN_USER, LocalAirflow
from pipelines.launch.demo import next_asset_run, send_as_a_service
from pipelines.launch.triton import TritonServer
from pipelines.monitoring.check import report_folder
from pipelines.serving import live, repository, rollback
from pipelines.serving.client import read_log, write_log
from pipelines.serving.publish import run_record_path
from pipelines.steps import FEEDBACK_LANDED, PERFORMANCE_DEGRADED, drift_asset, project_asset
from tests.browser.chromium import chromium_browser, logged_in_page, playwright  # noqa: F401 (the browser fixture)
from tests.conftest import REPO, free_ports, make_home, make_project
from tests.serving.traffic import Traffic

pytestmark = pytest.mark.e2e
ROWS = 4000
WINDOW_ROWS = 10_000
# Whole hours well in the past, so that no scheduled run of the drift DAG checks them too.
BASE = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(hours=8)
BACKFILLED = [BASE + timedelta(hours=1), BASE + timedelta(hours=2)]
SAME_SEASON, LATER_SEASON, STILL_LATER = (BASE + timedelta(hours=h) for h in (4, 5, 6))


def log_traffic(config, month: str, window_end: datetime, seed: int = 0) -> None:
    """Real flights of ``month`` answered by the served version half an hour before ``window_end``:
    enough that the calibrated check tells a later season from chance against a 5,600-row reference."""
    rows = month_batch(month, WINDOW_ROWS, seed=seed)
    write_log(config, rows.assign(prediction=predict_onnx(config.model_dir / "1" / MODEL_FILE, rows)), 1, window_end - timedelta(minutes=30))


RETRAIN, DRIFT, ROLLBACK = "retrain__flights", "drift__flights", "rollback__flights"
expect = playwright.expect


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    home = tmp_path_factory.mktemp("drift-loop")
    http, grpc, metrics, airflow_port = free_ports(4)
    triton = {"url": f"127.0.0.1:{http}", "http_port": http, "grpc_port": grpc, "metrics_port": metrics}
    make_home(home, {"serving": {"triton": triton}})
    config = make_project(home, name="flights")
    other = make_project(home, {"model": {"name": "taxis_delay"}}, name="taxis")
    for project in (config, other):
        for month in ("2013-01", "2013-02"):
            land(project.dataset, month, rows=ROWS)
    local = LocalAirflow(
        home / "airflow", REPO / "dags", REPO / "plugins", port=airflow_port,
        extra_env={"FLYWHEEL_HOME": str(home)}, scheduled=True,  # Asset-triggered runs need the scheduler's own scheduling
    )
    with TritonServer(load_deployment(home)), local:
        for dag_id in (DRIFT, RETRAIN, "drift__taxis", "retrain__taxis", "rollback__taxis", ROLLBACK, "feedback__flights", "performance__flights"):
            local.wait_for_dag(dag_id)
            local.unpause(dag_id)
        # Unpaused with catchup off, each retrain runs its latest nightly slot at once: the champions
        nightly = wait_for_retrain(local, "scheduled")
        other_nightly = wait_for_retrain(local, "scheduled", dag_id="retrain__taxis")
        for dag_id, run_id in ((RETRAIN, nightly), ("retrain__taxis", other_nightly)):
            assert local.wait_for_run(dag_id, run_id, timeout=900) == "success", local.task_instances(dag_id, run_id)
        assert repository.served_version(config.model_dir) == repository.served_version(other.model_dir) == 1
        assert json.loads(run_record_path(config.artifacts_dir, nightly).read_text())["airflow"]["trigger"] == {"kind": "schedule"}
        for end in BACKFILLED:
            log_traffic(config, "2013-08", end)
        log_traffic(config, "2013-02", SAME_SEASON, seed=1)
        log_traffic(config, "2013-07", LATER_SEASON)
        log_traffic(config, "2013-08", STILL_LATER)
        land(config.dataset, "2013-07", rows=ROWS)  # the new season's labelled flights, for a retrain to learn from
        yield local, config, other, nightly


def test_one_triton_serves_both_projects_at_once(loop):
    airflow, config, other, _ = loop
    rows = month_batch("2013-03", 50)

    with live.connect(config.serving.triton) as client:
        answers = {project.model.name: live.infer(client, project.model.name, project.dataset, rows) for project in (config, other)}

    for project in (config, other):
        predictions, version = answers[project.model.name]
        assert version == 1
        assert abs(predictions - predict_onnx(project.model_dir / "1" / MODEL_FILE, rows)).max() < 1e-5


def check_window(airflow: LocalAirflow, window_end: datetime) -> tuple[str, dict]:
    run_id = airflow.trigger(DRIFT, {}, logical_date=window_end)
    assert airflow.wait_for_run(DRIFT, run_id, timeout=300) == "success", airflow.task_instances(DRIFT, run_id)
    return run_id, airflow.xcom(DRIFT, run_id, "check")


def drift_events(airflow: LocalAirflow, project: str = "flights") -> list[dict]:
    return asset_events(airflow, drift_asset(project))


def asset_events(airflow: LocalAirflow, uri: str) -> list[dict]:
    """The events of the Asset ``uri`` in Airflow's metadata database, oldest first. Read from the
    database: Airflow 3.3.2's ``GET /api/v2/assets/events`` answers 500 once an event has started
    an asset-triggered run (that run has no logical date, which its response model requires)."""
    with sqlite3.connect(airflow.airflow_home / "airflow.db") as db:
        rows = db.execute(
            "SELECT e.extra, e.source_run_id FROM asset_event e JOIN asset a ON a.id = e.asset_id"
            " WHERE a.name = ? ORDER BY e.timestamp",
            (uri,),
        ).fetchall()
    return [{"extra": json.loads(extra), "source_run_id": run_id} for extra, run_id in rows]


def test_a_window_from_the_same_season_triggers_nothing(loop):
    airflow, config, _, nightly = loop

    run_id, summary = check_window(airflow, SAME_SEASON)

    assert summary["status"] == "checked" and summary["rows"]["current"] == WINDOW_ROWS
    assert not summary["dataset_drift"] and summary["share"] < config.monitoring.drift_share
    assert summary["window"] == {"start": (SAME_SEASON - timedelta(hours=1)).isoformat(), "end": SAME_SEASON.isoformat()}
    assert {t["task_id"]: t["state"] for t in airflow.task_instances(DRIFT, run_id)}["trigger_retrain"] == "skipped"
    assert drift_events(airflow) == [] and [r["dag_run_id"] for r in airflow.dag_runs(RETRAIN)] == [nightly]


def test_a_later_season_emits_drift_detected_and_the_retrain_starts_by_itself(loop):
    airflow, config, other, nightly = loop

    run_id, summary = check_window(airflow, LATER_SEASON)

    assert summary["dataset_drift"] and "dest" in summary["drifted_columns"]
    assert (report_folder(config.monitoring, config.served_model, LATER_SEASON) / "report.html").exists()
    (event,) = drift_events(airflow)
    assert event["source_run_id"] == run_id
    assert event["extra"] == {
        "project": "flights", "model": "flights_delay", "version": 1, "window_end": LATER_SEASON.isoformat(), "report": summary["report"],
        "share": summary["share"], "columns": summary["drifted_columns"],
    }
    retrain = wait_for_retrain(airflow, "asset_triggered")

    # While it runs, the next drifted window is reported but does not queue a second retrain
    _, still = check_window(airflow, STILL_LATER)
    assert still["dataset_drift"] and len(drift_events(airflow)) == 1

    assert airflow.wait_for_run(RETRAIN, retrain, timeout=900) == "success", airflow.task_instances(RETRAIN, retrain)
    published = airflow.xcom(RETRAIN, retrain, "publish")
    assert published["decision"] in (PROMOTED, NOT_PROMOTED)  # the same gate as every night
    record = json.loads(run_record_path(config.artifacts_dir, retrain).read_text())
    assert record["airflow"]["run_type"] == "asset_triggered"
    assert record["airflow"]["trigger"] == {"kind": "drift", "events": [event["extra"]]}
    assert record["gate"]["champion_version"] == 1 and set(record["gate"]["challenger"]) == set(record["gate"]["champion"])
    assert sorted(r["dag_run_id"] for r in airflow.dag_runs(RETRAIN)) == sorted([nightly, retrain])
    # the other project's model saw no event and no retrain
    assert drift_events(airflow, "taxis") == []
    assert [r["run_type"] for r in airflow.dag_runs("retrain__taxis")] == ["scheduled"]
    assert repository.served_version(other.model_dir) == 1


def test_a_backfill_writes_a_report_for_each_past_window_and_retrains_nothing(loop):
    airflow, config, _, nightly = loop
    events_before = len(drift_events(airflow))

    airflow.backfill(DRIFT, BACKFILLED[0], BACKFILLED[-1])

    runs = wait_for_backfill_runs(airflow, len(BACKFILLED))
    assert sorted(datetime.fromisoformat(r["data_interval_end"]) for r in runs) == BACKFILLED
    for end in BACKFILLED:
        summary = json.loads((report_folder(config.monitoring, config.served_model, end) / "summary.json").read_text())
        assert summary["window"]["end"] == end.isoformat() and summary["dataset_drift"]
    assert len(drift_events(airflow)) == events_before  # drifted, but a backfill only reports


def test_a_rollback_of_one_project_leaves_the_other_serving_as_it_was(loop):
    airflow, config, other, _ = loop
    # Given a second version of taxis (the gate overridden, as an on-call engineer may)
    forced = airflow.trigger("retrain__taxis", {"force_publish": True, "force_reason": "e2e: a second version to roll back from"})
    assert airflow.wait_for_run("retrain__taxis", forced, timeout=900) == "success", airflow.task_instances("retrain__taxis", forced)
    assert repository.served_version(other.model_dir) == 2
    flights_served = repository.served_version(config.model_dir)

    # When taxis is rolled back to version 1
    run_id = airflow.trigger("rollback__taxis", {"version": 1})
    assert airflow.wait_for_run("rollback__taxis", run_id, timeout=300) == "success"

    # Then taxis serves 1 again, and flights serves what it served, answering in Triton throughout
    assert repository.served_version(other.model_dir) == 1
    assert repository.served_version(config.model_dir) == flights_served
    with live.connect(config.serving.triton) as client:
        assert live.infer(client, config.model.name, config.dataset, month_batch("2013-03", 10))[1] == flights_served
        assert live.infer(client, other.model.name, other.dataset, month_batch("2013-03", 10))[1] == 1


def wait_for_retrain(airflow: LocalAirflow, run_type: str, timeout: float = 120, dag_id: str = RETRAIN) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [r for r in airflow.dag_runs(dag_id) if r["run_type"] == run_type]
        if runs:
            return runs[0]["dag_run_id"]
        time.sleep(1)
    raise AssertionError(f"no {run_type} {dag_id} run within {timeout:.0f} s: {airflow.dag_runs(dag_id)}")


def wait_for_backfill_runs(airflow: LocalAirflow, count: int, timeout: float = 600) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [r for r in airflow.dag_runs(DRIFT) if r["run_type"] == "backfill"]
        if len(runs) == count and all(r["state"] in ("success", "failed") for r in runs):
            assert all(r["state"] == "success" for r in runs), runs
            return runs
        time.sleep(1)
    raise AssertionError(f"backfill of {DRIFT} did not finish {count} runs within {timeout:.0f} s: {airflow.dag_runs(DRIFT)}")


# --- production: the served rows' labels come back ---------------------------------------

FEEDBACK, PERFORMANCE = "feedback__flights", "performance__flights"


def wait_for_new_run(airflow: LocalAirflow, dag_id: str, known: set[str], timeout: float = 120) -> str:
    run_id = next_asset_run(airflow, dag_id, known, timeout)
    assert run_id, f"no asset-triggered {dag_id} run within {timeout:.0f} s: {airflow.dag_runs(dag_id)}"
    return run_id


def test_labels_of_what_triton_answered_come_back_and_a_healthy_window_triggers_nothing(loop, tmp_path):
    airflow, config, _, _ = loop
    rows = month_batch("2013-02", 2000, seed=7)
    retrains = {r["dag_run_id"] for r in airflow.dag_runs(RETRAIN)}
    feedback_runs, performance_runs = ({r["dag_run_id"] for r in airflow.dag_runs(d)} for d in (FEEDBACK, PERFORMANCE))

    # Given 2,000 February flights answered by Triton for a client that is not Flywheel's
    keys = send_as_a_service(config.serving.triton.grpc_port, config.model.name, config.dataset, rows)
    assert keys == rows["flight_id"].astype(str).tolist()
    logged = wait_until_logged(config, keys)

    # When their true labels come back through the REST API (an Asset event naming the file)
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"request_id": keys, "label": rows["arr_delayed"]}).to_csv(labels, index=False)
    airflow.emit_asset_event(project_asset("flights", FEEDBACK_LANDED), {"path": str(labels)})

    # Then feedback__flights joins them and performance__flights measures their window by itself
    joined = wait_for_new_run(airflow, FEEDBACK, feedback_runs)
    assert airflow.wait_for_run(FEEDBACK, joined, timeout=300) == "success", airflow.task_instances(FEEDBACK, joined)
    assert airflow.xcom(FEEDBACK, joined, "join")["labelled"] == len(rows)
    measured = wait_for_new_run(airflow, PERFORMANCE, performance_runs)
    assert airflow.wait_for_run(PERFORMANCE, measured, timeout=300) == "success", airflow.task_instances(PERFORMANCE, measured)
    (summary,) = airflow.xcom(PERFORMANCE, measured, "check")
    served = logged["model_version"].iloc[0]
    assert summary["status"] == "checked" and summary["version"] == served and summary["labelled"] == len(rows)
    assert not summary["degraded"], summary
    assert {t["task_id"]: t["state"] for t in airflow.task_instances(PERFORMANCE, measured)}["trigger_retrain"] == "skipped"
    assert asset_events(airflow, project_asset("flights", PERFORMANCE_DEGRADED)) == []
    assert {r["dag_run_id"] for r in airflow.dag_runs(RETRAIN)} == retrains


def wait_until_logged(config, keys: list[str], timeout: float = 30) -> pd.DataFrame:
    """The logged rows of ``keys``, once Triton's log holds them all (it flushes within serving.log.flush_seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        logged = read_log(config.serving, config.served_model)
        mine = logged[logged["request_id"].isin(keys)] if len(logged) else logged
        if len(mine) == len(keys) or time.monotonic() > deadline:
            assert len(mine) == len(keys), f"{len(mine)} of {len(keys)} answered rows in the inference log"
            return mine
        time.sleep(0.5)


def test_a_window_of_shuffled_labels_is_degraded_retrains_by_itself_and_its_batch_is_held(loop, tmp_path):
    airflow, config, _, _ = loop
    served = repository.served_version(config.model_dir)
    # Given 10,000 March flights the served version answered two days ago (written as Triton
    # writes its log), whose labels come back shuffled (a mis-join upstream)
    day = (datetime.now(timezone.utc) - timedelta(days=2)).replace(hour=12, minute=0, second=0, microsecond=0)
    rows = month_batch("2013-03", 10_000, seed=8)
    keys = rows["flight_id"].astype(str).tolist()
    write_log(config, rows.assign(prediction=predict_onnx(config.model_dir / str(served) / MODEL_FILE, rows)), served, day, keys)
    shuffled = rows["arr_delayed"].sample(frac=1, random_state=0).to_numpy()
    labels = tmp_path / "shuffled.csv"
    pd.DataFrame({"request_id": keys, "label": shuffled, "observed_at": (day + timedelta(hours=3)).isoformat()}).to_csv(labels, index=False)
    retrains, performance_runs = ({r["dag_run_id"] for r in airflow.dag_runs(d)} for d in (RETRAIN, PERFORMANCE))

    # When they are joined (a run of feedback__flights with the file as its Param)
    run_id = airflow.trigger(FEEDBACK, {"path": str(labels)})
    assert airflow.wait_for_run(FEEDBACK, run_id, timeout=300) == "success", airflow.task_instances(FEEDBACK, run_id)
    (batch,) = airflow.xcom(FEEDBACK, run_id, "land_production")["batches"]

    # Then the window is degraded, beyond its false-alarm rate, and performance_degraded starts a retrain
    measured = wait_for_new_run(airflow, PERFORMANCE, performance_runs)
    assert airflow.wait_for_run(PERFORMANCE, measured, timeout=300) == "success", airflow.task_instances(PERFORMANCE, measured)
    (summary,) = airflow.xcom(PERFORMANCE, measured, "check")
    assert summary["degraded"] and summary["difference"]["p_value"] < config.performance.false_alarm_rate, summary
    (event,) = asset_events(airflow, project_asset("flights", PERFORMANCE_DEGRADED))
    assert event["source_run_id"] == measured and event["extra"]["version"] == served and event["extra"]["metric"] == "roc_auc"
    retrain = wait_for_new_run(airflow, RETRAIN, retrains)
    # and its validate holds the shuffled production batch with the evidence: it is not trained on
    assert airflow.wait_for_run(RETRAIN, retrain, timeout=600) == "failed"
    states = {t["task_id"]: t["state"] for t in airflow.task_instances(RETRAIN, retrain)}
    assert states["validate"] == "failed" and states["train"] != "success", states
    held = config.dataset.quarantine_dir / batch["batch"].removesuffix(".parquet")
    assert (held / "label_check.json").exists(), sorted(config.dataset.quarantine_dir.iterdir())
    assert not run_record_path(config.artifacts_dir, retrain).exists()  # no publish ran: nothing was learned from the shuffled labels


# --- on-call: from the alert's page to a rollback, in a real browser --------------------------


def alert_url(airflow: LocalAirflow, project: str, window_end: datetime) -> str:
    """The ``url`` annotation of FlywheelDriftDetected as Prometheus expands it (the form
    tests/monitoring/alerts_test.yml asserts), for the Airflow UI at ``flywheel_ui``."""
    return f"http://localhost:{airflow.port}/flywheel/projects/{project}/timeline?window={window_end.strftime('%Y%m%dT%H%M%SZ')}"


def test_from_the_alert_to_the_run_it_started_and_a_rollback_in_the_browser_with_no_failed_request(loop, browser):
    airflow, config, _, _ = loop
    (drift_retrain,) = drift_started(airflow)  # the retrain LATER_SEASON's drift started
    # Given a newer version of flights serving, published over the gate by a person (audited)
    forced = airflow.trigger(RETRAIN, {"force_publish": True, "force_reason": "e2e: a version to roll back from"})
    assert airflow.wait_for_run(RETRAIN, forced, timeout=900) == "success", airflow.task_instances(RETRAIN, forced)
    serving = repository.served_version(config.model_dir)
    target = rollback.previous_served(config)
    rows = month_batch("2013-03", 5)
    page = logged_in_page(browser, airflow)
    clicks = 0

    # When on-call opens the drift alert's URL
    page.goto(alert_url(airflow, "flights", LATER_SEASON))
    window = page.locator(f"tr[data-window='{LATER_SEASON.strftime('%Y%m%dT%H%M%SZ')}']")
    expect(window).to_have_class("highlighted")  # the window that fired, shaded on the chart too
    expect(window.locator("td").nth(1)).to_have_text("yes")  # dataset drift
    expect(window).to_contain_text("dest")  # among its drifted columns
    expect(page.locator(".main-svg").first).to_be_visible()  # the timeline chart
    # the window links the retrain it started, with how that ended
    run_link = window.get_by_role("link", name=re.compile(r"promoted v\d+|not promoted"))
    run_link.click()
    clicks += 1
    page.wait_for_url(re.compile(rf"/dags/{RETRAIN}/runs/{re.escape(quote(drift_retrain, safe=''))}$"), wait_until="commit")  # Airflow's own run page
    page.go_back()

    # and rolls back from the page while a client keeps asking Triton
    rollbacks = {r["dag_run_id"] for r in airflow.dag_runs(ROLLBACK)}
    with Traffic(lambda: live.connect(config.serving.triton), lambda c: live.infer(c, config.model.name, config.dataset, rows)[::-1]) as traffic:
        page.get_by_role("button", name=f"Roll back to v{target}").click()
        clicks += 1
        dialog = page.locator(f"dialog#rollback-v{target}")
        expect(dialog).to_contain_text(f"v{serving} (serving)")
        dialog.get_by_placeholder("Why roll back (required)").fill("e2e: the forced version misbehaves")
        dialog.get_by_role("button", name=f"Roll back to v{target}").click()
        clicks += 1
        expect(dialog.locator(".result")).to_contain_text("queued")
        (run_id,) = {r["dag_run_id"] for r in airflow.dag_runs(ROLLBACK)} - rollbacks
        assert airflow.wait_for_run(ROLLBACK, run_id, timeout=300) == "success", airflow.task_instances(ROLLBACK, run_id)

    # Then the other version serves, no request failed, and the audit trail names who and why
    assert repository.served_version(config.model_dir) == target
    assert traffic.failures == [] and traffic.versions == [serving, target], (traffic.failures[:3], traffic.versions)
    assert clicks == 3  # the run's link, "Roll back to vN", its confirmation
    page.goto(f"http://localhost:{airflow.port}/flywheel/audit?project=flights")
    audited = page.locator("tr", has_text="rollback").first
    expect(audited).to_contain_text(ADMIN_USER)
    expect(audited).to_contain_text("e2e: the forced version misbehaves")
    expect(audited).to_contain_text(f"v{target} serves (was v{serving})")
    expect(page.locator("tr", has_text="force_publish").first).to_contain_text("e2e: a version to roll back from")
    expect(page.locator("tr[data-action='retrain']").first.locator(".run-outcome")).to_have_text(re.compile(rf"promoted v{serving}"))  # how the run ended


def drift_started(airflow: LocalAirflow) -> set[str]:
    """The runs the drift Asset events of flights started, from Airflow's metadata database."""
    with sqlite3.connect(airflow.airflow_home / "airflow.db") as db:
        rows = db.execute(
            "SELECT r.run_id FROM dagrun_asset_event d JOIN asset_event e ON e.id = d.event_id JOIN asset a ON a.id = e.asset_id"
            " JOIN dag_run r ON r.id = d.dag_run_id WHERE a.name = ?",
            (drift_asset("flights"),),
        ).fetchall()
    return {run_id for (run_id,) in rows}
