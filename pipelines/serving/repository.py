"""The Triton model repository: numbered versions, ``config.pbtxt``, and which version serves.

Layout (what Triton loads)::

    model_repository/<model>/config.pbtxt      generated from Triton's ModelConfig protobuf
    model_repository/<model>/<N>/model.onnx
    model_repository/<model>/<N>/lineage.json  where version N came from

The served version is the one ``config.pbtxt`` names in its ``specific`` version policy,
so promotion and rollback are one atomic rewrite of that file, and Triton never picks up
a version just because its folder appeared.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipelines.config import ProjectConfig
from pipelines.lineage import read_json, write_json

CONFIG_FILE = "config.pbtxt"
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


def onnx_config(config: ProjectConfig, model_file: Path, version: int):
    """A ModelConfig for ``platform: onnxruntime_onnx``, its inputs and outputs read from the ONNX file."""
    import onnx
    from tritonclient.grpc import model_config_pb2 as mc

    types = {onnx.TensorProto.STRING: mc.TYPE_STRING, onnx.TensorProto.FLOAT: mc.TYPE_FP32, onnx.TensorProto.INT64: mc.TYPE_INT64}
    graph = onnx.load(str(model_file), load_external_data=False).graph

    def tensor_dims(value_info) -> list[int]:
        # The first axis is the batch axis, which Triton leaves out when max_batch_size > 0.
        return [d.dim_value or -1 for d in value_info.type.tensor_type.shape.dim[1:]]

    return mc.ModelConfig(
        name=config.model.name,
        platform="onnxruntime_onnx",
        max_batch_size=config.serving.max_batch_size,
        input=[mc.ModelInput(name=i.name, data_type=types[i.type.tensor_type.elem_type], dims=tensor_dims(i)) for i in graph.input],
        output=[mc.ModelOutput(name=o.name, data_type=types[o.type.tensor_type.elem_type], dims=tensor_dims(o)) for o in graph.output],
        dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=config.serving.max_queue_delay_microseconds),
        instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)],
        version_policy=mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=[version])),
    )


def write_model_config(model_dir: Path, model_config) -> Path:
    """Replace ``config.pbtxt`` atomically."""
    from google.protobuf import text_format

    file = model_dir / CONFIG_FILE
    partial = model_dir / f".{CONFIG_FILE}.partial"
    partial.write_text(text_format.MessageToString(model_config))
    os.replace(partial, file)
    return file


def add_version(model_dir: Path, files: dict[str, Path], lineage: dict) -> int:
    """Copy files into a new numbered version: built beside, then renamed into place.

    A crash leaves at most a staging folder, never a half version; the rename fails
    rather than overwrite if another writer took the number first.
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    for leftover in model_dir.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(leftover)
    version = (versions(model_dir) or [0])[-1] + 1
    staging = model_dir / f"{STAGING_PREFIX}{version}"
    staging.mkdir()
    for name, source in files.items():
        shutil.copy2(source, staging / name)
    write_json(staging / LINEAGE_FILE, {**lineage, "version": version})
    os.rename(staging, model_dir / str(version))
    return version


def lineage_of(model_dir: Path, version: int) -> dict:
    return read_json(model_dir / str(version) / LINEAGE_FILE)
