"""The retrain DAG on Airflow's CeleryExecutor: PostgreSQL metadata, a Redis broker, a scheduler,
a dag-processor, an api-server and two Celery workers, one on the default queue and one on the
gpu queue, as docker-compose.yml deploys them on several machines (here without GPUs or Docker).

Which worker ran each task is read from Airflow's metadata database, not from the DAG file.
"""

from __future__ import annotations

import pytest

from pipelines.config import GPU_QUEUE
from pipelines.data.replay import land
from pipelines.evaluation.gate import PROMOTED
from pipelines.launch.celery import CeleryAirflow
from pipelines.serving import repository
from tests.conftest import REPO, free_ports, make_project

pytestmark = pytest.mark.distributed
ROWS = 3000
RETRAIN = "retrain__flights"
WORKERS = {"cpu-worker": "default", "gpu-worker": GPU_QUEUE}


def test_training_and_export_run_on_the_gpu_worker_and_the_rest_on_the_default_worker(tmp_path, postgres, redis):
    import psycopg2

    config = make_project(tmp_path)
    land(config.dataset, "2013-01", rows=ROWS)
    land(config.dataset, "2013-02", rows=ROWS)
    cluster = CeleryAirflow(
        tmp_path / "airflow", REPO / "dags", REPO / "plugins",
        database_url=postgres, broker_url=redis, workers=WORKERS, port=free_ports(1)[0],
        # Every worker sees the same project home: the shared volume of a deployment.
        extra_env={"FLYWHEEL_HOME": str(config.home), "PYTHONPATH": str(REPO)},
        scheduled=False,
    )

    with cluster:
        cluster.wait_for_dag(RETRAIN)
        run_id = cluster.trigger(RETRAIN, {})
        state = cluster.wait_for_run(RETRAIN, run_id, timeout=1200)
        published = cluster.xcom(RETRAIN, run_id, "publish")

    with psycopg2.connect(postgres.replace("postgresql+psycopg2", "postgresql")) as db, db.cursor() as sql:
        sql.execute(
            "SELECT task_id, state, queue, hostname FROM task_instance WHERE dag_id = %s AND run_id = %s",
            (RETRAIN, run_id),
        )
        tasks = {task_id: (state, queue, host) for task_id, state, queue, host in sql.fetchall()}
        sql.execute("SELECT status, count(*) FROM celery_taskmeta GROUP BY status")
        celery_results = dict(sql.fetchall())

    assert state == "success", tasks
    assert tasks.pop("train") == tasks.pop("export") == ("success", GPU_QUEUE, "gpu-worker")
    assert tasks.pop("announce_rollout") == ("skipped", "default", "cpu-worker")  # rollout.enabled is off: no rollout to start
    assert set(tasks) == {"check_params", "validate", "version_data", "needs_training", "gate", "publish"}
    assert set(tasks.values()) == {("success", "default", "cpu-worker")}, tasks
    # Celery itself recorded every task it ran (a skipped one ends well too), in the result backend on the same database.
    assert celery_results == {"SUCCESS": 9}
    # The run published a version into the shared model repository.
    assert published["decision"] == PROMOTED and published["version"] == 1
    assert repository.versions(config.model_dir) == [1] and repository.served_version(config.model_dir) == 1
