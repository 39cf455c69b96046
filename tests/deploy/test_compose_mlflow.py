"""The compose deployment's MLflow server and databases, run for real without a Docker engine:
PostgreSQL's init script as the postgres image runs it, then the mlflow service's own command
line and environment (from ``docker compose config``) on that PostgreSQL, answering the workers
at ``Host: mlflow:5000``; and an Optuna study in the ``optuna`` database, as ``tune__<project>``
keeps it."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, text

from pipelines.launch.triton import group_members
from tests.conftest import free_ports
from tests.deploy.test_deploy_files import INIT_DATABASES, MLFLOW_DATABASE, OPTUNA_DATABASE, compose, resolved  # noqa: F401 - fixtures
from tests.distributed.conftest import postgres  # noqa: F401 - a fixture: PostgreSQL 15 on loopback


def init_databases(url: str) -> subprocess.CompletedProcess[str]:
    """The init script run as the postgres image's entrypoint runs /docker-entrypoint-initdb.d/*.sql."""
    engine = create_engine(url)
    user, database, port = engine.url.username, engine.url.database, engine.url.port
    command = ["psql", "-v", "ON_ERROR_STOP=1", "--username", user, "--no-password", "--no-psqlrc", "--dbname", database, "-h", "127.0.0.1", "-p", str(port), "-f", str(INIT_DATABASES)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def databases(url: str) -> set[str]:
    with create_engine(url).connect() as connection:
        return set(connection.execute(text("SELECT datname FROM pg_database")).scalars())


def call(port: int, method: str, path: str, host: str, body: dict | None = None) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=json.dumps(body) if body is not None else None, headers={"Host": host, "Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, answer.read().decode(errors="replace")
    finally:
        connection.close()


def test_the_mlflow_service_runs_on_the_databases_postgres_creates(resolved, postgres, tmp_path):  # noqa: F811
    first = init_databases(postgres)
    again = init_databases(postgres)  # by hand, on a volume initialised before

    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert {MLFLOW_DATABASE, OPTUNA_DATABASE} <= databases(postgres)

    # The mlflow service as compose resolves it, on this PostgreSQL: only its address, port and
    # artifact folder changed (the user and password are the env file's; trust auth ignores the password).
    service = resolved["services"]["mlflow"]
    (port,) = free_ports(1)
    artifacts = tmp_path / "artifacts"
    where = {"--host": "127.0.0.1", "--port": str(port), "--artifacts-destination": str(artifacts)}
    args = [f"{key}={where[key]}" if key in where else arg for arg in service["command"] for key in [arg.split("=", 1)[0]]]
    env = {**os.environ, **service["environment"]}
    env["MLFLOW_BACKEND_STORE_URI"] = env["MLFLOW_BACKEND_STORE_URI"].replace("@postgres:5432/", f"@127.0.0.1:{create_engine(postgres).url.port}/")
    executable = Path(sys.executable).parent / service["entrypoint"][0]
    log = tmp_path / "mlflow.log"
    with log.open("wb") as out:
        server = subprocess.Popen([str(executable), *service["entrypoint"][1:], *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if call(port, "GET", "/health", "mlflow:5000")[0] == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)

        # a worker: tracking.uri http://mlflow:5000 sends this Host
        created, body = call(port, "POST", "/api/2.0/mlflow/experiments/create", "mlflow:5000", {"name": "flights"})
        refused = call(port, "GET", "/api/2.0/mlflow/experiments/search?max_results=10", "elsewhere.example")[0]
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        run = client.create_run(json.loads(body)["experiment_id"])
        model = tmp_path / "model.onnx"
        model.write_bytes(b"onnx")
        client.log_artifact(run.info.run_id, str(model))

        assert created == 200, body
        assert refused == 403  # the allowed-hosts list is in force
        with create_engine(env["MLFLOW_BACKEND_STORE_URI"]).connect() as connection:  # the run is in the mlflow database
            assert connection.execute(text("SELECT count(*) FROM runs")).scalar() == 1
        # proxied: uploaded over HTTP, kept by the server under its artifacts destination
        assert [p.read_bytes() for p in artifacts.rglob("model.onnx")] == [b"onnx"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # whatever of its group is left (its uvicorn)
        server.wait()
    assert group_members(server.pid) == []


def test_a_tune_study_lives_in_the_optuna_database(resolved, postgres, tmp_path):  # noqa: F811
    import optuna

    assert init_databases(postgres).returncode == 0
    storage = f"{postgres.rsplit('/', 1)[0]}/{OPTUNA_DATABASE}"

    study = optuna.create_study(study_name="tune__flights", storage=storage)
    study.optimize(lambda trial: (trial.suggest_float("x", -1, 1) - 0.3) ** 2, n_trials=3)

    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["tune__flights"]
    assert len(optuna.load_study(study_name="tune__flights", storage=storage).trials) == 3
