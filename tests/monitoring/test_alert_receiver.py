"""The alert receiver (pipelines/monitoring/alert_receiver.py) turns Alertmanager's firing
rollback alerts into exactly one ``rollback__<project>`` run each, through Airflow's REST API.

Against a fake Airflow (a small HTTP server here that issues tokens, records the runs it is asked
to start and answers 200, 409, 401, 404 or 503 as a real api-server would): the one place a
stand-in is right, since a real Airflow cannot be made to answer 503 or lose a token on demand.
The full chain against a real Airflow and Triton is the end-to-end test's.

Live: a real Prometheus scrapes a metrics endpoint started here that exposes the router's
metrics (as Triton's metrics endpoint does) with a planted error spike of a canary and the
rollout DAG's stage gauge; it evaluates the repository's rules (every ``for`` 0s) and sends to a
real Alertmanager (Debian's prometheus-alertmanager) running a copy of the shipped config with a
loopback url and timings of a second, which posts to the receiver: one rollback run, with the
fingerprint and start Alertmanager itself reports, however often Alertmanager repeats.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.monitoring import alert_receiver
from pipelines.monitoring.alert_receiver import AirflowTrigger, make_server, run_id
from tests.conftest import REPO, free_ports
from tests.monitoring.test_live_alerts import quick_rules, wait_for

ALERTMANAGER_CONFIG = REPO / "pipelines/monitoring/alertmanager/alertmanager.yml"
PROMETHEUS, ALERTMANAGER = "prometheus", "prometheus-alertmanager"
USER, PASSWORD = "admin", "s3cret-Pw"
FINGERPRINT, STARTS_AT = "3f9b2c1d0e8a7b6c", "2026-03-01T05:00:00.123456789Z"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- a fake Airflow ---------------------------------------------------------------------------


@dataclass
class FakeAirflow:
    """Airflow 3's ``POST /auth/token`` and ``POST /api/v2/dags/{dag_id}/dagRuns`` as the receiver
    uses them: a run id is taken once (then 409), a call without a valid token is 401. ``fail``
    makes every trigger answer that status instead."""

    url: str = ""
    runs: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (dag, run id) -> the trigger body
    triggers: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # every trigger call: (dag, body)
    logins: list[dict[str, Any]] = field(default_factory=list)
    tokens: set[str] = field(default_factory=set)
    fail: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def expire_tokens(self) -> None:
        self.tokens.clear()


def fake_handler(fake: FakeAirflow) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with fake.lock:
                if self.path == "/auth/token":
                    fake.logins.append(body)
                    if body != {"username": USER, "password": PASSWORD}:
                        return self.answer(401, {"detail": "Invalid credentials"})
                    token = f"token-{len(fake.logins)}"
                    fake.tokens.add(token)
                    return self.answer(201, {"access_token": token})
                parts = self.path.split("/")  # /api/v2/dags/<dag>/dagRuns
                if parts[:4] != ["", "api", "v2", "dags"] or parts[5:] != ["dagRuns"]:
                    return self.answer(404, {"detail": "Not Found"})
                if self.headers.get("Authorization", "").removeprefix("Bearer ") not in fake.tokens:
                    return self.answer(401, {"detail": "Not authenticated"})
                dag = parts[4]
                fake.triggers.append((dag, body))
                if fake.fail is not None:
                    return self.answer(fake.fail, {"detail": f"fake Airflow answers {fake.fail}"})
                if (dag, body["dag_run_id"]) in fake.runs:
                    return self.answer(409, {"detail": f"DAG Run with id {body['dag_run_id']} already exists"})
                fake.runs[(dag, body["dag_run_id"])] = body
                now = "2026-03-01T05:00:05Z"
                run = {"dag_id": dag, "dag_display_name": dag, "dag_run_id": body["dag_run_id"], "dag_versions": [], "conf": body["conf"],
                       "logical_date": None, "run_after": now, "queued_at": now, "run_type": "manual", "state": "queued", "triggered_by": "rest_api"}  # fmt: skip
                return self.answer(200, run)

        def answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    return Handler


@pytest.fixture
def airflow() -> Iterator[FakeAirflow]:
    fake = FakeAirflow()
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake_handler(fake))
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


def password_file(folder: Path, text: str | None = None) -> Path:
    """The simple auth manager's password file, as LocalAirflow and Airflow write it."""
    file = folder / "simple_auth_manager_passwords.json.generated"
    file.write_text(text if text is not None else json.dumps({USER: PASSWORD, "viewer": "other"}) + "\n")
    return file


@dataclass
class Receiver:
    url: str
    trigger: AirflowTrigger

    def post(self, body: bytes | dict[str, Any] | list[Any], path: str = "/alerts") -> tuple[int, dict[str, Any]]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST", headers={"Content-Type": "application/json"})
        try:
            with OPENER.open(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())


def start_receiver(trigger: AirflowTrigger) -> tuple[Receiver, ThreadingHTTPServer]:
    server = make_server(trigger, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return Receiver(f"http://127.0.0.1:{server.server_address[1]}", trigger), server


@pytest.fixture
def receiver(airflow: FakeAirflow, tmp_path: Path) -> Iterator[Receiver]:
    started, server = start_receiver(AirflowTrigger(airflow.url, USER, password_file(tmp_path), timeout=5))
    yield started
    server.shutdown()
    server.server_close()


def alert(name: str = "FlywheelCanaryErrors", status: str = "firing", fingerprint: str = FINGERPRINT, starts_at: str = STARTS_AT, **labels: str) -> dict[str, Any]:
    """One alert of Alertmanager's webhook message (version 4), by default a firing canary-errors alert of flights."""
    return {
        "status": status,
        "labels": {"alertname": name, "severity": "critical", "action": "rollback", "project": "flights", "model": "flights_delay", "version": "4", **labels},
        "annotations": {"summary": "Canary version 4 of flights_delay fails 20% of its requests", "runbook_url": "docs/oncall.md#canary-errors"},
        "startsAt": starts_at,
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-03-01T05:20:00Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=...",
        "fingerprint": fingerprint,
    }


def message(*alerts: dict[str, Any]) -> dict[str, Any]:
    """Alertmanager's webhook message holding ``alerts``."""
    return {
        "version": "4",
        "groupKey": '{}/{action="rollback"}:{alertname="FlywheelCanaryErrors", model="flights_delay", project="flights"}',
        "truncatedAlerts": 0,
        "status": "firing" if any(a["status"] == "firing" for a in alerts) else "resolved",
        "receiver": "flywheel-rollback",
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": list(alerts),
    }


REASON = f"FlywheelCanaryErrors: Canary version 4 of flights_delay fails 20% of its requests (Alertmanager, fingerprint {FINGERPRINT})"
RUN_ID = f"alert__{FINGERPRINT}__{STARTS_AT}"


# --- unit: the receiver against the fake Airflow ----------------------------------------------


def test_a_firing_rollback_alert_triggers_one_rollback_run_of_its_project(receiver, airflow):
    status, body = receiver.post(message(alert()))

    assert (status, body) == (200, {"triggered": [RUN_ID], "existing": [], "ignored": [], "failed": []})
    assert airflow.runs == {("rollback__flights", RUN_ID): {"dag_run_id": RUN_ID, "logical_date": None, "conf": {"version": None, "rollout_only": True, "reason": REASON}}}
    # logged in with the admin's password from the simple auth manager's file
    assert airflow.logins == [{"username": USER, "password": PASSWORD}]


def test_a_repeated_notification_of_the_same_firing_starts_no_second_run(receiver, airflow):
    receiver.post(message(alert()))

    status, body = receiver.post(message(alert()))  # repeat_interval later, or a retry

    assert (status, body) == (200, {"triggered": [], "existing": [RUN_ID], "ignored": [], "failed": []})
    assert len(airflow.triggers) == 2 and list(airflow.runs) == [("rollback__flights", RUN_ID)]
    assert len(airflow.logins) == 1  # the token is reused


def test_the_same_alert_firing_again_after_it_resolved_rolls_back_again(receiver, airflow):
    receiver.post(message(alert()))
    later = "2026-03-01T07:30:00.5Z"

    status, body = receiver.post(message(alert(starts_at=later)))

    assert status == 200 and body["triggered"] == [f"alert__{FINGERPRINT}__{later}"]
    assert sorted(run for _, run in airflow.runs) == sorted([RUN_ID, f"alert__{FINGERPRINT}__{later}"])


def test_two_projects_firing_in_one_message_each_get_their_rollback(receiver, airflow):
    status, body = receiver.post(message(alert(), alert(fingerprint="77aa", project="taxis", model="taxis_delay")))

    assert status == 200 and body["triggered"] == [RUN_ID, f"alert__77aa__{STARTS_AT}"]
    assert set(airflow.runs) == {("rollback__flights", RUN_ID), ("rollback__taxis", f"alert__77aa__{STARTS_AT}")}


def test_resolved_non_rollback_and_projectless_alerts_are_ignored_without_calling_airflow(receiver, airflow, caplog):
    caplog.set_level("INFO", logger=alert_receiver.__name__)
    drift = alert("FlywheelDriftDetected", severity="warning")
    del drift["labels"]["action"]
    projectless = alert("FlywheelCanaryWorse")
    del projectless["labels"]["project"]

    status, body = receiver.post(message(alert(status="resolved"), drift, projectless))

    assert status == 200
    assert body == {
        "triggered": [],
        "existing": [],
        "ignored": ["FlywheelCanaryErrors: resolved", "FlywheelDriftDetected: not action=rollback", "FlywheelCanaryWorse: action=rollback without a project label"],
        "failed": [],
    }
    assert airflow.logins == [] and airflow.triggers == []
    assert "alert ignored: FlywheelCanaryWorse: action=rollback without a project label" in caplog.text


def test_a_rollback_alert_beside_ignored_ones_is_still_triggered(receiver, airflow):
    drift = alert("FlywheelDriftDetected", fingerprint="11")
    drift["labels"]["action"] = "page"

    status, body = receiver.post(message(drift, alert()))

    assert status == 200 and body["triggered"] == [RUN_ID] and body["ignored"] == ["FlywheelDriftDetected: not action=rollback"]
    assert list(airflow.runs) == [("rollback__flights", RUN_ID)]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{not json", "the body is not JSON"),
        (b"\xff\xfe", "the body is not JSON"),
        ([alert()], "expected Alertmanager's webhook JSON object, got list"),
        ({**message(alert()), "version": "3"}, "expected Alertmanager's webhook message version '4', got '3'"),
        ({"version": "4", "alerts": {"a": 1}}, "the webhook message has no list 'alerts'"),
        (message({**alert(), "status": "pending"}), "alerts[0].status is 'pending', not 'firing' or 'resolved'"),
        (message({**alert(), "labels": ["action=rollback"]}), "alerts[0].labels is not an object of strings"),
        (message(alert(), {k: v for k, v in alert().items() if k != "fingerprint"}), "alerts[1] (FlywheelCanaryErrors) has no fingerprint or startsAt"),
        (message(alert(project="../../variables")), "alerts[0]: project label '../../variables' cannot name a DAG"),
    ],
    ids=["not-json", "not-utf8", "a-list", "version-3", "alerts-not-a-list", "bad-status", "bad-labels", "no-fingerprint", "project-not-a-dag-id"],
)
def test_a_body_that_is_not_alertmanagers_webhook_json_is_a_400_saying_why_and_triggers_nothing(receiver, airflow, body, says):
    status, answer = receiver.post(body)

    assert status == 400 and says in answer["error"], answer
    assert airflow.triggers == []


def test_airflow_failing_is_a_503_so_alertmanager_retries_and_the_retry_triggers(receiver, airflow):
    airflow.fail = 503

    status, body = receiver.post(message(alert()))

    assert status == 503 and body["triggered"] == [] and airflow.runs == {}
    assert body["failed"] == [f"rollback__flights {RUN_ID}: trigger_dag_run {airflow.url} (rollback__flights) -> HTTP 503: " + json.dumps({"detail": "fake Airflow answers 503"})]

    airflow.fail = None  # Airflow back: Alertmanager's retry goes through
    status, body = receiver.post(message(alert()))

    assert (status, body["triggered"]) == (200, [RUN_ID])


def test_airflow_refusing_the_run_is_a_502_and_the_other_alerts_are_still_triggered(receiver, airflow):
    airflow.fail = 404  # e.g. rollback__<project> not parsed (yet)

    status, body = receiver.post(message(alert(), alert(fingerprint="77aa", project="taxis")))

    assert status == 502 and len(body["failed"]) == 2 and "HTTP 404" in body["failed"][1]
    assert [dag for dag, _ in airflow.triggers] == ["rollback__flights", "rollback__taxis"]


def test_airflow_not_answering_is_a_503(tmp_path):
    (closed,) = free_ports(1)  # nothing listens there
    receiver, server = start_receiver(AirflowTrigger(f"http://127.0.0.1:{closed}", USER, password_file(tmp_path), timeout=2))
    try:
        status, body = receiver.post(message(alert()))
    finally:
        server.shutdown()
        server.server_close()

    assert status == 503 and body["triggered"] == []
    assert body["failed"][0].startswith(f"rollback__flights {RUN_ID}: POST http://127.0.0.1:{closed}/auth/token -> no response")


def test_an_expired_token_is_fetched_again_once(receiver, airflow):
    receiver.post(message(alert()))
    airflow.expire_tokens()  # the api-server restarted with a new JWT secret, or the token aged out

    status, body = receiver.post(message(alert(starts_at="2026-03-01T09:00:00Z")))

    assert status == 200 and len(body["triggered"]) == 1
    assert len(airflow.logins) == 2 and len(airflow.runs) == 2


def test_a_wrong_password_is_a_5xx_naming_the_login(airflow, tmp_path):
    receiver, server = start_receiver(AirflowTrigger(airflow.url, USER, password_file(tmp_path, "wrong-password\n")))
    try:
        status, body = receiver.post(message(alert()))
    finally:
        server.shutdown()
        server.server_close()

    assert status == 502 and f"POST {airflow.url}/auth/token -> HTTP 401" in body["failed"][0]
    assert airflow.logins == [{"username": USER, "password": "wrong-password"}] and airflow.triggers == []


def test_the_password_file_may_hold_only_the_password(airflow, tmp_path):
    receiver, server = start_receiver(AirflowTrigger(airflow.url, USER, password_file(tmp_path, PASSWORD + "\n")))
    try:
        status, _ = receiver.post(message(alert()))
    finally:
        server.shutdown()
        server.server_close()

    assert status == 200 and airflow.logins == [{"username": USER, "password": PASSWORD}]


def test_a_password_file_without_the_user_is_a_clear_error_at_start_and_a_503_later(airflow, tmp_path):
    file = password_file(tmp_path, json.dumps({"viewer": "other"}))
    with pytest.raises(ValueError, match=f"holds no password of user '{USER}'"):
        alert_receiver.serve(airflow.url, USER, file, port=0)
    with pytest.raises(FileNotFoundError):
        alert_receiver.serve(airflow.url, USER, tmp_path / "missing.json", port=0)

    receiver, server = start_receiver(AirflowTrigger(airflow.url, USER, file))
    try:
        status, body = receiver.post(message(alert()))
    finally:
        server.shutdown()
        server.server_close()
    assert status == 503 and f"no password: {file} holds no password of user '{USER}'" in body["failed"][0]


def test_health_and_unknown_paths(receiver):
    with OPENER.open(receiver.url + "/-/healthy", timeout=5) as response:
        assert (response.status, json.loads(response.read())) == (200, {"status": "ok"})
    assert receiver.post(message(alert()), path="/")[0] == 404
    with pytest.raises(urllib.error.HTTPError) as missing:
        OPENER.open(receiver.url + "/alerts", timeout=5)
    assert missing.value.code == 404


def test_a_long_summary_is_cut_so_the_reason_fits_the_rollback_dags_param(receiver, airflow):
    long = alert()
    long["annotations"]["summary"] = "x" * 600

    status, _ = receiver.post(message(long))

    reason = airflow.runs[("rollback__flights", RUN_ID)]["conf"]["reason"]
    assert status == 200 and len(reason) == 500
    assert reason.startswith("FlywheelCanaryErrors: xxx") and reason.endswith(f"xxx... (Alertmanager, fingerprint {FINGERPRINT})")


def test_the_settings_come_from_the_arguments_then_the_environment_then_flywheel_up(monkeypatch):
    def parsed(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        alert_receiver.add_arguments(parser)
        return parser.parse_args(argv)

    for name in ("FLYWHEEL_AIRFLOW_URL", "FLYWHEEL_AIRFLOW_USER", "FLYWHEEL_AIRFLOW_PASSWORD_FILE", "FLYWHEEL_ALERT_RECEIVER_HOST", "FLYWHEEL_ALERT_RECEIVER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert vars(parsed()) == {
        "host": "127.0.0.1",
        "port": 9095,
        "airflow_url": "http://127.0.0.1:8080",
        "user": "admin",
        "password_file": REPO / ".airflow/simple_auth_manager_passwords.json.generated",  # flywheel up's Airflow
    }
    monkeypatch.setenv("FLYWHEEL_AIRFLOW_URL", "http://airflow-apiserver:8080")
    monkeypatch.setenv("FLYWHEEL_AIRFLOW_PASSWORD_FILE", "/run/secrets/airflow")
    monkeypatch.setenv("FLYWHEEL_ALERT_RECEIVER_PORT", "9999")
    settings = parsed("--port", "9096", "--user", "rollbacker")
    assert (settings.airflow_url, settings.password_file, settings.port, settings.user) == ("http://airflow-apiserver:8080", Path("/run/secrets/airflow"), 9096, "rollbacker")


def test_the_command_serves_until_stopped(airflow, tmp_path):
    # what `flywheel alert-receiver` runs, in a process of its own
    (port,) = free_ports(1)
    script = (
        "import argparse, logging, sys; from pipelines.monitoring import alert_receiver as r; logging.basicConfig(level=logging.INFO); "
        "p = argparse.ArgumentParser(); r.add_arguments(p); r.run_from_args(p.parse_args(sys.argv[1:]))"
    )
    command = [sys.executable, "-c", script, "--port", str(port), "--airflow-url", airflow.url, "--password-file", str(password_file(tmp_path))]
    log = tmp_path / "receiver.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for("the receiver healthy", lambda: OPENER.open(f"http://127.0.0.1:{port}/-/healthy", timeout=2).status == 200, [log], timeout=30)
        status, body = Receiver(f"http://127.0.0.1:{port}", AirflowTrigger("", USER, tmp_path)).post(message(alert()))
    finally:
        process.terminate()
        process.wait(timeout=10)

    assert (status, body["triggered"]) == (200, [RUN_ID]) and list(airflow.runs) == [("rollback__flights", RUN_ID)]
    assert f"triggered rollback__flights run {RUN_ID}: {REASON}" in log.read_text()


def test_run_ids_keep_alertmanagers_start_and_drop_what_airflow_refuses():
    assert run_id("3f9b", "2026-03-01T05:00:00.123+01:00") == "alert__3f9b__2026-03-01T05:00:00.123+01:00"
    assert run_id("3f 9b", "2026/03/01 05:00") == "alert__3f_9b__2026_03_01_05:00"


# --- live: Prometheus -> Alertmanager -> receiver ---------------------------------------------

live = pytest.mark.skipif(
    shutil.which(PROMETHEUS) is None or shutil.which(ALERTMANAGER) is None,
    reason=f"{PROMETHEUS} or {ALERTMANAGER} not installed (Debian packages of the same names; `make install` installs them)",
)


def get(url: str) -> Any:
    with OPENER.open(url, timeout=5) as answer:
        return json.load(answer)


def alertmanager_config_copy(destination: Path, receiver_url: str) -> Path:
    """The shipped Alertmanager config with the webhook at ``receiver_url`` and timings of a
    second (repeats every 2 s, to show that a repeat starts no second run); nothing else changed."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    (route,) = [r for r in config["route"]["routes"] if r["receiver"] == "flywheel-rollback"]
    route.update(group_wait="1s", group_interval="1s", repeat_interval="2s")
    (receiver,) = [r for r in config["receivers"] if r["name"] == "flywheel-rollback"]
    (webhook,) = receiver["webhook_configs"]
    assert webhook["send_resolved"] is False
    webhook["url"] = receiver_url
    destination.write_text(yaml.safe_dump(config, sort_keys=False))
    return destination


def start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@live
def test_a_canary_error_spike_fires_in_prometheus_and_alertmanager_has_the_receiver_roll_back_once(receiver, airflow, tmp_path):
    from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

    metrics_port, prometheus_port, alertmanager_port = free_ports(3)
    # Triton's metrics endpoint as the router fills it: flights' canary (version 4) and champion
    # (3), and taxis' canary, which fails every request but answers only a handful; the rollout
    # DAG's stage of both (pushed through the Pushgateway in a deployment).
    registry = CollectorRegistry()
    labels = ["project", "model", "version", "role"]
    requests = Counter("flywheel_router_requests", "Requests answered, by version and role.", labels, registry=registry)
    failures = Counter("flywheel_router_failures", "Requests answered with an error.", labels, registry=registry)
    stage = Gauge("flywheel_rollout_stage", "1 for the rollout's current stage.", ["project", "model", "stage"], registry=registry)
    flights = {"champion": ("flights", "flights_delay", "3", "champion"), "canary": ("flights", "flights_delay", "4", "challenger")}
    taxis = ("taxis", "taxis_delay", "9", "challenger")
    for series in (*flights.values(), taxis):
        requests.labels(*series)
        failures.labels(*series)
    stage.labels("flights", "flights_delay", "canary").set(1)
    stage.labels("taxis", "taxis_delay", "canary").set(1)
    metrics_server, _ = start_http_server(metrics_port, addr="127.0.0.1", registry=registry)

    folder = tmp_path / "monitoring"
    folder.mkdir()
    prometheus_config = folder / "prometheus.yml"
    prometheus_config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(quick_rules(folder / "alerts.yml"))],
                "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{alertmanager_port}"]}]}]},
                "scrape_configs": [{"job_name": "triton", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
            }
        )
    )
    alertmanager_config = alertmanager_config_copy(folder / "alertmanager.yml", receiver.url + "/alerts")
    logs = [folder / "prometheus.log", folder / "alertmanager.log"]
    servers = [
        start([PROMETHEUS, f"--config.file={prometheus_config}", f"--storage.tsdb.path={folder / 'prometheus-data'}", f"--web.listen-address=127.0.0.1:{prometheus_port}",
               "--rules.alert.resend-delay=1s"], logs[0]),  # alerts that fired before Alertmanager was up reach it too
        # one instance: no gossip port (--cluster.listen-address empty), its own storage
        start([ALERTMANAGER, f"--config.file={alertmanager_config}", f"--storage.path={folder / 'alertmanager-data'}",
               f"--web.listen-address=127.0.0.1:{alertmanager_port}", "--cluster.listen-address="], logs[1]),
    ]  # fmt: skip
    prometheus, alertmanager = f"http://127.0.0.1:{prometheus_port}", f"http://127.0.0.1:{alertmanager_port}"

    def query(promql: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = get(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))["data"]["result"]
        return result

    try:
        for url in (prometheus, alertmanager):
            wait_for(f"{url} ready", lambda url=url: OPENER.open(f"{url}/-/ready", timeout=2).status == 200, logs)
        # Given Prometheus has seen the canary healthy (counters at 0)
        wait_for("the router's counters scraped", lambda: query('flywheel_router_requests_total{project="flights", role="challenger"}'), logs)
        wait_for("Prometheus sending to Alertmanager", lambda: get(f"{prometheus}/api/v1/alertmanagers")["data"]["activeAlertmanagers"], logs)
        assert not [a for a in get(f"{prometheus}/api/v1/alerts")["data"]["alerts"] if a["labels"]["alertname"] == "FlywheelCanaryErrors"]

        # When the canary fails 60 of its 200 requests while the champion answers 800 cleanly,
        # and taxis' canary fails all of its 20
        requests.labels(*flights["canary"]).inc(200)
        failures.labels(*flights["canary"]).inc(60)
        requests.labels(*flights["champion"]).inc(800)
        requests.labels(*taxis).inc(20)
        failures.labels(*taxis).inc(20)

        # Then Alertmanager posts the firing alert to the receiver, which triggers one rollback of flights
        wait_for("a rollback run triggered", lambda: airflow.runs, logs)
        ((dag, run), trigger) = next(iter(airflow.runs.items()))
        (fired,) = [a for a in get(f"{alertmanager}/api/v2/alerts") if a["labels"]["alertname"] == "FlywheelCanaryErrors"]
        assert fired["labels"] == {"alertname": "FlywheelCanaryErrors", "severity": "critical", "action": "rollback", "project": "flights", "model": "flights_delay", "version": "4"}
        assert fired["receivers"] == [{"name": "flywheel-rollback"}]
        assert dag == "rollback__flights" and run == run_id(fired["fingerprint"], fired["startsAt"])
        assert trigger == {
            "dag_run_id": run,
            "logical_date": None,
            "conf": {
                "version": None,
                "rollout_only": True,
                "reason": f"FlywheelCanaryErrors: Canary version 4 of flights_delay fails 30% of its requests (Alertmanager, fingerprint {fired['fingerprint']})",
            },
        }

        # And Alertmanager's repeats of the same firing start no second run
        wait_for("a repeated notification", lambda: len(airflow.triggers) >= 2, logs)
        assert {(dag, body["dag_run_id"]) for dag, body in airflow.triggers} == {(dag, run)}
        assert list(airflow.runs) == [(dag, run)]
        # taxis' 20 failed requests are under the floor: no alert, no rollback; the drift rules
        # firing in this empty Prometheus (no verdict at all) go to Alertmanager's default
        # receiver, never to the receiver
        assert not [a for a in get(f"{prometheus}/api/v1/alerts")["data"]["alerts"] if a["labels"].get("project") == "taxis"]
        stale = wait_for("FlywheelDriftCheckStale in Alertmanager", lambda: [a for a in get(f"{alertmanager}/api/v2/alerts") if a["labels"]["alertname"] == "FlywheelDriftCheckStale"], logs)
        assert [a["receivers"] for a in stale] == [[{"name": "default"}]]
        assert {(dag, body["dag_run_id"]) for dag, body in airflow.triggers} == {(dag, run)}
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        metrics_server.shutdown()
        metrics_server.server_close()
