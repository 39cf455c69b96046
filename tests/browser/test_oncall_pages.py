"""The on-call pages in a real Airflow UI, driven by headless Chromium: refused without a login,
reached from the navigation after one: the index of the deployment's two projects (the
tabular ``flights`` and the text ``reviews``), and each project's real drift reports and versions."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipelines.launch.airflow import ADMIN_USER, LocalAirflow
from pipelines.serving.model_card import SECTIONS
from tests.browser.chromium import TIMEOUT_MS, chromium_browser, logged_in_page, playwright  # noqa: F401 (the browser fixture)
from tests.browser.oncall_project import (
    BASE_MODEL,
    CARD_LIMITATION,
    TEXT_BASE,
    TEXT_V2,
    TEXT_V2_RUN,
    V2,
    write_card,
    write_drift_reports,
    write_text_versions,
    write_versions,
)
from tests.conftest import REPO, free_ports, make_project, make_text_project
from tests.unit.test_oncall_views import WINDOWS, write_performance

pytestmark = pytest.mark.e2e
VIEWER = "oncall_viewer"  # a user of the simple auth manager's viewer role: reads, may not trigger


@pytest.fixture(scope="module")
def oncall(tmp_path_factory):
    """A deployment of two projects, ``flights`` (versions and two checked drift windows) and
    ``reviews`` (two versions of its text classifier, no drift window checked yet), and an Airflow serving its plugins.
    Version 2 of ``flights`` has its model card and five daily performance windows (one degraded)."""
    root = tmp_path_factory.mktemp("oncall")
    config = make_project(root / "home", {"rollout": {"limitations": [CARD_LIMITATION]}})
    write_versions(config)
    write_card(config)
    write_performance(config, *WINDOWS)
    calm, drifted = write_drift_reports(config)
    assert not calm["dataset_drift"] and drifted["dataset_drift"]  # the pages must show both verdicts
    write_text_versions(make_text_project(root / "home"))
    airflow = LocalAirflow(
        root / "airflow", REPO / "dags", REPO / "plugins", port=free_ports(1)[0],
        extra_env={"FLYWHEEL_HOME": str(config.home), "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin,{VIEWER}:viewer"},
        scheduled=False,
    )
    with airflow:
        yield airflow, config, drifted


def http_get(url: str, headers: dict | None = None) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=60) as response:
            return response.status, response.read(2000).decode(errors="replace")
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode(errors="replace")


def plugin_urls(airflow: LocalAirflow, folder: str) -> list[str]:
    flights = "projects/flights"
    return [
        f"{airflow.base_url}/flywheel/{path}"
        for path in (
            "projects", "api/projects",
            f"{flights}/drift", f"{flights}/models", f"{flights}/drift/{folder}", f"{flights}/drift/{folder}/report.html", f"{flights}/versions/2/card",
            f"api/{flights}/drift", f"api/{flights}/drift/{folder}", f"api/{flights}/models",
            "projects/reviews/models", "projects/reviews/drift", "api/projects/reviews/models",
            f"{flights}/timeline?window={folder}", f"api/{flights}/timeline", "static/plotly.min.js", "static/figures.js",
            "projects/nope/models",
        )
    ]


def test_nothing_is_served_without_an_airflow_login(oncall):
    airflow, _, drifted = oncall
    folder = Path(drifted["report"]).parent.name
    urls = plugin_urls(airflow, folder)

    anonymous = {url: http_get(url) for url in urls}
    forged = {url: http_get(url, {"Authorization": "Bearer not-a-jwt"}) for url in urls}
    forged_cookie = {url: http_get(url, {"Cookie": "_token=not-a-jwt"}) for url in urls}

    assert {url: status for url, (status, _) in anonymous.items()} == dict.fromkeys(urls, 401)
    assert {url: status for url, (status, _) in forged.items()} == dict.fromkeys(urls, 403)
    assert {url: status for url, (status, _) in forged_cookie.items()} == dict.fromkeys(urls, 403)
    assert not any("flights" in body or "reviews" in body or "<html" in body.lower() for _, body in anonymous.values())
    # the same JSON with the API's own bearer token
    bearer = {"Authorization": f"Bearer {airflow.token()}"}
    status, body = http_get(f"{airflow.base_url}/flywheel/api/projects/flights/drift", bearer)
    assert status == 200 and folder in body
    status, body = http_get(f"{airflow.base_url}/flywheel/api/projects/nope/models", bearer)
    assert status == 404 and "['flights', 'reviews']" in body


def test_the_index_lists_both_projects_with_their_served_versions(oncall, browser, tmp_path):
    airflow, _, drifted = oncall
    page = logged_in_page(browser, airflow)

    frame = open_index(page)

    expect = playwright.expect
    flights, reviews = frame.locator("#projects tr[data-project='flights']"), frame.locator("#projects tr[data-project='reviews']")
    expect(frame.locator("#projects tbody tr")).to_have_count(2, timeout=TIMEOUT_MS)
    expect(flights).to_contain_text("tabular")
    expect(flights).to_contain_text("flights_delay")
    expect(flights.locator("td.served")).to_have_text("2")
    expect(flights.locator("td.drift")).to_contain_text(f"{drifted['share']:.2f} / {drifted['drift_share']:.2f}")
    expect(flights.locator("td.drift .badge")).to_have_text("drift")
    expect(reviews).to_contain_text("text")
    expect(reviews).to_contain_text("reviews_sentiment")
    expect(reviews.locator("td.served")).to_have_text("2")
    expect(reviews.locator("td.drift")).to_contain_text("no checked window yet")
    page.screenshot(path=tmp_path / "index.png")
    print(f"screenshots in {tmp_path}")


def test_a_logged_in_user_reads_drift_and_opens_evidentlys_report(oncall, browser, tmp_path):
    airflow, _, drifted = oncall
    page = logged_in_page(browser, airflow)
    frame = open_index(page)

    frame.locator("#projects tr[data-project='flights']").get_by_role("link", name="Drift", exact=True).click()

    newest = frame.locator("#drift-reports tbody tr").first
    expect = playwright.expect
    expect(newest).to_contain_text(", ".join(drifted["drifted_columns"]), timeout=TIMEOUT_MS)
    expect(newest).to_contain_text(f"{drifted['share']:.2f} / {drifted['drift_share']:.2f}")
    expect(newest.locator(".badge")).to_have_text("yes")
    expect(frame.locator("#drift-reports tbody tr").nth(1).locator(".badge")).to_have_text("no")
    page.screenshot(path=tmp_path / "drift.png")

    newest.get_by_role("link", name="columns").click()
    column = frame.locator("#drift-columns tbody tr").first
    expect(column).to_contain_text(drifted["drifted_columns"][0], timeout=TIMEOUT_MS)
    expect(column).to_contain_text("drifted")
    page.screenshot(path=tmp_path / "drift_report.png")

    frame.get_by_role("link", name="Open Evidently's report").click()
    heading = frame.get_by_text(f"Drift in column '{drifted['drifted_columns'][-1]}'")
    expect(heading).to_be_visible(timeout=TIMEOUT_MS)
    heading.scroll_into_view_if_needed()
    expect(heading).to_be_in_viewport()
    page.screenshot(path=tmp_path / "evidently.png")
    print(f"screenshots in {tmp_path}")


def test_a_logged_in_user_sees_the_served_version_and_both_gate_metrics(oncall, browser, tmp_path):
    airflow, _, _ = oncall
    page = logged_in_page(browser, airflow)
    frame = open_index(page)

    frame.locator("#projects tr[data-project='flights']").get_by_role("link", name="Models", exact=True).click()

    expect = playwright.expect
    expect(frame.locator("#served-version")).to_have_text("version 2", timeout=TIMEOUT_MS)
    served = frame.locator("#versions tr.serving")
    expect(served).to_contain_text("promoted")
    expect(served).to_contain_text("asset_triggered__2026-03-01T11:00:00+00:00")
    # challenger and champion (version 1) on the gate's metric
    expect(served.locator("table.metrics tr", has_text="roc_auc")).to_contain_text(f"{V2['roc_auc']:.4f}")
    expect(served.locator("table.metrics tr", has_text="roc_auc")).to_contain_text("0.6811")
    expect(served).to_contain_text("champion (v1)")
    expect(frame.locator("#versions tbody tr").first).to_contain_text("rejected")
    expect(frame.locator("#history tbody tr")).to_have_count(3)
    expect(frame.locator("#runs tbody tr").first).to_contain_text("not promoted")
    expect(frame.locator("#versions a.card-link")).to_have_count(1)  # version 2 alone has a card
    page.screenshot(path=tmp_path / "models.png")

    # the approver's evidence: the served version's model card, every section under its heading
    served.get_by_role("link", name="card", exact=True).click()
    expect(frame.locator("h1")).to_have_text("Model card: flights_delay version 2", timeout=TIMEOUT_MS)
    for name, title in SECTIONS.items():
        expect(frame.locator(f"section#{name} h2")).to_have_text(title)
    expect(frame.locator("#gate-metrics tr", has_text="roc_auc")).to_contain_text(f"{V2['roc_auc']:.4f}")
    expect(frame.locator("section#rollout h3").first).to_have_text("shadow")
    expect(frame.locator("#drift-columns tr", has_text="distance")).to_contain_text("wasserstein")
    expect(frame.locator("#limitation-items")).to_contain_text(CARD_LIMITATION)
    page.screenshot(path=tmp_path / "model_card.png", full_page=True)
    print(f"screenshots in {tmp_path}")


def test_the_text_projects_models_page_lists_its_versions_against_base_and_champion(oncall, browser, tmp_path):
    airflow, _, _ = oncall
    page = logged_in_page(browser, airflow)
    frame = open_index(page)

    frame.locator("#projects tr[data-project='reviews']").get_by_role("link", name="Models", exact=True).click()

    expect = playwright.expect
    expect(frame.locator("#served-version")).to_have_text("version 2", timeout=TIMEOUT_MS)
    expect(frame.locator("#versions > tbody > tr")).to_have_count(2)
    served = frame.locator("#versions tr.serving")
    expect(served).to_contain_text("promoted")
    expect(served).to_contain_text(TEXT_V2_RUN)
    expect(served).to_contain_text(BASE_MODEL)
    accuracy = served.locator("table.metrics tr", has_text="accuracy")
    expect(accuracy).to_contain_text(f"{TEXT_V2['accuracy']:.4f}")  # challenger
    expect(accuracy).to_contain_text("0.7920")  # the champion, version 1
    expect(accuracy).to_contain_text(f"{TEXT_BASE['accuracy']:.4f}")  # the untuned base with a linear head
    expect(frame.locator("#promotion-rule")).to_contain_text("0.020")
    expect(frame.locator("#history tbody tr")).to_have_count(2)
    expect(frame.locator("#runs tbody tr").first).to_contain_text("not promoted")
    page.screenshot(path=tmp_path / "text_models.png")

    frame.get_by_role("link", name="Drift", exact=True).click()
    expect(frame.locator("#no-window")).to_contain_text("No checked window yet", timeout=TIMEOUT_MS)
    print(f"screenshots in {tmp_path}")


def test_a_drifted_window_opens_on_the_timeline_highlighted_and_labelled(oncall, browser, tmp_path):
    airflow, _, drifted = oncall
    folder = Path(drifted["report"]).parent.name
    page = logged_in_page(browser, airflow)
    failed = []
    page.on("requestfailed", lambda request: failed.append(request.url))
    page.on("response", lambda response: failed.append(f"{response.status} {response.url}") if response.status >= 400 else None)
    frame = open_index(page)

    # the index's latest window of flights: its end links to the timeline, that window highlighted
    frame.locator("#projects tr[data-project='flights'] a.timeline-link").click()

    expect = playwright.expect
    chart = frame.locator("#timeline-chart")
    expect(chart.locator(".main-svg").first).to_be_visible(timeout=TIMEOUT_MS)  # drawn by plotly.js, served by the plugin
    expect(chart.get_by_text("window 2026-03-02 10:00 to 11:00 UTC")).to_be_visible()  # the band's label
    expect(chart.get_by_text("Drifted share of the monitored columns per window")).to_be_visible()
    for column in drifted["drifted_columns"]:
        expect(chart.locator(".yaxislayer-above text", has_text=column).first).to_be_visible()  # the heatmap's rows
    highlighted = frame.locator(f"#timeline-windows tr.highlighted[data-window='{folder}']")
    expect(highlighted).to_contain_text(", ".join(drifted["drifted_columns"]))
    expect(frame.locator("#window-missing")).to_have_count(0)
    page.screenshot(path=tmp_path / "timeline.png", full_page=True)

    # the Drift page links each window to it too
    frame.locator("nav.crumbs").get_by_role("link", name="Drift", exact=True).click()
    frame.locator("#drift-reports tbody tr").first.get_by_role("link", name="timeline").click()
    expect(frame.locator(f"#timeline-windows tr.highlighted[data-window='{folder}']")).to_be_visible(timeout=TIMEOUT_MS)

    # a window that was never checked (an alert's link, say): the page still draws, and says so
    page.goto(f"http://localhost:{airflow.port}/flywheel/projects/flights/timeline?window=20260302T050000Z")
    expect(page.locator("#window-missing")).to_contain_text("no checked window 20260302T050000Z")
    expect(page.locator("#timeline-chart .main-svg").first).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.get_by_text("window 2026-03-02 04:00 to 05:00 UTC")).to_be_visible()
    assert not failed, f"failed requests: {failed}"
    print(f"screenshots in {tmp_path}")


def test_the_models_page_draws_the_performance_chart_with_plotly(oncall, browser, tmp_path):
    airflow, _, _ = oncall
    page = logged_in_page(browser, airflow)
    frame = open_index(page)

    frame.locator("#projects tr[data-project='flights']").get_by_role("link", name="Models", exact=True).click()

    expect = playwright.expect
    chart = frame.locator("#performance-chart")
    expect(chart.locator(".main-svg").first).to_be_visible(timeout=TIMEOUT_MS)
    expect(chart.locator(".legendtext", has_text="realized roc_auc, degraded")).to_be_visible()
    expect(chart.locator(".legendtext", has_text="estimated roc_auc (CBPE)")).to_be_visible()
    expect(chart.locator(".ytitle")).to_have_text("roc_auc")
    expect(chart.locator(".scatterlayer .point")).to_have_count(4 + 5)  # realized (day 5 has none yet) and estimated
    chart.scroll_into_view_if_needed()
    page.screenshot(path=tmp_path / "performance.png")
    print(f"screenshots in {tmp_path}")


def open_index(page):
    """The Flywheel entry of the navigation: the index of projects, in the UI's iframe."""
    page.get_by_role("link", name="Flywheel", exact=True).click()
    frame = page.frame_locator("iframe[title='Flywheel']")
    playwright.expect(frame.locator("#projects")).to_be_visible(timeout=TIMEOUT_MS)
    return frame


def post_json(url: str, token: str, body: dict) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    )
    try:
        with opener.open(request, timeout=60) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode(errors="replace")


def test_a_viewer_sees_every_action_disabled_and_the_api_refuses_each_with_403(oncall, browser):
    airflow, config, drifted = oncall
    folder = Path(drifted["report"]).parent.name
    password = json.loads(airflow.password_file.read_text())[VIEWER]  # the api-server generated it at start
    expect = playwright.expect
    timeline = f"http://localhost:{airflow.port}/flywheel/projects/flights/timeline?window={folder}"

    page = logged_in_page(browser, airflow, VIEWER, password)
    page.goto(timeline)
    expect(page.get_by_role("button", name="Retrain now")).to_be_disabled()
    expect(page.get_by_role("button", name="Roll back to v1")).to_be_disabled()
    expect(page.locator(f"tr[data-window='{folder}']").get_by_role("button", name="Acknowledge")).to_be_disabled()

    token = json.loads(urllib.request.urlopen(urllib.request.Request(  # noqa: S310 - loopback
        f"{airflow.base_url}/auth/token", data=json.dumps({"username": VIEWER, "password": password}).encode(),
        headers={"Content-Type": "application/json"}), timeout=60).read())["access_token"]
    actions = f"{airflow.base_url}/flywheel/api/projects/flights/actions"
    for action, body in (("retrain", {"reason": "sent anyway"}), ("rollback", {"version": 1, "reason": "sent anyway"}), ("acknowledge", {"window": folder, "reason": "sent anyway"})):
        code, said = post_json(f"{actions}/{action}", token, body)
        assert code == 403, (action, code, said)
    entries = [json.loads(line) for line in (config.artifacts_dir / "audit.jsonl").read_text().splitlines()]
    assert [(e["action"], e["user"]) for e in entries] == [("retrain", VIEWER), ("rollback", VIEWER)]  # refused by Airflow's API, so audited
    assert all("(HTTP 403)" in e["outcome"] for e in entries)


def test_an_admin_acknowledges_a_drifted_window_with_a_reason_and_the_audit_page_lists_it(oncall, browser):
    airflow, config, drifted = oncall
    folder = Path(drifted["report"]).parent.name
    expect = playwright.expect
    page = logged_in_page(browser, airflow)
    page.goto(f"http://localhost:{airflow.port}/flywheel/projects/flights/timeline?window={folder}")
    row = page.locator(f"tr[data-window='{folder}']")

    row.get_by_role("button", name="Acknowledge").click()  # without a reason: the browser refuses to send it
    expect(row.locator(".result")).to_have_text("")
    row.get_by_placeholder("Why (required)").fill("known: the schedule change of March")
    row.get_by_role("button", name="Acknowledge").click()

    expect(row.locator(".result")).to_contain_text(f"window {folder} of flights acknowledged")
    expect(row.locator(".result")).to_contain_text("monitoring.alertmanager")  # none configured here: nothing silenced, and it says so
    page.reload()
    expect(row).to_contain_text(f"acknowledged by {ADMIN_USER} until")
    page.get_by_role("link", name="Audit", exact=True).click()
    audited = page.locator("tr", has_text="acknowledge").first
    expect(audited).to_contain_text(ADMIN_USER)
    expect(audited).to_contain_text("known: the schedule change of March")
