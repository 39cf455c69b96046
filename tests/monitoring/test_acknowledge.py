"""Acknowledging a drifted window (pipelines/monitoring/acknowledge.py) against a real
Alertmanager (Debian's prometheus-alertmanager, one instance on a loopback port with a receiver
that sends nothing): the silence it creates matches the project's drift alerts and nothing else,
alerts posted with those labels are silenced while another project's are not, and every outcome,
failures included, lands in the audit trail.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines import audit
from pipelines.artifacts import SUMMARY_FILE
from pipelines.config import ProjectConfig
from pipelines.lineage import write_json
from pipelines.monitoring.acknowledge import AlertmanagerError, acknowledge, acknowledged, create_silence
from pipelines.monitoring.check import reports_root
from tests.conftest import free_ports, make_project
from tests.monitoring.test_live_alerts import wait_for

ALERTMANAGER = "prometheus-alertmanager"
WINDOW = "20260302T110000Z"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
WAIT_S = 30

live = pytest.mark.skipif(shutil.which(ALERTMANAGER) is None, reason=f"{ALERTMANAGER} not installed (Debian package of that name; `make install` installs it)")


def call(url: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST", headers={"Content-Type": "application/json"})
    with OPENER.open(request, timeout=5) as answer:
        text = answer.read()
    return json.loads(text) if text else None


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory) -> Iterator[str]:
    """A real Alertmanager on a free loopback port: its ``host:port``."""
    folder = tmp_path_factory.mktemp("alertmanager")
    config = folder / "alertmanager.yml"
    config.write_text(yaml.safe_dump({"route": {"receiver": "nobody"}, "receivers": [{"name": "nobody"}]}))
    (port,) = free_ports(1)
    log = folder / "alertmanager.log"
    with log.open("wb") as out:
        # one instance: no gossip port (--cluster.listen-address empty), its own storage
        server = subprocess.Popen(
            [ALERTMANAGER, f"--config.file={config}", f"--storage.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        wait_for("Alertmanager ready", lambda: OPENER.open(f"http://127.0.0.1:{port}/-/ready", timeout=2).status == 200, [log])
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


def project(home: Path, alertmanager: str | None, name: str = "flights", hours: float = 12) -> ProjectConfig:
    config = make_project(home, {"monitoring": {"alertmanager": alertmanager, "acknowledge_hours": hours}}, name=name)
    write_json(reports_root(config.monitoring, config.served_model) / WINDOW / SUMMARY_FILE, {"model": config.served_model, "status": "checked", "dataset_drift": True})
    return config


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@live
def test_an_acknowledgement_silences_the_projects_drift_alerts_and_no_other(alertmanager, tmp_path):
    flights = project(tmp_path / "home", alertmanager, hours=6)
    before = datetime.now(timezone.utc)

    result = acknowledge(flights, WINDOW, "alice", "known feed change, retrain running")

    until = utc(result["until"])
    assert result["window"] == WINDOW and result["silence_id"]
    assert timedelta(hours=6, seconds=-1) <= until - before < timedelta(hours=6, minutes=1)  # ISO times to the second
    assert f"until {result['until']}" in result["note"] and result["silence_id"] in result["note"]
    (silence,) = [s for s in call(f"http://{alertmanager}/api/v2/silences") if s["id"] == result["silence_id"]]
    assert silence["status"]["state"] == "active"
    assert sorted((m["name"], m["value"], m["isRegex"], m.get("isEqual", True)) for m in silence["matchers"]) == [
        ("alertname", "FlywheelDriftDetected|FlywheelInputsMissing", True, True),
        ("model", flights.served_model, False, True),
        ("project", "flights", False, True),
    ]
    assert abs(utc(silence["endsAt"]) - until) < timedelta(seconds=1)
    assert silence["createdBy"] == "alice"
    assert silence["comment"] == f"known feed change, retrain running (window {WINDOW}, Flywheel on-call page)"

    # Alerts as Prometheus sends them: the project's drift alerts, its canary alert, another project's drift alert
    now = datetime.now(timezone.utc)
    posted = {
        "drift": {"alertname": "FlywheelDriftDetected", "project": "flights", "model": flights.served_model, "severity": "warning"},
        "missing": {"alertname": "FlywheelInputsMissing", "project": "flights", "model": flights.served_model, "column": "dest"},
        "canary": {"alertname": "FlywheelCanaryErrors", "project": "flights", "model": flights.served_model},
        "taxis": {"alertname": "FlywheelDriftDetected", "project": "taxis", "model": "taxis_delay"},
    }
    call(f"http://{alertmanager}/api/v2/alerts", [{"labels": labels, "startsAt": now.isoformat(), "endsAt": (now + timedelta(hours=1)).isoformat()} for labels in posted.values()])

    def states() -> dict[str, dict]:
        shown = {json.dumps(a["labels"], sort_keys=True): a["status"] for a in call(f"http://{alertmanager}/api/v2/alerts")}
        found = {name: shown.get(json.dumps(labels, sort_keys=True)) for name, labels in posted.items()}
        return found if all(found.values()) else {}

    status = wait_for("the posted alerts listed", states, [])
    assert status["drift"]["silencedBy"] == [result["silence_id"]] and status["drift"]["state"] == "suppressed"
    assert status["missing"]["silencedBy"] == [result["silence_id"]]
    assert status["canary"]["silencedBy"] == [] and status["canary"]["state"] == "active"
    assert status["taxis"]["silencedBy"] == [] and status["taxis"]["state"] == "active"

    (entry,) = audit.read(flights)[0]
    assert entry["action"] == "acknowledge" and entry["user"] == "alice" and entry["reason"] == "known feed change, retrain running"
    assert entry["outcome"] == f"silenced until {result['until']} (silence {result['silence_id']})"
    assert entry["details"] == {"window": WINDOW, "until": result["until"], "silence_id": result["silence_id"], "alertmanager": alertmanager}
    assert acknowledged(flights) == {WINDOW: {"user": "alice", "reason": "known feed change, retrain running", "until": result["until"], "time": entry["time"]}}
    assert acknowledged(flights, now=until + timedelta(seconds=1)) == {}  # expired


@live
def test_an_error_answer_raises_naming_the_url_and_body_and_the_trail_records_the_failure(alertmanager, tmp_path):
    flights = project(tmp_path / "home", alertmanager)
    long_ago = datetime(2020, 1, 1, tzinfo=timezone.utc)  # a silence that would have ended in 2020: Alertmanager refuses it

    with pytest.raises(AlertmanagerError) as raised:
        acknowledge(flights, WINDOW, "alice", "seen", now=long_ago)

    message = str(raised.value)
    assert f"http://{alertmanager}/api/v2/silences answered 400" in message and "past" in message
    (entry,) = audit.read(flights)[0]
    assert entry["outcome"].startswith("failed: Alertmanager at ") and entry["details"]["silence_id"] is None
    assert acknowledged(flights, now=long_ago) == {}  # a failed acknowledgement silences nothing


@live
def test_a_silence_without_matchers_is_refused_by_alertmanager(alertmanager):
    now = datetime.now(timezone.utc)

    with pytest.raises(AlertmanagerError, match=r"answered 422 Unprocessable Entity: .*matchers in body should have at least 1 items"):
        create_silence(alertmanager, {"matchers": [], "startsAt": now.isoformat(), "endsAt": (now + timedelta(hours=1)).isoformat(), "createdBy": "a", "comment": "c"})


def test_an_unreachable_alertmanager_raises_naming_the_url_and_nothing_claims_success(tmp_path):
    (port,) = free_ports(1)  # nothing listens there
    flights = project(tmp_path / "home", f"127.0.0.1:{port}")

    with pytest.raises(AlertmanagerError, match=rf"Alertmanager at http://127\.0\.0\.1:{port}/api/v2/silences could not be reached"):
        acknowledge(flights, WINDOW, "alice", "seen")

    (entry,) = audit.read(flights)[0]
    assert entry["outcome"].startswith(f"failed: Alertmanager at http://127.0.0.1:{port}/api/v2/silences could not be reached")
    assert acknowledged(flights) == {}


def test_without_an_alertmanager_the_acknowledgement_is_recorded_and_says_nothing_was_silenced(tmp_path):
    flights = project(tmp_path / "home", None)
    now = datetime(2026, 3, 2, 11, 5, tzinfo=timezone.utc)

    result = acknowledge(flights, WINDOW, "bob", "looking into it", now=now)

    assert result["silence_id"] is None and result["until"] == "2026-03-02T23:05:00+00:00"
    assert "nothing was silenced" in result["note"] and "monitoring.alertmanager" in result["note"]
    (entry,) = audit.read(flights)[0]
    assert entry["outcome"] == "recorded until 2026-03-02T23:05:00+00:00, nothing silenced (monitoring.alertmanager not set)"
    assert acknowledged(flights, now=now + timedelta(hours=11)) == {WINDOW: {"user": "bob", "reason": "looking into it", "until": result["until"], "time": "2026-03-02T11:05:00+00:00"}}
    assert acknowledged(flights, now=now + timedelta(hours=12)) == {}


def test_the_latest_active_acknowledgement_of_each_window_is_kept(tmp_path):
    flights = project(tmp_path / "home", None)
    other = "20260302T120000Z"
    write_json(reports_root(flights.monitoring, flights.served_model) / other / SUMMARY_FILE, {"status": "checked"})
    t0 = datetime(2026, 3, 2, 11, 5, tzinfo=timezone.utc)
    acknowledge(flights, WINDOW, "bob", "first look", now=t0)
    acknowledge(flights, WINDOW, "alice", "still on it", now=t0 + timedelta(hours=1))
    acknowledge(flights, other, "carol", "same cause", now=t0 + timedelta(hours=2))

    shown = acknowledged(flights, now=t0 + timedelta(hours=3))

    assert {window: ack["user"] for window, ack in shown.items()} == {WINDOW: "alice", other: "carol"}


@pytest.mark.parametrize(
    ("window", "error"),
    [
        ("2026-03-02T11:00:00Z", "window '2026-03-02T11:00:00Z': expected a report folder name YYYYmmddTHHMMSSZ"),
        ("../../etc", "window '../../etc': expected a report folder name YYYYmmddTHHMMSSZ"),
        ("20261302T110000Z", "window '20261302T110000Z' is not a valid time: expected a report folder name YYYYmmddTHHMMSSZ"),
        ("20260302T100000Z", "window '20260302T100000Z': no checked window of flights_delay ends then"),
    ],
)
def test_a_window_that_is_not_a_checked_one_is_refused_naming_it_and_the_format(tmp_path, window, error):
    flights = project(tmp_path / "home", None)

    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace(")", r"\)")):
        acknowledge(flights, window, "alice", "seen")

    assert audit.read(flights) == ([], [])


@pytest.mark.parametrize(("user", "reason", "error"), [("alice", "  ", "the reason is empty"), ("", "seen", "the user is empty")])
def test_an_empty_reason_or_user_is_refused_and_nothing_recorded(tmp_path, user, reason, error):
    flights = project(tmp_path / "home", None)

    with pytest.raises(ValueError, match=error):
        acknowledge(flights, WINDOW, user, reason)

    assert audit.read(flights) == ([], [])
