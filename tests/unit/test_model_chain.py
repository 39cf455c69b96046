"""Train, export, gate and publish on a real slice of the flights, without a scheduler."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import f1_score

from pipelines.artifacts import CODES, CONFIG_FILE, LABEL_OUTPUT, LOOKUP_FILE, MODEL_FILE, NETWORK_FILE, NUMERIC, OUTPUT, PLAN_FILE, REQUEST_ID
from pipelines.config import load_config
from pipelines.data import raw
from pipelines.data.split import split_paths
from pipelines.data.versioning import version_split
from pipelines.evaluation.gate import NOT_PROMOTED, PROMOTED, Scored, beats, evaluate, judge, predict_onnx, slices, threshold_of
from pipelines.evaluation.seed_noise import measure
from pipelines.evaluation.threshold import choose
from pipelines.export import onnx as onnx_export
from pipelines.export.onnx import ParityError, export, onnx_inputs
from pipelines.serving import repository
from pipelines.serving.publish import publish, rejections_in_a_row
from pipelines.training.train import CANDIDATE_FILE, load_candidate, train
from tests.conftest import REPO, make_project
from tests.unit.test_split import write_raw

RUN = {"dag_id": "retrain", "run_id": "manual__1", "run_type": "manual", "logical_date": None}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A project with two months ingested, split, and one candidate trained and exported."""
    config = make_project(tmp_path_factory.mktemp("chain") / "project")
    write_raw(config, "2013-01", "2013-02", rows=3000)
    versioned = version_split(config)
    candidate = train(config, versioned["data_version"])
    export(config, candidate["candidate"])
    return config, versioned["data_version"], candidate


def test_training_writes_a_complete_candidate_and_reuses_it_on_the_same_inputs(trained):
    config, data_version, first = trained

    again = train(config, data_version)

    assert not first["reused"] and again["reused"]
    assert again["candidate"] == first["candidate"]
    record = json.loads((config.home / first["candidate"] / CANDIDATE_FILE).read_text())
    assert record["best_val_loss"] == pytest.approx(first["best_val_loss"])
    assert record["inputs"]["data"]["train"] == data_version["data/flights/split/train.parquet"]


def test_a_worker_that_mounts_the_project_home_elsewhere_finds_the_candidate(trained, tmp_path):
    # On Celery, train, export, gate and publish may run on machines that mount the shared home
    # at different paths: the candidate a task hands on must not name the trainer's mount point.
    config, _, candidate = trained
    assert not candidate["candidate"].startswith("/")
    elsewhere = tmp_path / "mnt" / "flywheel"
    shutil.copytree(config.home, elsewhere)
    worker = load_config(config.name, elsewhere)

    decision = evaluate(worker, candidate["candidate"])

    assert (elsewhere / candidate["candidate"] / "gate.json").exists()
    assert decision["challenger"] == evaluate(config, candidate["candidate"])["challenger"]


def test_other_params_train_another_candidate(trained):
    config, data_version, first = trained

    other = train(config, data_version, {"max_epochs": 1, "learning_rate": 1e-4})

    assert other["candidate"] != first["candidate"] and not other["reused"]
    assert other["epochs"] == 1


def test_onnx_model_takes_raw_columns_with_a_dynamic_batch_and_matches_torch(trained):
    config, _, candidate = trained
    model, encoding = load_candidate(config.home / candidate["candidate"])
    rows = pd.read_parquet(split_paths(config.split.output_dir)["test"]).head(37)
    rows.loc[rows.index[0], "dest"] = "NEVER-SEEN"  # an unseen category maps to the OOV slot, not an error

    session = ort.InferenceSession(str(config.home / candidate["candidate"] / MODEL_FILE))
    (got,) = session.run([OUTPUT], onnx_inputs(rows, list(encoding.categorical), encoding.numeric))

    with torch.no_grad():
        expected = model.predict(torch.from_numpy(encoding.categorical_indices(rows)), torch.from_numpy(encoding.numeric_values(rows))).numpy()
    assert got.shape == (37, 1)
    np.testing.assert_allclose(got[:, 0], expected, atol=1e-5)
    assert {i.name for i in session.get_inputs()} == {f.name for f in config.dataset.features}
    batch_dim = onnx.load(str(config.home / candidate["candidate"] / MODEL_FILE)).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value


def test_a_classifier_answers_a_label_cut_at_the_threshold_chosen_on_validation(trained):
    config, _, candidate = trained
    folder = config.home / candidate["candidate"]
    column = config.dataset.label.column
    paths = split_paths(config.split.output_dir)
    chosen = json.loads((folder / "export.json").read_text())["threshold"]

    # The threshold is the F1-best cut of the validation split, as the served graph scores it
    validation = pd.read_parquet(paths["val"]).dropna(subset=[column])
    assert chosen == choose(validation[column].to_numpy().astype(int), predict_onnx(folder / MODEL_FILE, validation), config.gate.threshold)
    assert chosen["objective"] == "f1" and chosen["validation"]["rows"] == len(validation)

    # and the exported model answers it as a second output: 1 exactly where prediction >= threshold
    test = pd.read_parquet(paths["test"])
    session = ort.InferenceSession(str(folder / MODEL_FILE))
    assert [(o.name, o.type) for o in session.get_outputs()] == [(OUTPUT, "tensor(float)"), (LABEL_OUTPUT, "tensor(int32)")]
    _, encoding = load_candidate(folder)
    prediction, label = session.run(None, onnx_inputs(test, list(encoding.categorical), encoding.numeric))
    assert label.shape == prediction.shape == (len(test), 1) and label.dtype == np.int32
    np.testing.assert_array_equal(label, (prediction >= np.float32(chosen["value"])).astype(np.int32))
    assert set(np.unique(label)) == {0, 1}
    # as does the network half TensorRT builds an engine of
    codes, numeric = ort.InferenceSession(str(folder / LOOKUP_FILE)).run([CODES, NUMERIC], onnx_inputs(test, list(encoding.categorical), encoding.numeric))
    np.testing.assert_array_equal(ort.InferenceSession(str(folder / NETWORK_FILE)).run([LABEL_OUTPUT], {CODES: codes, NUMERIC: numeric})[0], label)


def test_the_chosen_threshold_finds_the_delays_a_cut_at_one_half_misses(trained):
    # The issue: the delay classifier rarely gives a delay more than 0.5, so a client cutting the
    # probability there is told "on time" for (nearly) every flight
    config, _, candidate = trained
    test = pd.read_parquet(split_paths(config.split.output_dir)["test"]).dropna(subset=[config.dataset.label.column])
    truth = test[config.dataset.label.column].to_numpy().astype(int)
    answers = onnx_export.onnx_outputs(config.home / candidate["candidate"] / MODEL_FILE, test)

    at_half, at_label = (f1_score(truth, cut) for cut in (answers[OUTPUT] >= 0.5, answers[LABEL_OUTPUT]))

    assert at_label > at_half + 0.1, (at_label, at_half)


def test_a_label_that_is_not_the_thresholded_prediction_fails_the_export(trained, tmp_path, monkeypatch):
    # Given a graph whose label cuts at another value than the threshold export.json records
    config, _, candidate = trained
    folder = config.home / candidate["candidate"]
    recorded = json.loads((folder / "export.json").read_text())["threshold"]["value"]
    test = pd.read_parquet(split_paths(config.split.output_dir)["test"]).head(config.export.parity_rows)
    below = int(np.sum(predict_onnx(folder / MODEL_FILE, test) < np.float32(recorded)))
    labelled = onnx_export.with_label
    monkeypatch.setattr(onnx_export, "with_label", lambda model, threshold: labelled(model, 0.0))  # every row a 1
    (folder / MODEL_FILE).rename(tmp_path / MODEL_FILE)

    # Then the export's parity check counts the rows it cuts wrong, and leaves no model
    try:
        with pytest.raises(ParityError, match=rf"{below} of {len(test)} labels are not prediction >= {recorded:g}; nothing was published"):
            export(config, candidate["candidate"])
        assert below and not (folder / MODEL_FILE).exists()
    finally:
        (tmp_path / MODEL_FILE).replace(folder / MODEL_FILE)


def without_label(model_file):
    """The graph of ``model_file`` as an export from before the label made it: ``prediction`` only."""
    from onnx.utils import Extractor

    model = onnx.load(str(model_file))
    return Extractor(model).extract_model([i.name for i in model.graph.input], [OUTPUT])


def test_a_version_exported_before_the_label_is_configured_with_the_prediction_only(trained, tmp_path):
    from tritonclient.grpc import model_config_pb2 as mc

    # Given a version with a label and one exported before it (its engine steps too, as bytes)
    config, _, candidate = trained
    folder = config.home / candidate["candidate"]
    model_dir = tmp_path / "model_repository" / config.model.name
    for version in (1, 2):
        (model_dir / str(version)).mkdir(parents=True)
        (repository.step_dir(model_dir, "engine") / str(version)).mkdir(parents=True)
        (repository.step_dir(model_dir, "engine") / str(version) / PLAN_FILE).write_bytes(b"engine")
    onnx.save(without_label(folder / MODEL_FILE), model_dir / "1" / MODEL_FILE)
    shutil.copy(folder / MODEL_FILE, model_dir / "2" / MODEL_FILE)
    gpu = config.serving.model_copy(update={"profile": "gpu"})

    def answered(rendering):
        return [(o.name, o.data_type, list(o.dims)) for o in rendering.output]

    # Then every rendering of each declares what its model.onnx answers: the new one its label too
    prediction, label = (OUTPUT, mc.TYPE_FP32, [1]), (LABEL_OUTPUT, mc.TYPE_INT32, [1])
    for serving in (config.serving, gpu):
        assert answered(repository.model_config(model_dir, serving, config.dataset, 1)) == [prediction]
        assert answered(repository.model_config(model_dir, serving, config.dataset, 2)) == [prediction, label]
    old, new = (repository.model_config(model_dir, gpu, config.dataset, v) for v in (1, 2))
    assert old.platform == new.platform == "ensemble"
    assert dict(old.ensemble_scheduling.step[1].output_map) == {OUTPUT: OUTPUT}
    assert dict(new.ensemble_scheduling.step[1].output_map) == {OUTPUT: OUTPUT, LABEL_OUTPUT: LABEL_OUTPUT}
    # and an engine step holds only engines that answer what the version going live answers
    for served, held, outputs in (([1, 2], [2], [prediction, label]), ([2, 1], [1], [prediction]), ([2], [2], [prediction, label])):
        engine = repository.step_configs(model_dir, gpu, config.dataset, served)["engine"]
        assert (list(engine.version_policy.specific.versions), answered(engine)) == (held, outputs), served
        assert list(repository.step_configs(model_dir, gpu, config.dataset, served)["lookup"].version_policy.specific.versions) == sorted(served)
    # A file that is not an ONNX model is configured as every export was: Triton's load refuses it
    (model_dir / "1" / MODEL_FILE).write_bytes(b"not an onnx model")
    assert answered(repository.model_config(model_dir, config.serving, config.dataset, 1)) == [prediction]


def test_a_failing_parity_check_leaves_no_model_file(trained, tmp_path):
    config, _, candidate = trained
    strict = config.model_copy(update={"export": config.export.model_copy(update={"parity_tolerance": 1e-30})})
    (config.home / candidate["candidate"] / MODEL_FILE).rename(tmp_path / MODEL_FILE)
    try:
        with pytest.raises(ParityError, match="ONNX and PyTorch differ by .* nothing was published"):
            export(strict, candidate["candidate"])
        assert not (config.home / candidate["candidate"] / MODEL_FILE).exists()
    finally:
        (tmp_path / MODEL_FILE).rename(config.home / candidate["candidate"] / MODEL_FILE)


@pytest.mark.parametrize(
    ("metric", "challenger", "champion", "margin", "expected"),
    [
        ("roc_auc", 0.71, 0.70, 0.005, True),
        ("roc_auc", 0.703, 0.70, 0.005, False),
        ("log_loss", 0.40, 0.45, 0.01, True),
        ("log_loss", 0.45, 0.40, 0.01, False),
        # a tie never promotes, even with no margin configured (regression projects default to 0)
        ("rmse", 1078.0656, 1078.0656, 0.0, False),
        ("roc_auc", 0.70, 0.70, 0.0, False),
        ("rmse", 1000.0, 1078.0656, 0.0, True),
    ],
)
def test_beating_the_champion_respects_the_metric_direction_and_margin(metric, challenger, champion, margin, expected):
    assert beats(metric, challenger, champion, margin) is expected


def test_gate_promotes_a_first_model_that_passes_the_floor_and_records_why(trained):
    config, _, candidate = trained

    decision = evaluate(config, candidate["candidate"])

    assert decision["decision"] == PROMOTED and decision["champion"] is None
    assert decision["challenger"]["roc_auc"] > 0.55
    assert "no champion yet" in decision["reason"]


def test_gate_on_real_models_refuses_a_seed_twin_and_a_worse_one_and_promotes_a_fixed_one(trained):
    # On this small split (3,000 rows, 3 epochs) the seed moves ROC AUC far more than on the
    # project's real data: seed noise is measured for the data and training at hand.
    config, data_version, good = trained
    noise = measure(config, data_version, seeds=4)
    gate_config = config.gate.model_copy(update={"seed_noise": noise["seed_noise"]})
    weak = train(config, data_version, {"max_epochs": 1, "learning_rate": 1e-6})  # a training bug: it barely learns
    export(config, weak["candidate"])
    twin = config.model_copy(update={"train": config.train.model_copy(update={"seed": config.train.seed + 1})})
    twin_candidate = train(twin, data_version)  # the same data and settings, another seed: reused from the measurement
    test = pd.read_parquet(split_paths(config.split.output_dir)["test"])
    labelled = test[test["arr_delayed"].notna()].reset_index(drop=True)
    truth = labelled["arr_delayed"].to_numpy("float64")
    scored = {
        name: Scored(predict_onnx(config.home / c["candidate"] / MODEL_FILE, labelled), *threshold_of(json.loads((config.home / c["candidate"] / "export.json").read_text())))
        for name, c in (("good", good), ("weak", weak), ("twin", twin_candidate))
    }
    groups = slices(config.dataset, config.gate, labelled)

    def gate(challenger, champion, **force):
        return judge(gate_config, config.dataset.label.task, truth, scored[challenger], scored[champion], groups, **force)

    worse, twins, fixed = gate("weak", "good"), gate("twin", "good"), gate("good", "weak")
    assert twin_candidate["reused"] and noise["seed_noise"] > 0.01, noise
    assert worse["decision"] == NOT_PROMOTED and worse["interval"]["high"] < 0, worse["reason"]
    assert twins["decision"] == NOT_PROMOTED and twins["interval"]["low"] < 0 < twins["interval"]["high"], twins["reason"]
    assert fixed["decision"] == PROMOTED and fixed["interval"]["low"] >= config.gate.min_improvement, fixed["reason"]
    forced = gate("weak", "good", force_publish=True, force_reason="hotfix for INC-42")
    assert forced["decision"] == PROMOTED and forced["reason"].startswith("forced: hotfix for INC-42")
    with pytest.raises(ValueError, match="force_reason is empty"):
        gate("weak", "good", force_publish=True, force_reason=" ")
    # the measurement: one value per seed, their standard deviation, on disk for the record
    assert list(noise["values"]) == ["13", "14", "15", "16"] and noise["metric"] == "roc_auc"
    assert noise["seed_noise"] == pytest.approx(np.std(list(noise["values"].values()), ddof=1))
    assert json.loads((config.artifacts_dir / "seed_noise.json").read_text())["seed_noise"] == noise["seed_noise"]


def test_publish_adds_a_served_version_with_lineage_and_a_triton_config(trained):
    config, data_version, candidate = trained
    decision = evaluate(config, candidate["candidate"])

    result = publish(config, candidate["candidate"], decision, data_version, RUN, {"max_epochs": None})
    retried = publish(config, candidate["candidate"], decision, data_version, RUN, {"max_epochs": None})

    assert result["version"] == retried["version"] == repository.served_version(config.model_dir)
    assert repository.versions(config.model_dir) == [result["version"]]  # a retry adds no second version
    triton = repository.read_model_config(config.model_dir)
    assert triton.backend == "python" and triton.max_batch_size == config.serving.max_batch_size  # cpu profile
    assert [i.name for i in triton.input] == [f.name for f in config.dataset.features]
    lineage = repository.lineage_of(config.model_dir, result["version"])
    assert lineage["data_version"] == data_version and lineage["airflow"]["run_id"] == "manual__1"
    assert lineage["gate"]["decision"] == PROMOTED and lineage["code_version"]
    served = config.model_dir / str(result["version"]) / MODEL_FILE
    np.testing.assert_allclose(
        predict_onnx(served, pd.read_parquet(split_paths(config.split.output_dir)["test"]).head(50)),
        predict_onnx(config.home / candidate["candidate"] / MODEL_FILE, pd.read_parquet(split_paths(config.split.output_dir)["test"]).head(50)),
    )


def test_a_rejected_candidate_leaves_the_repository_as_it_was(trained):
    config, data_version, candidate = trained
    before = (config.model_dir / CONFIG_FILE).read_bytes() if (config.model_dir / CONFIG_FILE).exists() else None
    versions_before = repository.versions(config.model_dir)
    rejected = {"decision": NOT_PROMOTED, "reason": "test", "challenger": {}, "champion": {}}

    result = publish(config, candidate["candidate"], rejected, data_version, {**RUN, "run_id": "manual__2"}, {})

    assert result["version"] is None
    assert repository.versions(config.model_dir) == versions_before
    after = (config.model_dir / CONFIG_FILE).read_bytes() if before is not None else None
    assert after == before
    record = json.loads((config.home / result["lineage"]).read_text())
    assert record["gate"]["decision"] == NOT_PROMOTED and record["version"] is None


def test_a_crash_mid_publish_leaves_no_half_version(tmp_path):
    model_dir = tmp_path / "m"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / f"{repository.STAGING_PREFIX}2").mkdir()  # what a crash before the rename leaves
    source = tmp_path / "model.onnx"
    source.write_bytes(b"onnx")

    assert repository.versions(model_dir) == [1]
    version = repository.add_version(model_dir, {"model.onnx": source}, {"note": "retry"})

    assert version == 2 and repository.versions(model_dir) == [1, 2]
    assert not list(model_dir.glob(f"{repository.STAGING_PREFIX}*"))
    assert (model_dir / "2" / "model.onnx").read_bytes() == b"onnx"


def test_a_regression_project_is_a_config_change_not_a_code_change(tmp_path):
    # Given another project over the same rows: predict a flight's distance from its route and times
    features = [f for f in yaml.safe_load((REPO / "projects" / "flights" / "params.yaml").read_text())["dataset"]["features"] if f["name"] != "distance"]
    config = make_project(
        tmp_path / "project",
        {
            "dataset": {"label": {"column": "distance", "task": "regression"}, "features": features},
            "model": {"name": "flights_distance"},
            "gate": {"metric": "rmse", "floor": 2000.0},
        },
    )
    write_raw(config, "2013-01", "2013-02", rows=3000)
    data_version = version_split(config)["data_version"]

    # When it goes through the same chain
    candidate = train(config, data_version)
    export(config, candidate["candidate"])
    decision = evaluate(config, candidate["candidate"])

    # Then it exported within the default parity tolerance although it predicts miles, not
    # probabilities (the gap is relative above 1), is scored with regression metrics, gated on
    # RMSE (lower is better), and publishable
    assert set(decision["challenger"]) == {"rmse", "mae"} and decision["decision"] == PROMOTED
    # no threshold and no label: a regression serves its prediction alone
    assert "threshold" not in json.loads((config.home / candidate["candidate"] / "export.json").read_text())
    assert [o.name for o in onnx.load(str(config.home / candidate["candidate"] / MODEL_FILE)).graph.output] == [OUTPUT]
    # and it learned: well below the error of always predicting the mean
    assert decision["challenger"]["rmse"] < 0.7 * pd.read_parquet(split_paths(config.split.output_dir)["test"])["distance"].std()
    result = publish(config, candidate["candidate"], decision, data_version, RUN)
    assert result["version"] == 1 and repository.read_model_config(config.model_dir).name == "flights_distance"
    # served: the prediction, and each row's key in the inference log (no label)
    assert [o.name for o in repository.read_model_config(config.model_dir).output] == [OUTPUT, REQUEST_ID]


def test_both_renderings_of_a_version_are_valid_triton_configs(trained):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    config, data_version, candidate = trained
    forced = evaluate(config, candidate["candidate"], force_publish=True, force_reason="test: render a version")
    version = publish(config, candidate["candidate"], forced, data_version, {**RUN, "run_id": "manual__render"})["version"]
    gpu = config.model_copy(update={"serving": config.serving.model_copy(update={"profile": "gpu"})})

    for profile, project in (("cpu", config), ("gpu", gpu)):
        # written as text and parsed back by Triton's own protobuf, as the server reads it
        text = text_format.MessageToString(repository.model_config(project.model_dir, project.serving, project.dataset, version))
        parsed = text_format.Parse(text, mc.ModelConfig())
        assert list(parsed.version_policy.specific.versions) == [version], profile
        assert parsed.dynamic_batching.max_queue_delay_microseconds == config.serving.max_queue_delay_microseconds
        assert [i.name for i in parsed.input] == [f.name for f in config.dataset.features]
        assert {i.name: i.data_type for i in parsed.input}["carrier"] == mc.TYPE_STRING
    cpu, gpu_rendering = (text_format.Parse(text_format.MessageToString(repository.model_config(p.model_dir, p.serving, p.dataset, version)), mc.ModelConfig()) for p in (config, gpu))
    assert cpu.backend == "python" and cpu.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert (config.model_dir / str(version) / "model.py").is_file()  # what the python backend runs
    assert gpu_rendering.platform == "onnxruntime_onnx" and gpu_rendering.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    (tensorrt,) = gpu_rendering.optimization.execution_accelerators.gpu_execution_accelerator
    assert tensorrt.name == "tensorrt" and tensorrt.parameters["precision_mode"] == "FP16"


@pytest.mark.parametrize("tolerance, kept", [(1.0, True), (0.0, False)])
def test_int8_is_kept_only_within_the_metric_tolerance(trained, tmp_path, tolerance, kept):
    from pipelines.export.quantize import FP32_FILE, quantize

    config, _, candidate = trained
    folder = tmp_path / "candidate"
    shutil.copytree(config.home / candidate["candidate"], folder)
    fp32_bytes = (folder / MODEL_FILE).read_bytes()
    strict = config.export.model_copy(update={"int8_tolerance": tolerance})

    record = quantize(strict, config.gate, config.dataset.label, folder, split_paths(config.split.output_dir)["test"])

    assert record["precision"] == ("int8" if kept else "fp32")
    assert set(record["roc_auc"]) == {"fp32", "int8"} and record["roc_auc"]["int8"] != record["roc_auc"]["fp32"]
    assert ((folder / MODEL_FILE).read_bytes() != fp32_bytes) == kept
    assert (folder / FP32_FILE).exists() == kept and not list(folder.glob(".*int8*"))
    # int8 keeps the label, cut at the threshold export chose, on every test row
    assert record["label_mismatches"] == 0
    test = pd.read_parquet(split_paths(config.split.output_dir)["test"])
    served = onnx_export.onnx_outputs(folder / MODEL_FILE, test)
    threshold = json.loads((folder / "export.json").read_text())["threshold"]["value"]
    np.testing.assert_array_equal(served[LABEL_OUTPUT], served[OUTPUT] >= np.float32(threshold))


def test_publish_counts_the_challengers_the_gate_refused_in_a_row(trained):
    config, data_version, candidate = trained
    refused = {**evaluate(config, candidate["candidate"]), "decision": NOT_PROMOTED}
    before = rejections_in_a_row(config.artifacts_dir)

    for run_id in ("manual__refused1", "manual__refused2", "manual__refused2"):  # the last one a retry
        publish(config, candidate["candidate"], refused, data_version, {**RUN, "run_id": run_id})

    assert rejections_in_a_row(config.artifacts_dir) == before + 2
    assert f'flywheel_gate_rejections_in_a_row{{model="{config.model.name}",project="{config.name}"}} {before + 2:.1f}' in (config.path(config.metrics.textfile_dir) / "publish.prom").read_text()


def test_publish_reports_its_outcome_and_both_metrics_for_prometheus(trained):
    from prometheus_client.parser import text_string_to_metric_families

    config, data_version, candidate = trained
    decision = evaluate(config, candidate["candidate"])

    publish(config, candidate["candidate"], decision, data_version, {**RUN, "run_id": "manual__metrics"})

    text = (config.path(config.metrics.textfile_dir) / "publish.prom").read_text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    model, project = ("model", config.model.name), ("project", config.name)
    outcome = decision["decision"].replace(" ", "_")
    assert samples[("flywheel_publish_outcome", (model, ("outcome", outcome), project))] == 1.0
    assert samples[("flywheel_served_version", (model, project))] == repository.served_version(config.model_dir)
    challenger = samples[("flywheel_gate_metric", (("metric", "roc_auc"), model, project, ("role", "challenger")))]
    assert challenger == pytest.approx(decision["challenger"]["roc_auc"])


def test_blanks_validation_accepts_train_and_serve_as_numbers(tmp_path):
    # Given real flights where the suite's tolerance let blanks through: 5% of distances and
    # hours missing, a few infinite, and some rows without a label
    config = make_project(tmp_path / "project")
    write_raw(config, "2013-01", "2013-02", rows=1500)
    rng = np.random.default_rng(0)
    for part in raw.parts(config.dataset):
        frame = pd.read_parquet(part).astype({"distance": "float64", "hour": "float64", "arr_delayed": "float64"})
        for column in ("distance", "hour"):
            frame.loc[rng.random(len(frame)) < 0.05, column] = np.nan
        frame.loc[rng.random(len(frame)) < 0.01, "distance"] = np.inf
        frame.loc[rng.random(len(frame)) < 0.02, "arr_delayed"] = np.nan
        raw.write_part(part, frame, config.dataset)

    candidate = train(config, version_split(config)["data_version"])
    export(config, candidate["candidate"])  # its parity check runs on test rows with blanks

    # Then the loss is a number, and so is every prediction, blanks included
    assert np.isfinite(candidate["best_val_loss"])
    test = pd.read_parquet(split_paths(config.split.output_dir)["test"])
    assert test["distance"].isna().any()
    predictions = predict_onnx(config.home / candidate["candidate"] / MODEL_FILE, test)
    assert np.isfinite(predictions).all() and ((predictions > 0) & (predictions < 1)).all()
    assert np.isfinite(evaluate(config, candidate["candidate"])["challenger"]["roc_auc"])


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("numeric", id="all-numeric"),  # breast cancer, wine: every scikit-learn toy table
        pytest.param("categorical", id="all-categorical"),
    ],
)
def test_a_table_with_features_of_one_kind_exports_a_model_that_scores_like_torch(tmp_path, kind):
    features = [f for f in yaml.safe_load((REPO / "projects" / "flights" / "params.yaml").read_text())["dataset"]["features"] if f["type"] == kind]
    names = {f["name"] for f in features}
    config = make_project(tmp_path / "project", {"dataset": {"features": features}, "train": {"max_epochs": 1}, "monitoring": {"exclude_columns": sorted(names & {"month", "day"})}})
    write_raw(config, "2013-01", "2013-02", rows=1000)
    candidate = train(config, version_split(config)["data_version"])

    record = export(config, candidate["candidate"])

    folder = config.home / candidate["candidate"]
    model, encoding = load_candidate(folder)
    rows = pd.read_parquet(split_paths(config.split.output_dir)["test"])
    feeds = onnx_inputs(rows, list(encoding.categorical), encoding.numeric)
    session = ort.InferenceSession(str(folder / MODEL_FILE))
    assert {i.name for i in session.get_inputs()} == names
    prediction, label = session.run([OUTPUT, LABEL_OUTPUT], feeds)
    with torch.no_grad():
        expected = model.predict(torch.from_numpy(encoding.categorical_indices(rows)), torch.from_numpy(encoding.numeric_values(rows))).numpy()
    np.testing.assert_allclose(prediction[:, 0], expected, atol=1e-5)
    np.testing.assert_array_equal(label, (prediction >= np.float32(record["threshold"]["value"])).astype(np.int32))
    # the halves cross an empty (rows, 0) tensor for the kind the table lacks
    codes, numeric = ort.InferenceSession(str(folder / LOOKUP_FILE)).run([CODES, NUMERIC], feeds)
    assert (codes if kind == "numeric" else numeric).shape == (len(rows), 0)
    np.testing.assert_array_equal(ort.InferenceSession(str(folder / NETWORK_FILE)).run([OUTPUT], {CODES: codes, NUMERIC: numeric})[0], prediction)
