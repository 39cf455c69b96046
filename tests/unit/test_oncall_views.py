"""The on-call plugin without a server: how drift summaries, lineage and the serving history are
shaped for the pages, that a report is served only from the reports folder, and that every
route refuses a caller without an Airflow login."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pipelines.evaluation.gate import NOT_PROMOTED
from pipelines.lineage import write_json
from pipelines.monitoring.check import reports_root
from tests.browser.oncall_project import REJECTED_REASON, V1, V2, write_versions
from tests.conftest import REPO

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
        "report": str(reports_root(config) / folder / "report.html"),
        **changes,
    }


def write_report(config, folder: str = FOLDER, **changes) -> Path:
    path = reports_root(config) / folder
    write_json(path / "summary.json", summary(config, folder, **changes))
    (path / "report.html").write_text("<html><body>Evidently report of dest</body></html>")
    return path


@pytest.fixture
def plugin_app():
    return oncall.create_app()


@pytest.fixture
def client(plugin_app, project, monkeypatch):
    """The plugin's app mounted as the api-server mounts it, the project in FLYWHEEL_HOME."""
    monkeypatch.setenv("FLYWHEEL_HOME", str(project.home))
    root = FastAPI()
    root.mount(oncall.URL_PREFIX, plugin_app)
    return TestClient(root)


@pytest.fixture
def logged_in(client, plugin_app):
    """As a user the auth manager lets read the drift and retrain DAGs."""
    plugin_app.dependency_overrides = {oncall.can_read_drift: lambda: None, oncall.can_read_retrain: lambda: None}
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
    assert first[0] == {"metric": "roc_auc", "challenger": V1["roc_auc"], "champion": None, "deciding": True}
    assert second[0]["challenger"] == V2["roc_auc"] and second[0]["champion"] == V1["roc_auc"]


def test_a_version_row_says_whether_it_serves_and_why_it_was_rejected():
    lineage = {
        "gate": {"decision": "promoted", "reason": "beats", "metric": "roc_auc", "challenger": V2, "champion": V1, "champion_version": 1},
        "airflow": {"dag_id": "retrain", "run_id": "manual__1", "run_type": "manual", "trigger": {"kind": "manual"}},
        "data_version": {"data/raw/flights.parquet": "abc"},
        "code_version": "0123456789abcdef-dirty",
        "created_at": "2026-03-01T11:21:40+00:00",
        "status": "rejected",
        "rejected_reason": REJECTED_REASON,
    }

    row = data.version_row(3, lineage, served=2)

    assert row["serving"] is False and row["status"] == "rejected" and row["rejected_reason"] == REJECTED_REASON
    assert (row["run_id"], row["trigger"], row["champion_version"]) == ("manual__1", "manual", 1)
    assert data.version_row(2, {k: v for k, v in lineage.items() if "rejected" not in k and k != "status"}, served=2)["status"] == "published"
    assert data.version_row(2, lineage, served=2)["serving"] is True


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


def test_the_models_view_reads_versions_history_and_runs_from_the_project(project):
    write_versions(project)

    view = data.load_models(project)

    assert view["served_version"] == 2
    assert [(v["version"], v["serving"], v["status"]) for v in view["versions"]] == [(3, False, "rejected"), (2, True, "published"), (1, False, "published")]
    assert [(e["event"], e["version"]) for e in view["history"]] == [("rejected", 3), ("publish", 2), ("publish", 1)]
    assert view["runs"][0]["decision"] == NOT_PROMOTED and view["runs"][0]["version"] is None
    assert len(view["runs"]) == 4


# --- reports only from the reports folder ------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["..", "../" + FOLDER, FOLDER + "/..", FOLDER + "/../..", "/etc", "%2e%2e", "20260302T110000", FOLDER + "\n", "", ".20260302T110000Z.partial"],
)
def test_a_report_is_named_by_its_folder_and_nothing_else(project, name):
    write_report(project)

    with pytest.raises(data.NotFound):
        data.report_dir(reports_root(project), name)


def test_a_report_folder_that_links_outside_the_reports_dir_is_refused(project, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "report.html").write_text("secret")
    reports_root(project).mkdir(parents=True)
    (reports_root(project) / FOLDER).symlink_to(outside)

    with pytest.raises(data.NotFound):
        data.report_html(project, FOLDER)


def test_a_report_folder_resolves_inside_the_reports_dir(project):
    folder = write_report(project)

    assert data.report_dir(reports_root(project), FOLDER) == folder.resolve()


@pytest.mark.parametrize(
    "path",
    [
        "drift/..%2F..%2F..%2Fparams.yaml/report.html",
        "drift/%2e%2e/report.html",
        "drift/..%2Fsummary.json",
        "api/drift/..%2F..",
        "drift/20990101T000000Z/report.html",
    ],
)
def test_paths_that_are_not_a_report_get_404(logged_in, project, path):
    write_report(project)

    response = logged_in.get(f"/flywheel/{path}")

    assert response.status_code == 404
    assert "flights" not in response.text.replace("flights_delay", "")  # nothing of params.yaml


# --- over HTTP ---------------------------------------------------------------------------------

ROUTES = ["drift", f"drift/{FOLDER}", f"drift/{FOLDER}/report.html", "models", "api/drift", f"api/drift/{FOLDER}", "api/models"]


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_refuses_a_caller_without_a_token(client, project, route):
    write_report(project)

    response = client.get(f"/flywheel/{route}")

    assert response.status_code == 401
    assert response.json() == {"detail": "Not authenticated"}


def test_the_auth_manager_decides_per_dag_who_reads_what(client, project, monkeypatch):
    from airflow.api_fastapi.core_api import security

    asked = []

    class DriftOnlyManager:
        def is_authorized_dag(self, *, method, access_entity=None, details, user):
            asked.append((method, details.id, user))
            return details.id == "drift"

    async def viewer(request, _oauth_token=None, bearer_credentials=None):
        return "viewer"

    monkeypatch.setattr(security, "get_user", viewer)
    monkeypatch.setattr(security, "get_auth_manager", DriftOnlyManager)
    monkeypatch.setattr(security.DagModel, "get_team_name", staticmethod(lambda dag_id: None))
    write_report(project)

    assert client.get("/flywheel/api/drift").status_code == 200
    assert client.get("/flywheel/models").status_code == 403
    assert asked == [("GET", "drift", "viewer"), ("GET", "retrain", "viewer")]


def test_the_drift_pages_link_each_report_under_the_mount_prefix(logged_in, project):
    write_report(project)

    page = logged_in.get("/flywheel/drift").text
    detail = logged_in.get(f"/flywheel/drift/{FOLDER}").text

    assert f'href="/flywheel/drift/{FOLDER}/report.html"' in page and f'href="/flywheel/drift/{FOLDER}"' in page
    assert "dest, distance" in page and "0.50" in page
    assert detail.index("dest") < detail.index("carrier")  # drifted first


def test_evidentlys_report_is_served_in_a_sandbox_of_its_own(logged_in, project):
    write_report(project)

    response = logged_in.get(f"/flywheel/drift/{FOLDER}/report.html")

    assert response.status_code == 200 and "Evidently report of dest" in response.text
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"] == "sandbox allow-scripts"


def test_values_from_served_requests_are_escaped_in_the_pages(logged_in, project):
    hostile = '<img src=x onerror="alert(1)">'
    columns = [{"column": hostile, "kind": "categorical", "method": "jensenshannon", "score": 0.2, "threshold": 0.1, "drifted": True}]
    write_report(project, drifted_columns=[hostile], columns=columns)

    for path in ("drift", f"drift/{FOLDER}"):
        html = logged_in.get(f"/flywheel/{path}").text
        assert hostile not in html and "&lt;img src=x onerror=" in html


def test_the_models_page_shows_the_served_version_and_both_metrics(logged_in, project):
    write_versions(project)

    html = logged_in.get("/flywheel/models").text

    assert '<div class="value" id="served-version">version 2</div>' in html
    assert f"{V2['roc_auc']:.4f}" in html and f"{V1['roc_auc']:.4f}" in html and "champion (v1)" in html
    assert REJECTED_REASON in html


def test_without_a_project_the_pages_say_what_to_set(logged_in, monkeypatch, tmp_path):
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "nowhere"))

    response = logged_in.get("/flywheel/api/drift")

    assert response.status_code == 503 and "FLYWHEEL_HOME" in response.json()["detail"]
