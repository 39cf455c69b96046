"""From the on-call Models page to the served version's MLflow run, in a real Airflow UI and a real
MLflow tracking server, driven by headless Chromium: the version's lineage names its run
(``tracking.url``), the page links it, and the MLflow UI opens on that run with its curve."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines.artifacts import LINEAGE_FILE
from pipelines.launch.airflow import ADMIN_USER, LocalAirflow
from pipelines.lineage import read_json, write_json
from pipelines.serving import repository
from pipelines.serving.publish import run_record_path
from tests.browser.chromium import TIMEOUT_MS, chromium_browser, logged_in_page, playwright  # noqa: F401 (the browser fixture)
from tests.browser.oncall_project import write_versions
from tests.browser.test_oncall_pages import http_get, open_index
from tests.conftest import REPO, free_ports, make_home, make_project

pytestmark = pytest.mark.e2e
SERVED = 2  # write_versions: version 2 serves
VAL_LOSS = [0.6412, 0.5530, 0.5127, 0.5093]  # one point per epoch
TRAIN_LOSS = [0.6630, 0.5401, 0.4902, 0.4711]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on SQLite, on a free loopback port; its URL."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_ports(1)[0]
    log = (root / "server.log").open("wb")
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
    ]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def log_training_run(tracking_uri: str, project: str, version: int, lineage: str) -> dict:
    """A training run as MLflow holds it: in the project's experiment, tagged with the project,
    version and lineage, a param, and per-epoch train and validation loss. Its ids and name."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(project)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(project)
    tags = {"flywheel.project": project, "flywheel.version": str(version), "flywheel.lineage": lineage}
    run = client.create_run(experiment_id, tags=tags, run_name=f"{project}-v{version}")
    run_id = run.info.run_id
    client.log_param(run_id, "learning_rate", 0.003)
    for epoch, (train, val) in enumerate(zip(TRAIN_LOSS, VAL_LOSS, strict=True)):
        client.log_metric(run_id, "train_loss", train, step=epoch)
        client.log_metric(run_id, "val_loss", val, step=epoch)
    client.set_terminated(run_id)
    return {"experiment_id": experiment_id, "run_id": run_id, "run_name": run.info.run_name}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, mlflow_server):
    """The ``flights`` deployment of the on-call pages (versions 1 to 3, 2 serving) whose served
    version's lineage and run record name its run on the MLflow server, and an Airflow serving the
    plugin. Yields the Airflow and the MLflow run (``log_training_run``)."""
    root = tmp_path_factory.mktemp("mlflow_link")
    config = make_project(make_home(root / "home", {"tracking": {"uri": mlflow_server}}))
    write_versions(config)
    lineage_file = config.served_model_dir / str(SERVED) / LINEAGE_FILE
    run = log_training_run(mlflow_server, config.name, SERVED, config.portable(lineage_file))
    tracking = {
        "status": "logged",
        **run,
        "url": f"{config.tracking.ui_url}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}",
        "detail": f"MLflow at {mlflow_server}",
    }
    tracking.pop("run_name")
    run["url"] = tracking["url"]
    lineage = read_json(lineage_file)
    write_json(lineage_file, {**lineage, "tracking": tracking})
    record = run_record_path(config.artifacts_dir, lineage["airflow"]["run_id"])
    write_json(record, {**read_json(record), "tracking": tracking})
    assert repository.lineage_of(config.served_model_dir, SERVED)["tracking"]["url"].startswith(mlflow_server)
    airflow = LocalAirflow(
        root / "airflow", REPO / "dags", REPO / "plugins", port=free_ports(1)[0],
        extra_env={"FLYWHEEL_HOME": str(config.home), "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin"},
        scheduled=False,
    )
    with airflow:
        # the plugin's first request imports pipelines (tens of seconds on a small machine): not
        # on the browser's clock
        status, _ = http_get(f"{airflow.base_url}/flywheel/api/projects", {"Authorization": f"Bearer {airflow.token()}"})
        assert status == 200
        yield airflow, run


def test_the_served_versions_mlflow_link_opens_its_run_with_the_validation_curve(tracked, browser, tmp_path):
    airflow, run = tracked
    page = logged_in_page(browser, airflow)
    failed: list[str] = []
    page.on("requestfailed", lambda request: failed.append(f"failed {request.url}"))
    page.on("response", lambda response: failed.append(f"{response.status} {response.url}") if response.status >= 400 else None)
    frame = open_index(page)
    frame.locator("#projects tr[data-project='flights']").get_by_role("link", name="Models", exact=True).click()

    expect = playwright.expect
    served = frame.locator("#versions tr.serving")
    expect(served).to_contain_text(f"{SERVED}", timeout=TIMEOUT_MS)
    link = served.get_by_role("link", name="MLflow run", exact=True)
    expect(link).to_have_attribute("href", run["url"])
    page.screenshot(path=tmp_path / "models.png")
    with page.context.expect_page() as opened:
        link.click()
    mlflow = opened.value
    mlflow.wait_for_load_state()
    expect(mlflow.get_by_text(run["run_id"]).first).to_be_visible(timeout=TIMEOUT_MS)
    expect(mlflow.get_by_text("val_loss").first).to_be_visible(timeout=TIMEOUT_MS)
    mlflow.screenshot(path=tmp_path / "mlflow_run.png", full_page=True)
    assert not failed, f"failed requests on the Flywheel pages: {failed}"
    print(f"screenshots in {tmp_path}")
