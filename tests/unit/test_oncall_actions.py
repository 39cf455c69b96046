"""The on-call actions without a server: what each sends to Airflow's REST API as the caller, what
is refused before Airflow is asked (a missing reason, the serving or an unknown version, a text
project's retrain), that Airflow's own refusal is passed on and audited, and which buttons the
auth manager's answers enable. Airflow's API itself answers in tests/e2e/test_drift_loop.py and
tests/browser/test_oncall_pages.py; here its client is replaced by a recorder."""

from __future__ import annotations

import sys

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pipelines import audit
from pipelines.launch import airflow as airflow_launch
from tests.browser.oncall_project import write_versions
from tests.conftest import REPO, make_project, make_text_project

if str(REPO / "plugins") not in sys.path:
    sys.path.append(str(REPO / "plugins"))

from flywheel_oncall import actions, story  # noqa: E402
from flywheel_oncall import app as oncall  # noqa: E402

TOKEN = "a.jwt.token"


class User:
    def get_name(self) -> str:
        return "oncall-alice"


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture
def project(home):
    config = make_project(home)
    write_versions(config)  # v1, v2 serving, v3 rejected by its smoke test
    make_text_project(home)
    return config


@pytest.fixture
def triggered(monkeypatch):
    """Airflow's REST client replaced by a recorder: each call's (base_url, token, dag_id, conf)."""
    calls = []

    def trigger_run(base_url, token, dag_id, conf, run_id=None, logical_date=None):
        calls.append((base_url, token, dag_id, conf))
        return "manual__2026-03-03T01:02:03+00:00"

    monkeypatch.setattr(airflow_launch, "trigger_run", trigger_run)
    return calls


@pytest.fixture
def permitted(monkeypatch):
    """The auth manager's answers: ``(method, dag_id)`` pairs it allows (GET on every DAG by default)."""
    from airflow.api_fastapi.core_api import security

    allowed: set[tuple[str, str]] = set()

    class Manager:
        def is_authorized_dag(self, *, method, access_entity=None, details, user):
            return method == "GET" or (method, details.id) in allowed

    async def get_user(request, _oauth_token=None, bearer_credentials=None):
        return User()

    monkeypatch.setattr(security, "get_user", get_user)
    monkeypatch.setattr(security, "get_auth_manager", Manager)
    monkeypatch.setattr(security.DagModel, "get_team_name", staticmethod(lambda dag_id: None))
    return allowed


@pytest.fixture
def client(project, home, monkeypatch, permitted):
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    root = FastAPI()
    root.mount(oncall.URL_PREFIX, oncall.create_app())
    return TestClient(root, base_url="http://airflow.test", cookies={actions.COOKIE: TOKEN})


def post(client, project: str, action: str, body: dict):
    return client.post(f"/flywheel/api/projects/{project}/actions/{action}", json=body)


def test_retrain_now_triggers_the_projects_retrain_as_the_caller_with_the_reason(client, triggered):
    response = post(client, "flights", "retrain", {"reason": "dest drifted after the schedule change"})

    assert response.status_code == 200, response.text
    assert triggered == [("http://airflow.test", TOKEN, "retrain__flights", {"reason": "dest drifted after the schedule change"})]
    assert response.json()["url"] == "/dags/retrain__flights/runs/manual__2026-03-03T01%3A02%3A03%2B00%3A00"


@pytest.mark.parametrize("body", [{}, {"reason": ""}, {"reason": "   "}, {"reason": "x" * 501}])
def test_a_retrain_without_a_reason_is_refused_before_airflow_is_asked(client, triggered, body):
    response = post(client, "flights", "retrain", body)

    assert response.status_code == 422 and "reason" in response.text
    assert triggered == []


@pytest.mark.parametrize("body", [{"version": "1", "reason": "a string version"}, {"version": 1.5, "reason": "a fraction"}, {"version": 0, "reason": "none"}, {"version": 1, "reason": " \t "}])
def test_a_rollback_with_a_version_that_is_not_a_positive_json_integer_or_a_blank_reason_is_a_422(client, triggered, body):
    response = post(client, "flights", "rollback", body)

    assert response.status_code == 422, response.text
    assert triggered == []


def test_a_rollback_sends_the_version_and_reason(client, triggered):
    response = post(client, "flights", "rollback", {"version": 1, "reason": "v2 misroutes late flights"})

    assert response.status_code == 200, response.text
    assert triggered[0][2:] == ("rollback__flights", {"version": 1, "reason": "v2 misroutes late flights"})


@pytest.mark.parametrize(("version", "says"), [(2, "it is the version serving"), (7, "the versions are [1, 2, 3]"), (3, "rejected")])
def test_a_rollback_to_the_serving_an_unknown_or_a_rejected_version_is_a_409_saying_why(client, triggered, version, says):
    response = post(client, "flights", "rollback", {"version": version, "reason": "why not"})

    assert response.status_code == 409 and says in response.json()["detail"]
    assert triggered == []


def test_airflows_refusal_is_passed_on_and_audited_as_refused(client, project, monkeypatch):
    def refuse(base_url, token, dag_id, conf, run_id=None, logical_date=None):
        raise airflow_launch.AirflowApiError("trigger_dag_run", base_url, 403, '{"detail":"Forbidden"}')

    monkeypatch.setattr(airflow_launch, "trigger_run", refuse)

    response = post(client, "flights", "rollback", {"version": 1, "reason": "v2 misroutes late flights"})

    assert response.status_code == 403 and "Forbidden" in response.json()["detail"]
    (entry,) = audit.read(project)[0]
    assert (entry["action"], entry["user"], entry["reason"]) == ("rollback", "oncall-alice", "v2 misroutes late flights")
    assert entry["outcome"].startswith("Airflow refused to start rollback__flights (HTTP 403)")


def test_a_text_project_offers_no_retrain_from_the_page(client, triggered):
    response = post(client, "reviews", "retrain", {"reason": "new reviews"})

    assert response.status_code == 404 and "text project has no retrain action" in response.json()["detail"]
    assert triggered == []


def test_the_buttons_follow_the_auth_managers_answers(project, permitted):
    class Caller(oncall.Access):
        pass

    caller = Caller(request=None, user=User())

    assert actions.allowed(caller, "flights", "tabular") == {"retrain": False, "rollback": False, "acknowledge": False}
    permitted.update({("POST", "rollback__flights"), ("PUT", "drift__flights")})
    assert actions.allowed(caller, "flights", "tabular") == {"retrain": False, "rollback": True, "acknowledge": True}
    permitted.add(("POST", "retrain__flights"))
    assert actions.allowed(caller, "reviews", "text") == {"retrain": False, "rollback": False, "acknowledge": False}


@pytest.mark.parametrize(
    ("record", "state", "failed", "said"),
    [
        ({"version": 3, "gate": {"decision": "promoted"}}, "success", [], "promoted v3"),
        ({"version": 4, "gate": {"decision": "not promoted", "forced": True}}, "success", [], "promoted v4 (gate overridden)"),
        ({"version": None, "gate": {"decision": "not promoted", "reason": "roc_auc 0.61 does not beat 0.70"}}, "success", [], "not promoted: roc_auc 0.61 does not beat 0.70"),
        (None, "failed", ["validate"], "failed at validate"),
        (None, "success", [], "nothing to train"),
        (None, "running", [], "running"),
    ],
)
def test_a_runs_outcome_in_words(record, state, failed, said):
    assert story.outcome(record, state, failed) == said


def test_a_report_folder_is_read_from_an_events_extra_only_when_it_is_one():
    assert story.report_folder({"report": "/home/reports/drift/flights_delay/20260302T110000Z/report.html"}) == "20260302T110000Z"
    assert story.report_folder({"report": "/home/reports/drift/flights_delay/../report.html"}) is None
    assert story.report_folder(None) is None


def test_a_drifted_window_links_the_run_its_asset_event_started_and_how_it_ended(airflow_db, project):
    """In a real (SQLite) Airflow metadata database: the event of window 20260302T110000Z started a
    retrain that failed, the other window's event a retrain that promoted v2 (its run record)."""
    from datetime import datetime, timezone

    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    from pipelines.lineage import write_json
    from pipelines.serving.publish import run_record_path
    from pipelines.steps import drift_asset

    reports = project.home / "reports/drift/flights_delay"
    with create_session() as session:
        asset = AssetModel(name=drift_asset("flights"), uri=drift_asset("flights"), group="asset")
        session.add(asset)
        session.flush()
        for folder, run_id, state in (("20260302T110000Z", "asset_triggered__1", "failed"), ("20260302T150000Z", "asset_triggered__2", "success")):
            event = AssetEvent(asset_id=asset.id, extra={"report": str(reports / folder / "report.html")})
            event.created_dagruns.append(
                DagRun(dag_id="retrain__flights", run_id=run_id, run_type="asset_triggered", state=state, run_after=datetime.now(timezone.utc))
            )
            session.add(event)
    write_json(run_record_path(project.artifacts_dir, "asset_triggered__2"), {"version": 2, "gate": {"decision": "promoted"}})

    try:
        links = story.window_runs(project, "/airflow")
    finally:  # the database is the session's: leave no event for another test's flights
        with create_session() as session:
            for model in (AssetEvent, DagRun, AssetModel):
                session.query(model).delete()

    assert links["performance"] == {}
    assert links["drift"] == {
        "20260302T110000Z": {
            "dag_id": "retrain__flights", "run_id": "asset_triggered__1", "url": "/airflow/dags/retrain__flights/runs/asset_triggered__1",
            "state": "failed", "outcome": "failed",
        },
        "20260302T150000Z": {
            "dag_id": "retrain__flights", "run_id": "asset_triggered__2", "url": "/airflow/dags/retrain__flights/runs/asset_triggered__2",
            "state": "success", "outcome": "promoted v2",
        },
    }


def test_the_models_page_offers_a_rollback_to_each_other_published_version_disabled_without_permission(client, permitted):
    page = client.get("/flywheel/projects/flights/models").text
    assert 'data-dialog="rollback-v1" disabled' in page  # GET only: the button is there, disabled
    assert "rollback-v3" not in page and "rollback-v2" not in page  # rejected, and serving: nothing to roll back to

    permitted.add(("POST", "rollback__flights"))
    page = client.get("/flywheel/projects/flights/models").text

    dialog = page[page.index('<dialog id="rollback-v1"'):page.index("</dialog>", page.index('<dialog id="rollback-v1"'))]
    assert 'data-dialog="rollback-v1">' in page
    assert "v1 on v2's test rows" in dialog  # v2's gate measured v1 on the same rows: the like-for-like column
    assert "Serve v1 instead of v2?" in dialog
