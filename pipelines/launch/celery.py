"""Airflow on the CeleryExecutor as plain processes: its components one by one, and Celery
workers that each take the queues they are given.

What ``docker compose up`` runs on several machines (``docker-compose.yml``), here on one, over
a PostgreSQL database and a Redis broker that are already running: for ``make test-distributed``
and for trying a worker layout without Docker. Driven through the REST client of ``LocalAirflow``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pipelines.launch.airflow import DEFAULT_PORT, LocalAirflow

HOSTNAME_ENV = "FLYWHEEL_HOSTNAME"
# Airflow's [core] hostname_callable: what a task instance records as the host that ran it.
HOSTNAME_CALLABLE = "pipelines.launch.celery.hostname"


def hostname() -> str:
    """``$FLYWHEEL_HOSTNAME``, else this machine's FQDN (Airflow's default).

    Workers on one machine share its hostname; naming each one lets ``task_instance.hostname``
    tell which worker ran a task, as separate machines' names would.
    """
    return os.environ.get(HOSTNAME_ENV) or socket.getfqdn()


class CeleryAirflow(LocalAirflow):
    """Scheduler, dag-processor, api-server and one Celery worker per entry of ``workers``
    (worker name -> comma-separated queues), each in its own session, on ``database_url``
    (``postgresql+psycopg2://...``) with the Celery broker at ``broker_url`` (``redis://...``).
    """

    def __init__(
        self,
        airflow_home: Path,
        dags_folder: Path,
        plugins_folder: Path,
        *,
        database_url: str,
        broker_url: str,
        workers: dict[str, str],
        port: int = DEFAULT_PORT,
        extra_env: dict[str, str] | None = None,
        scheduled: bool = True,
    ) -> None:
        if not workers:
            raise ValueError("CeleryAirflow needs at least one worker: {name: queues}")
        celery = {
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url,
            "AIRFLOW__CELERY__BROKER_URL": broker_url,
            # Celery's task results go to the metadata database too, as in the compose file.
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{database_url}",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": HOSTNAME_CALLABLE,
            # One task at a time per worker: a GPU worker holds one GPU, and this machine has 2 cores.
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
        }
        super().__init__(
            airflow_home, dags_folder, plugins_folder, port=port,
            extra_env={**celery, **(extra_env or {})}, scheduled=scheduled,
        )
        self.workers = dict(workers)

    def processes(self) -> dict[str, tuple[list[str], dict[str, str]]]:
        components: dict[str, tuple[list[str], dict[str, str]]] = {name: ([name], {}) for name in ("scheduler", "dag-processor", "api-server")}
        for name, queues in self.workers.items():
            # Task logs are written under AIRFLOW_HOME/logs, which the api-server reads directly
            # (a shared volume in the compose file), so no worker serves logs over a port of its own.
            args = ["celery", "worker", "--queues", queues, "--celery-hostname", f"{name}@%h", "--skip-serve-logs"]
            components[name] = (args, {HOSTNAME_ENV: name})
        return components
