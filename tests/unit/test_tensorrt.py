"""TensorRT route (b): the split ONNX halves, the engine's parity and int8 calibration rows,
export where TensorRT cannot run, the ``tensorrt_plan`` ensemble rendering, and a real engine
build where the machine can make one.

No test asserts what this machine has. Tests that need TensorRT and a CUDA device carry
``requires_tensorrt`` (skipped, with the reason, elsewhere); tests of the fallback take it away
first (``no_tensorrt``), so they pass on a GPU worker too. TensorRT is never faked in a test
that builds: the one CPU test of what ``export_engine`` hands the builder (the int8 calibration
rows, whose seed once crashed every int8 build) swaps ``build_engine`` for a recorder and says so.
"""

import json
import logging
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from pipelines.artifacts import LABEL_OUTPUT
from pipelines.config import ExportConfig
from pipelines.data.split import split_paths
from pipelines.data.versioning import version_split
from pipelines.evaluation.gate import evaluate, predict_onnx
from pipelines.export import tensorrt
from pipelines.export.onnx import CODES, LOOKUP_FILE, MODEL_FILE, NETWORK_FILE, NUMERIC, OUTPUT, PLAN_FILE, export, onnx_inputs
from pipelines.export.tensorrt import calibration_rows, engine_feeds, tensorrt_available
from pipelines.serving import repository
from pipelines.serving.publish import publish
from pipelines.training.data import Encoding
from pipelines.training.train import load_candidate, train
from tests.conftest import make_project
from tests.unit.test_split import write_raw

RUN = {"dag_id": "retrain", "run_id": "manual__trt", "run_type": "manual", "logical_date": None}

# Checked once, when the module is collected: where this is None an engine is really built.
WHY_NO_ENGINE = tensorrt_available()
requires_tensorrt = pytest.mark.skipif(
    WHY_NO_ENGINE is not None, reason=f"builds a real TensorRT engine, which needs the tensorrt package and a CUDA device: {WHY_NO_ENGINE}"
)


@pytest.fixture
def no_tensorrt(monkeypatch):
    """This machine as one without the ``tensorrt`` package, whatever it has: ``import tensorrt``
    raises ImportError while the test runs (a None in ``sys.modules`` does that)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    reason = tensorrt_available()
    assert reason is not None and "tensorrt package is not importable" in reason
    return reason


def asking_for(config, **export):
    """``config`` with these ``export`` settings, validated as params.yaml would be."""
    return config.model_copy(update={"export": ExportConfig.model_validate({**config.export.model_dump(), **export})})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A project asking for an fp16 engine, with one candidate trained and exported on this machine."""
    config = make_project(tmp_path_factory.mktemp("tensorrt") / "project", {"export": {"tensorrt": "fp16"}})
    write_raw(config, "2013-01", "2013-02", rows=3000)
    versioned = version_split(config)
    candidate = train(config, versioned["data_version"])
    return config, versioned["data_version"], candidate


def test_lookup_then_network_scores_test_rows_like_the_whole_model(trained):
    config, _, candidate = trained
    folder = config.home / candidate["candidate"]
    export(config, candidate["candidate"])
    _, encoding = load_candidate(folder)
    rows = pd.read_parquet(split_paths(config.split.output_dir)["test"]).head(200)
    rows.loc[rows.index[0], "dest"] = "NEVER-SEEN"  # the OOV slot survives the cut too

    lookup = ort.InferenceSession(str(folder / LOOKUP_FILE))
    codes, numeric = lookup.run([CODES, NUMERIC], onnx_inputs(rows, list(encoding.categorical), encoding.numeric))
    (halves,) = ort.InferenceSession(str(folder / NETWORK_FILE)).run([OUTPUT], {CODES: codes, NUMERIC: numeric})

    np.testing.assert_array_equal(halves[:, 0], predict_onnx(folder / MODEL_FILE, rows))
    assert codes.dtype == np.int32 and codes.shape == (200, len(encoding.categorical))  # what TensorRT takes
    np.testing.assert_array_equal(codes, encoding.categorical_indices(rows))
    network = onnx.load(str(folder / NETWORK_FILE))
    assert {i.name for i in network.graph.input} == {CODES, NUMERIC}
    assert not any(node.domain == "ai.onnx.ml" for node in network.graph.node)  # no strings left for TensorRT
    assert network.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch axis stays dynamic


@pytest.mark.parametrize(("categorical", "numeric", "missing"), [({}, ["distance"], "categorical"), ({"dest": ["BOS"]}, [], "numeric")])
def test_a_table_with_features_of_one_kind_gets_no_engine_and_says_why(caplog, tmp_path, categorical, numeric, missing):
    encoding = Encoding(categorical=categorical, numeric=numeric, numeric_mean=[0.0] * len(numeric), numeric_std=[1.0] * len(numeric))

    with caplog.at_level(logging.WARNING, logger="pipelines"):
        record = tensorrt.export_engine(ExportConfig(tensorrt="fp16"), 13, 64, tmp_path, encoding, {})

    assert record == {"built": False, "reason": f"the table has no {missing} feature, and the engine's ensemble needs both kinds"}
    assert [r.getMessage() for r in caplog.records] == [f"export.tensorrt=fp16: no TensorRT engine built, {record['reason']}; the ONNX rendering is published"]


def test_tensorrt_says_the_package_is_missing_when_it_cannot_be_imported(no_tensorrt):
    assert tensorrt_available() == no_tensorrt
    assert "install the `tensorrt` extra" in no_tensorrt


def test_tensorrt_says_no_cuda_device_is_visible_when_the_package_is_there_but_cuda_is_not(monkeypatch):
    import torch

    # Given an importable tensorrt (a stand-in module: only the import is looked at) and no CUDA device
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    assert tensorrt_available() == "no CUDA device is visible (torch.cuda.is_available() is False)"


def test_calibration_rows_are_a_seeded_sample_without_replacement_capped_at_the_split():
    train = pd.DataFrame({"flight_id": range(100), "distance": np.arange(100) * 10.0})

    picked = calibration_rows(train, 30, seed=13)

    assert len(picked) == 30 and picked["flight_id"].is_unique and set(picked["flight_id"]) <= set(train["flight_id"])
    pd.testing.assert_frame_equal(picked, calibration_rows(train, 30, seed=13))  # the same seed, the same rows in the same order
    assert list(picked["flight_id"]) != list(calibration_rows(train, 30, seed=14)["flight_id"])
    assert sorted(calibration_rows(train, 1000, seed=13)["flight_id"]) == list(range(100))  # more asked than there are: all of them


def test_int8_engine_feeds_are_the_first_test_rows_and_a_train_seeded_sample_of_the_training_split(trained, no_tensorrt):
    # Given the candidate's lookup.onnx (written by export; no engine here, TensorRT is taken away)
    config, _, candidate = trained
    folder = config.home / candidate["candidate"]
    export(config, candidate["candidate"])
    _, encoding = load_candidate(folder)
    section = asking_for(config, tensorrt="int8", tensorrt_calibration_rows=500).export
    paths = split_paths(config.split.output_dir)
    train_rows, test_rows = pd.read_parquet(paths["train"]), pd.read_parquet(paths["test"])

    # When the engine's inputs are made on CPU, as export_engine makes them before building
    parity, calibration = engine_feeds(section, config.train.seed, folder, encoding, paths)

    # Then parity is the head of the test split and calibration the seeded sample of the training
    # split, both as the network reads them (int32 codes, float32 numbers from lookup.onnx)
    head = test_rows.head(config.export.parity_rows)
    np.testing.assert_array_equal(parity[CODES], encoding.categorical_indices(head))
    np.testing.assert_allclose(parity[NUMERIC], encoding.numeric_values(head), rtol=1e-6)
    sample = calibration_rows(train_rows, 500, config.train.seed)
    assert set(sample["flight_id"]) <= set(train_rows["flight_id"]) and set(sample["flight_id"]).isdisjoint(test_rows["flight_id"])
    assert calibration[CODES].dtype == np.int32 and calibration[NUMERIC].dtype == np.float32
    assert calibration[CODES].shape == (500, len(encoding.categorical)) and calibration[NUMERIC].shape == (500, len(encoding.numeric))
    np.testing.assert_array_equal(calibration[CODES], encoding.categorical_indices(sample))
    np.testing.assert_allclose(calibration[NUMERIC], encoding.numeric_values(sample), rtol=1e-6)
    # the same seed picks the same rows again; fp16 takes no calibration set
    _, again = engine_feeds(section, config.train.seed, folder, encoding, paths)
    np.testing.assert_array_equal(again[NUMERIC], calibration[NUMERIC])
    assert engine_feeds(asking_for(config, tensorrt="fp16").export, config.train.seed, folder, encoding, paths)[1] is None


def test_export_engine_hands_an_int8_build_the_project_seeded_calibration_rows(trained, no_tensorrt, monkeypatch):
    # Given a project asking for int8, on a machine that (pretends it) can build: TensorRT's
    # builder is swapped for a recorder, so everything before it runs for real, here on CPU
    config, _, candidate = trained
    folder = config.home / candidate["candidate"]
    _, encoding = load_candidate(folder)
    int8 = asking_for(config, tensorrt="int8", tensorrt_calibration_rows=400)
    handed = {}

    def build_engine(network_onnx, plan, precision, calibration, max_batch, parity, tolerance):
        handed.update(network_onnx=network_onnx, plan=plan, precision=precision, calibration=calibration, max_batch=max_batch, tolerance=tolerance)
        return {"precision": precision, "max_batch": max_batch, "parity_rows": len(parity[CODES]), "max_abs_diff": 0.0, "tolerance": tolerance}

    monkeypatch.setattr(tensorrt, "tensorrt_available", lambda: None)
    monkeypatch.setattr(tensorrt, "build_engine", build_engine)

    # When the project's export runs (it hands export_engine the sections and the split files)
    record = export(int8, candidate["candidate"])["tensorrt"]

    # Then the builder got the network, int8 with its tolerance, the serving batch and the train.seed sample
    assert record["built"] is True and record["plan"] == config.portable(folder / PLAN_FILE)
    assert (handed["network_onnx"], handed["plan"]) == (folder / NETWORK_FILE, folder / PLAN_FILE)
    assert handed["precision"] == "int8" and handed["tolerance"] == int8.export.tensorrt_int8_tolerance
    assert handed["max_batch"] == config.serving.max_batch_size
    sample = calibration_rows(pd.read_parquet(split_paths(config.split.output_dir)["train"]), 400, config.train.seed)
    np.testing.assert_array_equal(handed["calibration"][CODES], encoding.categorical_indices(sample))
    np.testing.assert_allclose(handed["calibration"][NUMERIC], encoding.numeric_values(sample), rtol=1e-6)


def test_export_asked_for_an_engine_says_once_why_none_was_built_and_publishes_onnx(trained, no_tensorrt, caplog):
    config, data_version, candidate = trained
    folder = config.home / candidate["candidate"]

    with caplog.at_level(logging.INFO, logger="pipelines"):
        record = export(config, candidate["candidate"])

    warnings = [r for r in caplog.records if r.name.startswith("pipelines.") and r.levelno >= logging.WARNING]  # not torch's own
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "export.tensorrt=fp16" in message and no_tensorrt in message and "ONNX rendering is published" in message
    assert record["tensorrt"] == {"built": False, "reason": no_tensorrt}
    assert json.loads((folder / "export.json").read_text())["tensorrt"]["built"] is False
    assert (folder / MODEL_FILE).is_file() and not (folder / PLAN_FILE).exists()

    version = publish(config, candidate["candidate"], evaluate(config, candidate["candidate"]), data_version, RUN)["version"]

    served = config.model_dir / str(version)
    assert (served / MODEL_FILE).is_file() and not repository.has_engine(config.model_dir, version)
    gpu = config.model_copy(update={"serving": config.serving.model_copy(update={"profile": "gpu"})})
    assert repository.model_config(gpu.model_dir, gpu.serving, gpu.dataset, version).platform == "onnxruntime_onnx"  # today's gpu rendering
    assert repository.lineage_of(config.model_dir, version)["export"]["tensorrt"]["built"] is False


def test_an_engine_version_is_served_by_the_gpu_profile_as_a_lookup_then_tensorrt_ensemble(trained, tmp_path):
    # Given a published version whose export had built an engine (bytes stand in for the plan:
    # the configs are checked here, loading them needs NVIDIA's Triton image and a GPU)
    config, data_version, candidate = trained
    folder = tmp_path / "candidate"
    folder.mkdir()
    for name in (MODEL_FILE, LOOKUP_FILE, "export.json", "candidate.json"):
        (folder / name).write_bytes((config.home / candidate["candidate"] / name).read_bytes())
    (folder / PLAN_FILE).write_bytes(b"engine")
    gpu = config.model_copy(update={"serving": config.serving.model_copy(update={"profile": "gpu"})})
    decision = evaluate(config, candidate["candidate"], force_publish=True, force_reason="test: an engine version")
    version = publish(gpu, str(folder), decision, data_version, {**RUN, "run_id": "manual__engine"})["version"]

    # When its configs are written, and read back by Triton's own protobuf
    def parsed(model_dir):
        return text_format.Parse((model_dir / repository.CONFIG_FILE).read_text(), mc.ModelConfig())

    ensemble, lookup, engine = (parsed(d) for d in (config.model_dir, *(repository.step_dir(config.model_dir, s) for s in repository.ENGINE_STEPS)))

    # Then the served model keeps its public signature and runs lookup (CPU) then engine (GPU), pinned to the version
    features = [f.name for f in config.dataset.features]
    assert ensemble.platform == "ensemble" and list(ensemble.version_policy.specific.versions) == [version]
    assert [i.name for i in ensemble.input] == features and [o.name for o in ensemble.output] == [OUTPUT, LABEL_OUTPUT]
    assert not ensemble.HasField("dynamic_batching")  # the steps batch, an ensemble cannot
    first, second = ensemble.ensemble_scheduling.step
    assert (first.model_name, first.model_version, second.model_name, second.model_version) == (lookup.name, version, engine.name, version)
    assert dict(first.input_map) == {f: f for f in features} and dict(first.output_map) == {CODES: CODES, NUMERIC: NUMERIC}
    assert dict(second.input_map) == {CODES: CODES, NUMERIC: NUMERIC} and dict(second.output_map) == {OUTPUT: OUTPUT, LABEL_OUTPUT: LABEL_OUTPUT}
    assert lookup.platform == "onnxruntime_onnx" and lookup.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert engine.platform == "tensorrt_plan" and engine.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    # what flows between the steps is what lookup.onnx writes and the engine reads: int32 codes, float32 numbers
    categorical = sum(f.type.value == "categorical" for f in config.dataset.features)
    assert {o.name: (o.data_type, list(o.dims)) for o in lookup.output} == {
        CODES: (mc.TYPE_INT32, [categorical]),
        NUMERIC: (mc.TYPE_FP32, [len(features) - categorical]),
    }
    assert {i.name: (i.data_type, list(i.dims)) for i in engine.input} == {o.name: (o.data_type, list(o.dims)) for o in lookup.output}
    assert all(list(m.version_policy.specific.versions) == [version] for m in (lookup, engine))
    assert all(m.max_batch_size == config.serving.max_batch_size and m.HasField("dynamic_batching") for m in (lookup, engine))
    # and the files sit where those platforms look by default
    assert (repository.step_dir(config.model_dir, "engine") / str(version) / PLAN_FILE).read_bytes() == b"engine"
    session = ort.InferenceSession(str(repository.step_dir(config.model_dir, "lookup") / str(version) / MODEL_FILE))
    assert [(o.name, o.type) for o in session.get_outputs()] == [(CODES, "tensor(int32)"), (NUMERIC, "tensor(float)")]
    # the cpu profile still serves the same version through the Python backend
    assert repository.model_config(config.model_dir, config.serving, config.dataset, version).backend == "python"


def reloaded_with_export_tensorrt(project, value):
    """``project`` loaded again after its own params.yaml sets ``export.tensorrt: value``, as a
    person edits it (the one place in this file that knows where that file lives)."""
    import yaml

    from pipelines.config import PARAMS_FILE, load_config

    file = project.project_dir / PARAMS_FILE
    params = yaml.safe_load(file.read_text())
    params["export"]["tensorrt"] = value
    file.write_text(yaml.safe_dump(params))
    return load_config(project.name, project.home)


@pytest.mark.parametrize(("written", "expected"), [("export:\n  tensorrt: off\n", "off"), ("export:\n  tensorrt: int8\n", "int8")])
def test_export_tensorrt_reads_a_bare_yaml_off_as_off(project, written, expected):
    import yaml

    # YAML 1.1 reads a bare `off` as false: the setting must still mean "off", not fail
    value = yaml.safe_load(written)["export"]["tensorrt"]

    assert reloaded_with_export_tensorrt(project, value).export.tensorrt.value == expected


def test_an_unknown_tensorrt_precision_is_an_error_that_names_the_key(project):
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match=r"export\.tensorrt"):
        reloaded_with_export_tensorrt(project, "fp8")


@requires_tensorrt
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_export_builds_an_engine_that_scores_unseen_test_rows_like_the_onnx_model(trained, precision):
    import tensorrt as trt

    # Given a trained candidate and a project asking for an engine of this precision
    config, _, candidate = trained
    folder = config.home / candidate["candidate"]
    asked = asking_for(config, tensorrt=precision)
    tolerance = getattr(asked.export, f"tensorrt_{precision}_tolerance")

    # When export runs on this GPU machine
    record = export(asked, candidate["candidate"])["tensorrt"]

    # Then an engine was built, checked within tolerance, and written where the record says
    assert record["built"] is True, record
    assert record["precision"] == precision and record["max_abs_diff"] <= tolerance and record["tolerance"] == tolerance
    assert record["max_batch"] == config.serving.max_batch_size and record["parity_rows"] > 0
    plan = config.path(Path(record["plan"]))
    assert plan == folder / PLAN_FILE and plan.is_file()
    assert json.loads((folder / "export.json").read_text())["tensorrt"]["built"] is True

    # And, apart from the build's own check: the plan as written, read back by TensorRT, scores
    # test rows the check did not use (raw rows -> lookup.onnx -> engine) like model.onnx does
    test = pd.read_parquet(split_paths(config.split.output_dir)["test"])
    rows = test.iloc[config.export.parity_rows :] if len(test) >= config.export.parity_rows + 100 else test
    _, encoding = load_candidate(folder)
    codes, numeric = ort.InferenceSession(str(folder / LOOKUP_FILE)).run(
        [CODES, NUMERIC], onnx_inputs(rows, list(encoding.categorical), encoding.numeric)
    )
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
    got = tensorrt.run_engine(engine, {CODES: codes, NUMERIC: numeric}, config.serving.max_batch_size)[:, 0]
    expected = predict_onnx(folder / MODEL_FILE, rows)
    assert got.shape == expected.shape == (len(rows),)
    assert float(np.max(np.abs(got - expected))) <= tolerance
