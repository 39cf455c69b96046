"""Safe rollout in one real Airflow (scheduler, dag-processor, triggerer, api-server) and one real
Triton. ``flights``: a challenger promoted by a real ``retrain__flights`` run goes into shadow,
its ``challenger_in_shadow`` Asset starts ``rollout__flights`` by itself, and real flights sent
with plain tritonclient, their real delays coming back, take it through the sequential test to a
canary and to full traffic; a worse challenger (the weak first model against the new champion)
is aborted in shadow. ``approvals`` (``rollout.approval: required``): the run waits in Airflow's
Required Actions (seen in a real browser, with the model card it links); an approval through the
REST API continues it, a rejection aborts, no answer aborts at the timeout. Every decision is in the challenger's lineage. Last, the alert path: a
canary's planted error spike on Triton's metrics endpoint fires FlywheelCanaryErrors in a real
Prometheus, a real Alertmanager posts it to the alert receiver, which triggers
``rollback__flights`` through Airflow's REST API, and the champion serves alone again with no
failed request among the good ones sent throughout.
"""

from __future__ import annotations

import hashlib
import time
import urllib.parse

import numpy as np
import pytest
import yaml

from pipelines import audit
from pipelines.config import load_deployment
from pipelines.data.ingest import ingest_landing
from pipelines.data.replay import land, month_batch
from pipelines.data.versioning import version_split
from pipelines.evaluation.gate import evaluate
from pipelines.export.onnx import export
from pipelines.feedback.labels import ingest_feedback, land_feedback
from pipelines.launch.airflow import ADMIN_USER, LocalAirflow
from pipelines.launch.demo import send_as_a_service
from pipelines.launch.triton import TritonServer
from pipelines.serving import repository, rollout
from pipelines.serving.publish import publish
from pipelines.serving.repository import CANARY, SHADOW, Route
from pipelines.training.train import train
from tests.conftest import REPO, free_ports, make_home, make_project
from tests.e2e.test_drift_loop import wait_for_new_run
from tests.monitoring.test_alert_receiver import ALERTMANAGER, PROMETHEUS, alertmanager_config_copy, get, quick_rules, start, wait_for
from tests.serving.traffic import Traffic

pytestmark = pytest.mark.e2e
ROWS = 4000
STAGE_ROWS = 400  # flights sent per stage; their delays come back
# Each stage's flights: distinct March flights (the season the challenger was trained just before).
MARCH = month_batch("2013-03", 3 * STAGE_ROWS, seed=1)
SHADOW_ROWS, CANARY_ROWS, WORSE_ROWS = (MARCH.iloc[i * STAGE_ROWS : (i + 1) * STAGE_ROWS] for i in range(3))
POKE_S = 3
APPROVAL_TIMEOUT_H = 0.02  # 72 s: long enough for the test to answer on a busy machine; the timeout run waits it out
RUN = {"dag_id": "test", "run_id": "manual__test", "run_type": "manual", "logical_date": None}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    home = tmp_path_factory.mktemp("rollout")
    http, grpc, metrics, airflow_port, gateway_port = free_ports(5)
    triton = {"url": f"127.0.0.1:{http}", "http_port": http, "grpc_port": grpc, "metrics_port": metrics}
    make_home(home, {"serving": {"triton": triton, "log": {"flush_seconds": 0.5}}, "metrics": {"pushgateway": f"127.0.0.1:{gateway_port}"}})
    # the rollout's stage gauges go to a Pushgateway, as in a deployment (the alert path reads them)
    gateway = start(["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{gateway_port}", f"--persistence.file={home / 'pushgateway.data'}"], home / "pushgateway.log")
    stage = {"enabled": True, "poke_seconds": POKE_S, "min_labels": 100, "stage_hours": 1}
    config = make_project(home, {"rollout": stage}, name="flights")
    # any challenger passes its stages here (margin 1 on a Brier difference): this project tests the approvals
    gated = make_project(
        home,
        {"model": {"name": "gated_delay"}, "rollout": {**stage, "min_labels": 20, "margin": 1.0, "approval": "required", "approval_timeout_hours": APPROVAL_TIMEOUT_H}},
        name="approvals",
    )
    for project in (config, gated):
        for month in ("2013-01", "2013-02"):
            land(project.dataset, month, rows=ROWS)
    local = LocalAirflow(home / "airflow", REPO / "dags", REPO / "plugins", port=airflow_port, extra_env={"FLYWHEEL_HOME": str(home)}, scheduled=True)
    try:
        with TritonServer(load_deployment(home)), local:
            # the champions: a barely trained first model (one epoch at a learning rate of 1e-5), served in full
            weak = {}
            for project in (config, gated):
                ingest_landing(project)
                data_version = version_split(project)["data_version"]
                weak[project.name] = train(project, data_version, {"max_epochs": 1, "learning_rate": 1e-5})["candidate"]
                export(project, weak[project.name])
                forced = evaluate(project, weak[project.name], force_publish=True, force_reason="test: the weak champion")
                assert publish(project, weak[project.name], forced, data_version, RUN)["version"] == 1
            for dag_id in ("retrain__flights", "rollout__flights", "rollout__approvals"):
                local.wait_for_dag(dag_id)
                local.unpause(dag_id)
            yield local, config, gated, weak
    finally:
        gateway.terminate()
        gateway.wait(timeout=10)


def serve_and_label(config, sent) -> None:
    """Real flights (none sent before) sent to Triton by a plain gRPC client, their ids as request
    ids; then their true delays come back through the feedback join."""
    send_as_a_service(config.serving.triton.grpc_port, config.model.name, config.dataset, sent)
    time.sleep(1.5)  # the log's flush (0.5 s) and the shadow run behind it
    labels = config.home / f"labels-{config.name}-{sent[config.dataset.id_column].iloc[0]}.csv"
    sent[[config.dataset.id_column, config.dataset.label.column]].set_axis(["request_id", "label"], axis=1).to_csv(labels, index=False)
    land_feedback(config, labels)
    joined = ingest_feedback(config)
    assert joined["labelled"] == len(sent), joined


def wait_for_task(airflow: LocalAirflow, dag_id: str, run_id: str, task_id: str, states: set[str], timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = next((t["state"] for t in airflow.task_instances(dag_id, run_id) if t["task_id"] == task_id), None)
        if state in states:
            return state
        time.sleep(1)
    raise AssertionError(f"{dag_id} {run_id}: {task_id} not in {states} after {timeout} s: {airflow.task_instances(dag_id, run_id)}")


def test_a_better_challenger_goes_from_shadow_to_canary_to_full_by_itself(deployment):
    airflow, config, _, _ = deployment
    known = {r["dag_run_id"] for r in airflow.dag_runs("rollout__flights")}
    retrain = airflow.trigger("retrain__flights", {"force_publish": True, "force_reason": "test: the gate is not under test here"})
    assert airflow.wait_for_run("retrain__flights", retrain, timeout=900) == "success", airflow.task_instances("retrain__flights", retrain)
    assert airflow.xcom("retrain__flights", retrain, "publish")["rollout"] == 2
    assert repository.served_version(config.model_dir) == 1 and repository.route_of(config.model_dir) == Route(2, SHADOW, 0.0)
    run_id = wait_for_new_run(airflow, "rollout__flights", known)  # started by the challenger_in_shadow Asset

    serve_and_label(config, SHADOW_ROWS)
    wait_for_task(airflow, "rollout__flights", run_id, "canary", {"success"})
    assert repository.route_of(config.model_dir) == Route(2, CANARY, config.rollout.canary_share)
    serve_and_label(config, CANARY_ROWS)
    assert airflow.wait_for_run("rollout__flights", run_id, timeout=300) == "success", airflow.task_instances("rollout__flights", run_id)

    assert repository.served_version(config.model_dir) == 2 and repository.route_of(config.model_dir) is None
    record = repository.lineage_of(config.model_dir, 2)["rollout"]
    assert record["outcome"] == "full"
    for stage in (SHADOW, CANARY):
        look = record["stages"][stage]["last_look"]
        assert look["decision"] == "promote" and look["lower"] > 0 and look["rows"] >= config.rollout.min_labels, look
        print(f"{stage}: promoted after {look['rows']} labelled rows, bounds [{look['lower']:.4f}, {look['upper']:.4f}], traffic {look['traffic']}")
    canary = record["stages"][CANARY]["last_look"]["traffic"]
    assert canary["challenger"]["answered_rows"] > 0 and canary["champion"]["answered_rows"] > canary["challenger"]["answered_rows"]
    states = {t["task_id"]: t["state"] for t in airflow.task_instances("rollout__flights", run_id)}
    assert states["abort"] == states["abort_canary"] == "skipped" and states["full"] == "success"


def test_a_worse_challenger_is_aborted_in_shadow_before_any_client_sees_it(deployment):
    airflow, config, _, weak = deployment
    third = publish(config, weak["flights"], evaluate(config, weak["flights"], force_publish=True, force_reason="test: a worse challenger"), {}, {**RUN, "run_id": "manual__worse"})
    assert third["rollout"] == 3 and repository.served_version(config.model_dir) == 2
    run_id = airflow.trigger("rollout__flights", {"version": 3})

    serve_and_label(config, WORSE_ROWS)
    assert airflow.wait_for_run("rollout__flights", run_id, timeout=300) == "success", airflow.task_instances("rollout__flights", run_id)

    assert repository.served_version(config.model_dir) == 2 and repository.route_of(config.model_dir) is None
    record = repository.lineage_of(config.model_dir, 3)["rollout"]
    look = record["stages"][SHADOW]["last_look"]
    assert record["outcome"] == "aborted" and look["decision"] == "abort" and look["upper"] < 0, look
    assert look["traffic"]["challenger"]["answered_rows"] == 0  # in shadow no client got its answers
    print(f"worse challenger aborted after {look['rows']} labelled rows, bounds [{look['lower']:.4f}, {look['upper']:.4f}]")
    states = {t["task_id"]: t["state"] for t in airflow.task_instances("rollout__flights", run_id)}
    assert states["abort"] == "success" and states["canary"] == "skipped"


def awaiting(airflow: LocalAirflow, dag_id: str, run_id: str, task_id: str) -> dict:
    """The run's required action of ``task_id`` once it waits for a person."""
    wait_for_task(airflow, dag_id, run_id, task_id, {"deferred", "awaiting_input"})
    actions = [a for a in airflow.required_actions(dag_id, run_id) if a["task_instance"]["task_id"] == task_id]
    assert actions and actions[0]["response_received"] is False, actions
    # Airflow 3.3.2 loses a response given within about 0.1 s of the task pausing (seen here: the
    # task ran again and asked anew); no person answers that fast, a test must not either
    time.sleep(2)
    return actions[0]


def approvers_view(airflow: LocalAirflow, subject: str) -> None:
    """What the approver sees, in headless Chromium signed in to Airflow: the run in the UI's
    Required Actions, and the model card its form links to, every section there."""
    from pipelines.serving.model_card import SECTIONS
    from tests.browser.chromium import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, logged_in_page, playwright

    with playwright.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = logged_in_page(chromium, airflow)
            base = f"http://localhost:{airflow.port}"
            page.goto(f"{base}/required_actions")
            playwright.expect(page.get_by_text(subject).first).to_be_visible(timeout=TIMEOUT_MS)
            page.goto(f"{base}/flywheel/projects/approvals/versions/2/card")
            for name, title in SECTIONS.items():
                playwright.expect(page.locator(f"section#{name} h2")).to_have_text(title, timeout=TIMEOUT_MS)
            playwright.expect(page.locator("section#rollout h3").first).to_have_text("shadow")  # the look the approver decides on
        finally:
            chromium.close()


def test_approvals_wait_for_a_person_continue_when_approved_and_abort_when_rejected(deployment):
    airflow, _, gated, _ = deployment
    trained = train(gated, repository.lineage_of(gated.model_dir, 1)["data_version"])["candidate"]
    export(gated, trained)
    assert publish(gated, trained, evaluate(gated, trained, force_publish=True, force_reason="test"), {}, {**RUN, "run_id": "manual__gated"})["rollout"] == 2
    run_id = airflow.trigger("rollout__approvals", {"version": 2})
    serve_and_label(gated, month_batch("2013-04", 60, seed=4))

    action = awaiting(airflow, "rollout__approvals", run_id, "approve_canary")
    assert action["options"] == ["Approve", "Reject"] and "/flywheel/projects/approvals/versions/2/card" in action["body"]
    assert repository.route_of(gated.model_dir) == Route(2, SHADOW, 0.0)  # nothing moves without the person
    approvers_view(airflow, action["subject"])
    airflow.respond("rollout__approvals", run_id, "approve_canary", ["Approve"], {"comment": "shadow looks fine"})
    wait_for_task(airflow, "rollout__approvals", run_id, "canary", {"success"})
    assert repository.route_of(gated.model_dir).mode == CANARY
    serve_and_label(gated, month_batch("2013-05", 60, seed=5))
    awaiting(airflow, "rollout__approvals", run_id, "approve_full")
    airflow.respond("rollout__approvals", run_id, "approve_full", ["Reject"], {"comment": "not before the holidays"})
    assert airflow.wait_for_run("rollout__approvals", run_id, timeout=120) == "success"

    assert repository.served_version(gated.model_dir) == 1 and repository.route_of(gated.model_dir) is None
    record = repository.lineage_of(gated.model_dir, 2)["rollout"]
    assert record["outcome"] == "aborted"
    assert record["stages"][CANARY]["approval"]["comment"] == "shadow looks fine" and record["stages"][CANARY]["approval"]["by"]
    assert record["stages"]["aborted"]["approval"]["chosen"] == ["Reject"] and "not before the holidays" in record["stages"]["aborted"]["reason"]
    # and both answers are in the project's audit trail, with who gave them
    approvals = [(e["user"], e["reason"], e["outcome"], e["run_id"]) for e in audit.read(gated)[0] if e["action"] == audit.APPROVAL]
    assert approvals == [(ADMIN_USER, "shadow looks fine", "Approve: v2 to canary", run_id), (ADMIN_USER, "not before the holidays", "Reject: v2 aborted", run_id)]


def test_an_approval_nobody_gives_aborts_at_its_timeout(deployment):
    airflow, _, gated, _ = deployment
    rollout.start(gated, 2, RUN)  # the same challenger in shadow again
    run_id = airflow.trigger("rollout__approvals", {"version": 2})
    serve_and_label(gated, month_batch("2013-06", 60, seed=6))
    awaiting(airflow, "rollout__approvals", run_id, "approve_canary")
    started = time.monotonic()

    assert airflow.wait_for_run("rollout__approvals", run_id, timeout=APPROVAL_TIMEOUT_H * 3600 + 120) == "success"

    print(f"the unanswered approval aborted {time.monotonic() - started:.0f} s after it began waiting (timeout {APPROVAL_TIMEOUT_H * 3600:.0f} s)")
    states = {t["task_id"]: t["state"] for t in airflow.task_instances("rollout__approvals", run_id)}
    assert states["abort_before_canary"] == "success" and states["canary"] == "skipped"
    assert repository.route_of(gated.model_dir) is None and repository.lineage_of(gated.model_dir, 2)["rollout"]["outcome"] == "aborted"


def challenger_keys(count: int, share: float) -> list[str]:
    """Request ids the router sends to the challenger in a canary of ``share`` (its own hash)."""
    keys, i = [], 0
    while len(keys) < count:
        key = f"bad-{i}"
        if int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64 < share:
            keys.append(key)
        i += 1
    return keys


def test_a_canary_error_spike_pages_and_the_alert_rolls_back_through_airflow_with_no_failed_request(deployment, tmp_path):
    import tritonclient.http as http

    from pipelines.launch.airflow import ADMIN_USER
    from pipelines.monitoring.alert_receiver import AirflowTrigger, make_server
    from pipelines.serving import live

    airflow, config, _, _ = deployment
    airflow.unpause("rollback__flights")
    rollout.start(config, 3, RUN)  # the weak version again, now as a canary
    rollout.advance(config, 3, CANARY, RUN, reason="test: a canary to roll back")
    prometheus_port, alertmanager_port = free_ports(2)
    receiver = make_server(AirflowTrigger(airflow.base_url, ADMIN_USER, airflow.password_file), port=0)
    import threading

    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    folder = tmp_path / "monitoring"
    folder.mkdir()
    prometheus_config = folder / "prometheus.yml"
    targets = {"triton": f"127.0.0.1:{config.serving.triton.metrics_port}", "pushgateway": config.metrics.pushgateway}
    prometheus_config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(quick_rules(folder / "alerts.yml"))],
                "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{alertmanager_port}"]}]}]},
                "scrape_configs": [{"job_name": job, "honor_labels": True, "static_configs": [{"targets": [target]}]} for job, target in targets.items()],
            }
        )
    )
    am_config = alertmanager_config_copy(folder / "alertmanager.yml", f"http://127.0.0.1:{receiver.server_address[1]}/alerts")
    logs = [folder / "prometheus.log", folder / "alertmanager.log"]
    servers = [
        start([PROMETHEUS, f"--config.file={prometheus_config}", f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{prometheus_port}",
               "--rules.alert.resend-delay=1s"], logs[0]),
        start([ALERTMANAGER, f"--config.file={am_config}", f"--storage.path={folder / 'am'}", f"--web.listen-address=127.0.0.1:{alertmanager_port}",
               "--cluster.listen-address="], logs[1]),
    ]  # fmt: skip
    prometheus = f"http://127.0.0.1:{prometheus_port}"
    rows = month_batch("2013-06", 20, seed=7)

    def ask(client) -> int:
        time.sleep(0.02)  # a steady client, not one that takes both cores from the servers under test
        return live.answer(client, config.model.name, config.dataset, rows.head(1)).version

    good = Traffic(lambda: live.connect(config.serving.triton), ask)
    try:

        def scraped(promql: str):
            return get(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))["data"]["result"]

        wait_for("the canary's stage scraped", lambda: scraped('flywheel_rollout_stage{stage="canary"}'), logs)
        # the router exports its counts from 0 at load, so the spike is an increase Prometheus sees
        wait_for("the challenger's failures scraped at 0", lambda: scraped('flywheel_router_failures_total{project="flights", role="challenger"} == 0'), logs)
        with good:
            # the planted spike: 150 requests the challenger answers, each with a string input
            # that is not UTF-8, so it fails (the router counts each against the version it routed to)
            client = http.InferenceServerClient(config.serving.triton.url)
            bad = live.request_inputs(config.dataset, rows.head(1), http)
            next(i for i in bad if i.name() == "dest").set_data_from_numpy(np.array([[b"MI\xc1"]], dtype=object))
            for key in challenger_keys(150, config.rollout.canary_share):
                with pytest.raises(Exception, match="not UTF-8"):
                    client.infer(config.model.name, bad, request_id=key)
            started = time.monotonic()
            wait_for("the rollback to end the canary", lambda: repository.route_of(config.model_dir) is None, logs, timeout=180)
            took = time.monotonic() - started
        runs = [r for r in airflow.dag_runs("rollback__flights") if r["dag_run_id"].startswith("alert__")]
        assert len(runs) == 1 and airflow.wait_for_run("rollback__flights", runs[0]["dag_run_id"], timeout=120) == "success"
        result = airflow.xcom("rollback__flights", runs[0]["dag_run_id"], "serve_previous_version")
        assert result["ended_rollout"] == 3 and "FlywheelCanaryErrors" in result["reason"]
        assert good.failures == [] and len(good.answers) > 0, good.failures[:3]
        assert repository.served_version(config.model_dir) == 2 and repository.lineage_of(config.model_dir, 3)["rollout"]["outcome"] == "aborted"
        assert [e for e in audit.read(config)[0] if e["action"] == audit.ROLLBACK] == []  # Alertmanager's rollback is not a person's
        print(f"alert path: the spike's last request to the champion serving alone in {took:.1f} s; {len(good.answers)} good requests, none failed")
    finally:
        receiver.shutdown()
        receiver.server_close()
        for server in servers:
            server.terminate()
            server.wait(timeout=10)
