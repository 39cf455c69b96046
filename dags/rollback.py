"""
### rollback__<project>

Put a previous version of the project's served model back in service, for example when the
newest one misbehaves in production. Trigger it from the UI with the version to serve
(`flywheel versions <project>` or the Models page lists them), and why.

Without a version (what an alert's rollback sends: Alertmanager's receiver cannot know
versions): a rollout in progress ends and the champion serves alone; with none in progress, the
version served before the current one serves again, unless `rollout_only` (which the alert
receiver sends) says to change nothing. Naming a version also ends a rollout.

The version is loaded into Triton and served once it is ready; the version it replaces keeps
answering until then, so no request fails. The change is recorded in the model's serving
history. Unknown versions and versions rejected by a smoke test are refused without retries.

All logic is in `pipelines.steps`; this file only wires it.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task

from pipelines.config import project_kinds, task_defaults


def rollback_dag(project: str):
    @dag(
        dag_id=f"rollback__{project}",
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args=task_defaults(retries=1, retry_delay=timedelta(seconds=10), max_retry_delay=None),
        tags=["flywheel", "serving", f"project:{project}"],
        doc_md=__doc__,
        params={
            "version": Param(None, type=["null", "integer"], minimum=1, description="The version to serve again (empty: end a rollout, or the version served before)."),
            "reason": Param("", type="string", maxLength=500, description="Why (goes into the serving history)."),
            "rollout_only": Param(False, type="boolean", description="Only end a rollout in progress; with none, change nothing (what an alert sends)."),
        },
    )
    def rollback():
        @task
        def serve_previous_version(params=None, dag_run=None):
            from pipelines import steps

            return steps.run(steps.rollback, project, params["version"], steps.airflow_run(dag_run), params["reason"], params["rollout_only"])

        serve_previous_version()

    return rollback()


for name in project_kinds():
    rollback_dag(name)
