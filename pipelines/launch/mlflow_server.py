"""A real MLflow tracking server on one machine, started and stopped by the project.

``mlflow server`` from this venv, at the loopback host and port of the deployment's
``tracking.uri``: runs, params and metrics in a SQLite database, artifacts stored by the server
itself (proxied: clients upload them over HTTP to ``mlflow-artifacts:/``), all in
``<home>/.mlflow``. ``flywheel up`` and ``make demo`` run it beside Airflow and Triton;
docker-compose.yml runs the same server on PostgreSQL.

MLflow 3's security middleware stays on with its defaults: requests must carry a ``Host`` of
localhost, 127.0.0.1 or a private address, and state-changing API calls from a browser must come
from a localhost origin, which is what a browser on ``http://localhost:<port>`` or
``http://127.0.0.1:<port>`` sends (the Models page's links open the UI in that browser).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from pipelines.config import Deployment
from pipelines.launch.triton import group_members

log = logging.getLogger(__name__)

RUNTIME_DIR = ".mlflow"  # in the project home: database, artifacts, log
# Host names of a tracking URI this launcher can serve, and the address it binds for each.
LOOPBACK = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1", "::1": "::1"}
_POLL_S = 0.2


class MlflowServerError(RuntimeError):
    """The MLflow tracking server cannot be started here, or did not become healthy."""


def local_address(uri: str) -> tuple[str, int]:
    """(bind address, port) of a tracking URI such as ``http://127.0.0.1:5000``; ``MlflowServerError``
    for a URI that is not plain http on a loopback host with an explicit port and no path."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise MlflowServerError(f"tracking.uri {uri!r} is not a URL ({exc})") from None
    problem = None
    if parts.scheme != "http":
        problem = f"its scheme is {parts.scheme or 'missing'!r}, not 'http'"
    elif (parts.hostname or "") not in LOOPBACK:
        problem = f"its host {parts.hostname!r} is not this machine's loopback ({', '.join(LOOPBACK)})"
    elif port is None:
        problem = "it names no port"
    elif parts.path.strip("/") or parts.query or parts.fragment:
        problem = "it has a path, query or fragment"
    if problem:
        raise MlflowServerError(
            f"tracking.uri {uri!r} cannot be served by a local MLflow server: {problem}. "
            "Set tracking.uri in projects/defaults.yaml to e.g. http://127.0.0.1:5000, or to null to start no server"
        )
    assert port is not None and parts.hostname is not None
    return LOOPBACK[parts.hostname], port


class MlflowServer:
    """``mlflow server`` on ``<home>/.mlflow`` (SQLite database, artifact store, log), listening
    where the deployment's ``tracking.uri`` points. A context manager: leaving the block stops it.

    ``start`` is ``launch`` (the process, at once) then ``wait_ready`` (until ``GET /health``
    answers 200, about 15 s on 2 cores); callers that start other servers too may launch it
    first and wait for it last, so its start-up runs beside theirs."""

    def __init__(self, config: Deployment, workers: int = 1) -> None:
        if config.tracking.uri is None:
            raise MlflowServerError("tracking.uri is null in projects/defaults.yaml: there is no MLflow server to start")
        self.host, self.port = local_address(config.tracking.uri)
        self.workers = workers
        self.runtime = config.home / RUNTIME_DIR
        self.database = self.runtime / "mlflow.db"
        self.artifacts = self.runtime / "artifacts"
        self.log_file = self.runtime / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None
        # Loopback: never through the caller's HTTP(S)_PROXY.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def url(self) -> str:
        """The tracking URI clients use, e.g. ``http://127.0.0.1:5000``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """PID of the ``mlflow server`` process (also its process group's id), if started."""
        return self._proc.pid if self._proc else None

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def command(self) -> list[str]:
        """The ``mlflow server`` command line ``launch`` runs."""
        return [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri", f"sqlite:///{self.database}",
            # Proxied artifacts: new experiments store theirs at mlflow-artifacts:/, which clients
            # reach through this server, and the server keeps them here.
            "--artifacts-destination", str(self.artifacts),
            "--host", self.host,
            "--port", str(self.port),
            "--workers", str(self.workers),
        ]

    def start(self, timeout: float = 60) -> None:
        """Launch the server and wait until it is healthy (``MlflowServerError`` if it exits or
        is not healthy within ``timeout`` seconds; then it is stopped)."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start ``mlflow server`` in a process group of its own and return at once.
        ``MlflowServerError`` if it already runs, or if something else listens on its port (a
        server already there would answer the health check for us, and runs would go to it)."""
        if self._proc is not None and self._proc.poll() is None:
            raise MlflowServerError(f"the MLflow server is already running (pid {self._proc.pid}, {self.url})")
        self.stop()  # what is left of a server that exited (its uvicorn may still hold the port)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.host, self.port))
            except OSError as exc:
                raise MlflowServerError(
                    f"port {self.port} on {self.host} is already in use ({exc.strerror}); is another MLflow server "
                    f"(or `flywheel up`) running? Stop it, or set tracking.uri in projects/defaults.yaml to another port"
                ) from None
        self.artifacts.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            {
                "MLFLOW_DISABLE_TELEMETRY": "true",  # nothing leaves the machine
                # MLflow's job runner (GenAI evaluation jobs, trace roll-ups: nothing Flywheel
                # uses) would add a Huey consumer process per server.
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            }
        )
        with self.log_file.open("ab") as out:
            self._proc = subprocess.Popen(
                self.command(), cwd=self.runtime, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        log.info("MLflow server starting on %s (pid %d, log %s)", self.url, self._proc.pid, self.log_file)

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until ``GET /health`` answers 200; ``MlflowServerError`` with the log's tail if
        the server exits first or is not healthy after ``timeout`` seconds (then it is stopped)."""
        if self._proc is None:
            raise MlflowServerError("the MLflow server was not launched")
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()
                raise MlflowServerError(f"mlflow server exited with code {code}; see {self.log_file}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise MlflowServerError(f"mlflow server not healthy on {self.url} after {timeout:.0f} s; see {self.log_file}:\n{self.log_tail()}")
            time.sleep(_POLL_S)
        log.info("MLflow server ready on %s (SQLite %s, artifacts %s)", self.url, self.database, self.artifacts)

    def healthy(self) -> bool:
        """Whether ``GET <url>/health`` answers 200 now."""
        try:
            with self._opener.open(f"{self.url}/health", timeout=2) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM to the server's process group (the CLI and its uvicorn), SIGKILL to whatever
        of it is left after ``timeout`` seconds; returns once none of the group runs."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        group = proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("mlflow server did not stop within %.0f s of SIGTERM; killing it", timeout)
        # uvicorn may outlive its parent CLI by a moment, or hang: never left running.
        deadline = time.monotonic() + timeout
        while group_members(group) and time.monotonic() < deadline:
            time.sleep(0.05)
        if group_members(group):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
            while group_members(group):
                time.sleep(0.05)
        proc.wait()

    def wait(self) -> int:
        """Block until the server exits; its exit code."""
        if self._proc is None:
            raise MlflowServerError("the MLflow server is not running")
        return self._proc.wait()

    def poll(self) -> int | None:
        """The exit code of a server that stopped, None while it runs (``MlflowServerError`` if never started)."""
        if self._proc is None:
            raise MlflowServerError("the MLflow server is not running")
        return self._proc.poll()

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of ``<home>/.mlflow/server.log`` ("" before the first start)."""
        if not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
