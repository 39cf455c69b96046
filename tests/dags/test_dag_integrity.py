"""Every DAG file imports cleanly, fast, and is set up as on-call expects; the DAGs are
generated per project from the deployment's ``projects/`` folders."""

import os
import shutil
import subprocess
import sys

import pytest

from pipelines.config import ConfigError, load_config
from tests.conftest import REPO, make_project, make_text_project

DAG_FILES = sorted(p.name for p in (REPO / "dags").glob("*.py"))
HEAVY = ("torch", "pytorch_lightning", "great_expectations", "dvc", "onnx", "onnxruntime", "evidently", "transformers", "pandas")


def parse(home):
    """The DAGs of the deployment in ``home``, parsed as the dag-processor does."""
    from airflow.dag_processing.dagbag import DagBag

    saved = os.environ.get("FLYWHEEL_HOME")
    os.environ["FLYWHEEL_HOME"] = str(home)
    try:
        return DagBag(dag_folder=str(REPO / "dags"))
    finally:
        if saved is None:
            os.environ.pop("FLYWHEEL_HOME")
        else:
            os.environ["FLYWHEEL_HOME"] = saved


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A deployment of two tabular projects and a text project."""
    home = tmp_path_factory.mktemp("deployment")
    make_project(home, name="flights")
    make_project(home, {"rollout": {"enabled": True, "approval": "required", "poke_seconds": 30}}, name="taxis")
    make_text_project(home, name="reviews")
    return home


@pytest.fixture(scope="module")
def dagbag(home):
    return parse(home)


def test_every_dag_file_imports_without_errors(dagbag):
    assert not dagbag.import_errors
    assert {d.fileloc.rsplit("/", 1)[-1] for d in dagbag.dags.values()} == set(DAG_FILES)


def test_each_project_gets_the_dags_of_its_kind(dagbag):
    assert set(dagbag.dags) == {
        "retrain__flights", "drift__flights", "rollback__flights", "revert_batch__flights", "feedback__flights", "performance__flights", "rollout__flights", "tune__flights",
        "retrain__taxis", "drift__taxis", "rollback__taxis", "revert_batch__taxis", "feedback__taxis", "performance__taxis", "rollout__taxis", "tune__taxis",
        "finetune__reviews", "drift__reviews", "rollback__reviews",
    }
    assert "project:taxis" in dagbag.dags["retrain__taxis"].tags
    # a text project's drift is reported, but it starts no fine-tune: no Asset to emit
    assert [t.task_id for t in dagbag.dags["drift__reviews"].tasks] == ["check"]


def test_adding_a_project_folder_adds_its_dags_and_removing_it_removes_them(home, tmp_path):
    deployment = tmp_path / "deployment"
    shutil.copytree(home, deployment)
    make_project(deployment, name="boats")
    assert {"retrain__boats", "drift__boats", "rollback__boats", "revert_batch__boats"} <= set(parse(deployment).dags)

    shutil.rmtree(deployment / "projects" / "boats")
    assert not any(dag_id.endswith("__boats") for dag_id in parse(deployment).dags)


def test_one_projects_broken_params_yaml_leaves_every_dag_in_place(home, tmp_path):
    # A typo in one project's file must not make a DAG file fail to import (which would take every
    # project's DAGs of that file away): its DAGs parse with defaults, and its tasks fail naming the key.
    deployment = tmp_path / "deployment"
    shutil.copytree(home, deployment)
    params = deployment / "projects" / "taxis" / "params.yaml"
    params.write_text(params.read_text() + "\nrollout:\n  canary_shares: 0.3\n")
    parsed = parse(deployment)
    assert not parsed.import_errors
    assert {"performance__flights", "performance__taxis", "rollout__flights", "rollout__taxis"} <= set(parsed.dags)
    with pytest.raises(ConfigError, match="canary_shares"):
        load_config("taxis", deployment)


def test_the_repositorys_own_deployment_parses(dagbag):
    committed = parse(REPO)
    assert not committed.import_errors
    assert {"retrain__flights", "drift__flights", "finetune__reviews"} <= set(committed.dags)


def test_every_task_has_an_owner_and_retries_with_backoff(dagbag):
    # What a retry cannot fix fails at once through pipelines.steps.run, whatever the task's retries.
    for dag in dagbag.dags.values():
        for t in dag.tasks:
            assert t.owner and t.owner != "airflow", f"{dag.dag_id}.{t.task_id} has no owner"
            assert t.retries >= 1 and t.retry_exponential_backoff, f"{dag.dag_id}.{t.task_id} does not retry"


def test_dags_are_documented_tagged_and_do_not_catch_up(dagbag):
    for dag in dagbag.dags.values():
        assert dag.doc_md and dag.tags and dag.catchup is False, dag.dag_id


def test_retrain_runs_one_at_a_time_in_the_expected_order(dagbag):
    dag = dagbag.dags["retrain__flights"]

    assert dag.max_active_runs == 1  # DVC's lock allows one `dvc repro` per repository
    order = [t.task_id for t in dag.topological_sort()]
    assert order.index("validate") < order.index("version_data") < order.index("needs_training") < order.index("train")
    assert dag.get_task("train").upstream_task_ids == {"version_data", "needs_training"}
    assert order.index("export") < order.index("gate") < order.index("publish")


def test_only_training_and_export_go_to_the_gpu_queue(dagbag):
    from pipelines.config import GPU_QUEUE

    # On the CeleryExecutor a task on the gpu queue waits for a GPU worker: only the ones that need
    # one (training; export, which builds TensorRT engines for the GPU they will run on).
    queues = {f"{d}.{t.task_id}": t.queue for d in ("retrain__flights", "drift__flights", "rollback__flights") for t in dagbag.dags[d].tasks}
    assert (queues.pop("retrain__flights.train"), queues.pop("retrain__flights.export")) == (GPU_QUEUE, GPU_QUEUE)
    assert set(queues.values()) == {"default"}, queues


def test_retrain_params_validate_what_the_ui_form_sends(dagbag):
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    from pipelines.steps import params_set

    params = dagbag.dags["retrain__flights"].params
    # the form's defaults ask for nothing: a scheduled night on unchanged data skips training
    assert params_set({name: params[name] for name in params}) == []
    good = ParamsDict(params)
    good.update({"max_epochs": 5, "learning_rate": 0.01, "force_publish": True, "force_reason": "INC-1", "confirm_batches": ["production-x.parquet"]})
    good.validate()
    for bad in ({"max_epochs": 0}, {"learning_rate": 0}, {"learning_rate": -1}, {"force_publish": "yes"}, {"confirm_batches": "production-x.parquet"}, {"hyperparameters": "lr=1"}):
        with pytest.raises(ParamValidationError, match=f"Invalid input for param {next(iter(bad))}"):
            ParamsDict(params).update(bad)


def test_tune_maps_its_lanes_and_proposes_the_best_to_the_projects_own_retrain(dagbag):
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    from pipelines.config import GPU_QUEUE

    dag = dagbag.dags["tune__flights"]
    assert dag.schedule is None or str(dag.timetable.summary) == "None"  # started by a person
    order = [t.task_id for t in dag.topological_sort()]
    assert order == ["check", "trials", "best", "propose"]
    trials = dag.get_task("trials")
    assert trials.queue == GPU_QUEUE and type(trials).__name__.endswith("MappedOperator")  # one task instance a lane
    assert dag.get_task("propose").trigger_dag_id == "retrain__flights"
    good = ParamsDict(dag.params)
    good.update({"n_trials": 6, "parallelism": 2, "timeout_minutes": 10, "space": {"dropout": {"type": "float", "low": 0, "high": 0.3}}, "study": "s1"})
    good.validate()
    ParamsDict(dag.params).validate()  # the form's defaults trigger a run (the project's study and tune section)
    for bad in ({"parallelism": 0}, {"n_trials": 0}, {"n_trials": "six"}, {"space": "dropout"}, {"timeout_minutes": -1}):
        with pytest.raises(ParamValidationError, match=f"Invalid input for param {next(iter(bad))}"):
            ParamsDict(dag.params).update(bad)


@pytest.mark.parametrize("dag_file", DAG_FILES)
def test_parsing_a_dag_file_imports_nothing_heavy_and_is_fast(dag_file):
    # Parsing happens every few seconds in the dag-processor: heavy imports belong in task bodies.
    probe = (
        "import sys, time, runpy; t = time.perf_counter(); "
        f"runpy.run_path({str(REPO / 'dags' / dag_file)!r}); "
        "print(time.perf_counter() - t); "
        f"print('heavy:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split("\n")
    heavy = next(line for line in out if line.startswith("heavy:")).removeprefix("heavy:")  # Airflow's own warnings may print first
    assert heavy == "", f"{dag_file} imports {heavy} at parse time"


def test_rollback_params_refuse_what_cannot_be_a_version(dagbag):
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    dag = dagbag.dags["rollback__flights"]
    assert dag.schedule is None or str(dag.timetable.summary) == "None"  # manual only
    good = ParamsDict(dag.params)
    good.update({"version": 2, "reason": "INC-7"})
    good.validate()
    alert = ParamsDict(dag.params)
    alert.update({"version": None, "rollout_only": True, "reason": "FlywheelCanaryErrors"})  # what the alert receiver sends
    alert.validate()
    for bad in ({"version": 0}, {"version": "two"}, {"rollout_only": "yes"}):
        with pytest.raises(ParamValidationError, match=f"Invalid input for param {next(iter(bad))}"):
            ParamsDict(dag.params).update(bad)


def test_revert_batch_params_need_a_batch_and_a_reason(dagbag):
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    dag = dagbag.dags["revert_batch__flights"]
    good = ParamsDict(dag.params)
    good.update({"batch": "2013-03.csv", "reason": "labels of March were shifted by a day upstream"})
    good.validate()
    for bad in ({"batch": ""}, {"reason": "oops"}):
        with pytest.raises(ParamValidationError, match=f"Invalid input for param {next(iter(bad))}"):
            ParamsDict(dag.params).update(bad)


def test_each_projects_drift_and_performance_emit_the_assets_that_schedule_its_own_retrain_only(dagbag):
    from datetime import timedelta

    from airflow.sdk import AssetOrTimeSchedule

    for project, other in (("flights", "taxis"), ("taxis", "flights")):
        retrain = dagbag.dags[f"retrain__{project}"]
        emitted = []
        for monitor in (dagbag.dags[f"drift__{project}"], dagbag.dags[f"performance__{project}"]):
            emitter = monitor.get_task("trigger_retrain")
            assert monitor.get_task("check") in emitter.upstream_list
            emitted += [a.uri for a in emitter.outlets]
        assert emitted == [f"flywheel://{project}/drift_detected", f"flywheel://{project}/performance_degraded"]
        assert isinstance(retrain.timetable, AssetOrTimeSchedule)
        assert retrain.timetable.timetable.expression == "0 2 * * *"
        assert [a.uri for a in retrain.timetable.asset_condition.objects] == emitted  # either one starts a retrain
        # drift in one project never schedules another's retrain
        assert not set(emitted) & {a.uri for a in dagbag.dags[f"retrain__{other}"].timetable.asset_condition.objects}
        # labels joined by feedback__<p> start performance__<p>; an event of feedback_landed starts feedback__<p>
        feedback, performance = dagbag.dags[f"feedback__{project}"], dagbag.dags[f"performance__{project}"]
        assert [a.uri for a in feedback.get_task("announce").outlets] == [f"flywheel://{project}/labels_joined"]
        assert [a.uri for a in performance.timetable.asset_condition.objects] == [f"flywheel://{project}/labels_joined"]
        assert [a.uri for a in feedback.timetable.asset_condition.objects] == [f"flywheel://{project}/feedback_landed"]
        # a performance window ends at each cron tick (UTC midnight for a day) and is the run's data interval
        assert (performance.timetable.timetable.expression, performance.timetable.timetable.interval) == ("0 */24 * * *", timedelta(hours=24))
    # a run at hh:00 checks the hour before it: its data interval is the window
    drift = dagbag.dags["drift__flights"].timetable
    assert (drift.expression, drift.interval) == ("0 * * * *", timedelta(hours=1))


def test_finetune_refuses_bad_params_in_the_form_and_sends_training_to_the_gpu_queue(dagbag):
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    dag = dagbag.dags["finetune__reviews"]
    order = [t.task_id for t in dag.topological_sort()]
    assert order.index("check_params") < order.index("validate") < order.index("version_data") < order.index("train")
    assert order.index("train") < order.index("export") < order.index("evaluate") < order.index("publish")
    assert {t.task_id for t in dag.tasks if t.queue == "gpu"} == {"train", "export"}
    good = ParamsDict(dag.params)
    good.update({"method": "qlora", "task": "causal-lm", "r": 4, "target_modules": ["q_proj"], "max_train_records": 64})
    good.validate()
    bad_values = ({"r": 0}, {"r": -2}, {"method": "dora"}, {"task": "translation"}, {"target_modules": []}, {"dropout": 1}, {"learning_rate": 0})
    for bad in bad_values:
        with pytest.raises(ParamValidationError, match=f"Invalid input for param {next(iter(bad))}"):
            ParamsDict(dag.params).update(bad)


def test_a_rollout_waits_for_a_person_only_where_the_project_requires_it(dagbag):
    from airflow.providers.standard.operators.hitl import HITLBranchOperator

    plain, approved = dagbag.dags["rollout__flights"], dagbag.dags["rollout__taxis"]
    assert plain.max_active_runs == approved.max_active_runs == 1  # the served model routes one challenger at a time
    assert plain.timetable.asset_condition.uri == "flywheel://flights/challenger_in_shadow"  # started by publish
    assert plain.get_task("after_shadow").downstream_task_ids == {"canary", "abort"}
    assert plain.get_task("after_canary_look").downstream_task_ids == {"full", "abort_canary"}
    assert not [t for t in plain.tasks if isinstance(t, HITLBranchOperator)]
    # with approval required: a person before canary and before full; Reject and the timeout abort
    assert approved.get_task("after_shadow").downstream_task_ids == {"approve_canary", "abort"}
    for task_id, to, rejected in (("approve_canary", "canary", "abort_before_canary"), ("approve_full", "full", "abort_before_full")):
        approval = approved.get_task(task_id)
        assert isinstance(approval, HITLBranchOperator) and approval.downstream_task_ids == {to, rejected}
        assert approval.options_mapping == {"Approve": to, "Reject": rejected} and approval.defaults == ["Reject"]
        assert approval.response_timeout.total_seconds() == 24 * 3600 and "comment" in approval.params
    # each stage looks at the labels in reschedule mode, as often as the project says
    for dag, poke in ((plain, 60), (approved, 30)):
        for task_id in ("shadow", "canary_look"):
            sensor = dag.get_task(task_id)
            assert (sensor.mode, sensor.poke_interval) == ("reschedule", poke)
