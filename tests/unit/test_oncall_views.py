"""The on-call plugin without a server: how drift summaries, lineage, the serving history and the
deployment's projects are shaped for the pages, that a project and a report are named by
their names only, that every route refuses a caller without an Airflow login, and that the
auth manager decides per project (its retrain or finetune DAG, its drift DAG) who reads what."""

from __future__ import annotations

import html
import json
import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.testclient import TestClient

from pipelines.evaluation.gate import NOT_PROMOTED, PROMOTED
from pipelines.lineage import write_json
from pipelines.monitoring.check import reports_root
from tests.browser.oncall_project import (
    BASE_MODEL,
    REJECTED_REASON,
    TEXT_BASE,
    TEXT_V1,
    TEXT_V2,
    TEXT_V2_RUN,
    V1,
    V2,
    V3,
    write_text_versions,
    write_versions,
)
from tests.conftest import REPO, make_project, make_text_project

# Airflow puts its plugins folder on sys.path and imports the plugin from there; so do the tests.
if str(REPO / "plugins") not in sys.path:
    sys.path.append(str(REPO / "plugins"))

from flywheel_oncall import app as oncall  # noqa: E402
from flywheel_oncall import data  # noqa: E402

FOLDER = "20260302T110000Z"


def summary(config, folder: str = FOLDER, **changes) -> dict:
    """A drift summary as ``pipelines.monitoring.check.check_window`` writes it."""
    columns = [
        {"column": "carrier", "kind": "categorical", "method": "jensenshannon", "score": 0.064, "threshold": 0.1, "drifted": False},
        {"column": "dest", "kind": "categorical", "method": "jensenshannon", "score": 0.141, "threshold": 0.1, "drifted": True},
        {"column": "hour", "kind": "numeric", "method": "wasserstein", "score": 0.021, "threshold": 0.05, "drifted": False},
        {"column": "distance", "kind": "numeric", "method": "wasserstein", "score": 0.088, "threshold": 0.05, "drifted": True},
    ]
    return {
        "model": "flights_delay",
        "window": {"start": "2026-03-02T10:00:00+00:00", "end": "2026-03-02T11:00:00+00:00"},
        "checked_at": "2026-03-02T11:00:42+00:00",
        "version": 2,
        "status": "checked",
        "rows": {"reference": 20000, "current": 1874},
        "versions_seen": [2],
        "dataset_drift": True,
        "share": 0.5,
        "drift_share": 0.3,
        "drifted_columns": ["dest", "distance"],
        "columns": columns,
        "report": str(reports_root(config.monitoring, config.served_model) / folder / "report.html"),
        **changes,
    }


def write_report(config, folder: str = FOLDER, **changes) -> Path:
    path = reports_root(config.monitoring, config.served_model) / folder
    write_json(path / "summary.json", summary(config, folder, **changes))
    (path / "report.html").write_text("<html><body>Evidently report of dest</body></html>")
    return path


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def project(home):
    """The tabular project ``flights``."""
    return make_project(home)


@pytest.fixture
def text_project(home, project):
    """The text project ``reviews``, in the same deployment as ``flights``."""
    return make_text_project(home)


@pytest.fixture
def plugin_app():
    return oncall.create_app()


@pytest.fixture
def client(plugin_app, home, text_project, monkeypatch):
    """The plugin's app mounted as the api-server mounts it; the deployment (flights and reviews) in FLYWHEEL_HOME."""
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    root = FastAPI()
    root.mount(oncall.URL_PREFIX, plugin_app)
    return TestClient(root)


class Allowed(oncall.Access):
    """A logged-in user the auth manager lets read ``dags`` (every DAG when None)."""

    dags: set[str] | None = None

    def require(self, dag_id: str, method: str = "GET", entity=None) -> None:
        if self.dags is not None and dag_id not in self.dags:
            raise HTTPException(403, "Forbidden")


def log_in(plugin_app, dags: set[str] | None = None) -> None:
    class Caller(Allowed):
        pass

    Caller.dags = dags

    def caller(request: Request) -> oncall.Access:
        return Caller(request, "viewer")

    plugin_app.dependency_overrides = {oncall.access: caller}


@pytest.fixture
def logged_in(client, plugin_app):
    """As a user the auth manager lets read every DAG."""
    log_in(plugin_app)
    return client


# --- shaping ---------------------------------------------------------------------------------


def test_a_drift_row_carries_the_window_verdict_and_its_report_folder(project):
    row = data.drift_row(summary(project))

    assert row["report"] == FOLDER
    assert (row["window_start"], row["window_end"]) == ("2026-03-02T10:00:00+00:00", "2026-03-02T11:00:00+00:00")
    assert row["dataset_drift"] is True and (row["share"], row["drift_share"]) == (0.5, 0.3)
    assert row["drifted_columns"] == ["dest", "distance"] and row["columns_checked"] == 4
    assert (row["version"], row["rows_current"], row["rows_reference"]) == (2, 1874, 20000)


def test_a_summary_whose_report_is_not_in_a_report_folder_gets_no_link(project):
    assert data.drift_row(summary(project, report="/etc/passwd"))["report"] is None


def test_drifted_columns_come_first_in_the_order_they_were_checked(project):
    columns = [c["column"] for c in data.column_rows(summary(project))]

    assert columns == ["dest", "distance", "carrier", "hour"]


def test_gate_metrics_put_the_deciding_metric_first_and_show_a_missing_champion():
    first = data.gate_metrics({"metric": "roc_auc", "challenger": V1, "champion": None})
    second = data.gate_metrics({"metric": "roc_auc", "challenger": V2, "champion": V1})

    assert [m["metric"] for m in first] == ["roc_auc", "f1", "log_loss"]
    assert first[0] == {"metric": "roc_auc", "challenger": V1["roc_auc"], "champion": None, "base": None, "deciding": True}
    assert second[0]["challenger"] == V2["roc_auc"] and second[0]["champion"] == V1["roc_auc"]


def slice_entry(name: str, difference: float, half_width: float, refused: bool = False, rows: int = 400) -> dict:
    """A slice of the table ``pipelines.evaluation.gate.compare`` records."""
    return {
        "slice": name,
        "rows": rows,
        "challenger": 0.70 + difference,
        "champion": 0.70,
        "difference": difference,
        "interval": {"low": difference - half_width, "high": difference + half_width},
        "refused": refused,
        "skipped": None,
    }


SKIPPED = {
    "slice": "carrier=HA",
    "rows": 230,
    "challenger": None,
    "champion": None,
    "difference": None,
    "interval": None,
    "refused": False,
    "skipped": "only class 0 in its 230 rows: roc_auc is undefined",
}


def compared_gate(slices: list[dict], decision: str = NOT_PROMOTED, reason: str = "worse on carrier=UA") -> dict:
    """A tabular gate record as ``pipelines.evaluation.gate.evaluate`` now writes it: thresholds,
    the interval of the difference, the slices."""
    return {
        "decision": decision,
        "reason": reason,
        "metric": "roc_auc",
        "forced": False,
        "challenger": {**V3, "precision": 0.3012, "recall": 0.5520, "threshold": 0.3712, "threshold_source": "export"},
        "champion": {**V2, "precision": 0.2811, "recall": 0.5012, "threshold": 0.5, "threshold_source": "default"},
        "difference": 0.0059,
        "interval": {"low": 0.0012, "high": 0.0106},
        "confidence": 0.95,
        "resamples": 1000,
        "seed": 13,
        "method": "paired bootstrap, normal interval",
        "slice_confidence": 1 - 0.05 / len(slices) if slices else None,
        "slices": slices,
        "test_rows": 20000,
        "champion_version": 2,
    }


def test_a_gates_comparison_shows_refused_slices_first_then_the_nearest_to_a_refusal():
    slices = [
        slice_entry("carrier=AA", 0.05, 0.01),
        SKIPPED,
        slice_entry("carrier=UA", -0.09, 0.03, refused=True),
        *(slice_entry(f"dest=D{i}", 0.01 * i, 0.02) for i in range(6)),
        slice_entry("origin=EWR", -0.05, 0.02, refused=True),
    ]

    comparison = data.gate_comparison(compared_gate(slices))

    assert (comparison["difference"], comparison["low"], comparison["high"]) == (0.0059, 0.0012, 0.0106)
    assert (comparison["slices"], comparison["refused"], comparison["skipped"]) == (10, 2, 1)
    shown = [s["slice"] for s in comparison["shown"]]
    assert shown == ["carrier=UA", "origin=EWR", "dest=D0", "dest=D1", "dest=D2"]  # refused by upper bound, then the nearest
    assert [s["slice"] for s in comparison["more"]][-1] == "carrier=HA"  # skipped last, with the reason
    assert comparison["more"][-1]["skipped"].startswith("only class 0") and comparison["shown"][0]["high"] == pytest.approx(-0.06)


def test_every_refused_slice_is_shown_however_many():
    slices = [slice_entry(f"dest=D{i}", -0.1, 0.02, refused=True) for i in range(data.SLICES_SHOWN + 2)]

    comparison = data.gate_comparison(compared_gate(slices))

    assert len(comparison["shown"]) == data.SLICES_SHOWN + 2 and comparison["more"] == []


def test_a_gate_without_an_interval_has_no_comparison_and_a_thresholds_source_is_no_metric():
    assert data.gate_comparison({"metric": "roc_auc", "challenger": V1, "champion": None}) is None
    assert data.gate_comparison({"metric": "roc_auc", "challenger": V1, "champion": None, "interval": None, "slices": []}) is None

    gate = compared_gate([])
    metrics = data.gate_metrics(gate)

    assert [m["metric"] for m in metrics] == ["roc_auc", "f1", "log_loss", "precision", "recall", "threshold"]
    assert metrics[-1]["challenger"] == 0.3712 and data.threshold_sources(gate) == {"challenger": "export", "champion": "default"}


def test_a_text_gate_shows_the_untuned_base_beside_challenger_and_champion():
    metrics = data.gate_metrics({"metric": "accuracy", "challenger": TEXT_V2, "champion": TEXT_V1, "base": TEXT_BASE})

    assert [m["metric"] for m in metrics] == ["accuracy", "f1_macro"]
    assert metrics[0] == {
        "metric": "accuracy", "challenger": TEXT_V2["accuracy"], "champion": TEXT_V1["accuracy"], "base": TEXT_BASE["accuracy"], "deciding": True,
    }


def test_a_version_row_says_whether_it_serves_and_why_it_was_rejected():
    lineage = {
        "gate": {"decision": "promoted", "reason": "beats", "metric": "roc_auc", "challenger": V2, "champion": V1, "champion_version": 1},
        "airflow": {"dag_id": "retrain__flights", "run_id": "manual__1", "run_type": "manual", "trigger": {"kind": "manual"}},
        "data_version": {"data/flights/raw.parquet": "abc"},
        "code_version": "0123456789abcdef-dirty",
        "created_at": "2026-03-01T11:21:40+00:00",
        "status": "rejected",
        "rejected_reason": REJECTED_REASON,
    }

    row = data.version_row(3, lineage, served=2)

    assert row["serving"] is False and row["status"] == "rejected" and row["rejected_reason"] == REJECTED_REASON
    assert (row["run_id"], row["trigger"], row["champion_version"], row["dag_id"]) == ("manual__1", "manual", 1, "retrain__flights")
    assert row["base_model"] is None
    assert data.version_row(2, {k: v for k, v in lineage.items() if "rejected" not in k and k != "status"}, served=2)["status"] == "published"
    assert data.version_row(2, lineage, served=2)["serving"] is True


def test_a_text_version_row_names_the_checkpoint_it_was_fine_tuned_from():
    lineage = {"base_model": {"name": BASE_MODEL, "sha256": "0" * 64}, "gate": {"metric": "accuracy", "challenger": TEXT_V1, "base": TEXT_BASE}}

    row = data.version_row(1, lineage, served=1)

    assert row["base_model"] == BASE_MODEL and row["metric"] == "accuracy" and row["metrics"][0]["base"] == TEXT_BASE["accuracy"]


MLFLOW = "http://127.0.0.1:5000"


def tracked(status: str = "logged", run_id: str = "0f3a9c1d2b", url: str | None = None, detail: str | None = None) -> dict:
    """A ``tracking`` record as ``pipelines.tracking.open_run`` writes it and publish copies into a lineage."""
    logged = status == "logged"
    return {
        "status": status,
        "store": MLFLOW if logged else "sqlite:////home/artifacts/candidates/flights_delay/c1/mlflow/mlflow.db",
        "run_id": run_id,
        "experiment_id": "3",
        "url": url if url is not None or not logged else f"{MLFLOW}/#/experiments/3/runs/{run_id}",
        "detail": detail or (f"MLflow at {MLFLOW}" if logged else f"tracking server unavailable (GET {MLFLOW}/health failed: [Errno 111] Connection refused)"),
    }


def test_the_plugins_tracking_statuses_are_pipelines_own():
    from pipelines import tracking

    assert (data.LOGGED, data.LOCAL, data.OFF) == (tracking.LOGGED, tracking.LOCAL, tracking.OFF)


def test_a_version_row_links_its_mlflow_run_when_it_was_logged_to_the_server():
    row = data.version_row(2, {"tracking": tracked()}, served=2)

    assert row["tracking"] == {
        "status": "logged", "url": f"{MLFLOW}/#/experiments/3/runs/0f3a9c1d2b", "run_id": "0f3a9c1d2b", "experiment_id": "3", "detail": f"MLflow at {MLFLOW}",
    }


def test_a_run_tracked_locally_has_no_link_and_says_why():
    row = data.version_row(2, {"tracking": tracked("local")}, served=2)

    assert row["tracking"]["status"] == "local" and row["tracking"]["url"] is None and row["tracking"]["run_id"] == "0f3a9c1d2b"
    assert "Connection refused" in row["tracking"]["detail"]


@pytest.mark.parametrize("lineage", [{}, {"tracking": None}, {"tracking": tracked("off", run_id=None, detail="tracking.uri is null: not tracked")}])
def test_a_version_not_tracked_has_no_mlflow_run(lineage):
    assert data.version_row(1, lineage, served=2)["tracking"] is None


@pytest.mark.parametrize("url", ["javascript:alert(1)", "file:///etc/passwd", "//elsewhere.example/run", "", None])
def test_only_an_http_url_of_a_logged_run_becomes_a_link(url):
    record = {**tracked(), "url": url}

    shaped = data.tracking_link(record)

    assert shaped is not None and shaped["url"] is None and shaped["run_id"] == "0f3a9c1d2b"  # still named, never linked
    assert data.tracking_link({**tracked("local"), "url": f"{MLFLOW}/#/experiments/3/runs/x"})["url"] is None  # a local store has no page there


def test_a_refused_challengers_run_row_links_its_mlflow_run():
    record = {"gate": {"decision": NOT_PROMOTED, "reason": "roc_auc 0.6120 does not beat the champion's 0.7043 by 0.002"}, "tracking": tracked(run_id="9e8d")}

    row = data.run_row(record)

    assert row["decision"] == NOT_PROMOTED and row["tracking"]["url"] == f"{MLFLOW}/#/experiments/3/runs/9e8d"
    assert data.run_row({"gate": {"decision": PROMOTED}})["tracking"] is None


def test_the_serving_history_is_newest_first_and_a_torn_line_is_shown_not_hidden():
    lines = [
        json.dumps({"time": "2026-03-01T02:14:10+00:00", "event": "publish", "version": 1, "previous": None, "run_id": "a"}),
        "",
        json.dumps({"time": "2026-03-01T11:21:41+00:00", "event": "publish", "version": 2, "previous": 1, "run_id": "b", "switch_seconds": 1.2}),
        '{"time": "2026-03-01T16:',
    ]

    events = data.history_rows(lines)

    assert [e["event"] for e in events] == ["unreadable", "publish", "publish"]
    assert "line 4" in events[0]["reason"]
    assert (events[1]["version"], events[1]["previous"], events[1]["switch_seconds"]) == (2, 1, 1.2)


def test_a_projects_pages_are_guarded_by_the_dags_of_its_kind():
    assert data.dag_ids("flights", "tabular") == {"models": "retrain__flights", "drift": "drift__flights"}
    assert data.dag_ids("reviews", "text") == {"models": "finetune__reviews", "drift": "drift__reviews"}


def test_an_index_row_shows_only_what_the_callers_pages_would(project):
    latest = summary(project)

    full = data.project_row("flights", "tabular", models=True, drift=True, served_model="flights_delay", served_version=2, latest=latest)
    drift_only = data.project_row("flights", "tabular", models=False, drift=True, served_model="flights_delay", served_version=2, latest=latest)
    models_only = data.project_row("flights", "tabular", models=True, drift=False, served_model="flights_delay", served_version=2, latest=latest)

    assert full["served_version"] == 2
    assert full["latest_drift"] == {"report": FOLDER, "window_end": "2026-03-02T11:00:00+00:00", "dataset_drift": True, "share": 0.5, "drift_share": 0.3}
    assert drift_only["served_version"] is None and drift_only["latest_drift"]["share"] == 0.5
    assert models_only["served_version"] == 2 and models_only["latest_drift"] is None


# --- loaders -----------------------------------------------------------------------------------


def test_the_models_view_reads_versions_history_and_runs_from_the_project(project):
    write_versions(project)

    view = data.load_models(project)

    assert (view["project"], view["kind"], view["model"], view["served_version"]) == ("flights", "tabular", "flights_delay", 2)
    assert view["gate"] == {"metric": "roc_auc", "min_improvement": 0.002, "floor": 0.5, "confidence": 0.95, "max_slice_regression": 0.02}
    assert "finetune" not in view
    assert all(v["comparison"] is None for v in view["versions"])  # recorded before the gate tested significance
    assert [(v["version"], v["serving"], v["status"]) for v in view["versions"]] == [(3, False, "rejected"), (2, True, "published"), (1, False, "published")]
    assert [(e["event"], e["version"]) for e in view["history"]] == [("rejected", 3), ("publish", 2), ("publish", 1)]
    assert view["runs"][0]["decision"] == NOT_PROMOTED and view["runs"][0]["version"] is None
    assert len(view["runs"]) == 4


def test_the_models_view_of_a_text_project_reads_its_ensembles_versions_and_finetune_runs(text_project):
    write_text_versions(text_project)

    view = data.load_models(text_project)

    assert (view["project"], view["kind"], view["model"], view["served_version"]) == ("reviews", "text", "reviews_sentiment", 2)
    assert view["finetune"] == {"min_gain_over_base": 0.02, "min_improvement": 0.0} and "gate" not in view
    assert [(v["version"], v["serving"], v["decision"], v["metric"]) for v in view["versions"]] == [(2, True, PROMOTED, "accuracy"), (1, False, PROMOTED, "accuracy")]
    assert view["versions"][0]["run_id"] == TEXT_V2_RUN and view["versions"][0]["dag_id"] == "finetune__reviews"
    assert view["versions"][0]["metrics"][0] == {
        "metric": "accuracy", "challenger": TEXT_V2["accuracy"], "champion": TEXT_V1["accuracy"], "base": TEXT_BASE["accuracy"], "deciding": True,
    }
    assert [(e["event"], e["version"], e["previous"]) for e in view["history"]] == [("publish", 2, 1), ("publish", 1, None)]
    assert [(r["decision"], r["version"], r["live"]) for r in view["runs"]] == [(NOT_PROMOTED, None, None), (PROMOTED, 2, "publish"), (PROMOTED, 1, "publish")]


def test_a_text_projects_drift_view_reads_its_served_models_reports(text_project):
    view = data.load_drift(text_project, 50)

    assert view["reports"] == [] and view["kind"] == "text"
    assert view["model"] == "reviews_sentiment" and view["reports_dir"].endswith("reports/drift/reviews_sentiment")


def test_the_index_lists_each_readable_project_with_its_served_version_and_latest_drift(project, text_project, home):
    write_versions(project)
    write_text_versions(text_project)
    write_report(project)

    view = data.load_index(home, lambda dag_id: True)
    rows = {row["name"]: row for row in view["projects"]}

    assert list(rows) == ["flights", "reviews"]
    assert (rows["flights"]["kind"], rows["flights"]["served_model"], rows["flights"]["served_version"]) == ("tabular", "flights_delay", 2)
    assert rows["flights"]["latest_drift"]["share"] == 0.5 and rows["flights"]["latest_drift"]["dataset_drift"] is True
    assert (rows["reviews"]["kind"], rows["reviews"]["served_model"], rows["reviews"]["served_version"]) == ("text", "reviews_sentiment", 2)
    assert rows["reviews"]["latest_drift"] is None


def test_the_index_leaves_out_projects_the_caller_may_not_read_and_shows_a_broken_one(project, text_project, home):
    broken = home / "projects" / "broken"
    broken.mkdir()
    (broken / "params.yaml").write_text("kind: tabular\ngate: {metric: roc_auc}\n")

    view = data.load_index(home, lambda dag_id: dag_id in {"retrain__flights", "retrain__broken"})
    rows = {row["name"]: row for row in view["projects"]}

    assert list(rows) == ["broken", "flights"]
    assert rows["flights"]["models"] is True and rows["flights"]["drift"] is False and rows["flights"]["latest_drift"] is None
    assert "ConfigError" in rows["broken"]["error"] and "params.yaml" in rows["broken"]["error"]


# --- names only: projects and reports ------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["..", "../" + FOLDER, FOLDER + "/..", FOLDER + "/../..", "/etc", "%2e%2e", "20260302T110000", FOLDER + "\n", "", ".20260302T110000Z.partial"],
)
def test_a_report_is_named_by_its_folder_and_nothing_else(project, name):
    write_report(project)

    with pytest.raises(data.NotFound):
        data.report_dir(reports_root(project.monitoring, project.served_model), name)


def test_a_report_folder_that_links_outside_the_reports_dir_is_refused(project, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "report.html").write_text("secret")
    reports_root(project.monitoring, project.served_model).mkdir(parents=True)
    (reports_root(project.monitoring, project.served_model) / FOLDER).symlink_to(outside)

    with pytest.raises(data.NotFound):
        data.report_html(project, FOLDER)


def test_a_report_folder_resolves_inside_the_reports_dir(project):
    folder = write_report(project)

    assert data.report_dir(reports_root(project.monitoring, project.served_model), FOLDER) == folder.resolve()


@pytest.mark.parametrize(
    "path",
    [
        "projects/flights/drift/..%2F..%2F..%2Fprojects%2Fflights%2Fparams.yaml/report.html",
        "projects/flights/drift/%2e%2e/report.html",
        "projects/flights/drift/..%2Fsummary.json",
        "api/projects/flights/drift/..%2F..",
        "projects/flights/drift/20990101T000000Z/report.html",
    ],
)
def test_paths_that_are_not_a_report_get_404(logged_in, project, path):
    write_report(project)

    response = logged_in.get(f"/flywheel/{path}")

    assert response.status_code == 404
    assert "arr_delayed" not in response.text  # nothing of params.yaml


@pytest.mark.parametrize(
    ("name", "routed"),
    [
        ("nope", True), ("Flights", True), ("flights_", True), ("_flights", True), ("flights.yaml", True),
        ("flights%00", True), ("%2e%2e", True),  # decoded to "..": reaches the app, refused by name
        ("..", False), ("..%2F..%2Fprojects%2Fflights", False),  # no route takes them: a plain 404
    ],
)
def test_a_project_is_named_by_its_name_and_an_unknown_one_lists_the_known(logged_in, name, routed):
    for path in (f"projects/{name}/models", f"api/projects/{name}/drift", f"projects/{name}/drift/{FOLDER}/report.html"):
        response = logged_in.get(f"/flywheel/{path}")

        assert response.status_code == 404, path
        detail = response.json()["detail"]
        assert ("the projects are ['flights', 'reviews']" in detail) if routed else detail == "Not Found"
        assert "arr_delayed" not in response.text


def test_an_unknown_project_is_a_404_that_names_the_known_ones(logged_in):
    response = logged_in.get("/flywheel/api/projects/taxis/models")

    assert response.status_code == 404
    assert "no project 'taxis'" in response.json()["detail"] and "['flights', 'reviews']" in response.json()["detail"]


# --- over HTTP ---------------------------------------------------------------------------------

ROUTES = [
    "projects",
    "api/projects",
    "projects/flights/drift",
    f"projects/flights/drift/{FOLDER}",
    f"projects/flights/drift/{FOLDER}/report.html",
    "projects/flights/models",
    "api/projects/flights/drift",
    f"api/projects/flights/drift/{FOLDER}",
    "api/projects/flights/models",
    "projects/reviews/models",
    "projects/reviews/drift",
    "api/projects/reviews/models",
    "projects/flights/timeline",
    f"api/projects/flights/timeline?window={FOLDER}",
    "static/plotly.min.js",
    "projects/nope/models",  # an unknown project: 401 first, nothing about the projects
]


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_refuses_a_caller_without_a_token(client, project, route):
    write_report(project)

    response = client.get(f"/flywheel/{route}")

    assert response.status_code == 401
    assert response.json() == {"detail": "Not authenticated"}


def test_the_auth_manager_decides_per_project_dag_who_reads_what(client, project, text_project, home, monkeypatch):
    from airflow.api_fastapi.core_api import security

    make_project(home, {"model": {"name": "taxis_delay"}}, name="taxis")  # nothing of it readable
    allowed = {"drift__flights", "finetune__reviews"}
    asked = []

    class PerDagManager:
        def is_authorized_dag(self, *, method, access_entity=None, details, user):
            asked.append((method, details.id, user))
            return details.id in allowed

    async def viewer(request, _oauth_token=None, bearer_credentials=None):
        return "viewer"

    monkeypatch.setattr(security, "get_user", viewer)
    monkeypatch.setattr(security, "get_auth_manager", PerDagManager)
    monkeypatch.setattr(security.DagModel, "get_team_name", staticmethod(lambda dag_id: None))
    write_versions(project)
    write_text_versions(text_project)
    write_report(project)

    assert client.get("/flywheel/api/projects/flights/drift").status_code == 200
    assert client.get("/flywheel/projects/flights/models").status_code == 403
    assert client.get("/flywheel/api/projects/reviews/models").status_code == 200
    assert client.get("/flywheel/projects/reviews/drift").status_code == 403
    assert asked == [
        ("GET", "drift__flights", "viewer"), ("GET", "retrain__flights", "viewer"),
        ("GET", "finetune__reviews", "viewer"), ("GET", "drift__reviews", "viewer"),
    ]

    rows = {row["name"]: row for row in client.get("/flywheel/api/projects").json()["projects"]}

    assert list(rows) == ["flights", "reviews"]  # taxis: neither of its DAGs is readable
    assert (rows["flights"]["served_version"], rows["flights"]["latest_drift"]["share"]) == (None, 0.5)
    assert (rows["reviews"]["served_version"], rows["reviews"]["latest_drift"]) == (2, None)
    index = client.get("/flywheel/projects").text
    assert 'href="/flywheel/projects/flights/drift"' in index and 'href="/flywheel/projects/flights/models"' not in index
    assert 'href="/flywheel/projects/reviews/models"' in index and 'href="/flywheel/projects/reviews/drift"' not in index
    assert "taxis" not in index


def test_the_index_page_links_each_projects_pages_under_the_mount_prefix(logged_in, project, text_project):
    write_versions(project)
    write_text_versions(text_project)
    write_report(project)

    page = logged_in.get("/flywheel/projects").text

    for name in ("flights", "reviews"):
        assert f'href="/flywheel/projects/{name}/drift"' in page and f'href="/flywheel/projects/{name}/models"' in page
    assert "flights_delay" in page and "reviews_sentiment" in page
    assert "0.50" in page and "no checked window yet" in page
    assert logged_in.get("/flywheel/", follow_redirects=False).headers["location"] == "/flywheel/projects"


def test_the_drift_pages_link_each_report_under_the_mount_prefix(logged_in, project):
    write_report(project)

    page = logged_in.get("/flywheel/projects/flights/drift").text
    detail = logged_in.get(f"/flywheel/projects/flights/drift/{FOLDER}").text

    assert f'href="/flywheel/projects/flights/drift/{FOLDER}/report.html"' in page
    assert f'href="/flywheel/projects/flights/drift/{FOLDER}"' in page
    assert 'href="/flywheel/projects"' in page and 'href="/flywheel/projects/flights/models"' in page
    assert "dest, distance" in page and "0.50" in page
    assert detail.index("dest") < detail.index("carrier")  # drifted first


def test_a_calibrated_windows_page_shows_each_columns_p_value_missing_share_and_why(logged_in, project):
    reason = "100.0% missing or non-finite against 0.0% in the reference (p<1e-16)"
    columns = [
        {"column": "carrier", "kind": "categorical", "method": "jensenshannon", "score": 0.021, "threshold": 0.035, "p_value": 0.4136,
         "missing_share": 0.0, "reference_missing_share": 0.0, "drifted": False, "reason": None},
        {"column": "distance", "kind": "numeric", "method": "wasserstein", "score": None, "threshold": None, "p_value": 0.0,
         "missing_share": 1.0, "reference_missing_share": 0.0, "drifted": True, "reason": reason},
    ]
    write_report(project, columns=columns, drifted_columns=["distance"], false_alarm_rate=0.01, dataset_test={"m": 1, "level": 0.005})

    detail = " ".join(logged_in.get(f"/flywheel/projects/flights/drift/{FOLDER}").text.split())

    assert html.escape(reason) in detail and "0.4136" in detail and "100.0% / 0.0%" in detail
    assert "it drifts at or below 0.010" in detail and "Dataset drift when 1 or more columns have a p-value at most 0.00500" in detail


def test_evidentlys_report_is_served_in_a_sandbox_of_its_own(logged_in, project):
    write_report(project)

    response = logged_in.get(f"/flywheel/projects/flights/drift/{FOLDER}/report.html")

    assert response.status_code == 200 and "Evidently report of dest" in response.text
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"] == "sandbox allow-scripts"


def test_values_from_served_requests_are_escaped_in_the_pages(logged_in, project):
    hostile = '<img src=x onerror="alert(1)">'
    columns = [{"column": hostile, "kind": "categorical", "method": "jensenshannon", "score": 0.2, "threshold": 0.1, "drifted": True}]
    write_report(project, drifted_columns=[hostile], columns=columns)

    for path in ("projects/flights/drift", f"projects/flights/drift/{FOLDER}"):
        html = logged_in.get(f"/flywheel/{path}").text
        assert hostile not in html and "&lt;img src=x onerror=" in html


def test_the_models_page_shows_the_served_version_and_both_metrics(logged_in, project):
    write_versions(project)

    html = logged_in.get("/flywheel/projects/flights/models").text

    assert '<div class="value" id="served-version">version 2</div>' in html
    assert f"{V2['roc_auc']:.4f}" in html and f"{V1['roc_auc']:.4f}" in html and "champion (v1)" in html
    assert REJECTED_REASON in html and "Latest retrain runs" in html


def test_the_models_page_shows_the_interval_of_the_difference_and_the_slices(logged_in, project):
    from pipelines.serving import repository

    write_versions(project)
    hostile = '<img src=x onerror="alert(1)">'
    slices = [slice_entry("carrier=AA", 0.03, 0.01), SKIPPED, slice_entry("carrier=UA", -0.0912, 0.03, refused=True), slice_entry(hostile, 0.01, 0.02)]
    slices += [slice_entry(f"dest=D{i}", 0.02, 0.01) for i in range(4)]
    gate = compared_gate(slices, reason="roc_auc 0.7102 vs the champion's 0.7043: +0.0059 [0.0012, 0.0106]; but worse on carrier=UA")
    lineage = {"gate": gate, "airflow": {"dag_id": "retrain__flights", "run_id": "manual__sliced", "run_type": "manual"}, "created_at": "2026-03-03T10:00:00+00:00"}
    repository.add_version(project.model_dir, {}, lineage)

    html = logged_in.get("/flywheel/projects/flights/models").text

    assert "difference <strong>+0.0059 [0.0012, 0.0106]</strong>" in html and "95%, 1000 paired resamples" in html
    assert 'class="refused"' in html and "carrier=UA" in html and "-0.0912 [-0.1212, -0.0612]" in html
    assert html.index("carrier=UA") < html.index("carrier=AA")  # the refused slice first
    assert "8 slices" in html and "1 worse beyond noise" in html and "1 skipped" in html
    assert "skipped: only class 0 in its 230 rows: roc_auc is undefined" in html and "<details>" in html
    assert "[99.38%]" in html  # the slices' Bonferroni level
    assert hostile not in html and "&lt;img src=x onerror=" in html
    assert "lower bound of the 95% interval" in html  # the rule, in the lead
    assert html.count('0.5000 <span class="muted"') == 1  # the champion's threshold is the default


def test_the_models_page_links_each_tracked_version_and_run_to_its_mlflow_run(logged_in, project):
    from pipelines.artifacts import LINEAGE_FILE
    from pipelines.serving.publish import run_record_path, run_records

    write_versions(project)
    track = {2: tracked(run_id="a1b2"), 1: tracked("local", run_id="c3d4")}
    for version, record in track.items():
        path = project.served_model_dir / str(version) / LINEAGE_FILE
        write_json(path, {**json.loads(path.read_text()), "tracking": record})
    refused = next(r for r in run_records(project.artifacts_dir) if r["gate"]["decision"] == NOT_PROMOTED)
    write_json(run_record_path(project.artifacts_dir, refused["airflow"]["run_id"]), {**refused, "tracking": tracked(run_id="e5f6")})

    page = logged_in.get("/flywheel/projects/flights/models").text

    versions, runs = page[page.index('id="versions"') : page.index('id="history"')], page[page.index('id="runs"') :]
    link = f'<a class="mlflow-link" href="{MLFLOW}/#/experiments/3/runs/a1b2" target="_blank" rel="noopener" title="MLflow at {MLFLOW}">MLflow run</a>'
    assert link in versions and versions.count('class="mlflow-link"') == 1
    served = versions.split('<tr class="serving">')[1].split('<tr class="">')[0]  # up to version 1's row
    assert link in served  # the served version's row
    assert f'title="{html.escape(track[1]["detail"])}">tracked locally (server unavailable)</span>' in versions  # why, as its tooltip
    assert f'href="{MLFLOW}/#/experiments/3/runs/e5f6"' in runs and runs.count('class="mlflow-link"') == 1  # the refused challenger's run
    assert '<script src="/flywheel/static/links.js"></script>' in page  # follows it out of Airflow's sandboxed iframe


def test_a_tracking_url_that_is_not_http_is_shown_as_text_never_as_a_link(logged_in, project):
    from pipelines.artifacts import LINEAGE_FILE

    write_versions(project)
    hostile = 'javascript:alert("x")'
    path = project.served_model_dir / "2" / LINEAGE_FILE
    write_json(path, {**json.loads(path.read_text()), "tracking": {**tracked(run_id="<b>r</b>"), "url": hostile}})

    page = logged_in.get("/flywheel/projects/flights/models").text

    assert "javascript:" not in page and 'class="mlflow-link"' not in page
    assert "MLflow: logged" in page and "&lt;b&gt;r&lt;/b&gt;" in page and "<b>r</b>" not in page


# --- the performance chart of the Models page ----------------------------------------------------

DAY_1 = datetime(2026, 3, 1, tzinfo=timezone.utc)


def performance_summary(day: int, *, version: int = 2, realized: float | None = 0.7012, degraded: bool = False, estimated: float | None = 0.6990, labelled: int = 1800) -> dict:
    """The summary.json of the daily window ``day`` (1: March 1st) as
    ``pipelines.feedback.performance.evaluate_window`` writes it (spec of issue 14)."""
    start = DAY_1 + timedelta(days=day - 1)
    test = {2: V2["roc_auc"], 3: V3["roc_auc"]}[version]
    checked = realized is not None
    return {
        "project": "flights",
        "model": "flights_delay",
        "version": version,
        "start": start.isoformat(),
        "end": (start + timedelta(days=1)).isoformat(),
        "status": "checked" if checked else "no_verdict",
        "reason": None if checked else f"{labelled} labelled rows, fewer than performance.min_labels 200",
        "rows": 2000,
        "labelled": labelled,
        "label_coverage": labelled / 2000,
        "metric": "roc_auc",
        "realized": {"value": realized, "interval": [realized - 0.021, realized + 0.020], "confidence": 0.95} if checked else None,
        "estimated": {"value": estimated, "method": "CBPE", "rows": 2000} if estimated is not None else {"value": None, "reason": "version 2 has no performance_reference.parquet"},
        "test": {"value": test, "se": 0.004},
        "difference": {"value": realized - test, "upper": realized - test + 0.02, "p_value": 0.0003 if degraded else 0.41, "false_alarm_rate": 0.01, "min_drop": 0.0} if checked else None,
        "degraded": degraded,
        "calibration_error": 0.012 if checked else None,
        "prediction_bias": {"mean_prediction": 0.21, "observed": 0.2, "difference": 0.01} if checked else None,
        "checked_at": (start + timedelta(days=2)).isoformat(),
    }


def write_performance(config, *summaries: dict) -> Path:
    root = data.performance_root(config)
    for s in summaries:
        write_json(root / datetime.fromisoformat(s["end"]).strftime("%Y%m%dT%H%M%SZ") / "summary.json", s)
    return root


WINDOWS = (  # three healthy days of version 2, version 3 degraded on day 4, day 5 without its labels yet
    performance_summary(1),
    performance_summary(2, realized=0.6975, estimated=0.7021),
    performance_summary(3, realized=0.7030, estimated=0.6950),
    performance_summary(4, version=3, realized=0.6412, degraded=True, estimated=0.7001),
    performance_summary(5, version=3, realized=None, estimated=0.6870, labelled=150),
)


def chart_of(page: str) -> dict[str, dict]:
    """The traces of the page's performance chart (the plotly figure it embeds), by name."""
    match = re.search(r'<script type="application/json" class="plotly-figure" data-target="performance-chart">(.*?)</script>', page, re.S)
    assert match, "no performance chart in the page"
    figure = json.loads(match.group(1))
    return {"layout": figure["layout"], **{trace.get("name", f"unnamed {i}"): trace for i, trace in enumerate(figure["data"])}}


def test_a_performance_window_reads_realized_estimated_and_the_verdict_from_its_summary():
    degraded = data.performance_window(performance_summary(4, version=3, realized=0.6412, degraded=True))
    unlabelled = data.performance_window({**performance_summary(5, realized=None, estimated=None, labelled=150), "label_coverage": float("nan")})

    assert (degraded["realized"], degraded["realized_low"], degraded["realized_high"]) == (0.6412, pytest.approx(0.6202), pytest.approx(0.6612))
    assert (degraded["test"], degraded["version"], degraded["degraded"], degraded["p_value"], degraded["estimated_method"]) == (V3["roc_auc"], 3, True, 0.0003, "CBPE")
    assert unlabelled["realized"] is None and unlabelled["estimated"] is None and unlabelled["label_coverage"] is None
    assert unlabelled["estimated_reason"] == "version 2 has no performance_reference.parquet" and "fewer than performance.min_labels" in unlabelled["reason"]
    with pytest.raises(KeyError):
        data.performance_window({"metric": "roc_auc", "end": "2026-03-02T00:00:00+00:00"})


def test_the_models_page_charts_realized_and_estimated_performance_per_window(logged_in, project):
    write_versions(project)
    write_performance(project, *WINDOWS)

    page = logged_in.get("/flywheel/projects/flights/models").text
    chart = chart_of(page)

    realized, degraded = chart["realized roc_auc (interval)"], chart["realized roc_auc, degraded"]
    assert realized["y"] == [0.7012, 0.6975, 0.7030] and degraded["y"] == [0.6412]  # day 5 has no realized value yet
    assert degraded["x"] == ["2026-03-05 00:00:00"] and degraded["hovertext"][0].endswith("degraded") and "v3" in degraded["hovertext"][0]
    assert degraded["error_y"]["arrayminus"][0] == pytest.approx(0.021) and degraded["error_y"]["array"][0] == pytest.approx(0.020)
    assert chart["estimated roc_auc (CBPE)"]["y"] == [0.6990, 0.7021, 0.6950, 0.7001, 0.6870]
    test = chart["test roc_auc of the serving version"]
    assert test["y"] == [V2["roc_auc"]] * 3 + [V3["roc_auc"]] * 2 and test["line"]["shape"] == "hv"
    assert degraded["y"][0] < V3["roc_auc"]  # below its version's test metric
    assert chart["layout"]["yaxis"]["title"]["text"] == "roc_auc" and chart["layout"]["xaxis"]["title"]["text"] == "window end (UTC)"
    last = " ".join(page[page.index('id="performance-last"') :].split("</p>")[0].split())
    assert "150 of 2000 requests labelled (8%)" in last and "no verdict: 150 labelled rows, fewer than performance.min_labels 200" in last
    assert "Latest realized value: window ending 2026-03-05 00:00:00 UTC (version 3), 0.6412 [0.6202, 0.6612]" in last
    assert '<script src="/flywheel/static/plotly.min.js?v=' in page and "http://" not in page and "https://" not in page  # no CDN
    assert "<svg" not in page


def test_without_performance_summaries_the_models_page_says_so(logged_in, project, text_project):
    write_versions(project)
    write_text_versions(text_project)

    page = logged_in.get("/flywheel/projects/flights/models").text
    text_page = logged_in.get("/flywheel/projects/reviews/models").text

    assert 'id="no-performance"' in page and "plotly-figure" not in page and "plotly.min.js" not in page and str(data.performance_root(project)) in page
    assert "Performance in production" not in text_page  # text projects have no performance check
    assert logged_in.get("/flywheel/api/projects/flights/models").json()["performance"]["windows"] == []


def test_a_window_with_a_realized_value_but_no_verdict_is_not_called_healthy(logged_in, project):
    reason = "version 2 has no test roc_auc to compare with (no performance_reference.parquet, none in its lineage)"
    write_performance(project, {**performance_summary(1), "status": "no_verdict", "reason": reason, "test": {"value": None, "se": None}, "difference": None})

    page = logged_in.get("/flywheel/projects/flights/models").text

    (hover,) = chart_of(page)["realized roc_auc (interval)"]["hovertext"]
    assert hover.endswith(f"no verdict: {reason}")
    assert "not degraded" not in page and f"no verdict: {reason}" in page


def test_a_torn_performance_summary_is_named_and_the_other_windows_still_charted(logged_in, project):
    root = write_performance(project, *WINDOWS[:2])
    (root / "20260304T000000Z").mkdir()
    (root / "20260304T000000Z" / "summary.json").write_text('{"project": "flights", "start": "2026-03-')

    page = logged_in.get("/flywheel/projects/flights/models").text

    assert len(chart_of(page)["realized roc_auc (interval)"]["y"]) == 2
    assert 'id="performance-unreadable"' in page and "20260304T000000Z/summary.json: JSONDecodeError" in page


def test_the_models_page_of_a_text_project_shows_its_versions_the_base_and_the_finetune_margins(logged_in, text_project):
    write_text_versions(text_project)

    html = logged_in.get("/flywheel/projects/reviews/models").text

    assert '<div class="value" id="served-version">version 2</div>' in html
    assert TEXT_V2_RUN in html and BASE_MODEL in html and "finetune__reviews" in html
    assert f"{TEXT_V2['accuracy']:.4f}" in html and f"{TEXT_BASE['accuracy']:.4f}" in html and '<th class="num">base</th>' in html
    assert "min_gain_over_base" in html and "0.020" in html and "Latest finetune runs" in html


def test_the_drift_page_of_a_text_project_says_no_window_was_checked_yet(logged_in, text_project):
    response = logged_in.get("/flywheel/projects/reviews/drift")

    assert response.status_code == 200 and 'id="no-window"' in response.text and "started by a person" in response.text
    assert logged_in.get("/flywheel/api/projects/reviews/drift").json()["reports"] == []


def test_without_projects_the_index_says_what_to_set(logged_in, monkeypatch, tmp_path):
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "nowhere"))

    index = logged_in.get("/flywheel/projects")
    project = logged_in.get("/flywheel/api/projects/flights/drift")

    assert index.status_code == 200 and "FLYWHEEL_HOME" in index.text and str(tmp_path / "nowhere" / "projects") in index.text
    assert project.status_code == 404 and "FLYWHEEL_HOME" in project.json()["detail"]


def test_a_project_whose_params_cannot_be_read_is_a_503_that_names_the_file(logged_in, home):
    (home / "projects" / "flights" / "params.yaml").write_text("kind: tabular\ngate: {metric: roc_auc}\n")

    response = logged_in.get("/flywheel/api/projects/flights/models")

    assert response.status_code == 503 and "projects/flights/params.yaml" in response.json()["detail"]
