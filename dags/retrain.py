"""
### retrain

Nightly, and when the drift DAG emits the Asset `drift_detected`: validate the batches that landed, version the split with DVC, train a challenger,
export it to ONNX (parity-checked), gate it against the served champion on the same test
split, and publish it as a new Triton model version if it wins.

* A batch that fails validation is moved to `quarantine/` with its report; the run fails
  without retrying, so the failure pages someone.
* A new version goes live in Triton only after a smoke test through tritonclient; one that
  fails is marked rejected, the served version keeps answering, and the run fails.
* A challenger that loses is kept with its metrics; the run succeeds with the decision
  "not promoted" in the `publish` task's result and the run's lineage record.
* Why a run ran (schedule, drift with its report, manual) is in its lineage record.
* `train` runs on the `gpu` queue: on the CeleryExecutor only GPU workers take it.
* **Params**: `force_publish` (with a `force_reason`) overrides the gate; `max_epochs` and
  `learning_rate` override `params.yaml` for this run.

All logic is in `pipelines.retrain`; this file only wires it.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from pipelines.config import GPU_QUEUE, task_defaults
from pipelines.drift import DRIFT_DETECTED



@dag(
    dag_id="retrain",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 2 * * *", timezone="UTC"), assets=[Asset(DRIFT_DETECTED)]
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # DVC's repository lock allows one `dvc repro` at a time
    default_args=task_defaults(),
    tags=["flywheel", "training"],
    doc_md=__doc__,
    params={
        "force_publish": Param(False, type="boolean", description="Publish even if the gate rejects the challenger."),
        "force_reason": Param("", type="string", maxLength=500, description="Why the gate is overridden (required with force_publish)."),
        "max_epochs": Param(None, type=["null", "integer"], minimum=1, maximum=500, description="Override train.max_epochs."),
        "learning_rate": Param(None, type=["null", "number"], exclusiveMinimum=0, maximum=1, description="Override train.learning_rate."),
    },
)
def retrain():
    from pipelines import retrain as steps

    @task
    def check_params(params=None):
        return steps.check_params(params["force_publish"], params["force_reason"])

    @task(retries=0)
    def validate():
        from airflow.exceptions import AirflowFailException

        from pipelines.data.ingest import BatchValidationError

        try:
            return steps.validate()
        except BatchValidationError as failed:
            # The bad batches are already in quarantine: a retry would find nothing and pass.
            raise AirflowFailException(str(failed)) from failed

    @task
    def version_data():
        return steps.version_data()

    @task(queue=GPU_QUEUE)
    def train(versioned, params=None):
        return steps.train(versioned["data_version"], params["max_epochs"], params["learning_rate"])

    @task(queue=GPU_QUEUE)  # a TensorRT engine is built for the GPU it will run on (export.tensorrt)
    def export(trained):
        return steps.export(trained["candidate"])

    @task
    def gate(trained, params=None):
        return steps.gate(trained["candidate"], params["force_publish"], params["force_reason"])

    @task
    def publish(trained, decision, versioned, params=None, dag_run=None, triggering_asset_events=None):
        from airflow.exceptions import AirflowFailException

        from pipelines.serving.live import SmokeTestError

        run = {
            "dag_id": dag_run.dag_id,
            "run_id": dag_run.run_id,
            "run_type": getattr(dag_run.run_type, "value", dag_run.run_type),  # an enum: keep "manual", not its repr
            "logical_date": str(dag_run.logical_date),
            "trigger": steps.trigger(
                getattr(dag_run.run_type, "value", dag_run.run_type),
                [e.extra for events in (triggering_asset_events or {}).values() for e in events],
            ),
        }
        try:
            return steps.publish(trained["candidate"], decision, versioned["data_version"], run, dict(params))
        except SmokeTestError as failed:
            # The version is marked rejected and the old one serves: a retry would only fail again.
            raise AirflowFailException(str(failed)) from failed

    versioned = version_data()
    check_params() >> validate() >> versioned
    trained = train(versioned)
    decision = gate(trained)
    export(trained) >> decision
    publish(trained, decision, versioned)


retrain()
