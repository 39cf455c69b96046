"""
### tune__<project>

Search a tabular project's hyperparameters with Optuna, trials running as parallel Airflow
tasks, and propose the best to the project's retrain, whose gate decides as for any challenger.

* `check` refuses a bad run before any trial, without retrying: an empty or invalid search
  space, zero trials or minutes, a study name that exists with another space. It creates the
  study (or reopens it, to add trials) in the study storage (`tracking.study_storage`: SQLite in
  the deployment home, PostgreSQL on compose); a new study's first trial is params.yaml's own
  settings.
* `trials`: one mapped task per lane (`parallelism` lanes, dynamic task mapping), each running
  its share of the trials one after another: the TPE sampler proposes, the median pruner stops a
  trial whose epoch's validation loss is worse than the median of completed trials at that
  epoch. A failing trial is recorded as FAIL, not fatal. On the CeleryExecutor the lanes run on
  the `gpu` queue, like training. No trial starts after `timeout_minutes`.
* `best` records the study (every trial, its state, params and validation loss, and the best
  against params.yaml's settings) in `artifacts/<project>/tune/<study>/<run>.json` and in the
  study's MLflow run; each trial is an MLflow run nested under it.
* `propose` triggers `retrain__<project>` with the best trial's `hyperparameters` and a reason
  naming the study: the candidate goes through the normal gate, never straight to serving.
* **Params**: `n_trials`, `parallelism`, `timeout_minutes` (empty: the project's `tune` section),
  `space` (a whole search space replacing `tune.space`, e.g.
  `{"learning_rate": {"type": "float", "low": 0.0001, "high": 0.03, "log": true}}`), `study`
  (default: the project's name; reuse a name to add trials to its study).

All logic is in `pipelines.tuning` (through `pipelines.steps`); this file only wires it.
"""

from __future__ import annotations

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, dag, task

from pipelines.config import GPU_QUEUE, ProjectKind, project_kinds, task_defaults


def tune_dag(project: str):
    @dag(
        dag_id=f"tune__{project}",
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args=task_defaults(),
        tags=["flywheel", "training", f"project:{project}"],
        doc_md=__doc__,
        params={
            "n_trials": Param(None, type=["null", "integer"], minimum=1, maximum=500, description="Trials in this run (empty: tune.n_trials)."),
            "parallelism": Param(None, type=["null", "integer"], minimum=1, maximum=32, description="Trials at once (empty: tune.parallelism)."),
            "timeout_minutes": Param(None, type=["null", "number"], minimum=0, maximum=1440, description="No trial starts after this (empty: tune.timeout_minutes)."),
            "space": Param({}, type="object", description="A search space replacing tune.space for this run (empty: tune.space)."),
            # null by default: Airflow's form requires a string Param, so "" would block the Trigger button
            "study": Param(None, type=["null", "string"], maxLength=100, description="The Optuna study (empty: the project's name); an existing one must have the same space."),
        },
    )
    def tune():
        from pipelines import steps

        @task
        def check(params=None, dag_run=None):
            return steps.run(steps.tune_check, project, dict(params), steps.airflow_run(dag_run))

        @task(queue=GPU_QUEUE)  # a retried lane runs only the trials its earlier try did not

        def trials(lane, dag_run=None):
            return steps.run(steps.tune_lane, project, lane, steps.airflow_run(dag_run))

        @task(multiple_outputs=True)
        def best(lanes, dag_run=None):
            return steps.run(steps.tune_best, project, list(lanes), steps.airflow_run(dag_run))

        lanes = check()  # one record a lane
        chosen = best(lanes)
        trials.expand(lane=lanes) >> chosen
        TriggerDagRunOperator(
            task_id="propose",
            trigger_dag_id=f"retrain__{project}",
            conf={"hyperparameters": chosen["hyperparameters"], "reason": chosen["reason"]},
        )

    return tune()


for name, kind in project_kinds().items():
    if kind == ProjectKind.tabular:
        tune_dag(name)
