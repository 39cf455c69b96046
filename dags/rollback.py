"""
### rollback

Put a previous version of a model back in service, for example when the newest one
misbehaves in production. Trigger it from the UI with the model and the version to serve
(`flywheel versions` or the lineage records list them).

The version is loaded into Triton and served once it is ready; the version it replaces keeps
answering until then, so no request fails. The change is recorded in the model's serving
history. Versions rejected by a smoke test are refused.

All logic is in `pipelines.serving.rollback`; this file only wires it.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task

from pipelines.config import task_defaults


@dag(
    dag_id="rollback",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=task_defaults(retries=1, retry_delay=timedelta(seconds=10), max_retry_delay=None),
    tags=["flywheel", "serving"],
    doc_md=__doc__,
    params={
        "model": Param(type="string", minLength=1, description="The model to roll back (its name in params.yaml)."),
        "version": Param(type="integer", minimum=1, description="The version to serve again."),
    },
)
def rollback():
    @task
    def serve_previous_version(params=None, dag_run=None):
        from airflow.exceptions import AirflowFailException

        from pipelines.config import load_config
        from pipelines.serving.rollback import rollback as put_back

        run = {"dag_id": dag_run.dag_id, "run_id": dag_run.run_id}
        try:
            return put_back(load_config(), params["model"], params["version"], run)
        except ValueError as refused:
            # An unknown model or version, or a rejected one: retrying cannot help.
            raise AirflowFailException(str(refused)) from refused

    serve_previous_version()


rollback()
