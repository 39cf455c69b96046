"""Alertmanager's webhook receiver that rolls a rollout back: a firing alert labelled
``action="rollback"`` triggers the ``rollback__<project>`` DAG through Airflow's REST API.

Alertmanager (``pipelines/monitoring/alertmanager/alertmanager.yml``) routes the alerts of the
``rollout`` group of ``pipelines/monitoring/prometheus/alerts.yml`` (FlywheelCanaryErrors,
FlywheelCanaryLatency, FlywheelCanaryWorse) here, ``POST /alerts`` with its webhook JSON
(``"version": "4"``). For each alert that is firing, is labelled ``action="rollback"`` and names a
``project``, the receiver triggers ``rollback__<project>`` with the conf
``{"version": null, "rollout_only": true, "reason": "<alertname>: <summary> (Alertmanager, fingerprint <fp>)"}``:
the run ends a rollout in progress and does nothing when none is (a second alert of the same
rollout, or one that fires again after a restart, never rolls the champion back).
The run id is ``alert__<fingerprint>__<startsAt>``: Alertmanager repeats the notification of a
firing alert (each ``repeat_interval``, and after a failed delivery), always with the same
fingerprint and start, so a repeat meets Airflow's "already exists" (HTTP 409) and starts no
second rollback; the same alert firing again after it resolved has a new start, and rolls back again.

Answers: 200 when every alert was handled (triggered, already triggered, or ignored); 503 when
Airflow could not be reached or failed (no answer, 5xx, the password file unreadable) and 502
when it refused (any other 4xx but 409), both so that Alertmanager retries; 400 for a body that
is not Alertmanager's webhook JSON, saying what is wrong (Alertmanager does not retry a 4xx).
Every answer is JSON: ``{"triggered": [run ids], "existing": [run ids], "ignored": [why, one an
alert], "failed": [why, one an alert]}``, or ``{"error": why}``. ``GET /-/healthy`` answers 200.

The REST calls go through ``apache-airflow-client`` with a JWT from the simple auth manager's
``POST /auth/token`` (``username``/``password``), as ``pipelines.launch.airflow.LocalAirflow``
does; a failure is that module's ``AirflowApiError``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pipelines.launch.airflow import ADMIN_USER, PASSWORDS_FILE, AirflowApiError
from pipelines.launch.airflow import DEFAULT_PORT as AIRFLOW_PORT

log = logging.getLogger(__name__)

DEFAULT_PORT = 9095  # beside Alertmanager's 9093 (web) and 9094 (cluster)
ALERTS_PATH = "/alerts"
HEALTH_PATH = "/-/healthy"
ROLLBACK_ACTION = "rollback"
WEBHOOK_VERSION = "4"
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_REASON_CHARS = 500  # the rollback DAG's Param `reason` (maxLength): a longer one is a 400 every retry
# The settings' environment variables (the command line's arguments win); the defaults are the
# Airflow of `flywheel up` on this machine, whose home is <checkout>/.airflow.
URL_ENV, USER_ENV, PASSWORD_FILE_ENV = "FLYWHEEL_AIRFLOW_URL", "FLYWHEEL_AIRFLOW_USER", "FLYWHEEL_AIRFLOW_PASSWORD_FILE"
HOST_ENV, PORT_ENV = "FLYWHEEL_ALERT_RECEIVER_HOST", "FLYWHEEL_ALERT_RECEIVER_PORT"
LOCAL_PASSWORD_FILE = Path(__file__).resolve().parents[2] / ".airflow" / PASSWORDS_FILE
# What Airflow takes as a dag_run_id from a client ([scheduler] allowed_run_id_pattern's
# default) and as a DAG id (airflow.utils.helpers.KEY_REGEX, here ASCII only).
_RUN_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.~:+-]")
_DAG_ID = re.compile(r"[A-Za-z0-9_.-]+")


class AlertPayloadError(ValueError):
    """The body is not Alertmanager's webhook JSON (version 4); says what is wrong."""


@dataclass(frozen=True)
class Rollback:
    """One rollback to trigger for one firing alert."""

    dag_id: str  # rollback__<project>
    run_id: str  # alert__<fingerprint>__<startsAt>
    conf: dict[str, Any]  # {"version": None, "rollout_only": True, "reason": ...}
    alert: str  # the alert's name, for the log


@dataclass
class Outcome:
    """What became of the alerts of one notification; the answer's JSON body."""

    triggered: list[str] = field(default_factory=list)  # run ids started now
    existing: list[str] = field(default_factory=list)  # run ids that already existed (a repeat)
    ignored: list[str] = field(default_factory=list)  # one line per alert that asks for no rollback
    failed: list[str] = field(default_factory=list)  # one line per rollback Airflow did not start
    statuses: list[int | None] = field(default_factory=list)  # Airflow's status of each failure (None: no answer)

    def http_status(self) -> HTTPStatus:
        """200 when nothing failed; 503 if Airflow was unreachable or failed, 502 if it refused."""
        if not self.failed:
            return HTTPStatus.OK
        if any(status is None or status >= 500 for status in self.statuses):
            return HTTPStatus.SERVICE_UNAVAILABLE
        return HTTPStatus.BAD_GATEWAY

    def body(self) -> dict[str, list[str]]:
        return {"triggered": self.triggered, "existing": self.existing, "ignored": self.ignored, "failed": self.failed}


RUN_PREFIX = "alert__"  # the receiver's runs: Alertmanager's, not a person's (steps.audit_run)


def run_id(fingerprint: str, starts_at: str) -> str:
    """The rollback run of one firing of one alert: ``alert__<fingerprint>__<startsAt>``, with any
    character Airflow does not take in a run id replaced by ``_``."""
    return _RUN_ID_UNSAFE.sub("_", f"{RUN_PREFIX}{fingerprint}__{starts_at}")


def rollback_reason(alertname: str, summary: str, fingerprint: str) -> str:
    """``<alertname>: <summary> (Alertmanager, fingerprint <fp>)``, the summary cut short (ending in
    "...") to keep it within ``MAX_REASON_CHARS``."""
    head, tail = f"{alertname}: ", f" (Alertmanager, fingerprint {fingerprint})"
    room = MAX_REASON_CHARS - len(head) - len(tail)
    if len(summary) > room:
        summary = summary[: max(room - 3, 0)] + "..."
    return (head + summary + tail)[:MAX_REASON_CHARS]


def rollbacks(payload: Any) -> tuple[list[Rollback], list[str]]:
    """The rollbacks Alertmanager's webhook ``payload`` (parsed JSON) asks for, and one line per
    alert it ignores (resolved, not ``action="rollback"``, or without a ``project`` label).

    Raises ``AlertPayloadError`` if ``payload`` is not a version-4 webhook message, or if a firing
    rollback alert lacks its fingerprint or start, or names a project that cannot be a DAG id;
    nothing is triggered for such a message.
    """
    if not isinstance(payload, dict):
        raise AlertPayloadError(f"expected Alertmanager's webhook JSON object, got {type(payload).__name__}")
    if payload.get("version") != WEBHOOK_VERSION:
        raise AlertPayloadError(f"expected Alertmanager's webhook message version {WEBHOOK_VERSION!r}, got {payload.get('version')!r}")
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise AlertPayloadError("the webhook message has no list 'alerts'")
    wanted: list[Rollback] = []
    ignored: list[str] = []
    for number, alert in enumerate(alerts):
        where = f"alerts[{number}]"
        if not isinstance(alert, dict):
            raise AlertPayloadError(f"{where} is not an object")
        status, labels, annotations = alert.get("status"), alert.get("labels"), alert.get("annotations", {})
        if status not in ("firing", "resolved"):
            raise AlertPayloadError(f"{where}.status is {status!r}, not 'firing' or 'resolved'")
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise AlertPayloadError(f"{where}.labels is not an object of strings")
        if not isinstance(annotations, dict):
            raise AlertPayloadError(f"{where}.annotations is not an object")
        name = labels.get("alertname", "(no alertname)")
        if status != "firing":
            ignored.append(f"{name}: {status}")
        elif labels.get("action") != ROLLBACK_ACTION:
            ignored.append(f"{name}: not action={ROLLBACK_ACTION}")
        elif not labels.get("project"):
            ignored.append(f"{name}: action={ROLLBACK_ACTION} without a project label")
        else:
            project = labels["project"]
            if not _DAG_ID.fullmatch(project):
                raise AlertPayloadError(f"{where}: project label {project!r} cannot name a DAG (letters, digits, '_', '.', '-')")
            fingerprint, starts_at = alert.get("fingerprint"), alert.get("startsAt")
            if not isinstance(fingerprint, str) or not fingerprint or not isinstance(starts_at, str) or not starts_at:
                raise AlertPayloadError(f"{where} ({name}) has no fingerprint or startsAt to tell its firing by")
            reason = rollback_reason(name, str(annotations.get("summary") or "(no summary)"), fingerprint)
            wanted.append(Rollback(f"rollback__{project}", run_id(fingerprint, starts_at), {"version": None, "rollout_only": True, "reason": reason}, name))
    return wanted, ignored


def read_password(password_file: Path, username: str) -> str:
    """``username``'s password from ``password_file``: the simple auth manager's JSON
    ``{"<user>": "<password>", ...}`` (as ``LocalAirflow.password_file`` and Airflow's api-server
    write it), or a file holding only the password (a Docker secret). Read at each call, so a
    rotated password is picked up."""
    text = password_file.read_text().strip()
    try:
        passwords = json.loads(text)
    except json.JSONDecodeError:
        passwords = None
    if isinstance(passwords, dict):
        if not isinstance(passwords.get(username), str):
            raise ValueError(f"{password_file} holds no password of user {username!r}")
        return str(passwords[username])
    if not text:
        raise ValueError(f"{password_file} is empty")
    return text


class AirflowTrigger:
    """Starts DAG runs through Airflow's REST API (``<base_url>/api/v2``) as ``username``."""

    def __init__(self, base_url: str, username: str, password_file: Path, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.username = username
        self.password_file = Path(password_file)
        self.timeout = timeout
        self._token: str | None = None
        self._lock = threading.Lock()
        # Talk to Airflow directly, like the generated client (which reads no HTTP(S)_PROXY).
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def token(self) -> str:
        """A JWT from the simple auth manager's ``POST /auth/token``; cached until a call answers 401."""
        with self._lock:
            if self._token is None:
                url = f"{self.base_url}/auth/token"
                try:
                    password = read_password(self.password_file, self.username)
                except (OSError, ValueError) as exc:
                    raise AirflowApiError("POST", url, None, f"no password: {exc}") from None
                body = json.dumps({"username": self.username, "password": password}).encode()
                request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
                try:
                    with self._opener.open(request, timeout=self.timeout) as response:
                        self._token = str(json.loads(response.read())["access_token"])
                except urllib.error.HTTPError as exc:
                    raise AirflowApiError("POST", url, exc.code, exc.read().decode(errors="replace")) from None
                except (urllib.error.URLError, OSError) as exc:
                    raise AirflowApiError("POST", url, None, str(getattr(exc, "reason", exc))) from None
                except (ValueError, KeyError) as exc:
                    raise AirflowApiError("POST", url, 502, f"not a token answer: {exc}") from None
            return self._token

    def trigger(self, dag_id: str, run_id: str, conf: dict[str, Any]) -> bool:
        """Start a manual run ``run_id`` of ``dag_id`` with ``conf`` (``POST
        /api/v2/dags/{dag_id}/dagRuns``, no logical date); True if it started now, False if a run
        of that id already existed (409). Anything else Airflow answers, or no answer, is
        ``AirflowApiError`` (``status`` None when Airflow was not reached). An expired token is
        fetched again once."""
        import airflow_client.client as client
        import urllib3
        from airflow_client.client.api.dag_run_api import DagRunApi
        from airflow_client.client.models.trigger_dag_run_post_body import TriggerDAGRunPostBody

        body = TriggerDAGRunPostBody(logical_date=None, conf=conf, dag_run_id=run_id)
        for attempt in (1, 2):
            configuration = client.Configuration(host=self.base_url, access_token=self.token())
            configuration.proxy = None
            with client.ApiClient(configuration) as api_client:
                try:
                    DagRunApi(api_client).trigger_dag_run(dag_id, body, _request_timeout=self.timeout)
                    return True
                except client.ApiException as exc:
                    if exc.status == HTTPStatus.CONFLICT:
                        return False
                    if exc.status == HTTPStatus.UNAUTHORIZED and attempt == 1:
                        with self._lock:
                            self._token = None
                        continue
                    status = exc.status or None  # the client says 0 for a TLS failure
                    raise AirflowApiError("trigger_dag_run", f"{self.base_url} ({dag_id})", status, str(exc.body or exc.reason)) from None
                except (urllib3.exceptions.HTTPError, OSError, client.exceptions.OpenApiException) as exc:
                    raise AirflowApiError("trigger_dag_run", f"{self.base_url} ({dag_id})", None, str(exc)) from None
        raise AssertionError("unreachable")


def handle(payload: Any, airflow: AirflowTrigger) -> Outcome:
    """Trigger the rollbacks ``payload`` asks for (see ``rollbacks``, whose ``AlertPayloadError``
    it raises before triggering anything); every rollback is tried even after one failed."""
    wanted, ignored = rollbacks(payload)
    outcome = Outcome(ignored=ignored)
    for line in ignored:
        log.info("alert ignored: %s", line)
    for rollback in wanted:
        try:
            started = airflow.trigger(rollback.dag_id, rollback.run_id, rollback.conf)
        except AirflowApiError as exc:
            log.error("could not trigger %s run %s for %s: %s", rollback.dag_id, rollback.run_id, rollback.alert, exc)
            outcome.failed.append(f"{rollback.dag_id} {rollback.run_id}: {exc}")
            outcome.statuses.append(exc.status)
            continue
        if started:
            log.warning("triggered %s run %s: %s", rollback.dag_id, rollback.run_id, rollback.conf["reason"])
            outcome.triggered.append(rollback.run_id)
        else:
            log.info("%s run %s already exists (a repeated notification)", rollback.dag_id, rollback.run_id)
            outcome.existing.append(rollback.run_id)
    return outcome


class _Handler(BaseHTTPRequestHandler):
    server: _ReceiverServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == HEALTH_PATH:
            self._answer(HTTPStatus.OK, {"status": "ok"})
        else:
            self._answer(HTTPStatus.NOT_FOUND, {"error": f"GET {self.path}: only GET {HEALTH_PATH} and POST {ALERTS_PATH}"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != ALERTS_PATH:
            # the body is not read: the connection is closed, so it is never taken for a next request
            self._answer(HTTPStatus.NOT_FOUND, {"error": f"POST {self.path}: Alertmanager's webhook posts to {ALERTS_PATH}"}, close=True)
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._answer(HTTPStatus.LENGTH_REQUIRED, {"error": "no Content-Length"}, close=True)
            return
        if length > MAX_BODY_BYTES:
            self._answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body of {length} bytes, over {MAX_BODY_BYTES}"}, close=True)
            return
        raw = self.rfile.read(length)
        try:
            payload = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.warning("rejected a body that is not JSON: %s", exc)
            self._answer(HTTPStatus.BAD_REQUEST, {"error": f"the body is not JSON: {exc}"})
            return
        try:
            outcome = handle(payload, self.server.airflow)
        except AlertPayloadError as exc:
            log.warning("rejected a body that is not Alertmanager's webhook JSON: %s", exc)
            self._answer(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        self._answer(outcome.http_status(), outcome.body())

    def _answer(self, status: HTTPStatus, body: dict[str, Any], close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.info("%s %s", self.address_string(), format % args)


class _ReceiverServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], airflow: AirflowTrigger) -> None:
        self.airflow = airflow
        super().__init__(address, _Handler)


def make_server(airflow: AirflowTrigger, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> ThreadingHTTPServer:
    """The receiver bound to ``host:port`` (port 0: a free one, ``server.server_address[1]``), not
    yet serving: call ``serve_forever()`` (in a thread) and ``shutdown()``, ``server_close()``."""
    return _ReceiverServer((host, port), airflow)


def serve(airflow_url: str, username: str, password_file: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    """Run the receiver until interrupted: ``flywheel alert-receiver``. Fails at once, saying
    why, if ``password_file`` holds no password of ``username``."""
    read_password(Path(password_file), username)  # FileNotFoundError / ValueError: a clear start-up error
    server = make_server(AirflowTrigger(airflow_url, username, Path(password_file)), host, port)
    bound_host, bound_port = server.server_address[:2]
    log.info("alert receiver on http://%s:%s%s, triggering rollbacks in %s as %s", bound_host, bound_port, ALERTS_PATH, airflow_url, username)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``flywheel alert-receiver``'s arguments, each defaulting to its environment variable, then
    to the Airflow of ``flywheel up`` on this machine."""
    env = os.environ
    parser.add_argument("--host", default=env.get(HOST_ENV, "127.0.0.1"), help=f"address to listen on (${HOST_ENV}; default 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=int(env.get(PORT_ENV, DEFAULT_PORT)), help=f"port to listen on (${PORT_ENV}; default {DEFAULT_PORT})")
    parser.add_argument("--airflow-url", default=env.get(URL_ENV, f"http://127.0.0.1:{AIRFLOW_PORT}"), help=f"Airflow's api-server (${URL_ENV}; default http://127.0.0.1:{AIRFLOW_PORT})")
    parser.add_argument("--user", default=env.get(USER_ENV, ADMIN_USER), help=f"the Airflow user that triggers the rollbacks (${USER_ENV}; default {ADMIN_USER})")
    parser.add_argument(
        "--password-file",
        type=Path,
        default=Path(env.get(PASSWORD_FILE_ENV, LOCAL_PASSWORD_FILE)),
        help=f"the simple auth manager's password file ({{user: password}} JSON) or a file holding only the password (${PASSWORD_FILE_ENV}; default {LOCAL_PASSWORD_FILE})",
    )


def run_from_args(args: argparse.Namespace) -> None:
    """``flywheel alert-receiver``: ``serve`` with ``add_arguments``' arguments."""
    serve(args.airflow_url, args.user, args.password_file, args.host, args.port)
