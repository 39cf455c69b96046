"""The Triton model repository: numbered versions, ``config.pbtxt``, and which version serves.

Layout (what Triton loads)::

    model_repository/<model>/config.pbtxt      generated from Triton's ModelConfig protobuf
    model_repository/<model>/<N>/model.onnx
    model_repository/<model>/<N>/model.py      the Python-backend model (cpu rendering)
    model_repository/<model>/<N>/lineage.json  where version N came from
    model_repository/<model>/<N>/reference.parquet  a sample of its training data, for drift checks

The served version is the one ``config.pbtxt`` names in its ``specific`` version policy,
so promotion and rollback are one atomic rewrite of that file, and Triton never picks up
a version just because its folder appeared.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipelines.config import FeatureType, ProjectConfig, ServingProfile
from pipelines.export.onnx import MODEL_FILE, OUTPUT
from pipelines.lineage import read_json, write_json

CONFIG_FILE = "config.pbtxt"
# The Python-backend model that serves model.onnx in the cpu rendering; in every version, so
# switching profiles only rewrites config.pbtxt.
BACKEND_MODEL = Path(__file__).resolve().parent / "backend" / "model.py"
LINEAGE_FILE = "lineage.json"
STAGING_PREFIX = ".staging-"


def versions(model_dir: Path) -> list[int]:
    """Complete versions on disk, oldest first (staging folders are not versions)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def read_model_config(model_dir: Path):
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
    return max(config.version_policy.specific.versions)


def model_config(config: ProjectConfig, version: int):
    """Triton's ModelConfig for a version, in the rendering ``serving.profile`` asks for.

    Inputs are the dataset's feature columns, shape [1] per row (strings for categories,
    float32 for numbers), the output is ``prediction``: the signature every export has, and
    the smoke test checks the version against it. ``cpu``: the Python backend running ONNX
    Runtime on the version's ``model.onnx`` (``model.py`` beside it). ``gpu``:
    ``onnxruntime_onnx`` with the TensorRT execution accelerator in FP16, engines cached, so
    TensorRT builds the engine inside Triton at load time.
    """
    from tritonclient.grpc import model_config_pb2 as mc

    types = {FeatureType.categorical: mc.TYPE_STRING, FeatureType.numeric: mc.TYPE_FP32}
    rendering = mc.ModelConfig(
        name=config.model.name,
        max_batch_size=config.serving.max_batch_size,
        input=[mc.ModelInput(name=f.name, data_type=types[f.type], dims=[1]) for f in config.dataset.features],
        output=[mc.ModelOutput(name=OUTPUT, data_type=mc.TYPE_FP32, dims=[1])],
        dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=config.serving.max_queue_delay_microseconds),
        version_policy=mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=[version])),
    )
    return place(rendering, config.serving.profile)


def place(rendering, profile: ServingProfile):
    """Where and how Triton runs a version's ``model.onnx``, per serving profile (see ``model_config``)."""
    from tritonclient.grpc import model_config_pb2 as mc

    if profile == ServingProfile.cpu:
        rendering.backend = "python"
        rendering.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1))
    else:
        rendering.platform = "onnxruntime_onnx"
        rendering.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_GPU, count=1))
        tensorrt = rendering.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        tensorrt.parameters.update(
            {"precision_mode": "FP16", "trt_engine_cache_enable": "true", "trt_engine_cache_path": "/tmp/triton-trt-cache"}
        )
    return rendering


def write_model_config(model_dir: Path, model_config) -> Path:
    """Replace ``config.pbtxt`` atomically."""
    from google.protobuf import text_format

    file = model_dir / CONFIG_FILE
    partial = model_dir / f".{CONFIG_FILE}.partial"
    partial.write_text(text_format.MessageToString(model_config))
    os.replace(partial, file)
    return file


def add_version(model_dir: Path, files: dict[str, Path], lineage: dict | None, version: int | None = None) -> int:
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


def lineage_of(model_dir: Path, version: int) -> dict:
    return read_json(model_dir / str(version) / LINEAGE_FILE)


def version_of_run(model_dir: Path, run_id: str) -> int | None:
    """The version an Airflow run already added (a retried publish), if any."""
    for version in versions(model_dir):
        if lineage_of(model_dir, version).get("airflow", {}).get("run_id") == run_id:
            return version
    return None
