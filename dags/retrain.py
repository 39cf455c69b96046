"""
### retrain__<project>

One DAG per tabular project (`projects/<project>/params.yaml`), nightly and when that
project's drift DAG emits its Asset `flywheel://<project>/drift_detected` or its performance DAG
`flywheel://<project>/performance_degraded`: validate the batches
that landed, version the split with DVC, train a challenger, export it to ONNX
(parity-checked), gate it against the served champion on the same test split, and publish it
as a new Triton model version if it wins.

* A batch that fails validation is moved to `quarantine/<project>/` with its report; the run
  fails without retrying, so the failure pages someone. So does a batch whose labels fail the
  label check (the champion keeps almost none of its test skill on them): it is held in
  quarantine with the evidence until a run names it in `confirm_batches`. So does anything else a retry cannot
  fix (a config error, a missing column, a suite that does not parse): `pipelines.steps.run`.
* A new version goes live in Triton only after a smoke test through tritonclient; one that
  fails is marked rejected, the served version keeps answering, and the run fails.
* With `rollout.enabled`, a promoted challenger is routed in shadow beside the served champion
  instead of replacing it, and `announce_rollout` emits `flywheel://<project>/challenger_in_shadow`,
  which starts `rollout__<project>` (shadow, canary, full, each decided on live labels).
* A challenger that loses is kept with its metrics; the run succeeds with the decision
  "not promoted" in the `publish` task's result and the run's lineage record.
* Why a run ran (schedule, drift with its report, a performance drop with its window, manual)
  is in its lineage record.
* A night with nothing new (the data version the last completed run trained on, no Param
  set) skips train, export, gate and publish; `needs_training`'s log says why.
* `train` and `export` run on the `gpu` queue: on the CeleryExecutor only GPU workers take them.
* **Params**: `force_publish` (with a `force_reason`) overrides the gate; `max_epochs` and
  `learning_rate` override the project's params.yaml for this run, and `hyperparameters` any of
  the tunable settings (`tune__<project>` proposes its best trial this way, through the gate); `confirm_batches` names held
  batches whose labels a person has checked, to be ingested without the label check;
  `reason` says why a person started the run (the on-call page's "Retrain now" sends it).
* A person's run (manual), a forced publish, and the user Airflow names as its trigger go
  into the project's audit trail (`pipelines.audit`, the Audit page).

All logic is in `pipelines.steps`; this file only wires it.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from pipelines.config import GPU_QUEUE, ProjectKind, project_kinds, task_defaults
from pipelines.steps import CHALLENGER_IN_SHADOW, DRIFT_DETECTED, PERFORMANCE_DEGRADED, project_asset


def retrain_dag(project: str):
    in_shadow = Asset(project_asset(project, CHALLENGER_IN_SHADOW))

    @dag(
        dag_id=f"retrain__{project}",
        schedule=AssetOrTimeSchedule(
            timetable=CronTriggerTimetable("0 2 * * *", timezone="UTC"),
            assets=Asset(project_asset(project, DRIFT_DETECTED)) | Asset(project_asset(project, PERFORMANCE_DEGRADED)),
        ),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,  # DVC's repository lock allows one `dvc repro` at a time
        default_args=task_defaults(),
        tags=["flywheel", "training", f"project:{project}"],
        doc_md=__doc__,
        params={
            "reason": Param("", type="string", maxLength=500, description="Why you start this run (the audit trail keeps it); a reason makes the run train even on unchanged data."),
            "force_publish": Param(False, type="boolean", description="Publish even if the gate rejects the challenger."),
            "force_reason": Param("", type="string", maxLength=500, description="Why the gate is overridden (required with force_publish)."),
            "max_epochs": Param(None, type=["null", "integer"], minimum=1, maximum=500, description="Override train.max_epochs."),
            "learning_rate": Param(None, type=["null", "number"], exclusiveMinimum=0, maximum=1, description="Override train.learning_rate."),
            "hyperparameters": Param(
                {},
                type="object",
                description="Override train and model settings (max_epochs, batch_size, learning_rate, embedding_dim, hidden_sizes, dropout); tune__<project> sends its best trial's here.",
            ),
            "confirm_batches": Param(
                [], type="array", items={"type": "string"}, description="Held batches (their names in quarantine) whose labels were checked: ingest them without the label check."
            ),
        },
    )
    def retrain():
        from pipelines import steps

        @task
        def check_params(params=None, dag_run=None):
            return steps.run(steps.check_params, project, params["force_publish"], params["force_reason"], steps.airflow_run(dag_run), params["reason"])

        @task
        def validate(params=None):
            return steps.run(steps.validate, project, list(params["confirm_batches"]))

        @task
        def version_data():
            return steps.run(steps.version_data, project)

        @task.short_circuit
        def needs_training(versioned, params=None):
            """False skips everything after it: nothing new to train on (the reason is in its log)."""
            decision = steps.run(steps.needs_training, project, versioned["data_version"], dict(params))
            print(decision["reason"])
            return decision["train"]

        @task(queue=GPU_QUEUE)
        def train(versioned, params=None, dag_run=None):
            chosen = steps.run(steps.hyperparameters, dict(params))
            return steps.run(steps.train, project, versioned["data_version"], chosen, steps.airflow_run(dag_run))

        @task(queue=GPU_QUEUE)  # a TensorRT engine is built for the GPU it will run on (export.tensorrt)
        def export(trained):
            return steps.run(steps.export, project, trained["candidate"])

        @task
        def gate(trained, params=None):
            return steps.run(steps.gate, project, trained["candidate"], params["force_publish"], params["force_reason"])

        @task
        def publish(trained, decision, versioned, params=None, dag_run=None, triggering_asset_events=None):
            run_type = getattr(dag_run.run_type, "value", dag_run.run_type)
            events = [{"asset": e.asset.uri, "extra": e.extra} for events in (triggering_asset_events or {}).values() for e in events]
            run = steps.airflow_run(dag_run, steps.trigger(run_type, events))
            return steps.run(steps.publish, project, trained["candidate"], decision, versioned["data_version"], run, dict(params))

        @task(outlets=[in_shadow])
        def announce_rollout(published, outlet_events=None):
            """Start rollout__<project> when publish routed the challenger in shadow; else skipped."""
            from airflow.exceptions import AirflowSkipException

            if not published["rollout"]:
                raise AirflowSkipException("no rollout: the challenger was not promoted, or it serves in full (rollout.enabled is off, or it is the first version)")
            outlet_events[in_shadow].extra = {"challenger": published["rollout"]}
            return published["rollout"]

        versioned = version_data()
        check_params() >> validate() >> versioned
        trained = train(versioned)
        needs_training(versioned) >> trained
        decision = gate(trained)
        export(trained) >> decision
        announce_rollout(publish(trained, decision, versioned))

    return retrain()


# One DAG per tabular project; reading the projects' YAML is all that parsing costs.
for name, kind in project_kinds().items():
    if kind == ProjectKind.tabular:
        retrain_dag(name)
