"""TensorRT route (b): the split ONNX halves, export where TensorRT cannot run, and the
``tensorrt_plan`` ensemble rendering. The engine builder itself needs the ``tensorrt`` extra
and a CUDA GPU; it is not mocked here."""

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from pipelines.data.split import split_paths
from pipelines.data.versioning import version_split
from pipelines.evaluation.gate import evaluate, predict_onnx
from pipelines.export.onnx import CODES, LOOKUP_FILE, MODEL_FILE, NETWORK_FILE, NUMERIC, OUTPUT, PLAN_FILE, export, onnx_inputs
from pipelines.export.tensorrt import tensorrt_available
from pipelines.serving import repository
from pipelines.serving.publish import publish
from pipelines.training.train import load_candidate, train
from tests.conftest import make_project
from tests.unit.test_split import write_raw

RUN = {"dag_id": "retrain", "run_id": "manual__trt", "run_type": "manual", "logical_date": None}


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
    rows = pd.read_parquet(split_paths(config)["test"]).head(200)
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


def test_tensorrt_reports_why_it_cannot_build_here():
    reason = tensorrt_available()

    # this machine has neither the tensorrt package nor a CUDA device; where both exist this is None
    assert reason is not None and ("tensorrt package is not importable" in reason or "no CUDA device" in reason)


def test_export_asked_for_an_engine_says_once_why_none_was_built_and_publishes_onnx(trained, caplog):
    config, data_version, candidate = trained
    folder = config.home / candidate["candidate"]

    with caplog.at_level(logging.INFO, logger="pipelines"):
        record = export(config, candidate["candidate"])

    warnings = [r for r in caplog.records if r.name.startswith("pipelines.") and r.levelno >= logging.WARNING]  # not torch's own
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "export.tensorrt=fp16" in message and tensorrt_available() in message and "ONNX rendering is published" in message
    assert record["tensorrt"] == {"built": False, "reason": tensorrt_available()}
    assert json.loads((folder / "export.json").read_text())["tensorrt"]["built"] is False
    assert (folder / MODEL_FILE).is_file() and not (folder / PLAN_FILE).exists()

    version = publish(config, candidate["candidate"], evaluate(config, candidate["candidate"]), data_version, RUN)["version"]

    served = config.model_dir / str(version)
    assert (served / MODEL_FILE).is_file() and not repository.has_engine(config, version)
    gpu = config.model_copy(update={"serving": config.serving.model_copy(update={"profile": "gpu"})})
    assert repository.model_config(gpu, version).platform == "onnxruntime_onnx"  # today's gpu rendering
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

    ensemble, lookup, engine = (parsed(d) for d in (config.model_dir, *(repository.step_dir(config, s) for s in repository.ENGINE_STEPS)))

    # Then the served model keeps its public signature and runs lookup (CPU) then engine (GPU), pinned to the version
    features = [f.name for f in config.dataset.features]
    assert ensemble.platform == "ensemble" and list(ensemble.version_policy.specific.versions) == [version]
    assert [i.name for i in ensemble.input] == features and [o.name for o in ensemble.output] == [OUTPUT]
    assert not ensemble.HasField("dynamic_batching")  # the steps batch, an ensemble cannot
    first, second = ensemble.ensemble_scheduling.step
    assert (first.model_name, first.model_version, second.model_name, second.model_version) == (lookup.name, version, engine.name, version)
    assert dict(first.input_map) == {f: f for f in features} and dict(first.output_map) == {CODES: CODES, NUMERIC: NUMERIC}
    assert dict(second.input_map) == {CODES: CODES, NUMERIC: NUMERIC} and dict(second.output_map) == {OUTPUT: OUTPUT}
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
    assert (repository.step_dir(config, "engine") / str(version) / PLAN_FILE).read_bytes() == b"engine"
    session = ort.InferenceSession(str(repository.step_dir(config, "lookup") / str(version) / MODEL_FILE))
    assert [(o.name, o.type) for o in session.get_outputs()] == [(CODES, "tensor(int32)"), (NUMERIC, "tensor(float)")]
    # the cpu profile still serves the same version through the Python backend
    assert repository.model_config(config, version).backend == "python"


@pytest.mark.parametrize(("written", "expected"), [("export:\n  tensorrt: off\n", "off"), ("export:\n  tensorrt: int8\n", "int8")])
def test_export_tensorrt_reads_a_bare_yaml_off_as_off(project, written, expected):
    import yaml

    from pipelines.config import load_config

    # YAML 1.1 reads a bare `off` as false: the setting must still mean "off", not fail
    params = yaml.safe_load((project.home / "params.yaml").read_text())
    params["export"]["tensorrt"] = yaml.safe_load(written)["export"]["tensorrt"]
    (project.home / "params.yaml").write_text(yaml.safe_dump(params))

    assert load_config(project.home).export.tensorrt.value == expected


def test_an_unknown_tensorrt_precision_is_an_error_that_names_the_key(project):
    import yaml

    from pipelines.config import ConfigError, load_config

    params = yaml.safe_load((project.home / "params.yaml").read_text())
    params["export"]["tensorrt"] = "fp8"
    (project.home / "params.yaml").write_text(yaml.safe_dump(params))

    with pytest.raises(ConfigError, match=r"export\.tensorrt"):
        load_config(project.home)
