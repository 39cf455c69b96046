"""Run a real local Airflow 3 (``airflow standalone``) from Python and drive it over its REST API.

For the demo and the end-to-end tests: start the scheduler, dag-processor, triggerer and
api-server on a SQLite database whose home lives inside the checkout (e.g. ``<repo>/.airflow``),
trigger DAG runs with a ``conf``, wait for them, read task states and XComs, and stop everything
again without leaving orphan processes behind. The REST calls go through Airflow's own client
(``apache-airflow-client``, pinned to the server's version); only the JWT comes from the simple
auth manager's ``POST /auth/token``, which that client does not cover.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import psutil

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PORT = 8080
ADMIN_USER = "admin"
PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"
STANDALONE_LOG = "standalone.log"
FINAL_RUN_STATES = frozenset({"success", "failed"})
_LOOPBACK = "127.0.0.1"
_POLL_S = 0.5
UNPAUSE_ATTEMPTS, UNPAUSE_RETRY_S = 4, 2.0
_PAGE = 100  # the api-server caps ``limit`` at [api] maximum_page_limit, 100 by default


class LocalAirflowError(RuntimeError):
    """The local Airflow did not start, stop or do what was asked of it."""


class AirflowApiError(LocalAirflowError):
    """A REST call to the api-server failed; says which endpoint, the HTTP status and the body."""

    def __init__(self, method: str, url: str, status: int | None, body: str) -> None:
        self.method = method
        self.url = url
        self.status = status
        self.body = body
        shown = f"HTTP {status}" if status is not None else "no response"
        super().__init__(f"{method} {url} -> {shown}: {body}")


def rest_call(base_url: str, token: str, api: str, call: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``apache-airflow-client``'s ``<api>().<call>(...)`` against the api-server at ``base_url``
    as the user whose JWT is ``token``, so Airflow's own permissions decide. Returns plain JSON
    (dicts, ISO times; ``{}`` for an answer without a body); a failed call is ``AirflowApiError``
    with the HTTP status (None when the server was not reached) and the body."""
    import airflow_client.client as client
    from airflow_client.client import api as apis

    configuration = client.Configuration(host=base_url, access_token=token)
    configuration.proxy = None  # loopback: never through the caller's HTTP(S)_PROXY
    with client.ApiClient(configuration) as api_client:
        try:
            result = getattr(getattr(apis, api)(api_client), call)(*args, **kwargs)
        except client.ApiException as exc:
            raise AirflowApiError(call, base_url, exc.status, str(exc.body or exc.reason)) from None
        except (urllib.error.URLError, OSError, client.exceptions.OpenApiException) as exc:
            raise AirflowApiError(call, base_url, None, str(exc)) from None
    result = getattr(result, "actual_instance", result)  # a oneOf response (an XCom entry) wraps the real one
    answer: dict[str, Any] = result.model_dump(mode="json", by_alias=True) if result is not None else {}
    return answer


def trigger_run(
    base_url: str, token: str, dag_id: str, conf: dict[str, Any], run_id: str | None = None, logical_date: datetime | None = None
) -> str:
    """Start a manual run of ``dag_id`` with ``conf`` as its params, as the user of ``token``;
    returns the run id. ``AirflowApiError`` as ``rest_call``: 403 when that user may not trigger it.

    With a ``logical_date``, the run's data interval is the one the DAG's timetable gives it.
    """
    from airflow_client.client.models.trigger_dag_run_post_body import TriggerDAGRunPostBody

    # Airflow 3 requires logical_date in the body; null means "no logical date", which lets
    # several manual runs start at the same moment.
    body = TriggerDAGRunPostBody(logical_date=logical_date, conf=conf, dag_run_id=run_id)
    return str(rest_call(base_url, token, "DagRunApi", "trigger_dag_run", dag_id, body)["dag_run_id"])


def airflow_env(
    airflow_home: Path,
    dags_folder: Path,
    plugins_folder: Path,
    extra: dict[str, str] | None = None,
    *,
    port: int = DEFAULT_PORT,
    scheduled: bool = True,
) -> dict[str, str]:
    """Environment for Airflow commands on a home inside the checkout: ``os.environ`` plus these.

    ``scheduled=False`` is for the demo and the tests: DAGs start unpaused and run only when
    triggered. With ``scheduled=True`` Airflow behaves as deployed: new DAGs start paused, and
    once unpaused their schedules create runs.

    ``extra`` is applied last, so it can override any of them (e.g. the log-server ports).
    """
    home = Path(airflow_home).resolve()
    airflow_bin = str(_airflow_executable().parent)
    env = dict(os.environ)
    # Each component imports most of Airflow; without cached bytecode that is ~10 s of CPU per
    # process and start-up takes over a minute on 2 cores. PYTHONDONTWRITEBYTECODE (set in some
    # shells to keep __pycache__ out of the tree) is dropped and the cache goes to one place
    # outside the sources instead.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("PYTHONPYCACHEPREFIX", str(home / "pycache"))
    env.update(
        {
            # `airflow standalone` starts its components as plain `airflow ...` from PATH, so the
            # venv's bin must come first or a different installation could answer.
            "PATH": os.pathsep.join([airflow_bin, env.get("PATH", "")]),
            "AIRFLOW_HOME": str(home),
            # Never read a config file from elsewhere (a user's AIRFLOW_CONFIG); Airflow writes a
            # default one here on first use, holding the generated JWT, API and Fernet secrets that
            # every component must share.
            "AIRFLOW_CONFIG": str(home / "airflow.cfg"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(Path(dags_folder).resolve()),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(Path(plugins_folder).resolve()),
            # The default of 32 lets the LocalExecutor fork up to 32 workers; a 2-core machine
            # thrashes long before that.
            "AIRFLOW__CORE__PARALLELISM": "4",
            # Defaults (300 s to list new files, 30 s between re-parses) make a new or edited DAG
            # file invisible for minutes; a demo and the tests want it within seconds.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / PASSWORDS_FILE),
            # Loopback only: the simple auth manager keeps passwords in plain text.
            "AIRFLOW__API__HOST": _LOOPBACK,
            "AIRFLOW__API__PORT": str(port),
            # Log links in the UI are built from base_url, which defaults to port 8080.
            "AIRFLOW__API__BASE_URL": f"http://localhost:{port}",
            # Task processes report state and XComs to the api-server over this URL; spelled out
            # with 127.0.0.1 because "localhost" may resolve to ::1, where nothing listens.
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{_LOOPBACK}:{port}/execution/",
        }
    )
    if not scheduled:
        # Runs start only when triggered: DAGs are live at once, and no cron creates runs of its own.
        env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] = "False"
        env["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] = "False"
    # Tasks import the same checkout as the launcher, not whatever an editable install points at.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


class LocalAirflow:
    """One ``airflow standalone`` in its own session, plus a small client for its REST API.

    Use it as a context manager so that leaving the block, an exception included, stops it.
    """

    def __init__(
        self,
        airflow_home: Path,
        dags_folder: Path,
        plugins_folder: Path,
        port: int = DEFAULT_PORT,
        extra_env: dict[str, str] | None = None,
        scheduled: bool = True,
    ) -> None:
        self.airflow_home = Path(airflow_home).resolve()
        self.dags_folder = Path(dags_folder).resolve()
        self.plugins_folder = Path(plugins_folder).resolve()
        self.port = port
        self.env = airflow_env(
            self.airflow_home, self.dags_folder, self.plugins_folder, extra_env, port=port, scheduled=scheduled
        )
        self.base_url = f"http://{_LOOPBACK}:{port}"
        self.log_file = self.airflow_home / STANDALONE_LOG
        self.http_timeout = 30.0
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._token: str | None = None
        # Talk to the api-server directly even when the caller's environment sets HTTP(S)_PROXY.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __enter__(self) -> LocalAirflow:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """PID of the first process started (also its process-group and session id), if running."""
        return next(iter(self._procs.values())).pid if self._procs else None

    def processes(self) -> dict[str, tuple[list[str], dict[str, str]]]:
        """What ``start`` runs, by name: ``airflow`` arguments and environment changes for each.

        Here one ``airflow standalone``, which starts every component with the LocalExecutor;
        ``pipelines.launch.celery`` starts components one by one for other executors.
        """
        return {"standalone": (["standalone"], {})}

    def log_of(self, name: str) -> Path:
        """The log file of the process ``name`` (``standalone.log`` for standalone)."""
        return self.airflow_home / f"{name}.log"

    @property
    def password_file(self) -> Path:
        return Path(self.env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])

    @property
    def password(self) -> str:
        """The admin user's password, for the UI at ``http://localhost:<port>``."""
        return self._ensure_admin_password()

    def start(self, timeout: float = 120.0) -> None:
        """Migrate the database if it does not exist yet, start standalone, wait until healthy."""
        if self._procs:
            raise LocalAirflowError(f"Airflow is already running (pid {self.pid})")
        for folder in (self.airflow_home, self.dags_folder, self.plugins_folder):
            folder.mkdir(parents=True, exist_ok=True)
        self._check_port_free()
        self._ensure_admin_password()
        self._migrate_if_needed(timeout)

        # Heartbeats left in the database by an earlier run that was killed still look alive for
        # up to 30 s; only heartbeats from after this moment count as this run being healthy.
        started_at = datetime.now(timezone.utc) - timedelta(seconds=1)
        t0 = time.monotonic()
        atexit.register(self.stop)
        for name, (args, env) in self.processes().items():
            with self.log_of(name).open("ab") as out:
                self._procs[name] = subprocess.Popen(
                    [str(_airflow_executable()), *args],
                    env={**self.env, **env, "PYTHONUNBUFFERED": "1"},
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    # Its own session and process group: stop() can signal the whole tree at once,
                    # and a Ctrl-C meant for the caller's terminal does not reach it.
                    start_new_session=True,
                    preexec_fn=_restore_sigint,
                )
        try:
            self._wait_healthy(started_at, time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise
        log.info("Airflow healthy on %s after %.1f s", self.base_url, time.monotonic() - t0)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every process started and everything they started; safe to call twice.

        SIGINT is what standalone shuts its components down on (like a Ctrl-C in its terminal),
        and each component alone, a Celery worker included, stops cleanly on it too. A process
        still running after ``timeout`` gets SIGTERM and then SIGKILL, and any process left in
        its session (task runners put themselves in process groups of their own) is killed too.
        """
        procs, self._procs = self._procs, {}
        self._token = None
        atexit.unregister(self.stop)
        for proc in procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + timeout
        for name, proc in procs.items():
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("Airflow %s did not stop on SIGINT within %.0f s; sending SIGTERM", name, timeout)
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    log.warning("Airflow %s did not stop on SIGTERM; sending SIGKILL", name)
                    _signal_group(proc.pid, signal.SIGKILL)
                    proc.wait()
            _kill_session(proc.pid)

    def wait(self) -> int:
        """Block until the first process started exits (or Ctrl-C); returns its exit code."""
        if not self._procs:
            raise LocalAirflowError("Airflow is not running")
        return next(iter(self._procs.values())).wait()

    def poll(self) -> int | None:
        """The exit code of the first process started if it stopped, None while it runs."""
        if not self._procs:
            raise LocalAirflowError("Airflow is not running")
        return next(iter(self._procs.values())).poll()

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` of the first process's log."""
        name = next(iter(self.processes()))
        return "\n".join(self.log_of(name).read_text(errors="replace").splitlines()[-lines:]) if self.log_of(name).exists() else ""

    def token(self) -> str:
        """A JWT for the REST API from the simple auth manager's ``POST /auth/token``; cached."""
        if self._token is None:
            url = f"{self.base_url}/auth/token"
            body = json.dumps({"username": ADMIN_USER, "password": self.password}).encode()
            request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
            try:
                with self._opener.open(request, timeout=self.http_timeout) as response:
                    self._token = str(json.loads(response.read())["access_token"])
            except urllib.error.HTTPError as exc:
                raise AirflowApiError("POST", url, exc.code, exc.read().decode(errors="replace")) from None
            except (urllib.error.URLError, OSError) as exc:
                raise AirflowApiError("POST", url, None, str(getattr(exc, "reason", exc))) from None
        return self._token

    def _as_admin(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``call(base_url, token, ...)`` (``rest_call``, ``trigger_run``) as the admin; an expired
        token is fetched again once."""
        try:
            return call(self.base_url, self.token(), *args, **kwargs)
        except AirflowApiError as error:
            if error.status != 401:
                raise
            self._token = None
            return call(self.base_url, self.token(), *args, **kwargs)

    def _api(self, api: str, call: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self._as_admin(rest_call, api, call, *args, **kwargs)

    def health(self) -> dict[str, Any]:
        """``GET /api/v2/monitor/health``: status and latest heartbeat of each component."""
        return self._api("MonitorApi", "get_health")

    def wait_for_dag(self, dag_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the dag-processor has parsed ``dag_id``; returns the DAG as the API shows it.

        Fails fast when a file that mentions ``dag_id`` has an import error, and on timeout lists
        every import error, since a DAG that never appears is usually a file that did not import.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._api("DAGApi", "get_dag", dag_id)
            except AirflowApiError as exc:
                if exc.status != 404:
                    raise
            errors = self.import_errors()
            mine = [e for e in errors if self._file_mentions(e.get("filename", ""), dag_id)]
            if mine or time.monotonic() > deadline:
                detail = "\n".join(
                    f"--- {e.get('filename')}\n{e.get('stack_trace', '')}" for e in (mine or errors)
                )
                why = "its file failed to import" if mine else f"not parsed within {timeout:.0f} s"
                raise LocalAirflowError(
                    f"DAG {dag_id!r} is not available: {why} "
                    f"(dags folder {self.dags_folder}).\n{detail or 'No import errors reported.'}"
                )
            time.sleep(_POLL_S)

    def import_errors(self) -> list[dict[str, Any]]:
        """``GET /api/v2/importErrors``: files the dag-processor could not import."""
        return self._paged("ImportErrorApi", "get_import_errors", "import_errors")

    def trigger(
        self, dag_id: str, conf: dict[str, Any], run_id: str | None = None, logical_date: datetime | None = None
    ) -> str:
        """``trigger_run`` as the admin; returns the run id."""
        return self._as_admin(trigger_run, dag_id, conf, run_id, logical_date)

    def emit_asset_event(self, uri: str, extra: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/v2/assets/events``: an event of the Asset ``uri`` with ``extra``, as any
        authorised client may send it (it starts the DAGs scheduled on that Asset)."""
        from airflow_client.client.models.create_asset_events_body import CreateAssetEventsBody

        assets = [a for a in self._api("AssetApi", "get_assets", uri_pattern=uri)["assets"] if a["uri"] == uri]
        if not assets:
            raise AirflowApiError("create_asset_event", self.base_url, 404, f"no Asset {uri}: is a DAG scheduled on it parsed?")
        return self._api("AssetApi", "create_asset_event", CreateAssetEventsBody(asset_id=assets[0]["id"], extra=extra))

    def required_actions(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """``GET .../hitlDetails``: the run's human-in-the-loop tasks (Airflow's Required Actions):
        subject, body, options, and the response once given."""
        return list(self._api("TaskInstanceApi", "get_hitl_details", dag_id, run_id)["hitl_details"])

    def respond(self, dag_id: str, run_id: str, task_id: str, chosen: list[str], params_input: dict[str, Any] | None = None) -> dict[str, Any]:
        """``PATCH .../taskInstances/{task_id}/-1/hitlDetails``: answer a required action as the
        admin, as an approver does in the UI."""
        from airflow_client.client.models.update_hitl_detail_payload import UpdateHITLDetailPayload

        payload = UpdateHITLDetailPayload(chosen_options=chosen, params_input=params_input or {})
        return self._api("TaskInstanceApi", "update_hitl_detail", dag_id, run_id, task_id, -1, payload)

    def unpause(self, dag_id: str) -> None:
        """Let the scheduler create runs of ``dag_id`` (its schedule, its Assets). The same PATCH
        is sent again on a 5xx: on SQLite the api-server answers "Database error" while the
        scheduler holds the write lock, and unpausing twice is unpausing once."""
        from airflow_client.client.models.dag_patch_body import DAGPatchBody

        for attempt in range(1, UNPAUSE_ATTEMPTS + 1):
            try:
                self._api("DAGApi", "patch_dag", dag_id, DAGPatchBody(is_paused=False))
                return
            except AirflowApiError as error:
                if error.status is None or error.status < 500 or attempt == UNPAUSE_ATTEMPTS:
                    raise
                log.warning("unpausing %s: %s; again in %.0f s", dag_id, error, UNPAUSE_RETRY_S)
                time.sleep(UNPAUSE_RETRY_S)

    def backfill(self, dag_id: str, from_date: datetime, to_date: datetime) -> dict[str, Any]:
        """``POST /api/v2/backfills``: runs for the schedule's times in ``[from_date, to_date]``."""
        from airflow_client.client.models.backfill_post_body import BackfillPostBody

        return self._api("BackfillApi", "create_backfill", BackfillPostBody(dag_id=dag_id, from_date=from_date, to_date=to_date))

    def dag_runs(self, dag_id: str) -> list[dict[str, Any]]:
        """Every run of ``dag_id``: run_id, run_type, state, logical_date, data interval."""
        return self._paged("DagRunApi", "get_dag_runs", "dag_runs", dag_id)

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        """``GET /api/v2/dags/{dag_id}/dagRuns/{run_id}``."""
        return self._api("DagRunApi", "get_dag_run", dag_id, run_id)

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 300.0) -> str:
        """Poll until the run is finished; returns its final state, ``success`` or ``failed``."""
        deadline = time.monotonic() + timeout
        while True:
            state = str(self.dag_run(dag_id, run_id)["state"])
            if state in FINAL_RUN_STATES:
                return state
            if time.monotonic() > deadline:
                tasks = ", ".join(f"{t['task_id']}={t['state']}" for t in self.task_instances(dag_id, run_id))
                raise LocalAirflowError(
                    f"run {run_id!r} of {dag_id!r} still {state!r} after {timeout:.0f} s "
                    f"(tasks: {tasks or 'none yet'}); see the *.log files in {self.airflow_home} "
                    f"and the task logs in {self.airflow_home / 'logs'}"
                )
            time.sleep(_POLL_S)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Task instances of a run: task_id, map_index, state, try_number, queue, hostname."""
        keys = ("task_id", "map_index", "state", "try_number", "queue", "hostname")
        return [{k: ti.get(k) for k in keys} for ti in self._paged("TaskInstanceApi", "get_task_instances", "task_instances", dag_id, run_id)]

    def xcom(
        self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1
    ) -> Any:
        """The XCom value a task pushed (its return value by default), or None if there is none."""
        try:
            entry = self._api("XComApi", "get_xcom_entry", dag_id, task_id, run_id, key, map_index=map_index)
        except AirflowApiError as exc:
            if exc.status == 404:
                return None
            raise
        value = entry.get("value")
        # The API returns the value as stored: JSON text when it was serialised on the way in.
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                return value
        return value

    def _wait_healthy(self, started_at: datetime, deadline: float) -> None:
        last: Any = "no answer yet"
        while True:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise LocalAirflowError(
                        f"airflow {name} exited with code {proc.returncode} during start-up; "
                        f"last lines of {self.log_of(name)}:\n{self._log_tail(name)}"
                    )
            try:
                last = self.health()
                if all(_fresh(last.get(c) or {}, c, started_at) for c in ("scheduler", "dag_processor")):
                    return
            except AirflowApiError as exc:
                last = exc
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {self.log_of(name)}\n{self._log_tail(name)}" for name in self._procs)
                raise LocalAirflowError(
                    f"Airflow not healthy at {self.base_url}/api/v2/monitor/health in time (last: {last}); "
                    f"last lines of its logs:\n{tails}"
                )
            time.sleep(_POLL_S)

    def _check_port_free(self) -> None:
        # A server already on the port would answer the health check for us, and we would end up
        # driving someone else's Airflow; refuse instead.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((_LOOPBACK, self.port))
            except OSError as exc:
                raise LocalAirflowError(
                    f"port {self.port} on {_LOOPBACK} is already in use ({exc.strerror}); is another "
                    "Airflow running? Stop it or choose another port."
                ) from None

    def _ensure_admin_password(self) -> str:
        """Read the admin password, writing a fresh one first if the file does not hold it.

        The simple auth manager keeps ``{"user": "password"}`` in this JSON file and generates
        missing entries at api-server start; writing it ourselves means the password is known
        before Airflow starts and there is no race with the api-server writing it.
        """
        path = self.password_file
        passwords: dict[str, str] = {}
        if path.exists() and (text := path.read_text().strip()):
            passwords = json.loads(text)
        if ADMIN_USER not in passwords:
            passwords[ADMIN_USER] = secrets.token_urlsafe(12)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(passwords) + "\n")
            path.chmod(0o600)
        return passwords[ADMIN_USER]

    def _migrate_if_needed(self, timeout: float) -> None:
        conn = self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        if conn.startswith("sqlite:///") and Path(conn.removeprefix("sqlite:///")).exists():
            return  # standalone upgrades an existing database itself on start
        result = subprocess.run(
            [str(_airflow_executable()), "db", "migrate"],
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip().splitlines()
            raise LocalAirflowError(
                f"`airflow db migrate` failed with code {result.returncode}:\n" + "\n".join(output[-40:])
            )

    def _paged(self, api: str, call: str, field: str, *args: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        while True:
            page = self._api(api, call, *args, limit=_PAGE, offset=len(items))
            items.extend(page[field])
            if not page[field] or len(items) >= page["total_entries"]:
                return items

    def _file_mentions(self, filename: str, dag_id: str) -> bool:
        # Import errors name the file relative to the dags folder.
        path = self.dags_folder / filename
        try:
            return dag_id in path.read_text(errors="replace")
        except OSError:
            return False

    def _log_tail(self, name: str, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_of(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _airflow_executable() -> Path:
    """The ``airflow`` script next to this interpreter, so the same installation runs."""
    candidate = Path(sys.executable).parent / "airflow"
    if not candidate.exists():
        raise LocalAirflowError(f"no airflow executable next to {sys.executable}")
    return candidate


def _restore_sigint() -> None:
    # A shell running us in the background starts us with SIGINT ignored; exec keeps "ignored",
    # Python then installs no KeyboardInterrupt handler, and standalone, which shuts its
    # components down only on KeyboardInterrupt, would never stop cleanly.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _session_processes(session: int) -> list[psutil.Process]:
    """Live processes in ``session``: everything standalone started, whatever their group."""
    found = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) != session:
                continue
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def _kill_session(session: int) -> None:
    leftovers = _session_processes(session)
    if not leftovers:
        return
    log.warning("killing %d Airflow processes left after stop: %s", len(leftovers), leftovers)
    for proc in leftovers:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(leftovers, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def _fresh(component: dict[str, Any], name: str, since: datetime) -> bool:
    """Whether ``component`` of the health answer is healthy on a heartbeat newer than ``since``."""
    heartbeat = component.get(f"latest_{name}_heartbeat")
    if component.get("status") != "healthy" or not heartbeat:
        return False
    beat = datetime.fromisoformat(heartbeat)
    if beat.tzinfo is None:
        beat = beat.replace(tzinfo=timezone.utc)
    return beat >= since

