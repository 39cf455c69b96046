"""The Triton model repository: numbered versions, ``config.pbtxt``, and which version serves.

Layout (what Triton loads)::

    model_repository/<model>/config.pbtxt      generated from Triton's ModelConfig protobuf
    model_repository/<model>/<N>/model.onnx
    model_repository/<model>/<N>/model.py      the Python-backend model (cpu rendering)
    model_repository/<model>/<N>/inference_log.py  its inference-log writer
    model_repository/<model>/<N>/lineage.json  where version N came from
    model_repository/<model>/<N>/reference.parquet  a sample of its training data, for drift checks

A version whose export built a TensorRT engine also has the two steps of its ``tensorrt_plan``
rendering, numbered alike (written before the version itself, so a version exists once its
lineage does)::

    model_repository/<model>_lookup/<N>/model.onnx  lookup.onnx: raw columns to codes (ONNX Runtime, CPU)
    model_repository/<model>_engine/<N>/model.plan  the engine of network.onnx (TensorRT, GPU)

The served version is the one ``config.pbtxt`` names in its ``specific`` version policy,
so promotion and rollback are one atomic rewrite of that file, and Triton never picks up
a version just because its folder appeared.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from pipelines.artifacts import CODES, CONFIG_FILE, LABEL_OUTPUT, LINEAGE_FILE, LOOKUP_FILE, MODEL_FILE, MODEL_VERSION, NUMERIC, OUTPUT, PLAN_FILE, REQUEST_ID
from pipelines.config import DatasetConfig, FeatureType, ServingConfig, ServingProfile
from pipelines.lineage import Record, read_json, write_json

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig  # a protobuf message (untyped: Any to mypy)

log = logging.getLogger(__name__)
Tensor = tuple[str, str, int]  # (name, Triton data type, width per row)

# The Python-backend model that serves model.onnx in the cpu rendering; in every version, so
# switching profiles only rewrites config.pbtxt.
BACKEND_MODEL = Path(__file__).resolve().parent / "backend" / "model.py"
# The inference log's writer, beside model.py in every version since the server logs: such a
# version's cpu rendering answers each row's key (REQUEST_ID) and logs (``model_config``).
BACKEND_LOG = BACKEND_MODEL.with_name("inference_log.py")
BACKEND_FILES = {file.name: file for file in (BACKEND_MODEL, BACKEND_LOG)}  # beside model.onnx in every version
STAGING_PREFIX = ".staging-"
ENGINE_STEPS = ("lookup", "engine")  # the tensorrt_plan rendering's composing models, in order


class Route(NamedTuple):
    """A rollout in progress in a served model: the challenger version the served (champion)
    version routes to, and how (``backend/model.py``: the router)."""

    challenger: int
    mode: str  # SHADOW: the champion answers all; CANARY: the challenger answers ``share`` of request ids
    share: float  # 0 in shadow


SHADOW, CANARY = "shadow", "canary"
ROUTE_PARAMETERS = ("rollout_challenger", "rollout_mode", "rollout_share")


def versions(model_dir: Path) -> list[int]:
    """Complete versions on disk, oldest first (staging folders are not versions)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def read_model_config(model_dir: Path) -> ModelConfig | None:
    """The parsed ``config.pbtxt`` of a model, or None if it has none yet."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    file = model_dir / CONFIG_FILE
    if not file.exists():
        return None
    return text_format.Parse(file.read_text(), model_config_pb2.ModelConfig())


def served_version(model_dir: Path) -> int | None:
    """The version ``config.pbtxt`` puts in service, or None before the first publish."""
    config = read_model_config(model_dir)
    if config is None or not config.version_policy.HasField("specific"):
        return None
    return int(max(config.version_policy.specific.versions))


def route_of(model_dir: Path) -> Route | None:
    """The rollout the served model's ``config.pbtxt`` routes to, or None."""
    config = read_model_config(model_dir)
    if config is None or "rollout_challenger" not in config.parameters:
        return None
    values = [config.parameters[name].string_value for name in ROUTE_PARAMETERS]
    return Route(int(values[0]), values[1], float(values[2]))


def model_config(model_dir: Path, serving: ServingConfig, dataset: DatasetConfig, version: int, logged: bool = True, route: Route | None = None, project: str = "") -> ModelConfig:
    """Triton's ModelConfig for a version of the model in ``model_dir`` (its name is the
    folder's), in the rendering ``serving.profile`` asks for.

    Inputs are the dataset's feature columns, shape [1] per row (strings for categories,
    float32 for numbers), the outputs are ``prediction`` and, where the version's graph has it
    (``outputs``), a classifier's ``label``: the smoke test checks the version against them.
    ``cpu``: the Python backend running ONNX Runtime on the version's ``model.onnx``
    (``model.py`` beside it, answering every output declared here); a version with the log's
    writer beside it (``BACKEND_LOG``) also answers each row's key (``request_id``, string) and,
    ``logged``, writes every answered row to ``<serving.inference_log>/<model>`` (``log_parameters``).
    ``gpu``: ``onnxruntime_onnx`` with the TensorRT execution accelerator in FP16, engines
    cached, so TensorRT builds the engine inside Triton at load time; or, for a version whose
    export built an engine (``has_engine``), the ``tensorrt_plan`` ensemble of ``ensemble_config``.
    Neither gpu rendering logs.
    ``route``: a rollout, with ``version`` the champion: the cpu rendering's router also runs the
    challenger (``Route``) and answers each row's ``model_version``. ``project`` labels the
    router's metrics.
    """
    if serving.profile == ServingProfile.gpu and has_engine(model_dir, version):
        return ensemble_config(model_dir, serving, dataset, version)
    answered = outputs(model_dir, version)
    logs = serving.profile == ServingProfile.cpu and (model_dir / str(version) / BACKEND_LOG.name).is_file()
    if route is not None and not logs:
        raise ValueError(f"{model_dir.name} version {version}: a rollout is routed by the cpu rendering of a version that logs (serving.profile cpu)")
    routed = [(MODEL_VERSION, "TYPE_INT32", 1)] if route is not None else []
    rendering = _signature(serving, model_dir.name, [version], _feature_inputs(dataset), answered + ([(REQUEST_ID, "TYPE_STRING", 1)] if logs else []) + routed)
    parameters = {**(log_parameters(serving, model_dir.name) if logs and logged else {}), **({"flywheel_project": project} if project else {})}
    if route is not None:
        parameters.update(zip(ROUTE_PARAMETERS, (str(route.challenger), route.mode, repr(route.share))))
    for name, value in parameters.items():
        rendering.parameters[name].string_value = value
    return place(rendering, serving.profile)


def log_parameters(serving: ServingConfig, model: str) -> dict[str, str]:
    """The parameters that make a Python-backend model log what Triton's ``model`` answers (the
    model itself, or the logging step of its ensemble): the folder (absolute), the model it logs
    as, and when a buffered chunk is written (``serving.log``); read by ``inference_log.from_config``."""
    return {
        "inference_log": str(serving.inference_log.resolve() / model),
        "inference_log_model": model,
        "inference_log_flush_rows": str(serving.log.flush_rows),
        "inference_log_flush_seconds": str(serving.log.flush_seconds),
    }


def outputs(model_dir: Path, version: int) -> list[Tensor]:
    """What ``version`` answers, as its ``model.onnx`` says: ``prediction`` float32, then int32
    ``label`` where its export baked a classifier's threshold in (versions exported before that
    have none, and keep the prediction alone). A file that is not an ONNX model gets the
    prediction alone: Triton's load then says what is wrong with it."""
    import onnx
    from google.protobuf.message import DecodeError

    answered = [(OUTPUT, "TYPE_FP32", 1)]
    try:
        names = {o.name for o in onnx.load(str(model_dir / str(version) / MODEL_FILE), load_external_data=False).graph.output}
    except (OSError, DecodeError):
        return answered
    return answered + ([(LABEL_OUTPUT, "TYPE_INT32", 1)] if LABEL_OUTPUT in names else [])


def _feature_inputs(dataset: DatasetConfig) -> list[Tensor]:
    types = {FeatureType.categorical: "TYPE_STRING", FeatureType.numeric: "TYPE_FP32"}
    return [(f.name, types[f.type], 1) for f in dataset.features]


def _signature(serving: ServingConfig, name: str, served: list[int], inputs: list[Tensor], outputs: list[Tensor], batching: bool = True) -> ModelConfig:
    """A batched ModelConfig serving ``served``; inputs and outputs as (name, type, width) per row."""
    from tritonclient.grpc import model_config_pb2 as mc

    rendering = mc.ModelConfig(
        name=name,
        max_batch_size=serving.max_batch_size,
        input=[mc.ModelInput(name=n, data_type=mc.DataType.Value(t), dims=[w]) for n, t, w in inputs],
        output=[mc.ModelOutput(name=n, data_type=mc.DataType.Value(t), dims=[w]) for n, t, w in outputs],
        version_policy=mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=sorted(served))),
    )
    if batching:  # an ensemble has no batcher of its own: its steps batch
        rendering.dynamic_batching.CopyFrom(mc.ModelDynamicBatching(max_queue_delay_microseconds=serving.max_queue_delay_microseconds))
    return rendering


# --- the tensorrt_plan rendering: lookup (ONNX Runtime, CPU) then engine (TensorRT, GPU) ---


def step_dir(model_dir: Path, step: str) -> Path:
    """The folder of a composing model (``ENGINE_STEPS``) of the tensorrt_plan rendering of the
    model in ``model_dir``: ``<model>_<step>`` beside it."""
    return model_dir.with_name(f"{model_dir.name}_{step}")


def has_engine(model_dir: Path, version: int) -> bool:
    """Whether ``version`` has a TensorRT engine, so the gpu profile serves it as an ensemble."""
    return (step_dir(model_dir, "engine") / str(version) / PLAN_FILE).is_file()


def _widths(dataset: DatasetConfig) -> tuple[int, int]:
    kinds = [f.type for f in dataset.features]
    return kinds.count(FeatureType.categorical), kinds.count(FeatureType.numeric)


def step_configs(model_dir: Path, serving: ServingConfig, dataset: DatasetConfig, served: list[int]) -> dict[str, ModelConfig]:
    """The composing models' ModelConfigs by step, each serving the versions ``served``.

    ``served`` lists more than one version only while going live switches between them, the
    version going live last. The engine step declares the outputs of that version's engine
    (``outputs``) and TensorRT takes a config only with every output of an engine, so an engine
    with other outputs (a version exported before the ``label``, or after it on a rollback) is
    left out: the ensemble serving it fails requests until the switch.
    """
    from tritonclient.grpc import model_config_pb2 as mc

    categorical, numeric = _widths(dataset)
    between = [(CODES, "TYPE_INT32", categorical), (NUMERIC, "TYPE_FP32", numeric)]
    lookup = _signature(serving, step_dir(model_dir, "lookup").name, served, _feature_inputs(dataset), between)
    lookup.platform = "onnxruntime_onnx"  # model.onnx: strings are for ONNX Runtime, not TensorRT
    lookup.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1))
    answered = outputs(model_dir, served[-1])
    alike = [v for v in served if outputs(model_dir, v) == answered]
    if alike != served:
        log.warning("%s: versions %s answer other outputs than version %d; its engine step holds %s only", model_dir.name, sorted(set(served) - set(alike)), served[-1], alike)
    engine = _signature(serving, step_dir(model_dir, "engine").name, alike, between, answered)
    engine.platform = "tensorrt_plan"  # model.plan
    engine.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_GPU, count=1))
    return {"lookup": lookup, "engine": engine}


def ensemble_config(model_dir: Path, serving: ServingConfig, dataset: DatasetConfig, version: int) -> ModelConfig:
    """The served model of an engine version: raw columns -> lookup -> engine -> ``prediction``
    (and ``label``), both steps pinned to ``version``; the same inputs and outputs as every
    other rendering of the version."""
    from tritonclient.grpc import model_config_pb2 as mc

    answered = outputs(model_dir, version)
    rendering = _signature(serving, model_dir.name, [version], _feature_inputs(dataset), answered, batching=False)
    rendering.platform = "ensemble"
    between = {CODES: CODES, NUMERIC: NUMERIC}
    features = {f.name: f.name for f in dataset.features}
    lookup, engine = (step_dir(model_dir, step).name for step in ENGINE_STEPS)
    rendering.ensemble_scheduling.step.extend(
        [
            mc.ModelEnsembling.Step(model_name=lookup, model_version=version, input_map=features, output_map=between),
            mc.ModelEnsembling.Step(model_name=engine, model_version=version, input_map=between, output_map={n: n for n, _, _ in answered}),
        ]
    )
    return rendering


def next_version(*model_dirs: Path) -> int:
    """The number of the next version of a served unit (a model, or an ensemble and its steps):
    above every number any of ``model_dirs`` holds, so the steps a crashed publish left (never
    served: no lineage) are never reused."""
    return max((v for folder in model_dirs for v in versions(folder)), default=0) + 1


def add_engine_steps(model_dir: Path, candidate: Path, version: int) -> None:
    """Copy a candidate's ``lookup.onnx`` and ``model.plan`` in as ``version`` of the two steps
    of the model in ``model_dir``."""
    add_version(step_dir(model_dir, "lookup"), {MODEL_FILE: candidate / LOOKUP_FILE}, None, version)
    add_version(step_dir(model_dir, "engine"), {PLAN_FILE: candidate / PLAN_FILE}, None, version)


def place(rendering: ModelConfig, profile: ServingProfile) -> ModelConfig:
    """Where and how Triton runs a version's ``model.onnx``, per serving profile (see ``model_config``)."""
    from tritonclient.grpc import model_config_pb2 as mc

    if profile == ServingProfile.cpu:
        rendering.backend = "python"
        rendering.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1))
    else:
        rendering.platform = "onnxruntime_onnx"
        rendering.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_GPU, count=1))
        tensorrt = rendering.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        tensorrt.parameters.update({"precision_mode": "FP16", "trt_engine_cache_enable": "true", "trt_engine_cache_path": "/tmp/triton-trt-cache"})
    return rendering


def write_model_config(model_dir: Path, model_config: ModelConfig) -> Path:
    """Replace ``config.pbtxt`` atomically."""
    from google.protobuf import text_format

    file = model_dir / CONFIG_FILE
    partial = model_dir / f".{CONFIG_FILE}.partial"
    partial.write_text(text_format.MessageToString(model_config))
    os.replace(partial, file)
    return file


def add_version(model_dir: Path, files: dict[str, Path], lineage: Record | None, version: int | None = None) -> int:
    """Copy files (or folders) into a new numbered version: built beside, then renamed into place.

    ``version`` defaults to the next number; models that make one served unit (an ensemble and
    its steps) pass the same one. ``lineage`` None writes no ``lineage.json``. A crash leaves at
    most a staging folder, never a half version; the rename fails rather than overwrite if
    another writer took the number first.
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    for leftover in model_dir.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(leftover)
    version = version or (versions(model_dir) or [0])[-1] + 1
    staging = model_dir / f"{STAGING_PREFIX}{version}"
    staging.mkdir()
    for name, source in files.items():
        if source.is_dir():
            shutil.copytree(source, staging / name)
        else:
            shutil.copy2(source, staging / name)
    if lineage is not None:
        write_json(staging / LINEAGE_FILE, {**lineage, "version": version})
    os.rename(staging, model_dir / str(version))
    return version


def refresh_backend(model_dir: Path, version: int) -> list[str]:
    """Bring the backend files (``BACKEND_FILES``) of an existing version up to this project's:
    the router of a rollout runs in the champion's ``model.py``, which a version published by an
    older Flywheel lacks. The model itself is untouched; each file is replaced atomically and a
    running Triton reads it at the next load. Returns the names of the files replaced."""
    replaced = []
    for name, source in BACKEND_FILES.items():
        target = model_dir / str(version) / name
        if target.is_file() and target.read_bytes() == source.read_bytes():
            continue
        partial = target.with_name(f".{name}.partial")
        shutil.copy2(source, partial)
        os.replace(partial, target)
        replaced.append(name)
    return replaced


def lineage_of(model_dir: Path, version: int) -> Record:
    """The ``lineage.json`` of a version; ``FileNotFoundError`` if it has none."""
    lineage: Record = read_json(model_dir / str(version) / LINEAGE_FILE)
    return lineage


def version_of_run(model_dir: Path, run_id: str) -> int | None:
    """The version an Airflow run already added (a retried publish), if any."""
    for version in versions(model_dir):
        if lineage_of(model_dir, version).get("airflow", {}).get("run_id") == run_id:
            return version
    return None


def version_rows(project: str, folder: Path) -> list[Record]:
    """One line per version of a project's served model in ``folder`` (tabular or text), oldest
    first: whether it serves, its status, the gate's deciding metric and reason, the run that
    made it, its data."""
    served = served_version(folder)
    rows = []
    for version in versions(folder):
        lineage = lineage_of(folder, version)
        gate = lineage.get("gate") or {}
        metric = gate.get("metric")
        rows.append(
            {
                "project": project,
                "model": folder.name,
                "version": version,
                "serving": version == served,
                "status": lineage.get("status", "published"),
                "metric": metric,
                "value": (gate.get("challenger") or {}).get(metric),
                "decision": gate.get("reason"),
                "run_id": (lineage.get("airflow") or {}).get("run_id"),
                "data_version": lineage.get("data_version"),
            }
        )
    return rows
