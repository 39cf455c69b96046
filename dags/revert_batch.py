"""
### revert_batch__<project>

Take a batch back out of a tabular project's raw data: an upstream export that passed
validation but turned out wrong (a mislabelled month, rows from the wrong system). Trigger it
from the UI with the batch (`flywheel batches <project>` lists them) and why.

Its rows leave the raw data as a new data version (DVC, pushed), its file goes back to
`quarantine/<project>/` with the reason, and the project's batch ledger records who and why;
the next retrain trains without it. While a retrain is ingesting or versioning the data, the
revert waits for it (then retries). An unknown batch or an empty reason is refused at once.

All logic is in `pipelines.steps`; this file only wires it.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task

from pipelines.config import ProjectKind, project_kinds, task_defaults


def revert_batch_dag(project: str):
    @dag(
        dag_id=f"revert_batch__{project}",
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args=task_defaults(retries=2, retry_delay=timedelta(minutes=1)),
        tags=["flywheel", "data", f"project:{project}"],
        doc_md=__doc__,
        params={
            "batch": Param(type="string", minLength=1, description="The batch to take back, as `flywheel batches` lists it (e.g. 2013-03.csv)."),
            "reason": Param(type="string", minLength=10, maxLength=500, description="Why: kept with the batch in quarantine and in the ledger."),
        },
    )
    def revert_batch():
        @task
        def revert(params=None, dag_run=None):
            from pipelines import steps

            return steps.run(steps.revert_batch, project, params["batch"], params["reason"], steps.airflow_run(dag_run))

        revert()

    return revert_batch()


for name, kind in project_kinds().items():
    if kind == ProjectKind.tabular:
        revert_batch_dag(name)
