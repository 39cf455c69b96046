"""From the on-call Models page to the served version's MLflow run, in a real Airflow UI and a real
MLflow tracking server (the session's ``mlflow_server``), driven by headless Chromium.

The run is opened and logged to by ``pipelines.tracking`` as training does (params, a train and
a validation loss per epoch, the gate's metrics and decision, the version's tags), and its
record goes into the served version's lineage and its run record as publish puts it there;
the Models page links it, and the MLflow UI opens on that run with its curve."""

from __future__ import annotations

import re

import pytest

from pipelines import tracking
from pipelines.artifacts import LINEAGE_FILE
from pipelines.launch.airflow import ADMIN_USER, LocalAirflow
from pipelines.lineage import read_json, write_json
from pipelines.serving.publish import run_record_path
from tests.browser.chromium import TIMEOUT_MS, chromium_browser, logged_in_page, playwright  # noqa: F401 (the browser fixture)
from tests.browser.oncall_project import write_versions
from tests.browser.test_oncall_pages import http_get, open_index
from tests.conftest import REPO, free_ports, make_home, make_project

pytestmark = pytest.mark.e2e
SERVED = 2  # write_versions: version 2 serves
TRAIN_LOSS = [0.6630, 0.5401, 0.4902, 0.4711]  # one point per epoch
VAL_LOSS = [0.6412, 0.5530, 0.5127, 0.5093]


def track_served_version(config, run_name: str) -> dict:
    """The MLflow run of the served version, as training, the gate and publish log it, written
    into the version's ``lineage.json`` and its run record (``tracking``); the tracking record."""
    lineage_file = config.served_model_dir / str(SERVED) / LINEAGE_FILE
    lineage = read_json(lineage_file)
    folder = config.artifacts_dir / "candidates" / config.model.name / lineage["candidate"]  # training keeps tracking.json there
    record = tracking.open_run(config.tracking, config.name, folder, run_name, {"train": {"learning_rate": 0.003, "max_epochs": len(VAL_LOSS)}}, {})
    assert record["status"] == tracking.LOGGED, record  # the server answered: the run is on it, with its page
    for epoch, (train, val) in enumerate(zip(TRAIN_LOSS, VAL_LOSS, strict=True)):
        assert tracking.log_to(record, {"train_loss": train, "val_loss": val}, step=epoch)
    assert tracking.log_decision(folder, lineage["gate"])
    runs = run_record_path(config.artifacts_dir, lineage["airflow"]["run_id"])
    assert tracking.log_to(record, tags={tracking.VERSION_TAG: str(SERVED), tracking.LINEAGE_TAG: config.portable(runs)})
    tracking.finish(record)
    write_json(lineage_file, {**lineage, "tracking": record})
    write_json(runs, {**read_json(runs), "tracking": record})
    return record


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, mlflow_server):
    """The ``flights`` deployment of the on-call pages (versions 1 to 3, 2 serving) tracking to
    the session's MLflow server, its served version's run on that server, and an Airflow serving
    the plugin. Yields the Airflow and the served version's tracking record."""
    root = tmp_path_factory.mktemp("mlflow_link")
    config = make_project(make_home(root / "home", {"tracking": {"uri": mlflow_server}}))
    write_versions(config)
    record = track_served_version(config, f"flights-v{SERVED}")
    airflow = LocalAirflow(
        root / "airflow", REPO / "dags", REPO / "plugins", port=free_ports(1)[0],
        extra_env={"FLYWHEEL_HOME": str(config.home), "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin"},
        scheduled=False,
    )
    with airflow:
        # the plugin's first request imports pipelines (tens of seconds on 2 cores): not on the browser's clock
        status, _ = http_get(f"{airflow.base_url}/flywheel/api/projects", {"Authorization": f"Bearer {airflow.token()}"})
        assert status == 200
        yield airflow, record


def test_the_served_versions_mlflow_link_opens_its_run_with_the_validation_curve(tracked, browser, tmp_path):
    airflow, record = tracked
    page = logged_in_page(browser, airflow)
    failed: list[str] = []
    page.on("requestfailed", lambda request: failed.append(f"failed {request.url}"))
    page.on("response", lambda response: failed.append(f"{response.status} {response.url}") if response.status >= 400 else None)
    frame = open_index(page)
    frame.locator("#projects tr[data-project='flights']").get_by_role("link", name="Models", exact=True).click()

    expect = playwright.expect
    served = frame.locator("#versions tr.serving")
    expect(served).to_contain_text("asset_triggered__2026-03-01T11:00:00+00:00", timeout=TIMEOUT_MS)
    link = served.get_by_role("link", name="MLflow run", exact=True)
    expect(link).to_have_attribute("href", record["url"])
    assert f"/#/experiments/{record['experiment_id']}/runs/{record['run_id']}" in record["url"]
    expect(frame.locator("#versions a.mlflow-link")).to_have_count(1)  # versions 1 and 3 were not tracked
    expect(frame.locator("#runs a.mlflow-link")).to_have_count(1)  # the run that made version 2
    page.screenshot(path=tmp_path / "models.png")

    # Airflow's iframe is sandboxed without allow-popups: the page's links.js opens it from the UI
    with page.context.expect_page() as opened:
        link.click()
    mlflow = opened.value
    expect(mlflow).to_have_url(record["url"])
    expect(mlflow.get_by_text(record["run_id"]).first).to_be_visible(timeout=TIMEOUT_MS)  # "Run ID" of the run's page
    expect(mlflow.get_by_role("heading", name=f"flights-v{SERVED}").first).to_be_visible()
    metrics = mlflow.get_by_role("row").filter(has_text="val_loss").first
    expect(metrics).to_contain_text(f"{VAL_LOSS[-1]}")  # the last epoch's value
    expect(mlflow.get_by_text(tracking.VERSION_TAG).first).to_be_visible()  # the run points back at the version
    mlflow.screenshot(path=tmp_path / "mlflow_run.png", full_page=True)

    # and its curves, one point per epoch
    mlflow.get_by_role("tab", name="Model metrics").click()
    mlflow.get_by_role("searchbox", name="Search metric charts").fill("val_loss")  # the charts below the fold are drawn lazily
    expect(mlflow.get_by_role("heading", name="val_loss", exact=True)).to_be_visible(timeout=TIMEOUT_MS)
    expect(mlflow.locator(".js-plotly-plot .scatterlayer .point")).to_have_count(len(VAL_LOSS), timeout=TIMEOUT_MS)  # drawn by plotly
    mlflow.screenshot(path=tmp_path / "mlflow_curves.png")
    assert not failed, f"failed requests on the Flywheel pages: {failed}"

    # links.js follows the Airflow run's link (target _top) out of the iframe the same way
    served.locator("a.run-link").click()
    expect(page).to_have_url(re.compile(r"/dags/retrain__flights/runs/asset_triggered__2026-03-01T11%3A00%3A00%2B00%3A00$"))
    print(f"screenshots in {tmp_path}")
