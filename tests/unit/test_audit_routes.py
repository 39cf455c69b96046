"""The Audit page and its JSON twins (plugins/flywheel_oncall/audit_routes.py) without a server:
entries of every readable project newest first, the filters, the export, unreadable lines shown,
per-project permission (the models DAG) and a login for every route."""

from __future__ import annotations

import html
import json
import sys
from datetime import datetime, timedelta, timezone

import pytest

from pipelines import audit
from tests.conftest import REPO
from tests.unit.test_oncall_views import client, home, log_in, logged_in, plugin_app, project, text_project  # noqa: F401 (fixtures)

# Airflow puts its plugins folder on sys.path and imports the plugin from there; so do the tests.
if str(REPO / "plugins") not in sys.path:
    sys.path.append(str(REPO / "plugins"))

from flywheel_oncall.story import run_url  # noqa: E402

T0 = datetime(2026, 3, 2, 11, 0, tzinfo=timezone.utc)
RUN = "manual__2026-03-02T11:00:00+00:00"


@pytest.fixture
def flights(project):
    return project


@pytest.fixture
def reviews(text_project):
    return text_project


@pytest.fixture
def trail(flights, reviews) -> dict[str, dict]:
    """Actions on flights and reviews, an hour apart: flights' retrain, reviews' retrain, flights' rollback, flights' acknowledgement."""
    return {
        "retrain": audit.record(flights, action=audit.RETRAIN, user="alice", reason="drift on dest", outcome="run started", dag_id="retrain__flights", run_id="manual__1", now=T0),
        "finetune": audit.record(reviews, action=audit.RETRAIN, user="bob", reason="new labels", outcome="run started", dag_id="finetune__reviews", run_id="manual__2", now=T0 + timedelta(hours=1)),
        "rollback": audit.record(flights, action=audit.ROLLBACK, user="bob", reason="v4 <b>worse</b> on UA", outcome="rolled back to v3",
                                 dag_id="rollback__flights", run_id=RUN, now=T0 + timedelta(hours=2)),
        "ack": audit.record(flights, action=audit.ACKNOWLEDGE, user="alice", reason="known feed change", outcome="failed: Alertmanager at http://am:9093 could not be reached",
                            details={"window": "20260302T110000Z"}, now=T0 + timedelta(hours=3)),
    }  # fmt: skip


def test_the_page_lists_every_readable_projects_actions_newest_first_with_run_links(logged_in, trail):
    page = logged_in.get("/flywheel/audit")

    assert page.status_code == 200
    body = page.text
    assert body.index('data-action="acknowledge"') < body.index('data-action="rollback"') < body.index('data-project="reviews"') < body.index('data-action="retrain" data-project="flights"')
    assert f'href="{html.escape(run_url("", "rollback__flights", RUN))}"' in body
    assert run_url("", "rollback__flights", RUN) == "/dags/rollback__flights/runs/manual__2026-03-02T11%3A00%3A00%2B00%3A00"
    assert "v4 &lt;b&gt;worse&lt;/b&gt; on UA" in body and "<b>worse</b>" not in body  # a reason is text, never markup
    assert '<span class="badge bad">failed</span> Alertmanager at http://am:9093 could not be reached' in body
    assert 'href="/flywheel/api/audit.jsonl"' in body and "4 matching entries" in body


def test_the_json_twin_gives_the_entries_as_recorded_newest_first(logged_in, trail):
    answer = logged_in.get("/flywheel/api/audit").json()

    assert answer["entries"] == [trail["ack"], trail["rollback"], trail["finetune"], trail["retrain"]]
    assert answer["unreadable"] == [] and answer["projects"] == ["flights", "reviews"]
    assert (answer["total"], answer["limit"], answer["filters"]) == (4, 500, {})


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"project": "flights"}, ["ack", "rollback", "retrain"]),
        ({"action": "retrain"}, ["finetune", "retrain"]),
        ({"user": "bob"}, ["rollback", "finetune"]),
        ({"since": "2026-03-02T12:00:00Z", "until": "2026-03-02T14:00:00+01:00"}, ["rollback", "finetune"]),  # both inclusive; 14:00+01:00 is 13:00Z
        ({"since": "2026-03-02T13:00"}, ["ack", "rollback"]),  # no zone: UTC
        ({"project": "flights", "action": "retrain", "user": "", "since": ""}, ["retrain"]),  # empty form fields: no filter
        ({"user": "carol"}, []),
    ],
)
def test_filters_select_entries(logged_in, trail, query, expected):
    answer = logged_in.get("/flywheel/api/audit", params=query).json()

    assert answer["entries"] == [trail[name] for name in expected]


def test_the_limit_keeps_the_newest_and_says_how_many_matched(logged_in, trail):
    answer = logged_in.get("/flywheel/api/audit", params={"limit": 2}).json()
    page = logged_in.get("/flywheel/audit", params={"limit": 2}).text

    assert answer["entries"] == [trail["ack"], trail["rollback"]] and answer["total"] == 4
    assert "Showing the newest 2 of 4 matching entries" in page


def test_the_export_is_json_lines_of_the_filtered_entries_as_an_attachment(logged_in, trail):
    page = logged_in.get("/flywheel/audit", params={"project": "flights", "user": "alice", "since": ""}).text
    export = html.unescape(page.split('id="audit-export" href="')[1].split('"')[0])

    assert export == "/flywheel/api/audit.jsonl?project=flights&user=alice"
    answer = logged_in.get(export)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/x-ndjson")
    assert answer.headers["content-disposition"] == 'attachment; filename="flywheel-audit.jsonl"'
    assert [json.loads(line) for line in answer.text.splitlines()] == [trail["ack"], trail["retrain"]]


def test_unreadable_lines_are_listed_with_their_project_and_line(logged_in, trail, flights):
    with audit.audit_file(flights).open("ab") as file:
        file.write(b'{"time": "2026-03-02T15:00:00+00:00", "proj')

    page = logged_in.get("/flywheel/audit").text
    answer = logged_in.get("/flywheel/api/audit").json()

    (line,) = answer["unreadable"]
    assert line.startswith(f"flights: {audit.audit_file(flights)} line 4: not JSON")
    assert 'id="audit-unreadable"' in page and line in html.unescape(page)
    assert len(answer["entries"]) == 4


def test_only_projects_whose_models_dag_the_caller_may_read_are_shown(client, plugin_app, trail):
    log_in(plugin_app, {"retrain__flights", "drift__reviews"})  # reviews' drift, not its finetune DAG

    answer = client.get("/flywheel/api/audit").json()
    page = client.get("/flywheel/audit").text
    export = client.get("/flywheel/api/audit.jsonl").text

    assert answer["projects"] == ["flights"]
    assert {e["project"] for e in answer["entries"]} == {"flights"}
    assert "reviews" not in page and "new labels" not in page and "new labels" not in export
    assert client.get("/flywheel/api/audit", params={"project": "reviews"}).status_code == 403
    assert client.get("/flywheel/api/audit.jsonl", params={"project": "reviews"}).status_code == 403


def test_an_unknown_project_filter_is_a_404_naming_the_known_ones(logged_in, trail):
    answer = logged_in.get("/flywheel/api/audit", params={"project": "taxis"})

    assert answer.status_code == 404
    assert "no project 'taxis'" in answer.json()["detail"] and "['flights', 'reviews']" in answer.json()["detail"]


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ({"action": "delete"}, "action 'delete': expected one of ['retrain', 'rollback', 'acknowledge', 'force_publish', 'approval']"),
        ({"since": "yesterday"}, "since 'yesterday': expected an ISO 8601 time"),
        ({"until": "2026-13-01"}, "until '2026-13-01': expected an ISO 8601 time"),
    ],
)
def test_a_bad_filter_is_a_422_naming_it_and_what_is_expected(logged_in, trail, query, error):
    for route in ("audit", "api/audit", "api/audit.jsonl"):
        answer = logged_in.get(f"/flywheel/{route}", params=query)

        assert answer.status_code == 422
        assert error in answer.json()["detail"]


def test_an_empty_trail_says_so(logged_in, flights, reviews):
    page = logged_in.get("/flywheel/audit").text

    assert "No recorded action matches." in page and 'id="audit"' not in page
    assert logged_in.get("/flywheel/api/audit.jsonl").text == ""


@pytest.mark.parametrize("route", ["audit", "api/audit", "api/audit.jsonl", "api/audit?project=nope"])
def test_every_audit_route_refuses_a_caller_without_a_token(client, trail, route):
    answer = client.get(f"/flywheel/{route}")

    assert answer.status_code == 401
    assert answer.json() == {"detail": "Not authenticated"}
