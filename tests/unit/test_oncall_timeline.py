"""A project's timeline on the on-call pages, without a server: which drift windows, serving
events and performance windows a range holds, the served version as steps, the window a URL
highlights (and the range widened to it), torn files named not hidden, the plotly figure that
draws it all on one time axis, and the routes (login, the drift DAG's permission, plotly.js)."""

from __future__ import annotations

import gzip
import json
import re
import sys
from datetime import datetime, timedelta, timezone

import pytest

from pipelines.lineage import write_json
from pipelines.monitoring.check import reports_root
from pipelines.serving import live
from tests.browser.oncall_project import write_versions
from tests.conftest import REPO
from tests.unit import test_oncall_views as views
from tests.unit.test_oncall_views import client, home, plugin_app, project, text_project  # noqa: F401 (fixtures)

if str(REPO / "plugins") not in sys.path:
    sys.path.append(str(REPO / "plugins"))

from flywheel_oncall import app as oncall  # noqa: E402
from flywheel_oncall import data, timeline  # noqa: E402

UTC = timezone.utc
MARCH_2 = datetime(2026, 3, 2, tzinfo=UTC)


def at(hour: int, day: int = 2) -> datetime:
    return datetime(2026, 3, day, hour, tzinfo=UTC)


def folder(moment: datetime) -> str:
    return moment.strftime("%Y%m%dT%H%M%SZ")


def write_window(config, end: datetime, *, drifted: tuple[str, ...] = ("dest", "distance"), **changes) -> str:
    """A checked hourly window ending at ``end`` (``views.summary``: four columns), ``drifted`` the
    columns that drifted; returns its report folder."""
    name = folder(end)
    columns = [{**c, "drifted": c["column"] in drifted} for c in views.summary(config)["columns"]]
    share = len(drifted) / len(columns)
    views.write_report(
        config, name,
        window={"start": (end - timedelta(hours=1)).isoformat(), "end": end.isoformat()},
        checked_at=(end + timedelta(seconds=42)).isoformat(),
        columns=columns, drifted_columns=list(drifted), share=share, dataset_drift=share >= 0.3, **changes,
    )
    return name


def write_history(config, *entries: dict | str) -> None:
    """The serving history as ``live.record`` appends it (a str: a raw line, e.g. a torn one)."""
    path = live.history_path(config.artifacts_dir, config.served_model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in entries))


def event(moment: datetime, name: str, version: int, previous: int | None, **details) -> dict:
    return {"time": moment.isoformat(timespec="seconds"), "event": name, "version": version, "previous": previous, "run_id": f"run-{name}-{version}", **details}


SMOKE = "version 4 of flights_delay answers differently through Triton than ONNX Runtime locally: max difference 0.02 over 200 test rows > atol 1e-05"
HISTORY = (  # version 1 before the range, 2 promoted, 3 promoted, 4 rejected by its smoke test, rolled back to 2
    event(at(9, day=1), "publish", 1, None),
    event(at(6), "publish", 2, 1),
    event(at(12), "publish", 3, 2),
    event(at(13), "rejected", 4, 3, reason=SMOKE),
    event(at(15), "rollback", 2, 3),
)


@pytest.fixture
def logged_in(client, plugin_app):
    views.log_in(plugin_app)
    return client


# --- shaping ---------------------------------------------------------------------------------


def test_the_range_holds_the_windows_that_end_in_it_oldest_first_with_each_columns_test(project):
    for hour in (3, 8, 10, 11, 20):
        write_window(project, at(hour), drifted=("dest",) if hour != 11 else ("dest", "distance"))

    view = data.load_timeline(project, at(8), at(11))

    assert [w["report"] for w in view["windows"]] == [folder(at(8)), folder(at(10)), folder(at(11))]  # both ends included
    last = view["windows"][-1]
    assert (last["dataset_drift"], last["share"], last["drifted_columns"], last["run"]) == (True, 0.5, ["dest", "distance"], None)
    assert [(c["column"], c["drifted"], c["score"], c["threshold"]) for c in last["columns"]] == [
        ("carrier", False, 0.064, 0.1), ("dest", True, 0.141, 0.1), ("hour", False, 0.021, 0.05), ("distance", True, 0.088, 0.05),
    ]
    assert view["columns"] == ["carrier", "dest", "hour", "distance"]
    assert (view["since"], view["until"], view["window"], view["unreadable"]) == (at(8).isoformat(), at(11).isoformat(), None, [])


def test_a_window_before_the_range_widens_it_and_is_highlighted(project):
    old = write_window(project, at(4, day=1))
    write_window(project, at(10))

    view = data.load_timeline(project, at(8), at(11), window=old)

    assert view["since"] == at(3, day=1).isoformat() and view["until"] == at(11).isoformat()  # from the window's start
    assert view["window"] == {"report": old, "kind": "drift", "start": at(3, day=1).isoformat(), "end": at(4, day=1).isoformat(), "found": True}
    assert [w["report"] for w in view["windows"]] == [old, folder(at(10))]


def test_a_window_after_the_range_widens_its_end(project):
    later = write_window(project, at(18))

    view = data.load_timeline(project, at(8), at(11), window=later)

    assert view["until"] == (at(18) + timedelta(seconds=1)).isoformat() and view["window"]["found"]


def test_a_challenger_the_gate_refused_is_marked_at_the_champion_that_kept_serving(project):
    from pipelines.serving.publish import run_record_path

    refused = {"created_at": at(12).isoformat(), "airflow": {"run_id": "asset_triggered__x"}, "version": None,
               "gate": {"decision": "not promoted", "champion_version": 2, "reason": "roc_auc 0.61 does not beat the champion's 0.70"}}
    write_json(run_record_path(project.artifacts_dir, "asset_triggered__x"), refused)
    write_json(run_record_path(project.artifacts_dir, "before"), {**refused, "created_at": at(2).isoformat()})  # outside the range

    (event,) = data.load_timeline(project, at(8), at(14))["events"]

    assert (event["event"], event["version"], event["label"], event["run_id"]) == ("not_promoted", 2, "challenger not promoted", "asset_triggered__x")
    assert event["reason"] == "roc_auc 0.61 does not beat the champion's 0.70"


def test_a_manual_runs_window_ending_at_a_fraction_of_a_second_is_found_by_its_folder(project):
    end = at(16) + timedelta(seconds=14, microseconds=837436)  # a manual run's data interval ends at its run_after
    name = write_window(project, end)
    assert name == "20260302T160014Z"  # the folder drops the fraction, as the drift check names it

    view = data.load_timeline(project, at(8), at(11), window=name)

    assert view["window"]["found"] and view["window"]["end"] == end.isoformat()
    assert [w["report"] for w in view["windows"]] == [name]


def test_a_window_with_no_report_is_still_banded_and_said_to_be_missing(project):
    write_window(project, at(10))

    view = data.load_timeline(project, at(8), at(11), window=folder(at(9)))

    assert view["window"] == {"report": folder(at(9)), "kind": None, "start": at(8).isoformat(), "end": at(9).isoformat(), "found": False}


def test_a_performance_window_ending_then_counts_as_the_window(project):
    views.write_performance(project, views.performance_summary(2))  # March 2nd, ends March 3rd 00:00

    view = data.load_timeline(project, at(8), at(11), window=folder(datetime(2026, 3, 3, tzinfo=UTC)))

    assert view["window"]["found"] and view["window"]["kind"] == "performance"
    assert view["since"] == MARCH_2.isoformat()  # the day-long window's start, not an hour before its end
    assert [w["end"] for w in view["performance"]["windows"]] == ["2026-03-03T00:00:00+00:00"]


@pytest.mark.parametrize("name", ["20260302T1100Z", "../20260302T110000Z", "20261302T110000Z", "latest"])
def test_a_window_is_named_by_a_report_folder_and_nothing_else(project, name):
    with pytest.raises(data.NotFound, match="YYYYmmddTHHMMSSZ"):
        data.load_timeline(project, at(8), at(11), window=name)


def test_serving_events_are_labelled_in_words(project):
    write_history(project, *HISTORY, event(at(16), "shadow", 2, 2, challenger=5, mode="shadow", share=0.0), event(at(17), "canary", 2, 2, challenger=5, mode="canary", share=0.1))

    view = data.load_timeline(project, MARCH_2, at(23))

    assert [e["label"] for e in view["events"]] == [
        "v2 promoted", "v3 promoted", "v4 rejected: smoke test", "rollback to v2", "shadow v5", "canary v5 (10%)",
    ]  # version 1's publish is before the range
    assert view["events"][2]["reason"] == SMOKE and view["events"][3]["run_id"] == "run-rollback-2"
    assert data.event_label({"event": "rejected", "version": 6, "reason": "the model card could not be written: disk full on /srv"}) == (
        "v6 rejected: the model card could not be written…"
    )


def test_the_served_version_is_a_step_per_change_starting_from_what_served_before_the_range(project):
    write_history(project, *HISTORY)

    view = data.load_timeline(project, MARCH_2, at(23))

    assert [(s["start"], s["end"], s["version"]) for s in view["served"]] == [
        (MARCH_2.isoformat(), at(6).isoformat(), 1),  # version 1, published the day before
        (at(6).isoformat(), at(12).isoformat(), 2),
        (at(12).isoformat(), at(15).isoformat(), 3),  # the rejected version 4 never served
        (at(15).isoformat(), at(23).isoformat(), 2),
    ]


def test_before_the_first_publish_nothing_is_known_to_serve():
    entries = [event(at(12), "publish", 1, None), event(at(13), "rejected", 2, 1, reason=SMOKE)]

    assert data.served_steps(entries, at(8), at(11)) == []
    assert data.served_steps(entries, at(8), at(14)) == [{"start": at(12).isoformat(), "end": at(14).isoformat(), "version": 1}]


def test_versions_created_in_the_range_carry_their_gate_decision(project):
    write_versions(project)  # versions created on March 1st at 02:14, 11:21 and 15:44

    view = data.load_timeline(project, at(10, day=1), at(16, day=1))

    assert [(v["version"], v["decision"], v["status"]) for v in view["versions"]] == [(2, "promoted", "published"), (3, "promoted", "rejected")]
    assert view["versions"][0]["run_id"] == "asset_triggered__2026-03-01T11:00:00+00:00"


def test_a_torn_summary_or_history_line_is_named_and_the_rest_still_shown(project):
    write_window(project, at(9))
    torn = reports_root(project.monitoring, project.served_model) / folder(at(10))
    torn.mkdir(parents=True)
    (torn / "summary.json").write_text('{"model": "flights_delay", "window": {"start": "2026-03-')
    write_json(reports_root(project.monitoring, project.served_model) / folder(at(11)) / "summary.json", {"model": "flights_delay"})  # no window
    write_history(project, HISTORY[1], '{"time": "2026-03-02T07:00', HISTORY[2])

    view = data.load_timeline(project, at(8), at(12))

    assert [w["report"] for w in view["windows"]] == [folder(at(9))]
    assert len(view["unreadable"]) == 3
    assert view["unreadable"][0].startswith(f"flights_delay/{folder(at(10))}/summary.json: JSONDecodeError")
    assert view["unreadable"][1].startswith(f"flights_delay/{folder(at(11))}/summary.json: KeyError")
    assert view["unreadable"][2] == "line 2 of the history is not a JSON object"
    assert [e["label"] for e in view["events"]] == ["v3 promoted"]


def test_a_text_projects_timeline_has_no_performance_row(text_project):
    view = data.load_timeline(text_project, at(8), at(11))

    assert view["performance"] is None and view["windows"] == [] and view["kind"] == "text"


def test_the_range_is_the_last_days_or_since_until():
    now = at(12)

    assert data.timeline_range(now) == (now - timedelta(days=7), now)
    assert data.timeline_range(now, days=1) == (at(12, day=1), now)
    assert data.timeline_range(now, since="2026-03-02T08:00:00+00:00") == (at(8), now)
    assert data.timeline_range(now, since="2026-03-02T10:00:00+02:00", until="2026-03-02T11:00") == (at(8), at(11))  # no offset: UTC
    assert data.timeline_range(now, days=2, until="2026-03-02T11:00:00Z") == (at(11) - timedelta(days=2), at(11))
    old, recent = folder(at(12, day=1) - timedelta(days=30)), folder(at(9))
    assert data.timeline_range(now, window=old) == (at(12, day=1) - timedelta(days=33, hours=12), at(12, day=1) - timedelta(days=26, hours=12))
    assert data.timeline_range(now, window=recent) == (now - timedelta(days=7), now)  # a recent window: up to now
    assert data.timeline_range(now, since="2026-03-02T08:00:00Z", window=old) == (at(8), now)  # widened later, by load_timeline
    with pytest.raises(data.NotFound, match="YYYYmmddTHHMMSSZ"):
        data.timeline_range(now, window="yesterday")
    with pytest.raises(ValueError, match="days 91 is out of range: a timeline shows 1 to 90 days"):
        data.timeline_range(now, days=91)
    with pytest.raises(ValueError, match="since 'yesterday' is not an ISO 8601 time"):
        data.timeline_range(now, since="yesterday")
    with pytest.raises(ValueError, match="is not before until"):
        data.timeline_range(now, since="2026-03-02T12:00:00Z", until="2026-03-02T11:00:00Z")


# --- the figure ------------------------------------------------------------------------------


def full_view(project, window: str | None = None) -> dict:
    for hour, drifted in ((9, ("dest",)), (10, ("dest", "distance")), (11, ())):
        write_window(project, at(hour), drifted=drifted)
    views.write_performance(project, *views.WINDOWS)
    write_history(project, *HISTORY)
    return data.load_timeline(project, at(12, day=1), at(0, day=6), window=window)


def traces(figure) -> dict:
    return {trace.name: trace for trace in figure.data}


def test_the_figure_puts_drift_columns_serving_and_performance_on_one_time_axis(project):
    view = full_view(project)

    figure = timeline.timeline_figure(view)

    layout = figure.layout
    assert [a.text for a in layout.annotations][:4] == [
        "Drifted share of the monitored columns per window", "Per column (red: drifted)",
        "Served version, promotions, rejections and rollbacks", "Performance in production (roc_auc)",
    ]
    assert {layout.xaxis.matches, layout.xaxis2.matches, layout.xaxis3.matches} == {"x4"}  # one time axis, the bottom row's
    assert (layout.yaxis.title.text, layout.yaxis2.title.text, layout.yaxis3.title.text, layout.yaxis4.title.text) == ("drifted share", "column", "version", "roc_auc")
    assert layout.xaxis4.title.text == "time (UTC)" and tuple(layout.xaxis.range) == ("2026-03-01 12:00:00", "2026-03-06 00:00:00")
    by_name = traces(figure)
    share = by_name["drifted share of the columns"]
    assert list(share.x) == ["2026-03-02 09:00:00", "2026-03-02 10:00:00", "2026-03-02 11:00:00"] and list(share.y) == [0.25, 0.5, 0.0]
    assert list(by_name["dataset drift"].x) == ["2026-03-02 10:00:00"]
    assert set(by_name["threshold: monitoring.drift_share 0.30"].y) == {0.3}
    cells = by_name["columns"]
    assert list(layout.yaxis2.categoryarray) == ["carrier", "dest", "hour", "distance"]  # every column, in the checked order
    heat = {(x, y): colour for x, y, colour in zip(cells.x, cells.y, cells.marker.color)}
    at_10 = [heat[("2026-03-02 10:00:00", column)] for column in ("carrier", "dest", "hour", "distance")]
    assert at_10 == [pytest.approx(0.32), 1.0, pytest.approx(0.21), 1.0]  # window of 10:00: dest and distance drifted
    assert heat[("2026-03-02 09:00:00", "distance")] == pytest.approx(0.5)  # not drifted, its score above the threshold: capped below red
    assert cells.marker.size == 13 and cells.marker.symbol == "square"  # a fixed size in pixels: visible over any range
    served = by_name["served version"]
    assert list(served.y) == [1, 2, 3, 2, 2] and served.line.shape == "hv"
    labels = [text for trace in figure.data if getattr(trace, "mode", None) == "markers+text" for text in trace.text]
    assert labels == ["v2 promoted", "v3 promoted", "v4 rejected: smoke test", "rollback to v2"]

    assert list(by_name["realized roc_auc, degraded"].x) == ["2026-03-05 00:00:00"]
    realized = by_name["realized roc_auc (interval)"]
    assert list(realized.y) == [0.7012, 0.6975, 0.7030] and realized.error_y.arrayminus[0] == pytest.approx(0.021)
    assert list(by_name["estimated roc_auc (CBPE)"].y) == [0.6990, 0.7021, 0.6950, 0.7001, 0.6870]


def test_labels_of_events_near_in_time_go_to_different_places_and_far_ones_back_to_the_first():
    times = ["2026-03-02T10:00:00+00:00", "2026-03-02T10:05:00+00:00", "2026-03-02T10:06:00+00:00", "2026-03-05T00:00:00+00:00"]

    placed = timeline.label_positions(times, "2026-03-01T00:00:00+00:00", "2026-03-08T00:00:00+00:00")

    assert placed[:3] == list(timeline.LABEL_POSITIONS[:3]) and placed[3] == timeline.LABEL_POSITIONS[0]


def test_the_highlighted_window_is_a_band_over_every_row_labelled_with_its_time(project):
    view = full_view(project, window=folder(at(10)))

    figure = timeline.timeline_figure(view)

    (band,) = figure.layout.shapes
    assert (band.x0, band.x1, band.yref, band.y0, band.y1) == ("2026-03-02 09:00:00", "2026-03-02 10:00:00", "paper", 0, 1)
    assert "window 2026-03-02 09:00 to 10:00 UTC" in [a.text for a in figure.layout.annotations]


def test_an_empty_range_says_so_on_the_chart(project):
    figure = timeline.timeline_figure(data.load_timeline(project, at(8), at(11)))

    texts = [a.text for a in figure.layout.annotations]
    assert "no drift window checked in this range" in texts and "no serving event in this range" in texts
    assert len(figure.layout.annotations) == 5  # three rows' titles: no performance row without windows


def test_the_embedded_json_cannot_close_its_script_element():
    figure = timeline.performance_figure([data.performance_window({**views.performance_summary(1), "metric": "</script><b>x"})])

    embedded = str(timeline.embed(figure))

    assert "<" not in embedded and ">" not in embedded and "realized </script><b>x (interval)" in [t.get("name") for t in json.loads(embedded)["data"]]


# --- over HTTP ---------------------------------------------------------------------------------


def figure_of(page: str) -> dict:
    match = re.search(r'<script type="application/json" class="plotly-figure" data-target="([\w-]+)">(.*?)</script>', page, re.S)
    assert match, "no figure in the page"
    return json.loads(match.group(2))


def test_the_timeline_page_embeds_the_figure_and_lists_the_windows_newest_first(logged_in, project):
    write_window(project, at(9), drifted=())
    write_window(project, at(10))
    write_history(project, *HISTORY)

    response = logged_in.get(f"/flywheel/projects/flights/timeline?since=2026-03-02T00:00:00Z&until=2026-03-03T00:00:00Z&window={folder(at(10))}")

    page = response.text
    assert response.status_code == 200
    figure = figure_of(page)
    assert "window 2026-03-02 09:00 to 10:00 UTC" in [a["text"] for a in figure["layout"]["annotations"]]
    rows = re.findall(r'<tr class="([^"]*)" data-window="(\w+)">', page)
    assert rows == [("highlighted", folder(at(10))), ("", folder(at(9)))]
    assert 'id="window-missing"' not in page
    assert '<script src="/flywheel/static/plotly.min.js?v=' in page and '<script src="/flywheel/static/figures.js"></script>' in page
    assert 'href="/flywheel/projects/flights/timeline">Timeline</a>' in page  # the crumbs
    assert "rollback to v2" in page and "v4 rejected: smoke test" in page  # the events table


def test_a_window_that_was_not_checked_gets_a_notice_not_an_error(logged_in, project):
    response = logged_in.get(f"/flywheel/projects/flights/timeline?window={folder(at(9))}")

    assert response.status_code == 200 and f"no checked window {folder(at(9))}" in response.text
    assert logged_in.get(f"/flywheel/api/projects/flights/timeline?window={folder(at(9))}").json()["window"]["found"] is False


def test_the_timeline_json_holds_what_the_page_draws(logged_in, project):
    write_window(project, at(10))

    body = logged_in.get("/flywheel/api/projects/flights/timeline", params={"since": "2026-03-02T08:00:00Z", "until": "2026-03-02T11:00:00Z"}).json()

    assert [w["report"] for w in body["windows"]] == [folder(at(10))] and body["windows"][0]["run"] is None
    assert (body["since"], body["until"], body["drift_share"]) == (at(8).isoformat(), at(11).isoformat(), 0.3)


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("days=0", "greater than or equal to 1"),
        ("days=91", "less than or equal to 90"),
        ("since=yesterday", "since 'yesterday' is not an ISO 8601 time"),
        ("since=2026-03-02T12:00:00Z&until=2026-03-02T11:00:00Z", "is not before until"),
        ("window=../../etc", "window: '../../etc' is not a drift report name (YYYYmmddTHHMMSSZ"),
    ],
)
def test_a_wrong_range_or_window_is_a_422_that_says_what_was_expected(logged_in, project, query, says):
    response = logged_in.get(f"/flywheel/api/projects/flights/timeline?{query}")

    assert response.status_code == 422 and says in json.dumps(response.json())


def test_the_timeline_needs_the_drift_dags_read_permission(client, plugin_app, project):
    views.log_in(plugin_app, {"retrain__flights"})

    assert client.get("/flywheel/projects/flights/timeline").status_code == 403
    assert client.get("/flywheel/api/projects/flights/timeline").status_code == 403
    views.log_in(plugin_app, {"drift__flights"})
    assert client.get("/flywheel/projects/flights/timeline").status_code == 200


@pytest.mark.parametrize("path", ["projects/flights/timeline", "api/projects/flights/timeline", "static/plotly.min.js", "static/figures.js"])
def test_the_timeline_and_the_scripts_need_a_login(client, path):
    response = client.get(f"/flywheel/{path}")

    assert response.status_code == 401 and response.json() == {"detail": "Not authenticated"}


def test_plotly_js_comes_from_the_installed_package_gzipped_and_cached_long(logged_in):
    import plotly

    response = logged_in.get("/flywheel/static/plotly.min.js", headers={"Accept-Encoding": "gzip"})

    packaged = (oncall.plotly_path()).read_bytes()
    assert response.status_code == 200 and response.content == packaged  # decoded by the client
    assert response.headers["content-encoding"] == "gzip" and response.headers["content-type"].startswith("text/javascript")
    assert "max-age=31536000" in response.headers["cache-control"]
    assert len(gzip.compress(packaged)) < len(packaged) / 2 and "plotly.js v" in packaged[:100].decode()
    assert oncall.plotly_path() == REPO.joinpath(plotly.__file__).parent / "package_data" / "plotly.min.js"


@pytest.mark.parametrize("name", ["app.py", "..%2Fapp.py", "plotly.js", "%2Fetc%2Fpasswd", "__init__.py"])
def test_only_files_of_the_static_folder_are_served_by_name(logged_in, name):
    response = logged_in.get(f"/flywheel/static/{name}")

    assert response.status_code == 404
    assert logged_in.get("/flywheel/static/figures.js").text == (oncall.STATIC / "figures.js").read_text()


def test_the_drift_page_and_the_index_link_each_window_to_its_timeline(logged_in, project):
    name = write_window(project, at(10))

    drift = logged_in.get("/flywheel/projects/flights/drift").text
    index = logged_in.get("/flywheel/projects").text

    link = f'href="/flywheel/projects/flights/timeline?window={name}"'
    assert link in drift and link in index
