"""Every training run in a real MLflow tracking server, and training that goes on without one."""

import json

import pytest
from mlflow import MlflowClient

from pipelines import tracking
from pipelines.config import Deployment, TrackingConfig
from pipelines.data.versioning import version_split
from pipelines.evaluation.gate import evaluate
from pipelines.export.onnx import export
from pipelines.launch.mlflow_server import MlflowServer
from pipelines.serving import repository
from pipelines.serving.publish import publish
from pipelines.training.train import train
from tests.conftest import free_ports, make_home, make_project
from tests.unit.test_split import write_raw

RUN = {"dag_id": "retrain__flights", "run_id": "manual__tracked", "run_type": "manual", "logical_date": None}


def project(home, uri):
    make_home(home, {"tracking": {"uri": uri, "timeout_s": 2}})
    config = make_project(home)
    write_raw(config, "2013-01", rows=2500)
    return config, version_split(config)["data_version"]


def test_a_retrain_logs_params_curves_the_onnx_file_and_the_gate_and_the_version_points_at_its_run(tmp_path, mlflow_server):
    config, data_version = project(tmp_path / "home", mlflow_server)

    trained = train(config, data_version, {"max_epochs": 3}, RUN)
    exported = export(config, trained["candidate"])
    decision = evaluate(config, trained["candidate"], False, None)
    published = publish(config, trained["candidate"], decision, data_version, RUN)

    tracked = trained["tracking"]
    assert tracked["status"] == "logged" and tracked["store"] == mlflow_server
    client = MlflowClient(mlflow_server)
    run = client.get_run(tracked["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.learning_rate"] == str(config.train.learning_rate)
    assert run.data.params["model.hidden_sizes"] == str(list(config.model.hidden_sizes))
    assert set(json.loads(json.dumps(run.data.params))) >= {f"data.{part}" for part in ("train", "val")} | {"code"}
    # one point per epoch on each curve, at steps 0..epochs-1
    for curve in ("train_loss", "val_loss"):
        history = client.get_metric_history(tracked["run_id"], curve)
        assert [m.step for m in history] == list(range(trained["epochs"])), curve
    assert run.data.metrics["best_val_loss"] == pytest.approx(trained["best_val_loss"])
    # the gate's numbers and decision, the Airflow run, the exported ONNX file
    assert run.data.metrics["gate.challenger.roc_auc"] == pytest.approx(decision["challenger"]["roc_auc"])
    assert run.data.tags[tracking.DECISION_TAG] == decision["decision"] == "promoted"
    assert run.data.tags["airflow.run_id"] == RUN["run_id"] and run.data.tags[tracking.PROJECT_TAG] == "flights"
    assert {a.path for a in client.list_artifacts(tracked["run_id"])} >= {"model.onnx", "export.json"}
    assert exported["onnx"].endswith("model.onnx")
    # the version's lineage links to the run, and the run names the version and its lineage
    lineage = repository.lineage_of(config.model_dir, published["version"])
    assert lineage["tracking"]["run_id"] == tracked["run_id"]
    assert lineage["tracking"]["url"] == f"{mlflow_server}/#/experiments/{tracked['experiment_id']}/runs/{tracked['run_id']}"
    tags = client.get_run(tracked["run_id"]).data.tags
    assert tags[tracking.VERSION_TAG] == str(published["version"]) and tags[tracking.LINEAGE_TAG] == published["lineage"]

    # a challenger gated against that champion: both sides' metrics and the paired interval
    challenger = train(config, data_version, {"max_epochs": 1}, RUN | {"run_id": "manual__second"})
    export(config, challenger["candidate"])
    second = evaluate(config, challenger["candidate"], False, None)
    logged = client.get_run(challenger["tracking"]["run_id"]).data
    assert logged.metrics["gate.champion.roc_auc"] == pytest.approx(second["champion"]["roc_auc"])
    assert logged.metrics["gate.interval_low"] == pytest.approx(second["interval"]["low"])
    assert logged.tags[tracking.DECISION_TAG] == second["decision"] and tracking.VERSION_TAG not in logged.tags


def test_an_unreachable_server_logs_to_the_candidate_folder_and_the_record_says_so(tmp_path):
    (port,) = free_ports(1)  # nothing listens there
    config, data_version = project(tmp_path / "home", f"http://127.0.0.1:{port}")

    trained = train(config, data_version, {"max_epochs": 2}, RUN)
    export(config, trained["candidate"])

    tracked = trained["tracking"]
    assert tracked["status"] == "local" and "tracking server unavailable" in tracked["detail"] and str(port) in tracked["detail"]
    folder = config.home / trained["candidate"]
    assert tracked["store"] == f"sqlite:///{folder / 'mlflow' / 'mlflow.db'}" and tracked["url"] is None
    local = MlflowClient(tracked["store"])
    assert [m.step for m in local.get_metric_history(tracked["run_id"], "val_loss")] == list(range(trained["epochs"]))
    assert "model.onnx" in {a.path for a in local.list_artifacts(tracked["run_id"])}


def test_a_server_that_dies_mid_training_costs_its_curves_not_the_training(tmp_path):
    (port,) = free_ports(1)
    config, data_version = project(tmp_path / "home", f"http://127.0.0.1:{port}")
    server = MlflowServer(Deployment(home=tmp_path / "mlflow", tracking=TrackingConfig(uri=f"http://127.0.0.1:{port}")))
    server.start()

    import pytorch_lightning as pl

    class StopTheServer(pl.Callback):  # the fault: the server goes away after the first epoch
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                server.stop()

    from pipelines.data.split import split_paths
    from pipelines.training.train import fit

    try:
        tracked = tracking.open_run(config.tracking, config.name, tmp_path / "candidate", "dies", {"a": 1}, {})
        record = fit(config.train.model_copy(update={"max_epochs": 3}), config.model, config.dataset, split_paths(config.split.output_dir), tmp_path / "candidate", tracked, 2, [StopTheServer()])
    finally:
        server.stop()

    assert record["epochs"] == 3 and record["best_val_loss"] > 0
    assert record["tracking"]["status"] == "logged" and "per-epoch metrics stopped at epoch" in record["tracking"]["detail"]


def test_tracking_off_logs_nothing_and_says_so(tmp_path):
    config = make_project(make_home(tmp_path / "home"))

    record = tracking.open_run(config.tracking, config.name, tmp_path / "c", "off", {}, {})

    assert record["status"] == "off" and record["run_id"] is None and "tracking.uri is null" in record["detail"]
    assert not tracking.log_to(record, {"x": 1.0}) and not (tmp_path / "c").exists()
