"""Typed project configuration, loaded once from ``params.yaml``.

One file describes one project: where its batches land, the columns, how to split,
the model, training, the gate, export and serving. DVC reads the same file for the
split stage's parameters. Every model is frozen and forbids unknown keys, so a typo
is an error that names the key instead of a silent default.
"""

from __future__ import annotations

import os
from datetime import timedelta
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PARAMS_FILE = "params.yaml"
# A deployment's changes to params.yaml (serving profile, Triton and Pushgateway addresses), in
# a YAML file of the same sections: in the compose deployment, docker-compose.yml's
# `flywheel-params` config, mounted at /opt/flywheel/params.compose.yaml.
OVERRIDES_ENV = "FLYWHEEL_PARAMS_OVERRIDES"
DVC_SECTIONS = frozenset({"dataset", "split"})  # dvc.yaml's split stage reads these from params.yaml
# The Celery queue of tasks that want a GPU (training, fine-tuning): on the CeleryExecutor only
# workers started with `--queues gpu` take them; the LocalExecutor ignores queues. A constant,
# not a setting: DAG files read it when parsed, and parsing must not read the project's files.
GPU_QUEUE = "gpu"


def task_defaults(
    retries: int = 2, retry_delay: timedelta = timedelta(minutes=1), max_retry_delay: timedelta | None = timedelta(minutes=30)
) -> dict:
    """A DAG's ``default_args``: the owner on-call pages, and retries with exponential backoff."""
    defaults = {"owner": "ml-platform", "retries": retries, "retry_delay": retry_delay, "retry_exponential_backoff": True}
    return defaults | ({"max_retry_delay": max_retry_delay} if max_retry_delay else {})


class ConfigError(ValueError):
    """The project configuration is missing or invalid."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureType(str, Enum):
    categorical = "categorical"
    numeric = "numeric"


class Feature(Strict):
    name: str
    type: FeatureType


class Task(str, Enum):
    classification = "classification"  # binary: the label holds 0 and 1
    regression = "regression"


class Label(Strict):
    column: str
    task: Task


class DatasetConfig(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    landing_dir: Path
    raw_path: Path
    archive_dir: Path
    quarantine_dir: Path
    expectation_suite: Path
    id_column: str
    time_column: str
    label: Label
    features: tuple[Feature, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct_columns(self) -> DatasetConfig:
        names = [f.name for f in self.features]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"dataset.features lists {duplicates} more than once")
        reserved = {self.id_column, self.time_column, self.label.column} & set(names)
        if reserved:
            raise ValueError(f"dataset.features must not include the id, time or label column: {sorted(reserved)}")
        return self

    def columns_of(self, kind: FeatureType) -> list[str]:
        return [f.name for f in self.features if f.type == kind]

    @property
    def columns(self) -> list[str]:
        """Every column a batch must carry."""
        return [self.id_column, self.time_column, *(f.name for f in self.features), self.label.column]


class SplitConfig(Strict):
    output_dir: Path
    train: float = Field(gt=0, lt=1)
    val: float = Field(gt=0, lt=1)
    test: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"split.train + split.val + split.test must be 1, got {total:g}")
        return self


class VersioningConfig(Strict):
    remote: str = Field(min_length=1, description="DVC remote: a directory, or s3://, gs://, azure:// for a cluster")


class ModelConfig(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    embedding_dim: int = Field(ge=1, le=256)
    hidden_sizes: tuple[int, ...] = Field(min_length=1)
    dropout: float = Field(ge=0, lt=1)


class TrainConfig(Strict):
    max_epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    patience: int = Field(ge=1)
    seed: int


Metric = Literal["roc_auc", "f1", "log_loss", "rmse", "mae"]
# "loss": a fine-tuned causal LM's held-out loss (pipelines.finetune.evaluate).
LOWER_IS_BETTER: frozenset[str] = frozenset({"log_loss", "rmse", "mae", "loss"})
METRICS_FOR_TASK: dict[Task, frozenset[str]] = {
    Task.classification: frozenset({"roc_auc", "f1", "log_loss"}),
    Task.regression: frozenset({"rmse", "mae"}),
}


class GateConfig(Strict):
    metric: Metric
    min_improvement: float = Field(ge=0, description="challenger must beat the champion by at least this much")
    floor: float = Field(description="absolute bound the challenger must pass, champion or not")


class TensorRTPrecision(str, Enum):
    off = "off"
    fp16 = "fp16"
    int8 = "int8"  # calibrated on a sample of the training split


class ExportConfig(Strict):
    opset: int = Field(ge=17)
    parity_rows: int = Field(ge=1)
    parity_tolerance: float = Field(gt=0)
    int8: bool = Field(default=False, description="try ONNX Runtime dynamic int8 quantisation")
    int8_tolerance: float = Field(default=0.002, ge=0, description="largest loss of the gate metric int8 may cost")
    tensorrt: TensorRTPrecision = Field(
        default=TensorRTPrecision.off, description="build a TensorRT engine (model.plan) where tensorrt and CUDA are present"
    )
    tensorrt_fp16_tolerance: float = Field(default=1e-2, gt=0, description="largest |engine - onnxruntime| an fp16 engine may show")
    tensorrt_int8_tolerance: float = Field(default=5e-2, gt=0, description="the same for an int8 engine")
    tensorrt_calibration_rows: int = Field(default=2048, ge=1, description="training rows that calibrate an int8 engine")

    @field_validator("tensorrt", mode="before")
    @classmethod
    def _bare_off(cls, value: object) -> object:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false


class ServingProfile(str, Enum):
    cpu = "cpu"  # Triton's Python backend running ONNX Runtime: the tritonserver bundled in nvidia-pytriton
    gpu = "gpu"  # platform onnxruntime_onnx with the TensorRT accelerator, or tensorrt_plan: the NGC image


class TritonConfig(Strict):
    # Where publish and rollback make versions live; null: write the repository only.
    url: str | None = Field(default=None, description="host:port of Triton's HTTP endpoint")
    http_port: int = Field(default=8000, ge=1, le=65535)
    grpc_port: int = Field(default=8001, ge=1, le=65535)
    metrics_port: int = Field(default=8002, ge=1, le=65535)
    load_timeout_s: float = Field(default=120, gt=0)


class ServingConfig(Strict):
    model_repository: Path
    profile: ServingProfile = ServingProfile.cpu
    max_batch_size: int = Field(ge=1)
    max_queue_delay_microseconds: int = Field(ge=0)
    triton: TritonConfig = TritonConfig()
    smoke_rows: int = Field(default=64, ge=1, description="real test rows sent to a new version before it serves")
    smoke_tolerance: float = Field(default=1e-5, gt=0)
    inference_log: Path = Path("inference_log")


class MetricsConfig(Strict):
    pushgateway: str | None = Field(default=None, description="host:port of a Prometheus Pushgateway")
    textfile_dir: Path = Path("reports/metrics")


class DriftTest(Strict):
    # An Evidently stattest name (checked when the drift check runs) and its threshold: a
    # distance drifts at or above it, a p-value below it.
    method: str = Field(min_length=1)
    threshold: float = Field(gt=0)


class DriftTests(Strict):
    numeric: DriftTest = DriftTest(method="wasserstein", threshold=0.1)
    categorical: DriftTest = DriftTest(method="jensenshannon", threshold=0.1)
    # A domain classifier told apart reference and current: drift when its ROC AUC passes 0.55.
    text: DriftTest = DriftTest(method="abs_text_content_drift", threshold=0.55)


class MonitoringConfig(Strict):
    reference_rows: int = Field(default=20000, ge=100, description="training rows stored with each version")
    min_rows: int = Field(default=200, ge=1, description="fewer logged rows in a window give no verdict")
    drift_share: float = Field(default=0.3, gt=0, le=1, description="share of drifted columns that is dataset drift")
    tests: DriftTests = DriftTests()
    exclude_columns: tuple[str, ...] = ()
    cooldown_hours: float = Field(default=24, ge=0, description="at most one drift-triggered retrain per period")
    reports_dir: Path = Path("reports/drift")


class FinetuneTask(str, Enum):
    sequence_classification = "sequence-classification"
    causal_lm = "causal-lm"


class FinetuneMethod(str, Enum):
    lora = "lora"
    qlora = "qlora"  # 4-bit nf4 base (bitsandbytes) under LoRA adapters


class FinetuneConfig(Strict):
    """Project settings of the finetune DAG; the run's hyperparameters are its Params."""

    # The Triton model (an ensemble: tokenizer, then the merged classifier) a text classifier serves as.
    model_name: str = Field(default="reviews_sentiment", pattern=r"^[a-z][a-z0-9_]*$")
    datasets_dir: Path = Path("data/finetune")  # <dataset>.jsonl, one record a line
    quarantine_dir: Path = Path("quarantine/finetune")
    # One suite a record format: text (text, label), alpaca (instruction, input, output), chat (messages).
    suites: dict[str, Path] = {
        "text": Path("expectations/finetune_text.json"),
        "alpaca": Path("expectations/finetune_alpaca.json"),
        "chat": Path("expectations/finetune_chat.json"),
    }
    test_share: float = Field(default=0.2, gt=0, lt=0.5, description="records held out for evaluation, by hash")
    val_share: float = Field(default=0.1, gt=0, lt=0.5)
    batch_size: int = Field(default=16, ge=1)
    seed: int = 13
    # A fine-tuned classifier must beat the untuned base with a trained linear head by this much accuracy.
    min_gain_over_base: float = Field(default=0.02, ge=0)
    # ... and the served champion (same test records) by this much; a causal LM must lower held-out loss by this share.
    min_improvement: float = Field(default=0.0, ge=0)
    max_eval_records: int = Field(default=500, ge=10, description="test records scored per model")
    parity_tolerance: float = Field(default=1e-4, gt=0)


class ProjectConfig(Strict):
    dataset: DatasetConfig
    split: SplitConfig
    versioning: VersioningConfig
    model: ModelConfig
    train: TrainConfig
    gate: GateConfig
    export: ExportConfig
    serving: ServingConfig
    metrics: MetricsConfig = MetricsConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    # Candidates (trained models, served or not) and per-run lineage records live here.
    artifacts_dir: Path
    # Where the file was read from; relative paths in it are resolved against this.
    home: Path = Field(exclude=True)

    @field_validator("home")
    @classmethod
    def _absolute(cls, home: Path) -> Path:
        return home.resolve()

    @model_validator(mode="after")
    def _metric_fits_task(self) -> ProjectConfig:
        allowed = METRICS_FOR_TASK[self.dataset.label.task]
        if self.gate.metric not in allowed:
            raise ValueError(
                f"gate.metric {self.gate.metric!r} does not apply to a {self.dataset.label.task.value} label; "
                f"use one of {sorted(allowed)}"
            )
        return self

    @model_validator(mode="after")
    def _monitored_columns_exist(self) -> ProjectConfig:
        unknown = sorted(set(self.monitoring.exclude_columns) - {f.name for f in self.dataset.features})
        if unknown:
            raise ValueError(f"monitoring.exclude_columns names {unknown}, which are not dataset.features")
        return self

    def path(self, relative: Path) -> Path:
        """A configured path, resolved against the project home."""
        return relative if relative.is_absolute() else self.home / relative

    def portable(self, path: Path) -> str:
        """``path`` as task results name it: relative to the project home when inside it, so it
        means the same on every worker, wherever that worker mounts the shared home."""
        return path.relative_to(self.home).as_posix() if path.is_relative_to(self.home) else str(path)

    @cached_property
    def model_dir(self) -> Path:
        return self.path(self.serving.model_repository) / self.model.name


def project_home() -> Path:
    """The directory holding ``params.yaml``: ``$FLYWHEEL_HOME``, else the working directory."""
    return Path(os.environ.get("FLYWHEEL_HOME") or Path.cwd()).resolve()


def load_config(home: Path | str | None = None) -> ProjectConfig:
    """Read and validate ``<home>/params.yaml``, with ``$FLYWHEEL_PARAMS_OVERRIDES`` merged over
    it when set; errors name the file and the key."""
    home = Path(home).resolve() if home else project_home()
    file = home / PARAMS_FILE
    raw = _read_sections(file, f"set FLYWHEEL_HOME to the directory holding {PARAMS_FILE}")
    source = str(file)
    if overrides := os.environ.get(OVERRIDES_ENV):
        changes = _read_sections(Path(overrides), f"{OVERRIDES_ENV} names it")
        if fixed := sorted(DVC_SECTIONS & set(changes)):
            # DVC reads these from params.yaml itself: an override would version one split and train on another.
            raise ConfigError(f"{overrides}: {', '.join(fixed)} cannot be overridden (DVC reads them from {file}); change them there")
        raw, source = _merged(raw, changes), f"{file} with {overrides}"
    try:
        return ProjectConfig(**raw, home=home)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from exc


def _read_sections(file: Path, hint: str) -> dict:
    try:
        raw = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file; {hint}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def _merged(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` laid over it, mappings merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out
